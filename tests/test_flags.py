"""Flags that guide: every refused value says which flag, what was given and what would work."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from click.testing import CliRunner
from conftest import LLMTAP, start_tap, wait_until

from llmtap.cli import main


def run_llmtap(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``llmtap run`` that must refuse to start: a fixed timeout bounds a start that wrongly succeeds."""
    return subprocess.run(
        [LLMTAP, "run", "--db", "", "--metrics-port", "-1", "--confdir", str(tmp_path / "conf"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_upstream_without_a_scheme_is_refused_with_the_fix() -> None:
    result = CliRunner().invoke(main, ["run", "--upstream", "127.0.0.1:8000"])
    assert result.exit_code == 2
    assert "--upstream" in result.output and "'127.0.0.1:8000'" in result.output
    assert "--upstream http://127.0.0.1:8000" in result.output


def test_upstream_with_another_scheme_is_refused() -> None:
    result = CliRunner().invoke(main, ["run", "--upstream", "ftp://example.com"])
    assert result.exit_code == 2 and "http:// or https://" in result.output


def test_bad_fsync_names_option_value_and_choices_without_a_full_hint(tmp_path: Path) -> None:
    result = run_llmtap(tmp_path, "--listen-port", "0", "--set", "llmtap_fsync=sometimes")
    assert result.returncode == 2
    assert "--fsync" in result.stderr and "'sometimes'" in result.stderr and "never, batch" in result.stderr
    assert "--full" not in result.stderr


def test_bad_fsync_flag_lists_the_choices() -> None:
    result = CliRunner().invoke(main, ["run", "--fsync", "sometimes"])
    assert result.exit_code == 2 and "'sometimes'" in result.output and "never" in result.output


def test_prices_without_an_output_price_says_what_an_entry_needs(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"acme/model-x": {"input": 1.0}}))
    result = run_llmtap(tmp_path, "--listen-port", "0", "--prices", str(prices))
    assert result.returncode == 2
    assert "--prices" in result.stderr and "'output'" in result.stderr and '"input": USD' in result.stderr
    assert "--full" not in result.stderr


def test_an_option_only_full_mitmdump_knows_gets_the_full_hint(tmp_path: Path) -> None:
    result = run_llmtap(tmp_path, "--listen-port", "0", "--set", "anticache=true")
    assert result.returncode == 2 and "try --full" in result.stderr


def test_a_taken_listen_port_names_the_llmtap_flag(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = run_llmtap(tmp_path, "--upstream", "http://127.0.0.1:9", "--listen-port", str(port))
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "--listen-port" in result.stderr
    assert "--mode" not in result.stderr


def test_enum_options_show_their_choices_in_help() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    assert "--fsync [never|batch]" in result.output and "--mode [reverse|regular]" in result.output


def test_a_taken_metrics_port_is_named_in_the_banner_and_traffic_still_flows(tmp_path: Path, simulator) -> None:
    """Fail-open: the proxy serves without /metrics, and its banner says which flag to change."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        tap = start_tap(tmp_path, simulator.url, "--metrics-port", str(port))
        try:
            banner = wait_until(lambda: "listening:" in tap.output() and tap.output())
            assert f"NOT served: 127.0.0.1:{port}" in banner and "--metrics-port" in banner
            client = tap.client()
            client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "hi"}])
            client.close()
            assert len(tap.wait_records(1)) == 1
        finally:
            tap.stop()
