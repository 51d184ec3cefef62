"""Which audit store a ``--db`` value names: the registry of stores behind one interface.

A store (``llmtap.audit.sqlite.AuditStore``, ``llmtap.audit.postgres.PostgresStore``) is what
the writer process applies the journal to::

    Store.from_settings(settings)       # open (and migrate when allowed) for this llmtap
    store.offsets: dict[int, int]       # generation -> offset applied (committed with the rows)
    store.head: str                     # the chain head this writer extends
    store.rows: int                     # rows ever in that chain: the head's position
    store.apply(gen, lines, end) -> Batch   # one transaction: the rows and the new offset
    store.forget(gen); store.prune(cutoff, batch) -> int; store.close()

A file path is SQLite (the embedded default for one machine); ``postgresql://``,
``postgres://`` or a libpq ``key=value`` string (``service=...``) is PostgreSQL (a fleet's one
system of record). Adding an engine is one module and one line in ``STORES``.
"""

from __future__ import annotations

import importlib
from typing import Any

from llmtap.config import Settings, is_server_url

#: engine -> the module holding its store: ``Store.from_settings(settings)`` opens it for the
#: writer, ``transient_errors()`` names what the writer retries with backoff.
STORES = {
    "sqlite": "llmtap.audit.sqlite",
    "postgres": "llmtap.audit.postgres",
}


def engine(db: str) -> str:
    return "postgres" if is_server_url(db) else "sqlite"


def open_store(settings: Settings) -> Any:
    """The store the writer process applies this llmtap's journal to."""
    return importlib.import_module(STORES[engine(settings.db)]).Store.from_settings(settings)


def transient_errors(db: str) -> tuple[type[BaseException], ...]:
    """What the writer retries with backoff (the records wait in the journal meanwhile)."""
    return (OSError, *importlib.import_module(STORES[engine(db)]).transient_errors())
