"""What the proxy and the audit writer process agree on: how the writer is started, and its timing.

The proxy side (``llmtap.sinks.audit``) imports this module, never the writer's entry module
(``llmtap.audit.writer``), which it only ever runs as a separate process.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field

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


@dataclass(frozen=True)
class WriterStatus:
    """What the writer tells the proxy, one line on its stdout whenever something changed.

    Health counts are totals since the writer process started; the proxy adds the differences.
    """

    positions: dict[int, int] = field(default_factory=dict)  # generation -> offset applied, if on disk
    newest: int = 0  # the newest journal generation the writer has seen
    errors: dict[str, int] = field(default_factory=dict)  # internal errors by stage
    dropped: int = 0  # audit rows dropped
    span_failures: int = 0  # spans that failed to export
    gauges: dict[str, float] = field(default_factory=dict)  # e.g. span_queue_depth

    def to_line(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_line(cls, line: str | bytes) -> WriterStatus:
        data = json.loads(line)
        data["positions"] = {int(gen): offset for gen, offset in data["positions"].items()}
        return cls(**data)
