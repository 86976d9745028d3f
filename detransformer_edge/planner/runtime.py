"""Runtime planning: the lowest-latency plan for one request, given the static placement.

The search space (DESIGN.md section 2): coordinator (a device holding the embeddings), device
subset, sub-block -> device mapping in proportion to speed, coupled-layer strategy (all-gather,
gather to one device, TP over a placed shard group), wire dtype, single-device fallback; for
standard models also pipeline and full tensor parallelism. Only plans whose weights the
placement holds, and whose KV cache and activations fit each device's budget, are candidates.

Pruning that keeps the choice exact under the cost model:
* wire dtype: every communication term grows with bytes and casting is not charged, so the
  smallest dtype the accuracy budget allows is always at least as fast; only it is evaluated.
* block plans: ``planner/block_search.py`` (subsets, greedy mapping, local search, bounds).
:meth:`RuntimePlanner.exhaustive` enumerates everything instead; the tests compare the two.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from detransformer_edge.model.config import ModelConfig
from detransformer_edge.parallel.plan import DeviceWeights, Placement, Plan
from detransformer_edge.planner.block_search import BlockSearch, Spec
from detransformer_edge.planner.breakdown import Breakdown, PlanningError, Request
from detransformer_edge.planner.cost import CostModel
from detransformer_edge.planner.network import Broker
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.space import SearchSpace
from detransformer_edge.planner.standard import (
    all_plans,
    proportional_counts,
    proportional_stages,
    standard_plans,
)
from detransformer_edge.planner.terms import CostTerms
from detransformer_edge.transport.wire import WIRE_ITEMSIZE, WireDtype

# Wire dtypes each accuracy budget allows, most compact first. "fp16" (the default) keeps
# activations within ~1e-3 relative error; "int8" (per-row scales) costs ~1% relative error per
# hop and needs a model validated for it; "exact" sends float32.
WIRE_DTYPES_BY_ACCURACY: dict[str, tuple[WireDtype, ...]] = {
    "exact": ("float32",),
    "fp16": ("float16", "float32"),
    "int8": ("int8", "float16", "float32"),
}
DEFAULT_ACCURACY = "fp16"
IMPROVE_TOP = 2  # block plans (best first) that get the local search

__all__ = [
    "DEFAULT_ACCURACY", "WIRE_DTYPES_BY_ACCURACY", "Choice", "NoFeasiblePlanError", "RuntimePlanner", "choose_plan",
    "holdings_summary", "proportional_counts", "proportional_stages",
]


class NoFeasiblePlanError(PlanningError):
    """No plan can run this request on the available devices with the current placement."""


@dataclass(frozen=True)
class Choice:
    """The chosen plan with its predicted cost."""

    plan: Plan
    breakdown: Breakdown


def compact_first(wires: Sequence[WireDtype]) -> tuple[WireDtype, ...]:
    """Allowed wire dtypes, fewest bytes first (the search evaluates the first)."""
    if not wires:
        raise PlanningError("the accuracy budget allows no wire dtype; allow at least float32")
    return tuple(sorted(dict.fromkeys(wires), key=lambda w: WIRE_ITEMSIZE[w]))


class RuntimePlanner:
    """Chooses plans for requests on one placement; build once per placement/membership."""

    def __init__(
        self,
        placement: Placement,
        profiles: Sequence[DeviceProfile],
        model_cfg: ModelConfig,
        broker: Broker | None = None,
        accuracy: str | Sequence[WireDtype] = DEFAULT_ACCURACY,
        available: Sequence[str] | None = None,
        coordinator: str | None = None,
        *,
        terms: CostTerms | None = None,
    ):
        """``accuracy``: a budget name (``exact``, ``fp16``, ``int8``) or the wire dtypes a task
        allows (``planner/accuracy.py``); ``available``: devices that may take part (default: all
        profiled); ``coordinator``: the device that must embed and answer (e.g. the leader;
        default: any holder of the embeddings)."""
        if isinstance(accuracy, str):
            if accuracy not in WIRE_DTYPES_BY_ACCURACY:
                raise PlanningError(
                    f"accuracy budget must be one of {', '.join(WIRE_DTYPES_BY_ACCURACY)}, got {accuracy!r}"
                )
            self.wires = WIRE_DTYPES_BY_ACCURACY[accuracy]
        else:
            self.wires = compact_first(accuracy)
        self.placement = placement
        self.cost = CostModel(model_cfg, profiles, broker, terms)
        self.cfg = model_cfg
        self.space = SearchSpace.build(placement, self.cost, [p.name for p in profiles], available, coordinator)
        self.blocks = BlockSearch(self.space)
        self._multi: bool | None = None  # the device-count filter of the search under way
        self._ranked: dict[tuple[Request, int, bool | None], list[Breakdown]] = {}

    @property
    def devices(self) -> list[str]:
        return self.space.devices

    @property
    def holdings(self) -> dict[str, DeviceWeights]:
        return self.space.holdings

    # -- public ----------------------------------------------------------------------------------
    def choose(self, request: Request) -> Breakdown:
        """The lowest predicted latency plan for ``request``."""
        return self.ranked(request, 1)[0]

    def ranked(self, request: Request, top: int = 6, multi: bool | None = None) -> list[Breakdown]:
        """The ``top`` best distinct feasible plans, best first (ties: fewer devices, then the
        more precise wire dtype); ``multi``: only plans on several devices (True) or on one (False)."""
        key = (request, top, multi)
        cached = self._ranked.get(key)
        if cached is None:
            cached = self._ranked[key] = self._search(request, top, multi)
        return list(cached)

    def _search(self, request: Request, top: int, multi: bool | None) -> list[Breakdown]:
        self._multi = multi
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
            for cand, lat in self.blocks.improve(plan, scored[plan], request):
                scored.setdefault(cand, lat)
        out = self._feasible(scored, request, top)
        if len(out) < top and skipped:  # memory ruled out the fast ones: look at the rest too
            for spec in skipped:
                self._score(spec, request, scored, best, len(specs))
            out = self._feasible(scored, request, top)
        if not out:
            raise NoFeasiblePlanError(self._why_none(request))
        return out

    def exhaustive(self, request: Request, wires: Sequence[WireDtype] | None = None) -> list[Breakdown]:
        """Every plan of the search space, without pruning (small clusters only: validation)."""
        out = []
        for plan in dict.fromkeys(all_plans(self.space, tuple(wires or self.wires))):
            bd = self.cost.predict(plan, request, self.holdings)
            if bd.fits:
                out.append(bd)
        return sorted(out, key=lambda bd: _rank_key(bd.total_s, bd.plan))

    # -- search ----------------------------------------------------------------------------------
    def _score(self, spec: Spec, request: Request, scored: dict[Plan, float], best: list[float], keep: int) -> None:
        plan = spec[1]()
        if plan in scored or (self._multi is not None and (len(plan.devices) > 1) != self._multi):
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
            if plan.describe() in shown or (self._multi is not None and (len(plan.devices) > 1) != self._multi):
                continue
            shown.add(plan.describe())
            bd = self.cost.predict(plan, request, self.holdings)
            if bd.fits:
                out.append(bd)
                if len(out) >= top:
                    break
        return out

    def _specs(self, request: Request) -> Iterator[Spec]:
        """Candidates as (lower bound on latency, plan factory): plans are built only if their
        bound can still beat what has been found."""
        wire = self.wires[0]
        sp = self.space
        for coord in sp.coordinators:
            single = Plan("single", (coord,), wire="float32")
            if sp.can_run(single) and self._multi is not True:
                yield 0.0, _const(single)
            if self.cost.decoupled:
                yield from self.blocks.specs(coord, wire, request)
            else:
                for p in standard_plans(sp, coord, wire, request):
                    if sp.can_run(p):
                        yield 0.0, _const(p)

    def _why_none(self, request: Request) -> str:
        if not self.devices:
            return "no available device holds any weights of the placement"
        if not self.space.coordinators:
            return (
                f"none of the available devices ({', '.join(self.devices)}) that may coordinate holds "
                "the embeddings; re-run static placement for the current members"
            )
        return (
            f"no plan for {request.mode} of {request.seq_len} tokens (batch {request.batch}) fits: the "
            "available devices miss some weights or lack memory for the KV cache and activations"
        )


def _const(plan: Plan) -> Callable[[], Plan]:
    return lambda: plan


def _rank_key(latency: float, plan: Plan) -> tuple[float, int, int]:
    return (round(latency, 12), len(plan.devices), -WIRE_ITEMSIZE[plan.wire])


def choose_plan(
    placement: Placement,
    profiles: Sequence[DeviceProfile],
    model_cfg: ModelConfig,
    request: Request,
    *,
    broker: Broker | None = None,
    accuracy: str | Sequence[WireDtype] = DEFAULT_ACCURACY,
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
