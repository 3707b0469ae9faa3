"""End to end on real parts: broker, stream worker, RocksDB, API. A click changes the next response."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.broker import ensure_topics
from streams.config import Settings
from streams.producer import make_producer
from streams.worker import StreamWorker
from tests.serving.conftest import Api, serving_settings_for, start_api

pytestmark = pytest.mark.integration

DIM = 64


def _ev(eid: str, etype: str, ago_s: float, **fields: object) -> bytes:
    # event times near the wall clock: the API logs impressions at wall time, and a user's events
    # older than their newest event minus the allowed lateness would be rejected as late
    when = datetime.fromtimestamp(time.time() - ago_s, UTC).isoformat()
    return orjson.dumps({"event_id": eid, "type": etype, "event_time": when, "schema_version": 1, **fields})


@pytest.fixture
def system(live_settings: Settings) -> Iterator[tuple[Settings, StreamWorker, Api]]:
    s = live_settings
    ensure_topics(s)
    worker = StreamWorker(s)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    api, server, api_thread = start_api(serving_settings_for(s))
    yield s, worker, api
    server.should_exit = True
    api_thread.join(30)
    worker.stop()
    thread.join(30)


def _slate(api: Api, user: str, k: int = 10) -> dict[str, object]:
    with api.client() as c:
        r = c.get("/v1/recommendations", params={"user_id": user, "k": k})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def _until(pred, timeout: float, what: str, why=lambda: "") -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}: {why()}"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_click_produced_to_the_broker_changes_the_next_response(
    system: tuple[Settings, StreamWorker, Api],
) -> None:
    s, worker, api = system
    producer = make_producer(s.bootstrap_servers)
    rng = np.random.default_rng(3)
    # a catalog with bootstrap vectors (item_upsert keyed by item), then a user with a little history
    for n in range(40):
        vec = rng.standard_normal(DIM).round(4).tolist()
        producer.produce(s.topics.events, _ev(f"up{n}", "item_upsert", 600, item_id=f"i{n}",
                                              vector=vec, category="c"), f"i{n}".encode())  # fmt: skip
    for n in range(3):
        producer.produce(s.topics.events, _ev(f"h{n}", "click", 300 - n, user_id="alice",
                                              item_id=f"i{n}"), b"alice")  # fmt: skip
    producer.flush(10)
    _until(lambda: api.runtime.index.size >= 40, 60, "the catalog to reach the index")
    _until(lambda: (_slate(api, "alice")["user_state"] or {}).get("version") == 3, 60, "alice's history")  # type: ignore[union-attr]

    before = _slate(api, "alice")
    assert before["fallback"] is False
    ids = [it["item_id"] for it in before["items"]]  # type: ignore[attr-defined,index]
    assert not {"i0", "i1", "i2"} & set(ids), "consumed items must be filtered"
    assert {it["source"] for it in before["items"]} <= {"ann", "i2i", "trending"}  # type: ignore[attr-defined,index]
    target = ids[0]

    producer.produce(s.topics.events, _ev("new-click", "click", 0, user_id="alice",
                                          item_id=target), b"alice")  # fmt: skip
    producer.flush(10)
    elapsed = _until(
        lambda: target not in [it["item_id"] for it in _slate(api, "alice")["items"]],  # type: ignore[attr-defined,index]
        30,
        f"{target} to leave alice's slate",
        lambda: f"recent {api.runtime.state.user('alice').recent} counts {api.runtime.state.user('alice').counts}",
    )
    after = _slate(api, "alice")
    assert after["user_state"]["version"] >= 4  # type: ignore[index]
    assert after["user_state"]["last_event_us"] > before["user_state"]["last_event_us"]  # type: ignore[index,operator]
    assert elapsed < 30

    # every served slate was logged to the impressions topic with its request id and sources
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": "t-imp", "log_level": 3,
                  "enable.auto.commit": False})  # fmt: skip
    c.assign([TopicPartition(s.topics.impressions, p, OFFSET_BEGINNING) for p in range(s.partitions)])
    found: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + 20
    while before["request_id"] not in found and time.monotonic() < deadline:
        for m in c.consume(500, 0.2):
            if m.error() is None:
                ev = orjson.loads(m.value())
                found[ev["request_id"]] = ev
    c.close()
    imp = found[before["request_id"]]  # type: ignore[index]
    assert imp["type"] == "impression" and imp["user_id"] == "alice"
    assert imp["items"] == ids
    assert imp["sources"] == [it["source"] for it in before["items"]]  # type: ignore[attr-defined,index]
    assert imp["versions"]["model"] == "blend-v1"  # type: ignore[index]
