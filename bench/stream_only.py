"""Baseline (b) of the streaming bench: bare mitmdump, but forwarding SSE as it arrives.

Without this, mitmdump buffers a whole event stream before sending it on, which is no fair
baseline for time to first chunk. Run as ``mitmdump --mode reverse:URL -s bench/stream_only.py``.
"""


def responseheaders(flow):
    flow.response.stream = "text/event-stream" in flow.response.headers.get("content-type", "")
