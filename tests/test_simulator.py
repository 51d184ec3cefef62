"""The simulated Pulze upstream, driven directly (no proxy): it is the ground truth other tests trust."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import brotli
import openai
import pytest
import zstandard

from llmtap.devtools.simulator import FAULTS, PRICES, REFERENCE_PRICE, TRUNCATE_AFTER, Simulator

KEY = "sk-sim-test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CHAT = {"model": "pulze", "messages": [{"role": "user", "content": "Say something about proxies"}]}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(chunk_delay=0) as s:
        yield s


@pytest.fixture
def client(sim: Simulator) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    yield c
    c.close()


def post(
    sim: Simulator,
    path: str,
    body: dict | bytes,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection; returns the response and its raw (still encoded) body."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {**AUTH, **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp, raw


def exchange_for(sim: Simulator, request_id: str):
    (ex,) = [e for e in sim.exchanges if e.request_id == request_id]
    return ex


def expected_costs(ns: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, float]:
    price = PRICES[ns]
    return prompt_tokens * price.prompt / 1e6, completion_tokens * price.completion / 1e6


def pulze_metadata(obj: object) -> dict:
    """Newer SDKs declare a ``metadata`` field on chat objects; older ones keep it as an extra."""
    return getattr(obj, "metadata", None) or obj.model_extra["metadata"]


def sse_events(decoded: bytes) -> list[dict]:
    lines = decoded.replace(b"\r\n", b"\n").split(b"\n")
    return [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]


class RawStream:
    """A hand-rolled HTTP/1.1 client that yields each chunk as it arrives, with its arrival time."""

    def __init__(self, sim: Simulator, body: dict, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
        data = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in {**AUTH, **(headers or {})}.items())
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        self.file = self.sock.makefile("rb")
        self.status_line = self.file.readline()
        self.headers: dict[str, str] = {}
        while (line := self.file.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            self.headers[name.lower()] = value.strip()

    def chunks(self) -> Iterator[tuple[float, bytes]]:
        """Yield ``(arrival, payload)``; raises EOFError when the body ends without its last chunk."""
        while True:
            size_line = self.file.readline()
            if not size_line:
                raise EOFError("connection closed before the terminating chunk")
            size = int(size_line, 16)
            payload = self.file.read(size + 2)[:-2]
            if size == 0:
                return
            yield time.monotonic(), payload

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# --------------------------------------------------------------------------- the OpenAI SDK


def test_chat_completion_has_pulze_shape_and_exact_costs(sim: Simulator, client: openai.OpenAI) -> None:
    before = time.time()
    labels = '{"team":"Search","share":"50%"}'
    raw = client.chat.completions.with_raw_response.create(**CHAT, extra_headers={"Pulze-Labels": labels})
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model in PRICES  # `pulze` was routed to a provider model
    assert before - 1 <= resp.created / 1000 <= time.time() + 1  # milliseconds
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    usage = resp.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == len(["Say", "something", "about", "proxies"]) + 4 + 3
    assert usage.completion_tokens == len(resp.choices[0].message.content.split())

    meta = pulze_metadata(resp)
    prompt_cost, completion_cost = expected_costs(resp.model, usage.prompt_tokens, usage.completion_tokens)
    costs = meta["costs"]
    assert costs["prompt_tokens"] == pytest.approx(prompt_cost, abs=1e-10)
    assert costs["completion_tokens"] == pytest.approx(completion_cost, abs=1e-10)
    assert costs["total_tokens"] == costs["prompt_tokens"] + costs["completion_tokens"]
    savings = meta["cost_savings"]
    assert savings["prompt_tokens"] == pytest.approx(
        usage.prompt_tokens * REFERENCE_PRICE.prompt / 1e6 - prompt_cost, abs=1e-10
    )
    assert savings["total_tokens"] == savings["prompt_tokens"] + savings["completion_tokens"]
    assert meta["app_id"] == "app-" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert meta["model"]["namespace"] == resp.model and meta["model"]["provider"] == resp.model.split("/")[0]
    assert meta["labels"] == {"team": "search", "share": "50%"}
    assert meta["status_code"] == 200 and meta["retries"] == 0 and meta["error"] is None
    assert isinstance(meta["latency"], float) and isinstance(meta["score"], float)
    assert meta["scores"]["best_models"] == [{resp.model: meta["score"]}]
    assert len(meta["scores"]["candidates"]) == len(PRICES)

    ex = exchange_for(sim, raw.headers["x-request-id"])
    assert ex.completed and ex.status == 200 and ex.fault is None and not ex.stream
    assert ex.response_json == json.loads(ex.response_body) == json.loads(raw.content)
    assert ex.request_headers["authorization"] == f"Bearer {KEY}"


def test_text_completion_honours_n_and_max_tokens(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="openai/gpt-4o-mini", prompt="one two three", n=3, max_tokens=4)
    assert resp.object == "text_completion" and resp.model == "openai/gpt-4o-mini"
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and len(c.text.split()) == 4 for c in resp.choices)
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 12
    assert len({c.text for c in resp.choices}) > 1  # different answers per choice
    full = client.completions.create(model="openai/gpt-4o-mini", prompt="one two three")
    assert full.choices[0].finish_reason == "stop"


def test_routing_is_deterministic_and_named_models_are_served(client: openai.OpenAI) -> None:
    served = set()
    for i in range(25):
        prompt = f"prompt number {i}"
        first = client.completions.create(model="pulze", prompt=prompt, max_tokens=1)
        again = client.completions.create(model="pulze-v0.1", prompt=prompt, max_tokens=1)
        assert first.model == again.model and first.choices[0].text == again.choices[0].text
        served.add(first.model)
    assert len(served) >= 3 and served <= set(PRICES)
    assert client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"]).model == "openai/gpt-4o"
    assert client.completions.create(model="anthropic/claude-3-haiku", prompt="x").model == "anthropic/claude-3-haiku"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope/unknown-model", prompt="x")


def test_streamed_chat_matches_non_streamed(sim: Simulator, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(**CHAT)
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.model == whole.model for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert pulze_metadata(last)["costs"] == pulze_metadata(whole)["costs"]
    ex = sim.exchanges[-1]
    assert ex.stream and ex.completed and ex.response_json is None
    assert [e["choices"] for e in ex.stream_events] == [c.model_dump(exclude_unset=True)["choices"] for c in chunks]
    assert ex.decoded_body == ex.response_body and ex.decoded_body.endswith(b"data: [DONE]\n\n")
    assert sse_events(ex.decoded_body) == ex.stream_events


def test_streamed_text_completion(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="pulze", prompt="tell me", stream=True, n=2, max_tokens=5))
    assert all(c.object == "text_completion" for c in chunks)
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert all(len(t.split()) == 5 for t in texts.values())
    final = chunks[-1]
    assert [c.finish_reason for c in final.choices] == ["length", "length"]
    assert final.usage.completion_tokens == 10
    assert pulze_metadata(final)["costs"]["total_tokens"] > 0


def test_models_list_and_rank(sim: Simulator, client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == set(PRICES)
    resp, raw = post(sim, "/v1/models/rank", {"prompt": "which model?"})
    body = json.loads(raw)
    assert resp.status == 200 and body["best_model"] in PRICES and len(body["candidates"]) == len(PRICES)


def test_identical_requests_get_fresh_ids_and_same_answer(sim: Simulator) -> None:
    headers = {"Pulze-Weights": '{"cost":0.7,"quality":0.3}', "Pulze-Policies": '{"max_cost":0.01}'}
    (r1, b1), (r2, b2) = (post(sim, "/v1/completions", {"prompt": "same"}, headers) for _ in range(2))
    j1, j2 = json.loads(b1), json.loads(b2)
    assert r1.getheader("x-request-id") != r2.getheader("x-request-id") and j1["id"] != j2["id"]
    assert j1["choices"] == j2["choices"] and j1["usage"] == j2["usage"]
    assert j1["metadata"]["labels"] == {"weights_cost": "0.7", "weights_quality": "0.3", "policies_max_cost": "0.01"}
    assert [e.response_json for e in sim.exchanges] == [j1, j2]


# --------------------------------------------------------------------------- errors


def test_auth_validation_and_not_found(sim: Simulator) -> None:
    resp, raw = post(sim, "/v1/completions", {"prompt": "x"}, {"Authorization": ""})
    assert resp.status == 401 and "detail" in json.loads(raw)
    resp, raw = post(sim, "/v1/completions", {"model": "pulze"})
    assert resp.status == 422
    assert json.loads(raw) == {
        "detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
    }
    resp, raw = post(sim, "/v1/chat/completions", b"{not json")
    assert resp.status == 422 and json.loads(raw)["detail"][0]["type"] == "value_error.jsondecode"
    resp, raw = post(sim, "/v1/nothing-here", {"prompt": "x"})
    assert resp.status == 404 and json.loads(raw) == {"detail": "Not Found"}
    resp, raw = post(sim, "/v1/completions", {"prompt": "x"}, {"X-Sim-Fault": "no-such-fault"})
    assert resp.status == 400
    assert [e.status for e in sim.exchanges] == [401, 422, 422, 404, 400]


def test_client_leaving_mid_stream_is_recorded_and_harmless() -> None:
    with Simulator(chunk_delay=0.02) as s:
        stream = RawStream(s, {**CHAT, "stream": True})
        next(stream.chunks())
        stream.close()
        deadline = time.monotonic() + 5
        while s.exchanges[0].finished_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ex = s.exchanges[0]
        assert ex.finished_at is not None and not ex.completed and ex.response_body
        resp, _ = post(s, "/v1/completions", {"prompt": "still alive"})
        assert resp.status == 200


# --------------------------------------------------------------------------- streaming details


def test_stream_is_incremental() -> None:
    with Simulator(chunk_delay=0.05) as slow:
        stream = RawStream(slow, {"prompt": "hi", "stream": True, "max_tokens": 8})
        chunks = stream.chunks()
        first_arrival, _ = next(chunks)
        finished_when_first_arrived = slow.exchanges[-1].completed
        arrivals = [first_arrival, *(t for t, _ in chunks)]
        stream.close()
    assert len(arrivals) >= 9  # 8 words + final chunk (+ [DONE])
    assert finished_when_first_arrived is False  # the first event does not wait for the rest
    assert arrivals[-1] - arrivals[0] >= 7 * 0.05 * 0.9


def test_stream_without_usage_and_with_crlf(sim: Simulator) -> None:
    resp, raw = post(
        sim, "/v1/chat/completions", {**CHAT, "stream": True}, {"X-Sim-Stream-Usage": "none", "X-Sim-SSE": "crlf"}
    )
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in events[-1] and "metadata" not in events[-1]
    assert b"data: [DONE]\r\n\r\n" in raw and b": keep-alive\r\n\r\n" in raw and b"}\n\n" not in raw


DECODERS = {
    "gzip": lambda: zlib.decompressobj(wbits=31).decompress,
    "deflate": lambda: zlib.decompressobj().decompress,
    "br": lambda: brotli.Decompressor().process,
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj().decompress,
}


@pytest.mark.parametrize("coding", list(DECODERS))
def test_content_encoding_non_stream(sim: Simulator, coding: str) -> None:
    resp, raw = post(sim, "/v1/completions", {"prompt": "encode me"}, {"X-Sim-Encoding": coding})
    assert resp.getheader("content-encoding") == coding
    assert int(resp.getheader("content-length")) == len(raw)
    decoded = DECODERS[coding]()(raw)
    assert json.loads(decoded)["object"] == "text_completion"
    ex = exchange_for(sim, resp.getheader("x-request-id"))
    assert ex.response_body == raw and ex.decoded_body == decoded


@pytest.mark.parametrize("coding", list(DECODERS))
def test_content_encoding_stream_flushes_every_event(sim: Simulator, coding: str) -> None:
    stream = RawStream(sim, {**CHAT, "stream": True}, {"X-Sim-Encoding": coding})
    assert stream.headers["content-encoding"] == coding
    decode = DECODERS[coding]()
    pieces = [decode(payload) for _, payload in stream.chunks()]
    stream.close()
    events = [p for p in pieces if p]
    assert all(p.endswith(b"\n\n") for p in events)  # each chunk decodes to whole events on its own
    assert events[-1] == b"data: [DONE]\n\n"
    ex = sim.exchanges[-1]
    assert ex.decoded_body == b"".join(pieces) and DECODERS[coding]()(ex.response_body) == ex.decoded_body


# --------------------------------------------------------------------------- faults


def test_fault_429(sim: Simulator) -> None:
    resp, raw = post(sim, "/v1/chat/completions", CHAT, {"X-Sim-Fault": "429"})
    assert resp.status == 429 and resp.getheader("retry-after") == "1" and "error" in json.loads(raw)
    assert sim.exchanges[-1].fault == "429"


def test_fault_500_is_html(sim: Simulator) -> None:
    resp, raw = post(sim, "/v1/chat/completions", CHAT, {"X-Sim-Fault": "500"})
    assert resp.status == 500 and resp.getheader("content-type").startswith("text/html")
    assert b"Internal Server Error" in raw and sim.exchanges[-1].response_json is None


def test_fault_422(sim: Simulator) -> None:
    resp, raw = post(sim, "/v1/completions", {"prompt": "x"}, {"X-Sim-Fault": "422"})
    assert resp.status == 422 and "loc" in json.loads(raw)["detail"][0]


def test_fault_truncate_stream(sim: Simulator) -> None:
    stream = RawStream(sim, {**CHAT, "stream": True}, {"X-Sim-Fault": "truncate"})
    got = []
    with pytest.raises(EOFError):
        for _, payload in stream.chunks():
            got.append(payload)
    stream.close()
    assert len(got) == TRUNCATE_AFTER
    ex = sim.exchanges[-1]
    assert ex.fault == "truncate" and not ex.completed and len(ex.stream_events) == TRUNCATE_AFTER


def test_fault_truncate_non_stream(sim: Simulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x"}), {**AUTH, "X-Sim-Fault": "truncate"})
    resp = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    ex = sim.exchanges[-1]
    assert not ex.completed and len(ex.response_body) < int(dict(ex.response_headers)["content-length"])


def test_fault_slow_first_byte(sim: Simulator) -> None:
    start = time.monotonic()
    resp, _ = post(sim, "/v1/completions", {"prompt": "x"}, {"X-Sim-Fault": "slow-first-byte"})
    assert resp.status == 200 and time.monotonic() - start >= 0.5


def test_fault_retry(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="pulze", prompt="x", extra_headers={"X-Sim-Fault": "retry"})
    meta = pulze_metadata(resp)
    assert meta["retries"] == 1 and meta["warning"]


def test_fault_disconnect(sim: Simulator) -> None:
    with pytest.raises(http.client.RemoteDisconnected):
        post(sim, "/v1/completions", {"prompt": "x"}, {"X-Sim-Fault": "disconnect"})
    ex = sim.exchanges[-1]
    assert ex.fault == "disconnect" and ex.status == 0 and not ex.completed


def test_random_faults_are_seeded() -> None:
    def run() -> list[str | None]:
        with Simulator(chunk_delay=0, first_byte_delay=0.001, seed=7, fault_rate=0.5) as s:
            for _ in range(20):
                try:
                    post(s, "/v1/completions", {"prompt": "x"})
                except (http.client.HTTPException, ConnectionError):
                    pass
            return [e.fault for e in s.exchanges]

    faults = run()
    assert faults == run()
    assert {f for f in faults if f} <= set(FAULTS) and None in faults and len(set(faults)) > 2


# --------------------------------------------------------------------------- HTTP plumbing


def test_keep_alive_100_requests_on_one_connection(sim: Simulator) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    conn.connect()
    sock = conn.sock
    for i in range(100):
        conn.request("POST", "/v1/completions", json.dumps({"prompt": f"n{i}", "max_tokens": 2}), AUTH)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 2
    assert conn.sock is sock
    conn.close()
    assert len(sim.exchanges) == 100 and len({e.request_id for e in sim.exchanges}) == 100


def test_chunked_request_body_and_expect_continue(sim: Simulator) -> None:
    body = json.dumps({"prompt": "chunked body here"}).encode()
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as sock:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"5\r\n" + body[:5] + b"\r\n" + b"%x\r\n" % len(body[5:]) + body[5:] + b"\r\n0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert sim.exchanges[-1].request_body == body and sim.exchanges[-1].response_json["usage"]["prompt_tokens"] == 3


def test_concurrent_connections(sim: Simulator) -> None:
    def worker(i: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
        for j in range(10):
            conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": j % 2 == 0}), AUTH)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()
        return i

    with ThreadPoolExecutor(20) as pool:
        assert sorted(pool.map(worker, range(40))) == list(range(40))
    assert len(sim.exchanges) == 400 and all(e.completed for e in sim.exchanges)


def test_record_exchanges_off_and_clear(sim: Simulator) -> None:
    post(sim, "/v1/completions", {"prompt": "x"})
    sim.clear()
    assert sim.exchanges == []
    sim.record_exchanges = False
    post(sim, "/v1/completions", {"prompt": "x"})
    assert sim.exchanges == []


def test_serve_runs_in_foreground_until_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from llmtap.devtools.simulator import run_simulator; run_simulator('127.0.0.1', {port}, 0.0, 0.0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models", headers=AUTH)
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the other families' wire formats (their SDKs drive them in test_sdk_families.py) ------------


def test_openai_flavoured_chat_streams_carry_usage_only_when_asked(sim: Simulator) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"api-key": KEY}
    _, plain = post(sim, "/openai/v1/chat/completions", body, headers)
    _, asked = post(sim, "/openai/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}, headers)
    assert not any("usage" in e for e in sse_events(plain))
    *_, last = sse_events(asked)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert b"metadata" not in asked  # no Pulze metadata outside Pulze's routes
    resp, _ = post(sim, "/openai/deployments/d/chat/completions", body, headers)  # no api-version
    assert resp.status == 404


def test_responses_background_polls_and_typed_stream(sim: Simulator) -> None:
    _, raw = post(sim, "/v1/responses", {"model": "gpt-4o-mini", "input": "later", "background": True})
    queued = json.loads(raw)
    assert (queued["status"], queued["usage"]) == ("queued", None)
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    statuses = []
    for _ in range(3):
        conn.request("GET", f"/v1/responses/{queued['id']}", headers=AUTH)
        polled = json.loads(conn.getresponse().read())
        statuses.append((polled["status"], polled["usage"] is not None))
    conn.close()
    assert statuses == [("in_progress", False), ("completed", True), ("completed", True)]
    _, raw = post(sim, "/v1/responses", {"model": "gpt-4o-mini", "input": "now", "stream": True})
    kinds = [line[7:] for line in raw.split(b"\n") if line.startswith(b"event: ")]
    assert kinds[0] == b"response.created" and kinds[-1] == b"response.completed" and b"[DONE]" not in raw


def test_anthropic_cache_is_written_then_read_and_needs_its_version_header(sim: Simulator) -> None:
    system = [{"type": "text", "text": "cached " * 50, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 30,
        "system": system,
        "messages": [{"role": "user", "content": "q"}],
    }
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    first = json.loads(post(sim, "/v1/messages", body, headers)[1])["usage"]
    second = json.loads(post(sim, "/v1/messages", body, headers)[1])["usage"]
    assert first["cache_creation"]["ephemeral_1h_input_tokens"] == first["cache_creation_input_tokens"] > 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0 and second["input_tokens"] == first["input_tokens"]
    resp, raw = post(sim, "/v1/messages", body, {"x-api-key": KEY})
    assert resp.status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_gemini_streams_as_sse_or_as_one_json_array(sim: Simulator) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    _, array = post(sim, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?key=k", body, {})
    chunks = json.loads(array)  # the whole body is one JSON array
    assert len(chunks) > 1 and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    usage = chunks[-1]["usageMetadata"]
    assert (
        usage["totalTokenCount"]
        == usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
    )
    _, sse = post(sim, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body, {"x-goog-api-key": "k"})
    same = [{k: v for k, v in c.items() if k != "responseId"} for c in chunks]
    assert [{k: v for k, v in c.items() if k != "responseId"} for c in sse_events(sse)] == same
    assert b"\r\n\r\n" in sse
    resp, _ = post(sim, "/v1beta/models/gemini-2.5-flash:generateContent", body, {"Authorization": ""})
    assert resp.status == 401


def test_embeddings_base64_and_dimensions(sim: Simulator) -> None:
    import base64
    import struct

    body = {"model": "text-embedding-3-small", "input": ["a b", "c"], "dimensions": 5, "encoding_format": "base64"}
    reply = json.loads(post(sim, "/v1/embeddings", body)[1])
    vectors = [struct.unpack("<5f", base64.b64decode(d["embedding"])) for d in reply["data"]]
    assert len(vectors) == 2 and reply["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    floats = json.loads(post(sim, "/v1/embeddings", {**body, "encoding_format": "float"})[1])
    assert [pytest.approx(v, abs=1e-6) for v in vectors[0]] == floats["data"][0]["embedding"]
