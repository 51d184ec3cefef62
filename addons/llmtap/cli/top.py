"""``llmtap top``: a live terminal view of a running sidecar, read from its ``/metrics``.

Refreshes in place every ``--interval`` seconds; ``q`` or Ctrl-C quits. Rates and latency
percentiles cover the last ``--window`` seconds (until that much has been seen: since ``top``
started); totals are since the sidecar started.
"""

from __future__ import annotations

import contextlib
import select
import sys
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime

import click

from llmtap.cli.live import DIMENSIONS, Snapshot, View, scrape, view

TOP_ROWS = 8


@click.command()
@click.option(
    "--metrics-url",
    default="http://127.0.0.1:9464/metrics",
    show_default=True,
    help="The sidecar's /metrics endpoint (llmtap run --metrics-host/--metrics-port).",
)
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds per refresh.")
@click.option(
    "--window", default=60.0, show_default=True, type=click.FloatRange(min=1), help="Seconds the rates cover."
)
@click.option("--once", is_flag=True, help="Print one view (two scrapes --interval apart) and exit, for scripts.")
def top(metrics_url: str, interval: float, window: float, once: bool) -> None:
    """Live view of a running sidecar: requests/s, errors, p50/p95, spend per minute, by model/app/provider."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if once:
        first = _scrape_or_exit(metrics_url)
        time.sleep(interval)
        console.print(render(metrics_url, view(first, _scrape_or_exit(metrics_url)), None))
        return
    snapshots: deque[Snapshot] = deque()
    with _keys() as read_key, Live(console=console, auto_refresh=False, vertical_overflow="crop") as live:
        try:
            while True:
                error = None
                try:
                    snapshot = scrape(metrics_url)
                except (OSError, ValueError) as exc:
                    error = f"cannot read {metrics_url}: {exc}"
                else:
                    snapshots.append(snapshot)
                    while len(snapshots) > 2 and snapshots[1].at <= snapshot.at - window:
                        snapshots.popleft()
                current = view(snapshots[0], snapshots[-1]) if len(snapshots) > 1 else None
                live.update(render(metrics_url, current, error), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if read_key(left) in ("q", "Q"):
                        return
        except KeyboardInterrupt:
            return


def _scrape_or_exit(url: str) -> Snapshot:
    try:
        return scrape(url)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {url}: {exc} (is llmtap running with /metrics on?)") from exc


@contextlib.contextmanager
def _keys() -> Iterator:
    """A ``read_key(timeout)`` that returns one key press or None; the terminal in cbreak mode."""
    stdin = sys.stdin
    if not stdin.isatty():

        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # keys arrive one by one; Ctrl-C still interrupts

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return stdin.read(1) if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _usd(value: float) -> str:
    return f"${value:,.4f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms"


def render(url: str, v: View | None, error: str | None):
    from rich.console import Group as RenderGroup
    from rich.table import Table
    from rich.text import Text

    now = datetime.now().strftime("%H:%M:%S")
    parts = [Text(f"llmtap top  {url}  {now}   (q or Ctrl-C quits)", style="bold")]
    if error:
        parts.append(Text(error, style="red"))
    if v is None:
        parts.append(Text("waiting for a second scrape ..."))
        return RenderGroup(*parts)
    summary = Table(title=f"last {v.window_s:.0f} s", title_justify="left", box=None, pad_edge=False)
    for header in ("requests/s", "errors/s", "p50", "p95", "spend/min", "requests", "errors", "spend", "unpriced"):
        summary.add_column(header, justify="right")
    summary.add_row(
        f"{v.requests_per_s:,.2f}",
        f"{v.errors_per_s:,.2f}",
        _ms(v.p50_s),
        _ms(v.p95_s),
        _usd(v.spend_per_min),
        f"{v.total_requests:,.0f}",
        f"{v.total_errors:,.0f}",
        _usd(v.total_spend),
        f"{v.unknown_cost:,.0f}",
    )
    parts.append(summary)
    parts.append(
        Text(
            "requests, errors, spend: since the sidecar started; unpriced: successful exchanges whose cost is "
            "unknown (not counted as $0)",
            style="dim",
        )
    )
    for dimension in DIMENSIONS:
        table = Table(title=f"by {dimension}", title_justify="left")
        table.add_column(dimension)
        for header in ("req/s", "err/s", "spend/min", "requests", "spend"):
            table.add_column(header, justify="right")
        groups = sorted(v.groups[dimension].items(), key=lambda kv: (-kv[1].total_requests, kv[0]))
        for name, g in groups[:TOP_ROWS]:
            rate = (lambda x: x / v.window_s) if v.window_s else (lambda _x: 0.0)
            table.add_row(
                name,
                f"{rate(g.requests):,.2f}",
                f"{rate(g.errors):,.2f}",
                _usd(rate(g.spend) * 60),
                f"{g.total_requests:,.0f}",
                _usd(g.total_spend),
            )
        if len(groups) > TOP_ROWS:
            table.caption = f"{len(groups) - TOP_ROWS} more"
        parts.append(table)
    return RenderGroup(*parts)
