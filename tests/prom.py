"""A real Prometheus server on loopback for tests: scrape targets, optional rule files, PromQL.

It runs Debian's ``prometheus`` binary (``make test`` installs it); when the binary is missing
``start`` raises, so a test that needs Prometheus fails instead of silently skipping.

    with PrometheusServer(tmp_path).start(["127.0.0.1:9464"], rule_files=[alerts]) as prom:
        prom.wait_scraped()                      # every target up, scraped after this call
        prom.value('sum(llmtap_requests_total)') # -> 3.0 (None when the result is empty)
        prom.query('sum by (app) (llmtap_cost_usd_total)')  # -> [Sample(labels, value), ...]

Every scrape and rule evaluation happens each ``interval`` (1 s by default), so a test waits a
second or two, never minutes. The config is written as JSON, which YAML parsers accept.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from conftest import free_port, wait_for_port

BINARY = "/usr/bin/prometheus"
JOB = "llmtap"


class PrometheusError(RuntimeError):
    """Prometheus would not start, or answered a query with an error."""


class Sample(NamedTuple):
    """One element of an instant-query result (a scalar comes back as one with no labels)."""

    labels: dict[str, str]
    value: float  # NaN and ±Inf come through as floats


class PrometheusServer:
    """One Prometheus process with its own config and TSDB under ``workdir``."""

    def __init__(self, workdir: Path, binary: str | None = None, interval: str = "1s") -> None:
        self.workdir = Path(workdir) / "prometheus"
        self.binary = binary or shutil.which("prometheus") or BINARY
        self.interval = interval
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, scrape_targets: Sequence[str], rule_files: Sequence[str | Path] | None = None, timeout: float = 60.0
    ) -> PrometheusServer:
        """Scrape ``host:port`` targets (job ``llmtap``, path /metrics); return once ready."""
        if not Path(self.binary).is_file():
            raise PrometheusError(f"prometheus binary not found at {self.binary}: run `make test` (installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": self.interval,
                "evaluation_interval": self.interval,
                "scrape_timeout": self.interval,
            },
            "rule_files": [str(Path(f).resolve()) for f in rule_files or ()],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(scrape_targets)}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))
        self.port = free_port()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            wait_for_port(self.port, timeout, proc=self.proc)
            self._wait(lambda: self._get("/-/ready", raw=True), timeout, "ready")
        except Exception as exc:
            self.stop()
            raise PrometheusError(f"prometheus did not become ready: {exc}\n{self.output()}") from exc
        return self

    # --- queries ----------------------------------------------------------------------------------
    def api(self, endpoint: str, **params: Any) -> Any:
        """``GET /api/v1/<endpoint>``; returns the response's ``data``, raises on an error status."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        body = self._get(f"/api/v1/{endpoint}?{query}")
        if body.get("status") != "success":
            raise PrometheusError(f"{endpoint} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """Instant query (evaluated now, or at Unix time ``at``) as a list of samples."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}; use query_range() or api()")
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query as Prometheus returns it: ``[{"metric": {...}, "values": [[t, "v"], ...]}]``."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``; None when empty, an error when it has several series."""
        samples = self.query(expr)
        if len(samples) > 1:
            raise PrometheusError(f"{expr!r} has {len(samples)} series, expected at most one: {samples}")
        return samples[0].value if samples else None

    def wait_for(
        self, expr: str, predicate: Callable[[list[Sample]], bool] = bool, timeout: float = 30.0
    ) -> list[Sample]:
        """Poll ``expr`` until ``predicate(samples)`` holds; returns the samples."""
        last: list[list[Sample]] = [[]]

        def check() -> bool:
            last[0] = self.query(expr)
            return predicate(last[0])

        try:
            self._wait(check, timeout, repr(expr))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last result: {last[0]}") from None
        return last[0]

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Wait until every target is up in a scrape that started after this call."""
        since = time.time()
        self._wait(
            lambda: (
                (targets := self.api("targets", state="active")["activeTargets"])
                and all(t["health"] == "up" and _rfc3339(t["lastScrape"]) > since for t in targets)
            ),
            timeout,
            "a fresh successful scrape of every target",
        )

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups, with each rule's health and last error (``/api/v1/rules``)."""
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (``/api/v1/alerts``)."""
        return self.api("alerts")["alerts"]

    # --- lifecycle ------------------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------------
    def _get(self, path: str, raw: bool = False) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:  # 4xx/5xx API answers still carry a JSON error
            if raw:
                return None
            body = exc.read()
        return body if raw else json.loads(body)

    def _wait(self, check: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what}")
            time.sleep(0.2)


def _rfc3339(stamp: str) -> float:
    """Prometheus' nanosecond RFC 3339 timestamps as Unix seconds (Python parses microseconds)."""
    match = re.fullmatch(r"([^.]+?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if match is None:
        raise PrometheusError(f"unexpected timestamp {stamp!r}")
    whole, fraction, zone = match.groups()
    seconds = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return seconds + float("0." + (fraction or "0"))
