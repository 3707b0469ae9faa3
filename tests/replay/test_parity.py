"""Golden replay: the committed log through a real worker on a real broker and through the replayer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from replay.parity import check_parity
from replay.readers import open_log, read_kafka_log
from replay.replayer import replay_records
from replay.snapshot import snapshot_from_result
from streams.broker import ensure_topics
from streams.cli import main as cli_main
from streams.config import Settings
from tests.replay.make_golden import GOLDEN

pytestmark = pytest.mark.integration


def test_golden_log_live_equals_replay(live_settings: Settings, tmp_path: Path) -> None:
    report = check_parity(GOLDEN, live_settings, timeout_s=120)
    verify = report.verify
    # features: byte-identical per shard
    assert verify.checksums_equal, verify.to_dict()
    assert verify.counts_left == verify.counts_right
    assert verify.counts_left["user"] > 20 and verify.counts_left["item"] == 50
    # the DLQ saw the same rejections for the same reasons, and the duplicates were the same
    assert report.live_dlq == report.replay_dlq
    assert report.live_dlq["late_event"] >= 1 and report.live_dlq["bad_json"] == 1
    assert report.live_dlq["future_timestamp"] == 1
    assert report.live_duplicates == report.replay_duplicates > 0
    assert report.dlq_records_equal  # the very bytes: originals for rejects, the re-encoded event for late ones
    # vectors: not bit-identical (replica lag, batch boundaries) but close
    assert not [d for d in verify.diffs if d.kind != "vector"]
    assert verify.ok, verify.to_dict()
    assert report.ok
    # the CLI path over the same live stores: replay run (record time = now, like the produce times) + verify
    snap = tmp_path / "snap"
    run = ["replay", "run", str(GOLDEN), "--out", str(snap), "--partitions", str(live_settings.partitions)]
    assert cli_main([*run, "--record-time", "now"]) == 0
    assert cli_main(["replay", "verify", "--snapshot", str(snap), "--live-data-dir", live_settings.data_dir]) == 0
    assert cli_main([*run[:3], "--out", str(tmp_path / "s2"), *run[5:]]) == 0
    # without a record time the 2099 event is accepted: one more user than live, and verify says so
    verify_s2 = ["replay", "verify", "--snapshot", str(tmp_path / "s2"), "--live-data-dir", live_settings.data_dir]
    assert cli_main(verify_s2) == 1


def test_replay_produce_then_kafka_range_replays_like_the_file(live_settings: Settings, tmp_path: Path) -> None:
    """``freshrec replay produce`` puts the log on a topic; replaying that topic equals replaying the file."""
    s = live_settings
    ensure_topics(s)
    before_us = int(time.time() * 1_000_000)
    argv = ["replay", "produce", str(GOLDEN), "--speed", "1000000x", "--bootstrap-servers", s.bootstrap_servers,
            "--topic", s.topics.events, "--partitions", str(s.partitions)]  # fmt: skip
    assert cli_main(argv) == 0
    from_kafka = list(read_kafka_log(f"kafka://{s.bootstrap_servers}/{s.topics.events}", poll_timeout_s=1.0))
    from_file = list(open_log(GOLDEN, "jsonl", s.partitions))
    assert sorted(r.value for r in from_kafka) == sorted(r.value for r in from_file)
    assert all(r.ts_us is not None and r.ts_us >= before_us // 1000 * 1000 for r in from_kafka)
    cfg = s.model.core()
    kafka_res = replay_records(from_kafka, cfg, s.partitions)  # record timestamps: the produce times
    file_res = replay_records(from_file, cfg, s.partitions, record_ts_us=before_us)
    a = snapshot_from_result(kafka_res, cfg, s.partitions)
    b = snapshot_from_result(file_res, cfg, s.partitions)
    assert a.checksums() == b.checksums()
    assert kafka_res.dlq_counts() == file_res.dlq_counts() and kafka_res.dlq_counts()["future_timestamp"] == 1
