"""Which hosts llmtap decrypts in regular and transparent mode: the LLM APIs it meters.

Without a host filter mitmproxy intercepts TLS to every host the app talks to: llmtap's process
would see other APIs' secrets, and apps that pin certificates for other hosts would break. So
in those modes llmtap sets mitmproxy's ``allow_hosts`` to the known LLM API hosts (``KNOWN``,
each with its subdomains) plus the hosts of ``--intercept-host``; every other connection is
tunnelled untouched (the app sees the real server's certificate). ``--intercept-host '*'``
restores intercept-everything; a user's own ``allow_hosts``/``ignore_hosts`` always wins.
Reverse mode needs none of this: the app talks to llmtap on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from llmtap.protocols.providers import PROVIDER_BY_HOST

#: Hosts of LLM APIs llmtap reads (a host here also covers its subdomains).
KNOWN: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            "api.pulze.ai",
            *PROVIDER_BY_HOST,
            "generativelanguage.googleapis.com",
            "openai.azure.com",  # Azure OpenAI: <resource>.openai.azure.com
            "services.ai.azure.com",
            "api.fireworks.ai",
        ]
    )
)

EVERYTHING = "*"


def intercepted(extra: Iterable[str]) -> tuple[str, ...] | None:
    """The hosts to decrypt, or None for every host (``*`` among ``extra``)."""
    extra = [host.strip().lower() for host in extra if host.strip()]
    if EVERYTHING in extra:
        return None
    return tuple(dict.fromkeys([*KNOWN, *extra]))


def mapped_hosts(family_map: Iterable[str]) -> list[str]:
    """The hosts of ``family_map`` entries (``HOST=FAMILY``): llmtap meters them, so it decrypts them."""
    hosts = (entry.partition("=")[0].strip() for entry in family_map)
    return [host for host in hosts if host and not host.startswith("/")]


def allow_patterns(hosts: Iterable[str]) -> list[str]:
    """mitmproxy ``allow_hosts`` regexes (matched against ``host:port``) for ``hosts`` and their
    subdomains."""
    return [rf"^(?:[^:]*\.)?{re.escape(host)}:\d+$" for host in hosts]
