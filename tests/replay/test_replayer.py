"""The replayer, snapshots and verify against independent computations over the golden log."""

from __future__ import annotations

import argparse
import functools
import heapq
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from replay.cli import parse_speed
from replay.parity import to_produce_records
from replay.readers import LogRecord, read_jsonl_log
from replay.replayer import ReplayResult, _merge, replay_records
from replay.snapshot import (
    VectorTolerance,
    compare,
    load_snapshot,
    snapshot_from_result,
    write_snapshot,
)
from streams import codec
from streams.cli import main as cli_main
from streams.core import serde
from streams.core.state import CoreConfig, Forward, apply_item_forwards, apply_user_events
from streams.core.vectors import ItemReplica
from streams.errors import InvalidEvent
from streams.events import EventType
from tests.replay.make_golden import GOLDEN, generate

CFG = CoreConfig(dim=16)
PARTS = 3


@functools.cache
def _golden_cached() -> tuple[LogRecord, ...]:
    return tuple(read_jsonl_log(GOLDEN, PARTS))


def _golden() -> list[LogRecord]:
    return list(_golden_cached())


def _replay(records: list[LogRecord], batch_size: int = 5000) -> ReplayResult:
    return replay_records(records, CFG, PARTS, batch_size=batch_size)


def _records(lines: list[bytes], tmp_path: Path, name: str = "log.jsonl") -> list[LogRecord]:
    path = tmp_path / name
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return list(read_jsonl_log(path, PARTS))


def test_same_log_twice_gives_byte_identical_checksums(tmp_path: Path) -> None:
    records = _golden()
    m1 = write_snapshot(snapshot_from_result(_replay(records), CFG, PARTS), tmp_path / "a")
    m2 = write_snapshot(snapshot_from_result(_replay(records), CFG, PARTS), tmp_path / "b")
    assert m1["shards"] == m2["shards"] and m1["checksum"] == m2["checksum"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # and the vectors too: replay is deterministic, bit for bit
    assert compare(load_snapshot(tmp_path / "a"), load_snapshot(tmp_path / "b"), VectorTolerance(1.0, 0.0)).ok


def test_a_different_seed_gives_different_checksums(tmp_path: Path) -> None:
    a = snapshot_from_result(_replay(_records(generate(seed=4), tmp_path, "a.jsonl")), CFG, PARTS)
    b = snapshot_from_result(_replay(_records(generate(seed=5), tmp_path, "b.jsonl")), CFG, PARTS)
    assert a.checksum() != b.checksum()


def test_features_equal_one_event_at_a_time_through_the_core() -> None:
    """Independent reference: decode the file ourselves and apply events one by one per key."""
    lines = [line for line in GOLDEN.read_bytes().splitlines() if line.strip()]
    users: dict[str, object] = {}
    items: dict[str, object] = {}
    replica = ItemReplica(CFG)
    reasons: Counter[str] = Counter()
    item_fws: dict[str, list[Forward]] = defaultdict(list)
    duplicates = 0
    for line in lines:  # one producer, one partition per user: file order is each user's arrival order
        try:
            ev = codec.decode(line)
        except InvalidEvent as exc:
            reasons[exc.reason] += 1
            continue
        if ev.type is EventType.ITEM_UPSERT:
            assert ev.item_id is not None
            upsert = Forward(ev.item_id, ev.event_id, ev.type, ev.ts_us, None, eligible=ev.eligible,
                             category=ev.category, bootstrap=ev.vector)  # fmt: skip
            item_fws[ev.item_id].append(upsert)
            continue
        assert ev.user_id is not None
        state, out = apply_user_events(users.get(ev.user_id), ev.user_id, [ev], CFG, replica)  # type: ignore[arg-type]
        users[ev.user_id] = state
        reasons["late_event"] += len(out.late)
        duplicates += len(out.duplicates)
        for fw in out.forwards:
            item_fws[fw.item_id].append(fw)
    for iid, fws in item_fws.items():
        for fw in fws:
            items[iid] = apply_item_forwards(items.get(iid), iid, [fw], CFG)  # type: ignore[arg-type]
    res = _replay(_golden(), batch_size=97)  # many batches: batch boundaries must not matter for features
    assert res.dlq_counts() == dict(reasons)
    assert res.duplicates == duplicates > 0
    assert reasons["late_event"] >= 1
    assert set(res.users) == set(users) and set(res.items) == set(items)
    for uid, st in users.items():
        assert serde.user_digest(res.users[uid]) == serde.user_digest(st), uid  # type: ignore[arg-type]
    for iid, st in items.items():
        assert serde.item_digest(res.items[iid]) == serde.item_digest(st), iid  # type: ignore[arg-type]


def test_duplicates_change_nothing(tmp_path: Path) -> None:
    lines = [line for line in GOLDEN.read_bytes().splitlines() if line.strip()]
    doubled: list[bytes] = []
    resent = 0
    for line in lines:
        doubled.append(line)
        try:
            ev = codec.decode(line)
        except InvalidEvent:
            continue
        if ev.type is not EventType.ITEM_UPSERT:  # the item stage does count a re-sent upsert (as live does)
            doubled.append(line)
            resent += 1
    base = _replay(_records(lines, tmp_path, "a.jsonl"), batch_size=100_000)
    dup = _replay(_records(doubled, tmp_path, "b.jsonl"), batch_size=100_000)
    assert dup.duplicates - base.duplicates == resent - base.dlq_counts().get("late_event", 0)
    pairs = ((base.users, dup.users, serde.user_digest), (base.items, dup.items, serde.item_digest))
    for table_a, table_b, digest in pairs:
        assert table_a.keys() == table_b.keys()
        for key in table_a:
            assert digest(table_a[key]) == digest(table_b[key])  # type: ignore[arg-type]
            va, vb = table_a[key].vector, table_b[key].vector
            assert (va is None and vb is None) or np.array_equal(va, vb)  # type: ignore[arg-type]


def test_each_partition_keeps_offset_order_and_partitions_merge_by_event_time() -> None:
    def rec(user: str, eid: str, minute: int, partition: int, offset: int) -> LogRecord:
        value = orjson.dumps({"event_id": eid, "type": "view", "user_id": user, "item_id": "i1", "schema_version": 1,
                              "event_time": f"2026-01-01T10:{minute:02d}:00Z"})  # fmt: skip
        return LogRecord(user.encode(), value, None, partition, offset)

    records = [rec("a", "a1", 30, 0, 0), rec("a", "a2", 10, 0, 1), rec("b", "b1", 20, 1, 0), rec("c", "c1", 5, 2, 0)]
    res = replay_records(records, CFG, 3)
    order = sorted(res.first_touch.items(), key=lambda kv: kv[1].seq)
    # heads compared by event time: c (10:05) first, then b (10:20), then partition 0 in offset order
    assert [(k, t.seq) for k, t in order if k[0] == "user"] == [
        (("user", "c"), 0),
        (("user", "b"), 1),
        (("user", "a"), 2),
    ]
    assert res.users["a"].recent[0][1] == "a1"  # newest first; a2 (10:10) was applied after a1, not late
    assert res.users["a"].counts[0] == 2 and res.dlq == []


@settings(max_examples=200, deadline=None)
@given(hst.lists(hst.lists(hst.integers(0, 30), max_size=12), min_size=1, max_size=4), hst.booleans())
def test_partition_merge_equals_a_k_way_merge_by_smallest_head(times: list[list[int]], in_order: bool) -> None:
    """``_merge`` (a sort when every partition is in time order) gives exactly heapq.merge's order."""
    streams = [
        [(t, p, off, None, None, "") for off, t in enumerate(sorted(ts) if in_order else ts)]
        for p, ts in enumerate(times)
    ]
    assert _merge(streams) == list(heapq.merge(*streams))


def test_late_is_decided_in_arrival_order_like_live() -> None:
    """An event 2 h older than its user's newest is late even though sorting by time would accept it."""
    values = [
        {"event_id": "new", "type": "click", "user_id": "u", "item_id": "i", "event_time": "2026-01-01T12:00:00Z"},
        {"event_id": "old", "type": "click", "user_id": "u", "item_id": "i", "event_time": "2026-01-01T10:00:00Z"},
    ]
    records = [LogRecord(b"u", orjson.dumps({**v, "schema_version": 1}), None, 0, i) for i, v in enumerate(values)]
    res = replay_records(records, CFG, 1)
    assert [reason for _, reason in res.dlq] == ["late_event"]
    assert codec.decode(res.dlq[0][0]).event_id == "old"
    assert res.users["u"].counts[1] == 1


def test_record_timestamp_drives_the_future_check() -> None:
    v = orjson.dumps({"event_id": "f", "type": "click", "user_id": "u", "item_id": "i", "schema_version": 1,
                      "event_time": "2026-01-01T12:00:00Z"})  # fmt: skip
    t_record = 1_767_261_600_000_000  # 2026-01-01T10:00:00Z: the event is 2 h after its record time
    assert replay_records([LogRecord(b"u", v, t_record, 0, 0)], CFG, 1).dlq_counts() == {"future_timestamp": 1}
    assert replay_records([LogRecord(b"u", v, None, 0, 0)], CFG, 1).dlq == []  # no record time: no check
    assert replay_records([LogRecord(b"u", v, None, 0, 0)], CFG, 1, record_ts_us=t_record).dlq_counts() == {
        "future_timestamp": 1
    }


def _tamper_setup(tmp_path: Path) -> tuple[Path, Path]:
    snap = snapshot_from_result(_replay(_golden()), CFG, PARTS, source=str(GOLDEN))
    a, b = tmp_path / "a", tmp_path / "b"
    write_snapshot(snap, a)
    shutil.copytree(a, b)
    return a, b


def test_verify_detects_tampered_value_missing_key_and_first_diverging_event(tmp_path: Path) -> None:
    a, b = _tamper_setup(tmp_path)
    other = load_snapshot(b)
    # tamper one user's counters, delete one item: i10's first record is its catalog upsert, the
    # 11th line of the file (the upserts have the earliest event times, so they replay first)
    user_shard = next(s for s in other.shards["user"] if "u05" in s)
    st = serde.decode_user(user_shard["u05"])
    st.counts[0] += 1
    user_shard["u05"] = serde.encode_user(st)
    item_shard = next(s for s in other.shards["item"] if "i10" in s)
    del item_shard["i10"]
    report = compare(load_snapshot(a), other)
    assert not report.ok and not report.checksums_equal
    assert {(d.stage, d.key, d.kind) for d in report.diffs} == {
        ("user", "u05", "features"),
        ("item", "i10", "only_left"),
    }
    assert "counts" in next(d.detail for d in report.diffs if d.key == "u05")
    upsert_i10 = orjson.loads(GOLDEN.read_bytes().splitlines()[10])
    assert upsert_i10["item_id"] == "i10"
    assert report.first_diverging is not None
    stage, key, touch = report.first_diverging
    assert (stage, key, touch.event_id) == ("item", "i10", upsert_i10["event_id"])


def test_verify_vector_tolerance(tmp_path: Path) -> None:
    a, _ = _tamper_setup(tmp_path)
    left = load_snapshot(a)
    right = load_snapshot(a)
    shard = next(s for s in right.shards["user"] if "u07" in s)
    st = serde.decode_user(shard["u07"])
    assert st.vector is not None
    st.vector = st.vector + np.float32(1e-4)  # well inside the tolerance: features equal, vector close
    shard["u07"] = serde.encode_user(st)
    assert compare(left, right).ok
    st.vector = -st.vector  # cosine -1
    shard["u07"] = serde.encode_user(st)
    report = compare(left, right)
    assert report.checksums_equal and not report.ok
    assert [(d.key, d.kind) for d in report.diffs] == [("u07", "vector")]


def test_cli_run_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["replay", "run", str(GOLDEN), "--partitions", str(PARTS)]
    assert cli_main([*argv, "--out", str(a)]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["events"] == len(_golden()) and summary["dlq"]["late_event"] >= 1
    assert cli_main([*argv, "--out", str(b)]) == 0
    assert orjson.loads(capsys.readouterr().out)["checksum"] == summary["checksum"]
    assert cli_main(["replay", "verify", "--snapshot", str(a), "--against", str(b)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    (b / "item-000.parquet").unlink()
    shutil.copy(a / "item-001.parquet", b / "item-000.parquet")  # wrong shard contents
    assert cli_main(["replay", "verify", "--snapshot", str(a), "--against", str(b), "--json"]) == 1
    out = orjson.loads(capsys.readouterr().out)
    assert not out["ok"] and out["first_diverging_event"] is not None
    assert cli_main(["replay", "run", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_produce_pacing_uses_a_monotone_log_clock_that_ignores_far_future_outliers() -> None:
    def rec(t: str | None) -> LogRecord:
        body = {"event_id": "x", "type": "view", "user_id": "u", "item_id": "i", "schema_version": 1}
        value = orjson.dumps({**body, "event_time": t}) if t is not None else b"{bad"
        return LogRecord(b"u", value, None, 0, 0)

    times = ["2026-01-01T10:00:00Z", "2026-01-01T09:59:00Z", "2099-01-01T00:00:00Z", "2026-01-01T10:05:00Z", None]
    paced = [r.ts_us for r in to_produce_records(rec(t) for t in times)]
    ten = 1_767_261_600_000_000  # 2026-01-01T10:00:00Z
    # out-of-order and 2099 events are paced at the clock; a bad record keeps the clock too
    assert paced == [ten, ten, ten, ten + 300_000_000, ten + 300_000_000]
    assert parse_speed("60x") == parse_speed("60") == 60.0
    with pytest.raises(argparse.ArgumentTypeError):
        parse_speed("fast")


@settings(max_examples=8, deadline=None, database=None)  # never write .hypothesis/ into the checkout
@given(batch_size=hst.integers(min_value=5, max_value=2000))
def test_feature_checksums_do_not_depend_on_batch_boundaries(batch_size: int) -> None:
    reference = snapshot_from_result(_replay(_golden()), CFG, PARTS)
    other = snapshot_from_result(_replay(_golden(), batch_size=batch_size), CFG, PARTS)
    assert other.checksums() == reference.checksums()
    assert other.dlq == reference.dlq
