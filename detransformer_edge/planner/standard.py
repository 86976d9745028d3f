"""Candidate plans of a standard (not decoupled) model: pipelines split in proportion to speed
over speed-ordered prefixes of the holders, the placement's own layer ranges, and tensor
parallelism over placed shard groups; and the whole search space, enumerated for validation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from detransformer_edge.parallel.plan import Plan, Stage
from detransformer_edge.planner.block_search import BlockSearch, block_plan
from detransformer_edge.planner.breakdown import Request
from detransformer_edge.planner.space import SearchSpace
from detransformer_edge.transport.wire import WireDtype


def proportional_counts(weights: Sequence[float], total: int, minimum: int = 0) -> list[int] | None:
    """Split ``total`` items in proportion to ``weights`` (largest remainder), each >= ``minimum``."""
    n = len(weights)
    if n * minimum > total or n == 0:
        return None
    rest = total - n * minimum
    s = sum(weights)
    exact = [rest * w / s for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: rest - sum(counts)]:
        counts[i] += 1
    return [c + minimum for c in counts]


def proportional_stages(devices: Sequence[str], speeds: Sequence[float], n_layers: int) -> tuple[Stage, ...] | None:
    """Contiguous layer ranges, one per device in order, sized in proportion to speed."""
    counts = proportional_counts(speeds, n_layers, minimum=1)
    if counts is None:
        return None
    stages, start = [], 0
    for d, c in zip(devices, counts):
        stages.append(Stage(d, start, start + c))
        start += c
    return tuple(stages)


def pipeline_plan(stages: tuple[Stage, ...], wire: WireDtype) -> Plan:
    return Plan("pipeline", tuple(s.device for s in stages), wire, stages)


def standard_plans(space: SearchSpace, coord: str, wire: WireDtype, request: Request) -> Iterator[Plan]:
    n_layers = len(space.cost.layer_kinds)
    work = request.workload
    cost = space.cost
    others = sorted(
        (d for d in space.devices if d != coord and space.holdings[d].whole_layers),
        key=lambda d: (cost.time(d, work, "layer"), d),
    )
    for k in range(1, len(others) + 1):
        group = (coord, *others[:k])
        stages = proportional_stages(group, [1 / cost.time(d, work, "layer") for d in group], n_layers)
        if stages is not None:
            yield pipeline_plan(stages, wire)
    native = native_pipeline(space, coord)
    if native is not None:
        yield pipeline_plan(native, wire)
    for group in space.tp_groups:
        if group[0] == coord:
            yield Plan("tp", group, wire)


def native_pipeline(space: SearchSpace, coord: str) -> tuple[Stage, ...] | None:
    """Follow the placement's own layer ranges from layer 0 on the coordinator onwards."""
    n_layers = len(space.cost.layer_kinds)
    layer, stages, used = 0, list[Stage](), set[str]()
    device = coord
    while layer < n_layers:
        held = set(space.holdings[device].whole_layers)
        end = layer
        while end < n_layers and end in held:
            end += 1
        if end == layer:
            return None
        if device == coord and end == n_layers and not stages:
            return None  # that is the single-device plan
        stages.append(Stage(device, layer, end))
        used.add(device)
        layer = end
        if layer == n_layers:
            break
        nxt = [d for d in space.devices if d not in used and layer in space.holdings[d].whole_layers]
        if not nxt:
            return None
        device = max(nxt, key=lambda d: (_run_length(space.holdings[d].whole_layers, layer), -space.index(d)))
    return tuple(stages)


def _run_length(layers: Sequence[int], start: int) -> int:
    held = set(layers)
    n = 0
    while start + n in held:
        n += 1
    return n


def all_plans(space: SearchSpace, wires: tuple[WireDtype, ...]) -> Iterator[Plan]:
    """Every plan of the search space, without pruning (small clusters only: validation)."""
    blocks = BlockSearch(space)
    n_layers = len(space.cost.layer_kinds)
    for coord in space.coordinators:
        for wire in wires:
            single = Plan("single", (coord,), wire="float32")
            if space.can_run(single):
                yield single
            if space.cost.decoupled:
                holders = [[d for d in space.devices if j in space.holdings[d].sub_blocks] for j in range(space.nd)]
                for mapping in itertools.product(*holders):
                    if coord not in mapping:
                        continue
                    for devices, coupled, cdevs in blocks.strategies(coord, tuple(mapping), space.replicas):
                        plan = block_plan(devices, wire, tuple(mapping), coupled, cdevs)
                        if space.can_run(plan):
                            yield plan
                continue
            others = [d for d in space.devices if d != coord]
            for k in range(1, len(others) + 1):
                for perm in itertools.permutations(others, k):
                    group = (coord, *perm)
                    for cuts in itertools.combinations(range(1, n_layers), k):
                        bounds = (0, *cuts, n_layers)
                        plan = pipeline_plan(tuple(Stage(g, bounds[i], bounds[i + 1]) for i, g in enumerate(group)), wire)
                        if space.can_run(plan):
                            yield plan
            for group in space.tp_groups:
                if group[0] == coord:
                    yield Plan("tp", group, wire)
