"""Shared fixtures: a real simulated Pulze upstream and a real llmtap proxy, on loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from llmtap.devtools.ports import wait_for_port
from llmtap.devtools.simulator import Simulator
from llmtap.record import ExchangeRecord

#: Property tests in CI: the same examples on every run, no per-example deadline (a shared
#: 2-core machine), a bounded number of examples. HYPOTHESIS_PROFILE=dev explores more.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
LLMTAP = str(Path(sys.executable).with_name("llmtap"))
API_KEY = "sk-test-SECRET-4f1c2b9d8e7a6f5e4d3c2b1a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` on a /metrics page whose labels include ``labels`` (0 if none)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy (bounded); return its value or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class TapProcess:
    """A running ``llmtap run`` subprocess (real mitmproxy with the addon)."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    db: Path
    jsonl: Path
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def client(self):
        """The official SDK pointed at this proxy; no retries, so every call is one exchange."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics_url, name, **labels)

    def records(self) -> list[ExchangeRecord]:
        if not self.jsonl.exists():
            return []
        return [ExchangeRecord.from_json(line) for line in self.jsonl.read_text().splitlines() if line]

    def wait_records(self, count: int, timeout: float = 15.0) -> list[ExchangeRecord]:
        wait_until(lambda: len(self.records()) >= count, timeout)
        return self.records()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_tap(
    workdir: Path,
    upstream: str,
    *extra: str,
    mode: str = "reverse",
    env: dict[str, str] | None = None,
    db: Path | None = None,
    jsonl: Path | None = None,
) -> TapProcess:
    """Start ``llmtap run`` on free loopback ports; returns once the proxy accepts connections."""
    port, metrics_port = free_port(), free_port()
    db = db or workdir / "llmtap.db"
    jsonl = jsonl or workdir / "records.jsonl"
    log = workdir / f"llmtap-{port}.log"
    args = [
        LLMTAP,
        "run",
        "--mode",
        mode,
        "--upstream",
        upstream,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--db",
        str(db),
        "--jsonl",
        str(jsonl),
        "--confdir",
        str(workdir / "mitmproxy-conf"),
        *extra,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        full_env.pop(name, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
    tap = TapProcess(proc, port, metrics_port, db, jsonl, log, args)
    try:
        wait_for_port(port, proc=proc)
    except Exception as exc:
        tap.kill()
        raise RuntimeError(f"llmtap did not start:\n{tap.output()}") from exc
    return tap


#: The official SDKs, as users have them: they need h11 >= 0.16 (httpx2), which mitmproxy 11's
#: venv cannot hold, so they get a venv of their own, built once and reused across runs.
CLIENTS_VENV = REPO / ".venv-clients"
CLIENT_REQUIREMENTS = ("openai>=3", "anthropic>=1", "google-genai>=1")


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    """The Python of ``.venv-clients`` (the latest SDKs), built on first use."""
    import fcntl

    python = CLIENTS_VENV / "bin" / "python"
    stamp = CLIENTS_VENV / ".installed"
    wanted = "\n".join(CLIENT_REQUIREMENTS)
    with open(REPO / ".venv-clients.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time, even across pytest processes
        if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(CLIENTS_VENV)], check=True, timeout=120)
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, "--upgrade", *CLIENT_REQUIREMENTS], check=True, timeout=900)
            stamp.write_text(wanted)
    return python


def run_sdk(python: Path, call: str, base_url: str) -> dict:
    """Run one call of ``tests/sdk_client.py`` in the SDK venv; what the SDK handed the app."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(
        [str(python), str(REPO / "tests" / "sdk_client.py"), call, base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, f"{call} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    sim = Simulator(host="127.0.0.1", port=0, chunk_delay=0.02)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def tap(tmp_path: Path, simulator: Simulator) -> Iterator[TapProcess]:
    """llmtap in reverse mode in front of the simulator, all local sinks on."""
    proc = start_tap(tmp_path, simulator.url)
    yield proc
    proc.stop()


@pytest.fixture
def openai_client(tap: TapProcess):
    client = tap.client()
    yield client
    client.close()
