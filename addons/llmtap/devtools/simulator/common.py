"""What every simulated family shares: the models and their prices, deterministic answers, replies.

A family module turns a parsed request into a :class:`JsonReply` or a :class:`StreamReply`;
the server (``server.py``) does the HTTP, the faults and the content-encodings around it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple


class ListPrice(NamedTuple):
    """USD per one million tokens."""

    prompt: float
    completion: float


#: The provider models the simulator serves, with their list prices (USD per 1M tokens).
PRICES: dict[str, ListPrice] = {
    "openai/gpt-4o-mini": ListPrice(0.15, 0.60),
    "openai/gpt-4o": ListPrice(2.50, 10.00),
    "anthropic/claude-3-haiku": ListPrice(0.25, 1.25),
    "mistralai/mistral-small": ListPrice(0.20, 0.60),
    "meta/llama-3-8b-instruct": ListPrice(0.05, 0.25),
}
#: Pulze reports ``cost_savings`` against GPT-4 list prices.
REFERENCE_PRICE = ListPrice(30.0, 60.0)
#: Requested model names that mean "Pulze picks the model".
ROUTER_MODELS = frozenset({"pulze", "pulze-v0", "pulze-v0.1", "pulze-v1.0"})

NAMESPACES = tuple(PRICES)
ALIASES = {**{ns: ns for ns in PRICES}, **{ns.split("/", 1)[1]: ns for ns in PRICES}}
MODEL_INFO = {
    ns: {
        "model": ns.split("/", 1)[1],
        "provider": ns.split("/", 1)[0],
        "owner": ns.split("/", 1)[0],
        "namespace": ns,
        "at": "2024-06-01",
    }
    for ns in PRICES
}
CATEGORIES = ("general", "coding", "summarization", "creative-writing", "question-answering")
_VOCAB = [
    "the",
    "model",
    "considers",
    "your",
    "question",
    "and",
    "answers",
    "it",
    "with",
    "care",
    "using",
    "a",
    "few",
    "plain",
    "words",
    "about",
    "latency",
    "cost",
    "tokens",
    "routing",
    "providers",
    "quality",
    "streams",
    "requests",
    "responses",
    "metrics",
    "proxy",
    "observes",
    "every",
    "exchange",
    "so",
    "that",
    "teams",
    "can",
    "see",
    "spend",
    "per",
    "label",
    "and",
    "per",
    "app",
    "while",
    "developers",
    "keep",
    "shipping",
    "features",
    "quickly",
    "without",
    "surprises",
    "in",
    "the",
    "monthly",
    "invoice",
]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


@lru_cache(maxsize=8192)
def words(key: int) -> tuple[str, ...]:
    """Deterministic 8-40 word answer; cached because benchmarks repeat prompts."""
    rng = random.Random(key)
    found = rng.choices(_VOCAB, k=rng.randint(8, 40))
    found[0] = found[0].capitalize()
    found[-1] += "."
    return tuple(found)


def answer(text: str, seed: int, salt: int = 0, max_tokens: int | None = None) -> tuple[tuple[str, ...], bool]:
    """The words answering ``text`` (one token per word), and whether ``max_tokens`` cut them."""
    found = words(int.from_bytes(digest(text)[:8], "big") + seed * 1_000_003 + salt)
    cut = max_tokens is not None and max_tokens < len(found)
    return (found[:max_tokens] if cut else found), cut


def token_count(text: str) -> int:
    """Input tokens of a text: one per word, at least one."""
    return max(1, len(text.split()))


def cost_dict(prompt: float, completion: float) -> dict[str, float]:
    prompt, completion = round(prompt, 10), round(completion, 10)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def costs_for(namespace: str, prompt_tokens: int, completion_tokens: int) -> tuple[dict, dict]:
    """``(costs, cost_savings)`` in USD, each part rounded to 10 places, total = sum of parts."""
    price = PRICES[namespace]
    prompt, completion = prompt_tokens * price.prompt / 1e6, completion_tokens * price.completion / 1e6
    return cost_dict(prompt, completion), cost_dict(
        prompt_tokens * REFERENCE_PRICE.prompt / 1e6 - prompt,
        completion_tokens * REFERENCE_PRICE.completion / 1e6 - completion,
    )


@lru_cache(maxsize=1024)
def app_id_for(api_key: str) -> str:
    """A stable per-key app id, as Pulze attributes every request to an app."""
    return "app-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


class BadRequest(Exception):
    """A request the simulator answers with an error status instead of a completion."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def invalid(loc: list[Any], msg: str, kind: str) -> BadRequest:
    """A FastAPI-style 422 (Pulze's shape)."""
    return BadRequest(422, {"detail": [{"loc": loc, "msg": msg, "type": kind}]})


def openai_error(status: int, message: str, kind: str, code: Any = None) -> BadRequest:
    """OpenAI's error shape, also used by Azure OpenAI and OpenRouter."""
    return BadRequest(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})


def parse_json(body: bytes) -> dict[str, Any]:
    """FastAPI-style 422s for bodies that are not a JSON object."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise invalid(["body", getattr(exc, "pos", 0)], str(exc), "value_error.jsondecode") from None
    if not isinstance(payload, dict):
        raise invalid(["body"], "value is not a valid dict", "type_error.dict")
    return payload


@dataclass(slots=True)
class JsonReply:
    """A whole body. ``body`` may be a callable, called when the response is due (after any delay)."""

    status: int
    body: bytes | Callable[[], bytes]
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


#: How stream events go on the wire: ``data`` = ``data: {json}`` (OpenAI chat, Gemini ``alt=sse``);
#: ``typed`` = ``event: {type}`` + ``data: {json}`` (OpenAI Responses, Anthropic Messages);
#: ``array`` = one JSON array whose elements arrive one by one (Gemini without ``alt=sse``).
STREAM_STYLES = ("data", "typed", "array")


@dataclass(slots=True)
class StreamReply:
    """Stream events ``(is_final, event)``, lazily: the final one may measure latency when due."""

    events: Iterator[tuple[bool, dict[str, Any]]]
    style: str = "data"
    done: bytes | None = b"[DONE]"  # the ``data:`` line after the last event, if any
    content_type: str = "text/event-stream; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    crlf: bool = False  # end lines with CRLF (else only when asked with ``X-Sim-SSE: crlf``)


Reply = JsonReply | StreamReply


@dataclass(slots=True)
class Call:
    """One routed request, as a family module's handler sees it."""

    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]  # what the route's pattern captured ({model}, {deployment}, {id})
    headers: dict[str, str]
    body: bytes
    request_id: str
    fault: str | None
    t0: float  # time.monotonic() when the request arrived


def pulze_error(status: int, message: str) -> BadRequest:
    """Pulze's error bodies: FastAPI-style 401 and 422, OpenAI-style otherwise."""
    if status == 422:
        return invalid(["body", "model"], message, "value_error")
    if status == 401:
        return BadRequest(401, {"detail": "Not authenticated"})
    return BadRequest(status, {"error": {"message": message, "type": "rate_limit_exceeded", "code": status}})


@dataclass(frozen=True, slots=True)
class Route:
    """``pattern`` is a path with ``{name}`` captures; ``auth`` names where the key must be."""

    method: str
    pattern: str
    handler: Callable[[Any, Call], Reply]
    auth: str = "bearer"  # bearer | x-api-key | google | azure
    error: Callable[[int, str], BadRequest] = pulze_error
    faults: bool = True
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.escape(self.pattern).replace(r"\{", "{").replace(r"\}", "}")
        regex = re.sub(r"{(\w+)}", r"(?P<\1>[^/:]+)", regex)
        object.__setattr__(self, "regex", re.compile(regex + r"\Z"))


def openai_route_error(status: int, message: str) -> BadRequest:
    """OpenAI's (and Azure's, OpenRouter's) error bodies for the server's checks and faults."""
    if status == 401:
        return openai_error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")
    if status == 429:
        return openai_error(429, message, "requests", "rate_limit_exceeded")
    return openai_error(status, message, "invalid_request_error")


def openai_payload(body: bytes) -> dict[str, Any]:
    """The JSON object of a request to an OpenAI-shaped API, or its 400."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error") from None
    if not isinstance(payload, dict):
        raise openai_error(400, "The request body must be a JSON object.", "invalid_request_error")
    return payload


def text_of(value: Any) -> str:
    """The text in a prompt-like value: strings, lists of them, typed parts, messages, nested."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(t for t in (text_of(v) for v in value) if t)
    if isinstance(value, dict):
        for key in ("text", "content", "parts", "input"):
            if key in value:
                return text_of(value[key])
    return ""
