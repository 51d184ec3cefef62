"""Mixed demo traffic with the official ``openai`` SDK: what an app would send through llmtap.

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
    import openai

    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    summary = TrafficSummary()
    try:
        while count == 0 or summary.sent < count:
            n = summary.sent
            fault = FAULTS[(n // FAULT_EVERY) % len(FAULTS)] if n % FAULT_EVERY == FAULT_EVERY // 2 else None
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
    return summary


def _one_request(client, rng: random.Random, fault: str | None) -> str:
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
    except openai.APIError as exc:
        return "truncated" if fault == "truncate" else type(exc).__name__
    if fault == "truncate":  # a cut stream the SDK did not raise on
        return "truncated"
    if fault == "retry":
        return "ok after a router retry"
    return "ok stream" if stream else "ok"
