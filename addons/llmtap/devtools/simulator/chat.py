"""Chat Completions and Completions: Pulze.ai's flavour, OpenAI's (Azure OpenAI's too) and OpenRouter's.

Flavours differ where the real services do: Pulze adds ``metadata`` (costs, routing, labels)
and, in streams, sends usage and metadata in the last chunk unless ``X-Sim-Stream-Usage: none``;
OpenAI sends stream usage only when asked with ``stream_options.include_usage``, in a last chunk
with no choices; OpenRouter names models ``provider/model`` and adds ``usage.cost`` (USD),
``usage.is_byok`` and ``usage.cost_details.upstream_inference_cost`` (BYOK: ``X-Sim-BYOK: 1``),
and always sends stream usage. ``X-Sim-Metadata: none`` makes a Pulze route answer as a plain
OpenAI-compatible upstream: no ``metadata`` (so no reported cost), stream usage only when asked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtap.devtools.simulator.common import (
    ALIASES,
    CATEGORIES,
    MODEL_INFO,
    NAMESPACES,
    ROUTER_MODELS,
    BadRequest,
    Call,
    JsonReply,
    Reply,
    Route,
    StreamReply,
    app_id_for,
    costs_for,
    digest,
    dumps,
    invalid,
    openai_error,
    openai_route_error,
    parse_json,
    words,
)

if TYPE_CHECKING:
    from llmtap.devtools.simulator.server import Simulator

#: OpenRouter's fee on BYOK requests, as a share of the provider's charge.
BYOK_FEE = 0.05

_MODELS_LIST = dumps(
    {
        "object": "list",
        "data": [
            {"id": ns, "object": "model", "created": 1717200000, "owned_by": info["owner"]}
            for ns, info in MODEL_INFO.items()
        ],
    }
)


@dataclass(slots=True)
class Completion:
    """A validated completion request and the deterministic answer to it."""

    chat: bool
    namespace: str
    prompt_tokens: int
    answers: list[tuple[str, ...]]
    finish: list[str]
    score: float
    candidates: list[dict[str, float]]
    category: str
    temperature: float
    max_tokens: int | None
    labels: dict[str, str]
    app_id: str
    stream: bool
    stream_usage: bool  # False when X-Sim-Stream-Usage: none
    flavor: str  # "pulze" | "openai" | "openrouter"
    byok: bool = False
    plain: bool = False  # a Pulze route with X-Sim-Metadata: none: no metadata


def prompt_of(payload: dict[str, Any], chat: bool) -> tuple[str, int]:
    """Prompt text (for hashing) and its token count: words plus OpenAI-like per-message overhead."""
    key = "messages" if chat else "prompt"
    value = payload.get(key)
    if value is None:
        raise invalid(["body", key], "field required", "value_error.missing")
    if not value:
        raise invalid(["body", key], "ensure this value has at least 1 items", "value_error.any_str.min_length")
    if not chat:
        parts = [value] if isinstance(value, str) else value
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise invalid(["body", "prompt"], "str type expected", "type_error.str")
        text = "\n".join(parts)
        return text, max(1, len(text.split()))
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise invalid(["body", "messages"], "value is not a valid list", "type_error.list")
    texts = []
    for message in value:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        texts.append(content if isinstance(content, str) else "")
    return "\n".join(texts), sum(len(t.split()) + 4 for t in texts) + 3


def _labels(headers: dict[str, str]) -> dict[str, str]:
    """Echo ``Pulze-Labels`` (values lower-cased) plus ``weights_*``/``policies_*`` like Pulze."""
    labels: dict[str, str] = {}
    for header, prefix in (("pulze-labels", ""), ("pulze-weights", "weights_"), ("pulze-policies", "policies_")):
        raw = headers.get(header)
        if not raw:
            continue
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise invalid(["header", header], "value is not a valid dict", "type_error.dict")
        for k, v in parsed.items():
            labels[prefix + str(k)] = str(v).lower() if not prefix else json.dumps(v).strip('"')
    return labels


def route(digest_: bytes, named: str | None) -> tuple[str, float, list[dict[str, float]], str]:
    """Score every model from the prompt hash; the router serves the best one, a named model itself."""
    scores = {ns: round(0.5 + digest_[i] / 510, 4) for i, ns in enumerate(NAMESPACES)}
    ns = named or max(NAMESPACES, key=scores.__getitem__)
    ranked = [ns] if named else sorted(NAMESPACES, key=scores.__getitem__, reverse=True)
    return ns, scores[ns], [{c: scores[c]} for c in ranked], CATEGORIES[digest_[-1] % len(CATEGORIES)]


def models(sim: Simulator, call: Call) -> Reply:
    return JsonReply(200, _MODELS_LIST)


def rank(sim: Simulator, call: Call) -> Reply:
    payload = parse_json(call.body)
    chat = "messages" in payload and "prompt" not in payload
    text, _ = prompt_of(payload, chat)
    ns, score, candidates, category = route(digest(text), None)
    return JsonReply(200, dumps({"best_model": ns, "score": score, "candidates": candidates, "category": category}))


def pulze(sim: Simulator, call: Call) -> Reply:
    return complete(sim, call, "pulze")


def openai(sim: Simulator, call: Call) -> Reply:
    return complete(sim, call, "openai")


def openrouter(sim: Simulator, call: Call) -> Reply:
    return complete(sim, call, "openrouter")


def complete(sim: Simulator, call: Call, flavor: str) -> Reply:
    chat = call.path.endswith("/chat/completions")
    headers = call.headers
    # Answers are deterministic, so an identical request reuses its serialised body and only
    # the id, timestamp and latency change: that keeps benchmarks measuring the proxy, not us.
    key = (
        call.path,
        call.body,
        headers.get("authorization"),
        headers.get("pulze-labels"),
        headers.get("pulze-weights"),
        headers.get("pulze-policies"),
        headers.get("x-sim-byok"),
        call.fault == "retry",
        headers.get("x-sim-metadata"),
    )
    template = sim.templates.get(key)
    req = None
    if template is None:
        req = prepare(sim, call, parse_json(call.body), chat, flavor)
    created_ms = int(time.time() * 1000)
    created = created_ms if flavor == "pulze" else created_ms // 1000
    cid = ("chatcmpl-" if chat else "cmpl-") + call.request_id[4:]
    if req is not None and req.stream:
        return StreamReply(events(req, cid, created, call.t0, call.fault))
    if template is None:
        template = sim.remember(
            key,
            template_of(
                {
                    "id": ID_SLOT,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": CREATED_SLOT,
                    "model": _model_name(req),
                    "choices": [choice(chat, i, " ".join(w), req.finish[i]) for i, w in enumerate(req.answers)],
                    **usage_and_metadata(req, LATENCY_SLOT, call.fault),
                }
            ),
        )
    t0 = call.t0
    if flavor != "pulze" or headers.get("x-sim-metadata", "").lower() == "none":  # no metadata.latency slot
        return JsonReply(200, lambda: template % (cid.encode(), b"%d" % created))
    return JsonReply(
        200, lambda: template % (cid.encode(), b"%d" % created, repr(round(time.monotonic() - t0, 6)).encode())
    )


def prepare(sim: Simulator, call: Call, payload: dict[str, Any], chat: bool, flavor: str) -> Completion:
    headers = call.headers
    text, prompt_tokens = prompt_of(payload, chat)
    requested = payload.get("model") or call.params.get("deployment") or ("pulze" if flavor == "pulze" else None)
    if not isinstance(requested, str):
        if flavor != "pulze":
            raise openai_error(400, "you must provide a model parameter", "invalid_request_error")
        raise invalid(["body", "model"], "str type expected", "type_error.str")
    if flavor == "pulze":
        named = None if requested.lower() in ROUTER_MODELS else ALIASES.get(requested.lower())
        if named is None and requested.lower() not in ROUTER_MODELS:
            raise BadRequest(404, {"detail": f"The model '{requested}' is not available for this app"})
    else:
        # Azure deployments have names of their users' choosing: an unknown one serves gpt-4o-mini
        named = ALIASES.get(requested.lower()) or ("openai/gpt-4o-mini" if "deployment" in call.params else None)
        if named is None:
            raise openai_error(
                404, f"The model `{requested}` does not exist", "invalid_request_error", "model_not_found"
            )
    n, max_tokens, temperature = payload.get("n"), payload.get("max_tokens"), payload.get("temperature", 1.0)
    if max_tokens is None and chat and flavor != "pulze":
        max_tokens = payload.get("max_completion_tokens")
    n = 1 if n is None else n
    if not isinstance(n, int) or not 1 <= n <= 16:
        raise invalid(["body", "n"], "ensure this value is between 1 and 16", "value_error.number")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise invalid(["body", "max_tokens"], "ensure this value is greater than 0", "value_error.number")
    if temperature is not None and not isinstance(temperature, (int, float)):
        raise invalid(["body", "temperature"], "value is not a valid float", "type_error.float")
    digest_ = digest(text)
    ns, score, candidates, category = route(digest_, named)
    base = int.from_bytes(digest_[:8], "big") + sim.seed * 1_000_003 + NAMESPACES.index(ns) * 104_729
    answers, finish = [], []
    for i in range(n):
        found = words(base + i * 7919)
        cut = max_tokens is not None and max_tokens < len(found)
        answers.append(found[:max_tokens] if cut else found)
        finish.append("length" if cut else "stop")
    auth = headers.get("authorization", "")[7:].strip()
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    plain = flavor == "pulze" and headers.get("x-sim-metadata", "").lower() == "none"
    if flavor == "pulze":
        stream_usage = headers.get("x-sim-stream-usage", "").lower() != "none" and (not plain or include_usage)
    elif flavor == "openrouter":
        stream_usage = True
    else:
        stream_usage = include_usage
    return Completion(
        chat,
        ns,
        prompt_tokens,
        answers,
        finish,
        score,
        candidates,
        category,
        temperature,
        max_tokens,
        _labels(headers) if flavor == "pulze" else {},
        app_id_for(auth),
        payload.get("stream") is True,
        stream_usage,
        flavor,
        headers.get("x-sim-byok", "") == "1",
        plain,
    )


ID_SLOT, CREATED_SLOT, LATENCY_SLOT = "\u2063id\u2063", -7_777_777_777_771, -7_777_777.125


def template_of(body: dict[str, Any]) -> bytes:
    """Serialise a response once, with ``%s`` where the id, creation time and latency go."""
    raw = dumps(body).replace(b"%", b"%%")
    for slot in (dumps(ID_SLOT), dumps(CREATED_SLOT), dumps(LATENCY_SLOT)):
        raw = raw.replace(slot, b'"%s"' if slot.startswith(b'"') else b"%s", 1)
    return raw


def _model_name(req: Completion) -> str:
    """Pulze and OpenRouter name the served model ``provider/model``; OpenAI and Azure the model alone."""
    return req.namespace if req.flavor != "openai" else MODEL_INFO[req.namespace]["model"]


def usage_and_metadata(req: Completion, latency: float, fault: str | None) -> dict[str, Any]:
    """``usage`` (and Pulze's ``metadata``), shared by plain responses and the last stream chunk."""
    completion_tokens = sum(len(a) for a in req.answers)
    usage: dict[str, Any] = {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": req.prompt_tokens + completion_tokens,
    }
    if req.flavor != "pulze":
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
    if req.flavor == "openrouter":
        charge = round(costs_for(req.namespace, req.prompt_tokens, completion_tokens)[0]["total_tokens"], 10)
        usage["is_byok"] = req.byok
        if req.byok:
            usage["cost"] = round(charge * BYOK_FEE, 10)  # OpenRouter's fee only
            usage["cost_details"] = {"upstream_inference_cost": charge}
        else:
            usage["cost"] = charge
            usage["cost_details"] = {"upstream_inference_cost": None}
    if req.flavor != "pulze" or req.plain:
        return {"usage": usage}
    costs, savings = costs_for(req.namespace, req.prompt_tokens, completion_tokens)
    return {
        "usage": usage,
        "metadata": {
            "app_id": req.app_id,
            "model": dict(MODEL_INFO[req.namespace]),
            "costs": costs,
            "cost_savings": savings,
            "latency": latency,
            "labels": req.labels,
            "score": req.score,
            "scores": {"best_models": [{req.namespace: req.score}], "candidates": req.candidates},
            "status_code": 200,
            "retries": 1 if fault == "retry" else 0,
            "warning": "Provider failed once; the request was retried (simulated)" if fault == "retry" else None,
            "error": None,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "category": req.category,
            "extra": {},
        },
    }


def choice(chat: bool, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def events(
    req: Completion, cid: str, created: int, t0: float, fault: str | None
) -> Iterator[tuple[bool, dict[str, Any]]]:
    """Stream chunks ``(is_final, event)``: role deltas, one word per chunk, then usage (+ metadata).

    A generator, so the final metadata's latency is measured when the last chunk is due.
    """
    base = {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": _model_name(req),
    }
    if req.chat:
        for i in range(len(req.answers)):
            yield (
                False,
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ],
                },
            )
    for j in range(max(len(a) for a in req.answers)):
        for i, found in enumerate(req.answers):
            if j < len(found):
                piece = found[j] if j == 0 else " " + found[j]
                part = {"index": i, "delta": {"content": piece}} if req.chat else {"index": i, "text": piece}
                yield False, {**base, "choices": [{**part, "finish_reason": None, "logprobs": None}]}
    last = {
        **base,
        "choices": [
            ({"index": i, "delta": {}} if req.chat else {"index": i, "text": ""})
            | {"finish_reason": f, "logprobs": None}
            for i, f in enumerate(req.finish)
        ],
    }
    if req.flavor == "openai":  # OpenAI: usage in one more chunk, with no choices, only when asked
        if not req.stream_usage:
            yield True, last
            return
        yield False, last
        yield True, {**base, "choices": [], **usage_and_metadata(req, 0.0, fault)}
        return
    if req.stream_usage:
        last.update(usage_and_metadata(req, round(time.monotonic() - t0, 6), fault))
    yield True, last


ROUTES = [
    ("POST", "/v1/chat/completions", pulze),
    ("POST", "/v1/completions", pulze),
    ("GET", "/v1/models", models),
    ("POST", "/v1/models/rank", rank),
]


def azure(sim: Simulator, call: Call) -> Reply:
    """Azure OpenAI: the deployment paths need ``api-version``; the model is the deployment's."""
    if "deployment" in call.params and not call.query.get("api-version"):
        raise openai_error(404, "Resource not found", "invalid_request_error", "404")
    return complete(sim, call, "openai")


#: Azure OpenAI (deployment and ``/openai/v1`` paths) and OpenRouter (``/api/v1``).
OTHER_ROUTES = [
    *(
        Route("POST", prefix + tail, azure, "azure", openai_route_error)
        for prefix in ("/openai/deployments/{deployment}", "/openai/v1")
        for tail in ("/chat/completions", "/completions")
    ),
    Route("POST", "/api/v1/chat/completions", openrouter, "bearer", openai_route_error),
    Route("POST", "/api/v1/completions", openrouter, "bearer", openai_route_error),
]
