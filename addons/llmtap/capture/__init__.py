"""The mitmproxy side: the addon's hooks, stream tee and decoding, header helpers, the lean master and the `llmtap run` server."""
