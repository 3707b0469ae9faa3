"""Prequential evaluation on a small seeded synthetic log, and the CLI handlers' errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from replay.evaluate import EvalConfig, evaluate, split_events, split_time
from streams.cli import main
from streams.codec import encode
from streams.core.state import CoreConfig
from streams.events import Event, EventType

S = 1_000_000
T0 = 1_800_000_000 * S


def _clustered_log(seed: int, users: int = 80, items: int = 60, per_user: int = 24, late_users: int = 0) -> list[Event]:
    """Users of taste c click items of cluster c (3 clusters of 20 items), interleaved in time.

    A model that learns a user's cluster from their earlier clicks can put cluster items on top.
    Regular users click over the whole period; ``late_users`` more only in its last 15%.
    """
    rng = np.random.default_rng(seed)
    clusters = 3
    events = []
    per_cluster = items // clusters
    for u in range(users + late_users):
        c = u % clusters
        chosen = rng.choice(per_cluster, size=min(per_user, per_cluster), replace=False)
        lo = 0 if u < users else 8_500
        times = np.sort(rng.choice(np.arange(lo, 10_000), size=len(chosen), replace=False))
        for t, j in zip(times, chosen, strict=True):
            item = c * per_cluster + int(j)
            events.append(Event(f"e{u}-{item}", EventType.CLICK, T0 + int(t) * S, f"u{u}", f"i{item}"))
    events.sort(key=lambda ev: ev.ts_us)
    return events


FAST = EvalConfig(
    k=5,
    bootstrap=200,
    epochs=3,
    core=CoreConfig(dim=16, lr=0.2, negatives=4),
    als_backend="numpy",
    als_factors=8,
    als_iterations=5,
    models=("freshrec", "random", "popularity", "als"),
)


def test_split_is_global_in_time() -> None:
    events = _clustered_log(0)
    split = split_time(events, 0.8)
    train, test = split_events(events, split)
    assert max(ev.ts_us for ev in train) < split <= min(ev.ts_us for ev in test)
    assert len(train) + len(test) == len(events)
    # 80% quantile of the times: train holds (about) the first 80%
    assert abs(len(train) - 0.8 * len(events)) <= 2


def test_online_learner_beats_random_by_a_margin() -> None:
    events = _clustered_log(1)
    res = evaluate(events, FAST)
    fresh = res.models["freshrec"]
    rnd = res.models["random"]
    assert res.queries > 200
    # random: 5 picks out of ~60 - (seen) items, about 1/3 of them in the user's cluster, and a
    # user's remaining test items are a few of its 20: hit-rate about 5/45 = 0.11. A learner that
    # knows the cluster draws its 5 from ~20 - (seen) items: several times that.
    assert fresh.hit_rate.mean > 2.0 * rnd.hit_rate.mean
    assert fresh.recall.mean > 2.0 * rnd.recall.mean
    # the bootstrap intervals do not even overlap
    assert fresh.recall.low > rnd.recall.high
    for model in res.models.values():
        assert model.recall.low <= model.recall.mean <= model.recall.high
        assert model.hit_rate.n == res.queries


def test_online_learner_learns_users_the_static_model_never_saw() -> None:
    # 30 users arrive after the split: ALS has no factors for them and falls back to popularity,
    # which is no better than chance here (3 equal clusters); the online learner picks up a
    # new user's cluster from the first clicks it sees.
    events = _clustered_log(9, users=60, late_users=30, per_user=15)
    cfg = replace(FAST, split_time_us=T0 + 8_500 * S)  # the late users' first click is at or after 8500 s
    res = evaluate(events, cfg)
    late = np.array([int(u[1:]) >= 60 for u in res.query_users])
    assert late.sum() > 100
    fresh = res.per_query["freshrec"]["recall"][late]
    als = res.per_query["als"]["recall"][late]
    # ALS on cold users = training popularity; 3 equal clusters make that about chance level
    assert fresh.mean() > 3.0 * als.mean()


def test_evaluation_is_deterministic_given_the_seed() -> None:
    events = _clustered_log(2, users=40, per_user=15)
    cfg = replace(FAST, bootstrap=50)
    a = evaluate(events, cfg)
    b = evaluate(events, cfg)
    for name in cfg.models:
        assert a.models[name] == b.models[name]
        np.testing.assert_array_equal(a.per_query[name]["recall"], b.per_query[name]["recall"])


def test_queries_skip_items_the_user_has_seen() -> None:
    # u1 clicks i1 twice (train and test); the repeat is not a query, the new item is.
    events = [
        Event("a", EventType.CLICK, T0, "u1", "i1"),
        Event("b", EventType.CLICK, T0 + S, "u2", "i2"),
        Event("c", EventType.CLICK, T0 + 10 * S, "u1", "i1"),
        Event("d", EventType.CLICK, T0 + 11 * S, "u1", "i2"),
    ]
    cfg = EvalConfig(k=1, bootstrap=0, split_time_us=T0 + 10 * S, models=("popularity",), epochs=1)
    res = evaluate(events, cfg)
    assert (res.train_events, res.test_events, res.queries) == (2, 2, 1)
    # popularity at "d": counts i1 = 2 (a, c), i2 = 1; i1 is seen by u1 and filtered -> i2: a hit
    assert res.models["popularity"].hit_rate.mean == 1.0


def test_evaluate_rejects_an_empty_test_window() -> None:
    events = _clustered_log(3, users=6, per_user=4)
    with pytest.raises(ValueError, match="no positive test events"):
        evaluate(events, EvalConfig(split_time_us=events[-1].ts_us + 1, models=("popularity",)))


def _write_jsonl(path: Path, events: list[Event]) -> None:
    path.write_bytes(b"\n".join(encode(ev) for ev in events) + b"\n")


def test_cli_evaluate_runs_and_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.jsonl"
    _write_jsonl(log, _clustered_log(4, users=30, per_user=10))
    rc = main(["replay", "evaluate", str(log), "--k", "5", "--bootstrap", "20", "--als-backend", "numpy"])
    assert rc == 0
    out = orjson.loads(capsys.readouterr().out)
    assert set(out["models"]) == {"freshrec", "als", "popularity", "popularity_static"}
    assert out["k"] == 5 and out["queries"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "evaluate", "{tmp}/missing.jsonl"], "no such log file"),
        (["replay", "evaluate", "{tmp}/empty.jsonl"], "no valid events"),
        (["replay", "evaluate", "{tmp}/log.jsonl", "--split-time", "2000-01-01T00:00:00Z"], "no training events"),
        (["replay", "training-set", "{tmp}/missing.jsonl", "--out", "{tmp}/x.parquet"], "no such log file"),
        (["replay", "training-set", "{tmp}/log.jsonl", "--out", "{tmp}/nodir/x.parquet"], "does not exist"),
    ],
)
def test_cli_bad_input_gives_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b'{"not": "an event"}\n')
    _write_jsonl(tmp_path / "log.jsonl", _clustered_log(5, users=6, per_user=4))
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "training-set", "x.jsonl", "--out", "y.parquet", "--ttl", "soon"],
        ["replay", "evaluate", "x.jsonl", "--split-quantile", "1.5"],
        ["replay", "evaluate", "x.jsonl", "--split-time", "1998-03-01T00:00:00"],
        ["replay", "evaluate", "x.jsonl", "--k", "0"],
    ],
)
def test_cli_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_training_set_writes_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    log = tmp_path / "log.jsonl"
    events = _clustered_log(6, users=6, per_user=4)
    lines = [encode(ev) for ev in events] + [b"{broken"]
    log.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "train.parquet"
    rc = main(["replay", "training-set", str(log), "--out", str(out), "--ttl", "2h", "--negatives", "2"])
    assert rc == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["skipped"] == 1 and summary["skipped_reasons"] == {"bad_json": 1}
    assert summary["leakage"] == "ok"
    table = pq.read_table(out)
    assert table.num_rows == summary["rows"]
    assert summary["positives"] == len(events)  # every click is one positive row
    assert table.schema.metadata[b"freshrec.ttl_us"] == str(2 * 3_600 * S).encode()
