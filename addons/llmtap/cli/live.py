"""What ``llmtap top`` shows, computed from a sidecar's ``/metrics`` page.

Only the Prometheus endpoint is read, so this works whatever the audit store is and takes no
lock. Rates are counter increases between two scrapes (a counter that went down means the
sidecar restarted: its new value is the increase); latency percentiles are interpolated from
the duration histogram's bucket increases, as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "llmtap_requests_total"
ERRORS = "llmtap_errors_total"
COST = "llmtap_cost_usd_total"
UNPRICED = "llmtap_unpriced_requests_total"
DURATION_BUCKET = "gen_ai_client_operation_duration_seconds_bucket"
KEPT = (REQUESTS, ERRORS, COST, UNPRICED, DURATION_BUCKET)
#: The groupings shown, and the label each reads on llmtap_requests_total / llmtap_cost_usd_total.
DIMENSIONS = {"model": "response_model", "app": "app", "provider": "provider"}

Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic() of the scrape
    values: dict[Series, float]


def parse(text: str, at: float) -> Snapshot:
    values: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in KEPT:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Snapshot(at, values)


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """One scrape (no proxy: the sidecar is local). Raises OSError when it cannot be read."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    return parse(text, time.monotonic())


@dataclass
class Group:
    requests: float = 0.0  # increase over the window
    errors: float = 0.0
    spend: float = 0.0
    total_requests: float = 0.0  # since the sidecar started
    total_spend: float = 0.0


@dataclass
class View:
    """Everything ``llmtap top`` displays."""

    window_s: float
    requests_per_s: float
    errors_per_s: float
    spend_per_min: float
    p50_s: float | None
    p95_s: float | None
    total_requests: float
    total_errors: float
    total_spend: float
    unknown_cost: float  # successful exchanges whose cost is unknown, since start
    unknown_cost_window: float
    groups: dict[str, dict[str, Group]] = field(default_factory=dict)  # dimension -> value -> Group


def _sum(snapshot: Snapshot, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in snapshot.values.items() if n == name}


def _increase(new: float, old: float | None) -> float:
    if old is None or new < old:  # new series, or a restarted sidecar
        return new
    return new - old


def _increases(old: Snapshot | None, new: Snapshot, name: str) -> Iterable[tuple[dict[str, str], float, float]]:
    """(labels, increase, current value) per series of ``name``."""
    before = _sum(old, name) if old is not None else {}
    for labels, value in _sum(new, name).items():
        increase = value if old is None else _increase(value, before.get(labels))
        yield dict(labels), increase, value


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), +Inf last."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the +Inf bucket: the highest finite bound is all that is known
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def view(old: Snapshot | None, new: Snapshot) -> View:
    """The view over the window from ``old`` to ``new`` (``old=None``: since the sidecar started)."""
    window = max(new.at - old.at, 1e-9) if old is not None else 0.0
    per_s = (lambda x: x / window) if window else (lambda _x: 0.0)
    groups: dict[str, dict[str, Group]] = {d: defaultdict(Group) for d in DIMENSIONS}
    requests = spend = total_requests = total_spend = 0.0
    for labels, increase, value in _increases(old, new, REQUESTS):
        failed = not labels.get("status_code", "").startswith("2")
        requests += increase
        total_requests += value
        for dim, label in DIMENSIONS.items():
            group = groups[dim][labels.get(label) or "(none)"]
            group.requests += increase
            group.total_requests += value
            if failed:
                group.errors += increase
    errors = sum(increase for _, increase, _ in _increases(old, new, ERRORS))
    total_errors = sum(_sum(new, ERRORS).values())
    for labels, increase, value in _increases(old, new, COST):
        spend += increase
        total_spend += value
        for dim, label in DIMENSIONS.items():
            group = groups[dim][labels.get(label) or "(none)"]
            group.spend += increase
            group.total_spend += value
    unknown_window = sum(increase for _, increase, _ in _increases(old, new, UNPRICED))
    by_bound: dict[float, float] = defaultdict(float)
    for labels, increase, _ in _increases(old, new, DURATION_BUCKET):
        by_bound[float(labels["le"])] += increase
    buckets = list(by_bound.items())
    return View(
        window_s=window,
        requests_per_s=per_s(requests),
        errors_per_s=per_s(errors),
        spend_per_min=per_s(spend) * 60,
        p50_s=quantile(0.5, buckets),
        p95_s=quantile(0.95, buckets),
        total_requests=total_requests,
        total_errors=total_errors,
        total_spend=total_spend,
        unknown_cost=sum(_sum(new, UNPRICED).values()),
        unknown_cost_window=unknown_window,
        groups={d: dict(g) for d, g in groups.items()},
    )
