"""A lean mitmproxy master for ``llmtap run``: only the addons its two modes need.

``mitmdump`` loads ~35 built-in addons, and mitmproxy calls every hook (and an ``update``
hook after each one) on every addon in turn, through a generator and a context manager per
addon, whether or not the addon implements it. Profiled here, that dispatch was about a third
of a bare reverse proxy's CPU, spent on addons a sidecar never uses (playback, map-local,
sticky cookies, anticache, save, ...).

The lean master keeps exactly the addons that act on traffic in reverse and regular mode
with default options, so what goes over the wire is byte-for-byte what ``mitmdump`` sends:

- ``Core``, ``Proxyserver``, ``NextLayer``, ``ErrorCheck``, ``TermLog``: the proxy itself,
  option checks, startup errors, log output;
- ``TlsConfig``: TLS to HTTPS upstreams, and the CA that regular mode intercepts with;
- ``Block``: refuses clients from public addresses unless allowed (``block_global``);
- ``DisableH2C``: strips h2c upgrade requests mitmproxy cannot proxy;
- ``UpdateAltSvc``: keeps reverse-mode clients from being sent around the proxy;
- regular mode only: ``ProxyAuth`` (``--set proxyauth=...``) and ``Onboarding``
  (http://mitm.it serves the CA certificate to devices being set up).

Every other addon is opt-in by an option; its options then do not exist, so ``--set`` of one
fails at startup with "Unknown option" (and a hint to use ``--full``) instead of being ignored.

``LeanAddonManager`` then dispatches each hook only to the addons that define it, looked up
once per hook name rather than on every event, with the same semantics as mitmproxy's own
``trigger_event``: addons in chain order, sync or async hooks, an exception logged and the
next addon still called, ``AddonHalt`` stopping the chain.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    onboarding,
    proxyauth,
    proxyserver,
    termlog,
    tlsconfig,
    update_alt_svc,
)
from mitmproxy.master import Master
from mitmproxy.options import Options


def lean_addons(mode: str) -> list[Any]:
    """The built-in addons ``llmtap run`` needs in ``mode`` ("reverse" or "regular")."""
    addons: list[Any] = [
        core.Core(),
        block.Block(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        disable_h2c.DisableH2C(),
        update_alt_svc.UpdateAltSvc(),
    ]
    if mode == "regular":
        addons += [proxyauth.ProxyAuth(), onboarding.Onboarding()]
    return addons + [errorcheck.ErrorCheck()]


class LeanAddonManager(addonmanager.AddonManager):
    """``AddonManager`` whose event dispatch skips addons that lack the hook.

    The hook table is rebuilt whenever an addon is added or removed (hooks are methods, as
    in every mitmproxy addon). Addons with child addons (an ``addons`` attribute, e.g. a
    script loader) may change their children at any time, so they are never cached: they go
    through mitmproxy's own dispatch.
    """

    def __init__(self, master: Master) -> None:
        super().__init__(master)
        self._hooks: dict[str, list[tuple[Any, Callable[..., Any] | None]]] = {}

    def register(self, addon: Any) -> Any:
        self._hooks.clear()
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        self._hooks.clear()
        super().remove(addon)

    def clear(self) -> None:
        self._hooks.clear()
        super().clear()

    def _hooks_for(self, name: str) -> list[tuple[Any, Callable[..., Any] | None]]:
        """``(addon, hook)`` in chain order; hook None means "dispatch the mitmproxy way"."""
        table = self._hooks.get(name)
        if table is None:
            table = []
            for addon in self.chain:
                if hasattr(addon, "addons"):
                    table.append((addon, None))
                    continue
                func = getattr(addon, name, None)
                if func is not None and callable(func):
                    table.append((addon, func))
                elif func is not None and not inspect.ismodule(func):  # as mitmproxy: log, skip
                    addonmanager.logger.error(f"Addon error: Addon handler {name} ({addon}) not callable")
            self._hooks[name] = table
        return table

    async def trigger_event(self, event: hooks.Hook) -> None:
        table = self._hooks_for(event.name)
        if not table:
            return
        args = event.args()
        for addon, func in table:
            try:
                if func is None:
                    with addonmanager.safecall():
                        await self.invoke_addon(addon, event)
                    continue
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:  # as mitmproxy's safecall: log it, go on with the next addon
                addonmanager.logger.error(f"Addon error: {exc}", exc_info=(type(exc), exc, exc.__traceback__))

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        message = event.args()[0]
        if isinstance(message, flow.Flow) and self._hooks_for(hooks.UpdateHook.name):
            await self.trigger_event(hooks.UpdateHook([message]))


class LeanMaster(Master):
    """A ``Master`` with ``lean_addons(mode)`` and the lean dispatcher; add llmtap's addon to it."""

    def __init__(self, options: Options, mode: str, with_termlog: bool = True) -> None:
        super().__init__(options, with_termlog=False)
        self.options.changed.disconnect(self.addons._configure_all)
        self.addons = LeanAddonManager(self)
        if with_termlog:
            self._termlog_addon = termlog.TermLog()
            self.addons.add(self._termlog_addon)
        self.addons.add(*lean_addons(mode))
