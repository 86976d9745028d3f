"""Benchmark: collectives through Mosquitto on loopback, and wire encode/decode throughput.

    .venv/bin/python bench/collectives.py            # full: 1 KB - 4 MB, 2-4 devices
    .venv/bin/python bench/collectives.py --quick    # a subset, under a minute

All devices run in this one process and one event loop (so client-side CPU is shared, like
several devices on one 2-core box), each with its own MQTT connection to a private Mosquitto
started on a free port. Prints markdown tables on stdout; progress goes to logging (stderr).

The "p2p one-way" column is half a ping-pong of one message of that size: the cost of one
message crossing client -> broker -> client. The all-gather "serial" prediction assumes the
broker and the one client loop handle its n uploads and n(n-1) downloads one after another:
``(n + n(n-1)) / 2 * p2p`` (a ping-pong is one upload + one download, twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detransformer_edge.parallel import collectives as C
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.transport.base import Transport
from detransformer_edge.transport.mqtt import MqttTransport
from detransformer_edge.transport.wire import decode_tensor, encode_tensor

log = logging.getLogger("bench.collectives")
IDS = ["pi4", "mini-pc", "laptop", "speaker"]
KB = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto() -> Iterator[tuple[str, int]]:
    """A private Mosquitto on a free loopback port for the duration of the benchmark."""
    binary = next(
        (p for p in ("/usr/sbin/mosquitto", shutil.which("mosquitto")) if p and Path(p).is_file()),
        None,
    )
    if binary is None:
        raise SystemExit(
            "mosquitto is not installed: run `make setup-test` (apt-get install mosquitto)"
        )
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\n"  # else small fan-out copies wait ~40 ms (Nagle + delayed ACK)
        )
        proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    break
                time.sleep(0.05)
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            proc.wait(timeout=5)


@contextlib.asynccontextmanager
async def group(broker: tuple[str, int], n: int) -> AsyncIterator[list[Transport]]:
    prefix = f"detransformer/bench-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(MqttTransport.connect(d, *broker, RunTopics(prefix)))
            for d in IDS[:n]
        ]


async def timed(reps: int, warmup: int, one: Callable[[str], Awaitable[object]]) -> float:
    """Median wall time in ms of ``one(request_id)`` over ``reps`` runs after ``warmup``."""
    times = []
    for k in range(warmup + reps):
        req = f"b{uuid.uuid4().hex[:10]}"
        t0 = time.perf_counter()
        await one(req)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tensor_of(nbytes: int, cols: int = 256) -> np.ndarray:
    n = max(1, nbytes // 4)
    cols = min(cols, n)
    return np.random.default_rng(0).standard_normal((n // cols, cols)).astype(np.float32)


async def bench_one(ts: list[Transport], x: np.ndarray, reps: int, warmup: int) -> dict[str, float]:
    """Median ms of p2p (one way), all-gather, all-reduce and broadcast of ``x`` over ``ts``."""
    ids = [t.device_id for t in ts]

    async def p2p(req: str) -> None:
        a, b = ts[0], ts[1]
        await C.send(a, b.device_id, req, "ping", x)
        got = await C.recv(b, a.device_id, req, "ping", timeout=30)
        await C.send(b, a.device_id, req, "pong", got)
        await C.recv(a, b.device_id, req, "pong", timeout=30)

    async def all_gather(req: str) -> None:
        await asyncio.gather(*[C.all_gather(t, ids, req, 0, x, timeout=30) for t in ts])

    async def all_reduce(req: str) -> None:
        await asyncio.gather(*[C.all_reduce(t, ids, req, 0, x, timeout=30) for t in ts])

    async def broadcast(req: str) -> None:
        await asyncio.gather(
            *[
                C.broadcast(t, ids, req, 0, x if i == 0 else None, root=ids[0], timeout=30)
                for i, t in enumerate(ts)
            ]
        )

    return {
        "n": len(ts),
        "bytes": x.nbytes,
        "p2p": await timed(reps, warmup, p2p) / 2,
        "all_gather": await timed(reps, warmup, all_gather),
        "all_reduce": await timed(reps, warmup, all_reduce),
        "broadcast": await timed(reps, warmup, broadcast),
    }


async def bench_sizes(
    broker: tuple[str, int], ns: list[int], sizes: list[int], reps: int, warmup: int
) -> list[dict[str, float]]:
    rows = []
    for n in ns:
        async with group(broker, n) as ts:
            for size in sizes:
                x = tensor_of(size)
                row = await bench_one(ts, x, reps, warmup)
                p2p_ms = row["p2p"]
                row["ag_serial"] = (n + n * (n - 1)) / 2 * p2p_ms
                log.info(
                    "n=%d %s: %s", n, human(x.nbytes), {k: round(v, 2) for k, v in row.items()}
                )
                rows.append(row)
    return rows


def bench_wire(nbytes: int, reps: int) -> list[dict[str, float | str]]:
    x = tensor_of(nbytes)
    rows: list[dict[str, float | str]] = []
    for dt in ("float32", "float16", "int8"):
        payload = encode_tensor(x, "r", 0, "a", dt)
        enc = min(_time(lambda: encode_tensor(x, "r", 0, "a", dt)) for _ in range(reps))  # noqa: B023
        dec = min(_time(lambda: decode_tensor(payload)) for _ in range(reps))  # noqa: B023
        rows.append(
            {
                "dtype": dt,
                "wire_bytes": len(payload),
                "encode": x.nbytes / enc / 1e6,
                "decode": x.nbytes / dec / 1e6,
            }
        )
    return rows


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def human(nbytes: float) -> str:
    return f"{nbytes / KB:.0f} KB" if nbytes < 1024 * KB else f"{nbytes / KB / KB:.0f} MB"


def markdown(
    rows: list[dict[str, float]], wire: list[dict[str, float | str]], wire_size: int
) -> str:
    out = [
        (
            "| devices | chunk | p2p one-way ms | all-gather ms | serial prediction ms | "
            "all-gather / p2p | all-reduce ms | broadcast ms |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['n']:.0f} | {human(r['bytes'])} | {r['p2p']:.2f} | {r['all_gather']:.2f} | "
            f"{r['ag_serial']:.2f} | {r['all_gather'] / r['p2p']:.1f} | {r['all_reduce']:.2f} | "
            f"{r['broadcast']:.2f} |"
        )
    out += [
        "",
        (
            f"Wire envelope throughput on a {human(wire_size)} float32 tensor "
            "(MB/s of float32 input; best of runs):"
        ),
        "",
        "| wire dtype | bytes on the wire | encode MB/s | decode MB/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for w in wire:
        out.append(f"| {w['dtype']} | {w['wire_bytes']} | {w['encode']:.0f} | {w['decode']:.0f} |")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> str:
    if args.quick:
        ns, sizes, reps, warmup = [2, 4], [1 * KB, 64 * KB, 1024 * KB], 5, 1
    else:
        ns, sizes, reps, warmup = [2, 3, 4], [KB, 16 * KB, 128 * KB, 1024 * KB, 4096 * KB], 15, 2
    with mosquitto() as broker:
        rows = await bench_sizes(broker, ns, sizes, reps, warmup)
    wire_size = 4096 * KB
    wire = bench_wire(wire_size, 5 if args.quick else 20)
    return markdown(rows, wire, wire_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(ImportError):  # the wire's float16 casts use torch; 2 shared cores
        import torch

        torch.set_num_threads(1)
    table = asyncio.run(main_async(args))
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
