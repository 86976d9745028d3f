"""The leader's picture of the home and its static plan: who holds which weights, who is ready,
and which plan each request gets.

* **Static planning** (``plan``): on every membership change the leader plans a placement per
  served model with itself as coordinator, bumps the placement version and returns each
  device's assignment body. Devices report ``ready`` with that version in their status.
* **Runtime planning** (``choose``): each request gets the lowest-predicted-latency plan among
  the ready devices and every placed variant of the requested model's family within the task's
  budget (``planner/variants.py``; the leader coordinates: it tokenised the input and decodes
  the result), or a fixed baseline for benchmarks; ``retry_plan`` is the choice after a failed
  run. Both return the model to run with the plan (``Chosen``).

Pure apart from its own state: no I/O, tested without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.plan import (
    BASELINES,
    DeviceWeights,
    Placement,
    Plan,
    PlanError,
    baseline_plan,
    full_replica_weights,
)
from detransformer_edge.planner.cost import Broker, PlanningError
from detransformer_edge.planner.cost import Request as PlanRequest
from detransformer_edge.planner.profile import DeviceProfile, profile_from_dict
from detransformer_edge.planner.static import plan_static
from detransformer_edge.planner.variants import DEFAULT_MARGIN, TaskBudget, Variant, VariantPlanner
from detransformer_edge.service.catalog import Catalog


class ServiceError(DetransformerError):
    """A request the service cannot serve now; ``code`` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def weights_to_dict(w: DeviceWeights) -> dict[str, Any]:
    return {"embeddings": w.embeddings, "sub_blocks": list(w.sub_blocks),
            "whole_layers": list(w.whole_layers), "tp_shards": [list(s) for s in w.tp_shards]}


def weights_from_dict(d: Mapping[str, Any]) -> DeviceWeights:
    try:
        return DeviceWeights(
            bool(d.get("embeddings", False)),
            tuple(int(j) for j in d.get("sub_blocks", ())),
            tuple(int(i) for i in d.get("whole_layers", ())),
            tuple((int(r), int(k)) for r, k in d.get("tp_shards", ())),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DetransformerError(f"bad weight assignment {d!r}: {exc}") from None


@dataclass(frozen=True)
class Chosen:
    """What a request runs: the model (a variant of the one asked for), the plan, its predicted
    seconds (0 for a fixed baseline) and why."""

    model: str
    plan: Plan
    predicted_s: float = 0.0
    reason: str = ""


@dataclass
class ModelPlacement:
    placement: Placement
    expected_s: float
    label: str


@dataclass
class ClusterState:
    """What the leader knows: profiles, placement per model, who is ready at which version."""

    version: int = 0
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    models: dict[str, ModelPlacement] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)  # device -> placement version it is ready at

    def ready_devices(self) -> tuple[str, ...]:
        return tuple(d for d, v in self.ready.items() if v == self.version and d in self.profiles)

    def holders(self) -> set[str]:
        out: set[str] = set()
        for rp in self.models.values():
            out |= {d for d, w in rp.placement.holdings.items() if w.sub_blocks or w.whole_layers or w.tp_shards or w.embeddings}
        return out

    def placement_ready(self) -> bool:
        return bool(self.models) and self.holders() <= set(self.ready_devices())


class Placements:
    """The leader's static plan and readiness, and the runtime planner over it."""

    def __init__(self, me: str, catalog: Catalog, *, broker: Broker | None = None, replicate_all: bool = False,
                 emit: Callable[[str, dict[str, Any]], None] | None = None,
                 budgets: Mapping[str, TaskBudget] | None = None, margin: float = DEFAULT_MARGIN) -> None:
        """``budgets``: per task, what it may give up for speed (default ``TaskBudget.for_task``;
        random-weight catalogs admit unvalidated variants); ``margin``: how much faster than one
        device a multi-device plan must be predicted to be."""
        self.me = me
        self.catalog = catalog
        self.broker = broker
        self.replicate_all = replicate_all  # every device holds every model: any plan runs (benchmarks)
        self.state = ClusterState()
        self.term = 0
        self._emit = emit or (lambda kind, data: None)
        self._ready_event = asyncio.Event()
        self.budgets = dict(budgets or {})
        self.margin = margin
        self._planners: dict[tuple[tuple[str, ...], tuple[str, ...]], VariantPlanner] = {}

    # --- static planning ---------------------------------------------------------------------------

    def plan(self, profiles: Mapping[str, Mapping[str, Any]], term: int) -> dict[str, dict[str, Any]]:
        """Plan every model for ``profiles`` (device -> planner profile dict); return each device's
        assignment body. Pure apart from updating ``self.state``."""
        devs = {d: profile_from_dict(dict(p), source=f"profile of {d}") for d, p in profiles.items()}
        if self.me not in devs:
            raise ServiceError("internal", f"the leader {self.me} has no profile of its own")
        ordered = [devs[d] for d in sorted(devs)]
        models: dict[str, ModelPlacement] = {}
        version = self.state.version + 1
        for name in self.catalog.names:
            cfg = self.catalog.get(name).config()
            if self.replicate_all:
                holdings = full_replica_weights(self.device_order(devs), cfg.layer_kinds, cfg.nd)
                models[name] = ModelPlacement(Placement(version, holdings), 0.0, "full replicas")
                continue
            sp = plan_static(ordered, cfg, broker=self.broker, coordinator=self.me, version=version)
            models[name] = ModelPlacement(sp.placement, sp.expected_s, sp.label)
        self.term = term
        self.state = ClusterState(version, devs, models, {d: v for d, v in self.state.ready.items() if d in devs})
        self._planners.clear()
        self._ready_event.clear()
        bodies = {
            d: {"models": {name: weights_to_dict(mp.placement.holdings[d]) for name, mp in models.items()
                           if d in mp.placement.holdings}}
            for d in devs
        }
        self._emit("placement", self.summary())
        return bodies

    def device_order(self, devs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The leader first, then the others by id: the device order of baseline plans."""
        names = sorted(devs if devs is not None else self.state.profiles)
        return (self.me, *[d for d in names if d != self.me])

    def mark_ready(self, device: str, version: int) -> None:
        self.state.ready[device] = version
        if self.state.placement_ready():
            self._ready_event.set()
        self._emit("ready", {"device": device, "version": version})

    def mark_not_ready(self, device: str) -> None:
        self.state.ready.pop(device, None)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.state.version,
            "models": {
                name: {"label": mp.label, "expected_ms": round(mp.expected_s * 1e3, 2),
                       "holdings": {d: weights_to_dict(w) for d, w in mp.placement.holdings.items()}}
                for name, mp in self.state.models.items()
            },
            "ready": sorted(self.state.ready_devices()),
        }

    # --- runtime planning -------------------------------------------------------------------------

    def budget(self, task: str) -> TaskBudget:
        budget = self.budgets.get(task)
        if budget is None:
            budget = self.budgets[task] = TaskBudget.for_task(task, unvalidated=not self.catalog.quality_required)
        return budget

    def choose(self, model: str, mode: str, seq_len: int, strategy: str = "adaptive") -> Chosen:
        """The plan for a request: the adaptive planner's best among ready devices and the placed
        variants of ``model``'s family with the leader as coordinator, or a fixed baseline
        (``single``, ``pipeline``, ``tp``, ``bp-fixed``) of ``model`` itself."""
        mp = self.state.models.get(model)
        if mp is None:
            raise ServiceError("busy", "no placement yet: the cluster is still starting")
        ready = tuple(sorted(set(self.state.ready_devices()) | {self.me}))
        if strategy != "adaptive":
            return Chosen(model, self._baseline(model, mp, strategy, ready))
        names = tuple(n for n in self.catalog.variants(model) if n in self.state.models)
        key = (names, ready)
        planner = self._planners.get(key)
        if planner is None:
            profiles = [self.state.profiles[d] for d in sorted(self.state.profiles)]
            variants = [Variant(n, self.catalog.get(n).config(), self.state.models[n].placement,
                                self.catalog.get(n).quality) for n in names]
            planner = self._planners[key] = VariantPlanner(
                variants, profiles, self.budget(self.catalog.get(model).task), broker=self.broker, available=ready,
                coordinator=self.me, margin=self.margin)
        try:
            choice = planner.choose(PlanRequest(mode, seq_len))  # type: ignore[arg-type]
        except PlanningError as exc:
            raise ServiceError("busy", f"no plan fits the ready devices: {exc}") from None
        return Chosen(choice.variant, choice.breakdown.plan, choice.breakdown.total_s, choice.reason)

    def _baseline(self, model: str, mp: ModelPlacement, strategy: str, ready: tuple[str, ...]) -> Plan:
        cfg = self.catalog.get(model).config()
        if strategy not in BASELINES:
            raise ServiceError("bad_request", f"unknown plan strategy {strategy!r}; use adaptive or one of {', '.join(BASELINES)}")
        order = tuple(d for d in self.device_order() if d in ready)
        try:
            plan = baseline_plan(strategy, order, cfg.n_layers, cfg.nd)
            plan.check(cfg.n_layers, cfg.nd, cfg.is_decoupled, cfg.n_heads)
        except PlanError as exc:
            raise ServiceError("bad_request", f"plan {strategy!r} does not fit model {model!r}: {exc}") from None
        if not mp.placement.can_run(plan, cfg.layer_kinds):
            raise ServiceError("unsupported", f"the placement cannot run {plan.describe()}; baselines need full replicas")
        return plan

    def retry_plan(self, model: str, mode: str, seq_len: int, strategy: str, failed: Plan,
                   blamed: set[str]) -> Chosen:
        """A new choice for a failed run: the planner's over the devices still ready (no blamed
        one), else the leader alone when its weights hold the whole model."""
        try:
            chosen = self.choose(model, mode, seq_len, strategy)
            if not blamed & set(chosen.plan.devices) and (blamed or chosen.plan.devices != failed.devices):
                return chosen
        except ServiceError:
            pass
        cfg = self.catalog.get(model).config()
        mp = self.state.models.get(model)
        single = baseline_plan("single", (self.me,), cfg.n_layers, cfg.nd)
        if mp is None or not mp.placement.can_run(single, cfg.layer_kinds):
            raise ServiceError("busy", f"a device of the plan failed ({', '.join(sorted(blamed)) or 'no answer'}) "
                                       f"and the remaining ready devices cannot run {model!r}; try again shortly")
        return Chosen(model, single)
