"""Fixtures: a real uvicorn server on 127.0.0.1 running ``create_app`` against the test broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from serving.app import Runtime, create_app
from serving.http import CoalescingHttpToolsProtocol
from serving.settings import ServingSettings
from streams.broker import ensure_topics, free_port
from streams.config import Settings


def serving_settings_for(live: Settings, **serving: object) -> ServingSettings:
    """ServingSettings sharing the worker settings' broker, partitions and topics."""
    base = ServingSettings(bootstrap_servers=live.bootstrap_servers, partitions=live.partitions, topics=live.topics)
    opts = base.serving.model_copy(update=serving)
    return base.model_copy(update={"serving": opts})


@dataclass
class Api:
    """A running API server."""

    url: str
    app: FastAPI
    settings: ServingSettings

    @property
    def runtime(self) -> Runtime:
        """The app's runtime (replica, index, recommender)."""
        rt: Runtime = self.app.state.runtime
        return rt

    def client(self) -> httpx.Client:
        """An HTTP client for this server."""
        return httpx.Client(base_url=self.url, timeout=10.0)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread cannot own signals
        pass


def start_api(settings: ServingSettings) -> tuple[Api, _Server, threading.Thread]:
    """Start uvicorn with ``create_app(settings)`` in a thread; returns once it accepts requests."""
    port = free_port()
    app = create_app(settings)
    # the protocol `freshrec serve` runs (one socket write per response)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", http=CoalescingHttpToolsProtocol,
                            log_level="warning", access_log=False)  # fmt: skip
    server = _Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "API server thread died"
        assert time.monotonic() < deadline, "API server did not start"
        time.sleep(0.02)
    return Api(f"http://127.0.0.1:{port}", app, settings), server, thread


@pytest.fixture
def api(live_settings: Settings) -> Iterator[Api]:
    """A real API server on 127.0.0.1 over the test's topics (created empty)."""
    ensure_topics(live_settings)
    api, server, thread = start_api(serving_settings_for(live_settings))
    yield api
    server.should_exit = True
    thread.join(30)
