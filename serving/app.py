"""The FastAPI application: ``create_app(settings)`` with a lifespan; nothing heavy at import.

Routes are thin: they validate, call :class:`serving.recommend.Recommender`, and serialize.
The lifespan starts a :class:`Runtime`: changelog replica thread, index-apply thread,
impression logger, metrics.
"""

import gc
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
from confluent_kafka import KafkaException, Producer
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.datastructures import QueryParams
from starlette.routing import Route

from serving import recommend as rec
from serving.catalog import ItemCatalog
from serving.errors import BadRequest, ServingError
from serving.impressions import ImpressionLogger
from serving.index import IndexParams, ShardedIndex
from serving.memory import HugePages, use_huge_pages
from serving.ranking import BlendRanker
from serving.replica import LiveState
from serving.settings import ServingOptions, ServingSettings
from streams import codec
from streams.core.partition import partition_for
from streams.errors import InvalidEvent
from streams.events import EventType

__all__ = ["create_app", "Runtime"]

log = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9_.:@\-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
_MAX_EXCLUDE = 1000


class JSONResponse(Response):
    """orjson-encoded JSON (FastAPI's default encoder is several times slower)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialize ``content`` with orjson."""
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


# -- response models (documentation of the wire format; HTTP models are not event models) --


class ItemOut(BaseModel):
    """One item of a slate."""

    item_id: str
    score: float
    source: str = Field(description="candidate source: ann, i2i or trending")
    position: int


class RecommendationsOut(BaseModel):
    """A ranked slate with provenance."""

    request_id: str
    user_id: str
    items: list[ItemOut]
    fallback: bool = Field(description="true when the user is unknown or has no embedding yet")
    fallback_reason: str | None
    candidates: dict[str, int] = Field(description="candidates per source after de-duplication and filters")
    user_state: dict[str, Any] = Field(description="version and newest event time of the user state used")
    provenance: dict[str, Any] = Field(description="state watermark, index version/staleness, model version")


class ErrorOut(BaseModel):
    """An error response."""

    error: str
    message: str
    error_id: str | None = None


class EventAccepted(BaseModel):
    """An event accepted by ``POST /v1/events``."""

    event_id: str
    topic: str
    partition: int


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "freshrec_request_seconds",
            "Recommendation request latency (handler time)",
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.requests = Counter("freshrec_requests", "Recommendation requests by outcome", ["outcome"], registry=r)
        self.candidates = Counter("freshrec_candidates", "Candidates by source", ["source"], registry=r)
        self.replica_age = Gauge("freshrec_replica_age_seconds", "Seconds since the last changelog record", registry=r)
        self.replica_users = Gauge("freshrec_replica_users", "Users in the local replica", registry=r)
        self.replica_items = Gauge("freshrec_replica_items", "Items in the local catalog", registry=r)
        self.caught_up = Gauge("freshrec_replica_caught_up", "1 once the replicas caught up", registry=r)
        self.broker = Gauge("freshrec_broker_connected", "1 while the broker answers", registry=r)
        self.index_size = Gauge("freshrec_index_items", "Live items in the HNSW shards", registry=r)
        self.index_pending = Gauge("freshrec_index_pending", "Staged vector changes not yet indexed", registry=r)
        self.index_staleness = Gauge("freshrec_index_staleness_seconds", "Age of the oldest staged change", registry=r)
        self.impressions = Gauge("freshrec_impressions_logged", "Impressions handed to the producer", registry=r)
        self.impressions_dropped = Gauge("freshrec_impressions_dropped", "Impressions dropped", registry=r)
        # label children resolved once: ``labels()`` per request costs a lock and a dict lookup each
        self.by_outcome = {o: self.requests.labels(o) for o in ("ok", "fallback", "error")}
        self.by_source = {src: self.candidates.labels(src) for src in rec.SOURCES}


class Runtime:
    """Everything the lifespan owns: replica, index, ranker, impression logger, metrics."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        opts = settings.serving
        ix = opts.index
        cfg = settings.model.core()
        self.catalog = ItemCatalog(cfg)
        params = IndexParams(
            dim=cfg.dim, M=ix.M, ef_construction=ix.ef_construction, ef=ix.ef, rerank=ix.rerank, threads=ix.threads
        )
        watermark: dict[int, int] = {}
        self.index: ShardedIndex | None = None
        snap = Path(ix.snapshot_dir) if ix.snapshot_dir else None
        if snap is not None and (snap / "manifest.json").exists():
            self.index = ShardedIndex.load(snap, ef=ix.ef, rerank=ix.rerank)
            watermark = dict(self.index.watermark)
            log.info("index snapshot loaded: %d items, watermark %s", self.index.size, watermark)
        if self.index is None:
            self.index = ShardedIndex(params, settings.partitions)
        self.index.set_query_threads(ix.query_threads)
        self.state = LiveState(settings, self.catalog, self.index, index_watermark=watermark)
        self.ranker = BlendRanker(self.catalog, opts.rank, opts.model_version)
        self.recommender = rec.Recommender(opts, self.state, self.catalog, self.index, self.ranker)
        self.producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "linger.ms": 5,
                "queue.buffering.max.messages": 100_000,
                "message.timeout.ms": 300_000,
                "log_level": 3,
            }
        )
        self.impressions = ImpressionLogger(settings, self.producer)
        self.metrics = _Metrics()
        self._stop = threading.Event()
        self._applier: threading.Thread | None = None
        self._frozen = False
        self.started_at = time.time()
        #: what ``use_huge_pages`` did once the replica caught up (None: not yet, or disabled)
        self.huge_pages: HugePages | None = None

    def start(self) -> None:
        """Start the background threads."""
        self.state.start()
        self.impressions.start()
        self._applier = threading.Thread(target=self._apply_loop, name="freshrec-index", daemon=True)
        self._applier.start()

    def _apply_loop(self) -> None:
        opts = self.settings.serving
        assert self.index is not None
        last_trending = 0.0
        settled = False  # the one-time work once the replica has caught up (the big structures exist)
        while not self._stop.is_set():
            if not settled and self.state.caught_up.is_set():
                settled = True
                if opts.gc_freeze:
                    self.freeze_heap()
                if opts.huge_pages:
                    t0 = time.perf_counter()
                    hp = self.huge_pages = use_huge_pages()
                    log.info("huge pages requested on %d regions (%d MB, %d MB collapsed) in %.1f s",
                             hp.regions, hp.bytes >> 20, hp.collapsed >> 20, time.perf_counter() - t0)  # fmt: skip
            applied = self.index.apply_pending(opts.index.apply_max)
            now = time.monotonic()
            if now - last_trending >= opts.trending_interval_s:
                last_trending = now
                wm = self.state.event_watermark_us or int(time.time() * 1e6)
                self.catalog.refresh_trending(wm, max(opts.trending_candidates * 4, 500))
            if not applied:
                self._stop.wait(opts.index.apply_interval_s)

    def freeze_heap(self) -> None:
        """Move every object alive now out of the cyclic GC's reach (``gc.freeze``).

        With 1M items the replica, the catalog and the index shards hold a few huge containers
        (id lists, id->row dicts) that a full collection traverses entry by entry: ~35 ms with the
        GIL held, every few seconds under load, i.e. straight into the tail latency. They live
        as long as the process, so they are frozen once the replica has caught up.
        """
        gc.collect()
        gc.freeze()
        self._frozen = True
        log.info("heap frozen for the cyclic GC: %d objects", gc.get_freeze_count())

    def stop(self) -> None:
        """Stop the threads, flush impressions, and snapshot the index if configured."""
        self._stop.set()
        if self._frozen:
            gc.unfreeze()  # the process may go on (tests, embedding): let the GC see these again
            self._frozen = False
        self.state.stop()
        self.impressions.stop()
        self.producer.flush(5.0)
        if self._applier is not None:
            self._applier.join(10.0)
        ix = self.settings.serving.index
        if ix.snapshot_dir and ix.save_on_exit and self.index is not None:
            self.save_snapshot(Path(ix.snapshot_dir))

    def save_snapshot(self, path: Path) -> None:
        """Apply every staged change, then snapshot the index with the item-changelog offsets."""
        assert self.index is not None
        while self.index.apply_pending(None):
            pass
        topic = self.settings.topics.item_changelog
        offsets = {p: self.state.positions.get((topic, p), 0) for p in range(self.settings.partitions)}
        self.index.save(path, offsets)
        log.info("index snapshot saved to %s (%d items)", path, self.index.size)

    def refresh_metrics(self) -> bytes:
        """Update the gauges and render the Prometheus text format."""
        m, st = self.metrics, self.state
        assert self.index is not None
        age = st.age_s()
        m.replica_age.set(age if age is not None else float("nan"))
        m.replica_users.set(len(st.users))
        m.replica_items.set(len(self.catalog))
        m.caught_up.set(1 if st.caught_up.is_set() else 0)
        m.broker.set(1 if st.broker_ok else 0)
        m.index_size.set(self.index.size)
        m.index_pending.set(self.index.pending)
        m.index_staleness.set(self.index.oldest_pending_age_s())
        m.impressions.set(self.impressions.sent)
        m.impressions_dropped.set(self.impressions.dropped)
        return generate_latest(m.registry)


def _error(status: int, code: str, message: str, error_id: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if error_id is not None:
        body["error_id"] = error_id
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _parse_exclude(raw: list[str] | None) -> frozenset[str]:
    if not raw:
        return frozenset()
    out: set[str] = set()
    for chunk in raw:
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            if not _ID_RE.match(item):
                raise BadRequest(f"exclude: {item[:64]!r} is not a valid item id (pattern {ID_PATTERN})")
            out.add(item)
    if len(out) > _MAX_EXCLUDE:
        raise BadRequest(f"exclude: at most {_MAX_EXCLUDE} ids")
    return frozenset(out)


_DIGITS_RE = re.compile(r"^[0-9]{1,9}$")
#: anything but plain digits is parsed by pydantic itself (it accepts " 7 ", "+3", "5.0", ...)
_INT_ADAPTER = TypeAdapter(int)
_SURFACE_PATTERN = r"^[A-Za-z0-9_.\-]+$"
_SURFACE_RE = re.compile(_SURFACE_PATTERN)


def _text_param(qp: QueryParams, name: str, errors: list[str], pattern: re.Pattern[str] | None,
                max_length: int | None = None) -> str | None:  # fmt: skip
    value = qp.get(name)
    if value is None:
        return None
    if max_length is not None and len(value) > max_length:
        errors.append(f"{name}: String should have at most {max_length} characters")
    elif pattern is not None and not pattern.match(value):
        errors.append(f"{name}: String should match pattern '{pattern.pattern}'")
    return value


def parse_recommendation_query(qp: QueryParams, opts: ServingOptions) -> rec.Request:
    """The :class:`~serving.recommend.Request` of a ``/v1/recommendations`` query string.

    The same rules (and the same messages, joined by ``; ``) as the FastAPI declaration of the
    route, which stays the documented contract (OpenAPI); raises :class:`BadRequest`. Validating
    by hand skips FastAPI's per-request dependency solving (~0.1 ms, a tenth of a request).
    """
    errors: list[str] = []
    user_id = _text_param(qp, "user_id", errors, _ID_RE)
    if user_id is None:
        errors.append("user_id: Field required")
    k = opts.default_k
    raw_k = qp.get("k")
    if raw_k is not None:
        try:
            k = int(raw_k) if _DIGITS_RE.match(raw_k) else _INT_ADAPTER.validate_python(raw_k)
        except ValidationError as exc:
            errors.append(f"k: {exc.errors()[0]['msg']}")
        else:
            if k < 1:
                errors.append("k: Input should be greater than or equal to 1")
            elif k > opts.max_k:
                errors.append(f"k: Input should be less than or equal to {opts.max_k}")
    item_id = _text_param(qp, "item_id", errors, _ID_RE)
    surface = _text_param(qp, "surface", errors, _SURFACE_RE, 64)
    exclude_raw = qp.getlist("exclude")
    category = _text_param(qp, "category", errors, None, 128)
    if errors:
        raise BadRequest("; ".join(errors))
    assert user_id is not None
    return rec.Request(user_id, k, item_id, surface, _parse_exclude(exclude_raw), category)


def create_app(settings: ServingSettings | None = None) -> FastAPI:
    """Build the API. Heavy work (replicas, index) starts in the lifespan, not here."""
    settings = settings or ServingSettings()
    opts = settings.serving

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        switch = sys.getswitchinterval()
        if opts.gil_switch_interval_s > 0:
            sys.setswitchinterval(opts.gil_switch_interval_s)
        runtime.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.stop()
            sys.setswitchinterval(switch)

    app = FastAPI(
        title="freshrec",
        version="1",
        summary="Real-time recommendations over live streaming state",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_req: Request, exc: RequestValidationError) -> Response:
        return _error(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(ServingError)
    async def _on_serving_error(_req: Request, exc: ServingError) -> Response:
        return _error(exc.http_status, exc.code, str(exc))

    @app.exception_handler(Exception)
    async def _on_unexpected(_req: Request, exc: Exception) -> Response:
        error_id = uuid.uuid4().hex
        log.error("unhandled error %s", error_id, exc_info=exc)
        return _error(500, "internal", "internal error; quote the error_id when reporting it", error_id)

    def runtime_of(request: Request) -> Runtime:
        rt: Runtime = request.app.state.runtime
        return rt

    def serve_recommendation(rt: Runtime, req: rec.Request) -> Response:
        t0 = time.perf_counter()
        m = rt.metrics
        try:
            slate = rt.recommender.recommend(req)
        except Exception:
            m.by_outcome["error"].inc()
            raise
        if opts.log_impressions:
            rt.impressions.log(slate, req.surface)
        body = {
            "request_id": slate.request_id,
            "user_id": slate.user_id,
            "items": [
                {"item_id": it.item_id, "score": it.score, "source": it.source, "position": pos}
                for pos, it in enumerate(slate.items)
            ],
            "fallback": slate.fallback,
            "fallback_reason": slate.fallback_reason,
            "candidates": slate.candidates,
            "user_state": {"version": slate.user_version, "last_event_us": slate.user_last_event_us},
            "provenance": slate.provenance,
        }
        for source, n in slate.candidates.items():
            if n:
                m.by_source[source].inc(n)
        m.by_outcome["fallback" if slate.fallback else "ok"].inc()
        m.latency.observe(time.perf_counter() - t0)
        return JSONResponse(body)

    @app.get(
        "/v1/recommendations",
        response_model=RecommendationsOut,
        responses={422: {"model": ErrorOut}, 500: {"model": ErrorOut}},
        tags=["recommendations"],
    )
    async def recommendations(
        request: Request,
        user_id: Annotated[str, Query(pattern=ID_PATTERN, description="the user to recommend for")],
        k: Annotated[int, Query(ge=1, le=opts.max_k, description="slate size")] = opts.default_k,
        item_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="the item being viewed")] = None,
        surface: Annotated[str | None, Query(max_length=64, pattern=_SURFACE_PATTERN)] = None,
        exclude: Annotated[list[str] | None, Query(description="item ids to leave out (comma-separated)")] = None,
        category: Annotated[str | None, Query(max_length=128, description="only items of this category")] = None,
    ) -> Response:
        """A ranked slate for ``user_id`` that reflects the live state.

        This declaration is the documented contract (OpenAPI); requests are served by the
        route below, which validates the same parameters by hand (``parse_recommendation_query``).
        """
        req = rec.Request(user_id, k, item_id, surface, _parse_exclude(exclude), category)
        return serve_recommendation(runtime_of(request), req)

    async def recommendations_fast(request: Request) -> Response:
        try:
            req = parse_recommendation_query(request.query_params, opts)
        except BadRequest as exc:
            return _error(422, exc.code, str(exc))
        return serve_recommendation(runtime_of(request), req)

    # served ahead of the FastAPI route of the same path (first match wins); the FastAPI route
    # still generates /docs and /openapi.json
    app.router.routes.insert(0, Route("/v1/recommendations", recommendations_fast, methods=["GET"]))

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=EventAccepted,
        responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
        tags=["events"],
    )
    async def post_event(request: Request) -> Response:
        """Validate one event (the Kafka wire format) and produce it to the events topic."""
        rt = runtime_of(request)
        raw = await request.body()
        try:
            ev = codec.decode(raw, int(time.time() * 1e6))
        except InvalidEvent as exc:
            return _error(422, exc.reason, exc.detail)
        key = ev.item_id if ev.type is EventType.ITEM_UPSERT else ev.user_id
        assert key is not None
        topic = settings.topics.events
        part = partition_for(key, settings.partitions)
        try:
            rt.producer.produce(topic, raw, key.encode(), partition=part)
            rt.producer.poll(0)
        except (BufferError, KafkaException) as exc:
            return _error(503, "broker_unavailable", f"event not queued: {type(exc).__name__}")
        return JSONResponse({"event_id": ev.event_id, "topic": topic, "partition": part}, status_code=202)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorOut}})
    async def readyz(request: Request) -> Response:
        """Readiness: 200 only once the changelog replicas have caught up."""
        rt = runtime_of(request)
        prov = rt.recommender.provenance()
        if rt.state.caught_up.is_set():
            return JSONResponse({"status": "ready", **prov})
        return JSONResponse({"status": "catching_up", **prov}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        return Response(runtime_of(request).refresh_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", tags=["ops"])
    async def root(request: Request) -> dict[str, Any]:
        """Where to go from here."""
        rt = runtime_of(request)
        return {
            "service": "freshrec",
            "try": "/v1/recommendations?user_id=u1&k=10",
            "docs": "/docs",
            "ready": rt.state.caught_up.is_set(),
            "users": len(rt.state.users),
            "items": len(rt.catalog),
        }

    return app
