"""``llmtap demo``: the simulated Pulze upstream, llmtap in front of it, and traffic through it.

The demo never talks to a server it did not start: before any request it checks that its own
llmtap process holds the proxy and metrics ports (read from /proc, without connecting) and that
a probe through the proxy reaches its own simulator. Anything else ends the demo with a message
and exit status 1.
"""

from __future__ import annotations

import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from llmtap.audit.sqlite import connect_readonly
from llmtap.devtools.ports import free_port, listens_on
from llmtap.devtools.simulator import Simulator
from llmtap.devtools.traffic import drive

API_KEY = "sk-demo-not-a-real-key"
BANNER = "listening:"  # the banner llmtap prints once it serves (llmtap.capture.addon)
START_TIMEOUT_S = 60.0


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def run_demo(
    *, count: int, exit_after: bool, workdir: str, listen_port: int | None = None, metrics_port: int | None = None
) -> int:
    out = Path(workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    db, log_path, records = out / "llmtap.db", out / "llmtap.log", out / "records.jsonl"
    listen_port = listen_port or free_port()
    metrics_port = metrics_port or free_port()
    simulator = Simulator(chunk_delay=0.02, fault_rate=0.0)
    simulator.start()
    started = time.time()
    args = [
        sys.executable,
        "-m",
        "llmtap.cli",
        "run",
        "--upstream",
        simulator.url,
        "--listen-port",
        str(listen_port),
        "--metrics-port",
        str(metrics_port),
        "--db",
        str(db),
        "--jsonl",
        str(records),
        "--confdir",
        str(out / "mitmproxy"),
    ]
    with log_path.open("wb") as log:
        proxy = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            _wait_ready(proxy, log_path, listen_port, metrics_port)
            _probe(listen_port, simulator)
        except DemoError as exc:
            print(f"llmtap demo: {exc}", file=sys.stderr)
            return 1
        base_url = f"http://127.0.0.1:{listen_port}/v1"
        print(f"simulated upstream        {simulator.url}   (Pulze, OpenAI, Azure, OpenRouter, Anthropic, Gemini)")
        print(f"llmtap proxy              {base_url}   (log: {log_path})")
        summary = _traffic(base_url, count)
        if exit_after:
            _stop(proxy)  # a graceful stop writes every record to the DB
        else:
            _wait_rows(db, started, summary.sent)
        print(f"this run: {summary.describe()}")
        earlier = _count_rows(db, "request_start < ?", started)
        since = datetime.fromtimestamp(started, UTC).isoformat()
        subprocess.run(
            [sys.executable, "-m", "llmtap.cli", "report", "--db", str(db), "--since", since, "--by", "model"],
            check=False,
        )
        llmtap = Path(sys.executable).with_name("llmtap")
        if earlier:
            print(
                f"(the report above is this run only; {db} also holds {earlier:,} requests from earlier "
                f"demo runs: {llmtap} report --db {db})"
            )
        print()
        if not exit_after:
            print(f"metrics   http://127.0.0.1:{metrics_port}/metrics")
            print(f"live view {llmtap} top --metrics-url http://127.0.0.1:{metrics_port}/metrics")
        print(f"audit DB  {db}")
        print(f"report    {llmtap} report --db {db} --by provider --by day")
        print(f"records   {records}")
        if not exit_after:
            print(f"\nllmtap keeps running at {base_url}; press Ctrl-C to stop.", flush=True)
            try:
                proxy.wait()
            except KeyboardInterrupt:
                pass
    finally:
        _stop(proxy)
        simulator.stop()
    return 0


def _wait_ready(proxy: subprocess.Popen, log_path: Path, listen_port: int, metrics_port: int) -> None:
    """Return once *our* llmtap serves on both ports; never connects to either port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = log_path.read_text(errors="replace")
        if proxy.poll() is not None:
            tail = "\n".join("  " + line for line in text.strip().splitlines()[-6:])
            raise DemoError(
                f"llmtap exited with status {proxy.returncode} before serving; nothing was sent.\n{tail}\n"
                f"(full log: {log_path})"
            )
        if BANNER in text:
            break
        if time.monotonic() > deadline:
            raise DemoError(f"llmtap did not start within {START_TIMEOUT_S:.0f} s; nothing was sent (log: {log_path})")
        time.sleep(0.05)
    for port, flag, what in ((listen_port, "--listen-port", "proxy"), (metrics_port, "--metrics-port", "metrics")):
        owned = listens_on(proxy.pid, port)
        if owned is None and what == "metrics":  # no /proc: the banner lists the endpoint only when it is up
            owned = f":{port}/metrics" in text
        if owned is False:
            raise DemoError(
                f"port {port} ({what}) is held by another program, not by the demo's llmtap; nothing was sent. "
                f"Leave out {flag} to let the demo pick a free port, or give another one."
            )


def _probe(listen_port: int, simulator: Simulator) -> None:
    """One request through the proxy that must arrive at our simulator."""
    nonce = secrets.token_hex(8)
    request = urllib.request.Request(
        f"http://127.0.0.1:{listen_port}/v1/models",
        headers={"Authorization": f"Bearer {API_KEY}", "X-Llmtap-Demo-Probe": nonce},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
    except (OSError, urllib.error.URLError) as exc:
        raise DemoError(f"a probe through llmtap on port {listen_port} failed: {exc}") from exc
    if not any(ex.request_headers.get("x-llmtap-demo-probe") == nonce for ex in list(simulator.exchanges)):
        raise DemoError(f"a probe sent to port {listen_port} did not reach the demo's simulated upstream")


def _traffic(base_url: str, count: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"sending {count} mixed requests with the openai SDK"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("traffic", total=count)
        return drive(base_url, api_key=API_KEY, count=count, on_result=lambda _outcome: progress.advance(task))


def _count_rows(db: Path, where: str, *params: object) -> int:
    try:
        conn = connect_readonly(str(db))
    except (OSError, ValueError, sqlite3.Error):
        return 0
    try:
        return conn.execute(f"SELECT count(*) FROM exchanges WHERE {where}", params).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _wait_rows(db: Path, since: float, count: int, timeout: float = 15.0) -> None:
    """Let the audit writer catch up (bounded) before the report reads the DB."""
    deadline = time.monotonic() + timeout
    while _count_rows(db, "request_start >= ?", since) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def _stop(proxy: subprocess.Popen) -> None:
    if proxy.poll() is None:
        proxy.send_signal(signal.SIGINT)
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
