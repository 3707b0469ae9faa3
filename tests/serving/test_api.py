"""The API against a real uvicorn server on 127.0.0.1 and the real broker (no worker needed)."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer

from serving.settings import ServingSettings
from streams.broker import EmbeddedBroker, ensure_topics, free_port
from streams.config import Settings
from streams.core import serde
from streams.core.partition import partition_for
from streams.core.state import B60_US, ItemState
from tests.serving.conftest import Api, serving_settings_for, start_api

pytestmark = pytest.mark.integration

T0 = 1_795_000_000 * 1_000_000  # an event time in 2026, on an hour boundary
T0 -= T0 % B60_US


def _wait_ready(api: Api, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with api.client() as c:
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "API never became ready"
            time.sleep(0.05)


def _publish_items(settings: ServingSettings, items: dict[str, tuple[int, bool, str]]) -> None:
    """Write item states straight to the item changelog, as the worker would (id -> positives, eligible, cat)."""
    p = Producer({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3})
    rng = np.random.default_rng(7)
    for item_id, (positives, eligible, category) in items.items():
        state = ItemState(
            b60={T0 // B60_US: [0, 0, positives]},
            max_ts=T0 + B60_US - 1,
            eligible=eligible,
            category=category,
            vector=rng.standard_normal(settings.model.dim).astype(np.float32),
            version=1,
        )
        part = partition_for(item_id, settings.partitions)
        p.produce(settings.topics.item_changelog, serde.encode_item(state), item_id.encode(), partition=part)
    assert p.flush(10) == 0


def _wait_items(api: Api, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    rt = api.runtime
    while not (rt.index.size >= n and len(rt.catalog.trending_ids) >= min(n, 1)):
        assert time.monotonic() < deadline, f"index has {rt.index.size} of {n} items"
        time.sleep(0.05)


def test_health_readiness_and_metrics(api: Api) -> None:
    with api.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        _wait_ready(api)
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["state"]["caught_up"] is True
        c.get("/v1/recommendations", params={"user_id": "someone"})
        text = c.get("/metrics").text
    for name in (
        "freshrec_request_seconds_bucket",
        "freshrec_candidates_total",
        "freshrec_replica_age_seconds",
        "freshrec_index_items",
        "freshrec_index_pending",
    ):
        assert name in text, name
    assert 'freshrec_requests_total{outcome="fallback"} 1.0' in text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"user_id": "u1", "k": "0"}, "k"),
        ({"user_id": "u1", "k": "100000"}, "k"),
        ({"user_id": "u1", "k": "ten"}, "k"),
        ({"k": "5"}, "user_id"),
        ({"user_id": "bad id!"}, "user_id"),
        ({"user_id": "x" * 300}, "user_id"),
        ({"user_id": "u1", "item_id": "no/slash"}, "item_id"),
        ({"user_id": "u1", "exclude": "ok,not ok"}, "exclude"),
    ],
)
def test_bad_parameters_get_a_422_with_a_message(api: Api, params: dict[str, str], field: str) -> None:
    with api.client() as c:
        r = c.get("/v1/recommendations", params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert field in body["message"]


def test_unknown_user_gets_trending_fallback_flagged_with_provenance(api: Api) -> None:
    # positives decide the trending order: hot > warm > cool; "gone" is ineligible, "other" is another category
    _publish_items(
        api.settings,
        {
            "hot": (50, True, "a"),
            "warm": (20, True, "a"),
            "cool": (5, True, "a"),
            "gone": (99, False, "a"),
            "other": (30, True, "b"),
        },  # fmt: skip
    )
    _wait_items(api, 4)
    _wait_ready(api)
    with api.client() as c:
        body = c.get("/v1/recommendations", params={"user_id": "stranger", "k": 3, "category": "a"}).json()
        everything = c.get("/v1/recommendations", params={"user_id": "stranger", "k": 10}).json()
        excluded = c.get("/v1/recommendations", params={"user_id": "stranger", "k": 10, "exclude": "hot,other"}).json()
    assert body["fallback"] is True
    assert body["fallback_reason"] == "unknown_user"
    assert [it["item_id"] for it in body["items"]] == ["hot", "warm", "cool"]
    assert {it["source"] for it in body["items"]} == {"trending"}
    assert [it["position"] for it in body["items"]] == [0, 1, 2]
    assert body["items"][0]["score"] > body["items"][1]["score"] > body["items"][2]["score"]
    assert "gone" not in {it["item_id"] for it in everything["items"]}
    assert {it["item_id"] for it in everything["items"]} == {"hot", "warm", "cool", "other"}
    assert {it["item_id"] for it in excluded["items"]} == {"warm", "cool"}
    prov = body["provenance"]
    assert prov["model_version"] == "blend-v1"
    assert prov["index"]["size"] == 4  # the ineligible item is not indexed
    assert prov["index"]["version"] >= 1
    assert prov["state"]["event_watermark_us"] == T0 + B60_US - 1
    assert prov["state"]["caught_up"] is True
    assert prov["state"]["broker_connected"] is True
    assert body["user_state"] == {"version": None, "last_event_us": None}


def test_an_internal_error_is_a_500_with_an_error_id_and_no_details(api: Api) -> None:
    def boom(_req: object) -> None:
        raise RuntimeError("secret internals")

    api.runtime.recommender.recommend = boom  # type: ignore[method-assign,assignment]
    with api.client() as c:
        r = c.get("/v1/recommendations", params={"user_id": "u1"})
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal"
    assert len(body["error_id"]) == 32
    assert "secret" not in r.text and "Traceback" not in r.text


def test_post_event_validates_then_produces(api: Api) -> None:
    good = {"event_id": "e1", "type": "click", "user_id": "u9", "item_id": "i1",
            "event_time": "2026-11-22T10:00:00Z", "schema_version": 1}  # fmt: skip
    with api.client() as c:
        bad_json = c.post("/v1/events", content=b"{nope")
        missing = c.post("/v1/events", content=orjson.dumps({**good, "item_id": None}))
        ok = c.post("/v1/events", content=orjson.dumps(good))
    assert bad_json.status_code == 422 and bad_json.json()["error"] == "bad_json"
    assert missing.status_code == 422 and missing.json()["error"] == "missing_field"
    assert ok.status_code == 202
    assert ok.json() == {"event_id": "e1", "topic": api.settings.topics.events,
                         "partition": partition_for("u9", api.settings.partitions)}  # fmt: skip


def test_openapi_documents_the_versioned_route(api: Api) -> None:
    with api.client() as c:
        spec = c.get("/openapi.json").json()
    route = spec["paths"]["/v1/recommendations"]["get"]
    names = {p["name"] for p in route["parameters"]}
    assert {"user_id", "k", "item_id", "surface", "exclude", "category"} <= names
    k = next(p for p in route["parameters"] if p["name"] == "k")
    assert k["schema"]["minimum"] == 1 and k["schema"]["maximum"] == 200


def test_degraded_mode_keeps_answering_from_the_last_state_when_the_broker_dies(tmp_path: Path) -> None:
    broker = EmbeddedBroker(port=free_port(), log_path=str(tmp_path / "tansu.log")).start()
    live = Settings(bootstrap_servers=broker.bootstrap, partitions=2, data_dir=str(tmp_path / "data"))
    ensure_topics(live)
    api, server, thread = start_api(serving_settings_for(live))
    try:
        _publish_items(api.settings, {"a": (10, True, "x"), "b": (5, True, "x")})
        _wait_items(api, 2)
        _wait_ready(api)
        pid = broker.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
        broker.stop()
        assert broker.pid is None
        deadline = time.monotonic() + 30
        with api.client() as c:
            while True:
                r = c.get("/v1/recommendations", params={"user_id": "someone", "k": 5})
                assert r.status_code == 200
                body = r.json()
                assert [it["item_id"] for it in body["items"]] == ["a", "b"]  # the last state
                if not body["provenance"]["state"]["broker_connected"]:
                    break
                assert time.monotonic() < deadline, "the broker outage was never reported"
                time.sleep(0.2)
        assert body["provenance"]["state"]["replica_age_s"] > 0
    finally:
        server.should_exit = True
        thread.join(30)
        broker.stop()


def _put_item(settings: ServingSettings, item_id: str, vector: list[float]) -> None:
    p = Producer({"bootstrap.servers": settings.bootstrap_servers, "log_level": 3})
    state = ItemState(max_ts=T0, vector=np.array(vector, dtype=np.float32), version=1)
    part = partition_for(item_id, settings.partitions)
    p.produce(settings.topics.item_changelog, serde.encode_item(state), item_id.encode(), partition=part)
    assert p.flush(10) == 0


def test_index_snapshot_is_reloaded_then_followed_by_the_later_changes(live_settings: Settings, tmp_path: Path) -> None:
    ensure_topics(live_settings)
    snap = tmp_path / "snapshot"
    settings = serving_settings_for(live_settings)
    settings = settings.model_copy(
        update={"serving": settings.serving.model_copy(
            update={"index": settings.serving.index.model_copy(update={"snapshot_dir": str(snap)})})}
    )  # fmt: skip
    dim = settings.model.dim
    unit = [[1.0 if j == d else 0.0 for j in range(dim)] for d in range(3)]
    api, server, thread = start_api(settings)
    try:
        _put_item(settings, "a", unit[0])
        _put_item(settings, "b", unit[1])
        _wait_items(api, 2)
    finally:
        server.should_exit = True
        thread.join(30)
    assert (snap / "manifest.json").exists()

    _put_item(settings, "c", unit[2])  # new after the snapshot
    _put_item(settings, "a", unit[2])  # a moved after the snapshot
    api, server, thread = start_api(settings)
    try:
        _wait_items(api, 3)
        _wait_ready(api)
        rt = api.runtime
        # b (and a's first record, unless its newer record superseded it in the same fetch) came
        # from the snapshot instead of being indexed again
        assert 1 <= rt.state.snapshot_skipped <= 2
        deadline = time.monotonic() + 10
        while rt.index.pending or rt.index.item_vector("a") is None or rt.index.item_vector("a")[2] != 1.0:
            assert time.monotonic() < deadline, "the change after the snapshot never reached the index"
            time.sleep(0.05)
        top = rt.index.search_many(np.array([unit[2]], dtype=np.float32), 2)[0]
        assert {i for i, _ in top} == {"a", "c"}
    finally:
        server.should_exit = True
        thread.join(30)


_QUERIES: list[dict[str, str | list[str]]] = [
    {"user_id": "u1"},
    {"user_id": "u1", "k": "7", "item_id": "i1", "surface": "home", "category": "a", "exclude": ["x,y", "z"]},
    {"user_id": "u1", "k": " 7 "},
    {"user_id": "u1", "k": "+3"},
    {"user_id": "u1", "k": "5.0"},
    {"user_id": "u1", "k": "5.5"},
    {"user_id": "u1", "k": "1_0"},
    {"user_id": "u1", "k": "-1"},
    {"user_id": "u1", "k": "0"},
    {"user_id": "u1", "k": "201"},
    {"user_id": "u1", "k": "ten"},
    {"k": "5"},
    {},
    {"user_id": "bad id!", "k": "0", "item_id": "no/slash"},
    {"user_id": "x" * 300},
    {"user_id": "u1", "surface": "s" * 65},
    {"user_id": "u1", "surface": "bad surface"},
    {"user_id": "u1", "category": "c" * 129},
    {"user_id": "u1", "exclude": "ok,not ok"},
    {"user_id": "u1", "exclude": ",".join(f"i{j}" for j in range(1001))},
    {"user_id": "u1", "user_id ": "u2"},
]


def test_hand_validated_route_answers_exactly_like_the_documented_fastapi_route(api: Api) -> None:
    # /v1/recommendations is served by a route that validates by hand (no FastAPI dependency
    # solving); the FastAPI declaration stays the documented contract. Same server, same state:
    # answer every query with the fast route, then with the FastAPI route alone, and compare.
    _wait_ready(api)

    def answers() -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = []
        with api.client() as c:
            for q in _QUERIES:
                r = c.get("/v1/recommendations", params=q)
                body = r.json()
                out.append((r.status_code, body if r.status_code != 200 else (body["items"], body["fallback"])))
        return out

    fast = answers()
    routes = api.app.router.routes
    shadow = routes.pop(0)
    assert getattr(shadow, "path", None) == "/v1/recommendations"
    try:
        documented = answers()
    finally:
        routes.insert(0, shadow)
    assert [s for s, _ in fast].count(422) >= 10
    assert fast == documented


def test_impressions_are_logged_without_a_thread_wake_up_per_request(api: Api) -> None:
    _publish_items(api.settings, {"p": (9, True, "a"), "q": (3, True, "a")})
    _wait_items(api, 2)
    _wait_ready(api)
    rt = api.runtime
    with api.client() as c:
        for j in range(25):
            assert c.get("/v1/recommendations", params={"user_id": f"v{j}", "k": 2}).status_code == 200
    deadline = time.monotonic() + 10
    while rt.impressions.sent < 25:  # drained by the logging thread every 50 ms
        assert time.monotonic() < deadline, f"{rt.impressions.sent} of 25 impressions handed to the producer"
        time.sleep(0.02)
    assert rt.impressions.sent == 25 and rt.impressions.dropped == 0


def test_the_api_shortens_the_gil_switch_interval_while_it_runs(api: Api) -> None:
    # the request path releases the GIL on every HNSW search; a background thread that takes it
    # then keeps it for at most this long before the request thread gets it back
    assert sys.getswitchinterval() == pytest.approx(api.settings.serving.gil_switch_interval_s)


def test_the_heap_is_frozen_for_the_cyclic_gc_once_the_replica_caught_up(api: Api) -> None:
    _wait_ready(api)
    deadline = time.monotonic() + 10
    while gc.get_freeze_count() == 0:  # frozen by the index thread right after catching up
        assert time.monotonic() < deadline, "the heap was never frozen"
        time.sleep(0.02)
    assert gc.get_freeze_count() > 1000


def test_huge_pages_are_requested_once_the_replica_caught_up(api: Api) -> None:
    _wait_ready(api)
    deadline = time.monotonic() + 10
    while api.runtime.huge_pages is None:  # requested by the index thread right after catching up
        assert time.monotonic() < deadline, "huge pages were never requested"
        time.sleep(0.02)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert api.runtime.huge_pages.regions >= 1  # the shards' and the catalog's arrays, at least
