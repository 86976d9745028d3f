"""The search over block plans of a decoupled model: device subsets, sub-block mappings and
coupled-layer strategies, with a lower bound per candidate so the planner builds and scores only
those that can still win.

* Subsets: the coordinator plus the k fastest other holders, for every k, in two orders
  (sub-block speed, link speed), instead of all 2^n subsets.
* Mapping: longest-processing-time greedy over the subset (each sub-block to the holder that
  would finish it first), i.e. in proportion to speed; then single-move local search on the
  predicted total (:meth:`BlockSearch.improve`).
* Coupled layers: all-gather if every owner holds them, gather to a replica holder, or TP over a
  placed shard group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from detransformer_edge.parallel.plan import CoupledStrategy, Plan, PlanError
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.breakdown import Request
from detransformer_edge.planner.space import SearchSpace
from detransformer_edge.transport.wire import WireDtype

LOCAL_SEARCH_ROUNDS = 2  # single-move improvement passes over the greedy mapping
GATHER_ROOTS = 3  # fastest coupled-replica holders tried as gather targets

Spec = tuple[float, Callable[[], Plan]]  # (lower bound on latency, plan factory)
BlockSpec = tuple[tuple[str, ...], CoupledStrategy, tuple[str, ...]]  # devices, strategy, coupled devices


def block_plan(devices: tuple[str, ...], wire: WireDtype, mapping: tuple[str, ...], coupled: CoupledStrategy,
               coupled_devices: tuple[str, ...]) -> Plan:
    return Plan("block", devices, wire, (), mapping, coupled, coupled_devices)


class BlockSearch:
    def __init__(self, space: SearchSpace):
        self.space = space
        self.cost = space.cost
        self._order = {d: i for i, d in enumerate(space.devices)}
        self._replicas = set(space.replicas)
        self._rtt = {d: self.cost.rtt_s(d) for d in space.devices}

    def specs(self, coord: str, wire: WireDtype, request: Request) -> Iterator[Spec]:
        """Every candidate block plan coordinated by ``coord``, as (bound, factory)."""
        sp = self.space
        holders = [d for d in sp.devices if sp.holdings[d].sub_blocks]
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
            for devices, coupled, cdevs in self.strategies(coord, mapping, roots):
                bound = self.bound(coord, mapping, coupled, cdevs, work)
                yield bound, self._factory(devices, wire, mapping, coupled, cdevs)

    @staticmethod
    def _factory(devices: tuple[str, ...], wire: WireDtype, mapping: tuple[str, ...], coupled: CoupledStrategy,
                 cdevs: tuple[str, ...]) -> Callable[[], Plan]:
        return lambda: block_plan(devices, wire, mapping, coupled, cdevs)

    def strategies(self, coord: str, mapping: tuple[str, ...], roots: Sequence[str]) -> Iterator[BlockSpec]:
        """(devices, coupled strategy, coupled devices) of the block plans for one mapping:
        all-gather (if every owner holds the coupled layers), gather to each of ``roots``, TP over
        each placed shard group."""
        owners = (coord, *sorted({d for d in mapping if d != coord}, key=self._order.__getitem__))
        if all(d in self._replicas for d in owners):
            yield owners, "allgather", ()
        for r in roots:
            yield (owners if r in owners else (*owners, r)), "gather", (r,)
        for group in self.space.tp_groups:
            yield owners + tuple(g for g in group if g not in owners), "tp", group

    def _subsets(self, coord: str, holders: list[str], request: Request) -> list[tuple[str, ...]]:
        work = request.workload
        cost = self.cost
        others = [d for d in holders if d != coord]
        by_speed = sorted(others, key=lambda d: (cost.time(d, work, "sub"), d))
        by_link = sorted(others, key=lambda d: (-cost.profiles[d].link_mbit, cost.time(d, work, "sub"), d))
        subsets: dict[tuple[str, ...], None] = {}
        for order in (by_speed, by_link):
            for k in range(len(order) + 1):
                subsets[(coord, *order[:k])] = None
        return list(subsets)

    def _greedy_mapping(self, subset: Sequence[str], request: Request) -> tuple[str, ...] | None:
        """Longest-processing-time greedy: each sub-block to the holder that finishes it first."""
        sp = self.space
        nd = sp.nd
        t = sp.tables(request.workload).sub
        holders_of = [[d for d in subset if j in sp.holdings[d].sub_blocks] for j in range(nd)]
        if any(not h for h in holders_of):
            return None
        load = dict.fromkeys(subset, 0.0)
        owner: list[str] = [""] * nd
        coord = subset[0]
        for j in sorted(range(nd), key=lambda j: (len(holders_of[j]), j)):
            best = min(holders_of[j], key=lambda d: (load[d] + t[d], d != coord, subset.index(d)))
            owner[j] = best
            load[best] += t[best]
        if coord not in owner:  # the coordinator must own a sub-block: give it the cheapest move
            mine = [j for j in range(nd) if coord in holders_of[j]]
            if not mine:
                return None
            j = max(mine, key=lambda j: load[owner[j]])
            owner[j] = coord
        return tuple(owner)

    def bound(self, coord: str, mapping: tuple[str, ...], coupled: str, cdevs: tuple[str, ...], work: Workload) -> float:
        """Lower bound on a block plan's latency: its compute steps plus, for each message phase,
        the phase's round-trip latency and broker per-publish cost exactly as the cost model
        charges them (only the bytes on the wire are left out, and they can only add)."""
        cost = self.cost
        t = self.space.tables(work)
        load: dict[str, int] = {}
        for d in mapping:
            load[d] = load.get(d, 0) + 1
        nb = cost.nb
        dec = max(n * t.sub[d] for d, n in load.items()) * (cost.n_dec // nb)
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
        return t.ends[coord] + nb * (dec + cpl) + comm

    def _gather_roots(self, request: Request) -> list[str]:
        """Gather targets worth trying: the 3 fastest replica holders and the best-linked one."""
        work = request.workload
        cost, order = self.cost, self._order
        replicas = self.space.replicas
        by_speed = sorted(replicas, key=lambda d: (cost.time(d, work, "layer"), order[d]))
        by_link = sorted(replicas, key=lambda d: (-cost.profiles[d].link_mbit, order[d]))
        return list(dict.fromkeys(by_speed[:GATHER_ROOTS] + by_link[:1]))

    def improve(self, plan: Plan, latency: float, request: Request) -> list[tuple[Plan, float]]:
        """Single-move local search on the sub-block mapping, keeping the coupled strategy."""
        sp = self.space
        seen: list[tuple[Plan, float]] = []
        best, best_lat = plan, latency
        work = request.workload
        t_sub = sp.tables(work).sub
        for _ in range(LOCAL_SEARCH_ROUNDS):
            start = best
            load: dict[str, float] = {}
            for owner in start.sub_block_owner:
                load[owner] = load.get(owner, 0.0) + t_sub[owner]
            critical = max(load, key=lambda d: load[d])
            coord = start.coordinator
            # Moves worth trying: off the device that sets the decoupled step's time, or onto
            # the coordinator (its sub-blocks need no input scatter).
            for j in range(sp.nd):
                for d in sp.devices:
                    cur = start.sub_block_owner[j]
                    if d == cur or j not in sp.holdings[d].sub_blocks or (cur != critical and d != coord):
                        continue
                    moved = list(start.sub_block_owner)
                    moved[j] = d
                    mapping = tuple(moved)
                    if start.coupled == "allgather" and d not in self._replicas:
                        continue
                    if self.bound(coord, mapping, start.coupled, start.coupled_devices, work) >= best_lat:
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
        owners = [coord] + sorted({d for d in mapping if d != coord}, key=self._order.__getitem__)
        extra = [d for d in plan.coupled_devices if d not in owners]
        try:
            return block_plan((*owners, *extra), plan.wire, mapping, plan.coupled, plan.coupled_devices)
        except PlanError:
            return None
