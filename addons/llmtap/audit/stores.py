"""Which audit store a ``--db`` value names: the registry of stores behind one interface.

A store (``llmtap.audit.sqlite.AuditStore``, ``llmtap.audit.postgres.PostgresStore``) is what
the writer process applies the journal to::

    store.offsets: dict[int, int]       # generation -> offset applied (committed with the rows)
    store.head: str                     # the chain head this writer extends
    store.apply(gen, lines, end) -> Batch   # one transaction: the rows and the new offset
    store.forget(gen); store.prune(cutoff, batch) -> int; store.close()

A file path is SQLite (the embedded default for one machine); ``postgresql://``,
``postgres://`` or a libpq ``key=value`` string (``service=...``) is PostgreSQL (a fleet's one
system of record). Adding an engine is one module and one line in ``STORES``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from llmtap.config import Settings, is_server_url

#: engine -> (module, class); chosen by ``engine(db)``.
STORES = {
    "sqlite": ("llmtap.audit.sqlite", "AuditStore"),
    "postgres": ("llmtap.audit.postgres", "PostgresStore"),
}


def engine(db: str) -> str:
    return "postgres" if is_server_url(db) else "sqlite"


def open_store(settings: Settings) -> Any:
    """The store the writer process applies this llmtap's journal to."""
    if engine(settings.db) == "postgres":
        from llmtap.audit.postgres import PostgresStore, instance_id

        return PostgresStore(settings.db, instance_id(settings.journal_dir), capture_content=settings.capture_content)
    from llmtap.audit.sqlite import AuditStore

    return AuditStore(settings.db, fsync_batch=settings.fsync == "batch", capture_content=settings.capture_content)


def transient_errors(db: str) -> tuple[type[BaseException], ...]:
    """What the writer retries with backoff (the records wait in the journal meanwhile)."""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    if engine(db) == "postgres":
        from llmtap.audit.postgres import transient_errors as pg_errors

        errors += pg_errors()
    return errors
