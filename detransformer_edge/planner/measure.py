"""Local profiler: measures this device into a :class:`DeviceProfile` (the only I/O in planner/).

What is measured, in about 10-25 s:
* matmul throughput at the model's own shapes (``F.linear`` of the coupled layer's and a
  sub-block's projections at the given sequence length), median of repeats;
* attention throughput (``scaled_dot_product_attention`` with the model's heads);
* memory bandwidth: copying a 64 MB tensor (bytes read + written per second);
* memory the service may use: the least of /proc/meminfo ``MemAvailable`` and the cgroup
  limit (v2 ``memory.max`` - ``memory.current``, or v1 ``memory.limit_in_bytes`` - usage), less
  a safety margin;
* with a broker: MQTT round trip (publish -> receive back on a unique topic) for a small and a
  256 KB payload; the link rate follows from the difference (the big payload crosses the
  device's link twice, up and down).

torch and aiomqtt are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detransformer_edge.planner.profile import DeviceProfile, ProfileError

MEMORY_SAFETY = 0.85  # use at most this share of what the OS reports as available
PROBE_BIG_BYTES = 256 * 1024
LINK_MBIT_CAP = 10_000.0  # loopback "links" measure absurdly fast; cap what we write
DEFAULT_LINK_MBIT = 100.0  # written when no broker is given to measure against


@dataclass
class Progress:
    """One tick per measurement (``detransformer_edge.progress``)."""

    total: int
    quiet: bool = False

    def __post_init__(self) -> None:
        from detransformer_edge.progress import progress

        self._bar = progress("measuring", total=self.total, unit="step", quiet=self.quiet, leave=False)

    def step(self, label: str) -> None:
        self._bar.set_description(label, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _timed(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> float:
    """Median seconds of ``fn`` over as many repeats as fit in ``budget_s`` (after a warm-up)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times)


def measure_matmul_gflops(cfg: object, seq_len: int, budget_s: float = 3.0) -> float:
    """Sustained FP32 GEMM rate at the model's shapes (coupled layer and sub-block projections)."""
    import torch
    import torch.nn.functional as F

    d: int = getattr(cfg, "d_model")
    shapes = [(d, 3 * d), (d, d), (d, getattr(cfg, "d_ff")), (getattr(cfg, "d_ff"), d)]
    d_sub: int = getattr(cfg, "d_sub", d)
    if d_sub != d:
        # sub-block attention width: all heads (d) full-width, its own heads (d / nd) sliced
        d_attn = getattr(cfg, "sub_heads") * getattr(cfg, "head_dim")
        shapes += [(d_sub, 3 * d_attn), (d_attn, d_sub), (d_sub, getattr(cfg, "d_ff_sub")),
                   (getattr(cfg, "d_ff_sub"), d_sub)]
    with torch.inference_mode():
        xs = {k: torch.randn(seq_len, k) for k, _ in shapes}
        ws = [torch.randn(n, k) for k, n in shapes]

        def run() -> None:
            for (k, _), w in zip(shapes, ws):
                F.linear(xs[k], w)

        seconds = _timed(run, budget_s)
    flops = sum(2.0 * seq_len * k * n for k, n in shapes)
    return float(flops / seconds / 1e9)


def measure_attention_gflops(cfg: object, seq_len: int, budget_s: float = 2.0) -> float:
    import torch
    import torch.nn.functional as F

    heads: int = getattr(cfg, "n_heads")
    head_dim: int = getattr(cfg, "head_dim")
    with torch.inference_mode():
        q = torch.randn(1, heads, seq_len, head_dim)
        k = torch.randn(1, heads, seq_len, head_dim)
        v = torch.randn(1, heads, seq_len, head_dim)
        seconds = _timed(lambda: F.scaled_dot_product_attention(q, k, v), budget_s)
    flops = 4.0 * seq_len * seq_len * heads * head_dim
    return flops / seconds / 1e9


def measure_memory_bandwidth_gbs(size_mb: int = 64, budget_s: float = 2.0) -> float:
    """Large tensor copy: (bytes read + bytes written) per second."""
    import torch

    n = size_mb * 1024 * 1024 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    seconds = _timed(lambda: dst.copy_(src), budget_s)
    return 2 * n * 4 / seconds / 1e9


def parse_meminfo(text: str) -> int | None:
    """``MemAvailable`` of /proc/meminfo, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * 1024
    return None


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's cgroup may still allocate, or None without a limit."""

    def read_int(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        if not text or text == "max":
            return None
        try:
            return int(text)
        except ValueError:
            return None

    # cgroup v2: the process's own group from /proc/self/cgroup ("0::/path")
    candidates = [root]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[2] not in ("", "/"):
                candidates.insert(0, root / parts[2].lstrip("/"))
    except OSError:
        pass
    for base in candidates:
        limit = read_int(base / "memory.max")
        if limit is not None:
            used = read_int(base / "memory.current") or 0
            return max(0, limit - used)
    v1 = root / "memory"
    limit = read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < 1 << 60:  # v1 writes a huge number for "no limit"
        used = read_int(v1 / "memory.usage_in_bytes") or 0
        return max(0, limit - used)
    return None


def available_memory_mb(meminfo: str | None = None, cgroup: int | None | bool = True) -> int:
    """Memory the service may use: min(MemAvailable, cgroup headroom) x MEMORY_SAFETY."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
    avail = parse_meminfo(meminfo)
    limit = cgroup_headroom() if cgroup is True else (cgroup or None)
    values = [v for v in (avail, limit) if v is not None]
    if not values:
        raise ProfileError("cannot tell how much memory is available (/proc/meminfo unreadable); pass --ram-mb")
    return max(1, int(min(values) * MEMORY_SAFETY / (1024 * 1024)))


def guess_link_kind(broker_host: str | None) -> str:
    if broker_host in ("127.0.0.1", "localhost", "::1"):
        return "loopback"
    try:
        for iface in os.listdir("/sys/class/net"):
            if Path(f"/sys/class/net/{iface}/wireless").exists():
                return "wifi5"
    except OSError:
        return "other"
    return "ethernet"


async def measure_broker(host: str, port: int, rounds: int = 15, timeout_s: float = 10.0) -> tuple[float, float]:
    """(median round trip of a tiny message in ms, link Mbit/s estimated from a 256 KB echo)."""
    import asyncio

    import aiomqtt

    topic = f"detransformer/probe/{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(host, port, identifier=f"probe-{uuid.uuid4().hex[:8]}", timeout=timeout_s) as client:
        await client.subscribe(topic, qos=0)
        messages = client.messages

        async def echo(payload: bytes) -> float:
            t = time.perf_counter()
            await client.publish(topic, payload, qos=0)
            async with asyncio.timeout(timeout_s):
                async for msg in messages:
                    if msg.payload == payload:
                        break
            return time.perf_counter() - t

        small = [await echo(uuid.uuid4().bytes) for _ in range(rounds)]
        big_payload = os.urandom(PROBE_BIG_BYTES)
        big = [await echo(big_payload[:-16] + uuid.uuid4().bytes) for _ in range(max(3, rounds // 3))]
    rtt = statistics.median(small)
    extra = max(statistics.median(big) - rtt, 1e-6)
    mbit = min(2 * PROBE_BIG_BYTES * 8 / extra / 1e6, LINK_MBIT_CAP)
    return rtt * 1e3, mbit


@dataclass(frozen=True)
class Measurement:
    profile: DeviceProfile
    notes: dict[str, str]


def measure_device(
    name: str,
    cfg: object,
    seq_len: int = 128,
    broker: tuple[str, int] | None = None,
    link_mbit: float | None = None,
    ram_mb: int | None = None,
    budget_s: float = 20.0,
    quiet: bool = False,
) -> Measurement:
    """Measure this device for ``cfg`` at ``seq_len``; ``budget_s`` bounds the compute probes."""
    import asyncio

    import torch

    steps = 5 if broker else 4
    progress = Progress(steps, quiet)
    share = budget_s / 10
    model = getattr(cfg, "name", "model")
    try:
        progress.step("matmul")
        gflops = measure_matmul_gflops(cfg, seq_len, 4 * share)
        progress.step("attention")
        attn = measure_attention_gflops(cfg, seq_len, 2 * share)
        progress.step("memory bandwidth")
        bw = measure_memory_bandwidth_gbs(budget_s=2 * share)
        progress.step("available memory")
        ram = ram_mb if ram_mb is not None else available_memory_mb()
        notes = {
            "gflops": f"measured: FP32 F.linear at {model} shapes, seq {seq_len}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            "attn_gflops": f"measured: scaled_dot_product_attention, {model} heads, seq {seq_len}",
            "mem_bw_gbs": "measured: 64 MB tensor copy, bytes read + written per second",
            "ram_mb": "given on the command line" if ram_mb is not None
            else f"measured: min(MemAvailable, cgroup headroom) x {MEMORY_SAFETY}",
        }
        rtt_ms = None
        link = guess_link_kind(broker[0] if broker else None)
        if broker:
            progress.step("broker round trip")
            rtt_ms, measured_mbit = asyncio.run(measure_broker(*broker))
            notes["rtt_ms"] = f"measured: MQTT publish -> receive on a unique topic via {broker[0]}:{broker[1]}"
            if link_mbit is None:
                link_mbit = measured_mbit
                notes["link_mbit"] = (
                    f"measured: {PROBE_BIG_BYTES // 1024} KB echo through the broker (up + down), capped at {LINK_MBIT_CAP:.0f}"
                )
        if link_mbit is None:
            link_mbit = DEFAULT_LINK_MBIT
            notes["link_mbit"] = f"not measured (no --broker): default {DEFAULT_LINK_MBIT:.0f}; edit or re-run with --broker"
        elif "link_mbit" not in notes:
            notes["link_mbit"] = "given on the command line"
    finally:
        progress.close()
    profile = DeviceProfile(
        name=name,
        gflops=round(gflops, 2),
        attn_gflops=round(attn, 2),
        mem_bw_gbs=round(bw, 2),
        ram_mb=int(ram),
        link_mbit=round(float(link_mbit), 1),
        link=link,
        cores=os.cpu_count() or 1,
        rtt_ms=None if rtt_ms is None else round(rtt_ms, 3),
        description=f"measured by detransformer-edge profile for {model}",
    )
    return Measurement(profile, notes)


def default_device_name() -> str:
    host = socket.gethostname() or "device"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in host)


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ProfileError(f"--broker must be host or host:port, got {text!r}") from None
