"""Self-health counters shared by every part of llmtap.

llmtap fails open: when one of its own parts goes wrong, the exchange goes on untouched and
the fault is counted here (exported as ``llmtap_internal_errors_total{stage}`` and friends)
and logged once per stage and exception type, so a recurring fault cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("llmtap")


class Health:
    """Thread-safe counters; sinks and the addon report here, the metrics sink exports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.internal_errors: Counter[str] = Counter()  # by stage
        self.audit_dropped = 0
        self.span_export_failures = 0
        self.label_overflow: Counter[str] = Counter()  # by label name
        self.in_flight = 0  # exchanges between request and record; touched on the event loop only
        self._logged: set[tuple[str, str]] = set()
        #: name -> callable returning the current value; sinks register queue depths here.
        self.gauges: dict[str, Callable[[], float]] = {}

    def error(self, stage: str, exc: BaseException, context: str = "") -> None:
        """Count a fault of llmtap's own; log it the first time it is seen."""
        key = (stage, type(exc).__name__)
        with self._lock:
            self.internal_errors[stage] += 1
            first = key not in self._logged
            self._logged.add(key)
        if first:
            log.warning(
                "llmtap %s failed%s: %s: %s (further %s errors of this kind are only counted)",
                stage,
                f" ({context})" if context else "",
                type(exc).__name__,
                exc,
                stage,
            )

    def add_errors(self, stage: str, n: int) -> None:
        """Count faults another process (the audit writer) already logged."""
        if n > 0:
            with self._lock:
                self.internal_errors[stage] += n

    def add_audit_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.audit_dropped += n

    def add_span_export_failures(self, n: int = 1) -> None:
        with self._lock:
            self.span_export_failures += n

    def add_label_overflow(self, label: str) -> None:
        with self._lock:
            self.label_overflow[label] += 1
