"""Protocol parsers: pure functions of request/response bytes to record fields.

Nothing here imports mitmproxy, so every parser is testable without a proxy. Families:
``openai_compat`` (the OpenAI completions shape that Pulze and many hosts share) and
``pulze`` (Pulze's headers and response ``metadata``).

JSON objects are tested with ``isinstance(value, dict)``: json.loads makes nothing else, and a
``Mapping`` check goes through the ABC machinery, several times slower, on every field of
every stream event.
"""
