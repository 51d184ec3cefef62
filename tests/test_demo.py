"""``llmtap demo`` cannot lie: it talks only to what it started, and reports only this run."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import LLMTAP


class Squatter:
    """Another program on a port: accepts connections and counts them (what the demo must not send)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def demo(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLMTAP, "demo", "--exit", "--dir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=workdir.parent,
    )


@pytest.mark.parametrize("flag", ["--listen-port", "--metrics-port"])
def test_a_taken_port_fails_clearly_and_sends_nothing_there(tmp_path: Path, flag: str) -> None:
    squatter = Squatter()
    try:
        result = demo(tmp_path / "out", flag, str(squatter.port))
    finally:
        squatter.close()
    assert result.returncode != 0
    assert str(squatter.port) in result.stderr and "nothing was sent" in result.stderr
    assert flag in result.stderr  # names the flag to change
    assert squatter.connections == 0
    assert "this run" not in result.stdout and "audit DB" not in result.stdout


def test_demo_shows_every_fault_and_counts_this_run_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = demo(out, "--count", "40")
    assert first.returncode == 0, first.stderr
    text = first.stdout
    assert "this run: sent 40 requests" in text
    for fault in ("http 429", "http 500", "http 422", "truncated"):
        assert fault in text, fault
    assert re.search(r"TOTAL\s*│\s*40\b", text), text
    assert "earlier" not in text
    # --exit: the proxy has stopped, so no metrics URL; what is printed exists
    assert "/metrics" not in text
    for line in text.splitlines():
        if line.startswith(("audit DB", "records")):
            assert Path(line.split(None, 2)[-1]).exists(), line

    second = demo(out, "--count", "40")
    assert second.returncode == 0, second.stderr
    assert "this run: sent 40 requests" in second.stdout
    assert re.search(r"TOTAL\s*│\s*40\b", second.stdout), second.stdout  # this run's 40, not 80
    assert "also holds 40 requests from earlier" in second.stdout


def test_a_running_demo_prints_urls_that_are_its_own_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import queue
    import signal
    import urllib.request

    proc = subprocess.Popen(
        [LLMTAP, "demo", "--count", "10", "--dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        while not any("keeps running" in line for line in seen):
            seen.append(lines.get(timeout=120))
        metrics_url = next(line.split()[1] for line in seen if line.startswith("metrics "))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(metrics_url, timeout=10) as response:
            page = response.read().decode()
        served = sum(
            float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith("llmtap_requests_total{")
        )
        assert served == 10  # this demo's proxy: it has seen exactly this run's requests
        top = subprocess.run(
            [LLMTAP, "top", "--metrics-url", metrics_url, "--once", "--interval", "0.2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert top.returncode == 0 and "by model" in top.stdout
        assert any(line.startswith("live view") and metrics_url in line for line in seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
