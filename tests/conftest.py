"""Shared test fixtures: real MQTT brokers on free loopback ports, unique topic prefixes.

* ``mosquitto_broker`` (session): a real ``mosquitto`` with a minimal config, yields
  ``(host, port)``. Skips with the reason only if the binary is missing (setup installs it).
* ``amqtt_broker`` (session): the embedded amqtt broker (the demo's default, MQTT 3.1.1
  only) in a background thread with its own event loop, so it serves every test's loop.
* ``topic_prefix``: a unique ``detransformer/test-<uuid>`` per test, so tests sharing a
  broker never see each other's messages.
"""

from __future__ import annotations

import random
import signal
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import core as hypothesis_core
from hypothesis import settings as hypothesis_settings

from detransformer_edge.transport.broker import (  # noqa: F401 - re-exported for tests
    find_mosquitto,
    free_port,
    run_amqtt,
    run_mosquitto,
    wait_for_port,
)

# A test run started in the background by a non-interactive shell (`make test &`, a CI wrapper)
# inherits SIGINT *ignored*, and so would every command the tests start: the tests that send
# SIGINT (Ctrl-C) to a demo or a testbed owner would wait for an exit that never comes. With
# SIGINT handled here, the commands the tests start get the default back (a handled signal is
# reset on exec, an ignored one stays ignored), and Python raises KeyboardInterrupt in them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

hypothesis_settings.register_profile("dte", print_blob=True)  # a failure prints how to replay it
hypothesis_settings.load_profile("dte")


def pytest_configure(config: pytest.Config) -> None:
    """Each run draws a fresh Hypothesis seed (repeated runs explore different inputs) and says
    which, so a failure anywhere, CI included, replays with ``--hypothesis-seed=N``."""
    seed = config.getoption("hypothesis_seed", None)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
        hypothesis_core.global_force_seed = seed
    config.stash[_SEED] = seed


_SEED = pytest.StashKey[object]()


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis seed: {config.stash[_SEED]} (replay with --hypothesis-seed={config.stash[_SEED]})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if exitstatus != 0:
        terminalreporter.write_line(f"hypothesis seed of this run: {config.stash[_SEED]} "
                                    f"(replay with --hypothesis-seed={config.stash[_SEED]})")


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
