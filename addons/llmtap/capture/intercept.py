"""Regular and transparent mode decrypt only the LLM APIs llmtap meters (``llmtap.protocols.hosts``,
``--intercept-host``, and the hosts a user maps to a family with ``--family-map``).

``apply_intercept_hosts`` sets mitmproxy's ``allow_hosts`` once, before traffic flows (``llmtap
run`` calls it before the proxy starts; the addon's ``running`` hook covers ``mitmdump -s``).
It leaves the options alone in reverse and upstream mode, when the user set ``allow_hosts`` or
``ignore_hosts`` themselves, and for ``--intercept-host '*'``.
"""

from __future__ import annotations

from typing import Any

from llmtap.config import Settings
from llmtap.protocols.hosts import allow_patterns, intercepted, mapped_hosts

#: The modes in which the app's own TLS connections reach llmtap.
FILTERED_MODES = ("regular", "transparent", "local", "wireguard")


def filtered_mode(options: Any) -> bool:
    modes = list(options.mode or ["regular"])
    return any(mode.split(":", 1)[0].split("@", 1)[0] in FILTERED_MODES for mode in modes)


def apply_intercept_hosts(options: Any, settings: Settings) -> bool:
    """Set ``allow_hosts`` to the metered hosts when llmtap should; True if it did."""
    if not filtered_mode(options) or options.allow_hosts or options.ignore_hosts:
        return False
    hosts = intercepted([*settings.intercept_hosts, *mapped_hosts(settings.family_map)])
    if hosts is None:
        return False
    options.update(allow_hosts=allow_patterns(hosts))
    return True


def intercept_summary(options: Any) -> str:
    """What the banner says is decrypted."""
    if options.allow_hosts:
        hosts = [_host_of(pattern) for pattern in options.allow_hosts]
        shown = ", ".join(hosts[:6]) + (f", … ({len(hosts)} hosts)" if len(hosts) > 6 else "")
        return f"TLS to {shown}; every other host tunnelled untouched"
    if options.ignore_hosts:
        return f"every host but {', '.join(options.ignore_hosts)} (ignore_hosts)"
    return "TLS to EVERY host (--intercept-host '*')"


def _host_of(pattern: str) -> str:
    prefix, suffix = r"^(?:[^:]*\.)?", r":\d+$"
    if pattern.startswith(prefix) and pattern.endswith(suffix):
        return pattern[len(prefix) : -len(suffix)].replace("\\", "")
    return pattern
