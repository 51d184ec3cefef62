"""The deployment files, checked with the real tools rather than by eye.

- promtool: the Prometheus config, the rules, and the rule unit tests (each alert fires and
  stays quiet);
- a real Prometheus scrapes a real llmtap under simulated traffic (errors, retries, streams,
  unpriced models, label overflow, a sink that failed to start) and every dashboard query,
  every variable query and every recording rule must return data;
- the dashboards' JSON structure; docker-compose's own validation of the compose file;
- the Dockerfile's steps replayed without a Docker engine: its COPY lines (honouring
  .dockerignore) build a wheel that goes into a clean venv, and its ENTRYPOINT + CMD serve
  traffic from there.

A missing tool (promtool, prometheus, docker-compose) fails these tests; ``make test``
installs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from conftest import API_KEY, REPO, free_port, metric_value, start_tap, wait_for_port, wait_until
from otlp_receiver import OTLPHTTPReceiver
from prom import PrometheusServer

from llmtap.devtools.simulator import Simulator

DEPLOY = REPO / "deploy"
DASHBOARDS = REPO / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
COMPOSE = REPO / "docker-compose.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: What a Grafana template variable becomes when a query is run here: "All" for the filters.
VARIABLES = {
    "provider": ".*",
    "model": ".*",
    "app": ".*",
    "instance": ".*",
    "budget": "100",
    "__rate_interval": "1m",
    "__range": "1h",
    "__interval": "15s",
}


def tool(name: str) -> str:
    """Path of a command-line tool; a missing one is a failure (``make test`` installs it)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test` (it installs the Debian package)")
    return path


def run(*cmd: str, cwd: Path = REPO, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a command; fail with its output unless it exits 0."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- promtool ----------------------------------------------------------------------------------
def test_promtool_checks_config_and_rules() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", str(DEPLOY / "prometheus.yml"))  # also checks its rule_files
    run(promtool, "check", "rules", str(DEPLOY / "alerts.yml"))


def test_promtool_rule_unit_tests_pass() -> None:
    out = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=DEPLOY)
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    cases = [
        case
        for test in yaml.safe_load((DEPLOY / "alerts.test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"


# --- dashboard JSON structure ---------------------------------------------------------------
def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_dashboards_exist_with_unique_uids() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["health.json", "routing.json", "spend.json", "traffic.json"]
    dashboards = [load_dashboard(p) for p in DASHBOARD_FILES]
    uids = [d["uid"] for d in dashboards]
    assert all(uids) and len(set(uids)) == len(uids)
    assert len({d["title"] for d in dashboards}) == len(dashboards)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    text = path.read_text()
    dash = json.loads(text)
    assert "${DS_" not in text and "__inputs" not in dash, "import placeholders instead of ${datasource}"
    assert dash["schemaVersion"] == 39  # Grafana 11.x
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":  # the shape Grafana 11's variable editor saves, consistent
            query = var["query"]
            assert var["datasource"] == DATASOURCE and var["definition"] == query["query"]
            assert re.fullmatch(
                rf"label_values\({re.escape(query['metric'])}(\{{.+\}})?, {query['label']}\)", query["query"]
            ), var["name"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        where = f"{path.name} panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel["targets"], where
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE and t["expr"], where
            for name in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert name in variables or name in VARIABLES, f"{where}: ${name} is not defined"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, where
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & mine, f"{where} overlaps another panel"
        cells |= mine
    filters = {"datasource", "instance"} if path.stem == "health" else {"datasource", "provider", "model", "app"}
    assert filters <= set(variables)
    if path.stem == "spend":
        assert variables["budget"]["type"] == "textbox" and float(variables["budget"]["query"]) > 0


# --- PromQL from dashboards and rules, run against a real Prometheus ----------------------------
def substitute(expr: str) -> str:
    """Grafana's template variables as Grafana would expand them for "All" / the defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression reads; functions and labels left out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    words = re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", s)
    return set(words) - {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target of every dashboard."""
    return [
        (f"{path.stem} #{panel['id']} {panel['title']} [{t['refId']}]", t["expr"], t.get("legendFormat", ""))
        for path in DASHBOARD_FILES
        for panel in load_dashboard(path)["panels"]
        for t in panel["targets"]
    ]


def variable_queries() -> list[tuple[str, str]]:
    return [
        (f"{path.stem} ${var['name']}", var["query"]["query"])
        for path in DASHBOARD_FILES
        for var in load_dashboard(path)["templating"]["list"]
        if var["type"] == "query"
    ]


def recording_rules() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]


def send_round(clients: list[openai.OpenAI], round_: int) -> None:
    """Traffic that gives every panel data: two apps, four providers, streams and text
    completions, 429/500/422 faults, router retries, truncated and abandoned streams, a stream
    without usage (unpriced), a pass-through request, and more `team` values than the label cap."""
    for i, model in enumerate(("pulze", "openai/gpt-4o-mini", "anthropic/claude-3-haiku", "mistralai/mistral-small")):
        for j, client in enumerate(clients):
            team = {"Pulze-Labels": json.dumps({"team": f"team-{round_}-{i}-{j}"})}
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"q{i} r{round_}"}], extra_headers=team
            )
    client = clients[0]

    def chat(text: str, stream: bool = False, **headers: str) -> None:
        try:
            out = client.chat.completions.create(
                model="pulze", messages=[{"role": "user", "content": text}], stream=stream, extra_headers=headers
            )
            if stream:
                for _ in out:
                    pass
        except Exception:  # faults are this traffic: API errors, and a cut stream's transport error
            pass

    for i in range(3):
        chat(f"stream {i} of round {round_}", stream=True)
    for _ in client.completions.create(model="openai/gpt-4o-mini", prompt=f"r{round_}", stream=True):
        pass
    client.completions.create(model="pulze", prompt=f"complete round {round_}")
    chat("retried", **{"X-Sim-Fault": "retry"})
    for fault in ("429", "500", "422", "disconnect"):
        chat(f"fault {fault}", **{"X-Sim-Fault": fault})
    chat("cut off", stream=True, **{"X-Sim-Fault": "truncate"})
    chat("no usage in this stream", stream=True, **{"X-Sim-Stream-Usage": "none"})
    abandoned = client.chat.completions.create(
        model="pulze", messages=[{"role": "user", "content": "left early"}], stream=True
    )
    next(iter(abandoned))
    abandoned.close()
    client.models.list()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus with deploy/alerts.yml, scraping llmtap after two rounds of traffic."""
    workdir = tmp_path_factory.mktemp("deploy")
    with contextlib.ExitStack() as stack:
        sim = stack.enter_context(Simulator(chunk_delay=0.01))
        otlp = stack.enter_context(OTLPHTTPReceiver())
        tap = start_tap(
            workdir,
            sim.url,
            "--metric-label",
            "team",
            "--label-limit",
            "6",
            # A sink that cannot start is counted (stage start_jsonl) and the proxy runs on.
            jsonl=workdir / "missing-dir" / "records.jsonl",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_SERVICE_NAME": "llmtap"},
        )
        stack.callback(tap.stop)
        prom = stack.enter_context(
            PrometheusServer(workdir).start([f"127.0.0.1:{tap.metrics_port}"], rule_files=[DEPLOY / "alerts.yml"])
        )
        clients = [
            stack.enter_context(openai.OpenAI(base_url=tap.base_url, api_key=key, max_retries=0, timeout=30))
            for key in (API_KEY, API_KEY + "-second-app")
        ]
        prom.wait_scraped()
        # Two rounds with a scrape between, so that every counter grows between samples.
        for round_ in (1, 2):
            send_round(clients, round_)
            seen = wait_until(lambda: tap.metric("llmtap_requests_total"), timeout=15)
            prom.wait_for("sum(llmtap_requests_total)", lambda s, n=seen: bool(s) and s[0].value >= n)
        # ...and every recording rule and alert evaluated after that last scrape.
        since = time.time()
        for name in [*recording_rules(), "ALERTS"]:
            prom.wait_for(f"min(timestamp({name})) > {since}", timeout=15)
        yield prom


def check_returns_data(prom: PrometheusServer, expr: str, legend: str = "") -> str | None:
    """Why ``expr`` fails to show data, or None: every metric it names exists, the result is
    non-empty with a finite value, and the labels its legend uses are in the result."""
    query = substitute(expr)
    missing = [n for n in sorted(metric_names(query)) if not prom.api("series", **{"match[]": n})]
    if missing:
        return f"no series for {missing}"
    samples = prom.query(query)
    if not any(math.isfinite(s.value) for s in samples):
        return f"no finite value: {samples}"
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if not any(label in s.labels for s in samples):
            return f"legend label {label!r} is not in the result {[s.labels for s in samples]}"
    return None


def test_rules_load_and_evaluate_without_errors(prometheus: PrometheusServer) -> None:
    unhealthy = [(r["name"], r.get("lastError")) for g in prometheus.rules() for r in g["rules"] if r["health"] != "ok"]
    assert unhealthy == []


def test_every_recording_rule_returns_data(prometheus: PrometheusServer) -> None:
    problems = {name: why for name in recording_rules() if (why := check_returns_data(prometheus, name))}
    assert problems == {}


def test_every_dashboard_query_returns_data(prometheus: PrometheusServer) -> None:
    targets = dashboard_targets()
    assert len(targets) > 50
    problems = {
        where: f"{why}\n    {expr}"
        for where, expr, legend in targets
        if (why := check_returns_data(prometheus, expr, legend))
    }
    assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_every_variable_query_returns_values(prometheus: PrometheusServer) -> None:
    problems = {}
    for where, query in variable_queries():
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"{where}: only label_values(selector, label) queries are used: {query}"
        selector, label = substitute(match.group(1)), match.group(2)
        values = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        if not [v for v in values if v]:
            problems[where] = query
    assert problems == {}


def test_alerts_that_this_traffic_must_raise_are_firing(prometheus: PrometheusServer) -> None:
    """A stream without usage is unpriced; the jsonl sink that could not start is an internal error."""
    firing = {
        (a["labels"]["alertname"], a["labels"].get("stage", "")) for a in prometheus.alerts() if a["state"] == "firing"
    }
    assert ("LLMTapUnpricedRequests", "") in firing
    assert ("LLMTapInternalErrors", "start_jsonl") in firing


# --- docker-compose ---------------------------------------------------------------------------
def compose_config(*profiles: str) -> dict[str, Any]:
    """``docker-compose config`` (validates, interpolates) as a dict, without the user's overrides."""
    compose = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTAP_", "GRAFANA_", "COMPOSE_"))}
    args = [a for p in profiles for a in ("--profile", p)]
    run(compose, "-f", str(COMPOSE), *args, "config", "-q", env=env)
    return yaml.safe_load(run(compose, "-f", str(COMPOSE), *args, "config", env=env))


def test_compose_file_validates_and_wires_the_stack() -> None:
    config = compose_config("demo")
    services = config["services"]
    assert set(services) == {
        "llmtap",
        "prometheus",
        "grafana",
        "otel-collector",
        "jaeger",
        "simulator",
        "llmtap-demo",
        "traffic",
    }
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    demo = {name for name, s in raw.items() if "demo" in s.get("profiles", [])}
    assert demo == {"simulator", "llmtap-demo", "traffic"}
    assert {name for name, s in raw.items() if not s.get("profiles")} == {
        "llmtap",
        "prometheus",
        "grafana",
        "otel-collector",
        "jaeger",
    }

    def flag(service: str, name: str) -> str:
        command = services[service]["command"]
        return command[command.index(name) + 1]

    assert flag("llmtap", "--upstream") == "https://api.pulze.ai"
    assert flag("llmtap-demo", "--upstream") == "http://simulator:8000"
    assert flag("traffic", "--base-url") == "http://llmtap-demo:8080/v1"
    for name in ("llmtap", "llmtap-demo"):
        assert flag(name, "--listen-host") == flag(name, "--metrics-host") == "0.0.0.0"  # reachable by others
        assert flag(name, "--db").startswith("/data/")
        assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in services[name]["volumes"])
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert any(v.endswith(":/prometheus:rw") for v in services["prometheus"]["volumes"])

    # Bind mounts point at files in the repo; Prometheus' rule file sits beside its config.
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("/"):
                assert Path(source).exists(), volume
                mounts[Path(source).resolve()] = target
    prometheus_dir = Path(mounts[DEPLOY / "prometheus.yml"]).parent
    assert Path(mounts[DEPLOY / "alerts.yml"]) == prometheus_dir / "alerts.yml"
    assert (
        mounts[DASHBOARDS]
        == yaml.safe_load((DASHBOARDS / "provisioning/dashboards/llmtap.yml").read_text())["providers"][0]["options"][
            "path"
        ]
    )

    # Every host name in the configs is a service of the stack, on the port it listens on.
    prom_config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = prom_config["scrape_configs"]
    targets = [t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]]
    dns = [f"{n}:{sd['port']}" for job in jobs for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    for host_port in targets + dns:
        host, port = host_port.split(":")
        command = services[host]["command"]
        assert port == (flag(host, "--metrics-port") if "--metrics-port" in command else "9464"), host_port
    datasource = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["uid"] == "prometheus"
    collector = yaml.safe_load((DEPLOY / "otel-collector.yml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    assert set(pipeline["receivers"]) <= set(collector["receivers"])
    assert set(pipeline["exporters"]) <= set(collector["exporters"])
    assert set(pipeline.get("processors", [])) <= set(collector.get("processors", {}))
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert {e["endpoint"] for e in collector["exporters"].values()} == {"jaeger:4317"}


def test_compose_without_demo_profile_validates() -> None:
    assert {"llmtap", "prometheus", "grafana"} <= set(compose_config()["services"])


# --- Dockerfile, replayed in a clean venv ------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        instruction, _, args = (current + line).strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    return out


def dockerignore_regexes() -> list[re.Pattern[str]]:
    """.dockerignore patterns as regexes over context-relative POSIX paths (``**`` crosses /)."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip().strip("/")
        if not pattern or pattern.startswith("#"):
            continue
        assert not pattern.startswith("!"), "exceptions are not replayed here"
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        out.append(re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")))
    return out


def copy_context(source: Path, dest: Path, ignore: list[re.Pattern[str]]) -> None:
    """Copy what ``COPY`` would send from the build context (a file or a directory's contents)."""
    rel = source.relative_to(REPO).as_posix()
    assert source.exists() and not any(p.fullmatch(rel) for p in ignore), f"COPY {rel}: not in the build context"
    if source.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
        return
    for item in source.iterdir():
        if not any(p.fullmatch(item.relative_to(REPO).as_posix()) for p in ignore):
            copy_context(item, dest / item.name, ignore)


def test_dockerfile_steps_work_in_a_clean_venv(tmp_path: Path) -> None:
    """FROM matches this Python; COPY + ``pip install .`` give a working ``llmtap`` in a clean
    venv (dependencies are lent by the test venv: the test must not download them); the
    ENTRYPOINT + CMD, on loopback ports, proxy a request and write the audit DB under /data;
    every compose command of the image is accepted by this CLI."""
    steps = dockerfile()
    base = dict(steps)["FROM"]
    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    root, workdir = tmp_path / "image", "/"
    ignore = dockerignore_regexes()
    for instruction, args in steps:
        if instruction == "WORKDIR":
            workdir = args
        elif instruction == "COPY":
            *sources, dest = args.split()
            target = root / workdir.lstrip("/") / dest
            for source in sources:
                copy_context(REPO / source, target / source if dest.endswith("/") else target, ignore)
    src = root / "src"
    assert any("pip install ." in args for instruction, args in steps if instruction == "RUN")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"), str(src))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin/python"),
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        *map(str, (tmp_path / "wheels").glob("llmtap-*.whl")),
    )
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(str(venv / "bin/python"), "-c", purelib).strip())
    (site / "lent-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run(str(venv / "bin/python"), "-c", "import llmtap, llmtap.capture.addon; print(llmtap.__file__)")
    assert where.startswith(str(site)), "llmtap must come from the clean venv, not the repo"

    entrypoint = json.loads(dict(steps)["ENTRYPOINT"])
    cmd = json.loads(dict(steps)["CMD"])  # exec form: llmtap is PID 1 and gets the stop signal
    assert entrypoint == ["llmtap"]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    argv = [str(venv / "bin" / entrypoint[0])] + [
        a.replace("0.0.0.0", "127.0.0.1").replace("/data/", f"{data}/") for a in cmd
    ]
    with Simulator() as sim:
        argv += [
            "--upstream",
            sim.url,
            "--listen-port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--confdir",
            str(tmp_path / "mitmproxy"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        log = tmp_path / "llmtap.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=data, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_port(port, proc=proc)
            wait_for_port(metrics_port, proc=proc)
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0) as client:
                client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "hi"}])
            wait_until(
                lambda: metric_value(f"http://127.0.0.1:{metrics_port}/metrics", "llmtap_requests_total") == 1,
                timeout=10,
            )
            healthcheck = yaml.safe_load(COMPOSE.read_text())["x-llmtap-sidecar"]["healthcheck"]["test"]
            assert healthcheck[:2] == ["CMD", "python"]
            run(str(venv / "bin/python"), *[a.replace(":9464/", f":{metrics_port}/") for a in healthcheck[2:]])
        finally:
            proc.terminate()  # what `docker stop` sends
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert code == 0, log.read_text()
    assert (data / "llmtap.db").is_file()

    for _name, service in compose_config("demo")["services"].items():
        if "build" in service:
            run(str(venv / "bin/llmtap"), *service["command"], "--help")
