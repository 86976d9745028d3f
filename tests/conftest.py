"""Shared test fixtures: real MQTT brokers on free loopback ports, unique topic prefixes.

* ``mosquitto_broker`` (session): a real ``mosquitto`` with a minimal config, yields
  ``(host, port)``. Skips with the reason only if the binary is missing (setup installs it).
* ``amqtt_broker`` (session): the embedded amqtt broker (the demo's default, MQTT 3.1.1
  only) in a background thread with its own event loop, so it serves every test's loop.
* ``topic_prefix``: a unique ``detransformer/test-<uuid>`` per test, so tests sharing a
  broker never see each other's messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from detransformer_edge.transport.broker import (  # noqa: F401 - re-exported for tests
    find_mosquitto,
    free_port,
    run_amqtt,
    run_mosquitto,
    wait_for_port,
)


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Start a private Mosquitto on a free loopback port for the whole session."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    with run_mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker.host, broker.port


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[tuple[str, int]]:
    """Run the embedded amqtt broker (MQTT 3.1.1) in its own thread and event loop."""
    with run_amqtt() as broker:
        yield broker.host, broker.port


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix per test (no wildcards, no trailing slash)."""
    return f"detransformer/test-{uuid.uuid4().hex[:12]}"
