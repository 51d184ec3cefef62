"""``llmtap demo``: the simulated Pulze upstream, llmtap in front of it, and traffic through it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from llmtap.devtools.ports import wait_for_port
from llmtap.devtools.simulator import Simulator
from llmtap.devtools.traffic import drive


def run_demo(*, count: int, exit_after: bool, workdir: str, listen_port: int, metrics_port: int) -> int:
    out = Path(workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    db, log_path = out / "llmtap.db", out / "llmtap.log"
    simulator = Simulator(chunk_delay=0.02, fault_rate=0.0)
    simulator.start()
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
        str(out / "records.jsonl"),
        "--confdir",
        str(out / "mitmproxy"),
    ]
    with log_path.open("wb") as log:
        proxy = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(listen_port, proc=proxy)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"llmtap did not start: {exc}; see {log_path}") from exc
        base_url = f"http://127.0.0.1:{listen_port}/v1"
        print(f"simulated Pulze upstream  {simulator.url}")
        print(f"llmtap proxy              {base_url}   (log: {log_path})")
        print(f"sending {count} mixed requests with the openai SDK ...", flush=True)
        summary = drive(base_url, api_key="sk-demo-not-a-real-key", count=count)
        print(summary.describe())
        time.sleep(1.0)  # let the audit writer catch up before the report reads the DB
        subprocess.run([sys.executable, "-m", "llmtap.cli", "report", "--db", str(db), "--by", "model"], check=False)
        print(f"\nmetrics   http://127.0.0.1:{metrics_port}/metrics")
        print(f"audit DB  {db}")
        print(f"report    {Path(sys.executable).with_name('llmtap')} report --db {db} --by provider --by day")
        print(f"records   {out / 'records.jsonl'}")
        if not exit_after:
            print("\nllmtap keeps running; press Ctrl-C to stop.", flush=True)
            try:
                proxy.wait()
            except KeyboardInterrupt:
                pass
    finally:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.wait(30)
            except subprocess.TimeoutExpired:
                proxy.kill()
        simulator.stop()
    return 0
