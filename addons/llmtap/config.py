"""llmtap's settings, declared once: each field of ``Settings`` is one option.

``mitmdump -s addons/tap.py --set llmtap_db=...`` and ``llmtap run --db ...`` set the same
options (``OPTIONS`` is derived from the fields); hooks only ever read the parsed ``Settings``.
The writer process receives the same ``Settings`` as one JSON document (``to_json``).
Nothing here imports mitmproxy: a bad value raises ``SettingsError``, which the addon turns
into mitmproxy's ``OptionsError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DEFAULT_UPSTREAM = "https://api.pulze.ai"


class SettingsError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


def _option(default: Any, help_text: str, *, choices: tuple[str, ...] = (), minimum: int | None = None) -> Any:
    return field(default=default, metadata={"help": help_text, "choices": choices, "minimum": minimum})


@dataclass(frozen=True)
class Settings:
    """Every llmtap option, with its default and help; ``llmtap_<name>`` in mitmproxy."""

    db: str = _option(
        "./llmtap.db",
        "Audit log: a SQLite file path, or a PostgreSQL URL (postgresql://..., service=...); empty disables it.",
    )
    journal_dir: str = _option(
        "", "Directory of the audit journal (a volume that outlives the pod); required with a PostgreSQL --db."
    )
    journal_max_bytes: int = _option(
        1 << 30, "Bound on the audit journal's unapplied backlog; past it records are dropped and counted.", minimum=0
    )
    instance: str = _option("", "Display name of this llmtap, recorded on every audit row (default: the host name).")
    jsonl: str = _option("", "Also write each record as one JSON line to this file, or '-' for stdout.")
    metrics_host: str = _option("127.0.0.1", "Address of the Prometheus /metrics endpoint.")
    metrics_port: int = _option(9464, "Port of the /metrics endpoint; -1 disables it, 0 picks a free port.", minimum=-1)
    otlp_endpoint: str = _option(
        "", "OTLP endpoint for spans (else OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); none = tracing off."
    )
    otlp_logs: bool = _option(
        False,
        "Also send each audit row as an OTLP log record, at least once (OTEL_EXPORTER_OTLP_[LOGS_]* configure it; needs the audit log).",
    )
    propagate: bool = _option(False, "Inject llmtap's span context upstream as traceparent (changes the request).")
    capture_content: bool = _option(
        False, "Capture prompt and completion text (audit content table, JSON lines, spans). Off by default."
    )
    content_max_chars: int = _option(
        16384,
        "Cap on captured text, in characters, for the prompt and for the completion of an exchange.",
        minimum=0,
    )
    fsync: str = _option(
        "never",
        "Journal/DB durability: 'never' (OS decides, survives kill -9) or 'batch' (fsync per batch, survives power loss).",
        choices=("never", "batch"),
    )
    retention_days: int = _option(0, "Delete audit rows older than this many days; 0 keeps forever.", minimum=0)
    rollup_retention_days: int = _option(
        0,
        "Delete hourly rollups (what reports read) older than this many days; 0 keeps forever. "
        "At least retention_days: reports keep answering after the rows are gone.",
        minimum=0,
    )
    metric_labels: tuple[str, ...] = _option(
        (),
        "Extra metric labels: Pulze-Labels keys, or 'key' for the key fingerprint. The audit log's hourly "
        "rollups keep the same labels.",
    )
    label_limit: int = _option(50, "Distinct values per metric label before new values fold into 'other'.", minimum=1)
    key_salt: str = _option("", "Secret for API-key fingerprints (else LLMTAP_KEY_SALT, else a fixed public salt).")
    prices: str = _option(
        "", "YAML or JSON file of your own model prices (USD per million tokens); they override the price database."
    )
    price_data: str = _option(
        "", "A newer genai-prices data file (its own JSON format) to price from instead of the bundled data; offline."
    )
    inject_stream_usage: bool = _option(
        False,
        "Add stream_options.include_usage to streaming chat requests that lack it, so streams get token counts "
        "(changes the request; off by default).",
    )
    intercept_hosts: tuple[str, ...] = _option(
        (),
        "Regular/transparent mode: also decrypt TLS to this host (and its subdomains) besides the known "
        "LLM APIs; '*' decrypts every host. Other hosts are tunnelled untouched.",
    )
    parse_memory_bytes: int = _option(
        16 << 20,
        "Memory llmtap may hold to parse one exchange (a partial stream line, a kept body member); "
        "past it, that part is skipped.",
        minimum=4096,
    )
    parse_scan_bytes: int = _option(
        64 << 20,
        "Decoded bytes llmtap reads of one response; past it, parsing stops for that exchange "
        "(parse_problem on the record) while every byte still passes untouched.",
        minimum=4096,
    )
    stop_grace: int = _option(
        8,
        "On SIGTERM/Ctrl-C, seconds in-flight exchanges get to finish (new requests are still served, then "
        "their connections closed); what is still open is then recorded as proxy_shutdown.",
        minimum=0,
    )
    token_ceiling: int = _option(
        10**8, "A token count above this (per exchange and type) is an anomaly, not usage.", minimum=1
    )
    cost_ceiling_usd: int = _option(
        1000, "A cost above this many USD for one exchange is an anomaly: the cost becomes unknown.", minimum=1
    )
    family_map: tuple[str, ...] = _option(
        (),
        "Read a gateway's traffic as one protocol family: HOST=FAMILY or /PATH/PREFIX=FAMILY (families: "
        "chat_completions, openai_responses, embeddings, azure_openai, anthropic_messages, gemini).",
    )

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Settings:
        """Validated settings from option values by field name (the environment fills the gaps)."""
        values = dict(values)
        for name in _SEQUENCE_FIELDS:
            values[name] = tuple(values.get(name) or ())
        for entry in values["family_map"]:
            key, _, family = entry.partition("=")
            if not key.strip() or not family.strip():
                raise SettingsError(f"llmtap_family_map (--family-map): {entry!r} is not HOST=FAMILY or /PREFIX=FAMILY")
        values["key_salt"] = values.get("key_salt") or os.environ.get("LLMTAP_KEY_SALT", "")
        capture_env = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "")
        values["capture_content"] = bool(values.get("capture_content")) or capture_env.lower() == "true"
        settings = cls(**values)
        if settings.db_is_server and not settings.journal_dir:
            raise SettingsError("llmtap_journal_dir (--journal-dir) is required with a PostgreSQL --db")
        rollup_days, row_days = settings.rollup_retention_days, settings.retention_days
        if rollup_days and not (row_days and rollup_days >= row_days):
            raise SettingsError(
                f"llmtap_rollup_retention_days (--rollup-retention-days): {rollup_days} would delete rollups of "
                f"rows still kept (retention_days {row_days or 'forever'}); use 0 or at least retention_days"
            )
        if settings.otlp_logs and not settings.db:
            raise SettingsError("llmtap_otlp_logs (--otlp-logs): the log records come from the audit log; set --db")
        for option in OPTIONS:
            value = getattr(settings, option.field)
            if option.choices and value not in option.choices:
                raise SettingsError(
                    f"{option.name} (--{option.flag}): {value!r} is not one of {', '.join(option.choices)}"
                )
            if option.minimum is not None and value < option.minimum:
                raise SettingsError(f"{option.name} (--{option.flag}): {value!r} is below {option.minimum}")
        return settings

    @classmethod
    def from_options(cls, options: Any) -> Settings:
        """Read and validate the ``llmtap_*`` mitmproxy options."""
        return cls.from_values({option.field: getattr(options, option.name) for option in OPTIONS})

    def to_json(self) -> str:
        """The settings for the writer process: argv is public, so never the key salt."""
        return json.dumps({**dataclasses.asdict(self), "key_salt": ""})

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls.from_values(json.loads(text))

    @property
    def content_cap(self) -> int | None:
        """What the parsers take: the text cap when content capture is on, else None."""
        return self.content_max_chars if self.capture_content else None

    @property
    def db_is_server(self) -> bool:
        """True when ``db`` names a PostgreSQL server rather than a SQLite file."""
        return is_server_url(self.db)

    @property
    def journal_base(self) -> str:
        """The prefix of the journal's files: ``<base>.journal.<gen>``, ``<base>.journal.lock``.

        With SQLite the journal sits next to the database file; with a server URL in
        ``journal_dir``.
        """
        if self.journal_dir:
            return os.path.join(self.journal_dir, "llmtap")
        return self.db

    @property
    def db_display(self) -> str:
        """``db`` as it may be printed: a URL without its password."""
        return redact_url(self.db)

    @property
    def otlp_configured(self) -> bool:
        return bool(
            self.otlp_endpoint
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )


def is_server_url(db: str) -> bool:
    """A PostgreSQL connection string (URL or key=value conninfo) rather than a file path."""
    text = db.strip()
    return text.startswith(("postgresql://", "postgres://")) or (
        "=" in text and text.split("=", 1)[0].strip() in _CONNINFO_KEYS
    )


_CONNINFO_KEYS = frozenset({"service", "host", "hostaddr", "dbname", "user", "port"})


def redact_url(db: str) -> str:
    """A connection string without its password (URL userinfo or ``password=``)."""
    import re

    text = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", db)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text)


class Option(NamedTuple):
    """One ``Settings`` field as a mitmproxy option and a CLI flag."""

    name: str  # the mitmproxy option: llmtap_metrics_port
    field: str  # the Settings field: metrics_port
    flag: str  # the CLI flag without dashes: metrics-port
    typespec: Any  # what mitmproxy's loader.add_option takes
    default: Any
    help: str
    choices: tuple[str, ...]
    minimum: int | None


def _options() -> tuple[Option, ...]:
    found = []
    for f in dataclasses.fields(Settings):
        typespec = {"str": str, "int": int, "bool": bool, "tuple[str, ...]": Sequence[str]}[f.type]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        found.append(
            Option(
                f"llmtap_{f.name}",
                f.name,
                f.name.replace("_", "-"),
                typespec,
                default,
                f.metadata["help"],
                f.metadata["choices"],
                f.metadata["minimum"],
            )
        )
    return tuple(found)


_SEQUENCE_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.type == "tuple[str, ...]")

#: Every option, in declaration order.
OPTIONS: tuple[Option, ...] = _options()
