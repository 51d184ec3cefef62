"""A fleet on one system of record: several real llmtaps writing one real PostgreSQL.

The cluster is a throwaway one the tests start (``pg.Cluster``: Debian's initdb/pg_ctl as the
``postgres`` user, a free loopback port); the sidecars are real ``llmtap run`` processes in front
of the simulator, driven by the official SDK; ``kill -9``, a stopped server and a role with only
INSERT/SELECT are the real thing.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from audit_helpers import db_rows
from conftest import API_KEY, LLMTAP, free_port, start_tap, wait_until
from pg import PASSWORD, Cluster

from llmtap.audit import postgres

pytestmark = pytest.mark.timeout(600)


def fleet_tap(workdir: Path, upstream: str, url: str, name: str, *extra: str, env=None):
    workdir.mkdir(parents=True, exist_ok=True)
    return start_tap(
        workdir, upstream, "--journal-dir", str(workdir / "journal"), "--instance", name, *extra, db=url, env=env
    )


def stream_fully(client: openai.OpenAI, prompt: str) -> str:
    with client.chat.completions.with_streaming_response.create(
        model="pulze", messages=[{"role": "user", "content": prompt}], stream=True
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    return json.loads(events[0])["id"]


def rows(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def stored_count(url: str) -> int:
    """Rows in the audit table; 0 until a writer has created it."""
    try:
        return rows(url, "SELECT count(*) FROM exchanges")[0][0]
    except psycopg.errors.UndefinedTable:
        return 0


def llmtap(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([LLMTAP, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


class Load:
    """Threads sending chat traffic (streamed and not) to a set of proxies; what each client
    received completely, by response id."""

    def __init__(self, seed: int) -> None:
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rng = random.Random(seed)
        self.threads: list[threading.Thread] = []

    def start(self, base_url_of, workers: int) -> None:
        for worker in range(workers):
            thread = threading.Thread(target=self._loop, args=(base_url_of, worker), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _loop(self, base_url_of, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            client = openai.OpenAI(base_url=base_url_of(worker), api_key=API_KEY, max_retries=0, timeout=10)
            try:
                prompt = f"w{worker} n{n} {self.rng.random()}"
                if n % 2:
                    rid = stream_fully(client, prompt)
                else:
                    rid = client.chat.completions.create(
                        model="pulze", messages=[{"role": "user", "content": prompt}]
                    ).id
            except (openai.APIError, httpx.HTTPError, ValueError, IndexError):
                continue  # its proxy died under this request: the client did not receive it
            finally:
                client.close()
            with self.lock:
                self.received.append(rid)

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def test_three_sidecars_one_killed_and_restarted_every_response_exactly_once(tmp_path, simulator, pg_cluster, pg_url):
    simulator.chunk_delay = 0.002
    taps = [fleet_tap(tmp_path / f"pod{i}", simulator.url, pg_url, f"pod-{i}") for i in range(3)]
    load = Load(seed=15)
    load.start(lambda worker: taps[worker % 3].base_url, workers=6)
    try:
        wait_until(lambda: load.count() > 30, timeout=60)
        first_id = (tmp_path / "pod1" / "journal" / "instance-id").read_text().strip()
        taps[1].kill()  # kill -9 mid-load
        time.sleep(0.3)
        taps[1] = fleet_tap(tmp_path / "pod1", simulator.url, pg_url, "pod-1")  # same journal volume
        before = load.count()
        wait_until(lambda: load.count() > before + 60, timeout=90)
    finally:
        load.finish()
        for tap in taps:
            tap.stop()
    assert (tmp_path / "pod1" / "journal" / "instance-id").read_text().strip() == first_id

    stored = rows(pg_url, "SELECT exchange_id, response_id, instance_id, instance FROM exchanges")
    by_response = Counter(r[1] for r in stored if r[1])
    assert load.count() > 100
    assert [rid for rid in load.received if by_response[rid] != 1] == []
    assert len({r[0] for r in stored}) == len(stored)  # no exchange id twice
    ids = {r[2] for r in stored}
    assert len(ids) == 3 and first_id in ids  # the restarted pod kept its instance (and chain)
    assert {r[3] for r in stored} == {"pod-0", "pod-1", "pod-2"}

    verify = llmtap("audit", "verify", "--db", pg_url)
    assert verify.stdout.count("OK: instance") == 3, verify.stdout
    assert "pod-1" in verify.stdout

    # the saved chain heads (the writers' log lines) check out; a rewritten chain does not
    heads = tmp_path / "heads.log"
    heads.write_text("".join(t.output() for t in taps))
    assert "chain head {" in heads.read_text()
    assert "OK: instance" in llmtap("audit", "verify", "--db", pg_url, "--against", str(heads)).stdout
    assert PASSWORD not in "".join(t.output() for t in taps)  # the banner shows the URL without it

    # the API key reached no byte of the database's files
    pg_cluster.psql("CHECKPOINT")
    needle = API_KEY.encode()
    for path in pg_cluster.data.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path

    # tampering: an edited row is named with its instance
    victim = rows(pg_url, "SELECT id, instance_id FROM exchanges WHERE instance = 'pod-2' ORDER BY id LIMIT 1 OFFSET 3")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE exchanges SET cost_usd = 99 WHERE id = %s", (victim[0][0],))
    broken = llmtap("audit", "verify", "--db", pg_url, check=False)
    assert broken.returncode == 1
    assert f"BROKEN: instance {victim[0][1]} (pod-2): at row id={victim[0][0]}" in broken.stdout
    assert broken.stdout.count("OK: instance") == 2


def test_database_down_mid_traffic_is_invisible_to_clients_and_the_backlog_is_bounded(tmp_path, simulator, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    cluster = Cluster(free_port())
    try:
        cluster.start()
        url = cluster.create_database("fleet")
        roomy = fleet_tap(tmp_path / "roomy", simulator.url, url, "roomy")
        tight = fleet_tap(tmp_path / "tight", simulator.url, url, "tight", "--journal-max-bytes", "30000")
        received = {"roomy": [], "tight": []}

        def send(name, tap, n):
            client = tap.client()
            for i in range(n):
                received[name].append(
                    client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": f"{i}"}]).id
                )
            client.close()

        try:
            send("roomy", roomy, 10)
            send("tight", tight, 5)
            wait_until(lambda: stored_count(url) == 15, timeout=30)
            cluster.stop()
            started = time.monotonic()
            send("roomy", roomy, 40)  # every request answered while the database is away
            send("tight", tight, 40)
            assert time.monotonic() - started < 60
            assert roomy.metric("llmtap_audit_queue_depth") > 0
            wait_until(lambda: tight.metric("llmtap_audit_dropped_total") > 0, timeout=10)
            dropped = tight.metric("llmtap_audit_dropped_total")
            assert roomy.metric("llmtap_audit_dropped_total") == 0
            assert roomy.metric("llmtap_internal_errors_total", stage="audit") > 0
            time.sleep(1.5)  # the writers retry with backoff meanwhile
            cluster.start()
            wait_until(lambda: roomy.metric("llmtap_audit_queue_depth") == 0, timeout=60)
            wait_until(lambda: tight.metric("llmtap_audit_queue_depth") == 0, timeout=60)
        finally:
            roomy.stop()
            tight.stop()
        stored = rows(url, "SELECT response_id, instance FROM exchanges")
        counts = Counter(r[0] for r in stored)
        assert len(received["roomy"]) == 50 and len(received["tight"]) == 45
        assert all(counts[rid] == 1 for rid in received["roomy"])  # every row once
        tight_rows = [r for r in stored if r[1] == "tight"]
        assert all(counts[r[0]] == 1 for r in tight_rows)
        assert 0 < dropped < 40
        assert len(tight_rows) + dropped == 45  # the bound dropped exactly what it counted
        assert "OK: instance" in llmtap("audit", "verify", "--db", url).stdout
    finally:
        cluster.remove()


def test_import_from_sqlite_keeps_the_chain(tmp_path, simulator, pg_url):
    tap = start_tap(tmp_path, simulator.url)
    client = tap.client()
    for i in range(12):
        client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": f"import {i}"}])
    client.close()
    tap.stop()
    done = llmtap("audit", "import", "--from", str(tap.db), "--db", pg_url, "--instance-id", "laptop")
    assert "imported 12 rows" in done.stdout
    assert "OK: instance laptop: 12 rows" in llmtap("audit", "verify", "--db", pg_url).stdout
    import sqlite3

    with sqlite3.connect(tap.db) as conn:
        hashes = [r[0] for r in conn.execute("SELECT row_hash FROM exchanges ORDER BY id")]
    assert [r[0] for r in rows(pg_url, "SELECT row_digest FROM exchanges ORDER BY id")] == hashes  # raw digests
    ids = [r[0] for r in rows(pg_url, "SELECT exchange_id FROM exchanges ORDER BY id")]  # SQLite's bytes as text
    assert ids == [r["exchange_id"] for r in db_rows(tap.db)] and all(str(uuid.UUID(i)) == i for i in ids)
    # the SQLite head saved before the move checks out against PostgreSQL's copy
    saved = tmp_path / "head.json"
    saved.write_text(
        llmtap("audit", "head", "--db", str(tap.db)).stdout.replace('"instance_id": null', '"instance_id": "laptop"')
    )
    assert (
        "OK: instance laptop still holds" in llmtap("audit", "verify", "--db", pg_url, "--against", str(saved)).stdout
    )
    # a second import of the same history is refused (exchange ids are unique), nothing half-done
    again = llmtap("audit", "import", "--from", str(tap.db), "--db", pg_url, check=False)
    assert again.returncode != 0
    assert rows(pg_url, "SELECT count(*) FROM exchanges")[0][0] == 12


def test_a_sidecar_role_with_only_insert_and_select_works_after_the_owner_migrates(
    tmp_path, simulator, pg_cluster, pg_url
):
    database = pg_url.rsplit("/", 1)[1]
    pg_cluster.psql("CREATE ROLE sidecar LOGIN PASSWORD 'sidecar-pw'")
    try:
        pg_cluster.psql(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
        pg_cluster.psql(f"GRANT CONNECT ON DATABASE {database} TO sidecar")
        migrated = llmtap("audit", "migrate", "--db", pg_url, "--grant", "sidecar")
        assert "applied migration(s) 1, 2, 3" in migrated.stdout and "granted to sidecar" in migrated.stdout
        assert "schema already current" in llmtap("audit", "migrate", "--db", pg_url).stdout
        sidecar_url = pg_url.replace("postgres@", "sidecar@")
        grants = rows(
            pg_url,
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants WHERE grantee = 'sidecar'",
        )
        rolled = ("rollups", "rollups_daily", "rollup_watermarks", "rolled_up")
        privileges = set(r[1] for r in grants if r[0] not in rolled)
        assert privileges == {"SELECT", "INSERT"}  # the rows: insert-only
        for table in rolled:
            assert {r[1] for r in grants if r[0] == table} == {"SELECT", "INSERT", "UPDATE"}  # added to
        tap = fleet_tap(tmp_path, simulator.url, sidecar_url, "restricted", env={"PGPASSWORD": "sidecar-pw"})
        client = tap.client()
        ids = [
            client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "x"}]).id
            for _ in range(5)
        ]
        client.close()
        wait_until(lambda: stored_count(pg_url) == 5, timeout=30)
        tap.stop()
        assert sorted(r[0] for r in rows(pg_url, "SELECT response_id FROM exchanges")) == sorted(ids)
        assert "sidecar-pw" not in tap.output()
    finally:
        pg_cluster.psql(f"DROP DATABASE {database} WITH (FORCE)")
        pg_cluster.psql("DROP OWNED BY sidecar")
        pg_cluster.psql("DROP ROLE sidecar")


def test_report_totals_across_instances_match_what_the_clients_saw(tmp_path, simulator, pg_url):
    taps = {name: fleet_tap(tmp_path / name, simulator.url, pg_url, name) for name in ("east", "west")}
    seen = {name: {"requests": 0, "input": 0, "output": 0} for name in taps}
    for name, n in (("east", 7), ("west", 4)):
        client = taps[name].client()
        for i in range(n):
            answer = client.chat.completions.create(
                model="pulze", messages=[{"role": "user", "content": f"{name} {i}"}]
            )
            seen[name]["requests"] += 1
            seen[name]["input"] += answer.usage.prompt_tokens
            seen[name]["output"] += answer.usage.completion_tokens
        client.close()
    for tap in taps.values():
        tap.stop()
    costs = {name: sum(r.cost_usd for r in tap.records()) for name, tap in taps.items()}
    report = json.loads(llmtap("report", "--db", pg_url, "--by", "instance", "--format", "json").stdout)
    by = {row["instance"]: row for row in report["rows"]}
    assert set(by) == {"east", "west"}
    for name in taps:
        assert by[name]["requests"] == seen[name]["requests"]
        assert by[name]["input_tokens"] == seen[name]["input"]
        assert by[name]["output_tokens"] == seen[name]["output"]
        assert by[name]["cost_usd"] == pytest.approx(costs[name], rel=1e-12)
    assert report["totals"]["requests"] == 11
    assert report["totals"]["cost_usd"] == pytest.approx(sum(costs.values()), rel=1e-12)
    # every --by dimension works on PostgreSQL and partitions the same totals
    for by in ("model", "provider", "app", "key", "day", "hour", "status", "label:team"):
        grouped = json.loads(llmtap("report", "--db", pg_url, "--by", by, "--format", "json").stdout)
        assert sum(row["requests"] for row in grouped["rows"]) == 11, by
        assert sum(row["cost_usd"] or 0 for row in grouped["rows"]) == pytest.approx(sum(costs.values()), rel=1e-9), by
    # exact money: the database sums decimals, no float drift
    exact = rows(pg_url, "SELECT sum(cost_usd)::text FROM exchanges")[0][0]
    assert float(exact) == pytest.approx(sum(costs.values()), rel=1e-12)


def test_a_server_url_needs_a_journal_dir_and_never_prints_its_password(tmp_path, simulator):
    done = subprocess.run(
        [LLMTAP, "run", "--db", "postgresql://u:hunter2@127.0.0.1:1/x", "--listen-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "journal-dir" in done.stdout + done.stderr
    assert "hunter2" not in done.stdout + done.stderr


def test_instance_id_is_created_once_and_kept(tmp_path):
    first = postgres.instance_id(str(tmp_path / "j"))
    assert len(first) == 16
    assert postgres.instance_id(str(tmp_path / "j")) == first
    assert os.stat(tmp_path / "j").st_mode & 0o777 == 0o700


# --- compose `fleet` profile and the "Audit — exact spend" dashboard --------------------------
AUDIT_DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "audit" / "exact-spend.json"


def test_compose_fleet_profile_validates_and_wires_postgres() -> None:
    import yaml
    from test_deploy import DASHBOARDS, REPO, compose_config, run, tool

    # exactly what a user types: compose reads docker-compose.yml and docker-compose.override.yml
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMTAP_", "GRAFANA_", "COMPOSE_"))}
    run(tool("docker-compose"), "--profile", "fleet", "config", "-q", cwd=REPO, env=env)
    services = yaml.safe_load(run(tool("docker-compose"), "--profile", "fleet", "config", cwd=REPO, env=env))[
        "services"
    ]
    assert {"postgres", "audit-migrate", "llmtap-fleet-a", "llmtap-fleet-b", "fleet-simulator", "grafana"} <= set(
        services
    )
    raw = yaml.safe_load((REPO / "docker-compose.override.yml").read_text())["services"]
    assert all(s.get("profiles") == ["fleet"] for name, s in raw.items() if name != "grafana")
    assert {"fleet-traffic-a", "fleet-traffic-b"} <= set(services)
    names = set()
    for name in ("llmtap-fleet-a", "llmtap-fleet-b"):
        command = services[name]["command"]
        db = command[command.index("--db") + 1]
        assert db.startswith("postgresql://llmtap_sidecar@postgres:5432/") and ":" not in db.split("@")[0][13:]
        journal = command[command.index("--journal-dir") + 1]
        assert any(v.endswith(f":{journal}:rw") or v.endswith(f":{journal}") for v in services[name]["volumes"])
        names.add(command[command.index("--instance") + 1])
        assert services[name]["environment"]["PGPASSWORD"]
        assert command[command.index("--upstream") + 1] == "http://fleet-simulator:8000"
    assert len(names) == 2
    migrate = services["audit-migrate"]["command"]
    assert migrate[:2] == ["audit", "migrate"] and "llmtap_sidecar" in migrate and "grafana_reader" in migrate
    datasource = yaml.safe_load((DASHBOARDS / "provisioning/datasources/postgres.yml").read_text())["datasources"][0]
    dashboard = json.loads(AUDIT_DASHBOARD.read_text())
    assert all(p["datasource"]["uid"] == datasource["uid"] for p in dashboard["panels"])
    assert datasource["url"] == "postgres:5432" and datasource["jsonData"]["database"] == "llmtap"
    assert "GRAFANA_PG_PASSWORD" in services["grafana"]["environment"]
    # the init script's roles are the ones migrate grants to and the sidecars and Grafana use
    init = (REPO / "deploy" / "postgres-init.sh").read_text()
    assert "CREATE ROLE llmtap_sidecar" in init and "CREATE ROLE grafana_reader" in init
    assert datasource["user"] == "grafana_reader"
    # docker-compose.yml alone (what the other tests read) has no fleet service
    assert "postgres" not in compose_config("demo")["services"]


def expand_macros(sql: str, since: float, until: float) -> str:
    """Grafana's PostgreSQL macros as Grafana expands them for the dashboard's time range."""
    sql = re.sub(r"\$__unixEpochFilter\((\w+)\)", rf"\1 >= {since} AND \1 <= {until}", sql)
    assert "$" not in sql, sql
    return sql


def test_every_audit_dashboard_panel_runs_against_the_real_database(tmp_path, simulator, pg_url):
    taps = {name: fleet_tap(tmp_path / name, simulator.url, pg_url, name) for name in ("east", "west")}
    for name, n in (("east", 6), ("west", 3)):
        client = taps[name].client()
        for i in range(n):
            client.chat.completions.create(
                model="pulze",
                messages=[{"role": "user", "content": f"{name} {i}"}],
                extra_headers={"Pulze-Labels": json.dumps({"team": name})},
            )
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="pulze", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Sim-Fault": "500"}
            )
        client.close()
    for tap in taps.values():
        tap.stop()
    records = [r for tap in taps.values() for r in tap.records()]
    assert len(records) == 11
    known = [r for r in records if r.cost_usd is not None]
    assert len(known) == 9
    total = sum(r.cost_usd for r in known)

    dashboard = json.loads(AUDIT_DASHBOARD.read_text())
    results = {}
    now = time.time()
    with psycopg.connect(pg_url) as conn:
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                cur = conn.execute(expand_macros(target["rawSql"], now - 7 * 86400, now + 60))
                names = [d.name for d in cur.description]
                results[panel["title"]] = [dict(zip(names, row)) for row in cur.fetchall()]
                assert results[panel["title"]], f"{panel['title']}: no rows"
    assert float(results["Spend (exact, USD)"][0]["spend_usd"]) == pytest.approx(total, rel=1e-12)
    assert results["Requests"][0]["requests"] == 11
    assert results["Rows with unknown cost"][0]["unknown_cost_rows"] == 2
    assert float(results["Known-cost share"][0]["known_share"]) == pytest.approx(9 / 11)
    assert float(sum(r["spend_usd"] for r in results["Spend by day (UTC)"])) == pytest.approx(total, rel=1e-12)
    for title in ("Spend by model", "Spend by provider", "Spend by app", "Spend by API key fingerprint"):
        assert sum(r["requests"] for r in results[title]) == 11, title
        assert float(sum(r["spend_usd"] or 0 for r in results[title])) == pytest.approx(total, rel=1e-12), title
    by_label = {r["label"]: r for r in results["Spend by label"]}
    for name in taps:
        mine = [r for r in taps[name].records() if r.cost_usd is not None]
        assert float(by_label[f"team={name}"]["spend_usd"]) == pytest.approx(sum(r.cost_usd for r in mine), rel=1e-12)
    assert sum(r["rows"] for r in results["Unknown-cost rows by model and error"]) == 2
    assert {r["outcome"] for r in results["Unknown-cost rows by model and error"]} == {"http_500"}
    expensive = results["Most expensive exchanges"]
    assert float(expensive[0]["cost_usd"]) == pytest.approx(max(r.cost_usd for r in known), rel=1e-12)
    assert len(expensive) == 9
    fresh = {r["instance"]: r for r in results["Per-instance freshness"]}
    assert set(fresh) == {"east", "west"}
    assert fresh["east"]["rows"] == 7 and fresh["west"]["rows"] == 4
    assert all(0 <= r["seconds_since_last_row"] < 600 for r in fresh.values())


# --- the store itself ---------------------------------------------------------------------------
def journal_line(exchange_id: str, **fields) -> bytes:
    from llmtap.record import ExchangeRecord

    record = ExchangeRecord(
        exchange_id=exchange_id,
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=time.time() - fields.pop("age", 0.0),
        response_end=time.time(),
        cost_usd=fields.pop("cost_usd", 0.000123),
        labels={"team": "a"},
        instance="unit",
        **fields,
    )
    return record.to_json().encode()


def test_a_replayed_exchange_id_is_a_no_op_only_when_its_hash_matches(pg_url):
    store = postgres.PostgresStore(pg_url, "inst-1", capture_content=False)
    try:
        lines = [journal_line(f"ex-{i}") for i in range(3)]
        assert len(store.apply(1, lines, 300).records) == 3
        replay = store.apply(1, lines, 300)  # the same records again (a generation replayed)
        assert replay.records == [] and replay.conflicts == [] and replay.rejected == []
        forged = journal_line("ex-1", cost_usd=0.5)  # same exchange id, other contents
        mixed = store.apply(2, [forged, journal_line("ex-new")], 200)
        assert mixed.conflicts == ["ex-1"]
        assert [r["exchange_id"] for r in mixed.records] == ["ex-new"]
        stored = rows(pg_url, "SELECT exchange_id, cost_usd::float8 FROM exchanges ORDER BY id")
        assert stored == [("ex-0", 0.000123), ("ex-1", 0.000123), ("ex-2", 0.000123), ("ex-new", 0.000123)]
        # a NUL in a field costs nothing: stored as U+FFFD, hashed as stored
        assert store.apply(3, [journal_line("ex-nul", error_message="bad\x00byte")], 100).records
        assert rows(pg_url, "SELECT error_message FROM exchanges WHERE exchange_id = 'ex-nul'") == [("bad\ufffdbyte",)]
        # the offsets came back with the store (committed with the rows)
        again = postgres.PostgresStore(pg_url, "inst-1", capture_content=False)
        assert again.offsets == {1: 300, 2: 200, 3: 100} and again.head == store.head and again.rows == 5
        again.close()
        assert all(r.check.ok for r in postgres.verify(store.conn))
    finally:
        store.close()


def test_retention_prunes_each_chain_and_verify_still_passes(pg_url):
    old, new = postgres.PostgresStore(pg_url, "old", capture_content=False), None
    try:
        new = postgres.PostgresStore(pg_url, "new", capture_content=False)
        old.apply(1, [journal_line(f"o{i}", age=10 * 86400) for i in range(5)] + [journal_line("o-recent")], 1)
        new.apply(1, [journal_line(f"n{i}", age=10 * 86400) for i in range(3)], 1)
        head, length = old.head, old.rows
        assert old.prune(time.time() - 86400, 500) == 5
        assert rows(pg_url, "SELECT count(*) FROM exchanges WHERE instance_id = 'new'") == [(3,)]  # other chain kept
        checks = {c.instance_id: c for c in postgres.verify(old.conn)}
        assert checks["old"].check.ok and checks["old"].check.rows == 1 and checks["old"].pruned == 5
        assert checks["new"].check.ok and checks["new"].check.rows == 3
        assert postgres.chain_head(old.conn, "old") == (head, length)
        old.apply(2, [journal_line("o-after")], 1)  # the chain goes on from its anchor
        assert all(c.check.ok for c in postgres.verify(old.conn))
    finally:
        old.close()
        if new is not None:
            new.close()


def test_database_unreachable_at_start_traffic_flows_and_rows_arrive_later(tmp_path, simulator, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    cluster = Cluster(free_port())  # initialised, not started yet
    try:
        url = cluster.url()
        tap = fleet_tap(tmp_path, simulator.url, url, "early")
        try:
            client = tap.client()
            ids = [
                client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "x"}]).id
                for _ in range(8)
            ]
            client.close()
            wait_until(lambda: tap.metric("llmtap_audit_queue_depth") == 8, timeout=10)
            wait_until(lambda: tap.metric("llmtap_internal_errors_total", stage="audit") > 0, timeout=10)  # counted
            cluster.start()
            wait_until(lambda: tap.metric("llmtap_audit_queue_depth") == 0, timeout=60)
        finally:
            tap.stop()
        assert sorted(r[0] for r in rows(url, "SELECT response_id FROM exchanges")) == sorted(ids)
        assert PASSWORD not in tap.output()
    finally:
        cluster.remove()


def test_a_password_in_the_url_reaches_no_argv_and_no_output(tmp_path, simulator, pg_cluster, pg_url, monkeypatch):
    monkeypatch.delenv("PGPASSWORD")
    with_password = pg_url.replace("postgres@", f"postgres:{PASSWORD}@")
    tap = fleet_tap(tmp_path, simulator.url, with_password, "secretive")
    try:
        client = tap.client()
        client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": "x"}])
        client.close()
        wait_until(lambda: stored_count(with_password) == 1, timeout=30)
        children = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat") if _ppid(p) == tap.proc.pid]
        writers = [pid for pid in children if b"llmtap.audit.writer" in _cmdline(pid)]
        assert len(writers) == 1
        assert PASSWORD.encode() not in _cmdline(writers[0])
        assert b"postgres:***@" in _cmdline(writers[0])
    finally:
        tap.stop()
    assert PASSWORD not in tap.output() and "postgres:***@" in tap.output()


def _ppid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_saved_chain_head_reveals_rows_cut_from_the_end_sqlite_too(tmp_path, simulator):
    tap = start_tap(tmp_path, simulator.url)
    client = tap.client()
    for i in range(4):
        client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": f"{i}"}])
    client.close()
    tap.stop()
    log = tmp_path / "heads.log"
    log.write_text(tap.output())
    assert '"rows": 4' in log.read_text()
    assert "still holds the saved head" in llmtap("audit", "verify", "--db", str(tap.db), "--against", str(log)).stdout
    import sqlite3

    with sqlite3.connect(tap.db) as conn:  # the newest row deleted: the chain alone still verifies
        conn.execute("DELETE FROM exchanges WHERE id = (SELECT max(id) FROM exchanges)")
    assert llmtap("audit", "verify", "--db", str(tap.db)).returncode == 0
    cut = llmtap("audit", "verify", "--db", str(tap.db), "--against", str(log), check=False)
    assert cut.returncode == 1 and "was rewritten or cut" in cut.stdout


def test_journal_positions_are_kept_small_when_the_role_may_delete(pg_url):
    store = postgres.PostgresStore(pg_url, "tidy", capture_content=False)
    try:
        for batch in range(5):
            store.apply(1, [journal_line(f"t{batch}")], 100 * (batch + 1))
        assert rows(pg_url, "SELECT count(*) FROM journal_positions WHERE gen = 1") == [(5,)]
        store.forget(1)  # the generation is retired: its number may come back, from 0
        assert rows(pg_url, 'SELECT "offset" FROM journal_positions WHERE gen = 1') == [(0,)]
        again = postgres.PostgresStore(pg_url, "tidy", capture_content=False)
        assert again.offsets == {1: 0}
        again.close()
    finally:
        store.close()


def test_report_by_instance_on_sqlite(tmp_path, simulator):
    tap = start_tap(tmp_path, simulator.url, "--instance", "laptop")
    client = tap.client()
    for i in range(3):
        client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": f"{i}"}])
    client.close()
    tap.stop()
    report = json.loads(llmtap("report", "--db", str(tap.db), "--by", "instance", "--format", "json").stdout)
    assert [(row["instance"], row["requests"]) for row in report["rows"]] == [("laptop", 3)]


def test_any_record_reads_back_from_postgresql_as_it_was_hashed(pg_url):
    """Generated records (odd values anywhere, as in test_row_paths) through the PostgreSQL
    store: every one makes a row, and numeric money, jsonb (a float such as 1e+16 that jsonb
    gives back as an integer is kept exactly in json_exact), times no timestamptz holds, all
    read back to the hashed body."""
    from hypothesis import HealthCheck, given, settings
    from test_row_paths import RECORD_DATA

    store = postgres.PostgresStore(pg_url, "generated", capture_content=False)
    seen = []

    @settings(derandomize=True, deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(RECORD_DATA)
    def stored(data: dict) -> None:
        data = {**data, "exchange_id": f"gen-{len(seen)}"}
        line = json.dumps(data).encode()
        batch = store.apply(1, [line], len(seen) + 1)
        assert batch.conflicts == [] and batch.rejected == [] and batch.corrupt == []  # an odd value costs no row
        seen.append(len(batch.records))

    try:
        stored()
        checks = postgres.verify(store.conn)
    finally:
        store.close()
    assert len(seen) == 200 and sum(seen) == 200
    assert [c.check.reason for c in checks if not c.check.ok] == []
    assert checks[0].check.rows == rows(pg_url, "SELECT count(*) FROM exchanges")[0][0] == 200


def test_any_sqlite_history_imports_with_its_chain_intact(tmp_path, pg_url):
    from hypothesis import HealthCheck, given, settings
    from test_row_paths import RECORD_DATA

    from llmtap.audit.sqlite import AuditStore

    lite = AuditStore(str(tmp_path / "odd.db"), fsync_batch=False, capture_content=False)
    count = []

    @settings(derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
    @given(RECORD_DATA)
    def stored(data: dict) -> None:
        data = {**data, "exchange_id": f"lite-{len(count)}"}
        count.append(len(lite.apply(1, [json.dumps(data).encode()], len(count) + 1).records))

    try:
        stored()
    finally:
        lite.close()
    _, copied = postgres.import_sqlite(str(tmp_path / "odd.db"), pg_url, "odd")
    assert copied == sum(count) > 100
    with psycopg.connect(pg_url) as conn:
        checks = postgres.verify(conn)
    assert [(c.instance_id, c.check.ok, c.check.rows) for c in checks] == [("odd", True, copied)]
