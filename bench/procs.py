"""Processes under test: started pinned to a core, read from /proc, stopped by their own pid.

The machine has two cores. The proxy under test gets one to itself (``PROXY_CPU``); the load
generator, the upstream simulator, llmtap's audit writer process and this script share the
other (``LOAD_CPU``), so the proxy's numbers are not disturbed by the work that feeds it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmtap.devtools.ports import wait_for_port

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CORES = os.cpu_count() or 1
LOAD_CPU = 0
PROXY_CPU = 1 if CORES > 1 else 0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of all of a process's threads so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * _PAGE / 1e6


def pin_writer(parent: int, cpu: int, timeout: float = 10.0) -> int:
    """Pin the llmtap audit writer process that ``parent`` started to ``cpu``; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            for pid in map(int, children.read_text().split()):
                if b"llmtap.audit.writer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.sched_setaffinity(pid, {cpu})
                    return pid
        time.sleep(0.05)
    raise RuntimeError(f"process {parent} started no audit writer process")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    """One started process; ``stop()`` signals only this pid."""

    name: str
    popen: subprocess.Popen
    port: int
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """user + system CPU of all the process's threads so far (/proc/PID/stat)."""
        return cpu_seconds(self.pid)

    def writer_cpu_seconds(self) -> float:
        """CPU of its audit writer process so far (0 when it has none)."""
        pid = self.extra.get("writer_pid")
        try:
            return cpu_seconds(pid) if pid else 0.0
        except OSError:  # restarted: not expected in a bench; shows up as a drop in its CPU
            return 0.0

    def pin_writer(self, cpu: int, timeout: float = 10.0) -> None:
        """Move llmtap's audit writer process (a child started with the audit sink) to ``cpu``.

        The proxy's event loop is single-threaded: the writer is meant to run on another core
        (it is niced, so on a shared core the proxy comes first).
        """
        self.extra["writer_pid"] = pin_writer(self.pid, cpu, timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def writer_rss_mb(self) -> float:
        """RSS of its audit writer process (0 when it has none)."""
        pid = self.extra.get("writer_pid")
        return rss_mb(pid) if pid else 0.0

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start(name: str, argv: list[str], port: int, cpu: int, workdir: Path, env: dict | None = None) -> Proc:
    """Start ``argv`` pinned to ``cpu`` (taskset), logging to ``workdir/name.log``; wait for ``port``."""
    log = workdir / f"{name}.log"
    out = log.open("wb")
    popen = subprocess.Popen(
        ["taskset", "-c", str(cpu), *argv],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out.close()
    proc = Proc(name, popen, port, log)
    try:
        wait_for_port(port, timeout=20.0, proc=popen)
    except BaseException:
        proc.stop(5)
        raise
    return proc


def simulator(name: str, cpu: int, workdir: Path, chunk_delay: float = 0.0) -> Proc:
    port = free_port()
    argv = [str(VENV_BIN / "llmtap"), "simulate", "--port", str(port), "--chunk-delay", str(chunk_delay)]
    return start(name, argv, port, cpu, workdir)


def mitmdump(name: str, upstream: str, workdir: Path, *scripts: str, extra: list[str] = ()) -> Proc:
    """Bare ``mitmdump --mode reverse:URL -q`` (plus ``-s`` scripts and ``extra`` arguments, if any)."""
    port = free_port()
    argv = [
        str(VENV_BIN / "mitmdump"),
        "--mode",
        f"reverse:{upstream}",
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={workdir / 'mitmproxy'}",
    ]
    for script in scripts:
        argv += ["-s", script]
    return start(name, [*argv, *extra], port, PROXY_CPU, workdir)


def llmtap(
    name: str, upstream: str, workdir: Path, *, lean: bool, otlp: str = "", db: bool = True, metrics: bool = True
) -> Proc:
    """``llmtap run`` with the given sinks; the audit DB goes to ``workdir/name.db``."""
    port, metrics_port = free_port(), free_port()
    argv = [
        str(VENV_BIN / "llmtap"),
        "run",
        "--lean" if lean else "--full",
        "--upstream",
        upstream,
        "--listen-port",
        str(port),
        "--metrics-port",
        str(metrics_port if metrics else -1),
        "--db",
        str(workdir / f"{name}.db") if db else "",
        "--confdir",
        str(workdir / "mitmproxy"),
    ]
    if otlp:
        argv += ["--otlp-endpoint", otlp]
    proc = start(name, argv, port, PROXY_CPU, workdir)
    proc.extra.update(metrics_port=metrics_port, db=workdir / f"{name}.db")
    if db:
        proc.pin_writer(LOAD_CPU)
    return proc


def pin_self(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def load_average() -> str:
    """1, 5 and 15 minute load averages: other work on the machine shows up here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class PeakSampler:
    """Reads ``read()`` every ``interval`` seconds on a thread while in use; keeps the peak."""

    def __init__(self, read: Callable[[], float], interval: float) -> None:
        self.read, self.interval, self.peak = read, interval, read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
