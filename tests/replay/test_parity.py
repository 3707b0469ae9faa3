"""Golden replay: the committed log through a real worker on a real broker and through the replayer."""

from __future__ import annotations

import pytest

from replay.parity import check_parity
from streams.config import Settings
from tests.replay.make_golden import GOLDEN

pytestmark = pytest.mark.integration


def test_golden_log_live_equals_replay(live_settings: Settings) -> None:
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
    # vectors: not bit-identical (replica lag, batch boundaries) but close
    assert not [d for d in verify.diffs if d.kind != "vector"]
    assert verify.ok, verify.to_dict()
    assert report.ok
