"""``llmtap top``: the numbers it computes from a real sidecar's /metrics, and the live view under tmux."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LLMTAP, free_port, wait_until

from llmtap.cli import main
from llmtap.cli.live import quantile, scrape, view

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3-haiku")


def send(tap, count: int, *, fail: int = 0) -> None:
    """``count`` chat completions alternating over MODELS, the first ``fail`` of them a 500."""
    import openai

    client = tap.client()
    try:
        for i in range(count):
            headers = {"X-Sim-Fault": "500"} if i < fail else {}
            try:
                client.chat.completions.create(
                    model=MODELS[i % 2], messages=[{"role": "user", "content": f"q{i}"}], extra_headers=headers
                )
            except openai.APIStatusError:
                pass
    finally:
        client.close()


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.4, 40.0), (float("inf"), 40.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20, halfway through (0.1, 0.2]
    assert quantile(0.95, buckets) == pytest.approx(0.2 + 0.2 * (38 - 30) / 10)
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (float("inf"), 5.0)]) == 0.1  # in +Inf: the highest finite bound


def test_view_matches_the_records_of_a_real_sidecar(tap) -> None:
    send(tap, 4)
    tap.wait_records(4)
    before = scrape(tap.metrics_url)
    send(tap, 6, fail=2)
    records = tap.wait_records(10)
    after = scrape(tap.metrics_url)
    v = view(before, after)
    assert v.total_requests == 10 and v.total_errors == 2
    assert v.requests_per_s == pytest.approx(6 / (after.at - before.at))
    assert v.errors_per_s == pytest.approx(2 / (after.at - before.at))
    spend = sum(r.cost_usd for r in records if r.cost_usd is not None)
    assert spend > 0 and v.total_spend == pytest.approx(spend)
    window_spend = sum(r.cost_usd for r in records[4:] if r.cost_usd is not None)
    assert v.spend_per_min == pytest.approx(window_spend / (after.at - before.at) * 60)
    by_model = {name: g.total_requests for name, g in v.groups["model"].items()}
    want: dict[str, int] = {}
    for r in records:
        want[r.response_model or "unknown"] = want.get(r.response_model or "unknown", 0) + 1
    assert by_model == want
    assert sum(g.requests for g in v.groups["provider"].values()) == 6
    assert sum(g.errors for g in v.groups["app"].values()) == 2
    durations = sorted(r.duration_s for r in records[4:])
    assert durations[0] <= v.p50_s * 1.0001 and v.p95_s is not None and v.p50_s <= v.p95_s


def test_once_prints_a_view_and_an_unreachable_sidecar_is_a_clear_error(tap) -> None:
    send(tap, 2)
    tap.wait_records(2)
    result = CliRunner().invoke(main, ["top", "--metrics-url", tap.metrics_url, "--once", "--interval", "0.2"])
    assert result.exit_code == 0, result.output
    for text in ("requests/s", "p95", "spend/min", "by model", "by app", "by provider", MODELS[0]):
        assert text in result.output
    url = f"http://127.0.0.1:{free_port()}/metrics"
    result = CliRunner().invoke(main, ["top", "--metrics-url", url, "--once"])
    assert result.exit_code == 1 and f"cannot read {url}" in result.output


class Tmux:
    """A private tmux server (its own socket) running one command in a detached session."""

    def __init__(self, tmp_path: Path, command: str) -> None:
        self.socket = f"llmtap-test-{uuid.uuid4().hex[:8]}"
        self.tmux(
            "-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "150", "-y", "70",
            f"{command}; echo top exited $?; sleep 60",
        )  # fmt: skip

    def tmux(self, *args: str) -> str:
        # the pane's own size, not the COLUMNS/LINES pytest's environment may carry
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=True, env=env
        ).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        return self.wait_screen(lambda screen: text in screen, timeout)

    def wait_screen(self, predicate, timeout: float = 20.0) -> str:
        """The first screen (polled, bounded) that satisfies ``predicate``."""

        def check() -> str | None:
            screen = self.screen()
            return screen if predicate(screen) else None

        try:
            return wait_until(check, timeout, interval=0.2)
        except TimeoutError:
            size = self.tmux("display", "-p", "-t", "top", "#{pane_width}x#{pane_height}").strip()
            raise AssertionError(f"screen ({size}) never matched:\n{self.screen()}") from None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="make test installs tmux (Makefile debs)")
@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_refreshes_in_place_under_tmux_and_quits(tap, tmp_path: Path, quit_key: str) -> None:
    send(tap, 3)
    tap.wait_records(3)
    command = f"{shlex.quote(LLMTAP)} top --metrics-url {tap.metrics_url} --interval 0.3 --window 30"
    term = Tmux(tmp_path, command)
    try:
        screen = term.wait_for("by provider")
        for text in ("requests/s", "spend/min", "p95", "by model", "by app", MODELS[0], MODELS[1]):
            assert text in screen, screen
        send(tap, 5)
        tap.wait_records(8)
        # the same screen, redrawn: 8 requests in total now, and the header still once
        screen = term.wait_screen(lambda screen: _total(screen) == "8")
        assert screen.count("llmtap top") == 1 and screen.count("by provider") == 1
        term.tmux("send-keys", "-t", "top", quit_key)
        term.wait_for("top exited 0")
    finally:
        term.kill()


def _total(screen: str) -> str | None:
    """The 'requests' total on the summary line (the 6th number)."""
    lines = screen.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("requests/s") and i + 1 < len(lines):
            fields = re.split(r"\s{2,}", lines[i + 1].strip())  # "5 ms" is one field
            return fields[5] if len(fields) > 5 else None
    return None


def test_top_is_a_command(tmp_path: Path) -> None:
    out = subprocess.run([LLMTAP, "top", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--metrics-url" in out and "--interval" in out and "--once" in out
