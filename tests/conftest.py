"""Shared test fixtures: real MQTT brokers on free loopback ports, unique topic prefixes.

* ``mosquitto_broker`` (session): a real ``mosquitto`` with a minimal config, yields
  ``(host, port)``. Skips with the reason only if the binary is missing (setup installs it).
* ``amqtt_broker`` (session): the embedded amqtt broker (the demo's default, MQTT 3.1.1
  only) in a background thread with its own event loop, so it serves every test's loop.
* ``topic_prefix``: a unique ``detransformer/test-<uuid>`` per test, so tests sharing a
  broker never see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def find_mosquitto() -> str | None:
    for path in _MOSQUITTO_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("mosquitto")


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Start a private Mosquitto on a free loopback port for the whole session."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    host, port = "127.0.0.1", free_port()
    workdir = tmp_path_factory.mktemp("mosquitto")
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"  # without it small fan-out copies wait ~40 ms (Nagle)
        "max_queued_messages 100000\n"  # QoS 0 bursts of a benchmark must not be dropped
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )
    log_file = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port(host, port):
            proc.kill()
            raise RuntimeError(
                f"mosquitto did not open {host}:{port}; log: "
                f"{(workdir / 'mosquitto.log').read_text(errors='replace')[-2000:]}"
            )
        yield host, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log_file.close()


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[tuple[str, int]]:
    """Run the embedded amqtt broker (MQTT 3.1.1) in its own thread and event loop."""
    try:
        from amqtt.broker import Broker
    except ImportError as e:  # pragma: no cover - amqtt is a runtime dependency
        pytest.skip(f"amqtt is not installed: {e}")
    host, port = "127.0.0.1", free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []
    holder: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            broker = Broker(config, loop=loop)
            await broker.start()
            holder["broker"] = broker

        try:
            loop.run_until_complete(boot())
        except Exception as e:  # noqa: BLE001 - re-raised in the test thread below
            failure.append(e)
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
    thread.start()
    started.wait(timeout=20)
    if failure:
        raise RuntimeError(f"amqtt broker failed to start: {failure[0]!r}")
    if not wait_for_port(host, port):
        raise RuntimeError(f"amqtt broker did not open {host}:{port}")
    try:
        yield host, port
    finally:
        broker = holder.get("broker")
        if broker is not None:
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                fut.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix per test (no wildcards, no trailing slash)."""
    return f"detransformer/test-{uuid.uuid4().hex[:12]}"
