"""Tables and PASS/FAIL lines for the bench results (plain text, also valid Markdown)."""

from __future__ import annotations

from collections.abc import Sequence

from throughput import Cell

#: The issue's targets: goals the bench reports on, not test assertions.
MIN_THROUGHPUT_RATIO = 0.90  # llmtap / bare mitmdump, every concurrency
MAX_ADDED_P50_MS = 0.5  # llmtap - bare mitmdump, at concurrency 1 (service time, no queueing)
MAX_ADDED_TTFC_MS = 0.5  # llmtap - bare mitmdump with the stream addon
MAX_GAP_DRIFT_MS = 0.5  # median inter-chunk gap, llmtap vs direct
MAX_RSS_GROWTH_MB = 20.0
MIN_AUDIT_ROWS_PER_S = 20_000
STRETCH_RATIO = 1.3  # lean llmtap / bare mitmdump


def table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def throughput_table(results: dict[str, dict[int, Cell]], labels: dict[str, str]) -> str:
    rows = []
    for name, by_c in results.items():
        for c, cell in by_c.items():
            rows.append(
                [
                    labels[name],
                    c,
                    cell.rps,
                    cell.p50_ms,
                    cell.p99_ms,
                    cell.cpu_ms_per_request,
                    f"{cell.cpu_share:.0%}",
                    cell.writer_cpu_ms_per_request or "-",
                    cell.failures,
                    " / ".join(map(str, cell.rps_runs)),
                ]
            )
    return table(
        [
            "target",
            "conc.",
            "req/s",
            "p50 ms",
            "p99 ms",
            "proxy CPU ms/req",
            "proxy CPU",
            "writer CPU ms/req",
            "failed",
            "req/s per run",
        ],
        rows,
    )


def ratio_table(results: dict[str, dict[int, Cell]]) -> tuple[str, list[str]]:
    """Ratios c/b, c/a, d/b and added p50 per concurrency, plus the PASS/FAIL lines."""
    a, b, c, d = (results.get(k) for k in ("direct", "mitmdump", "llmtap", "lean"))
    rows, checks = [], []
    for conc in b:
        row = [
            conc,
            c[conc].rps / b[conc].rps,
            b[conc].cpu_ms_per_request / c[conc].cpu_ms_per_request,
            c[conc].rps / a[conc].rps if a else None,
            c[conc].p50_ms - b[conc].p50_ms,
        ]
        if d:
            row += [
                d[conc].rps / b[conc].rps,
                b[conc].cpu_ms_per_request / d[conc].cpu_ms_per_request,
                d[conc].p50_ms - b[conc].p50_ms,
            ]
        rows.append(row)
    # "by CPU": bare mitmdump's CPU per request over the target's; less sensitive than req/s to
    # other work stealing the proxy's core, and the same ratio when both saturate a core
    header = ["conc.", "c/b req/s", "c/b by CPU", "c/a req/s", "c-b p50 ms"] + (
        ["d/b req/s", "d/b by CPU", "d-b p50 ms"] if d else []
    )
    worst = min(c[k].rps / b[k].rps for k in b)
    checks.append(
        f"{verdict(worst >= MIN_THROUGHPUT_RATIO)}  llmtap (c) throughput >= {MIN_THROUGHPUT_RATIO} x bare "
        f"mitmdump at every concurrency (worst {worst:.2f})"
    )
    first = min(b)
    added = c[first].p50_ms - b[first].p50_ms
    checks.append(
        f"{verdict(added <= MAX_ADDED_P50_MS)}  llmtap (c) added p50 at concurrency {first} "
        f"<= {MAX_ADDED_P50_MS} ms ({added:+.2f} ms)"
    )
    if d:
        worst_d = min(d[k].rps / b[k].rps for k in b)
        added_d = d[first].p50_ms - b[first].p50_ms
        checks.append(
            f"{verdict(worst_d >= MIN_THROUGHPUT_RATIO)}  lean llmtap (d) throughput >= "
            f"{MIN_THROUGHPUT_RATIO} x bare mitmdump (worst {worst_d:.2f})"
        )
        checks.append(
            f"{verdict(added_d <= MAX_ADDED_P50_MS)}  lean llmtap (d) added p50 at concurrency {first} "
            f"<= {MAX_ADDED_P50_MS} ms ({added_d:+.2f} ms)"
        )
        checks.append(
            f"{verdict(worst_d >= STRETCH_RATIO)}  stretch: lean llmtap (d) >= {STRETCH_RATIO} x bare "
            f"mitmdump at every concurrency (worst {worst_d:.2f})"
        )
    return table(header, rows), checks
