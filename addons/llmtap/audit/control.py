"""What the proxy and the audit writer process agree on: how the writer is started, and its timing.

The proxy side (``llmtap.sinks.audit``) imports this module, never the writer's entry module
(``llmtap.audit.writer``), which it only ever runs as a separate process.
"""

from __future__ import annotations

import json
import sys

from llmtap.config import Settings

#: How long the writer may take to apply and retire the journal once told to stop.
STOP_TIMEOUT_SECONDS = 10.0


def writer_command(settings: Settings, *, prune_batch: int, max_backoff: float) -> list[str]:
    """How the audit sink starts the writer (never with the key salt: argv is public)."""
    tuning = json.dumps({"prune_batch": prune_batch, "max_backoff": max_backoff})
    return [sys.executable, "-m", "llmtap.audit.writer", settings.to_json(), tuning]


def next_backoff(delay: float, cap: float) -> float:
    """The wait before the next retry: from 0.1 s, doubling, at most ``cap``."""
    return min(max(delay * 2, 0.1), cap)
