"""Runs official SDK calls as a user would, in the SDKs' own venv (``.venv-clients``), never pytest's.

Usage: ``python sdk_client.py CALL BASE_URL`` — prints one JSON object: what the SDK handed the
app (ids, usage, text), so a test can compare it with what llmtap recorded. The SDKs (openai 3,
anthropic >= 1, google-genai) need h11 >= 0.16 and cannot share mitmproxy 11's venv.
"""

from __future__ import annotations

import json
import sys

KEY = "sk-sdk-SECRET-0123456789abcdef"


def dump(obj):
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


def openai_client(base: str):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=30)


def responses_create(base: str) -> dict:
    client = openai_client(base)
    response = client.responses.create(
        model="gpt-4o-mini",
        instructions="Answer briefly.",
        input="What does a proxy observe?",
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}],
        temperature=0.3,
        top_p=0.9,
        max_output_tokens=400,
        previous_response_id="resp_earlier1",
    )
    return {"id": response.id, "usage": dump(response.usage), "text": response.output_text, "model": response.model}


def responses_stream(base: str) -> dict:
    client = openai_client(base)
    events = []
    final = None
    for event in client.responses.create(model="o4-mini", input="Stream about tokens", stream=True):
        events.append(event.type)
        if event.type in ("response.completed", "response.incomplete", "response.failed"):
            final = event.response
    return {"id": final.id, "usage": dump(final.usage), "events": events, "status": final.status}


def responses_background(base: str) -> dict:
    client = openai_client(base)
    queued = client.responses.create(model="gpt-4o-mini", input="Work on this in the background", background=True)
    statuses = [queued.status]
    final = None
    for _ in range(4):  # bounded: in progress, completed, then polls that must not bill again
        polled = client.responses.retrieve(queued.id)
        statuses.append(polled.status)
        if polled.status == "completed" and final is None:
            final = polled
    return {"id": queued.id, "statuses": statuses, "usage": dump(final.usage) if final else None}


def embeddings_create(base: str) -> dict:
    client = openai_client(base)
    result = client.embeddings.create(
        model="text-embedding-3-small", input=["first text", "a second one"], dimensions=8
    )
    return {"usage": dump(result.usage), "dimensions": len(result.data[0].embedding), "count": len(result.data)}


def azure_chat(base: str) -> dict:
    import openai

    client = openai.AzureOpenAI(
        azure_endpoint=base, api_key=KEY, api_version="2024-10-21", azure_deployment="my-gpt4o-mini", max_retries=0
    )
    plain = client.chat.completions.create(
        model="my-gpt4o-mini", messages=[{"role": "user", "content": "Hello Azure"}], max_tokens=20
    )
    usage = None
    chunks = 0
    stream = client.chat.completions.create(
        model="my-gpt4o-mini",
        messages=[{"role": "user", "content": "Stream from Azure"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = dump(chunk.usage)
    embedded = client.embeddings.create(model="my-embedder", input="embed me")
    return {
        "plain": {"id": plain.id, "usage": dump(plain.usage)},
        "stream_usage": usage,
        "chunks": chunks,
        "embeddings_usage": dump(embedded.usage),
    }


def anthropic_calls(base: str) -> dict:
    import anthropic

    client = anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0)
    system = [{"type": "text", "text": "You are a careful assistant " * 20, "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(
        model="claude-haiku-4-5", max_tokens=200, system=system, messages=[{"role": "user", "content": "Hi there"}]
    )
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=200, system=system, messages=[{"role": "user", "content": "Hi there"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    return {
        "create": {"id": first.id, "usage": dump(first.usage), "model": first.model},
        "stream": {"id": final.id, "usage": dump(final.usage), "text": text},
    }


def gemini_calls(base: str) -> dict:
    from google import genai
    from google.genai import types

    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=base))
    plain = client.models.generate_content(model="gemini-2.5-flash", contents="Say something about proxies")
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Stream it"))
    return {
        "plain": dump(plain.usage_metadata),
        "stream": dump(chunks[-1].usage_metadata),
        "chunks": len(chunks),
        "text": "".join(c.text or "" for c in chunks),
    }


CALLS = {f.__name__: f for f in (responses_create, responses_stream, responses_background, embeddings_create)}
CALLS |= {f.__name__: f for f in (azure_chat, anthropic_calls, gemini_calls)}

if __name__ == "__main__":
    print(json.dumps(CALLS[sys.argv[1]](sys.argv[2].rstrip("/"))))
