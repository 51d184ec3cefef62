"""Load generation with ``wrk`` (C, one thread, pinned to the load core): it is never the bottleneck.

Requests come from Lua scripts written here; each run's results come back as one JSON line
printed by the script's ``done()`` (latencies in microseconds).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from procs import LOAD_CPU

WRK = shutil.which("wrk") or "/usr/bin/wrk"
CHAT_PATH = "/v1/chat/completions"
HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-bench-not-a-real-key",
    "Pulze-Labels": '{"team":"bench"}',
}


def chat_body(prompt: str, stream: bool = False) -> str:
    return json.dumps(
        {
            "model": "pulze",
            "stream": stream,
            "temperature": 0.2,
            "max_tokens": 64,
            "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}],
        },
        separators=(",", ":"),
    )


#: The non-streaming request every throughput run repeats (a ~1.3 KB Pulze-style answer).
CHAT_BODY = chat_body("Summarise the benchmark in one sentence please.")

#: The memory run's mix, one request per entry, cycled: 25 % fail (429, 500, 422, a stream cut
#: short, a dropped connection), 15 % stream, the rest are plain answers to varied prompts.
MIX: tuple[tuple[str, dict[str, str], str], ...] = (
    *((CHAT_PATH, {}, chat_body(f"Question number {i} about latency and cost?")) for i in range(11)),
    ("/v1/completions", {}, json.dumps({"model": "pulze", "prompt": "Say hello", "max_tokens": 16})),
    *((CHAT_PATH, {}, chat_body(f"Stream answer {i} please", stream=True)) for i in range(3)),
    (CHAT_PATH, {"X-Sim-Fault": "429"}, CHAT_BODY),
    (CHAT_PATH, {"X-Sim-Fault": "500"}, CHAT_BODY),
    (CHAT_PATH, {"X-Sim-Fault": "422"}, CHAT_BODY),
    (CHAT_PATH, {"X-Sim-Fault": "truncate"}, chat_body("Stream that breaks", stream=True)),
    (CHAT_PATH, {"X-Sim-Fault": "disconnect"}, CHAT_BODY),
)

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def _lua_headers(headers: dict[str, str]) -> str:
    return "{" + ", ".join(f"[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()) + "}"


def fixed_script(body: str) -> str:
    """One static POST (to the URL's path): wrk sends it without calling into Lua per request."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in HEADERS.items()]
    return "\n".join(lines) + "\n" + _DONE


def mix_script(quota: int) -> str:
    """Cycle through ``MIX``; stop after ``quota`` responses (a stream cut short has none).

    wrk sleeps for its whole ``-d`` even when every thread stopped, so the script prints
    ``QUOTA`` and ``wrk()`` ends the run with SIGINT, which wrk handles as a normal end.
    """
    entries = ",\n  ".join(
        f"{{{_lua_string(path)}, {_lua_headers({**HEADERS, **extra})}, {_lua_string(body)}}}"
        for path, extra, body in MIX
    )
    return (
        f"""
local mix = {{
  {entries}
}}
local reqs, i, n = {{}}, 0, 0
init = function(args)
  for k, m in ipairs(mix) do reqs[k] = wrk.format("POST", m[1], m[2], m[3]) end
end
request = function()
  i = i + 1
  return reqs[(i - 1) % #reqs + 1]
end
response = function(status, headers, body)
  n = n + 1
  if n == {quota} then
    io.write("QUOTA\\n")
    io.flush()
    wrk.thread:stop()
  end
end
"""
        + _DONE
    )


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int  # socket errors and timeouts
    non_2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(url: str, script: str, workdir: Path, *, connections: int, seconds: float, timeout: float = 10.0) -> WrkResult:
    """Run wrk (one thread) against ``url`` with a Lua ``script``; parse its ``done()`` line."""
    lua = workdir / f"wrk-{hashlib.sha1(script.encode()).hexdigest()[:12]}.lua"
    if not lua.exists():
        lua.write_text(script)
    argv = [
        "taskset",
        "-c",
        str(LOAD_CPU),
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(lua),
        url,
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        lines = []
        for ln in proc.stdout:
            lines.append(ln)
            if ln.strip() == "QUOTA":
                proc.send_signal(signal.SIGINT)
        if proc.wait(timeout=timeout + 60):
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{''.join(lines)}")
    out = "".join(lines)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    data = json.loads(line[6:])
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        non_2xx=data["status"],
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        mean_ms=data["mean_us"] / 1e3,
    )
