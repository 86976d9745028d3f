"""A plan, step by step, as the cost model charges it: steps run one after another; within a
step devices work in parallel and the slowest one sets the step's time.

* ``single``: embed, all layers, head on one device.
* ``pipeline``: stage compute and one send per boundary; the last stage sends to the coordinator.
* ``tp`` (standard models): broadcast the input, then per layer shard compute + 2 all-reduces.
* ``block``: embed on the coordinator, scatter each owner its slices, then per block the
  decoupled layers (an owner's time is its sub-blocks x layers) and the coupled layer by
  strategy (all-gather, gather to a root, or tensor parallel over a group), then the head.

Every request (not every decode step) starts with the coordinator's own work on it
(``CostTerms.request_cpu_ms``)
and a multi-device plan with the run-control message to its other devices. Repeated parts
(blocks, layers) are walked once and multiplied, unless a device of the plan has a CPU quota or
shares a host (``planner/compute.py``): then every repetition is walked, since what a device can
burst depends on how long it idled before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

from detransformer_edge.parallel.plan import Plan
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.breakdown import Step
from detransformer_edge.planner.compute import CpuShares
from detransformer_edge.planner.network import Message, Phase, wire_bytes
from detransformer_edge.planner.terms import CostTerms


class Costs(Protocol):
    """What a walk needs of the cost model."""

    layer_kinds: tuple[str, ...]
    nd: int
    nb: int
    n_dec: int
    n_cpl: int
    decoupled: bool
    is_decoder: bool
    d_model: int
    d_sub: int
    terms: CostTerms
    shares: CpuShares

    def time(self, device: str, work: Workload, piece: str, shard: int = 1) -> float: ...

    def phase(self, messages: Sequence[Message]) -> Phase: ...

    def request_s(self, device: str) -> float: ...


class Total:
    """Sums the critical path (fast: for searching many candidates)."""

    def __init__(self, model: Costs, devices: Sequence[str]):
        self.model = model
        self.total = 0.0
        self._mult = 1
        self.buckets = model.shares.full_buckets(devices) if model.shares.involved(devices) else None

    def repeat(self, count: int, body: Callable[[], None]) -> None:
        """``body`` (steps in order) ``count`` times."""
        if count <= 0:
            return
        if self.buckets is not None:
            for _ in range(count):
                body()
            return
        outer, self._mult = self._mult, self._mult * count
        try:
            body()
        finally:
            self._mult = outer

    def compute_step(self, name: str, per_device: Mapping[str, float]) -> None:
        if not per_device:
            return
        wall = per_device if self.buckets is None else self.model.shares.run(self.buckets, per_device)
        self._record(name, "compute", max(wall.values()), wall, None, 0, 0.0)

    def comm_step(self, name: str, messages: Sequence[Message]) -> None:
        phase = self.model.phase(messages)
        if not phase.publishes:
            return
        if self.buckets is not None:
            self.model.shares.idle(self.buckets, phase.seconds)
        self._record(name, "comm", phase.seconds, None, phase, phase.publishes, sum(phase.up.values()))

    def _record(self, name: str, kind: Literal["compute", "comm"], seconds: float, wall: Mapping[str, float] | None,
                phase: Phase | None, messages: int, nbytes: float) -> None:
        self.total += seconds * self._mult


class Accumulator(Total):
    """Also collects the steps and per-device totals (the breakdown)."""

    def __init__(self, model: Costs, devices: Sequence[str]):
        super().__init__(model, devices)
        self._steps: dict[str, list[float]] = {}  # name -> [seconds, count, messages, bytes]
        self._kinds: dict[str, Literal["compute", "comm"]] = {}
        self.compute: dict[str, float] = {d: 0.0 for d in devices}
        self.up: dict[str, float] = {d: 0.0 for d in devices}
        self.down: dict[str, float] = {d: 0.0 for d in devices}

    def _record(self, name: str, kind: Literal["compute", "comm"], seconds: float, wall: Mapping[str, float] | None,
                phase: Phase | None, messages: int, nbytes: float) -> None:
        m = self._mult
        self.total += seconds * m
        row = self._steps.setdefault(name, [0.0, 0, messages, nbytes])
        self._kinds[name] = kind
        row[0] += seconds * m
        row[1] += m
        for d, t in (wall or {}).items():
            self.compute[d] += t * m
        if phase is not None:
            for d, b in phase.up.items():
                self.up[d] += b * m
            for d, b in phase.down.items():
                self.down[d] += b * m

    @property
    def steps(self) -> list[Step]:
        return [Step(name, self._kinds[name], row[0] / row[1], int(row[1]), int(row[2]), int(row[3]))
                for name, row in self._steps.items()]


def walk(m: Costs, plan: Plan, work: Workload, acc: Total) -> None:
    coord = plan.coordinator
    if work.tokens > 1 or not work.causal:  # a whole request; a decode step is one pass of it
        acc.compute_step("request (parse, tokenise, plan, reply)", {coord: m.request_s(coord)})
    if len(plan.devices) > 1:
        acc.comm_step("start run (control message)", [(coord, m.terms.control_bytes, plan.devices[1:])])
    if plan.mode == "single":
        _single(m, plan, work, acc)
    elif plan.mode == "pipeline":
        _pipeline(m, plan, work, acc)
    elif plan.mode == "tp":
        _tp(m, plan, work, acc)
    else:
        _block(m, plan, work, acc)


def _out_rows(m: Costs, work: Workload) -> int:
    # A decoder's head needs only the last position of each sequence; an encoder pools all.
    return work.batch if m.is_decoder else work.rows


def _ends(m: Costs, coord: str, work: Workload, acc: Total, first: bool) -> None:
    name = "embed" if first else "head"
    acc.compute_step(name, {coord: m.time(coord, work, name)})


def _single(m: Costs, plan: Plan, work: Workload, acc: Total) -> None:
    d = plan.devices[0]
    _ends(m, d, work, acc, True)
    t = m.n_dec * m.nd * m.time(d, work, "sub") if m.decoupled else 0.0
    t += m.n_cpl * m.time(d, work, "layer")
    acc.compute_step("layers", {d: t})
    _ends(m, d, work, acc, False)


def _pipeline(m: Costs, plan: Plan, work: Workload, acc: Total) -> None:
    coord = plan.coordinator
    full = wire_bytes(work.rows, m.d_model, plan.wire)
    _ends(m, coord, work, acc, True)
    for i, stage in enumerate(plan.stages):
        t = 0.0
        for layer in range(stage.start, stage.end):
            if m.layer_kinds[layer] == "coupled":
                t += m.time(stage.device, work, "layer")
            else:
                t += m.nd * m.time(stage.device, work, "sub")
        acc.compute_step(f"stage {i} ({stage.device}, layers {stage.start}-{stage.end - 1})", {stage.device: t})
        if i + 1 < len(plan.stages):
            nxt = plan.stages[i + 1].device
            acc.comm_step(f"send {stage.device}->{nxt}", [(stage.device, full, (nxt,))])
    last = plan.stages[-1].device
    if last != coord:
        out = wire_bytes(_out_rows(m, work), m.d_model, plan.wire)
        acc.comm_step(f"send {last}->{coord}", [(last, out, (coord,))])
    _ends(m, coord, work, acc, False)


def allreduce(m: Costs, group: Sequence[str], rows: int, plan: Plan) -> tuple[list[Message], list[Message]]:
    """The two phases of an all-reduce over ``group``: reduce-scatter, then all-gather."""
    k = len(group)
    chunk = wire_bytes(rows, m.d_model // k, plan.wire)
    rs: list[Message] = [(a, chunk, (b,)) for a in group for b in group if a != b]
    ag: list[Message] = [(a, chunk, tuple(b for b in group if b != a)) for a in group]
    return rs, ag


def _tp_halves(m: Costs, group: Sequence[str], work: Workload, plan: Plan, acc: Total, prefix: str) -> None:
    """One tensor-parallel layer: attention shards, all-reduce, FFN shards, all-reduce (the
    two halves are charged half the layer's shard time each)."""
    k = len(group)
    half = {d: 0.5 * m.time(d, work, "layer", k) for d in group}
    rs, ag = allreduce(m, group, work.rows, plan)

    def one_half() -> None:
        acc.compute_step(f"{prefix}layer shards, TP over {k}", half)
        acc.comm_step(f"{prefix}all-reduce: reduce-scatter", rs)
        acc.comm_step(f"{prefix}all-reduce: all-gather", ag)

    acc.repeat(2, one_half)


def _tp(m: Costs, plan: Plan, work: Workload, acc: Total) -> None:
    group = plan.devices
    coord = plan.coordinator
    full = wire_bytes(work.rows, m.d_model, plan.wire)
    _ends(m, coord, work, acc, True)
    acc.comm_step("broadcast input", [(coord, full, group[1:])])
    acc.repeat(len(m.layer_kinds), lambda: _tp_halves(m, group, work, plan, acc, ""))
    _ends(m, coord, work, acc, False)


def _block(m: Costs, plan: Plan, work: Workload, acc: Total) -> None:
    coord = plan.coordinator
    owners = plan.owners
    nb = m.nb
    dec_per_block = m.n_dec // nb
    counts = {d: len(plan.sub_blocks_of(d)) for d in owners}
    slices = {d: wire_bytes(work.rows, m.d_sub * counts[d], plan.wire) for d in owners}
    out = wire_bytes(_out_rows(m, work), m.d_model, plan.wire)
    decoupled = {d: counts[d] * dec_per_block * m.time(d, work, "sub") for d in owners}

    _ends(m, coord, work, acc, True)
    acc.comm_step("scatter input", [(coord, slices[d], (d,)) for d in owners if d != coord])
    if plan.coupled == "allgather":
        def block() -> None:
            acc.compute_step("decoupled layers", decoupled)
            acc.comm_step("coupled: all-gather", [(d, slices[d], tuple(o for o in owners if o != d)) for d in owners])
            acc.compute_step("coupled layer (replicated)", {d: m.time(d, work, "layer") for d in owners})

        acc.repeat(nb, block)
    elif plan.coupled == "gather":
        root = plan.coupled_devices[0]
        others = [d for d in owners if d != root]

        def gathered() -> None:
            acc.compute_step("decoupled layers", decoupled)
            acc.comm_step(f"coupled: gather to {root}", [(d, slices[d], (root,)) for d in others])
            acc.compute_step(f"coupled layer on {root}", {root: m.time(root, work, "layer")})

        def block() -> None:
            gathered()
            acc.comm_step(f"coupled: scatter from {root}", [(root, slices[d], (d,)) for d in others])

        acc.repeat(nb - 1, block)
        gathered()
        if root != coord:
            acc.comm_step(f"send output {root}->{coord}", [(root, out, (coord,))])
    else:
        group = plan.coupled_devices
        k = len(group)
        outside = [d for d in owners if d not in group]

        def coupled_tp() -> None:
            acc.compute_step("decoupled layers", decoupled)
            acc.comm_step("coupled: gather to TP group",
                          [(d, slices[d], tuple(g for g in group if g != d)) for d in owners])
            if k > 1:
                _tp_halves(m, group, work, plan, acc, "coupled ")
            else:
                acc.compute_step(f"coupled layer on {group[0]}", {group[0]: m.time(group[0], work, "layer")})

        def block() -> None:
            coupled_tp()
            acc.comm_step(f"coupled: scatter from {group[0]}", [(group[0], slices[d], (d,)) for d in outside])

        acc.repeat(nb - 1, block)
        coupled_tp()
        if coord not in group:
            acc.comm_step(f"send output {group[0]}->{coord}", [(group[0], out, (coord,))])
    _ends(m, coord, work, acc, False)
