"""``llmtap run``: mitmproxy in-process with the llmtap addon, as ``mitmdump -s`` would run it."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mitmproxy import exceptions
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster

from llmtap.capture.addon import LLMTap
from llmtap.capture.drain import Drain, cancel_quietly, drain
from llmtap.capture.intercept import apply_intercept_hosts
from llmtap.capture.lean import LeanMaster
from llmtap.config import Settings, SettingsError


def mode_spec(mode: str, upstream: str) -> str:
    return f"reverse:{upstream}" if mode == "reverse" else mode


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (bound the way asyncio binds), or None if it can."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None  # mitmproxy reports a bad host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the address is already in use"
                return None
    return None


def _llmtap_port_advice(record: logging.LogRecord) -> bool:
    """Replace mitmproxy's ``--mode ...@PORT`` advice (not llmtap syntax) with llmtap's flag."""
    message = record.getMessage()
    if "Try specifying a different port" in message:
        record.msg = message.split("\nTry specifying", 1)[0] + "\nChoose another port with --listen-port PORT."
        record.args = ()
    return True


def run_proxy(
    *,
    upstream: str,
    mode: str,
    listen_host: str,
    listen_port: int,
    confdir: str,
    extra_sets: Sequence[str],
    options: Mapping[str, Any],
    lean: bool = True,
) -> int:
    """Run until Ctrl-C or SIGTERM, then drain (``llmtap.capture.drain``); sinks are flushed and
    closed before this returns.

    ``lean`` runs ``LeanMaster`` (only the addons this mode needs, see ``llmtap.capture.lean``);
    otherwise mitmdump's full addon set.
    """

    taken = port_taken(listen_host, listen_port)
    if taken:
        print(
            f"llmtap: cannot listen on {listen_host}:{listen_port}: {taken}. "
            f"Choose another port with --listen-port PORT (0 picks a free one), or stop what holds it.",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("mitmproxy.addons.proxyserver").addFilter(_llmtap_port_advice)
        for noisy in ("tornado", "asyncio", "hpack", "quic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        opts = Options()
        if lean:
            master = LeanMaster(opts, mode)
        else:
            master = DumpMaster(opts, with_termlog=True, with_dumper=False)
        tap, drainer = LLMTap(), Drain()
        master.addons.add(tap, drainer)
        try:
            if confdir:
                opts.update(confdir=confdir)
            opts.update(
                # lazy: connect upstream once the request is read, so that a refused or failed
                # upstream connection still produces a flow, an error hook and a record
                connection_strategy="lazy" if mode == "reverse" else "eager",
                mode=[mode_spec(mode, upstream)],
                listen_host=listen_host,
                listen_port=listen_port,
                termlog_verbosity="warn",
                **options,
            )
            if extra_sets:
                opts.set(*extra_sets)
            apply_intercept_hosts(opts, Settings.from_options(opts))
        except (exceptions.OptionsError, SettingsError) as exc:
            # only an option the lean master does not know may be one of mitmdump's full set
            unknown = str(exc).startswith("Unknown option")
            hint = " (the lean proxy loads only the addons llmtap needs; try --full)" if lean and unknown else ""
            print(f"llmtap: {exc}{hint}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task] = []

        async def stop() -> None:
            await drain(drainer, lambda: len(tap.open_flows), tap.settings.stop_grace)
            master.shutdown()

        def on_signal() -> None:
            if stopping:  # a second Ctrl-C: stop now (what is open is still recorded)
                master.shutdown()
            else:
                stopping.append(loop.create_task(stop()))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        await master.run()
        await cancel_quietly()
        return 0

    return asyncio.run(main())
