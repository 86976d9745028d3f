"""Static planning: which device holds which weights, run on every membership change.

For each candidate device set (the coordinator plus the k fastest others) and each way of
holding the coupled layers (a replica on every owner, one replica on the fastest device, or
tensor-parallel shards over the set), sub-blocks are dealt out in proportion to speed within
each device's memory budget; spares are then added where memory is left; the placement whose
expected latency over the request mix (each request planned by :class:`RuntimePlanner`) is
lowest wins. Spares, in order of priority: the whole model on the coordinator (single-device
fallback), coupled replicas on every owner (all-gather needs them), a second copy of each
sub-block on another device, the embeddings on a second device (coordinator failover).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from detransformer_edge.model.config import ModelConfig
from detransformer_edge.parallel.plan import DeviceWeights, Placement
from detransformer_edge.planner import analysis
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.cost import (
    PROCESS_OVERHEAD_MB,
    Breakdown,
    Broker,
    CostModel,
    PlanningError,
    Request,
)
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.runtime import (
    DEFAULT_ACCURACY,
    NoFeasiblePlanError,
    RuntimePlanner,
    proportional_counts,
)

MB = 1024 * 1024


class InfeasiblePlacementError(PlanningError):
    """The devices' memory budgets cannot hold the model; the message names the shortfall."""


@dataclass(frozen=True)
class MixEntry:
    request: Request
    weight: float = 1.0


def default_mix(model_cfg: ModelConfig) -> tuple[MixEntry, ...]:
    """The request mix of a home voice assistant.

    Encoders: intent/embedding queries of 16-128 tokens, short ones commonest. Decoders: one
    prefill of 32-512 tokens followed by ~32 decode steps, so decode steps weigh 32x.
    """
    if getattr(model_cfg, "family", "") == "decoder":
        return (
            MixEntry(Request("prefill", 32), 2.0),
            MixEntry(Request("prefill", 128), 2.0),
            MixEntry(Request("prefill", 512), 1.0),
            MixEntry(Request("decode", 64), 64.0),
            MixEntry(Request("decode", 160), 64.0),
            MixEntry(Request("decode", 544), 32.0),
        )
    return (
        MixEntry(Request("encode", 16), 3.0),
        MixEntry(Request("encode", 32), 3.0),
        MixEntry(Request("encode", 64), 2.0),
        MixEntry(Request("encode", 128), 1.0),
    )


@dataclass(frozen=True)
class StaticPlan:
    """A placement with what the planner expects of it."""

    placement: Placement
    expected_s: float  # mix-weighted mean predicted latency
    choices: tuple[tuple[Request, Breakdown], ...]  # best plan per request of the mix
    memory_bytes: dict[str, int] = field(default_factory=dict)  # resident, worst request of the mix
    label: str = ""  # which candidate won (device set + coupled holding); "split: ..." when no device holds it all
    why: str = ""  # one sentence: whether one device could hold the model, and what was placed instead


class _Budget:
    """Memory accounting for one candidate placement."""

    def __init__(self, cost: CostModel, profiles: Sequence[DeviceProfile], works: Sequence[Workload]):
        self.cost = cost
        self.ram = {p.name: p.ram_bytes for p in profiles}
        self.works = works

    def need(self, held: DeviceWeights) -> int:
        extra = max(
            (self.cost.kv_bytes(held, w) + analysis.activation_peak_bytes(self.cost.cfg, w) for w in self.works),
            default=0,
        )
        return self.cost.weights_bytes(held) + PROCESS_OVERHEAD_MB * MB + extra

    def fits(self, device: str, held: DeviceWeights) -> bool:
        return self.need(held) <= self.ram[device]


def plan_static(
    profiles: Sequence[DeviceProfile],
    model_cfg: ModelConfig,
    mix: Sequence[MixEntry] | None = None,
    *,
    broker: Broker | None = None,
    coordinator: str | None = None,
    spares: bool = True,
    accuracy: str = DEFAULT_ACCURACY,
    version: int = 1,
) -> StaticPlan:
    """Best placement for ``profiles`` and the request ``mix`` (default: :func:`default_mix`)."""
    if not profiles:
        raise PlanningError("static planning needs at least one device profile")
    mix = tuple(mix or default_mix(model_cfg))
    if not mix or sum(e.weight for e in mix) <= 0:
        raise PlanningError("the request mix needs at least one request with positive weight")
    cost = CostModel(model_cfg, profiles, broker)
    budget = _Budget(cost, profiles, [e.request.workload for e in mix])
    names = [p.name for p in profiles]
    speed = {p.name: p.gflops for p in profiles}
    coord = coordinator or _pick_coordinator(profiles, budget, cost)
    if coord not in names:
        raise PlanningError(f"coordinator {coord!r} has no profile; known: {', '.join(names)}")
    others = sorted((d for d in names if d != coord), key=lambda d: (-speed[d], d))
    max_set = min(len(names), cost.nd) if cost.decoupled else len(names)

    candidates: list[tuple[str, dict[str, DeviceWeights]]] = []
    for m in range(1, max_set + 1):
        group = [coord, *others[: m - 1]]
        builder = _decoupled_candidates if cost.decoupled else _standard_candidates
        for label, holdings in builder(group, names, speed, cost, budget):
            if spares:
                holdings = _add_spares(holdings, group, names, speed, cost, budget, coord)
            candidates.append((f"{'+'.join(group)} {label}", holdings))
    if not candidates:
        raise InfeasiblePlacementError(_shortfall(names, speed, cost, budget, coord))

    best: StaticPlan | None = None
    for label, holdings in candidates:
        placement = Placement(version, {d: holdings.get(d, DeviceWeights()) for d in names})
        planner = RuntimePlanner(placement, profiles, model_cfg, broker, accuracy)
        try:
            choices = tuple((e.request, planner.choose(e.request)) for e in mix)
        except NoFeasiblePlanError:
            continue
        total_w = sum(e.weight for e in mix)
        expected = sum(e.weight * bd.total_s for e, (_, bd) in zip(mix, choices)) / total_w
        if best is None or expected < best.expected_s * (1 - 1e-9):
            memory = {d: budget.need(placement.holdings[d]) for d in names if placement.holdings[d] != DeviceWeights()}
            best = StaticPlan(placement, expected, choices, memory, label)
    if best is None:
        raise InfeasiblePlacementError(_shortfall(names, speed, cost, budget, coord))
    return _explained(best, cost, budget, profiles)


def _explained(sp: StaticPlan, cost: CostModel, budget: _Budget, profiles: Sequence[DeviceProfile]) -> StaticPlan:
    """The placement's label and reason: a model no device can hold is split, and says so."""
    whole = DeviceWeights(True, tuple(range(cost.nd)) if cost.decoupled else (), tuple(range(len(cost.layer_kinds))))
    need = budget.need(whole)
    roomiest = max(profiles, key=lambda p: p.ram_bytes)
    held = sorted(d for d, w in sp.placement.holdings.items() if w != DeviceWeights())
    if need > roomiest.ram_bytes:
        why = (f"no device can hold the whole model ({need // MB} MB with its runtime and the largest request's "
               f"caches; the largest budget is {roomiest.ram_bytes // MB} MB on {roomiest.name}): split over "
               f"{', '.join(held)} ({sp.label}), each within its budget")
        return replace(sp, label=f"split: {sp.label}", why=why)
    fits = [p.name for p in profiles if p.ram_bytes >= need]
    why = (f"the whole model ({need // MB} MB) fits on {', '.join(fits)}; {sp.label} has the lowest expected "
           f"latency over the request mix ({sp.expected_s * 1e3:.0f} ms)")
    return replace(sp, why=why)


def plan_placement(
    profiles: Sequence[DeviceProfile],
    model_cfg: ModelConfig,
    mix: Sequence[MixEntry] | None = None,
    **kwargs: object,
) -> Placement:
    """The placement of :func:`plan_static` (same keyword arguments)."""
    return plan_static(profiles, model_cfg, mix, **kwargs).placement  # type: ignore[arg-type]


# -- candidate builders -----------------------------------------------------------------------


def _pick_coordinator(profiles: Sequence[DeviceProfile], budget: _Budget, cost: CostModel) -> str:
    """Best capability score among devices that can hold the embeddings plus one unit of work."""
    unit = DeviceWeights(True, (0,), ()) if cost.decoupled else DeviceWeights(True, (), (0,))
    able = [p for p in profiles if budget.fits(p.name, unit)]
    pool = able or list(profiles)
    order = {p.name: i for i, p in enumerate(profiles)}
    return max(pool, key=lambda p: (p.capability_score, -order[p.name])).name  # ties: first listed


def _deal_counts(group: Sequence[str], speed: dict[str, float], cap: dict[str, int], total: int, minimum: int = 0) -> list[int] | None:
    """``total`` units over ``group`` in proportion to speed, each device at most ``cap`` (water
    filling: what a full device cannot take goes to the others by speed); None if they don't fit."""
    if sum(cap[d] for d in group) < total or any(cap[d] < minimum for d in group):
        return None
    counts = dict.fromkeys(group, minimum)
    left = total - minimum * len(group)
    if left < 0:
        return None
    active = [d for d in group if counts[d] < cap[d]]
    while left > 0 and active:
        share = proportional_counts([speed[d] for d in active], left)
        assert share is not None
        moved = 0
        for d, c in zip(active, share):
            take = min(c, cap[d] - counts[d], left - moved)
            counts[d] += take
            moved += take
        left -= moved
        active = [d for d in active if counts[d] < cap[d]]
        if moved == 0 and active:  # rounding gave nothing: one unit to the fastest with room
            d = max(active, key=lambda d: speed[d])
            counts[d] += 1
            left -= 1
            active = [d for d in active if counts[d] < cap[d]]
    return [counts[d] for d in group] if left == 0 else None


def _capacity(device: str, held: DeviceWeights, budget: _Budget, limit: int, grow: object) -> int:
    """How many more units ``grow(held, n)`` fit on ``device`` (at most ``limit``)."""
    n = 0
    while n < limit and budget.fits(device, grow(held, n + 1)):  # type: ignore[operator]
        n += 1
    return n


def _deal_sub_blocks(
    group: Sequence[str], speed: dict[str, float], cost: CostModel, budget: _Budget, base: dict[str, DeviceWeights]
) -> dict[str, DeviceWeights] | None:
    """Sub-block indices per device in proportion to speed, capped by memory; None if they
    don't fit. ``base`` is what each device holds already (embeddings, coupled weights)."""
    nd = cost.nd
    cap = {
        d: _capacity(d, base.get(d, DeviceWeights()), budget, nd, lambda h, n: replace(h, sub_blocks=tuple(range(n))))
        for d in group
    }
    counts = _deal_counts(group, speed, cap, nd)
    if counts is None:
        return None
    out, j = {}, 0
    for d, c in zip(group, counts):
        out[d] = replace(base.get(d, DeviceWeights()), sub_blocks=tuple(range(j, j + c)))
        j += c
    for d, held in base.items():
        out.setdefault(d, held)
    return out


def _decoupled_candidates(
    group: list[str], names: list[str], speed: dict[str, float], cost: CostModel, budget: _Budget
) -> list[tuple[str, dict[str, DeviceWeights]]]:
    coord = group[0]
    coupled = tuple(i for i, k in enumerate(cost.layer_kinds) if k == "coupled")
    emb = {coord: DeviceWeights(embeddings=True)}
    options: list[tuple[str, dict[str, DeviceWeights]]] = [
        ("coupled replicated", {d: replace(emb.get(d, DeviceWeights()), whole_layers=coupled) for d in group}),
    ]
    fastest = max(group, key=lambda d: (speed[d], d == coord))
    options.append(
        (f"coupled on {fastest}", {**emb, fastest: replace(emb.get(fastest, DeviceWeights()), whole_layers=coupled)})
    )
    k = len(group)
    if k > 1 and getattr(cost.cfg, "n_heads") % k == 0:
        options.append(
            (f"coupled TP/{k}", {d: replace(emb.get(d, DeviceWeights()), tp_shards=((r, k),)) for r, d in enumerate(group)})
        )
    out = []
    for label, base in options:
        if not all(budget.fits(d, h) for d, h in base.items()):
            continue
        dealt = _deal_sub_blocks(group, speed, cost, budget, base)
        if dealt is not None and dealt[coord].sub_blocks:
            out.append((label, dealt))
    return out


def _standard_candidates(
    group: list[str], names: list[str], speed: dict[str, float], cost: CostModel, budget: _Budget
) -> list[tuple[str, dict[str, DeviceWeights]]]:
    coord = group[0]
    n_layers = len(cost.layer_kinds)
    out = []
    if len(group) <= n_layers:
        cap = {
            d: _capacity(d, DeviceWeights(d == coord), budget, n_layers, lambda h, n: replace(h, whole_layers=tuple(range(n))))
            for d in group
        }
        counts = _deal_counts(group, speed, cap, n_layers, minimum=1)
        if counts is not None:
            holdings, start = {}, 0
            for d, c in zip(group, counts):
                holdings[d] = DeviceWeights(d == coord, (), tuple(range(start, start + c)))
                start += c
            out.append(("pipeline", holdings))
    k = len(group)
    if k > 1 and getattr(cost.cfg, "n_heads") % k == 0:
        holdings = {d: DeviceWeights(d == coord, (), (), ((r, k),)) for r, d in enumerate(group)}
        if all(budget.fits(d, h) for d, h in holdings.items()):
            out.append((f"TP/{k}", holdings))
    if k == 1:
        full = {coord: DeviceWeights(True, (), tuple(range(n_layers)))}
        if budget.fits(coord, full[coord]):
            out = [("single", full)]
    return out


def _add_spares(
    holdings: dict[str, DeviceWeights],
    group: list[str],
    names: list[str],
    speed: dict[str, float],
    cost: CostModel,
    budget: _Budget,
    coord: str,
) -> dict[str, DeviceWeights]:
    h = {d: holdings.get(d, DeviceWeights()) for d in names}
    n_layers = len(cost.layer_kinds)
    all_subs = tuple(range(cost.nd)) if cost.decoupled else ()
    coupled = tuple(i for i, k in enumerate(cost.layer_kinds) if k == "coupled")

    def merged(held: DeviceWeights, *, emb: bool = False, subs: tuple[int, ...] = (), layers: tuple[int, ...] = ()) -> DeviceWeights:
        return DeviceWeights(
            held.embeddings or emb,
            tuple(sorted(set(held.sub_blocks) | set(subs))),
            tuple(sorted(set(held.whole_layers) | set(layers))),
            held.tp_shards,
        )

    def try_add(d: str, new: DeviceWeights) -> bool:
        if new != h[d] and budget.fits(d, new):
            h[d] = new
            return True
        return False

    # 1. the whole model on the coordinator: the single-device fallback (whole layers), its
    #    sub-blocks also usable in block plans
    whole = tuple(range(n_layers))
    try_add(coord, merged(h[coord], emb=True, subs=all_subs, layers=whole))
    if cost.decoupled:
        # 2. coupled replicas on every owner (all-gather needs them)
        for d in sorted(group, key=lambda d: -speed[d]):
            if h[d].sub_blocks:
                try_add(d, merged(h[d], layers=coupled))
        # 3. a second copy of every sub-block, on the fastest device with room
        by_speed = sorted(names, key=lambda d: (-speed[d], d))
        for j in range(cost.nd):
            copies = sum(1 for d in names if j in h[d].sub_blocks)
            if copies >= 2:
                continue
            for d in by_speed:
                if j not in h[d].sub_blocks and try_add(d, merged(h[d], subs=(j,))):
                    break
    else:
        by_speed = sorted(names, key=lambda d: (-speed[d], d))
        for d in by_speed:
            if d != coord and h[d].whole_layers:
                try_add(d, merged(h[d], layers=whole))
    # 4. the embeddings on a second device, for coordinator failover
    for d in sorted(names, key=lambda d: (-speed[d], d)):
        if d != coord and (h[d].sub_blocks or h[d].whole_layers) and try_add(d, merged(h[d], emb=True)):
            break
    return {d: held for d, held in h.items() if held != DeviceWeights()}


def _shortfall(names: list[str], speed: dict[str, float], cost: CostModel, budget: _Budget, coord: str) -> str:
    """Explain the shortfall: the model dealt out in proportion to speed, against budgets."""
    units: list[tuple[str, int]] = []
    if cost.decoupled:
        sub = budget.need(DeviceWeights(sub_blocks=(0,))) - budget.need(DeviceWeights())
        units += [(f"sub-block {j}", sub) for j in range(cost.nd)]
        first_coupled = cost.layer_kinds.index("coupled")
        layer = budget.need(DeviceWeights(whole_layers=(first_coupled,))) - budget.need(DeviceWeights())
        n_cpl = cost.n_cpl
        per = n_cpl * layer // len(names)
        coupled_share = {d: per for d in names}
    else:
        layer = budget.need(DeviceWeights(whole_layers=(0,))) - budget.need(DeviceWeights())
        units += [(f"layer {i}", layer) for i in range(len(cost.layer_kinds))]
        coupled_share = dict.fromkeys(names, 0)
    emb = budget.need(DeviceWeights(embeddings=True)) - budget.need(DeviceWeights())
    counts = proportional_counts([speed[d] for d in names], len(units)) or [0] * len(names)
    lines, total_over, i = [], 0, 0
    for d, c in zip(names, counts):
        need = budget.need(DeviceWeights()) + c * units[0][1] + coupled_share[d] + (emb if d == coord else 0)
        i += c
        over = need - budget.ram[d]
        total_over += max(0, over)
        what = f"{c} {'sub-blocks' if cost.decoupled else 'layers'}"
        if cost.decoupled:
            what += f" + 1/{len(names)} of the coupled layers (TP)"
        if d == coord:
            what += " + embeddings"
        lines.append(f"device {d} holds {what} = {need // MB} MB, budget {budget.ram[d] // MB} MB")
    total_need = sum(units_bytes for _, units_bytes in units) + emb + cost.n_cpl * layer * cost.decoupled
    total_need += len(names) * budget.need(DeviceWeights())
    total_ram = sum(budget.ram.values())
    short = max(total_over, total_need - total_ram)
    return f"need {max(1, short // MB)} MB more: " + "; ".join(lines) + (
        ". Add a device, free memory (ram_mb in the profile) or use a smaller model."
    )
