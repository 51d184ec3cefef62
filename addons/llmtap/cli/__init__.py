"""The ``llmtap`` command: run the sidecar, the simulated upstream, the demo and the reports."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

import click

from llmtap import __version__
from llmtap.audit.report import audit, report
from llmtap.cli.prices import prices
from llmtap.cli.top import top
from llmtap.config import DEFAULT_UPSTREAM, OPTIONS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmtap")
def main() -> None:
    """Observability and cost tracking for LLM completion traffic."""


def llmtap_options(command):
    """One CLI flag per ``llmtap_*`` mitmproxy option: ``llmtap_metrics_port`` is ``--metrics-port``."""
    for spec in reversed(OPTIONS):
        flag = "--" + spec.flag
        if spec.typespec is bool:
            option = click.option(flag, spec.field, is_flag=True, help=spec.help)
        elif spec.typespec in (str, int):
            kind = click.Choice(spec.choices) if spec.choices else spec.typespec
            option = click.option(
                flag, spec.field, type=kind, default=spec.default, show_default=bool(spec.default), help=spec.help
            )
        else:  # a sequence: a repeatable flag in the singular
            option = click.option(flag.removesuffix("s"), spec.field, multiple=True, help=spec.help + " Repeatable.")
        command = option(command)
    return command


def _upstream_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An absolute http(s) URL: without a scheme mitmproxy would silently take https."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(
            f"{value!r} is not an http:// or https:// URL; write it with its scheme, "
            f"e.g. --upstream http://{value.split('://')[-1]} (or https://...)"
        )
    return value


@main.command()
@click.option(
    "--upstream",
    default=DEFAULT_UPSTREAM,
    show_default=True,
    callback=_upstream_url,
    help="Upstream API (reverse mode), with its scheme: https://api.pulze.ai, http://127.0.0.1:8000.",
)
@click.option(
    "--mode",
    type=click.Choice(["reverse", "regular"]),
    default="reverse",
    show_default=True,
    help="reverse: apps use llmtap as base URL. regular: apps set HTTPS_PROXY.",
)
@click.option("--listen-host", default="127.0.0.1", show_default=True)
@click.option("--listen-port", default=8080, show_default=True, type=int)
@click.option("--confdir", default="", help="mitmproxy confdir (CA certificates); default ~/.mitmproxy.")
@click.option(
    "--set",
    "extra_sets",
    multiple=True,
    metavar="OPTION=VALUE",
    help="Any other mitmproxy option, as with mitmdump --set. Repeatable.",
)
@click.option(
    "--lean/--full",
    default=True,
    show_default=True,
    help="lean: only the mitmproxy addons this mode needs (faster). full: all of mitmdump's.",
)
@llmtap_options
def run(
    upstream: str,
    mode: str,
    listen_host: str,
    listen_port: int,
    confdir: str,
    extra_sets: tuple[str, ...],
    lean: bool,
    **llmtap_options,
) -> None:
    """Run the sidecar (mitmproxy with the llmtap addon) in the foreground."""
    from llmtap.capture.server import run_proxy

    for name, value in llmtap_options.items():
        if isinstance(value, tuple):  # repeatable flags; mitmproxy's sequence options take lists
            llmtap_options[name] = list(value)
    code = run_proxy(
        upstream=upstream,
        mode=mode,
        listen_host=listen_host,
        listen_port=listen_port,
        confdir=confdir,
        extra_sets=extra_sets,
        lean=lean,
        options={f"llmtap_{k}": v for k, v in llmtap_options.items()},
    )
    sys.exit(code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--chunk-delay", default=0.02, show_default=True, type=float, help="Seconds between stream chunks.")
@click.option("--first-byte-delay", default=0.0, show_default=True, type=float)
@click.option(
    "--fault-rate", default=0.0, show_default=True, type=float, help="Share of requests given a random fault."
)
def simulate(host: str, port: int, chunk_delay: float, first_byte_delay: float, fault_rate: float) -> None:
    """Run the simulated upstream APIs: Pulze, OpenAI, Azure, OpenRouter, Anthropic, Gemini."""
    from llmtap.devtools.simulator import run_simulator

    run_simulator(host, port, chunk_delay, first_byte_delay, fault_rate=fault_rate)


@main.command()
@click.option("--base-url", required=True, help="Where the app would point, e.g. http://127.0.0.1:8080/v1")
@click.option("--count", default=40, show_default=True, type=int, help="Requests to send; 0 = forever.")
@click.option("--interval", default=0.0, show_default=True, type=float, help="Seconds between requests.")
@click.option("--api-key", default="sk-demo-not-a-real-key", envvar="LLMTAP_DEMO_API_KEY")
@click.option("--seed", default=1, type=int)
def traffic(base_url: str, count: int, interval: float, api_key: str, seed: int) -> None:
    """Send mixed completion traffic (chat and text, streamed and not, some faults) with the openai SDK."""
    from llmtap.devtools.traffic import drive

    summary = drive(base_url, api_key=api_key, count=count, interval=interval, seed=seed)
    click.echo(summary.describe())


@main.command()
@click.option("--count", default=40, show_default=True, type=click.IntRange(min=1), help="Demo requests to send.")
@click.option("--exit", "exit_after", is_flag=True, help="Exit after the traffic instead of waiting for Ctrl-C.")
@click.option("--dir", "workdir", default="demo-out", show_default=True, help="Where the DB and logs go.")
@click.option("--listen-port", type=click.IntRange(1, 65535), help="Proxy port  [default: a free port]")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="/metrics port  [default: a free port]")
def demo(count: int, exit_after: bool, workdir: str, listen_port: int | None, metrics_port: int | None) -> None:
    """Simulated Pulze upstream + llmtap + traffic; prints where metrics, DB and report are."""
    from llmtap.devtools.demo import run_demo

    sys.exit(
        run_demo(
            count=count, exit_after=exit_after, workdir=workdir, listen_port=listen_port, metrics_port=metrics_port
        )
    )


main.add_command(report)
main.add_command(audit)
main.add_command(prices)
main.add_command(top)


if __name__ == "__main__":
    main()
