"""Shared fixtures: a real Tansu broker per test session, and fresh settings per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker, free_port
from streams.config import Settings, Topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A fresh embedded Kafka-protocol broker (Tansu) on 127.0.0.1 for the whole session."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(port=free_port(), log_path=str(log_path)) as b:
        yield b


@pytest.fixture
def live_settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings for one test: its own topic names and group, so tests never share state."""
    tag = uuid.uuid4().hex[:8]
    topics = Topics.tagged(tag)
    return Settings(
        bootstrap_servers=broker.bootstrap,
        partitions=3,
        data_dir=str(tmp_path / "data"),
        group_id=f"g-{tag}",
        topics=topics,
    )
