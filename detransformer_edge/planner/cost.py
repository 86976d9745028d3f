"""Cost model: predicted latency and memory of a :class:`Plan` on a cluster of device profiles.

Compute: every piece of work is a roofline, ``max(flops / rate, bytes / mem_bw)``, evaluated
separately for GEMMs (``gflops``) and attention (``attn_gflops``).

Communication goes through the MQTT broker: a message is uploaded by its sender, handled by the
broker, and downloaded by each subscriber. A *phase* is a set of messages sent at the same time
(one collective); it takes

    max_sender(upload bytes / link)      (or the broker's link taking in every upload, if slower)
  + publishes x broker per-message cost  (a single-threaded broker handles them one by one)
  + max_receiver(download bytes / link)  (or the broker's link sending every copy, if slower)
  + latency: half the slowest sender's plus half the slowest receiver's round trip to the broker

The broker stores and forwards a message whole, so upload and download add up. Collectives are
the ones in ``parallel/collectives.py``: an all-gather is one publish per device and n-1
downloads each; an all-reduce is a reduce-scatter (n-1 point-to-point chunks of 1/n) followed by
an all-gather of 1/n chunks. Steps run one after another; within a step devices work in
parallel and the slowest one sets the step's time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.plan import DeviceWeights, Plan, required_weights
from detransformer_edge.planner import analysis
from detransformer_edge.planner.analysis import Mode, OpCost, Workload
from detransformer_edge.planner.profile import DeviceProfile

WIRE_ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}
INT8_SCALE_BYTES = 4  # one float32 scale per row
ENVELOPE_BYTES = 120  # msgpack envelope + MQTT fixed header + topic, per message
PROCESS_OVERHEAD_MB = 150  # Python + torch CPU runtime resident before any weight is loaded
# One-way-and-back device <-> broker latency when a profile has no measured rtt_ms.
DEFAULT_RTT_MS = {"ethernet": 0.5, "loopback": 0.1, "wifi6": 2.0, "wifi5": 3.0, "wifi4": 5.0, "other": 3.0}


class PlanningError(DetransformerError):
    """The planner cannot produce what was asked (unknown device, plan outside the placement...)."""


@dataclass(frozen=True)
class Broker:
    """The MQTT broker as the cost model sees it.

    ``link_mbit``: the broker host's own link (one direction, full duplex); ``None`` when the
    broker sits on a wired hub/router whose link is never the bottleneck. ``per_message_ms``:
    broker CPU time per publish, fan-out included (Mosquitto on a small board: ~0.2-1 ms).
    """

    link_mbit: float | None = None
    per_message_ms: float = 0.3

    def __post_init__(self) -> None:
        if self.link_mbit is not None and not self.link_mbit > 0:
            raise PlanningError(f"broker link_mbit must be positive, got {self.link_mbit!r}")
        if not self.per_message_ms >= 0:
            raise PlanningError(f"broker per_message_ms must be >= 0, got {self.per_message_ms!r}")


@dataclass(frozen=True)
class Request:
    """What the runtime planner plans for: ``encode``/``prefill`` ``seq_len`` tokens, or one
    ``decode`` step after ``seq_len`` tokens of context."""

    mode: Mode
    seq_len: int
    batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in analysis.MODES:
            raise PlanningError(f"request mode must be one of {', '.join(analysis.MODES)}, got {self.mode!r}")
        if self.seq_len <= 0 or self.batch <= 0:
            raise PlanningError(f"request needs seq_len > 0 and batch > 0, got {self.seq_len}, {self.batch}")

    @cached_property
    def workload(self) -> Workload:
        return Workload.for_request(self.mode, self.seq_len, self.batch)


@dataclass(frozen=True)
class Step:
    """One step of a plan, repeated ``count`` times (e.g. once per block)."""

    name: str
    kind: Literal["compute", "comm"]
    seconds: float  # one occurrence
    count: int = 1
    messages: int = 0  # publishes, one occurrence
    bytes: int = 0  # bytes uploaded by all senders, one occurrence

    @property
    def total_s(self) -> float:
        return self.seconds * self.count


@dataclass(frozen=True)
class DeviceCost:
    device: str
    compute_s: float  # busy computing, whole request
    upload_bytes: int
    download_bytes: int
    memory_bytes: int  # weights this plan needs there + KV cache + activations + runtime
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.budget_bytes


@dataclass(frozen=True)
class Breakdown:
    """Predicted cost of one plan for one request."""

    plan: Plan
    request: Request
    steps: tuple[Step, ...]
    devices: tuple[DeviceCost, ...]
    total_s: float = field(init=False)
    compute_s: float = field(init=False)
    comm_s: float = field(init=False)

    def __post_init__(self) -> None:
        compute = math.fsum(s.total_s for s in self.steps if s.kind == "compute")
        comm = math.fsum(s.total_s for s in self.steps if s.kind == "comm")
        object.__setattr__(self, "compute_s", compute)
        object.__setattr__(self, "comm_s", comm)
        object.__setattr__(self, "total_s", compute + comm)

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def device(self, name: str) -> DeviceCost:
        for d in self.devices:
            if d.device == name:
                return d
        raise PlanningError(f"device {name!r} is not part of plan {self.plan.describe()}")

    def messages(self) -> int:
        return sum(s.messages * s.count for s in self.steps)


Message = tuple[str, float, tuple[str, ...]]  # (sender, bytes, receivers)


class CostModel:
    """Predicts :class:`Breakdown` s for plans of one model on one set of devices.

    Per-device times of the unit pieces (a sub-block, a coupled layer, a TP shard) are cached per
    workload, so evaluating many candidate plans for one request is cheap.
    """

    def __init__(self, cfg: object, profiles: Sequence[DeviceProfile], broker: Broker | None = None):
        self.cfg = cfg
        self.profiles: dict[str, DeviceProfile] = {p.name: p for p in profiles}
        if len(self.profiles) != len(profiles):
            raise PlanningError("device profiles must have unique names")
        self.broker = broker or Broker()
        self.layer_kinds: tuple[str, ...] = tuple(getattr(cfg, "layer_kinds"))
        self.n_dec, self.n_cpl = analysis.layer_counts(cfg)
        self.nb = max(1, self.n_cpl)
        self.nd: int = getattr(cfg, "nd")
        self.decoupled = self.n_dec > 0
        self.is_decoder = getattr(cfg, "family", "") == "decoder"
        self._units: dict[tuple[Workload, str, int], OpCost] = {}
        self._times: dict[tuple[Workload, str, int, str], float] = {}
        self._link = {n: p.link_bytes_per_s for n, p in self.profiles.items()}
        self._rtt = {
            n: (p.rtt_ms if p.rtt_ms is not None else DEFAULT_RTT_MS.get(p.link, 3.0)) / 1e3
            for n, p in self.profiles.items()
        }

    # -- compute ---------------------------------------------------------------------------------
    def unit(self, work: Workload, piece: str, shard: int = 1) -> OpCost:
        key = (work, piece, shard)
        cost = self._units.get(key)
        if cost is None:
            cfg = self.cfg
            if piece == "sub":
                cost = analysis.subblock_cost(cfg, work)
            elif piece == "layer":
                cost = analysis.coupled_layer_cost(cfg, work, shard)
            elif piece == "embed":
                cost = analysis.embedding_cost(cfg, work)
            elif piece == "head":
                cost = analysis.head_cost(cfg, work)
            else:
                raise PlanningError(f"unknown unit {piece!r}")
            self._units[key] = cost
        return cost

    def time(self, device: str, work: Workload, piece: str, shard: int = 1) -> float:
        """Seconds ``device`` needs for one unit piece (roofline per GEMM/attention part)."""
        key = (work, piece, shard, device)
        t = self._times.get(key)
        if t is None:
            p = self._profile(device)
            c = self.unit(work, piece, shard)
            bw = p.mem_bytes_per_s
            t = max(c.gemm_flops / p.flops_per_s, c.gemm_bytes / bw) + max(
                c.attn_flops / p.attn_flops_per_s, c.attn_bytes / bw
            )
            self._times[key] = t
        return t

    def _profile(self, device: str) -> DeviceProfile:
        try:
            return self.profiles[device]
        except KeyError:
            raise PlanningError(f"no profile for device {device!r}; known: {', '.join(self.profiles)}") from None

    # -- communication ---------------------------------------------------------------------------
    def phase_time(self, messages: Iterable[Message]) -> tuple[float, dict[str, float], dict[str, float], int]:
        """Seconds for messages sent together; also bytes up/down per device and publishes."""
        up: dict[str, float] = {}
        down: dict[str, float] = {}
        n_pub = 0
        for src, nbytes, receivers in messages:
            if not receivers:
                continue
            n_pub += 1
            up[src] = up.get(src, 0.0) + nbytes
            for r in receivers:
                down[r] = down.get(r, 0.0) + nbytes
        if not n_pub:
            return 0.0, up, down, 0
        link = self._link
        t_up = max(b / link[d] for d, b in up.items())
        t_down = max(b / link[d] for d, b in down.items())
        if self.broker.link_mbit is not None:
            rate = self.broker.link_mbit * 1e6 / 8
            t_up = max(t_up, sum(up.values()) / rate)
            t_down = max(t_down, sum(down.values()) / rate)
        rtt = self._rtt
        latency = 0.5 * (max(rtt[d] for d in up) + max(rtt[d] for d in down))
        return t_up + n_pub * self.broker.per_message_ms / 1e3 + t_down + latency, up, down, n_pub

    def rtt_s(self, device: str) -> float:
        """Round trip device -> broker -> device, seconds (measured, or by link kind)."""
        self._profile(device)
        return self._rtt[device]

    def wire_bytes(self, rows: int, width: int, wire: str) -> float:
        """Payload of one message carrying a (rows, width) activation in ``wire`` precision."""
        scales = rows * INT8_SCALE_BYTES if wire == "int8" else 0
        return rows * width * WIRE_ITEMSIZE[wire] + scales + ENVELOPE_BYTES

    # -- memory ----------------------------------------------------------------------------------
    def _pieces(self, held: DeviceWeights) -> tuple[int, int]:
        """(sub-block instances, whole coupled layers) held; a whole decoupled layer counts as
        all its sub-blocks, and a sub-block held both ways counts once."""
        whole = set(held.whole_layers)
        n_subs = 0
        n_layers = 0
        for i, kind in enumerate(self.layer_kinds):
            if kind == "coupled":
                n_layers += i in whole
            else:
                n_subs += self.nd if i in whole else len(held.sub_blocks)
        return n_subs, n_layers

    def weights_bytes(self, held: DeviceWeights) -> int:
        cfg = self.cfg
        n_subs, n_layers = self._pieces(held)
        layer = analysis.coupled_layer_params(cfg)
        params = n_subs * analysis.subblock_params(cfg) + n_layers * layer
        if held.embeddings:
            params += analysis.embedding_params(cfg)
        for _rank, k in held.tp_shards:
            params += self.n_cpl * layer // k
        return params * analysis.WEIGHT_BYTES

    def kv_bytes(self, held: DeviceWeights, work: Workload) -> int:
        cfg = self.cfg
        n_subs, n_layers = self._pieces(held)
        kv = n_subs * analysis.subblock_kv_bytes(cfg, work.context, work.batch)
        kv += n_layers * analysis.coupled_kv_bytes(cfg, work.context, work.batch)
        for _rank, k in held.tp_shards:
            kv += self.n_cpl * analysis.coupled_kv_bytes(cfg, work.context, work.batch, k)
        return kv

    def memory_bytes(self, held: DeviceWeights, work: Workload | None) -> int:
        """Resident bytes of a device holding ``held`` while running ``work`` (None: idle)."""
        total = self.weights_bytes(held) + PROCESS_OVERHEAD_MB * 1024 * 1024
        if work is not None:
            total += self.kv_bytes(held, work) + analysis.activation_peak_bytes(self.cfg, work)
        return total

    def required(self, plan: Plan, device: str) -> DeviceWeights:
        """Weights ``device`` needs for ``plan`` (``parallel.plan.required_weights``)."""
        return required_weights(plan, self.layer_kinds, device)

    def _plan_memory(
        self, plan: Plan, device: str, work: Workload, resident: Mapping[str, DeviceWeights] | None
    ) -> int:
        need = self.required(plan, device)
        held = need if resident is None else resident.get(device, need)
        base = self.weights_bytes(held) + PROCESS_OVERHEAD_MB * 1024 * 1024
        return base + self.kv_bytes(need, work) + analysis.activation_peak_bytes(self.cfg, work)

    # -- plans -----------------------------------------------------------------------------------
    def predict(
        self, plan: Plan, request: Request, resident: Mapping[str, DeviceWeights] | None = None
    ) -> Breakdown:
        """Predicted cost of ``plan``. ``resident``: what each device actually holds (a
        placement's holdings, spares included) for the memory figures; default: only what the
        plan needs."""
        for d in plan.devices:
            self._profile(d)
        work = request.workload
        acc = _Accumulator(self, plan.devices)
        self._walk(plan, work, acc)
        devices = tuple(
            DeviceCost(
                d,
                acc.compute[d],
                int(acc.up[d]),
                int(acc.down[d]),
                self._plan_memory(plan, d, work, resident),
                self.profiles[d].ram_bytes,
            )
            for d in plan.devices
        )
        return Breakdown(plan, request, tuple(acc.steps), devices)

    def latency(self, plan: Plan, request: Request) -> float:
        """Predicted seconds of ``plan``: the same walk as :meth:`predict`, totals only (fast,
        for searching many candidates; no memory check)."""
        acc = _Total(self)
        self._walk(plan, request.workload, acc)
        return acc.total

    def _walk(self, plan: Plan, work: Workload, acc: _Accumulator) -> None:
        if plan.mode == "single":
            self._single(plan, work, acc)
        elif plan.mode == "pipeline":
            self._pipeline(plan, work, acc)
        elif plan.mode == "tp":
            self._tp(plan, work, acc)
        else:
            self._block(plan, work, acc)

    def _out_rows(self, work: Workload) -> int:
        # A decoder's head needs only the last position of each sequence; an encoder pools all.
        return work.batch if self.is_decoder else work.rows

    def _ends(self, coord: str, work: Workload, acc: _Accumulator, first: bool) -> None:
        name = "embed" if first else "head"
        acc.compute_step(name, {coord: self.time(coord, work, "embed" if first else "head")})

    def _single(self, plan: Plan, work: Workload, acc: _Accumulator) -> None:
        d = plan.devices[0]
        self._ends(d, work, acc, True)
        t = self.n_dec * self.nd * self.time(d, work, "sub") if self.decoupled else 0.0
        t += self.n_cpl * self.time(d, work, "layer")
        acc.compute_step("layers", {d: t})
        self._ends(d, work, acc, False)

    def _pipeline(self, plan: Plan, work: Workload, acc: _Accumulator) -> None:
        coord = plan.coordinator
        full = self.wire_bytes(work.rows, getattr(self.cfg, "d_model"), plan.wire)
        self._ends(coord, work, acc, True)
        kinds = self.layer_kinds
        for i, stage in enumerate(plan.stages):
            t = 0.0
            for layer in range(stage.start, stage.end):
                if kinds[layer] == "coupled":
                    t += self.time(stage.device, work, "layer")
                else:
                    t += self.nd * self.time(stage.device, work, "sub")
            acc.compute_step(f"stage {i} ({stage.device}, layers {stage.start}-{stage.end - 1})", {stage.device: t})
            if i + 1 < len(plan.stages):
                nxt = plan.stages[i + 1].device
                acc.comm_step(f"send {stage.device}->{nxt}", [(stage.device, full, (nxt,))])
        last = plan.stages[-1].device
        if last != coord:
            out = self.wire_bytes(self._out_rows(work), getattr(self.cfg, "d_model"), plan.wire)
            acc.comm_step(f"send {last}->{coord}", [(last, out, (coord,))])
        self._ends(coord, work, acc, False)

    def _allreduce(self, group: Sequence[str], full_rows: int, wire: str) -> tuple[list[Message], list[Message]]:
        k = len(group)
        width = getattr(self.cfg, "d_model")
        chunk = self.wire_bytes(full_rows, width // k, wire)
        rs = [(a, chunk, (b,)) for a in group for b in group if a != b]
        ag = [(a, chunk, tuple(b for b in group if b != a)) for a in group]
        return rs, ag

    def _tp(self, plan: Plan, work: Workload, acc: _Accumulator) -> None:
        group = plan.devices
        coord = plan.coordinator
        k = len(group)
        full = self.wire_bytes(work.rows, getattr(self.cfg, "d_model"), plan.wire)
        self._ends(coord, work, acc, True)
        acc.comm_step("broadcast input", [(coord, full, group[1:])])
        n_layers = len(self.layer_kinds)
        acc.compute_step("layer shards", {d: self.time(d, work, "layer", k) for d in group}, n_layers)
        rs, ag = self._allreduce(group, work.rows, plan.wire)
        acc.comm_step("all-reduce: reduce-scatter", rs, 2 * n_layers)
        acc.comm_step("all-reduce: all-gather", ag, 2 * n_layers)
        self._ends(coord, work, acc, False)

    def _block(self, plan: Plan, work: Workload, acc: _Accumulator) -> None:
        cfg = self.cfg
        coord = plan.coordinator
        owners = plan.owners
        nb = self.nb
        dec_per_block = self.n_dec // nb
        counts = {d: len(plan.sub_blocks_of(d)) for d in owners}
        d_sub: int = getattr(cfg, "d_sub")
        d_model: int = getattr(cfg, "d_model")
        slices = {d: self.wire_bytes(work.rows, d_sub * counts[d], plan.wire) for d in owners}
        out = self.wire_bytes(self._out_rows(work), d_model, plan.wire)

        self._ends(coord, work, acc, True)
        acc.comm_step("scatter input", [(coord, slices[d], (d,)) for d in owners if d != coord])
        acc.compute_step(
            "decoupled layers", {d: counts[d] * dec_per_block * self.time(d, work, "sub") for d in owners}, nb
        )
        if plan.coupled == "allgather":
            acc.comm_step(
                "coupled: all-gather", [(d, slices[d], tuple(o for o in owners if o != d)) for d in owners], nb
            )
            acc.compute_step("coupled layer (replicated)", {d: self.time(d, work, "layer") for d in owners}, nb)
        elif plan.coupled == "gather":
            root = plan.coupled_devices[0]
            others = [d for d in owners if d != root]
            acc.comm_step(f"coupled: gather to {root}", [(d, slices[d], (root,)) for d in others], nb)
            acc.compute_step(f"coupled layer on {root}", {root: self.time(root, work, "layer")}, nb)
            acc.comm_step(f"coupled: scatter from {root}", [(root, slices[d], (d,)) for d in others], nb - 1)
            if root != coord:
                acc.comm_step(f"send output {root}->{coord}", [(root, out, (coord,))])
        else:
            group = plan.coupled_devices
            k = len(group)
            acc.comm_step(
                "coupled: gather to TP group",
                [(d, slices[d], tuple(g for g in group if g != d)) for d in owners],
                nb,
            )
            acc.compute_step(f"coupled layer, TP over {k}", {d: self.time(d, work, "layer", k) for d in group}, nb)
            if k > 1:
                rs, ag = self._allreduce(group, work.rows, plan.wire)
                acc.comm_step("coupled all-reduce: reduce-scatter", rs, 2 * nb)
                acc.comm_step("coupled all-reduce: all-gather", ag, 2 * nb)
            outside = [d for d in owners if d not in group]
            acc.comm_step(f"coupled: scatter from {group[0]}", [(group[0], slices[d], (d,)) for d in outside], nb - 1)
            if coord not in group:
                acc.comm_step(f"send output {group[0]}->{coord}", [(group[0], out, (coord,))])
        self._ends(coord, work, acc, False)


class _Accumulator:
    """Collects steps and per-device totals while a plan is walked."""

    def __init__(self, model: CostModel, devices: Sequence[str]):
        self.model = model
        self.steps: list[Step] = []
        self.compute: dict[str, float] = {d: 0.0 for d in devices}
        self.up: dict[str, float] = {d: 0.0 for d in devices}
        self.down: dict[str, float] = {d: 0.0 for d in devices}

    def compute_step(self, name: str, per_device: Mapping[str, float], count: int = 1) -> None:
        if count <= 0 or not per_device:
            return
        for d, t in per_device.items():
            self.compute[d] += t * count
        self.steps.append(Step(name, "compute", max(per_device.values()), count))

    def comm_step(self, name: str, messages: list[Message], count: int = 1) -> None:
        if count <= 0:
            return
        seconds, up, down, n_pub = self.model.phase_time(messages)
        if not n_pub:
            return
        for d, b in up.items():
            self.up[d] += b * count
        for d, b in down.items():
            self.down[d] += b * count
        self.steps.append(Step(name, "comm", seconds, count, n_pub, int(sum(up.values()))))


class _Total(_Accumulator):
    """Sums the critical path only."""

    def __init__(self, model: CostModel):
        self.model = model
        self.total = 0.0

    def compute_step(self, name: str, per_device: Mapping[str, float], count: int = 1) -> None:
        if count > 0 and per_device:
            self.total += max(per_device.values()) * count

    def comm_step(self, name: str, messages: list[Message], count: int = 1) -> None:
        if count > 0:
            self.total += self.model.phase_time(messages)[0] * count
