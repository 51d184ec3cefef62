"""Protocol parsers: pure functions of request/response bytes to record fields.

Nothing here imports mitmproxy, so every parser is testable without a proxy. Families:
``openai_compat`` (the OpenAI completions shape that Pulze and many hosts share) and
``pulze`` (Pulze's headers and response ``metadata``).
"""
