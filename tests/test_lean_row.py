"""The lean audit row (issue 17): the metadata remainder, raw digests, and verify at scale.

Old rows (TEXT ``sha256:`` hashes, whole metadata) and new ones (BLOB digests, remainder) live
in one chain; verify streams it, shows progress, checks a range and resumes from a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from audit_helpers import db_rows, make_record
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtap.audit import postgres
from llmtap.audit.report import audit
from llmtap.audit.rows import (
    BEST_MODELS_BIT,
    FIRST_CANDIDATE_BIT,
    HELD,
    RowBuilder,
    as_digest,
    as_hex,
    body_json,
    chain_digest,
    metadata_of,
    row_builder,
)
from llmtap.audit.sqlite import IMPLIED, PACKED_IDS, AuditStore, packed_id, verify_chain
from llmtap.protocols.pulze import metadata_fields
from llmtap.record import canonical_json

FIXTURE = Path(__file__).parent / "fixtures" / "v1_audit"
TYPES = postgres.sqlite_types()

# --- the metadata remainder -----------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 1, 0, 2.7e-06, 200]),
    text,
)
leaf = st.one_of(scalar, st.dictionaries(text, scalar, max_size=3), st.lists(scalar, max_size=3))
tilde_keys = st.sampled_from(["~", "~~", "~x"])


@st.composite
def pulze_metadata(draw):
    """A Pulze-like metadata object: each known field absent, null, mistyped or plausible."""
    metadata = {}
    for parent, key, _ in HELD:
        if draw(st.booleans()):
            holder = metadata if parent is None else metadata.setdefault(parent, {} if draw(st.integers(0, 9)) else [])
            if isinstance(holder, dict):
                holder[key] = draw(leaf)
    if draw(st.booleans()):  # the router's pick, in best_models and first among the candidates, as a rule
        name, score = draw(st.sampled_from(["openai/gpt-4o", "x"])), draw(st.sampled_from([0.8, 1.0, 1, -0.0, 0.0]))
        pick = draw(st.sampled_from([{name: score}, {name: 0.5}, {name: score, "y": 1}, name]))
        scores = {"best_models": draw(st.sampled_from([[pick], [pick, pick], [], pick]))}
        scores["candidates"] = draw(st.lists(st.sampled_from([pick, {name: score}, {"z": 0.1}]), max_size=3))
        metadata["scores"] = draw(st.sampled_from([scores, {"candidates": scores["candidates"]}, [], {}]))
        metadata["score"] = draw(st.sampled_from([score, 0.5, None]))
    metadata.update(draw(st.dictionaries(st.one_of(text, tilde_keys), leaf, max_size=3)))
    return metadata


@settings(max_examples=300, deadline=None)
@given(
    metadata=pulze_metadata(),
    changed=st.sets(st.sampled_from([*(name for _, _, name in HELD), "best_model"]), max_size=4),
)
def test_metadata_is_rebuilt_exactly_from_columns_and_remainder(metadata, changed):
    data = make_record(1).to_dict() | metadata_fields(metadata, keep_content=True)
    data["cost_usd"] = data.pop("reported_cost_usd")
    for name in changed:  # columns that disagree with the metadata keep the leaf in the remainder
        data[name] = "other" if TYPES[name] == "TEXT" else 7
    data["metadata"] = metadata
    row = row_builder(TYPES)(data) | {"row_hash": bytes(32)}
    assert metadata_of(row) == json.loads(canonical_json(metadata))  # what the old format stored
    assert data["metadata"] == metadata  # not changed: the writer builds spans from it
    body = RowBuilder(TYPES)(data, clean=True)[2]
    assert body == body_json(row)  # the fast path agrees with the reference


def test_a_typical_pulze_remainder_keeps_only_what_no_column_holds():
    metadata = {
        "app_id": "app-1",
        "model": {"model": "gpt-4o-mini", "provider": "openai", "namespace": "openai/gpt-4o-mini"},
        "costs": {"prompt_tokens": 2.7e-06, "completion_tokens": 1.8e-05, "total_tokens": 2.07e-05},
        "latency": 0.601,
        "labels": {"team": "search"},
        "score": 0.78,
        "scores": {"best_models": [{"openai/gpt-4o-mini": 0.78}]},
        "status_code": 200,
        "retries": 0,
        "warning": None,
        "error": None,
    }
    data = make_record(1).to_dict() | metadata_fields(metadata, keep_content=False) | {"metadata": metadata}
    data["cost_usd"] = data.pop("reported_cost_usd")
    row = row_builder(TYPES)(data) | {"row_hash": bytes(32)}
    held = {"app_id", "served_model", "served_provider", "served_namespace", "cost_prompt_usd", "cost_completion_usd"}
    held |= {"cost_usd", "upstream_latency_s", "response_labels", "score", "upstream_status_code", "retries"}
    held |= {"warning", "upstream_error"}
    mask = sum(1 << bit for bit, (_, _, name) in enumerate(HELD) if name in held) | 1 << BEST_MODELS_BIT
    assert json.loads(row["metadata_json"]) == {"~": mask}  # the pick is best_model and score
    assert metadata_of(row) == metadata
    metadata["scores"]["candidates"] = [{"openai/gpt-4o-mini": 0.78}, {"openai/gpt-4o": 0.5}]
    data["metadata"] = metadata
    row = row_builder(TYPES)(data) | {"row_hash": bytes(32)}
    remainder = {"scores": {"candidates": [{"openai/gpt-4o": 0.5}]}, "~": mask | 1 << FIRST_CANDIDATE_BIT}
    assert json.loads(row["metadata_json"]) == remainder
    assert metadata_of(row) == metadata
    metadata["scores"]["candidates"] = [{"openai/gpt-4o-mini": 0.78}]  # the pick alone: scores goes whole
    row = row_builder(TYPES)(data) | {"row_hash": bytes(32)}
    assert json.loads(row["metadata_json"]) == {"~": mask | 1 << FIRST_CANDIDATE_BIT}
    assert metadata_of(row) == metadata
    old = row | {"row_hash": "sha256:" + "0" * 64, "metadata_json": canonical_json({"~": 5, "latency": 1})}
    assert metadata_of(old) == {"~": 5, "latency": 1}  # an old row's metadata is whole: no mask read


# --- SQLite: mixed formats, range, checkpoint, progress, memory -----------------------------------


def apply(store: AuditStore, records, gen: int = 7) -> None:
    lines = [(record.to_json() + "\n").encode() for record in records]
    end = store.offsets.get(gen, 0) + sum(map(len, lines))
    assert store.apply(gen, lines, end).records


def verify(*args: str):
    return CliRunner().invoke(audit, ["verify", *args])


def test_old_text_rows_then_new_blob_rows_verify_as_one_chain(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "audit")
    db = tmp_path / "audit" / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    apply(store, [make_record(100 + i) for i in range(5)])
    store.close()
    conn = sqlite3.connect(db)
    kinds = [k for (k,) in conn.execute("SELECT typeof(row_hash) FROM exchanges ORDER BY id")]
    assert kinds == ["text"] * 4 + ["blob"] * 5
    stored = conn.execute("SELECT prev_hash FROM exchanges WHERE typeof(row_hash) = 'blob'").fetchall()
    assert stored == [(IMPLIED,)] * 5  # each new row's link is implied by the row before it
    last_old = conn.execute(
        "SELECT row_hash FROM exchanges WHERE typeof(row_hash) = 'text' ORDER BY id DESC"
    ).fetchone()
    first_new = next(row for row in db_rows(db) if isinstance(row["row_hash"], bytes))
    assert as_hex(first_new["prev_hash"]) == last_old[0]  # chained on from the last old row's digest
    assert first_new["row_hash"] == chain_digest(as_digest(last_old[0]), body_json(first_new))
    assert verify_chain(conn).ok and verify_chain(conn).rows == 9
    conn.execute("UPDATE exchanges SET path = '/edited' WHERE id = 2")  # an old row
    conn.commit()
    assert verify_chain(conn).broken_id == 2
    conn.close()


def test_verify_names_an_edited_and_a_removed_lean_row(tmp_path):
    db = tmp_path / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    apply(store, [make_record(i, request_start=1.8e9 + i * 3600, response_end=1.8e9 + i * 3600 + 1) for i in range(10)])
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE exchanges SET metadata_json = '{}' WHERE id = 4")  # the remainder is hashed too
    conn.commit()
    broken = verify("--db", str(db))
    assert broken.exit_code == 1 and "id=4" in broken.output and "edited" in broken.output
    conn.execute("DELETE FROM exchanges WHERE id = 7")
    conn.commit()
    conn.close()
    # a range from row 5 starts at the link of the row before it (row 4's row_hash, as stored)
    gap = verify("--db", str(db), "--since", "2027-01-15T12:00:00")
    assert gap.exit_code == 1 and "id=8" in gap.output and "removed" in gap.output
    assert "2 rows before it verified" in gap.output


def test_a_range_checks_the_links_inside_it(tmp_path):
    db = tmp_path / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    records = [make_record(i, request_start=1.8e9 + i * 3600, response_end=1.8e9 + i * 3600 + 1) for i in range(10)]
    apply(store, records)
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE exchanges SET path = '/edited' WHERE id = 2")  # before the range
    conn.commit()
    since, until = "2027-01-15T11:00:00", "2027-01-15T15:00:00"  # 1.8e9 + 3 h .. + 7 h: ids 4 to 7
    ranged = verify("--db", str(db), "--since", since, "--until", until)
    assert ranged.exit_code == 0 and "OK: 4 rows" in ranged.output and "range's first row" in ranged.output
    conn.execute("UPDATE exchanges SET path = '/edited' WHERE id = 6")  # inside it
    conn.commit()
    conn.close()
    assert "id=6" in verify("--db", str(db), "--since", since, "--until", until).output
    empty = verify("--db", str(db), "--since", "2030-01-01")  # a range that holds no rows
    assert empty.exit_code == 0 and "OK: 0 rows" in empty.output


def test_a_checkpoint_resumes_and_catches_an_edit_after_it_or_of_it(tmp_path):
    db, saved = tmp_path / "llmtap.db", tmp_path / "verify.checkpoint"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    apply(store, [make_record(i) for i in range(20)])
    first = verify("--db", str(db), "--checkpoint", str(saved))
    assert first.exit_code == 0 and "OK: 20 rows" in first.output
    (doc,) = [json.loads(line) for line in saved.read_text().splitlines()]
    assert doc["id"] == 20 and doc["rows"] == 20 and doc["head"] == store.head and doc["instance_id"] is None
    apply(store, [make_record(i) for i in range(20, 30)])
    store.close()
    resumed = verify("--db", str(db), "--checkpoint", str(saved))
    assert resumed.exit_code == 0 and "OK: 10 rows" in resumed.output and "checkpoint at row id=20" in resumed.output
    assert json.loads(saved.read_text())["rows"] == 30
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    apply(store, [make_record(i) for i in range(30, 40)])
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE exchanges SET path = '/edited' WHERE id = 35")  # after the checkpoint
    conn.commit()
    broken = verify("--db", str(db), "--checkpoint", str(saved))
    assert broken.exit_code == 1 and "id=35" in broken.output and "4 rows before it verified" in broken.output
    assert json.loads(saved.read_text())["id"] == 34  # the verified prefix is kept
    conn.execute("UPDATE exchanges SET path = '/edited' WHERE id = 34")  # the checkpoint's own row, hash kept
    conn.commit()
    conn.close()
    again = verify("--db", str(db), "--checkpoint", str(saved))
    assert again.exit_code == 1 and "row id=34 no longer holds" in again.output


def test_progress_lines_go_to_stderr_when_it_is_no_terminal(tmp_path):
    db = tmp_path / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    apply(store, [make_record(i) for i in range(3)])
    store.close()
    done = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", "audit", "verify", "--db", str(db)], capture_output=True, text=True
    )
    assert done.returncode == 0 and "OK: 3 rows" in done.stdout
    assert "3 rows to check" in done.stderr and "done: 3 of 3 rows (100%)" in done.stderr


PEAK_RSS = """
import resource, sys
from llmtap.audit.report import audit
try:
    audit.main(["verify", "--db", sys.argv[1]], standalone_mode=False)
finally:
    print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_verify_kb(db: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(db)], capture_output=True, text=True, check=True)
    return int(done.stderr.rsplit("peak_kb", 1)[1])


def test_verify_memory_stays_flat_from_20k_to_200k_rows(tmp_path):
    small, large = tmp_path / "small.db", tmp_path / "large.db"
    template = make_record(0)
    for db, count in ((small, 20_000), (large, 200_000)):
        store = AuditStore(str(db), fsync_batch=False, capture_content=False)
        for start in range(0, count, 10_000):
            apply(store, [template.replace(exchange_id=f"ex-{i}") for i in range(start, start + 10_000)])
        store.close()
    small_kb, large_kb = peak_verify_kb(small), peak_verify_kb(large)
    # ten times the rows: a chain held in memory would take ~1 KB a row (+180 MB); streaming, a few MB
    assert large_kb < small_kb + 30_000, (small_kb, large_kb)


# --- PostgreSQL: the same lean rows, after imported old ones --------------------------------------


def test_postgres_old_rows_then_lean_rows_verify_and_edits_and_gaps_are_named(tmp_path, pg_url):
    shutil.copytree(FIXTURE, tmp_path / "audit")
    _, copied = postgres.import_sqlite(str(tmp_path / "audit" / "llmtap.db"), pg_url, "laptop")
    assert copied == 4
    store = postgres.PostgresStore(pg_url, "laptop", capture_content=False)
    try:
        apply(store, [make_record(200 + i) for i in range(6)])
        formats = store.conn.execute("SELECT row_digest IS NOT NULL FROM exchanges ORDER BY id").fetchall()
        assert [lean for (lean,) in formats] == [False] * 4 + [True] * 6
        (check,) = postgres.verify(store.conn)
        assert check.check.ok and check.check.rows == 10 and check.head == store.head
        saved = tmp_path / "pg.checkpoint"
        first = verify("--db", pg_url, "--checkpoint", str(saved))
        assert first.exit_code == 0 and "OK: instance laptop: 10 rows" in first.output, first.output
        assert json.loads(saved.read_text()) == {"instance_id": "laptop", "id": 10, "head": store.head, "rows": 10}
        apply(store, [make_record(300)])
        resumed = verify("--db", pg_url, "--checkpoint", str(saved))
        assert "OK: instance laptop: 1 rows" in resumed.output and "checkpoint at row id=10" in resumed.output
        ranged = verify("--db", pg_url, "--since", "2000-01-01")
        assert ranged.exit_code == 0 and "11 rows" in ranged.output and "range's first row" in ranged.output
        store.conn.execute("UPDATE exchanges SET app_id = 'edited' WHERE exchange_id = 'ex-00202'")
        (edited,) = postgres.verify(store.conn)
        assert not edited.check.ok and edited.check.broken_exchange_id == "ex-00202" and "edited" in edited.check.reason
        store.conn.execute("DELETE FROM exchanges WHERE exchange_id = 'ex-00202'")
        (gap,) = postgres.verify(store.conn)
        assert gap.check.broken_exchange_id == "ex-00203" and "removed" in gap.check.reason
        full = verify("--db", pg_url)
        assert full.exit_code == 1 and "exchange_id=ex-00203" in full.output
    finally:
        store.close()


# --- SQLite: llmtap's own ids as raw bytes, the link implied ----------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(PACKED_IDS)),
    text=st.one_of(
        st.uuids().map(str),
        st.binary(min_size=8, max_size=16).map(bytes.hex),
        st.uuids().map(lambda u: str(u).upper()),
        st.text(alphabet="0123456789abcdefABCDEF- g", max_size=40),
        st.text(max_size=40),
    ),
)
def test_an_id_is_packed_only_in_its_canonical_form_and_reads_back_exactly(name, text):
    pack, unpack = PACKED_IDS[name]
    stored = pack(text)
    if isinstance(stored, bytes):
        assert len(stored) == {"exchange_id": 16, "trace_id": 16, "span_id": 8}[name]
        assert unpack(stored) == text
    else:
        assert stored is text


def test_ids_are_stored_as_bytes_and_read_back_as_the_text_hashed(tmp_path):
    db = tmp_path / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=True)
    flow_id, trace, span = (
        "e7b227e9-4665-4a19-9d10-6a37e58376fb",
        "4110b8bc24c1276c74d6d11fd0cce893",
        "f6de2fbe80915aaf",
    )
    said = ({"role": "user", "content": "hi"},)
    records = [
        make_record(0, exchange_id=flow_id, trace_id=trace, span_id=span, input_messages=said),
        make_record(1, trace_id=trace.upper(), input_messages=said),  # not canonical: stays text, as ex-00001 does
    ]
    apply(store, records)
    store.close()
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT typeof(exchange_id), typeof(trace_id), typeof(span_id), prev_hash FROM exchanges")
    assert stored.fetchall() == [("blob", "blob", "blob", IMPLIED), ("text", "text", "blob", IMPLIED)]
    found = conn.execute("SELECT id FROM exchanges WHERE exchange_id = ?", (packed_id("exchange_id", flow_id),))
    assert found.fetchall() == [(1,)]
    joined = "SELECT count(*) FROM content c JOIN exchanges e ON c.exchange_id = e.exchange_id"
    assert conn.execute(joined).fetchone()[0] == 2  # content is keyed the same way
    conn.close()
    rows = db_rows(db)
    assert [(r["exchange_id"], r["trace_id"], r["span_id"]) for r in rows] == [
        (flow_id, trace, span),
        ("ex-00001", trace.upper(), "b" * 16),
    ]
    assert [c["exchange_id"] for c in db_rows(db, "content")] == [flow_id, "ex-00001"]
    assert rows[1]["prev_hash"] == rows[0]["row_hash"]  # the implied link, read back
    assert verify("--db", str(db)).exit_code == 0
