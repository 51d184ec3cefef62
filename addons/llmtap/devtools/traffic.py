"""Mixed demo traffic: what apps would send through llmtap, in every protocol family.

Pulze Chat Completions and Completions, OpenAI Responses and embeddings go through the official
``openai`` SDK; Anthropic Messages, Gemini, Azure OpenAI and OpenRouter as plain HTTP with the
bodies their API references document (their SDKs cannot share this venv).

Faults are asked of the simulated upstream with its ``X-Sim-Fault`` header; against a real
API that header is ignored, so only use this with the simulator (it is for demos and tests).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "Write a haiku about observability.",
    "Explain what a reverse proxy does.",
    "List three uses of SQLite.",
    "Translate 'good morning' into French and German.",
    "What is time to first token and why does it matter?",
)
MODELS = ("pulze", "pulze", "openai/gpt-4o-mini", "anthropic/claude-3-haiku", "mistralai/mistral-small")
TEAMS = ("search", "support", "growth")
#: Every FAULT_EVERY-th request asks the simulator for a fault, taking these kinds in turn (the
#: kinds a real API produces), so that any 40 requests show each of them once.
FAULTS = ("429", "500", "422", "retry", "truncate")
FAULT_EVERY = 8
#: Share of the other requests sent in the other families (the rest are Pulze Chat Completions
#: and Completions; the faults are asked of those).
OTHER_FAMILIES = 0.45


@dataclass
class TrafficSummary:
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
        return f"sent {self.sent} requests ({parts})"


def drive(
    base_url: str,
    *,
    api_key: str,
    count: int,
    interval: float = 0.0,
    seed: int = 1,
    on_result: Callable[[str], None] | None = None,
) -> TrafficSummary:
    """Send ``count`` requests (0 = until interrupted); returns what happened to them.

    ``on_result`` is called with each request's outcome (for a progress bar).
    """
    import httpx
    import openai

    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    http = httpx.Client(base_url=base_url.removesuffix("/v1"), timeout=30, trust_env=False)
    summary = TrafficSummary()
    try:
        while count == 0 or summary.sent < count:
            n = summary.sent
            fault = FAULTS[(n // FAULT_EVERY) % len(FAULTS)] if n % FAULT_EVERY == FAULT_EVERY // 2 else None
            if fault is None and rng.random() < OTHER_FAMILIES:
                outcome = _other_family(client, http, api_key, rng)
            else:
                outcome = _one_request(client, rng, fault)
            summary.outcomes[outcome] += 1
            summary.sent += 1
            if on_result is not None:
                on_result(outcome)
            if interval:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        http.close()
    return summary


def _one_request(client, rng: random.Random, fault: str | None) -> str:
    import httpx
    import openai

    model = rng.choice(MODELS)
    prompt = rng.choice(PROMPTS)
    stream = rng.random() < 0.4
    headers = {"Pulze-Labels": json.dumps({"team": rng.choice(TEAMS)})}
    if fault is not None:
        headers["X-Sim-Fault"] = fault
    try:
        if rng.random() < 0.7:
            kwargs = dict(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=64, extra_headers=headers
            )
            if stream:
                for _ in client.chat.completions.create(stream=True, **kwargs):
                    pass
            else:
                client.chat.completions.create(**kwargs)
        else:
            kwargs = dict(model=model, prompt=prompt, max_tokens=64, extra_headers=headers)
            if stream:
                for _ in client.completions.create(stream=True, **kwargs):
                    pass
            else:
                client.completions.create(**kwargs)
    except openai.APIStatusError as exc:  # a non-streamed body cut short arrives as llmtap's 502
        return f"truncated (http {exc.status_code})" if fault == "truncate" else f"http {exc.status_code}"
    except (openai.APIError, httpx.HTTPError) as exc:  # a stream cut mid-way is httpx's error
        return "truncated" if fault == "truncate" else type(exc).__name__
    if fault == "truncate":  # a cut stream the SDK did not raise on
        return "truncated"
    if fault == "retry":
        return "ok after a router retry"
    return "ok stream" if stream else "ok"


def _other_family(client, http, api_key: str, rng: random.Random) -> str:
    """One request in a family other than Chat Completions; its outcome as ``_one_request`` says it."""
    import httpx
    import openai

    prompt = rng.choice(PROMPTS)
    stream = rng.random() < 0.4
    kind = rng.choice(("responses", "embeddings", "anthropic", "gemini", "azure", "openrouter"))
    try:
        if kind == "responses":
            model = rng.choice(("gpt-4o-mini", "o4-mini"))
            if stream:
                for _ in client.responses.create(model=model, input=prompt, stream=True):
                    pass
            else:
                client.responses.create(model=model, input=prompt, max_output_tokens=256)
            return f"ok {kind}"
        if kind == "embeddings":
            client.embeddings.create(model="text-embedding-3-small", input=[prompt, prompt.upper()])
            return f"ok {kind}"
        if kind == "anthropic":
            system = [{"type": "text", "text": "You answer briefly. " * 30, "cache_control": {"type": "ephemeral"}}]
            body = {"model": "claude-haiku-4-5", "max_tokens": 64, "system": system, "stream": stream}
            body["messages"] = [{"role": "user", "content": prompt}]
            headers = {"x-api-key": api_key, "anthropic-version": "2023-06-01"}
            response = _send(http, "/v1/messages", body, headers, stream)
        elif kind == "gemini":
            body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
            model = rng.choice(("gemini-2.5-flash", "gemini-2.0-flash"))
            path = f"/v1beta/models/{model}:{'streamGenerateContent?alt=sse' if stream else 'generateContent'}"
            response = _send(http, path, body, {"x-goog-api-key": api_key}, stream)
        elif kind == "azure":
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
            response = _send(http, path, body, {"api-key": api_key}, stream)
        else:
            body = {"model": rng.choice(("openai/gpt-4o-mini", "anthropic/claude-3-haiku")), "stream": stream}
            body["messages"] = [{"role": "user", "content": prompt}]
            byok = {"X-Sim-BYOK": "1"} if rng.random() < 0.3 else {}
            response = _send(
                http, "/api/v1/chat/completions", body, {"authorization": f"Bearer {api_key}", **byok}, stream
            )
    except openai.APIStatusError as exc:
        return f"http {exc.status_code}"
    except (openai.APIError, httpx.HTTPError) as exc:
        return type(exc).__name__
    if response >= 400:
        return f"http {response}"
    return f"ok {kind}{' stream' if stream else ''}"


def _send(http, path: str, body: dict, headers: dict[str, str], stream: bool) -> int:
    """POST ``body``; read the whole answer (a stream to its end); the status."""
    with http.stream("POST", path, json=body, headers=headers) as response:
        for _ in response.iter_bytes():
            pass
        return response.status_code
