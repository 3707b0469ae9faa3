"""Point-in-time training sets: features as of just before the label, TTL nulling, leakage check."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.training import (
    LeakageError,
    TrainingSetConfig,
    apply_ttl,
    build_training_set,
    check_leakage,
    label_impressions,
    label_positives,
    point_in_time_join,
    read_events,
    to_table,
    write_parquet,
)
from streams.codec import encode
from streams.core.state import CoreConfig
from streams.errors import FreshrecError
from streams.events import Event, EventType

S = 1_000_000  # one second in microseconds
H = 3_600 * S
T = 1_700_000_000 * S  # an arbitrary event time (2023-11-14T22:13:20Z)


def _log() -> list[Event]:
    return [
        Event("e1", EventType.VIEW, T, "u1", "i1"),
        Event("e2", EventType.CLICK, T + 10 * S, "u1", "i2"),
        Event("e3", EventType.IMPRESSION, T + 20 * S, "u1", items=("i1", "i3")),
        # same time as the impression: must not be visible to the impression's features
        Event("e5", EventType.CLICK, T + 20 * S, "u2", "i1"),
        Event("e4", EventType.CLICK, T + 30 * S, "u1", "i3"),
        Event("e6", EventType.CLICK, T + 48 * H, "u1", "i2"),
    ]


def _rows(table: pa.Table) -> list[dict[str, object]]:
    return table.to_pylist()


def test_impression_labels_use_the_reward_window() -> None:
    labels = label_impressions(_log(), reward_window_us=30 * 60 * S)
    # slate (i1, i3) at T+20s: u1 clicks i3 at T+30s (10 s later, inside 30 min), never i1 after T+20s
    assert [(lab.item_id, lab.label) for lab in labels] == [("i1", 0), ("i3", 1)]
    # a 5-second window misses the click 10 s later
    assert [lab.label for lab in label_impressions(_log(), reward_window_us=5 * S)] == [0, 0]


def test_impression_rows_see_only_strictly_earlier_events() -> None:
    cfg = TrainingSetConfig(ttl_us=24 * H, negatives=0, reward_window_us=30 * 60 * S)
    rows = _rows(build_training_set(_log(), cfg))
    assert [(r["item_id"], r["label"], r["label_ts_us"]) for r in rows] == [
        ("i1", 0, T + 20 * S),
        ("i3", 1, T + 20 * S),
    ]
    i1, i3 = rows
    # u1 before T+20s: e1 (view i1 at T) and e2 (click i2 at T+10s); the impression itself is not included
    assert i1["user_feature_ts_us"] == T + 10 * S
    assert (i1["user_count_view"], i1["user_count_click"], i1["user_count_impression"]) == (1, 1, 0)
    assert i1["user_recent_count"] == 2
    assert i1["user_last_item"] == "i2"
    # i1 before T+20s: only e1's view (a positive, not a click); u2's click at T+20s is not there
    assert i1["item_feature_ts_us"] == T
    assert (i1["item_pos_1h"], i1["item_clicks"], i1["item_impressions"]) == (1.0, 0.0, 0.0)
    # ctr_1h = (clicks + 1) / (impressions + 20) = 1/20
    assert i1["item_ctr_1h"] == pytest.approx(0.05)
    # i3 has no events before T+20s: its group is null
    assert i3["item_feature_ts_us"] is None and i3["item_pos_1h"] is None
    assert i3["user_item_score"] is None
    # both models of u1 and i1 exist (u1 took BPR steps, i1 got e1's step), so there is a score
    assert isinstance(i1["user_item_score"], float)


def test_ttl_nulls_stale_groups() -> None:
    # the click e6 at T+48h: u1's newest earlier event is e4 at T+30s, i2's is e2 at T+10s, both > 24 h old
    short = _rows(build_training_set(_log(), TrainingSetConfig(ttl_us=24 * H, negatives=1, seed=0)))
    e6 = [r for r in short if r["event_id"] == "e6" and r["label"] == 1]
    assert len(e6) == 1
    assert e6[0]["user_feature_ts_us"] is None and e6[0]["user_count_click"] is None
    assert e6[0]["item_feature_ts_us"] is None and e6[0]["item_ctr_24h"] is None
    assert e6[0]["user_item_score"] is None
    # with a 72 h TTL the same row keeps them: u1 had view e1, clicks e2 + e4, impression e3
    long = _rows(build_training_set(_log(), TrainingSetConfig(ttl_us=72 * H, negatives=1, seed=0)))
    row = next(r for r in long if r["event_id"] == "e6" and r["label"] == 1)
    assert row["user_feature_ts_us"] == T + 30 * S
    assert (row["user_count_view"], row["user_count_click"], row["user_count_impression"]) == (1, 2, 1)
    assert row["item_feature_ts_us"] == T + 10 * S
    # 48 h later nothing is inside the 1 h / 24 h windows: ctr is the prior 1/20, pos counts 0
    assert row["item_ctr_24h"] == pytest.approx(0.05)
    assert row["item_pos_24h"] == 0.0


def test_negatives_come_from_the_earlier_catalog_minus_the_users_items() -> None:
    labels = label_positives(_log(), negatives=1, seed=0)
    pos = [lab for lab in labels if lab.source == "positive"]
    neg = [lab for lab in labels if lab.source == "negative"]
    # positives: e1, e2, e5, e4, e6 (the impression is not a positive)
    assert [lab.event_id for lab in pos] == ["e1", "e2", "e5", "e4", "e6"]
    by_event = {lab.event_id: lab.item_id for lab in neg}
    # e1 at T: catalog empty -> no negative
    assert "e1" not in by_event
    # e2 at T+10s: catalog {i1}, u1 touched i1 -> nothing left
    assert "e2" not in by_event
    # e5 (u2 at T+20s): catalog {i1, i2}; i1 is the positive -> i2
    assert by_event["e5"] == "i2"
    # e4 (u1 at T+30s): catalog {i1, i2, i3}; u1 touched i1, i2; i3 is the positive -> none
    assert "e4" not in by_event
    assert all(lab.label == 0 and lab.label_ts_us > 0 for lab in neg)


def test_leakage_check_passes_on_the_correct_build_and_fails_on_a_lookahead() -> None:
    events = sorted(_log(), key=lambda ev: ev.ts_us)
    labels = label_impressions(events, 30 * 60 * S) + label_positives(events, 2, 0)
    good = to_table(apply_ttl(point_in_time_join(events, labels, CoreConfig()), 24 * H))
    assert check_leakage(good) > 0
    # inject the classic bug: join state that already includes the label's own event (cutoff <= label_ts)
    bad = to_table(apply_ttl(point_in_time_join(events, labels, CoreConfig(), lookahead_us=1), 24 * H))
    with pytest.raises(LeakageError, match="from the label's time or later"):
        check_leakage(bad)


def test_leakage_check_fails_on_a_hand_made_future_feature() -> None:
    table = pa.table(
        {
            "label_ts_us": pa.array([100, 200], pa.int64()),
            "user_feature_ts_us": pa.array([99, None], pa.int64()),
            "item_feature_ts_us": pa.array([50, 250], pa.int64()),  # row 1: a feature from the future
        }
    )
    with pytest.raises(LeakageError, match="item_feature_ts_us=250"):
        check_leakage(table)
    ok = table.set_column(2, "item_feature_ts_us", pa.array([50, 199], pa.int64()))
    assert check_leakage(ok) == 3  # 99, 50, 199 checked; the null is not a feature


def test_read_jsonl_skips_and_counts_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    lines = [encode(ev) for ev in _log()]
    lines.insert(2, b'{"event_id": "x", "type": ')
    lines.insert(4, b'{"event_id": "y", "type": "warp", "event_time": "2024-01-01T00:00:00Z", "schema_version": 1}')
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    res = read_events(path)
    assert res.skipped == 2
    assert res.reasons == {"bad_json": 1, "unknown_type": 1}
    assert [ev.event_id for ev in res.events] == ["e1", "e2", "e3", "e5", "e4", "e6"]


def test_read_movielens_and_write_parquet(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,10,4,1000\n2,10,5,1001\n1,20,3,1002\n")
    res = read_events(path)
    assert [(ev.user_id, ev.item_id, ev.type) for ev in res.events] == [
        ("1", "10", EventType.CLICK),
        ("2", "10", EventType.CLICK),
        ("1", "20", EventType.CLICK),
    ]
    table = build_training_set(res.events, TrainingSetConfig(negatives=1))
    out = tmp_path / "train.parquet"
    write_parquet(table, out)
    back = pq.read_table(out)
    assert back.num_rows == table.num_rows
    # 3 positives; negatives: 2@1001 -> none (10 is its positive, catalog {10});
    # 1@1002 -> catalog {10}, u1 touched 10 -> none. So 3 rows, all label 1.
    assert back.column("label").to_pylist() == [1, 1, 1]
    assert back.schema.metadata[b"freshrec.negatives"] == b"1"


def test_read_events_errors(tmp_path: Path) -> None:
    with pytest.raises(FreshrecError, match="no such log file"):
        read_events(tmp_path / "missing.jsonl")
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(FreshrecError, match="MovieLens"):
        read_events(other)


def test_an_item_upsert_with_a_user_id_is_routed_by_type_like_the_live_worker() -> None:
    from replay._apply import apply_batch
    from streams.core.state import CoreConfig
    from streams.core.vectors import ItemReplica
    from streams.events import Event, EventType

    cfg = CoreConfig(dim=4)
    vec = (1.0, 0.0, 0.0, 0.0)
    up = Event("up-1", EventType.ITEM_UPSERT, 1_000, user_id="u1", item_id="i1", category="c", vector=vec)
    users: dict = {}  # type: ignore[type-arg]
    items: dict = {}  # type: ignore[type-arg]
    apply_batch([up], cfg, users, items, ItemReplica(cfg))
    assert "u1" not in users  # not counted as the user's interaction
    assert items["i1"].category == "c" and items["i1"].vector is not None
    assert [float(x) for x in items["i1"].vector] == list(vec)  # the bootstrap vector was applied
