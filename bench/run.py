"""llmtap benchmarks (``make bench``): what the sidecar costs on top of mitmproxy, on loopback.

Sections (``--only`` picks some): identical, throughput, breakdown, streaming, memory, audit. Every
process under test is pinned to one core and the load generator, simulator and this script
to the other (see ``procs.py``). Prints tables, medians over ``--runs`` runs, ratios and
PASS/FAIL against the targets of issue 7; ``--json PATH`` also saves the raw results.

    .venv/bin/python bench/run.py            # full run, ~21 min
    .venv/bin/python bench/run.py --quick    # smoke run, < 3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import identical
import memory
import procs
import report
import streaming
import throughput
from otlp_stub import OTLPStub

SECTIONS = ("identical", "throughput", "breakdown", "streaming", "memory", "audit")
TAP_SCRIPT = str(procs.ROOT / "addons" / "tap.py")
STREAM_SCRIPT = str(Path(__file__).with_name("stream_only.py"))
LABELS = {
    "direct": "(a) direct to simulator",
    "mitmdump": "(b) bare mitmdump",
    "llmtap": "(c) mitmdump + llmtap, all sinks",
    "lean": "(d) llmtap run (lean), all sinks",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="llmtap benchmarks (issue 7).")
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 3 min)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--runs", type=int, help="repetitions per measurement (median reported)")
    parser.add_argument("--seconds", type=float, help="length of each timed throughput run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--exchanges", type=int, help="exchanges in the memory run (default 100000)")
    parser.add_argument("--streams", type=int, help="streams per target per run")
    parser.add_argument("--audit-records", type=int, help="records in the audit burst")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, DBs)")
    args = parser.parse_args()
    quick = args.quick
    defaults = dict(
        runs=1 if quick else 3,
        seconds=2.0 if quick else 8.0,
        exchanges=5_000 if quick else 100_000,
        streams=10 if quick else 30,
        audit_records=5_000 if quick else 50_000,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.warmup = 1.0 if quick else 2.0
    args.memory_warmup = 1_000 if quick else 5_000
    args.audit_seconds = 1.0 if quick else 3.0
    args.sections = [s for s in args.only.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    args.concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    return args


def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import mitmproxy.version

    wrk_version = subprocess.run([shutil.which("wrk") or "wrk", "--version"], capture_output=True, text=True).stdout
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": procs.CORES,
        "memory_gb": round(mem_kb / 1e6, 1),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "")
        if hasattr(platform, "freedesktop_os_release")
        else "",
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "wrk": (wrk_version.split()[1] if wrk_version else "?"),
        "load_average_start": procs.load_average(),
        "pinning": f"proxy under test on CPU {procs.PROXY_CPU}; wrk, simulator, llmtap's audit writer process "
        f"and bench on CPU {procs.LOAD_CPU}",
    }


def llmtap_sets(name: str, workdir: Path, otlp: str) -> list[str]:
    """mitmdump --set flags for llmtap with every sink on (metrics, audit, spans)."""
    return [
        "--set",
        f"llmtap_db={workdir / (name + '.db')}",
        "--set",
        f"llmtap_metrics_port={procs.free_port()}",
        "--set",
        f"llmtap_otlp_endpoint={otlp}",
    ]


def tap_mitmdump(name: str, upstream: str, workdir: Path, otlp: str) -> procs.Proc:
    proc = procs.mitmdump(name, upstream, workdir, TAP_SCRIPT, extra=llmtap_sets(name, workdir, otlp))
    proc.extra["db"] = workdir / f"{name}.db"
    proc.pin_writer(procs.LOAD_CPU)
    return proc


def section_identical(stack: ExitStack, workdir: Path, out: dict, checks: list[str]) -> None:
    print("\n## Byte-identical traffic (echo upstream)")
    echo = stack.enter_context(identical.EchoUpstream())
    with ExitStack() as proxies:
        targets = {
            "mitmdump + stream addon": _start(proxies, procs.mitmdump("id-mitmdump", echo.url, workdir, STREAM_SCRIPT)),
            "mitmdump + llmtap": _start(proxies, tap_mitmdump("id-tap", echo.url, workdir, "")),
            "llmtap run --full": _start(proxies, procs.llmtap("id-full", echo.url, workdir, lean=False)),
            "llmtap run --lean": _start(proxies, procs.llmtap("id-lean", echo.url, workdir, lean=True)),
        }
        problems = identical.compare({name: p.port for name, p in targets.items()})
    out["identical"] = {"cases": [c[0] for c in identical.CASES], "targets": list(targets), "problems": problems}
    for problem in problems:
        print("  " + problem)
    line = (
        f"{report.verdict(not problems)}  byte-identical requests and responses through all "
        f"{len(targets)} proxies ({len(identical.CASES)} cases: {', '.join(c[0] for c in identical.CASES)})"
    )
    print(line)
    checks.append(line)


def section_throughput(args, stack: ExitStack, workdir: Path, otlp: OTLPStub, out: dict, checks: list[str]) -> None:
    print(f"\n## Throughput and latency, non-streaming ({args.runs} run(s) x {args.seconds:g} s per cell)")
    upstream = _start(stack, procs.simulator("sim-upstream", procs.LOAD_CPU, workdir))
    targets = {
        "direct": _start(stack, procs.simulator("sim-direct", procs.PROXY_CPU, workdir)),
        "mitmdump": _start(stack, procs.mitmdump("mitmdump", upstream.url, workdir)),
        "llmtap": _start(stack, tap_mitmdump("tap", upstream.url, workdir, otlp.traces_url)),
        "lean": _start(stack, procs.llmtap("lean", upstream.url, workdir, lean=True, otlp=otlp.traces_url)),
    }
    results = throughput.run(targets, workdir, args.concurrencies, args.runs, args.seconds, args.warmup)
    print()
    print(report.throughput_table(results, LABELS))
    ratios, lines = report.ratio_table(results)
    print()
    print(ratios)
    for line in lines:
        print(line)
    checks.extend(lines)
    print(f"  spans received by the OTLP stub: {otlp.spans}")
    out["throughput"] = {
        name: {c: dataclasses.asdict(cell) for c, cell in by_c.items()} for name, by_c in results.items()
    }
    out["spans_exported"] = otlp.spans
    for name in ("mitmdump", "llmtap", "lean"):
        targets[name].stop()


def section_breakdown(args, stack: ExitStack, workdir: Path, otlp: OTLPStub, out: dict) -> None:
    """Where llmtap's CPU goes: the lean proxy with no sink, then each sink alone, then all."""
    concurrencies = (1, 16)
    print(f"\n## Breakdown: proxy CPU per request by sink ({args.runs} run(s) x {args.seconds:g} s)")
    upstream = _start(stack, procs.simulator("sim-breakdown", procs.LOAD_CPU, workdir))
    variants = {
        "no sink": {},
        "metrics": {"metrics": True},
        "audit": {"db": True},
        "spans": {"otlp": otlp.traces_url},
        "all": {"metrics": True, "db": True, "otlp": otlp.traces_url},
    }
    targets = {"bare mitmdump": _start(stack, procs.mitmdump("bd-mitmdump", upstream.url, workdir))}
    for name, sinks in variants.items():
        options = {"metrics": False, "db": False, "otlp": "", **sinks}
        targets[f"lean llmtap, {name}"] = _start(
            stack, procs.llmtap(f"bd-{name.replace(' ', '-')}", upstream.url, workdir, lean=True, **options)
        )
    results = throughput.run(
        targets, workdir, concurrencies, args.runs, args.seconds, args.warmup, progress=lambda _: None
    )
    rows = []
    for conc in concurrencies:
        base = results["lean llmtap, no sink"][conc].cpu_ms_per_request
        bare = results["bare mitmdump"][conc]
        rows += [
            [
                name,
                conc,
                cells[conc].rps,
                cells[conc].rps / bare.rps,
                cells[conc].cpu_ms_per_request,
                cells[conc].cpu_ms_per_request - base if name != "bare mitmdump" else None,
            ]
            for name, cells in results.items()
        ]
    print(
        report.table(
            ["target", "conc.", "req/s", "x bare mitmdump", "proxy CPU ms/req", "CPU ms/req over no sink"], rows
        )
    )
    out["breakdown"] = {
        name: {c: dataclasses.asdict(cell) for c, cell in cells.items()} for name, cells in results.items()
    }
    for proc in targets.values():
        proc.stop()


def section_streaming(args, stack: ExitStack, workdir: Path, out: dict, checks: list[str]) -> None:
    delay = 0.01
    print(f"\n## Streaming (simulator chunk delay {delay * 1e3:g} ms, {args.streams} streams x {args.runs} run(s))")
    sim = _start(stack, procs.simulator("sim-stream", procs.LOAD_CPU, workdir, chunk_delay=delay))
    targets = {
        "direct": sim,
        "mitmdump": _start(stack, procs.mitmdump("stream-mitmdump", sim.url, workdir, STREAM_SCRIPT)),
        "llmtap": _start(stack, tap_mitmdump("stream-tap", sim.url, workdir, "")),
        "lean": _start(stack, procs.llmtap("stream-lean", sim.url, workdir, lean=True)),
    }
    per_run: dict[str, list[streaming.StreamSummary]] = {name: [] for name in targets}
    for _ in range(args.runs):
        for name, proc in targets.items():
            per_run[name].append(streaming.measure("127.0.0.1", proc.port, args.streams))
    med = {name: streaming.median_summary(runs) for name, runs in per_run.items()}
    labels = {**LABELS, "mitmdump": "(b) mitmdump + stream_only.py"}
    rows = [
        [
            labels[n],
            s.first_chunk_p50_ms,
            s.first_chunk_p90_ms,
            s.first_chunk_p50_ms - med["mitmdump"].first_chunk_p50_ms,
            s.gap_p50_ms,
            s.gap_p99_ms,
            s.events_per_stream,
            f"{s.coalesced_share:.1%}",
        ]
        for n, s in med.items()
    ]
    print(
        report.table(
            [
                "target",
                "TTFC p50 ms",
                "TTFC p90 ms",
                "TTFC vs (b) ms",
                "gap p50 ms",
                "gap p99 ms",
                "events/stream",
                "coalesced",
            ],
            rows,
        )
    )
    for name in ("llmtap", "lean"):
        added = med[name].first_chunk_p50_ms - med["mitmdump"].first_chunk_p50_ms
        drift = abs(med[name].gap_p50_ms - med["direct"].gap_p50_ms)
        ok_cadence = (
            drift <= report.MAX_GAP_DRIFT_MS and med[name].coalesced_share <= med["direct"].coalesced_share + 0.01
        )
        lines = [
            f"{report.verdict(added <= report.MAX_ADDED_TTFC_MS)}  {LABELS[name]}: time to first chunk <= (b) + "
            f"{report.MAX_ADDED_TTFC_MS} ms ({added:+.2f} ms)",
            f"{report.verdict(ok_cadence)}  {LABELS[name]}: chunk cadence preserved (median gap "
            f"{med[name].gap_p50_ms:.2f} vs {med['direct'].gap_p50_ms:.2f} ms direct, "
            f"{med[name].coalesced_share:.1%} of events coalesced)",
        ]
        for line in lines:
            print(line)
        checks.extend(lines)
    out["streaming"] = {name: dataclasses.asdict(s) for name, s in med.items()}
    for proc in targets.values():
        proc.stop()


def section_memory(args, stack: ExitStack, workdir: Path, otlp: OTLPStub, out: dict, checks: list[str]) -> None:
    print(f"\n## Memory: llmtap run (lean, all sinks), {args.exchanges:,} mixed exchanges")
    sim = _start(stack, procs.simulator("sim-memory", procs.LOAD_CPU, workdir))
    proxy = _start(stack, procs.llmtap("memory", sim.url, workdir, lean=True, otlp=otlp.traces_url))
    result = memory.run(proxy, workdir, args.exchanges, args.memory_warmup)
    proxy.stop()
    print(
        report.table(
            [
                "exchanges",
                "recorded",
                "seconds",
                "RSS start MB",
                "RSS after warm-up MB",
                "RSS peak MB",
                "RSS after MB",
                "writer RSS after warm-up / after MB",
                "growth MB (both)",
            ],
            [
                [
                    result.exchanges,
                    result.recorded,
                    result.seconds,
                    result.rss_start_mb,
                    result.rss_before_mb,
                    result.rss_peak_mb,
                    result.rss_after_mb,
                    f"{result.writer_rss_before_mb:.1f} / {result.writer_rss_after_mb:.1f}",
                    result.growth_mb,
                ]
            ],
        )
    )
    line = (
        f"{report.verdict(result.growth_mb <= report.MAX_RSS_GROWTH_MB)}  RSS growth (proxy + writer) <= "
        f"{report.MAX_RSS_GROWTH_MB:g} MB over {result.exchanges:,} exchanges ({result.growth_mb:+.1f} MB)"
    )
    print(line)
    checks.append(line)
    out["memory"] = {**dataclasses.asdict(result), "growth_mb": result.growth_mb}


def section_audit(args, workdir: Path, out: dict, checks: list[str]) -> None:
    print(
        f"\n## Audit writer: AuditSink driven directly ({args.audit_records:,} record burst, "
        f"then 20,000 rows/s offered for {args.audit_seconds:g} s), emitting on CPU {procs.PROXY_CPU}, "
        f"its writer process on CPU {procs.LOAD_CPU}"
    )
    argv = [
        "taskset",
        "-c",
        str(procs.PROXY_CPU),
        sys.executable,
        str(Path(__file__).with_name("audit_writer.py")),
        "--records",
        str(args.audit_records),
        "--seconds",
        str(args.audit_seconds),
        "--workdir",
        str(workdir),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode:
        line = f"FAIL  audit writer bench did not run: {done.stderr.strip().splitlines()[-1:]}"
        print(line)
        checks.append(line)
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    b, p = result["burst"], result["paced"]
    print(
        report.table(
            [
                "burst rows/s",
                "emit us/record",
                "peak queue depth",
                "paced offered rows/s",
                "paced peak depth",
                "drain after ms",
                "rows in DB / expected",
                "dropped",
            ],
            [
                [
                    b["rows_per_s"],
                    b["emit_us"],
                    b["peak_queue_depth"],
                    p["offered_rows_per_s"],
                    p["peak_queue_depth"],
                    p["drain_after_ms"],
                    f"{result['rows_in_db']} / {result['expected_rows']}",
                    result["dropped"],
                ]
            ],
        )
    )
    line = (
        f"{report.verdict(b['rows_per_s'] >= report.MIN_AUDIT_ROWS_PER_S)}  audit writer >= "
        f"{report.MIN_AUDIT_ROWS_PER_S:,} rows/s ({b['rows_per_s']:,.0f} rows/s)"
    )
    print(line)
    checks.append(line)
    out["audit"] = result


def _start(stack: ExitStack, proc: procs.Proc) -> procs.Proc:
    stack.callback(proc.stop)
    return proc


def main() -> int:
    args = parse_args()
    procs.pin_self(procs.LOAD_CPU)
    info = machine()
    print(f"# llmtap bench, {info['date']}")
    print(
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, {info['os']}, kernel {info['kernel']}; "
        f"Python {info['python']}, mitmproxy {info['mitmproxy']}, wrk {info['wrk']}"
    )
    print(f"{info['pinning']}; load average at start {info['load_average_start']}")
    started = time.monotonic()
    out: dict = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"}}
    checks: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="llmtap-bench-"))
    try:
        with ExitStack() as stack, OTLPStub() as otlp:
            if "identical" in args.sections:
                section_identical(stack, workdir, out, checks)
            if "throughput" in args.sections:
                section_throughput(args, stack, workdir, otlp, out, checks)
            if "breakdown" in args.sections:
                section_breakdown(args, stack, workdir, otlp, out)
            if "streaming" in args.sections:
                section_streaming(args, stack, workdir, out, checks)
            if "memory" in args.sections:
                section_memory(args, stack, workdir, otlp, out, checks)
            if "audit" in args.sections:
                section_audit(args, workdir, out, checks)
    finally:
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_end"] = procs.load_average()
    info["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(f"\n## Summary ({info['minutes']} min; load average at end {info['load_average_end']})")
    for line in checks:
        print(line)
    out["checks"] = checks
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
