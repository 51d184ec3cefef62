"""The README cannot drift: its shell blocks marked ``<!-- runnable -->`` run here as written.

A block marked ``<!-- runnable: serve -->`` is a server (started in the background, waited for
and stopped at the end); a block marked ``<!-- runnable -->`` must exit 0 under ``bash -euo
pipefail``. They run in order, in one scratch directory (with ``addons/`` linked in, as in a
clone), with the venv's bin directory first on PATH (the README says to activate the venv) and
free ports in place of the README's 8000/8080/8081/9464. The upstream is always the simulator.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO, free_port

from llmtap.devtools.ports import wait_for_port

BLOCK = re.compile(r"<!-- runnable(?::\s*(?P<kind>serve))? -->\s*\n```sh\n(?P<body>.*?)```", re.S)
README_PORTS = ("8000", "8080", "8081", "9464")
LISTENS = re.compile(r"(?:--port |--listen-port |--metrics-port |@)(\d+)")


def runnable_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    return [(m["kind"] or "run", m["body"]) for m in BLOCK.finditer(text)]


def test_the_readme_marks_its_walkthrough_runnable() -> None:
    blocks = runnable_blocks()
    kinds = [kind for kind, _ in blocks]
    assert kinds.count("serve") >= 3 and kinds.count("run") >= 4
    text = "\n".join(body for _, body in blocks)
    for command in ("llmtap simulate", "llmtap run", "llmtap traffic", "llmtap report", "llmtap top", "mitmdump -s"):
        assert command in text
    assert "datasette llmtap.db" in text and ".backup" in text and "VACUUM INTO" in text
    assert "make test" not in text  # never the suite inside the suite


def test_the_readme_runnable_blocks_work_as_written(tmp_path: Path) -> None:
    ports = {port: str(free_port()) for port in README_PORTS}
    (tmp_path / "addons").symlink_to(REPO / "addons")
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(Path(bin_dir).parent))
    servers: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i, (kind, body) in enumerate(runnable_blocks()):
            script = re.sub(r"\b(8000|8080|8081|9464)\b", lambda m: ports[m[1]], body)
            if kind == "serve":
                log = tmp_path / f"serve-{i}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["bash", "-c", script], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                servers.append((proc, log))
                for port in LISTENS.findall(script):
                    try:
                        wait_for_port(int(port), timeout=60, proc=proc)
                    except (RuntimeError, TimeoutError) as exc:
                        raise AssertionError(f"{body}\n-> {exc}\n{log.read_text(errors='replace')}") from exc
                continue
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"README block failed:\n{body}\nstdout:\n{result.stdout}\n{result.stderr}"
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc, _ in servers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_readme_http_versions_paragraph(tap) -> None:
    """h2c upgrade is answered in HTTP/1.1; HTTP/2 with prior knowledge fails (mitmproxy)."""
    text = (REPO / "README.md").read_text()
    assert "--http2-prior-knowledge" in text and "answered in HTTP/1.1" in text

    def curl(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "--max-time", "20", *flags, "-o", "/dev/null"]
            + ["-w", "%{http_version} %{http_code}", "-H", "Authorization: Bearer sk-test", f"{tap.base_url}/models"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert curl("--http1.1").stdout == "1.1 200"
    assert curl("--http2").stdout == "1.1 200"
    prior = curl("--http2-prior-knowledge")
    assert prior.returncode != 0 and not prior.stdout.endswith("200")
