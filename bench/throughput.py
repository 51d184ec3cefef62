"""Non-streaming throughput and latency: the same request, every target, every concurrency.

Targets are measured round-robin (round 1: every concurrency for a, b, c, d; round 2 starts
with b, ...), so a burst of other work on the machine lands on all of them alike rather than
on one row, and no target is always the first one measured.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from load import CHAT_BODY, CHAT_PATH, fixed_script, wrk
from procs import Proc


@dataclass(frozen=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float  # CPU of the process under test (all threads), per request
    cpu_share: float  # of one core, over the run
    failures: int  # socket errors, timeouts and non-2xx answers
    writer_cpu_ms_per_request: float  # CPU of llmtap's audit writer process (on the other core)


@dataclass(frozen=True)
class Cell:
    """The median of each measure over the runs of one target at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    cpu_share: float
    failures: int
    writer_cpu_ms_per_request: float
    rps_runs: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[Sample]) -> Cell:
        med = lambda attr: statistics.median(getattr(s, attr) for s in samples)  # noqa: E731
        return cls(
            med("rps"),
            med("p50_ms"),
            med("p99_ms"),
            med("cpu_ms_per_request"),
            med("cpu_share"),
            sum(s.failures for s in samples),
            med("writer_cpu_ms_per_request"),
            tuple(round(s.rps) for s in samples),
        )


def measure(target: Proc, workdir: Path, connections: int, seconds: float, warmup: float) -> Sample:
    """Warm up, then one timed wrk run; CPU is the target's own /proc counters over that run."""
    url = target.url + CHAT_PATH
    script = fixed_script(CHAT_BODY)
    if warmup:
        wrk(url, script, workdir, connections=connections, seconds=warmup)
    cpu_before, writer_before = target.cpu_seconds(), target.writer_cpu_seconds()
    result = wrk(url, script, workdir, connections=connections, seconds=seconds)
    cpu, writer = target.cpu_seconds() - cpu_before, target.writer_cpu_seconds() - writer_before
    requests = max(1, result.requests)
    return Sample(
        result.rps,
        result.p50_ms,
        result.p99_ms,
        cpu / requests * 1e3,
        cpu / result.seconds,
        result.errors + result.non_2xx,
        writer / requests * 1e3,
    )


def run(
    targets: dict[str, Proc],
    workdir: Path,
    concurrencies: tuple[int, ...],
    runs: int,
    seconds: float,
    warmup: float,
    progress=print,
) -> dict[str, dict[int, Cell]]:
    samples: dict[tuple[str, int], list[Sample]] = {}
    names = list(targets)
    for round_ in range(1, runs + 1):
        k = (round_ - 1) % len(names)
        order = names[k:] + names[:k]  # each round starts with another target
        for connections in concurrencies:
            for name in order:
                target = targets[name]
                sample = measure(target, workdir, connections, seconds, warmup)
                samples.setdefault((name, connections), []).append(sample)
                progress(
                    f"  run {round_}/{runs}  c={connections:<3} {name:<28} {sample.rps:8.0f} req/s  "
                    f"p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms  cpu {sample.cpu_share:4.0%}"
                )
    return {name: {c: Cell.of(samples[(name, c)]) for c in concurrencies} for name in targets}
