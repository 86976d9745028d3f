"""Transport behaviour, the same tests on every implementation: the in-memory hub, a real
Mosquitto and the embedded amqtt broker (MQTT 3.1.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.transport import (
    Mailbox,
    MailboxLimits,
    MemoryHub,
    RequestCancelled,
    Transport,
    TransportClosed,
    TransportError,
    TransportOverflow,
    TransportTimeout,
)
from detransformer_edge.transport.mqtt import MqttTransport

Factory = Callable[..., Transport]


@pytest.fixture(
    params=[
        "memory",
        pytest.param("mosquitto", marks=pytest.mark.mosquitto),
        pytest.param("amqtt", marks=pytest.mark.slow),
    ]
)
def make_transport(request: pytest.FixtureRequest, topic_prefix: str) -> Factory:
    """A factory ``make_transport(device_id, **kw)`` for the backend under test."""
    if request.param == "memory":
        hub = MemoryHub()
        return lambda dev, **kw: hub.transport(dev, **kw)
    host, port = request.getfixturevalue(f"{request.param}_broker")
    return lambda dev, **kw: MqttTransport.connect(dev, host, port, RunTopics(topic_prefix), **kw)


@contextlib.asynccontextmanager
async def cluster(make: Factory, *ids: str, **kw: Any) -> AsyncIterator[list[Transport]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(make(i, **kw)) for i in ids]


async def test_send_then_recv_buffers_early_arrivals(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (a, b):
        await a.send("b", ("req1", 0), b"first")
        await a.send("b", ("req1", 1), b"second")
        # receive in the opposite order: keys, not arrival order, decide
        assert await b.recv("a", ("req1", 1), timeout=5) == b"second"
        assert await b.recv("a", ("req1", 0), timeout=5) == b"first"
        assert a.stats.msgs_sent == 2 and b.stats.msgs_received == 2


async def test_recv_waits_for_a_later_send(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (a, b):
        waiter = asyncio.create_task(b.recv("a", ("req1", "s"), timeout=5))
        await asyncio.sleep(0.05)
        await a.send("b", ("req1", "s"), b"x" * 1_000_000)
        assert len(await waiter) == 1_000_000


async def test_int_and_str_steps_are_the_same_key(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (a, b):
        await a.send("b", ("r", 4), b"p")
        assert await b.recv("a", ("r", "4"), timeout=5) == b"p"


async def test_publish_is_one_upload_and_reaches_only_listed_devices(
    make_transport: Factory,
) -> None:
    async with cluster(make_transport, "a", "b", "c", "d") as (a, b, c, d):
        await a.publish(["a", "b", "c"], ("req", "bc"), b"hello")  # "a" itself is skipped
        assert a.stats.msgs_sent == 1
        assert await b.recv("a", ("req", "bc"), timeout=5) == b"hello"
        assert await c.recv("a", ("req", "bc"), timeout=5) == b"hello"
        with pytest.raises(TransportTimeout):
            await d.recv("a", ("req", "bc"), timeout=0.3)
        with pytest.raises(TransportTimeout):  # no echo of its own publish
            await a.recv("a", ("req", "bc"), timeout=0.1)
        assert a.mailbox.buffered == 0 and d.mailbox.buffered == 0


async def test_concurrent_requests_never_mix(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (a, b):
        reqs = [f"req{i}" for i in range(3)]
        for step in range(4):
            for r in reqs:
                await a.send("b", (r, step), f"{r}/{step}".encode())
        results = await asyncio.gather(
            *[b.recv("a", (r, s), timeout=5) for r in reversed(reqs) for s in range(4)]
        )
        assert results == [f"{r}/{s}".encode() for r in reversed(reqs) for s in range(4)]


async def test_timeout_is_typed_and_prompt(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (_a, b):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TransportTimeout, match="from 'a'"):
            await b.recv("a", ("r", 0), timeout=0.2)
        assert loop.time() - t0 < 2.0
        with pytest.raises(TimeoutError):  # also catchable as the builtin
            await b.recv("a", ("r", 0), timeout=0.01)


async def test_cancel_wakes_waiters_and_frees_buffers(make_transport: Factory) -> None:
    async with cluster(make_transport, "a", "b") as (a, b):
        await a.send("b", ("dead", 0), b"stale")
        await a.send("b", ("live", 0), b"keep")
        await b.recv("a", ("live", 0), timeout=5)  # by now "dead"/0 has arrived too
        waiter = asyncio.create_task(b.recv("a", ("dead", 1), timeout=10))
        await asyncio.sleep(0.05)
        assert b.cancel("dead", "user hung up") == 1
        with pytest.raises(RequestCancelled, match="user hung up"):
            await asyncio.wait_for(waiter, 2)
        assert b.mailbox.buffered == 0
        await a.send("b", ("dead", 2), b"late")  # late messages of a cancelled request are dropped
        await a.send("b", ("live", 1), b"sync")
        await b.recv("a", ("live", 1), timeout=5)
        assert b.mailbox.buffered == 0
        with pytest.raises(RequestCancelled):
            await b.recv("a", ("dead", 2), timeout=1)


async def test_overflow_drops_and_fails_fast(make_transport: Factory) -> None:
    limits = MailboxLimits(max_messages=2)
    async with cluster(make_transport, "a", "b", limits=limits) as (a, b):
        for s in range(3):
            await a.send("b", ("r", s), b"x")
        await a.send("b", ("sync", 0), b"")  # dropped too: the mailbox is full
        async with asyncio.timeout(5):
            while b.stats.dropped_overflow < 2:
                await asyncio.sleep(0.01)
        with pytest.raises(TransportOverflow):
            await b.recv("a", ("sync", 0), timeout=5)
        assert await b.recv("a", ("r", 0), timeout=1) == b"x"
        with pytest.raises(TransportOverflow, match="buffer full"):
            await b.recv("a", ("r", 2), timeout=5)
        assert b.stats.dropped_overflow == 2


async def test_close_fails_pending_receives(make_transport: Factory) -> None:
    b = make_transport("b")
    async with b:
        waiter = asyncio.create_task(b.recv("a", ("r", 0), timeout=10))
        await asyncio.sleep(0.05)
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(waiter, 2)
    with pytest.raises(TransportClosed):
        await b.recv("a", ("r", 0), timeout=1)
    with pytest.raises(TransportClosed):
        await b.start()


async def test_bad_ids_are_typed_errors(make_transport: Factory) -> None:
    with pytest.raises(TransportError, match="invalid device id"):
        make_transport("a/b")
    async with cluster(make_transport, "a") as (a,):
        with pytest.raises(TransportError, match="invalid request id"):
            await a.send("b", ("r/1", 0), b"")
        with pytest.raises(TransportError, match="invalid step"):
            await a.send("b", ("r", "#"), b"")
        with pytest.raises(TransportError, match="invalid device id"):
            await a.send("x,y", ("r", 0), b"")
        with pytest.raises(TransportError, match="key must be"):
            await a.recv("b", ("r",), timeout=1)  # type: ignore[arg-type]
        first = asyncio.create_task(a.recv("b", ("r", 0), timeout=5))
        await asyncio.sleep(0)
        with pytest.raises(TransportError, match="two receives"):
            await a.recv("b", ("r", 0), timeout=5)
        first.cancel()


async def test_unstarted_transport_refuses_use() -> None:
    t = MemoryHub().transport("a")
    with pytest.raises(TransportClosed, match="not started"):
        await t.send("b", ("r", 0), b"")


async def test_memory_hub_counts_fan_out() -> None:
    hub = MemoryHub()
    async with cluster(lambda d, **kw: hub.transport(d, **kw), "a", "b", "c") as (a, _b, _c):
        await a.publish(["b", "c"], ("r", 0), b"1234")
        assert hub.broker.msgs_received == 1 and hub.broker.msgs_sent == 2
        assert hub.broker.bytes_sent == 8
        with pytest.raises(TransportError, match="already connected"):
            async with hub.transport("a"):
                pass


def test_mailbox_ttl_expires_unclaimed_messages() -> None:
    now = [1000.0]
    box = Mailbox(MailboxLimits(ttl_s=10.0), clock=lambda: now[0])
    box.deliver("r", "0", "a", b"old")
    now[0] += 11.0
    box.deliver("r", "1", "a", b"new")  # insertion expires what outlived the TTL
    assert box.buffered == 1 and box.buffered_bytes == 3


@pytest.mark.mosquitto
async def test_mqtt_v5_uses_no_local(mosquitto_broker: tuple[str, int], topic_prefix: str) -> None:
    host, port = mosquitto_broker
    async with (
        MqttTransport.connect("a", host, port, RunTopics(topic_prefix), protocol="5") as a,
        MqttTransport.connect("b", host, port, RunTopics(topic_prefix), protocol="5") as b,
        MqttTransport.connect("c", host, port, RunTopics(topic_prefix)) as c,  # 3.1.1 and 5 mix fine
    ):
        await a.publish(["b", "c"], ("r", 0), b"v5")
        assert await b.recv("a", ("r", 0), timeout=5) == b"v5"
        assert await c.recv("a", ("r", 0), timeout=5) == b"v5"
        await b.send("a", ("r", 1), b"sync")
        await a.recv("b", ("r", 1), timeout=5)
        assert a.stats.dropped_unwanted == 0  # the broker did not echo a's own publish


@pytest.mark.mosquitto
async def test_mqtt_refused_connection_is_typed() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = MqttTransport.connect("a", "127.0.0.1", port, RunTopics("detransformer/x"), connect_timeout_s=1.0)
    with pytest.raises(TransportError, match="cannot connect"):
        await t.start()
    assert not t.session.connected


@pytest.mark.mosquitto
async def test_mqtt_close_cancels_its_task(
    mosquitto_broker: tuple[str, int], topic_prefix: str
) -> None:
    host, port = mosquitto_broker
    before = set(asyncio.all_tasks())
    async with MqttTransport.connect("a", host, port, RunTopics(topic_prefix)) as t:
        mine = {task for task in asyncio.all_tasks() - before if t.session.settings.client_id in task.get_name()}
        assert mine  # the session's connection and reader
    await asyncio.sleep(0)
    assert all(task.done() for task in mine)


def test_prefix_with_wildcards_is_refused() -> None:
    with pytest.raises(ProtocolError, match="invalid topic prefix"):
        RunTopics("detransformer/+")


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A Mosquitto of this test alone, so the test may kill it."""
    from tests.conftest import find_mosquitto, free_port, wait_for_port

    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port("127.0.0.1", port)
        yield port, proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.mosquitto
async def test_broker_loss_fails_pending_receives(
    private_mosquitto: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """A broker that dies mid-request must fail the waiting receive, not hang it."""
    port, proc = private_mosquitto
    async with MqttTransport.connect("a", "127.0.0.1", port, RunTopics("detransformer/loss")) as a:
        waiter = asyncio.create_task(a.recv("b", ("r", 0), timeout=30))
        await asyncio.sleep(0.1)
        proc.kill()
        with pytest.raises(TransportError, match="connection lost"):
            await asyncio.wait_for(waiter, 10)
        with pytest.raises(TransportError):
            await a.send("b", ("r", 1), b"x")
