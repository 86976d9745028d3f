"""Runtime planning: the lowest-latency plan for one request, given the static placement.

The search space (DESIGN.md section 2): coordinator (a device holding the embeddings), device
subset, sub-block -> device mapping in proportion to speed, coupled-layer strategy (all-gather,
gather to one device, TP over a placed shard group), wire dtype, single-device fallback; for
standard models also pipeline and full tensor parallelism. Only plans whose weights the
placement holds, and whose KV cache and activations fit each device's budget, are candidates.

Pruning that keeps the choice exact under the cost model:
* wire dtype: every communication term grows with bytes and casting is not charged, so the
  smallest dtype the accuracy budget allows is always at least as fast; only it is evaluated.
* device subsets: the coordinator plus the k fastest other holders, for every k, in two orders
  (sub-block speed, link speed), instead of all 2^n subsets.
* sub-block mapping: longest-processing-time greedy over the subset (each sub-block to the
  holder that would finish it first), then single-move local search on the predicted total.
:meth:`RuntimePlanner.exhaustive` enumerates everything instead; the tests compare the two.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from detransformer_edge.parallel.plan import DeviceWeights, Placement, Plan, PlanError, Stage
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.cost import (
    WIRE_ITEMSIZE,
    Breakdown,
    Broker,
    CostModel,
    PlanningError,
    Request,
)
from detransformer_edge.planner.profile import DeviceProfile

# Wire dtypes each accuracy budget allows, most compact first. "fp16" (the default) keeps
# activations within ~1e-3 relative error; "int8" (per-row scales) costs ~1% relative error per
# hop and needs a model validated for it; "exact" sends float32.
WIRE_DTYPES_BY_ACCURACY: dict[str, tuple[str, ...]] = {
    "exact": ("float32",),
    "fp16": ("float16", "float32"),
    "int8": ("int8", "float16", "float32"),
}
DEFAULT_ACCURACY = "fp16"
LOCAL_SEARCH_ROUNDS = 2  # single-move improvement passes over the greedy mapping
IMPROVE_TOP = 2  # block plans (best first) that get the local search
GATHER_ROOTS = 3  # fastest coupled-replica holders tried as gather targets


Spec = tuple[float, Callable[[], Plan]]  # (lower bound on latency, plan factory)


class NoFeasiblePlanError(PlanningError):
    """No plan can run this request on the available devices with the current placement."""


@dataclass(frozen=True)
class Choice:
    """The chosen plan with its predicted cost."""

    plan: Plan
    breakdown: Breakdown


class RuntimePlanner:
    """Chooses plans for requests on one placement; build once per placement/membership."""

    def __init__(
        self,
        placement: Placement,
        profiles: Sequence[DeviceProfile],
        model_cfg: object,
        broker: Broker | None = None,
        accuracy: str = DEFAULT_ACCURACY,
        available: Sequence[str] | None = None,
        coordinator: str | None = None,
    ):
        """``available``: devices that may take part (default: all profiled); ``coordinator``:
        the device that must embed and answer (e.g. the leader; default: any holder of the
        embeddings)."""
        if accuracy not in WIRE_DTYPES_BY_ACCURACY:
            raise PlanningError(
                f"accuracy budget must be one of {', '.join(WIRE_DTYPES_BY_ACCURACY)}, got {accuracy!r}"
            )
        self.placement = placement
        self.cost = CostModel(model_cfg, profiles, broker)
        self.cfg = model_cfg
        self.wires = WIRE_DTYPES_BY_ACCURACY[accuracy]
        names = [p.name for p in profiles]
        avail = set(names if available is None else available)
        self.devices = [d for d in names if d in avail and d in placement.holdings]
        self.holdings: dict[str, DeviceWeights] = {d: placement.holdings[d] for d in self.devices}
        self.layer_kinds = self.cost.layer_kinds
        self.nd = self.cost.nd
        self.coupled_idx = tuple(i for i, k in enumerate(self.layer_kinds) if k == "coupled")
        n_layers = len(self.layer_kinds)
        self.full_layers = set(range(n_layers))
        self.coordinators = [
            d for d in self.devices if self.holdings[d].embeddings and coordinator in (None, d)
        ]
        self.replicas = [d for d in self.devices if set(self.coupled_idx) <= set(self.holdings[d].whole_layers)]
        self._replica_set = set(self.replicas)
        self._order = {d: i for i, d in enumerate(self.devices)}
        self._rtt = {d: self.cost.rtt_s(d) for d in self.devices}
        self._table_cache: _Tables | None = None
        self.tp_groups = self._tp_groups()

    # -- public ----------------------------------------------------------------------------------
    def choose(self, request: Request) -> Breakdown:
        """The lowest predicted latency plan for ``request``."""
        return self.ranked(request, 1)[0]

    def ranked(self, request: Request, top: int = 6) -> list[Breakdown]:
        """The ``top`` best distinct feasible plans, best first (ties: fewer devices, then the
        more precise wire dtype)."""
        specs = sorted(self._specs(request), key=lambda s: s[0])
        scored: dict[Plan, float] = {}
        keep = 2 * top  # a margin for plans that turn out equivalent or not to fit in memory
        best: list[float] = []
        skipped: list[Spec] = []
        for i, spec in enumerate(specs):
            if len(best) >= keep and spec[0] > best[keep - 1] * (1 + 1e-9):
                skipped = specs[i:]  # sorted by bound: none of the rest can make the cut
                break
            self._score(spec, request, scored, best, keep)
        # Polish the mapping of the few best block plans (local search is the costly part).
        leaders = [p for p in sorted(scored, key=lambda p: _rank_key(scored[p], p)) if p.mode == "block"]
        for plan in leaders[:IMPROVE_TOP]:
            for cand, lat in self._improve(plan, scored[plan], request):
                scored.setdefault(cand, lat)
        out = self._feasible(scored, request, top)
        if len(out) < top and skipped:  # memory ruled out the fast ones: look at the rest too
            for spec in skipped:
                self._score(spec, request, scored, best, len(specs))
            out = self._feasible(scored, request, top)
        if not out:
            raise NoFeasiblePlanError(self._why_none(request))
        return out

    def _score(self, spec: Spec, request: Request, scored: dict[Plan, float], best: list[float], keep: int) -> None:
        plan = spec[1]()
        if plan in scored:
            return
        lat = self.cost.latency(plan, request)
        scored[plan] = lat
        bisect.insort(best, lat)
        del best[keep:]

    def _feasible(self, scored: dict[Plan, float], request: Request, top: int) -> list[Breakdown]:
        out: list[Breakdown] = []
        shown: set[str] = set()
        for plan in sorted(scored, key=lambda p: _rank_key(scored[p], p)):
            # plans differing only in which (equivalent) sub-block indices a device runs
            # cost the same; keep one of each
            if plan.describe() in shown:
                continue
            shown.add(plan.describe())
            bd = self.cost.predict(plan, request, self.holdings)
            if bd.fits:
                out.append(bd)
                if len(out) >= top:
                    break
        return out

    def exhaustive(self, request: Request, wires: Sequence[str] | None = None) -> list[Breakdown]:
        """Every plan of the search space, without pruning (small clusters only: validation)."""
        out = []
        for plan in dict.fromkeys(self._all_plans(tuple(wires or self.wires))):
            bd = self.cost.predict(plan, request, self.holdings)
            if bd.fits:
                out.append(bd)
        return sorted(out, key=lambda bd: _rank_key(bd.total_s, bd.plan))

    # -- search ----------------------------------------------------------------------------------
    def _specs(self, request: Request) -> Iterator[Spec]:
        """Candidates as (lower bound on latency, plan factory): plans are built only if their
        bound can still beat what has been found."""
        wire = self.wires[0]
        for coord in self.coordinators:
            single = Plan("single", (coord,), wire="float32")
            if self._can_run(single):
                yield 0.0, (lambda p=single: p)
            if self.cost.decoupled:
                yield from self._search_block(coord, wire, request)
            else:
                for p in self._standard_plans(coord, wire, request):
                    if self._can_run(p):
                        yield 0.0, (lambda p=p: p)

    def _can_run(self, plan: Plan) -> bool:
        for d in plan.devices:
            held = self.holdings.get(d)
            if held is None or not held.covers(self.cost.required(plan, d)):
                return False
        return True

    def _subsets(self, coord: str, holders: list[str], request: Request) -> list[tuple[str, ...]]:
        work = request.workload
        others = [d for d in holders if d != coord]
        by_speed = sorted(others, key=lambda d: (self.cost.time(d, work, "sub"), d))
        by_link = sorted(others, key=lambda d: (-self.cost.profiles[d].link_mbit, self.cost.time(d, work, "sub"), d))
        subsets: dict[tuple[str, ...], None] = {}
        for order in (by_speed, by_link):
            for k in range(len(order) + 1):
                subsets[(coord, *order[:k])] = None
        return list(subsets)

    def _greedy_mapping(self, subset: Sequence[str], request: Request) -> tuple[str, ...] | None:
        """Longest-processing-time greedy: each sub-block to the holder that finishes it first."""
        t = self._tables(request.workload).sub
        holders_of = [[d for d in subset if j in self.holdings[d].sub_blocks] for j in range(self.nd)]
        if any(not h for h in holders_of):
            return None
        load = dict.fromkeys(subset, 0.0)
        owner: list[str] = [""] * self.nd
        coord = subset[0]
        for j in sorted(range(self.nd), key=lambda j: (len(holders_of[j]), j)):
            best = min(holders_of[j], key=lambda d: (load[d] + t[d], d != coord, subset.index(d)))
            owner[j] = best
            load[best] += t[best]
        if coord not in owner:  # the coordinator must own a sub-block: give it the cheapest move
            mine = [j for j in range(self.nd) if coord in holders_of[j]]
            if not mine:
                return None
            j = max(mine, key=lambda j: load[owner[j]])
            owner[j] = coord
        return tuple(owner)

    def _block_specs(
        self, coord: str, mapping: tuple[str, ...], roots: Sequence[str]
    ) -> Iterator[tuple[tuple[str, ...], str, tuple[str, ...]]]:
        """(devices, coupled strategy, coupled devices) of the block plans for one mapping:
        all-gather (if every owner holds the coupled layers), gather to each of ``roots``, TP over
        each placed shard group."""
        owners = [coord] + sorted({d for d in mapping if d != coord}, key=self._order.__getitem__)
        if all(d in self._replica_set for d in owners):
            yield tuple(owners), "allgather", ()
        for r in roots:
            yield (tuple(owners) if r in owners else (*owners, r)), "gather", (r,)
        for group in self.tp_groups:
            yield tuple(owners) + tuple(g for g in group if g not in owners), "tp", group

    def _block_plans(self, coord: str, mapping: tuple[str, ...], wire: str, roots: Sequence[str]) -> Iterator[Plan]:
        for devices, coupled, cdevs in self._block_specs(coord, mapping, roots):
            yield Plan("block", devices, wire, (), mapping, coupled, cdevs)  # type: ignore[arg-type]

    def _bound(
        self, coord: str, mapping: tuple[str, ...], coupled: str, cdevs: tuple[str, ...], work: Workload
    ) -> float:
        """Lower bound on a block plan's latency: its compute steps plus, for each message phase,
        the phase's round-trip latency and broker per-publish cost exactly as the cost model
        charges them (only the bytes on the wire are left out, and they can only add)."""
        cost = self.cost
        t = self._tables(work)
        load: dict[str, int] = {}
        for d in mapping:
            load[d] = load.get(d, 0) + 1
        nb = cost.nb
        t_sub = t.sub
        dec = max(n * t_sub[d] for d, n in load.items()) * (cost.n_dec // nb)
        rtt = self._rtt
        msg = cost.broker.per_message_ms / 1e3
        others = [d for d in load if d != coord]
        comm = 0.0
        if others:  # scatter input
            comm += 0.5 * (rtt[coord] + max(rtt[d] for d in others)) + msg * len(others)
        if coupled == "allgather":
            cpl = max(t.layer[d] for d in load)
            if others:
                comm += nb * (max(rtt[d] for d in load) + msg * len(load))
        elif coupled == "gather":
            root = cdevs[0]
            cpl = t.layer[root]
            senders = [d for d in load if d != root]
            if senders:
                phase = 0.5 * (rtt[root] + max(rtt[d] for d in senders)) + msg * len(senders)
                comm += (2 * nb - 1) * phase
            if root != coord:
                comm += 0.5 * (rtt[root] + rtt[coord]) + msg
        else:
            k = len(cdevs)
            cpl = max(t.shard(k)[d] for d in cdevs)
            comm += nb * (0.5 * (min(rtt[d] for d in load) + min(rtt[d] for d in cdevs)) + msg)
            if k > 1:
                worst = max(rtt[d] for d in cdevs)
                comm += 2 * nb * (2 * worst + msg * (k * (k - 1) + k))
        ends = t.ends[coord]
        return ends + nb * (dec + cpl) + comm

    def _tables(self, work: Workload) -> _Tables:
        """Per-device unit times for one workload (cached: the search reads them often)."""
        if self._table_cache is None or self._table_cache.work != work:
            self._table_cache = _Tables(self.cost, work, self.devices)
        return self._table_cache

    def _gather_roots(self, request: Request) -> list[str]:
        """Gather targets worth trying: the 3 fastest replica holders and the best-linked one."""
        work = request.workload
        by_speed = sorted(self.replicas, key=lambda d: (self.cost.time(d, work, "layer"), self.devices.index(d)))
        by_link = sorted(self.replicas, key=lambda d: (-self.cost.profiles[d].link_mbit, self.devices.index(d)))
        return list(dict.fromkeys(by_speed[:GATHER_ROOTS] + by_link[:1]))

    def _tp_groups(self) -> list[tuple[str, ...]]:
        """Complete tensor-parallel shard groups among available devices, ordered by rank."""
        ranks: dict[int, dict[int, str]] = {}
        for d in self.devices:
            for rank, k in self.holdings[d].tp_shards:
                ranks.setdefault(k, {}).setdefault(rank, d)
        return [tuple(r[i] for i in range(k)) for k, r in sorted(ranks.items()) if k > 1 and len(r) == k]

    def _search_block(self, coord: str, wire: str, request: Request) -> Iterator[Spec]:
        holders = [d for d in self.devices if self.holdings[d].sub_blocks]
        if coord not in holders:
            return
        roots = self._gather_roots(request)
        work = request.workload
        mappings: set[tuple[str, ...]] = set()
        for subset in self._subsets(coord, holders, request):
            mapping = self._greedy_mapping(subset, request)
            if mapping is None or mapping in mappings:
                continue
            mappings.add(mapping)
            # runnable by construction: owners hold their sub-blocks, roots hold replicas
            for devices, coupled, cdevs in self._block_specs(coord, mapping, roots):
                bound = self._bound(coord, mapping, coupled, cdevs, work)
                yield bound, (
                    lambda d=devices, c=coupled, cd=cdevs, m=mapping: Plan("block", d, wire, (), m, c, cd)  # type: ignore[arg-type]
                )

    def _improve(self, plan: Plan, latency: float, request: Request) -> list[tuple[Plan, float]]:
        """Single-move local search on the sub-block mapping, keeping the coupled strategy."""
        seen: list[tuple[Plan, float]] = []
        best, best_lat = plan, latency
        work = request.workload
        t_sub = self._tables(work).sub
        for _ in range(LOCAL_SEARCH_ROUNDS):
            start = best
            load: dict[str, float] = {}
            for owner in start.sub_block_owner:
                load[owner] = load.get(owner, 0.0) + t_sub[owner]
            critical = max(load, key=lambda d: load[d])
            coord = start.coordinator
            # Moves worth trying: off the device that sets the decoupled step's time, or onto
            # the coordinator (its sub-blocks need no input scatter).
            for j in range(self.nd):
                for d in self.devices:
                    cur = start.sub_block_owner[j]
                    if d == cur or j not in self.holdings[d].sub_blocks or (cur != critical and d != coord):
                        continue
                    owner = list(start.sub_block_owner)
                    owner[j] = d
                    mapping = tuple(owner)
                    if start.coupled == "allgather" and d not in self._replica_set:
                        continue
                    if self._bound(coord, mapping, start.coupled, start.coupled_devices, work) >= best_lat:
                        continue
                    cand = self._remap(start, mapping)
                    if cand is None:
                        continue
                    lat = self.cost.latency(cand, request)
                    seen.append((cand, lat))
                    if lat < best_lat * (1 - 1e-9):
                        best, best_lat = cand, lat
            if best is start:
                break
        return seen

    def _remap(self, plan: Plan, mapping: tuple[str, ...]) -> Plan | None:
        coord = plan.coordinator
        if coord not in mapping:
            return None
        owners = [coord] + sorted({d for d in mapping if d != coord}, key=self.devices.index)
        extra = [d for d in plan.coupled_devices if d not in owners]
        try:
            return Plan(
                mode="block", devices=(*owners, *extra), wire=plan.wire, sub_block_owner=mapping,
                coupled=plan.coupled, coupled_devices=plan.coupled_devices,
            )
        except PlanError:
            return None

    def _standard_plans(self, coord: str, wire: str, request: Request) -> Iterator[Plan]:
        n_layers = len(self.layer_kinds)
        work = request.workload
        others = sorted(
            (d for d in self.devices if d != coord and self.holdings[d].whole_layers),
            key=lambda d: (self.cost.time(d, work, "layer"), d),
        )
        for k in range(1, len(others) + 1):
            group = [coord, *others[:k]]
            stages = proportional_stages(group, [1 / self.cost.time(d, work, "layer") for d in group], n_layers)
            if stages is not None:
                yield Plan("pipeline", tuple(s.device for s in stages), wire=wire, stages=stages)  # type: ignore[arg-type]
        native = self._native_pipeline(coord)
        if native is not None:
            yield Plan("pipeline", tuple(s.device for s in native), wire=wire, stages=native)  # type: ignore[arg-type]
        for group in self.tp_groups:
            if group[0] == coord:
                yield Plan("tp", group, wire=wire)  # type: ignore[arg-type]

    def _native_pipeline(self, coord: str) -> tuple[Stage, ...] | None:
        """Follow the placement's own layer ranges from layer 0 on the coordinator onwards."""
        n_layers = len(self.layer_kinds)
        layer, stages, used = 0, [], set()
        device = coord
        while layer < n_layers:
            held = set(self.holdings[device].whole_layers)
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
            nxt = [d for d in self.devices if d not in used and layer in self.holdings[d].whole_layers]
            if not nxt:
                return None
            device = max(nxt, key=lambda d: (_run_length(self.holdings[d].whole_layers, layer), -self.devices.index(d)))
        return tuple(stages)

    def _all_plans(self, wires: tuple[str, ...]) -> Iterator[Plan]:
        for coord in self.coordinators:
            for wire in wires:
                single = Plan("single", (coord,), wire="float32")
                if self._can_run(single):
                    yield single
                if self.cost.decoupled:
                    holders = [[d for d in self.devices if j in self.holdings[d].sub_blocks] for j in range(self.nd)]
                    for mapping in itertools.product(*holders):
                        if coord not in mapping:
                            continue
                        for plan in self._block_plans(coord, tuple(mapping), wire, self.replicas):
                            if self._can_run(plan):
                                yield plan
                else:
                    n_layers = len(self.layer_kinds)
                    others = [d for d in self.devices if d != coord]
                    for k in range(1, len(others) + 1):
                        for perm in itertools.permutations(others, k):
                            group = (coord, *perm)
                            for cuts in itertools.combinations(range(1, n_layers), k):
                                bounds = (0, *cuts, n_layers)
                                stages = tuple(Stage(g, bounds[i], bounds[i + 1]) for i, g in enumerate(group))
                                plan = Plan("pipeline", group, wire=wire, stages=stages)  # type: ignore[arg-type]
                                if self._can_run(plan):
                                    yield plan
                    for group in self.tp_groups:
                        if group[0] == coord:
                            yield Plan("tp", group, wire=wire)  # type: ignore[arg-type]

    def _why_none(self, request: Request) -> str:
        if not self.devices:
            return "no available device holds any weights of the placement"
        if not self.coordinators:
            return (
                f"none of the available devices ({', '.join(self.devices)}) that may coordinate holds "
                "the embeddings; re-run static placement for the current members"
            )
        return (
            f"no plan for {request.mode} of {request.seq_len} tokens (batch {request.batch}) fits: the "
            "available devices miss some weights or lack memory for the KV cache and activations"
        )


class _Tables:
    def __init__(self, cost: CostModel, work: Workload, devices: Sequence[str]):
        self.cost, self.work, self.devices = cost, work, devices
        self.sub = {d: cost.time(d, work, "sub") for d in devices} if cost.decoupled else {}
        self.layer = {d: cost.time(d, work, "layer") for d in devices}
        self.ends = {d: cost.time(d, work, "embed") + cost.time(d, work, "head") for d in devices}
        self._shards: dict[int, dict[str, float]] = {}

    def shard(self, k: int) -> dict[str, float]:
        table = self._shards.get(k)
        if table is None:
            table = self._shards[k] = {d: self.cost.time(d, self.work, "layer", k) for d in self.devices}
        return table


def _run_length(layers: Sequence[int], start: int) -> int:
    held = set(layers)
    n = 0
    while start + n in held:
        n += 1
    return n


def _rank_key(latency: float, plan: Plan) -> tuple[float, int, int]:
    return (round(latency, 12), len(plan.devices), -WIRE_ITEMSIZE[plan.wire])


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


def choose_plan(
    placement: Placement,
    profiles: Sequence[DeviceProfile],
    model_cfg: object,
    request: Request,
    *,
    broker: Broker | None = None,
    accuracy: str = DEFAULT_ACCURACY,
    available: Sequence[str] | None = None,
    coordinator: str | None = None,
) -> tuple[Plan, Breakdown]:
    """One-shot convenience: build a :class:`RuntimePlanner` and choose for ``request``."""
    bd = RuntimePlanner(placement, profiles, model_cfg, broker, accuracy, available, coordinator).choose(request)
    return bd.plan, bd


def holdings_summary(holdings: Mapping[str, DeviceWeights]) -> str:
    parts = []
    for d, h in holdings.items():
        bits = []
        if h.embeddings:
            bits.append("emb")
        if h.sub_blocks:
            bits.append("sub" + ",".join(map(str, h.sub_blocks)))
        if h.whole_layers:
            bits.append(f"{len(h.whole_layers)} layers")
        if h.tp_shards:
            bits.append("tp" + ",".join(f"{r}/{k}" for r, k in h.tp_shards))
        parts.append(f"{d}[{' '.join(bits) or '-'}]")
    return " ".join(parts)
