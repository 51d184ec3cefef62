"""Holes an adversarial run found, closed: absurd numbers, echoed keys, hostile working
directories, formula cells, foreign databases, and what regular mode decrypts."""

from __future__ import annotations

import csv
import datetime
import io
import ipaddress
import json
import math
import socket
import sqlite3
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port, start_tap, wait_until

from llmtap.audit.report import report
from llmtap.audit.sqlite import NotAnAuditLog, check_audit_log, connect
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.pricing.cost import Pricer, resolve_cost
from llmtap.pricing.validity import spend_amount
from llmtap.protocols import errors, pulze
from llmtap.protocols.secrets import credentials, scrub_record
from llmtap.protocols.values import as_float, as_int
from llmtap.record import ExchangeRecord
from llmtap.sinks.audit import AuditSink

PRICES = Pricer.load()
ODD_KEY = "Zq8vN3xK1mP0wR7tY5uI2oL9"  # looks like no known key format: only an exact match finds it


# --- field-level validity -----------------------------------------------------------------------


def test_out_of_range_values_cost_the_field_not_the_record() -> None:
    assert as_float(10**400) is None and as_float(float("inf")) is None and as_float(1) == 1.0
    assert as_int(float("nan")) is None
    fields = pulze.metadata_fields({"latency": 10**400, "retries": 2, "costs": {"total_tokens": 0.5}}, False)
    assert fields["upstream_latency_s"] is None and fields["retries"] == 2 and fields["reported_cost_usd"] == 0.5
    for detail in ([{"loc": 5}], [{"loc": None, "msg": 10**300}], [{"loc": [{"a": 1}, 2], "msg": ["x"]}], ["x"]):
        text = errors.error_message({"detail": detail}, b"")
        assert text is None or isinstance(text, str)
    assert errors.error_message({"detail": [{"loc": ["body", "model"], "msg": "required"}]}, b"") == (
        "body.model: required"
    )


@pytest.mark.parametrize(
    "fields, cost, source, anomalies",
    [
        ({"reported_cost_usd": 1e308}, None, "unknown", {"reported_cost_usd"}),
        ({"reported_cost_usd": -3.0}, None, "unknown", {"reported_cost_usd"}),
        ({"reported_cost_usd": 1500.0}, None, "unknown", {"reported_cost_usd"}),
        (
            {"reported_cost_usd": math.inf, "cost_prompt_usd": 1e308},
            None,
            "unknown",
            {"reported_cost_usd", "cost_prompt_usd"},
        ),
        ({"reported_cost_usd": 0.25, "cost_prompt_usd": -1.0}, 0.25, "reported", {"cost_prompt_usd"}),
        ({"input_tokens": 10**30, "output_tokens": 5, "response_model": "gpt-4o"}, None, "unknown", {"input_tokens"}),
        ({"input_tokens": -10, "output_tokens": 5, "response_model": "gpt-4o"}, None, "unknown", {"input_tokens"}),
        # valid tokens whose computed cost is above the ceiling: unknown, noted
        ({"input_tokens": 10**8, "output_tokens": 10**8, "response_model": "o1"}, None, "unknown", {"cost_usd"}),
        # negative savings are legitimate: kept as reported, no anomaly
        ({"reported_cost_usd": 0.1, "cost_savings_usd": -0.05}, 0.1, "reported", set()),
        ({"reported_cost_usd": 0.1, "cost_savings_usd": math.inf}, 0.1, "reported", {"cost_savings_usd"}),
    ],
)
def test_absurd_numbers_are_never_spend(fields, cost, source, anomalies) -> None:
    result = resolve_cost(fields, PRICES)
    assert result["cost_usd"] == cost and result["cost_source"] == source
    assert set(result.get("anomalies") or ()) == anomalies
    for name in anomalies:
        if name in fields:
            assert result[name] is None  # the bad field is cleared, its raw value is in the note
    merged = {**fields, **result}
    for name in ("input_tokens", "output_tokens", "cost_usd", "cost_prompt_usd", "cost_completion_usd"):
        value = merged.get(name)
        assert value is None or spend_amount(value) == value


def test_ceilings_are_options() -> None:
    settings = Settings(token_ceiling=100, cost_ceiling_usd=1)
    assert resolve_cost({"input_tokens": 101, "output_tokens": 1}, PRICES, settings)["anomalies"]
    assert resolve_cost({"reported_cost_usd": 2.0}, PRICES, settings)["cost_usd"] is None
    assert resolve_cost({"reported_cost_usd": 0.5}, PRICES, settings)["cost_usd"] == 0.5


def test_json_lines_are_strict_json() -> None:
    record = ExchangeRecord(
        "id", "chat", "POST", "/", 1.0, cost_usd=math.inf, metadata={"latency": math.nan, "x": [-math.inf]}
    )
    line = record.to_json()
    assert "NaN" not in line and "Infinity" not in line
    json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a JSON line"))


# --- secrets --------------------------------------------------------------------------------------


def test_the_exchanges_own_credentials_by_every_auth_style() -> None:
    assert credentials({"authorization": f"Bearer {ODD_KEY}"}) == (ODD_KEY,)
    assert credentials({"api-key": ODD_KEY}) == (ODD_KEY,)
    assert credentials({"x-api-key": ODD_KEY}) == (ODD_KEY,)
    assert credentials({"x-goog-api-key": ODD_KEY}) == (ODD_KEY,)
    assert credentials({}, f"/v1beta/models/m:generateContent?alt=sse&key={ODD_KEY}") == (ODD_KEY,)
    assert ODD_KEY + "/=" in credentials({}, f"/x?key={ODD_KEY}%2F%3D")
    assert credentials({"authorization": "Bearer ollama"}) == ()  # short placeholders are no secret


def test_a_secret_is_scrubbed_from_every_stored_string() -> None:
    record = ExchangeRecord(
        "id",
        "chat",
        "POST",
        f"/v1/{ODD_KEY}/chat/completions",
        1.0,
        error_message=f"Incorrect API key provided: {ODD_KEY}.",
        labels={"team": ODD_KEY},
        metadata={"echo": [f"key={ODD_KEY}"]},
        output_messages=({"role": "assistant", "content": f"your key is {ODD_KEY}"},),
        request_model="ollama-model",
    )
    clean = scrub_record(record, credentials({"x-api-key": ODD_KEY}))
    assert ODD_KEY not in clean.to_json()
    assert clean.error_message == "Incorrect API key provided: [redacted]."
    assert clean.request_model == "ollama-model"
    untouched = ExchangeRecord("id", "chat", "POST", "/", 1.0, request_model="m")
    assert scrub_record(untouched, (ODD_KEY,)) is untouched


# --- the writer imports nothing from the working directory ---------------------------------------

SHADOWS = ("secrets", "json", "sqlite_utils", "orjson", "sqlite3", "llmtap", "opentelemetry", "logging_config")


def test_writer_imports_nothing_from_the_working_directory(tmp_path, simulator) -> None:
    marker = tmp_path / "IMPORTED"
    for name in SHADOWS:
        (tmp_path / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit('shadow {name} imported')\n"
        )
    tap = start_tap(tmp_path, simulator.url)
    try:
        with tap.client() as client:
            client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "hi"}])
        tap.wait_records(1)
        wait_until(lambda: _rows(tap.db), timeout=20)
    finally:
        tap.stop()
    assert not marker.exists(), marker.read_text()
    assert _rows(tap.db) == 1
    assert "shadow" not in tap.output()


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    except sqlite3.Error:
        return 0


# --- safe exports ---------------------------------------------------------------------------------

FORMULAS = ('=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tTAB", "\rCR")


def test_csv_text_cells_are_neutralised_numbers_are_not(tmp_path) -> None:
    sink = AuditSink(Settings(db=str(tmp_path / "a.db"), metrics_port=-1), Health())
    for i, value in enumerate(FORMULAS):
        sink.emit(
            ExchangeRecord(
                f"e{i}",
                "chat",
                "POST",
                "/v1/chat/completions",
                time.time(),
                response_end=time.time() + 1,
                response_model=value,
                app_id=value,
                labels={"team": value},
                cost_usd=-0.0 if i == 0 else 0.5,
                input_tokens=3,
            )
        )
    sink.close()
    for by in ("model", "app", "label:team"):
        result = CliRunner().invoke(report, ["--db", str(tmp_path / "a.db"), "--by", by, "--format", "csv"])
        assert result.exit_code == 0, result.output
        rows = list(csv.reader(io.StringIO(result.output)))
        cells = {row[0] for row in rows[1:-1]}
        assert cells == {"'" + value for value in FORMULAS}
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
        assert rows[-1][0] == "TOTAL" and rows[-1][1] == str(len(FORMULAS))


@pytest.mark.parametrize("when", ["9999999999999999999999d", "9" * 400 + "w", "99999999999999h"])
def test_extreme_since_and_until_are_a_clean_error(tmp_path, when) -> None:
    connect(tmp_path / "a.db").conn.close()
    for flag in ("--since", "--until"):
        result = CliRunner().invoke(report, ["--db", str(tmp_path / "a.db"), flag, when])
        assert result.exit_code == 2 and "too far from now" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path) -> None:
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    before = foreign.read_bytes()
    with pytest.raises(NotAnAuditLog):
        check_audit_log(foreign)
    with pytest.raises(NotAnAuditLog):
        connect(foreign)
    with pytest.raises(NotAnAuditLog):
        AuditSink(Settings(db=str(foreign)), Health())
    result = CliRunner().invoke(report, ["--db", str(foreign)])
    assert result.exit_code == 1 and "not an llmtap audit log" in result.output
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(NotAnAuditLog):
        check_audit_log(tmp_path / "junk.db")
    assert foreign.read_bytes() == before
    check_audit_log(tmp_path / "missing.db")  # missing and empty files are fine: llmtap creates its own
    (tmp_path / "empty.db").write_bytes(b"")
    check_audit_log(tmp_path / "empty.db")


def test_a_second_instance_does_not_claim_the_audit_log(tmp_path, simulator) -> None:
    first = start_tap(tmp_path, simulator.url)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = start_tap(second_dir, simulator.url, db=first.db)
    try:
        wait_until(lambda: "  content  " in first.output() and "  content  " in second.output())
        assert f"audit    {first.db}" in first.output()
        assert f"audit    {first.db}" not in second.output()
        assert "audit    NOT WRITTEN (AuditLogInUse" in second.output()
    finally:
        second.stop()
        first.stop()


# --- regular mode decrypts only the LLM APIs ------------------------------------------------------


def _tls_server(tmp_path: Path) -> tuple[ThreadingHTTPServer, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-an-llm-api")])
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
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = (
                b'{"id":"x","object":"chat.completion","model":"m","usage":{"prompt_tokens":1,"completion_tokens":1}}'
            )
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, cert.public_bytes(serialization.Encoding.DER)


def _through_proxy(proxy_port: int, port: int) -> tuple[bytes, bytes]:
    """CONNECT through the proxy, then TLS without verification: the certificate seen, the response."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 200 " in head.split(b"\r\n")[0]
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    seen = tls.getpeercert(binary_form=True)
    body = b'{"model":"m","messages":[]}'
    tls.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ODD_KEY}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    response = b""
    while chunk := tls.recv(65536):
        response += chunk
    tls.close()
    return seen, response


def test_regular_mode_tunnels_hosts_it_does_not_meter(tmp_path, simulator) -> None:
    server, own_cert = _tls_server(tmp_path)
    port = server.server_address[1]
    tap = start_tap(tmp_path, simulator.url, mode="regular")
    try:
        seen, response = _through_proxy(tap.port, port)
        assert seen == own_cert  # the server's own certificate: not decrypted
        assert b"200 OK" in response
        time.sleep(0.5)
        assert tap.records() == []
        assert "api.openai.com" in tap.output() and "tunnelled untouched" in tap.output()
    finally:
        tap.stop()
    # the control: a host the user adds is decrypted (mitmproxy's certificate) and recorded
    other = tmp_path / "other"
    other.mkdir()
    tap = start_tap(other, simulator.url, "--intercept-host", "127.0.0.1", "--set", "ssl_insecure=true", mode="regular")
    try:
        seen, response = _through_proxy(tap.port, port)
        assert seen != own_cert and b"200 OK" in response
        [record] = tap.wait_records(1)
        assert record.upstream_port == port and record.input_tokens == 1
    finally:
        tap.stop()
        server.shutdown()


def test_hosts_mapped_to_a_family_are_decrypted_too() -> None:
    from types import SimpleNamespace

    from llmtap.capture.intercept import apply_intercept_hosts

    options = SimpleNamespace(mode=["regular"], allow_hosts=[], ignore_hosts=[])
    options.update = lambda **changes: options.__dict__.update(changes)
    settings = Settings.from_values({"family_map": ("llm.internal.example=chat_completions", "/gw/=gemini")})
    assert apply_intercept_hosts(options, settings)
    assert any("llm\\.internal\\.example" in pattern for pattern in options.allow_hosts)
    assert not any("gw" in pattern for pattern in options.allow_hosts)  # a path prefix is no host
    assert any("api\\.anthropic\\.com" in pattern for pattern in options.allow_hosts)
