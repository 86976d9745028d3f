"""Collectives on the in-memory transport: results, message counts, uneven widths,
concurrent requests, and the typed failures (timeout, cancel, bad arguments)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from detransformer_edge.parallel import collectives as C
from detransformer_edge.transport import (
    CollectiveError,
    MemoryHub,
    RequestCancelled,
    Transport,
    TransportTimeout,
)

IDS = ["pi4", "mini-pc", "laptop", "speaker"]


@contextlib.asynccontextmanager
async def memory_group(n: int) -> AsyncIterator[tuple[MemoryHub, list[Transport]]]:
    hub = MemoryHub()
    async with contextlib.AsyncExitStack() as stack:
        ts = [await stack.enter_async_context(hub.transport(d)) for d in IDS[:n]]
        yield hub, ts


async def on_all(ts: list[Transport], fn: Callable[[int, Transport], Awaitable[Any]]) -> list[Any]:
    """Run ``fn(rank, transport)`` on every device concurrently, like N processes would."""
    async with asyncio.timeout(20):
        return await asyncio.gather(*[fn(i, t) for i, t in enumerate(ts)])


def chunks(widths: list[int], rows: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((rows, w)).astype(np.float32) for w in widths]


@pytest.mark.parametrize(
    "widths", [[5], [3, 3], [4, 2, 2], [2, 2, 2, 2], [0, 3, 1, 4], [1, 0], [7, 1, 0]]
)
async def test_all_gather_uneven_widths_and_one_upload_each(widths: list[int]) -> None:
    n = len(widths)
    async with memory_group(n) as (hub, ts):
        group = [t.device_id for t in ts]
        xs = chunks(widths)
        outs = await on_all(ts, lambda i, t: C.all_gather(t, group, "r", 0, xs[i]))
        expected = np.concatenate(xs, axis=-1)
        for out in outs:
            np.testing.assert_array_equal(out, expected)
        for t in ts:
            assert t.stats.msgs_sent == (1 if n > 1 else 0)  # one fan-out publish per device
        assert hub.broker.msgs_sent == n * (n - 1)  # each chunk downloaded by n-1 devices


async def test_all_gather_along_axis_0_and_3d() -> None:
    async with memory_group(3) as (_hub, ts):
        group = [t.device_id for t in ts]
        xs = [np.full((2, w, 4), i, np.float32) for i, w in enumerate([1, 3, 2])]
        outs = await on_all(ts, lambda i, t: C.all_gather(t, group, "r", "x", xs[i], axis=1))
        for out in outs:
            np.testing.assert_array_equal(out, np.concatenate(xs, axis=1))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(3, 5), (2, 1), (7,), (), (0, 4), (2, 3, 8)])
async def test_all_reduce_sums(n: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(n)
    xs = [np.asarray(rng.standard_normal(shape), dtype=np.float32) for _ in range(n)]
    async with memory_group(n) as (_hub, ts):
        group = [t.device_id for t in ts]
        outs = await on_all(ts, lambda i, t: C.all_reduce(t, group, "r", 1, xs[i]))
        for out in outs:
            assert out.shape == shape and out.dtype == np.float32
            np.testing.assert_allclose(out, np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(out, outs[0])
        if n == 1:
            assert ts[0].stats.msgs_sent == 0


@pytest.mark.parametrize("wire_dtype", ["float16", "int8"])
async def test_lossy_collectives_agree_bitwise_across_devices(wire_dtype: str) -> None:
    xs = chunks([4, 2, 2], rows=4, seed=3)
    full = [np.random.default_rng(i).standard_normal((4, 6)).astype(np.float32) for i in range(3)]
    async with memory_group(3) as (_hub, ts):
        group = [t.device_id for t in ts]
        gathered = await on_all(ts, lambda i, t: C.all_gather(t, group, "r", 0, xs[i], wire_dtype))
        reduced = await on_all(ts, lambda i, t: C.all_reduce(t, group, "r", 1, full[i], wire_dtype))
        bcast = await on_all(
            ts,
            lambda i, t: C.broadcast(
                t, group, "r", 2, xs[0] if i == 0 else None, wire_dtype, root=group[0]
            ),
        )
    for outs in (gathered, reduced, bcast):
        for out in outs:
            np.testing.assert_array_equal(out, outs[0])  # replicas cannot drift
    exact = np.concatenate(xs, axis=-1)
    tol = np.abs(exact).max() / 127 if wire_dtype == "int8" else np.abs(exact).max() * 2**-10
    assert np.abs(gathered[0] - exact).max() <= tol
    assert np.abs(reduced[0] - np.sum(full, axis=0)).max() <= 6 * np.abs(full).max() / 127 * 2


def broadcast_from(
    group: list[str], root: str, r: int, x: np.ndarray
) -> Callable[[int, Transport], Awaitable[Any]]:
    return lambda i, t: C.broadcast(t, group, "r", f"b{r}", x if i == r else None, root=root)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
async def test_broadcast_from_every_root(n: int) -> None:
    async with memory_group(n) as (_hub, ts):
        group = [t.device_id for t in ts]
        for r, root in enumerate(group):
            x = np.arange(12, dtype=np.float32).reshape(3, 4) + r
            outs = await on_all(ts, broadcast_from(group, root, r, x))
            for out in outs:
                np.testing.assert_array_equal(out, x)
        for t in ts:  # each root published exactly once, to the whole group at once
            assert t.stats.msgs_sent == (1 if n > 1 else 0)


async def test_gather_and_scatter_with_uneven_widths() -> None:
    async with memory_group(3) as (_hub, ts):
        group = [t.device_id for t in ts]
        xs = chunks([4, 2, 2])
        outs = await on_all(ts, lambda i, t: C.gather(t, group, "r", "g", xs[i], root="mini-pc"))
        assert outs[0] is None and outs[2] is None
        np.testing.assert_array_equal(outs[1], np.concatenate(xs, axis=-1))
        full = np.concatenate(xs, axis=-1)
        parts = await on_all(
            ts,
            lambda i, t: C.scatter(
                t, group, "r", "s", full if i == 0 else None, root="pi4", widths=[4, 2, 2]
            ),
        )
        for got, want in zip(parts, xs, strict=True):
            np.testing.assert_array_equal(got, want)
        even = await on_all(
            ts, lambda i, t: C.scatter(t, group, "r", "s2", full if i == 0 else None, root="pi4")
        )
        assert [p.shape[-1] for p in even] == [3, 3, 2]


async def test_send_recv_point_to_point() -> None:
    async with memory_group(2) as (_hub, (a, b)):
        x = np.eye(3, dtype=np.float32)
        await C.send(a, "mini-pc", "r", 0, x, "float16")
        np.testing.assert_array_equal(await C.recv(b, "pi4", "r", 0, timeout=1), x)
        with pytest.raises(CollectiveError, match="itself"):
            await C.send(a, "pi4", "r", 1, x)


async def test_torch_in_torch_out() -> None:
    torch = pytest.importorskip("torch")
    async with memory_group(2) as (_hub, ts):
        group = [t.device_id for t in ts]
        xs = [torch.ones(2, 3) * (i + 1) for i in range(2)]
        outs = await on_all(ts, lambda i, t: C.all_reduce(t, group, "r", 0, xs[i]))
        for out in outs:
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
            assert torch.equal(out, torch.full((2, 3), 3.0))
        outs = await on_all(ts, lambda i, t: C.all_gather(t, group, "r", 1, xs[i]))
        assert all(isinstance(o, torch.Tensor) and o.shape == (2, 6) for o in outs)


async def test_three_concurrent_requests_interleaved() -> None:
    """Three requests run the same collectives on the same devices at the same time, with
    random delays so their messages interleave; each must get its own data back."""
    rng = random.Random(0)
    async with memory_group(3) as (_hub, ts):
        group = [t.device_id for t in ts]

        async def request(req: str, base: float) -> list[np.ndarray]:
            async def device(i: int, t: Transport) -> np.ndarray:
                await asyncio.sleep(rng.random() * 0.01)
                x = np.full((2, [4, 2, 2][i]), base + i, np.float32)
                g = await C.all_gather(t, group, req, "L0", x)
                await asyncio.sleep(rng.random() * 0.01)
                s = await C.all_reduce(t, group, req, "L1", g)
                await asyncio.sleep(rng.random() * 0.01)
                return await C.broadcast(t, group, req, "out", s if i == 2 else None, root=group[2])

            return await on_all(ts, device)

        results = await asyncio.gather(*[request(f"req{k}", 100.0 * k) for k in range(3)])
        for k, outs in enumerate(results):
            x = np.concatenate(
                [np.full((2, w), 100.0 * k + i) for i, w in enumerate([4, 2, 2])], -1
            )
            for out in outs:
                np.testing.assert_array_equal(out, 3 * x)
        for t in ts:
            assert t.mailbox.buffered == 0


async def test_missing_device_times_out_within_budget() -> None:
    async with memory_group(3) as (_hub, ts):
        group = [t.device_id for t in ts]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TransportTimeout, match="laptop"):
            # the laptop never joins: two devices wait for its chunk
            await asyncio.gather(
                *[
                    C.all_gather(t, group, "r", 0, np.ones((1, 2), np.float32), timeout=0.3)
                    for t in ts[:2]
                ]
            )
        assert loop.time() - t0 < 2


async def test_cancel_interrupts_a_collective() -> None:
    async with memory_group(2) as (_hub, (a, b)):
        group = [a.device_id, b.device_id]
        task = asyncio.create_task(C.all_reduce(a, group, "doomed", 0, np.ones(4, np.float32)))
        await asyncio.sleep(0.01)
        a.cancel("doomed", "client went away")
        with pytest.raises(RequestCancelled, match="client went away"):
            await asyncio.wait_for(task, 2)


async def test_bad_arguments_are_typed() -> None:
    async with memory_group(2) as (_hub, (a, b)):
        x = np.ones((2, 2), np.float32)
        with pytest.raises(CollectiveError, match="not in group"):
            await C.all_gather(a, ["mini-pc"], "r", 0, x)
        with pytest.raises(CollectiveError, match="duplicate"):
            await C.all_gather(a, ["pi4", "pi4"], "r", 0, x)
        with pytest.raises(CollectiveError, match="empty"):
            await C.all_gather(a, [], "r", 0, x)
        with pytest.raises(CollectiveError, match="root"):
            await C.broadcast(a, ["pi4", "mini-pc"], "r", 0, x, root="laptop")
        with pytest.raises(CollectiveError, match="must pass the tensor"):
            await C.broadcast(a, ["pi4", "mini-pc"], "r", 0, None, root="pi4")
        with pytest.raises(CollectiveError, match="widths"):
            await C.scatter(a, ["pi4", "mini-pc"], "r", 0, x, root="pi4", widths=[1, 2])
        with pytest.raises(CollectiveError, match="wire dtype"):
            await C.all_gather(a, ["pi4", "mini-pc"], "r", 0, x, "bf16")  # type: ignore[arg-type]
        with pytest.raises(CollectiveError, match="1-D"):
            await C.all_gather(a, ["pi4", "mini-pc"], "r", 0, np.float32(1.0))
        # shapes that disagree outside the gather axis are caught on the receivers
        group = ["pi4", "mini-pc"]
        with pytest.raises(CollectiveError, match="differ outside axis"):
            await asyncio.gather(
                C.all_gather(a, group, "r", 1, np.ones((2, 3), np.float32), timeout=2),
                C.all_gather(b, group, "r", 1, np.ones((3, 3), np.float32), timeout=2),
            )


def test_split_widths() -> None:
    assert C.split_widths(8, 3) == [3, 3, 2]
    assert C.split_widths(2, 4) == [1, 1, 0, 0]
    with pytest.raises(CollectiveError):
        C.split_widths(4, 0)
