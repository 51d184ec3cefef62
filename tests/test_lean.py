"""The lean master (``llmtap run``'s default): its addon set, its dispatch, and identical traffic."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LLMTAP, REPO, free_port, start_tap
from mitmproxy import exceptions
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from llmtap.capture.lean import LeanMaster

sys.path.insert(0, str(REPO / "bench"))
import identical

NEEDED = {"core", "block", "proxyserver", "nextlayer", "tlsconfig", "disableh2c", "updatealtsvc", "errorcheck"}
OPT_IN = {
    "save",
    "savehar",
    "maplocal",
    "mapremote",
    "modifybody",
    "modifyheaders",
    "stickycookie",
    "stickyauth",
    "anticache",
    "anticomp",
    "serverplayback",
    "clientplayback",
    "script",
    "blocklist",
    "upstreamauth",
}


def with_master(mode: str, body):
    """Run ``body(master)`` with a LeanMaster on a fresh event loop (a Master needs one)."""

    async def main():
        return await body(LeanMaster(Options(), mode, with_termlog=False))

    return asyncio.run(main())


class Recorder:
    """A test addon that notes each call; can fail or halt the chain."""

    def __init__(self, name: str, calls: list[str], fail: bool = False, halt: bool = False) -> None:
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt

    def request(self, flow) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise ValueError("boom")
        if self.halt:
            raise exceptions.AddonHalt()

    async def response(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}:async")


@pytest.mark.parametrize("mode, extra", [("reverse", set()), ("regular", {"proxyauth", "onboarding"})])
def test_lean_master_loads_only_what_the_mode_needs(mode, extra) -> None:
    async def body(master):
        return set(master.addons.lookup)

    names = with_master(mode, body)
    assert NEEDED | extra <= names
    assert not names & OPT_IN
    assert mode == "regular" or not names & {"proxyauth", "onboarding"}


def test_hooks_run_in_chain_order_errors_are_logged_and_halt_stops(caplog) -> None:
    calls: list[str] = []

    async def body(master):
        master.addons.add(
            Recorder("a", calls),
            Recorder("b", calls, fail=True),
            Recorder("c", calls),
            Recorder("d", calls, halt=True),
            Recorder("e", calls),
        )
        await master.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))

    with caplog.at_level(logging.ERROR):
        with_master("reverse", body)
    assert calls == ["a", "b", "c", "d"]
    assert "Addon error: boom" in caplog.text


def test_async_hooks_are_awaited_and_new_addons_are_dispatched_to() -> None:
    calls: list[str] = []

    async def body(master):
        flow = tflow.tflow(resp=True)
        master.addons.add(Recorder("a", calls))
        await master.addons.handle_lifecycle(HttpResponseHook(flow))
        master.addons.add(Recorder("late", calls))  # the hook table must not be stale
        await master.addons.handle_lifecycle(HttpResponseHook(flow))
        master.addons.remove(master.addons.get("a"))
        await master.addons.handle_lifecycle(HttpResponseHook(flow))

    with_master("reverse", body)
    assert calls == ["a:async", "a:async", "late:async", "late:async"]


def test_update_hook_follows_a_flow_hook_when_an_addon_listens() -> None:
    seen: list[object] = []

    class Listener:
        def update(self, flows) -> None:
            seen.append(flows)

    async def body(master):
        master.addons.add(Listener())
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        return flow

    flow = with_master("reverse", body)
    assert seen == [[flow]]


def test_option_of_an_addon_not_loaded_fails_with_a_hint(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            LLMTAP,
            "run",
            "--listen-port",
            str(free_port()),
            "--metrics-port",
            "-1",
            "--db",
            "",
            "--confdir",
            str(tmp_path / "conf"),
            "--set",
            "anticache=true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "anticache" in done.stderr and "--full" in done.stderr


def test_lean_and_full_proxies_send_byte_identical_traffic(tmp_path: Path) -> None:
    with identical.EchoUpstream() as echo:
        taps = {}
        try:
            for flag in ("--lean", "--full"):
                workdir = tmp_path / flag.strip("-")
                workdir.mkdir()
                taps[flag] = start_tap(workdir, echo.url, flag)
            assert identical.compare({flag: tap.port for flag, tap in taps.items()}) == []
        finally:
            for tap in taps.values():
                tap.stop()


def test_addons_with_children_are_dispatched_the_mitmproxy_way() -> None:
    calls: list[str] = []

    class Parent:
        def __init__(self) -> None:
            self.addons = [Recorder("child", calls)]

        def request(self, flow) -> None:
            calls.append("parent")

    async def body(master):
        parent = Parent()
        master.addons.add(parent)
        await master.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        parent.addons.append(Recorder("later-child", calls))  # children may change at any time
        await master.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))

    with_master("reverse", body)
    assert calls == ["parent", "child", "parent", "child", "later-child"]
