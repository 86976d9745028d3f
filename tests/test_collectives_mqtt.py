"""Collectives through real brokers: Mosquitto (2-4 devices, concurrent requests, v3.1.1
and v5) and the embedded amqtt broker the demo uses (3.1.1 only)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import numpy as np
import pytest

from detransformer_edge.parallel import collectives as C
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.transport import RequestCancelled, Transport, TransportTimeout
from detransformer_edge.transport.mqtt import MqttTransport

IDS = ["pi4", "mini-pc", "laptop", "speaker"]


@contextlib.asynccontextmanager
async def mqtt_group(
    broker: tuple[str, int], prefix: str, n: int, protocol: Literal["3.1.1", "5"] = "3.1.1"
) -> AsyncIterator[list[Transport]]:
    host, port = broker
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                MqttTransport.connect(d, host, port, RunTopics(prefix), protocol=protocol)
            )
            for d in IDS[:n]
        ]


def widths_for(n: int) -> list[int]:
    return {2: [5, 3], 3: [4, 2, 2], 4: [2, 2, 2, 2]}[n]


async def check_collectives(ts: list[Transport], req: str, wire_dtype: str = "float32") -> None:
    n = len(ts)
    group = [t.device_id for t in ts]
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal((16, w)).astype(np.float32) for w in widths_for(n)]
    full = [rng.standard_normal((16, 64)).astype(np.float32) for _ in range(n)]
    async with asyncio.timeout(30):
        gathered = await asyncio.gather(
            *[
                C.all_gather(t, group, req, "ag", xs[i], wire_dtype, timeout=10)
                for i, t in enumerate(ts)
            ]
        )
        reduced = await asyncio.gather(
            *[
                C.all_reduce(t, group, req, "ar", full[i], wire_dtype, timeout=10)
                for i, t in enumerate(ts)
            ]
        )
        bcast = await asyncio.gather(
            *[
                C.broadcast(
                    t,
                    group,
                    req,
                    "bc",
                    full[0] if i == 0 else None,
                    wire_dtype,
                    root=group[0],
                    timeout=10,
                )
                for i, t in enumerate(ts)
            ]
        )
    tol = 0.0 if wire_dtype == "float32" else 0.05
    for g, r, b in zip(gathered, reduced, bcast, strict=True):
        np.testing.assert_allclose(g, np.concatenate(xs, axis=-1), atol=tol)
        np.testing.assert_allclose(r, np.sum(full, axis=0), rtol=1e-5, atol=max(tol * n * 4, 1e-5))
        np.testing.assert_allclose(b, full[0], atol=tol)
        np.testing.assert_array_equal(g, gathered[0])
        np.testing.assert_array_equal(r, reduced[0])


@pytest.mark.mosquitto
@pytest.mark.parametrize("n", [2, 3, 4])
async def test_collectives_on_mosquitto(
    mosquitto_broker: tuple[str, int], topic_prefix: str, n: int
) -> None:
    async with mqtt_group(mosquitto_broker, topic_prefix, n) as ts:
        await check_collectives(ts, "req-a")
        # per device: 1 (all_gather) + (n-1) + 1 (all_reduce) + broadcast (root only)
        sent = [t.stats.msgs_sent for t in ts]
        assert sent == [n + 2] + [n + 1] * (n - 1)


@pytest.mark.mosquitto
@pytest.mark.parametrize("wire_dtype", ["float16", "int8"])
async def test_lossy_collectives_on_mosquitto_v5(
    mosquitto_broker: tuple[str, int], topic_prefix: str, wire_dtype: str
) -> None:
    async with mqtt_group(mosquitto_broker, topic_prefix, 3, protocol="5") as ts:
        await check_collectives(ts, "req-v5", wire_dtype)


@pytest.mark.mosquitto
async def test_three_concurrent_requests_on_mosquitto(
    mosquitto_broker: tuple[str, int], topic_prefix: str
) -> None:
    """Three requests interleave layer by layer on the same three devices over one broker."""
    async with mqtt_group(mosquitto_broker, topic_prefix, 3) as ts:
        group = [t.device_id for t in ts]
        widths = [4, 2, 2]

        async def device(i: int, t: Transport, req: str, base: float) -> np.ndarray:
            h = np.full((8, widths[i]), base + i, np.float32)
            for layer in range(4):  # one coupled-layer sync per "block"
                full = await C.all_gather(t, group, req, f"L{layer}", h, timeout=10)
                cols = np.cumsum([0, *widths])
                h = full[:, cols[i] : cols[i + 1]] + 1.0
            return await C.all_reduce(t, group, req, "final", full, timeout=10)

        async with asyncio.timeout(30):
            results = await asyncio.gather(
                *[device(i, t, f"req{k}", 100.0 * k) for k in range(3) for i, t in enumerate(ts)]
            )
        for k in range(3):
            x = np.concatenate(
                [np.full((8, w), 100.0 * k + i + 3) for i, w in enumerate(widths)], -1
            )
            for out in results[3 * k : 3 * k + 3]:
                np.testing.assert_array_equal(out, 3 * x)
        for t in ts:
            assert t.mailbox.buffered == 0


@pytest.mark.mosquitto
async def test_timeout_and_cancel_on_mosquitto(
    mosquitto_broker: tuple[str, int], topic_prefix: str
) -> None:
    async with mqtt_group(mosquitto_broker, topic_prefix, 2) as (a, b):
        group = [a.device_id, b.device_id]
        with pytest.raises(TransportTimeout):
            await C.all_gather(a, group, "lonely", 0, np.ones((1, 4), np.float32), timeout=0.3)
        task = asyncio.create_task(C.all_gather(a, group, "doomed", 0, np.ones((1, 4), np.float32)))
        await asyncio.sleep(0.05)
        a.cancel("doomed")
        with pytest.raises(RequestCancelled):
            await asyncio.wait_for(task, 2)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
async def test_collectives_on_amqtt(
    amqtt_broker: tuple[str, int], topic_prefix: str, n: int
) -> None:
    async with mqtt_group(amqtt_broker, topic_prefix, n) as ts:
        await check_collectives(ts, "req-amqtt")
        await check_collectives(ts, "req-amqtt-i8", "int8")
