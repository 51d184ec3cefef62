"""llmtap's settings: declared once as mitmproxy options, parsed once into ``Settings``.

``mitmdump -s addons/tap.py --set llmtap_db=...`` and ``llmtap run --db ...`` set the same
options; hooks only ever read the parsed ``Settings``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import exceptions

DEFAULT_UPSTREAM = "https://api.pulze.ai"
FSYNC_POLICIES = ("never", "batch")

#: (option name, type, default, help). The CLI flag is the name without the prefix,
#: with dashes: ``llmtap_metrics_port`` is ``--metrics-port``.
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("llmtap_db", str, "./llmtap.db", "SQLite audit log path; empty disables the audit log."),
    ("llmtap_jsonl", str, "", "Also write each record as one JSON line to this file, or '-' for stdout."),
    ("llmtap_metrics_host", str, "127.0.0.1", "Address of the Prometheus /metrics endpoint."),
    ("llmtap_metrics_port", int, 9464, "Port of the /metrics endpoint; -1 disables it, 0 picks a free port."),
    ("llmtap_otlp_endpoint", str, "", "OTLP endpoint for spans (else OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); none = tracing off."),
    ("llmtap_propagate", bool, False, "Inject llmtap's span context upstream as traceparent (changes the request)."),
    ("llmtap_capture_content", bool, False, "Capture prompt and completion text (audit content table, JSON lines, spans). Off by default."),
    ("llmtap_content_max_chars", int, 16384, "Cap on captured text, in characters, for the prompt and for the completion of an exchange."),
    ("llmtap_fsync", str, "never", "Journal/DB durability: 'never' (OS decides, survives kill -9) or 'batch' (fsync per batch, survives power loss)."),
    ("llmtap_retention_days", int, 0, "Delete audit rows older than this many days; 0 keeps forever."),
    ("llmtap_metric_labels", Sequence[str], [], "Extra metric labels: Pulze-Labels keys, or 'key' for the key fingerprint."),
    ("llmtap_label_limit", int, 50, "Distinct values per metric label before new values fold into 'other'."),
    ("llmtap_key_salt", str, "", "Secret for API-key fingerprints (else LLMTAP_KEY_SALT, else a fixed public salt)."),
    ("llmtap_prices", str, "", "JSON file of model prices (USD per million tokens) merged over the built-in table."),
)


@dataclass(frozen=True)
class Settings:
    db: str = "./llmtap.db"
    jsonl: str = ""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    otlp_endpoint: str = ""
    propagate: bool = False
    capture_content: bool = False
    content_max_chars: int = 16384
    fsync: str = "never"
    retention_days: int = 0
    metric_labels: tuple[str, ...] = field(default_factory=tuple)
    label_limit: int = 50
    key_salt: str = ""
    prices: str = ""

    @classmethod
    def from_options(cls, options: Any) -> Settings:
        """Read and validate the ``llmtap_*`` mitmproxy options; raise ``OptionsError``."""
        values = {name.removeprefix("llmtap_"): getattr(options, name) for name, *_ in OPTIONS}
        values["metric_labels"] = tuple(values["metric_labels"])
        values["key_salt"] = values["key_salt"] or os.environ.get("LLMTAP_KEY_SALT", "")
        capture_env = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "")
        values["capture_content"] = values["capture_content"] or capture_env.lower() == "true"
        settings = cls(**values)
        if settings.fsync not in FSYNC_POLICIES:
            raise exceptions.OptionsError(f"llmtap_fsync must be one of {FSYNC_POLICIES}, not {settings.fsync!r}")
        if settings.retention_days < 0:
            raise exceptions.OptionsError("llmtap_retention_days must be >= 0")
        if settings.label_limit < 1:
            raise exceptions.OptionsError("llmtap_label_limit must be >= 1")
        if settings.content_max_chars < 0:
            raise exceptions.OptionsError("llmtap_content_max_chars must be >= 0")
        return settings

    @property
    def content_cap(self) -> int | None:
        """What the parsers take: the text cap when content capture is on, else None."""
        return self.content_max_chars if self.capture_content else None

    @property
    def otlp_configured(self) -> bool:
        return bool(
            self.otlp_endpoint
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
