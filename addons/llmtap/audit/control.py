"""What the proxy and the audit writer process agree on: how the writer is started, and its timing.

The proxy side (``llmtap.sinks.audit``) imports this module, never the writer's entry module
(``llmtap.audit.writer``), which it only ever runs as a separate process.
"""

from __future__ import annotations

import json
import os
import sys

from llmtap.config import Settings

#: How long the writer may take to apply and retire the journal once told to stop.
STOP_TIMEOUT_SECONDS = 10.0


#: The writer's first statement: put the one directory llmtap came from first on the import path,
#: then run the writer. ``-I`` (isolated mode) keeps the working directory, PYTHONPATH and the
#: user's site-packages off ``sys.path``: started from a directory that holds a ``secrets.py`` or
#: a ``json.py``, the writer must neither crash on it nor run it.
_BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from llmtap.audit.writer import main; main()"


def package_root() -> str:
    """The directory that holds the ``llmtap`` package this process imported (``addons/`` for
    ``mitmdump -s addons/tap.py``, site-packages for an installed llmtap)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def writer_command(settings: Settings, *, prune_batch: int, max_backoff: float) -> list[str]:
    """How the audit sink starts the writer (never with the key salt: argv is public).

    The import path is exactly the interpreter's own (its standard library and site-packages)
    plus ``package_root()``: nothing from the working directory or the environment.
    """
    tuning = json.dumps({"prune_batch": prune_batch, "max_backoff": max_backoff})
    return [sys.executable, "-I", "-c", _BOOT, package_root(), settings.to_json(), tuning]


def next_backoff(delay: float, cap: float) -> float:
    """The wait before the next retry: from 0.1 s, doubling, at most ``cap``."""
    return min(max(delay * 2, 0.1), cap)
