"""A graceful stop that records everything: drain like a proxy, then record what is left.

On SIGTERM or Ctrl-C ``llmtap run`` does not drop connections on the floor:

1. it drains: every exchange in flight gets up to ``--stop-grace`` seconds (default 8, below
   Docker's 10 s stop timeout) to finish. New requests are still served (a sidecar's app may
   itself be finishing), but each response then carries ``Connection: close`` so that clients
   move off the proxy;
2. it stops the proxy. The addon's ``done`` hook records every exchange still open with what
   arrived so far and ``error_type="proxy_shutdown"``, before the sinks are closed; a record
   the audit log can no longer take is counted in ``llmtap_audit_dropped_total``;
3. connection tasks still running are cancelled quietly: a connection cut at shutdown is not
   a fault, and is not printed as a traceback.

``mitmdump -s addons/tap.py`` stops the mitmdump way (no drain), but step 2 holds there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llmtap")

POLL_SECONDS = 0.05


class Drain:
    """mitmproxy addon: while draining, responses close their client connection."""

    def __init__(self) -> None:
        self.draining = False

    def responseheaders(self, flow: Any) -> None:
        if self.draining and flow.response is not None and flow.response.http_version.startswith("HTTP/1"):
            flow.response.headers["connection"] = "close"


async def drain(drainer: Drain, in_flight: Callable[[], int], grace: float) -> None:
    """Wait until nothing is in flight or ``grace`` seconds have passed."""
    drainer.draining = True
    deadline = time.monotonic() + grace
    open_now = in_flight()
    if open_now:
        log.warning("llmtap stopping: %d exchange(s) in flight get up to %gs to finish", open_now, grace)
    while in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    if left := in_flight():
        log.warning("llmtap stopping: %d exchange(s) still open are recorded as proxy_shutdown", left)


async def cancel_quietly() -> None:
    """Cancel the tasks still running (connections cut at shutdown) and wait for them, so that
    none is reported as an error when the loop closes."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_about_cancellation)
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: asyncio does not log it as "never retrieved"


def _quiet_about_cancellation(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's stream server reads each cancelled connection task's exception in a callback,
    which raises CancelledError there: at shutdown that is expected, everything else is logged."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)
