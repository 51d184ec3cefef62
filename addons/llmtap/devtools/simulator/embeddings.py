"""OpenAI embeddings: ``POST /v1/embeddings`` (and Azure OpenAI's deployment and ``/openai/v1`` paths).

Shape from OpenAI's API reference: ``{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``. ``encoding_format:
"base64"`` (what the ``openai`` SDK asks for by default) sends each vector as little-endian
float32 bytes in base64. Vectors are deterministic per input; ``dimensions`` shortens them.
"""

from __future__ import annotations

import base64
import random
import struct
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llmtap.devtools.simulator.common import (
    Call,
    JsonReply,
    Reply,
    Route,
    digest,
    dumps,
    openai_error,
    openai_payload,
    openai_route_error,
    token_count,
)

if TYPE_CHECKING:
    from llmtap.devtools.simulator.server import Simulator

#: Models served and their full dimension.
MODELS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


@lru_cache(maxsize=256)
def vector(text: str, size: int) -> tuple[float, ...]:
    rng = random.Random(digest(text))
    return tuple(round(rng.uniform(-1, 1), 6) for _ in range(size))


def create(sim: Simulator, call: Call) -> Reply:
    payload = openai_payload(call.body)
    model = payload.get("model") or call.params.get("deployment")
    if not isinstance(model, str):
        raise openai_error(400, "you must provide a model parameter", "invalid_request_error")
    size = MODELS.get(model, 1536 if "deployment" in call.params else None)
    if size is None:
        raise openai_error(404, f"The model `{model}` does not exist", "invalid_request_error", "model_not_found")
    raw = payload.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise openai_error(400, "'input' is a required property", "invalid_request_error")
    dimensions = payload.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or not 1 <= dimensions <= size:
            raise openai_error(400, f"Invalid 'dimensions': must be between 1 and {size}.", "invalid_request_error")
        size = dimensions
    as_base64 = payload.get("encoding_format") == "base64"
    data, tokens = [], 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(map(str, item)) if isinstance(item, list) else str(item)
        tokens += len(item) if isinstance(item, list) else token_count(text)
        values = vector(text, size)
        embedding: Any = base64.b64encode(struct.pack(f"<{size}f", *values)).decode() if as_base64 else list(values)
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    served = model if model in MODELS else "text-embedding-3-small"
    body = {"object": "list", "data": data, "model": served, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return JsonReply(200, dumps(body))


ROUTES = [Route("POST", "/v1/embeddings", create, "bearer", openai_route_error)]
AZURE_ROUTES = [
    Route("POST", "/openai/deployments/{deployment}/embeddings", create, "azure", openai_route_error),
    Route("POST", "/openai/v1/embeddings", create, "azure", openai_route_error),
]
