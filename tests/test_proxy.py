"""End to end: a real mitmproxy with llmtap in front of the simulated Pulze upstream.

Clients are the official ``openai`` SDK and curl. Each test checks two things: the client got
exactly what the upstream sent, and the record says exactly what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import API_KEY, REPO, free_port, start_tap, wait_for_port, wait_until

from llmtap.devtools.simulator import Simulator
from llmtap.record import ExchangeRecord

LABELS = {"team": "Search", "env": "prod"}
HEADERS = {
    "Pulze-Labels": json.dumps(LABELS),
    "Pulze-Weights": json.dumps({"cost": 0.7, "quality": 0.3}),
    "Pulze-Policies": json.dumps({"max_cost": 0.01, "privacy_level": 2}),
}


def sim_response(ex) -> dict:
    """The simulator's final answer: the JSON body, or the stream's id/model/usage/metadata."""
    if ex.response_json is not None:
        return ex.response_json
    merged: dict = {}
    for event in ex.stream_events:
        merged.update({k: v for k, v in event.items() if v is not None and k != "choices"})
    return merged


def assert_record_matches(record: ExchangeRecord, ex, *, operation: str, stream: bool) -> None:
    """Every field the simulator sent is in the record, converted as documented."""
    sent = sim_response(ex)
    meta, usage = sent["metadata"], sent["usage"]
    request = json.loads(ex.request_body)
    assert record.operation == operation and record.stream is stream
    assert record.http_status == 200 and record.error_type is None
    assert record.path == ex.path and record.method == "POST"
    assert record.response_id == sent["id"]
    assert record.response_object == sent["object"]  # streams keep "chat.completion.chunk"
    assert record.created_at == pytest.approx(sent["created"] / 1000)
    assert record.response_model == sent["model"]
    assert record.request_model == request["model"] and record.max_tokens == request.get("max_tokens")
    assert record.temperature == request.get("temperature")
    assert (record.input_tokens, record.output_tokens, record.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    assert record.cost_source == "reported"
    assert record.cost_usd == meta["costs"]["total_tokens"]
    assert record.cost_prompt_usd == meta["costs"]["prompt_tokens"]
    assert record.cost_savings_usd == meta["cost_savings"]["total_tokens"]
    assert record.upstream_latency_s == meta["latency"]
    assert record.served_namespace == meta["model"]["namespace"] == sent["model"]
    assert record.served_provider == meta["model"]["provider"] == record.provider
    assert record.app_id == meta["app_id"]
    assert record.retries == meta["retries"] and record.score == meta["score"]
    assert record.candidate_count == len(meta["scores"]["candidates"])
    assert dict(record.response_labels) == meta["labels"]
    assert dict(record.metadata) == meta
    assert record.router == "pulze"
    assert dict(record.labels) == LABELS
    assert dict(record.weights) == {"cost": 0.7, "quality": 0.3}
    assert dict(record.policies) == {"max_cost": 0.01, "privacy_level": 2}
    assert record.key_fingerprint and API_KEY not in record.to_json()
    assert record.input_messages is None and record.output_messages is None
    assert record.upstream_host == "127.0.0.1"
    assert record.request_start <= record.response_start <= record.response_end
    assert record.duration_s > 0
    if stream:
        assert (
            record.first_token_at is not None and record.response_start <= record.first_token_at <= record.response_end
        )
        content_events = [
            e
            for e in ex.stream_events
            if any((c.get("delta") or {}).get("content") or c.get("text") for c in e.get("choices", []))
        ]
        assert record.chunk_count == len(content_events)
        assert record.finish_reasons == ("stop",) or record.finish_reasons == ("length",)
    else:
        assert record.first_token_at is None
        assert record.finish_reasons == tuple(c["finish_reason"] for c in sent["choices"])


@pytest.mark.parametrize("operation", ["chat", "text_completion"])
def test_sdk_non_streamed_is_byte_identical_and_fully_recorded(tap, simulator, openai_client, operation) -> None:
    if operation == "chat":
        raw = openai_client.chat.completions.with_raw_response.create(
            model="pulze",
            messages=[{"role": "user", "content": "Explain reverse proxies"}],
            max_tokens=50,
            temperature=0.3,
            extra_headers=HEADERS,
        )
    else:
        raw = openai_client.completions.with_raw_response.create(
            model="openai/gpt-4o",
            prompt="Explain reverse proxies",
            max_tokens=50,
            temperature=0.3,
            extra_headers=HEADERS,
        )
    ex = simulator.exchanges[-1]
    assert raw.http_response.content == ex.decoded_body
    assert raw.parse().id == ex.response_json["id"]
    [record] = tap.wait_records(1)
    assert_record_matches(record, ex, operation=operation, stream=False)


@pytest.mark.parametrize("operation", ["chat", "text_completion"])
def test_sdk_stream_arrives_chunk_by_chunk_and_is_recorded(tmp_path, operation) -> None:
    # a slow stream: the first event must reach the client while the upstream is still sending
    with Simulator(chunk_delay=0.05) as sim:
        tap = start_tap(tmp_path, sim.url)
        client = openai.OpenAI(base_url=tap.base_url, api_key=API_KEY, max_retries=0)
        try:
            create = client.chat.completions if operation == "chat" else client.completions
            kwargs = (
                {"messages": [{"role": "user", "content": "Tell me a story"}]}
                if operation == "chat"
                else {"prompt": "Tell me a story"}
            )
            with create.with_streaming_response.create(
                model="pulze", stream=True, max_tokens=40, temperature=0.7, extra_headers=HEADERS, **kwargs
            ) as resp:
                received, upstream_done_at_first_chunk = [], None
                for chunk in resp.iter_bytes():
                    if upstream_done_at_first_chunk is None:
                        upstream_done_at_first_chunk = sim.exchanges[-1].completed
                    received.append(chunk)
            ex = sim.exchanges[-1]
            assert upstream_done_at_first_chunk is False, "first chunk arrived only after upstream finished"
            assert len(received) > 1
            assert b"".join(received) == ex.decoded_body
            [record] = tap.wait_records(1)
            assert_record_matches(record, ex, operation=operation, stream=True)
        finally:
            client.close()
            tap.stop()


def curl(*args: str, gid: int | None = None) -> subprocess.CompletedProcess:
    """curl, optionally as group ``gid`` (what the transparent-mode redirect matches)."""
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
        check=False,
        preexec_fn=None if gid is None else lambda: os.setgid(gid),
    )


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("stream", [False, True])
def test_curl_content_encoded_bodies_pass_raw_and_parse(tap, simulator, encoding, stream) -> None:
    body = {"model": "pulze", "messages": [{"role": "user", "content": "compress me"}], "stream": stream}
    out = curl(
        "-N",
        f"{tap.base_url}/chat/completions",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-H",
        "Content-Type: application/json",
        "-H",
        f"X-Sim-Encoding: {encoding}",
        "-H",
        "X-Sim-SSE: crlf",
        "--data",
        json.dumps(body),
    )
    assert out.returncode == 0, out.stderr
    ex = simulator.exchanges[-1]
    assert out.stdout == ex.response_body  # curl without --compressed: the encoded bytes, untouched
    [record] = tap.wait_records(1)
    sent = sim_response(ex)
    assert record.stream is stream and record.error_type is None
    assert record.output_tokens == sent["usage"]["completion_tokens"]
    assert record.cost_usd == sent["metadata"]["costs"]["total_tokens"]


def test_stream_without_usage_is_unknown_cost_not_zero(tap, simulator) -> None:
    out = curl(
        "-N",
        f"{tap.base_url}/completions",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-H",
        "X-Sim-Stream-Usage: none",
        "--data",
        json.dumps({"model": "pulze", "prompt": "hi", "stream": True}),
    )
    assert out.stdout == simulator.exchanges[-1].response_body
    [record] = tap.wait_records(1)
    assert record.error_type is None and record.chunk_count > 0
    assert record.input_tokens is None and record.cost_usd is None and record.cost_source == "unknown"


def test_other_traffic_passes_untouched_and_is_not_recorded(tap, simulator) -> None:
    out = curl(f"{tap.base_url}/models", "-H", f"Authorization: Bearer {API_KEY}")
    assert out.stdout == simulator.exchanges[-1].response_body
    for path in ("/chat/completions", "/completions"):
        out = curl(
            f"{tap.base_url}{path}",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "--data",
            json.dumps({"model": "pulze", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        )
        assert out.returncode == 0
    # records are written in order: had /models been recorded, it would be first of three
    tap.wait_records(2)
    assert [r.path for r in tap.records()] == ["/v1/chat/completions", "/v1/completions"]


FAULTS = {
    "429": ("http_429", 429),
    "500": ("http_500", 500),
    "422": ("http_422", 422),
    "disconnect": ("upstream_disconnected", None),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_upstream_faults_are_recorded_and_passed_through(tap, simulator, fault) -> None:
    out = curl(
        "-i",
        f"{tap.base_url}/chat/completions",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-H",
        f"X-Sim-Fault: {fault}",
        "--data",
        json.dumps({"model": "pulze", "messages": [{"role": "user", "content": "x"}]}),
    )
    ex = simulator.exchanges[-1]
    error_type, status = FAULTS[fault]
    [record] = tap.wait_records(1)
    if status is not None:
        assert out.stdout.endswith(b"\r\n\r\n" + ex.response_body)
        assert out.stdout.startswith(f"HTTP/1.1 {status}".encode())
        assert record.http_status == status
        assert record.error_message  # a short description, from the body
        assert record.cost_usd is None and record.cost_source == "unknown"
    else:
        assert record.http_status is None
    assert record.error_type in (error_type, "connection_error")
    assert API_KEY not in record.to_json()


def test_truncated_stream_reaches_client_as_truncated_and_is_recorded(tap, simulator) -> None:
    out = curl(
        "-N",
        f"{tap.base_url}/chat/completions",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-H",
        "X-Sim-Fault: truncate",
        "--data",
        json.dumps({"model": "pulze", "stream": True, "messages": [{"role": "user", "content": "x"}]}),
    )
    ex = simulator.exchanges[-1]
    assert out.returncode != 0  # curl notices the body never ended
    assert out.stdout == ex.response_body
    [record] = tap.wait_records(1)
    assert record.error_type == "upstream_disconnected" and record.http_status == 200
    assert record.stream and record.chunk_count and record.chunk_count > 0
    assert record.cost_source == "unknown"


def test_client_cancelling_a_stream_is_recorded(tmp_path) -> None:
    with Simulator(chunk_delay=0.05) as sim:
        tap = start_tap(tmp_path, sim.url)
        client = openai.OpenAI(base_url=tap.base_url, api_key=API_KEY, max_retries=0)
        try:
            stream = client.chat.completions.create(
                model="pulze", stream=True, max_tokens=60, messages=[{"role": "user", "content": "long story"}]
            )
            for chunk in stream:  # read until the first content, then hang up
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            stream.close()
            [record] = tap.wait_records(1)
            assert record.error_type == "client_disconnected"
            assert record.stream and record.first_token_at is not None
        finally:
            client.close()
            tap.stop()


def test_slow_first_byte_is_timed(tmp_path) -> None:
    with Simulator(first_byte_delay=0.3) as sim:
        tap = start_tap(tmp_path, sim.url)
        try:
            out = curl(
                f"{tap.base_url}/completions",
                "-H",
                f"Authorization: Bearer {API_KEY}",
                "-H",
                "X-Sim-Fault: slow-first-byte",
                "--data",
                json.dumps({"model": "pulze", "prompt": "x"}),
            )
            assert out.stdout == sim.exchanges[-1].response_body
            [record] = tap.wait_records(1)
            assert record.time_to_first_byte_s >= 0.3 and record.error_type is None
        finally:
            tap.stop()


def test_connection_refused_upstream_is_recorded(tmp_path) -> None:
    tap = start_tap(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        out = curl(
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"{tap.base_url}/completions",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "--data",
            json.dumps({"model": "pulze", "prompt": "x"}),
        )
        assert out.stdout == b"502"  # mitmproxy's own answer when the upstream cannot be reached
        [record] = tap.wait_records(1)
        assert record.error_type == "connection_error" and record.http_status is None
    finally:
        tap.stop()


def test_regular_proxy_mode_with_the_sdk(tmp_path, simulator) -> None:
    tap = start_tap(tmp_path, simulator.url, mode="regular")
    http_client = openai.DefaultHttpxClient(proxy=tap.proxy_url)
    client = openai.OpenAI(base_url=simulator.url + "/v1", api_key=API_KEY, max_retries=0, http_client=http_client)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="pulze", messages=[{"role": "user", "content": "via HTTP proxy"}], extra_headers=HEADERS
        )
        assert raw.http_response.content == simulator.exchanges[-1].decoded_body
        for _ in client.completions.create(model="pulze", prompt="streamed via proxy", stream=True):
            pass
        records = tap.wait_records(2)
        assert_record_matches(records[0], simulator.exchanges[-2], operation="chat", stream=False)
        assert records[1].stream and records[1].output_tokens
    finally:
        client.close()
        tap.stop()


def start_mitmdump(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int]:
    """``mitmdump -s addons/tap.py`` in ``mode`` on a free port, JSON lines to records.jsonl."""
    port = free_port()
    mitmdump = str(Path(sys.executable).with_name("mitmdump"))
    proc = subprocess.Popen(
        [
            mitmdump,
            "-q",
            "-s",
            str(REPO / "addons" / "tap.py"),
            "--mode",
            mode,
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--set",
            f"confdir={tmp_path / 'conf'}",
            "--set",
            f"llmtap_jsonl={tmp_path / 'records.jsonl'}",
            "--set",
            f"llmtap_db={tmp_path / 'tap.db'}",
            "--set",
            "llmtap_metrics_port=-1",
            "--set",
            "llmtap_intercept_hosts=127.0.0.1",  # the loopback simulator is no known LLM API
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port(port, proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc, port


def jsonl_records(path: Path, count: int) -> list[ExchangeRecord]:
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count)
    return [ExchangeRecord.from_json(line) for line in path.read_text().splitlines()]


def test_mitmdump_script_route(tmp_path, simulator) -> None:
    proc, port = start_mitmdump(tmp_path, f"reverse:{simulator.url}")
    try:
        out = curl(
            f"http://127.0.0.1:{port}/v1/completions",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "--data",
            json.dumps({"model": "pulze", "prompt": "via mitmdump -s"}),
        )
        assert out.stdout == simulator.exchanges[-1].response_body
        [record] = jsonl_records(tmp_path / "records.jsonl", 1)
        assert record.operation == "text_completion" and record.output_tokens
    finally:
        proc.terminate()
        proc.wait(30)


REDIRECTED_GID = 48231  # the group whose connections the transparent-mode test redirects


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables"), reason="needs root and iptables")
def test_transparent_mode_sees_redirected_traffic(tmp_path, simulator) -> None:
    """The app connects to the upstream's own address; the kernel (iptables REDIRECT) hands the
    connection to ``mitmdump -s addons/tap.py --mode transparent``. Only sockets of one group
    are redirected, so the proxy's own connection upstream is not."""
    proc, port = start_mitmdump(tmp_path, "transparent")
    rule = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "--dport",
        str(simulator.port),
        "-m",
        "owner",
        "--gid-owner",
        str(REDIRECTED_GID),
        "-j",
        "REDIRECT",
        "--to-ports",
        str(port),
    ]
    added = subprocess.run(["iptables", "-t", "nat", "-A", *rule], capture_output=True, text=True)
    try:
        if added.returncode:
            pytest.skip(f"cannot add a NAT rule here: {added.stderr.strip()}")
        outs = [
            curl(
                "-N",
                f"{simulator.url}/v1/chat/completions",
                "-H",
                f"Authorization: Bearer {API_KEY}",
                "-H",
                "Content-Type: application/json",
                "-H",
                f"Pulze-Labels: {json.dumps(LABELS)}",
                "--data",
                json.dumps({"model": "pulze", "messages": [{"role": "user", "content": "hi"}], "stream": stream}),
                gid=REDIRECTED_GID,
            )
            for stream in (False, True)
        ]
        records = jsonl_records(tmp_path / "records.jsonl", 2)
    finally:
        if not added.returncode:
            subprocess.run(["iptables", "-t", "nat", "-D", *rule], check=True)
        proc.terminate()
        proc.wait(30)
    assert [out.stdout for out in outs] == [ex.response_body for ex in simulator.exchanges]
    assert [r.stream for r in records] == [False, True]
    for record in records:
        assert (record.upstream_host, record.upstream_port) == ("127.0.0.1", simulator.port)
        assert record.http_status == 200 and record.output_tokens and dict(record.labels) == LABELS
        assert record.cost_source == "reported" and record.key_fingerprint


def test_capture_content_only_when_opted_in(tmp_path, simulator) -> None:
    tap = start_tap(tmp_path, simulator.url, "--capture-content")
    try:
        out = curl(
            f"{tap.base_url}/chat/completions",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "--data",
            json.dumps({"model": "pulze", "messages": [{"role": "user", "content": "capture me"}]}),
        )
        assert out.returncode == 0
        [record] = tap.wait_records(1)
        assert record.input_messages == ({"role": "user", "content": "capture me"},)
        sent = simulator.exchanges[-1].response_json["choices"][0]["message"]["content"]
        assert record.output_messages[0]["content"] == sent
    finally:
        tap.stop()


def self_signed_tls(tmp_path: Path):
    """A server certificate for 127.0.0.1 and the SSL context that serves it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "simulated-pulze")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "sim-cert.pem", tmp_path / "sim-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context


def test_regular_proxy_mode_over_https_with_the_mitmproxy_ca(tmp_path) -> None:
    """HTTPS_PROXY-style use: the app trusts llmtap's CA, llmtap verifies the real upstream."""
    cert_path, context = self_signed_tls(tmp_path)
    with Simulator(tls=context) as sim:
        tap = start_tap(
            tmp_path,
            sim.url,
            "--set",
            f"ssl_verify_upstream_trusted_ca={cert_path}",
            "--intercept-host",  # a loopback upstream is no known LLM API: decrypt it on purpose
            "127.0.0.1",
            mode="regular",
        )
        ca = tmp_path / "mitmproxy-conf" / "mitmproxy-ca-cert.pem"
        http_client = openai.DefaultHttpxClient(proxy=tap.proxy_url, verify=ssl.create_default_context(cafile=str(ca)))
        client = openai.OpenAI(base_url=sim.url + "/v1", api_key=API_KEY, max_retries=0, http_client=http_client)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="pulze", messages=[{"role": "user", "content": "over TLS"}], extra_headers=HEADERS
            )
            assert raw.http_response.content == sim.exchanges[-1].decoded_body
            [record] = tap.wait_records(1)
            assert_record_matches(record, sim.exchanges[-1], operation="chat", stream=False)
            assert record.upstream_scheme == "https"
        finally:
            client.close()
            tap.stop()


def test_jsonl_to_a_stdout_nobody_reads_never_stalls_traffic(tmp_path, simulator) -> None:
    """300 records (about 1 MB) into a pipe of 64 KB that is not read while traffic flows."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("llmtap")),
            "run",
            "--upstream",
            simulator.url,
            "--listen-port",
            str(port),
            "--metrics-port",
            "-1",
            "--db",
            "",
            "--jsonl",
            "-",
            "--confdir",
            str(tmp_path / "conf"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        body = {"model": "pulze", "messages": [{"role": "user", "content": "fill the pipe " * 20}]}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}/v1", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            statuses = [client.post("/chat/completions", json=body).status_code for _ in range(300)]
        assert statuses == [200] * 300
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        lines = out.decode().splitlines()
        assert len(lines) == 300
        assert {ExchangeRecord.from_json(line).response_id for line in lines} == {
            json.loads(ex.decoded_body)["id"] for ex in simulator.exchanges
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
