"""Spans from the proxy's own process, when there is no audit log.

With the audit log on, the writer process exports the spans after their rows commit
(``llmtap.audit.writer``), and this sink is not started.
"""

from __future__ import annotations

from llmtap.tracing import RecordSpans


class SpanSink(RecordSpans):
    """``RecordSpans`` as one of the proxy's sinks: spans are built and exported on its thread."""
