"""``llmtap run``: mitmproxy in-process with the llmtap addon, as ``mitmdump -s`` would run it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mitmproxy import exceptions
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster

from llmtap.capture.addon import LLMTap
from llmtap.capture.lean import LeanMaster


def mode_spec(mode: str, upstream: str) -> str:
    return f"reverse:{upstream}" if mode == "reverse" else mode


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
    """Run until Ctrl-C or SIGTERM; sinks are flushed and closed before this returns.

    ``lean`` runs ``LeanMaster`` (only the addons this mode needs, see ``llmtap.capture.lean``);
    otherwise mitmdump's full addon set.
    """

    async def main() -> int:
        logging.getLogger().setLevel(logging.INFO)
        for noisy in ("tornado", "asyncio", "hpack", "quic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        opts = Options()
        if lean:
            master = LeanMaster(opts, mode)
        else:
            master = DumpMaster(opts, with_termlog=True, with_dumper=False)
        master.addons.add(LLMTap())
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
        except exceptions.OptionsError as exc:
            hint = " (the lean proxy loads only the addons llmtap needs; try --full)" if lean else ""
            print(f"llmtap: {exc}{hint}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        await master.run()
        return 0

    return asyncio.run(main())
