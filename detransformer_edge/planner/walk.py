"""A plan, step by step, as the cost model charges it: steps run one after another; within a
step devices work in parallel and the slowest one sets the step's time.

* ``single``: embed, all layers, head on one device.
* ``pipeline``: stage compute and one send per boundary; the last stage sends to the coordinator.
* ``tp`` (standard models): broadcast the input, then per layer shard compute + 2 all-reduces.
* ``block``: embed on the coordinator, scatter each owner its slices, then per block the
  decoupled layers (an owner's time is its sub-blocks x layers) and the coupled layer by
  strategy (all-gather, gather to a root, or tensor parallel over a group), then the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from detransformer_edge.parallel.plan import Plan
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.breakdown import Step
from detransformer_edge.planner.network import Message, Phase, wire_bytes


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

    def time(self, device: str, work: Workload, piece: str, shard: int = 1) -> float: ...

    def phase(self, messages: Sequence[Message]) -> Phase: ...


class Accumulator:
    """Collects steps and per-device totals while a plan is walked."""

    def __init__(self, model: Costs, devices: Sequence[str]):
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

    def comm_step(self, name: str, messages: Sequence[Message], count: int = 1) -> None:
        if count <= 0:
            return
        phase = self.model.phase(messages)
        if not phase.publishes:
            return
        for d, b in phase.up.items():
            self.up[d] += b * count
        for d, b in phase.down.items():
            self.down[d] += b * count
        self.steps.append(Step(name, "comm", phase.seconds, count, phase.publishes, int(sum(phase.up.values()))))


class Total(Accumulator):
    """Sums the critical path only (fast: for searching many candidates)."""

    def __init__(self, model: Costs):
        super().__init__(model, ())
        self.total = 0.0

    def compute_step(self, name: str, per_device: Mapping[str, float], count: int = 1) -> None:
        if count > 0 and per_device:
            self.total += max(per_device.values()) * count

    def comm_step(self, name: str, messages: Sequence[Message], count: int = 1) -> None:
        if count > 0:
            self.total += self.model.phase(messages).seconds * count


def walk(m: Costs, plan: Plan, work: Workload, acc: Accumulator) -> None:
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


def _ends(m: Costs, coord: str, work: Workload, acc: Accumulator, first: bool) -> None:
    name = "embed" if first else "head"
    acc.compute_step(name, {coord: m.time(coord, work, name)})


def _single(m: Costs, plan: Plan, work: Workload, acc: Accumulator) -> None:
    d = plan.devices[0]
    _ends(m, d, work, acc, True)
    t = m.n_dec * m.nd * m.time(d, work, "sub") if m.decoupled else 0.0
    t += m.n_cpl * m.time(d, work, "layer")
    acc.compute_step("layers", {d: t})
    _ends(m, d, work, acc, False)


def _pipeline(m: Costs, plan: Plan, work: Workload, acc: Accumulator) -> None:
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


def _tp(m: Costs, plan: Plan, work: Workload, acc: Accumulator) -> None:
    group = plan.devices
    coord = plan.coordinator
    k = len(group)
    full = wire_bytes(work.rows, m.d_model, plan.wire)
    _ends(m, coord, work, acc, True)
    acc.comm_step("broadcast input", [(coord, full, group[1:])])
    n_layers = len(m.layer_kinds)
    acc.compute_step("layer shards", {d: m.time(d, work, "layer", k) for d in group}, n_layers)
    rs, ag = allreduce(m, group, work.rows, plan)
    acc.comm_step("all-reduce: reduce-scatter", rs, 2 * n_layers)
    acc.comm_step("all-reduce: all-gather", ag, 2 * n_layers)
    _ends(m, coord, work, acc, False)


def _block(m: Costs, plan: Plan, work: Workload, acc: Accumulator) -> None:
    coord = plan.coordinator
    owners = plan.owners
    nb = m.nb
    dec_per_block = m.n_dec // nb
    counts = {d: len(plan.sub_blocks_of(d)) for d in owners}
    slices = {d: wire_bytes(work.rows, m.d_sub * counts[d], plan.wire) for d in owners}
    out = wire_bytes(_out_rows(m, work), m.d_model, plan.wire)

    _ends(m, coord, work, acc, True)
    acc.comm_step("scatter input", [(coord, slices[d], (d,)) for d in owners if d != coord])
    acc.compute_step("decoupled layers", {d: counts[d] * dec_per_block * m.time(d, work, "sub") for d in owners}, nb)
    if plan.coupled == "allgather":
        acc.comm_step("coupled: all-gather", [(d, slices[d], tuple(o for o in owners if o != d)) for d in owners], nb)
        acc.compute_step("coupled layer (replicated)", {d: m.time(d, work, "layer") for d in owners}, nb)
    elif plan.coupled == "gather":
        root = plan.coupled_devices[0]
        others = [d for d in owners if d != root]
        acc.comm_step(f"coupled: gather to {root}", [(d, slices[d], (root,)) for d in others], nb)
        acc.compute_step(f"coupled layer on {root}", {root: m.time(root, work, "layer")}, nb)
        acc.comm_step(f"coupled: scatter from {root}", [(root, slices[d], (d,)) for d in others], nb - 1)
        if root != coord:
            acc.comm_step(f"send output {root}->{coord}", [(root, out, (coord,))])
    else:
        group = plan.coupled_devices
        k = len(group)
        acc.comm_step(
            "coupled: gather to TP group", [(d, slices[d], tuple(g for g in group if g != d)) for d in owners], nb
        )
        acc.compute_step(f"coupled layer, TP over {k}", {d: m.time(d, work, "layer", k) for d in group}, nb)
        if k > 1:
            rs, ag = allreduce(m, group, work.rows, plan)
            acc.comm_step("coupled all-reduce: reduce-scatter", rs, 2 * nb)
            acc.comm_step("coupled all-reduce: all-gather", ag, 2 * nb)
        outside = [d for d in owners if d not in group]
        acc.comm_step(f"coupled: scatter from {group[0]}", [(group[0], slices[d], (d,)) for d in outside], nb - 1)
        if coord not in group:
            acc.comm_step(f"send output {group[0]}->{coord}", [(group[0], out, (coord,))])
    _ends(m, coord, work, acc, False)
