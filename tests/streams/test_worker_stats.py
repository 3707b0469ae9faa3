"""The worker's stats snapshot: freshness quantiles follow the samples (cached between changes)."""

from __future__ import annotations

from streams.worker import StreamWorker, WorkerStats


def test_freshness_quantiles_follow_new_samples_and_resets() -> None:
    stats = WorkerStats()
    assert stats.snapshot()["user_fresh_p50_ms"] is None
    StreamWorker._sample(stats.user_fresh_ms, [1000, 1000, 1000], 1100.0)
    stats.fresh_added += 1
    snap = stats.snapshot()
    assert snap["user_fresh_p50_ms"] == 100.0 and snap["item_fresh_p50_ms"] is None
    assert stats.snapshot()["user_fresh_p99_ms"] == 100.0  # unchanged samples: the cached figures
    StreamWorker._sample(stats.item_fresh_ms, [900], 1100.0)
    StreamWorker._sample(stats.user_fresh_ms, [700] * 3, 1100.0)
    stats.fresh_added += 1
    snap = stats.snapshot()
    assert snap["item_fresh_p50_ms"] == 200.0 and snap["user_fresh_p50_ms"] == 250.0
    stats.reset_freshness()
    assert stats.snapshot()["user_fresh_p50_ms"] is None and stats.snapshot()["item_fresh_p99_ms"] is None
