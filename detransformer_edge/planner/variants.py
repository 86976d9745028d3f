"""Choosing across the model variants a home holds: the standard model and its decoupled
variants (N_d, N_b, sliced or full-width heads), each with its own placement.

A request's task sets its budget (``TaskBudget``): the wire dtypes its activations may cross the
network in (the measured table of ``planner/accuracy.py``) and the quality a decoupled variant
must have shown after conversion (``Quality``: a decoder's held-out perplexity ratio to the
teacher, an encoder's embedding cosine). A variant outside the budget is not considered while
the family's standard model is there to fall back on. Every admitted variant's runtime planner
proposes its best one-device plan and its best multi-device plan; a multi-device plan is chosen
only when it is predicted to beat the best one-device plan of any variant by ``margin`` (the
cost model's residual on multi-device plans is larger than on one device: docs/PLANNER.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from detransformer_edge.model.config import ModelConfig
from detransformer_edge.parallel.plan import Placement
from detransformer_edge.planner.accuracy import ALLOWED_WIRE_DTYPES
from detransformer_edge.planner.breakdown import Breakdown, PlanningError, Request
from detransformer_edge.planner.network import Broker
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.runtime import NoFeasiblePlanError, RuntimePlanner
from detransformer_edge.planner.terms import CostTerms
from detransformer_edge.transport.wire import WireDtype

DEFAULT_MARGIN = 0.10  # a multi-device plan must be predicted >= 10 % faster than one device
DEFAULT_MAX_PPL_RATIO = 1.10  # decoders: held-out perplexity at most 1.10x the teacher's
DEFAULT_MIN_COSINE = 0.95  # encoders: embedding cosine to the teacher (docs/ACCURACY.md's target)


@dataclass(frozen=True)
class Quality:
    """A converted model's validated quality, as conversion measured it (``quality.json``)."""

    metric: Literal["ppl_ratio", "cosine"]
    value: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.metric not in ("ppl_ratio", "cosine") or not self.value > 0:
            raise PlanningError(f"quality needs metric ppl_ratio or cosine and a positive value, got {self}")

    def describe(self) -> str:
        if self.metric == "ppl_ratio":
            return f"held-out perplexity {self.value:.2f}x the teacher's"
        return f"embedding cosine {self.value:.3f} to the teacher"


@dataclass(frozen=True)
class TaskBudget:
    """What a task may give up for speed. ``unvalidated``: admit decoupled variants that have no
    quality figure (random-weight catalogs measure latency only)."""

    wires: tuple[WireDtype, ...]
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO
    min_cosine: float = DEFAULT_MIN_COSINE
    unvalidated: bool = False

    def __post_init__(self) -> None:
        if not self.wires:
            raise PlanningError("a task budget must allow at least one wire dtype (float32)")
        if not self.max_ppl_ratio >= 1.0 or not 0.0 < self.min_cosine <= 1.0:
            raise PlanningError(f"a task budget needs max_ppl_ratio >= 1 and 0 < min_cosine <= 1, got {self}")

    @classmethod
    def for_task(cls, task: str, **overrides: object) -> TaskBudget:
        """The task's measured wire dtypes (``planner/accuracy.py``) and the default quality bars."""
        try:
            wires = ALLOWED_WIRE_DTYPES[task]
        except KeyError:
            raise PlanningError(f"no accuracy budget for task {task!r}; known: {', '.join(ALLOWED_WIRE_DTYPES)}") from None
        return replace(cls(wires), **overrides)  # type: ignore[arg-type]

    def excludes(self, variant: Variant) -> str | None:
        """Why ``variant`` is outside this budget, or None."""
        if not variant.cfg.is_decoupled:
            return None  # the standard model is the teacher itself
        q = variant.quality
        if q is None:
            return None if self.unvalidated else "no validated quality figure (run `convert`, which measures it)"
        if q.metric == "ppl_ratio" and q.value > self.max_ppl_ratio:
            return f"{q.describe()} > the budget's {self.max_ppl_ratio:.2f}x"
        if q.metric == "cosine" and q.value < self.min_cosine:
            return f"{q.describe()} < the budget's {self.min_cosine:.3f}"
        return None


@dataclass(frozen=True)
class Variant:
    """One served model of a family, where its weights are, and its validated quality."""

    name: str
    cfg: ModelConfig
    placement: Placement
    quality: Quality | None = None

    def layout(self) -> str:
        c = self.cfg
        if not c.is_decoupled:
            return "standard"
        heads = "sliced" if c.sub_attn == "slice" else "full-width"
        return f"decoupled N_d={c.nd} N_b={c.nb}, {heads}"


@dataclass(frozen=True)
class Considered:
    """One variant's part in a decision: its best plans, or why it was left out."""

    variant: str
    layout: str
    single: Breakdown | None = None
    multi: Breakdown | None = None
    excluded: str | None = None


@dataclass(frozen=True)
class VariantChoice:
    variant: str
    breakdown: Breakdown
    reason: str
    considered: tuple[Considered, ...] = field(default=())


class VariantPlanner:
    """Runtime planning across a family's variants; build once per placement/membership."""

    def __init__(self, variants: Sequence[Variant], profiles: Sequence[DeviceProfile], budget: TaskBudget, *,
                 broker: Broker | None = None, available: Sequence[str] | None = None,
                 coordinator: str | None = None, margin: float = DEFAULT_MARGIN, terms: CostTerms | None = None):
        if not variants:
            raise PlanningError("no model variant to plan for")
        if not 0.0 <= margin < 1.0:
            raise PlanningError(f"margin must be in [0, 1), got {margin!r}")
        self.budget = budget
        self.margin = margin
        has_standard = any(not v.cfg.is_decoupled for v in variants)
        self.excluded: dict[str, str] = {}
        self.planners: dict[str, RuntimePlanner] = {}
        self.variants = {v.name: v for v in variants}
        for v in variants:
            why = budget.excludes(v) if has_standard else None  # no fallback: the family is what it is
            if why is not None:
                self.excluded[v.name] = why
                continue
            self.planners[v.name] = RuntimePlanner(v.placement, profiles, v.cfg, broker, budget.wires, available,
                                                   coordinator, terms=terms)
        self._cache: dict[Request, VariantChoice] = {}

    def choose(self, request: Request) -> VariantChoice:
        cached = self._cache.get(request)
        if cached is None:
            cached = self._cache[request] = self._choose(request)
        return cached

    def _choose(self, request: Request) -> VariantChoice:
        considered = [Considered(name, self.variants[name].layout(), excluded=why) for name, why in self.excluded.items()]
        singles: list[tuple[str, Breakdown]] = []
        multis: list[tuple[str, Breakdown]] = []
        for name, planner in self.planners.items():
            single = _best(planner, request, multi=False)
            multi = _best(planner, request, multi=True)
            considered.append(Considered(name, self.variants[name].layout(), single, multi))
            if single is not None:
                singles.append((name, single))
            if multi is not None:
                multis.append((name, multi))
        if not singles and not multis:
            whys = "; ".join(f"{c.variant}: {c.excluded}" for c in considered if c.excluded)
            raise NoFeasiblePlanError(f"no variant of {', '.join(self.variants)} can run {request.mode} of "
                                      f"{request.seq_len} tokens on the available devices" + (f" ({whys})" if whys else ""))
        order = {n: i for i, n in enumerate(self.variants)}
        best_single = min(singles, key=lambda nb: (nb[1].total_s, order[nb[0]])) if singles else None
        best_multi = min(multis, key=lambda nb: (nb[1].total_s, order[nb[0]])) if multis else None
        done = tuple(sorted(considered, key=lambda c: order[c.variant]))
        if best_single is None:
            assert best_multi is not None
            return VariantChoice(*best_multi, "no single device can run it: the best multi-device plan", done)
        if best_multi is None:
            return VariantChoice(*best_single, "no multi-device plan fits: one device", done)
        gain = 1.0 - best_multi[1].total_s / best_single[1].total_s
        if gain > self.margin:
            why = (f"{gain:.0%} faster than one device ({best_single[0]}, {best_single[1].total_s * 1e3:.0f} ms), "
                   f"more than the {self.margin:.0%} margin")
            return VariantChoice(*best_multi, why, done)
        why = (f"the best multi-device plan ({best_multi[0]}: {best_multi[1].plan.describe()}, "
               f"{best_multi[1].total_s * 1e3:.0f} ms) is only {gain:.0%} faster, within the {self.margin:.0%} margin")
        return VariantChoice(*best_single, why, done)


def _best(planner: RuntimePlanner, request: Request, multi: bool) -> Breakdown | None:
    try:
        return planner.ranked(request, 1, multi=multi)[0]
    except NoFeasiblePlanError:
        return None


def variants_summary(choice: VariantChoice) -> list[str]:
    """One line per variant for ``plan --explain`` and logs."""
    lines = []
    for c in choice.considered:
        if c.excluded is not None:
            lines.append(f"{c.variant} ({c.layout}): not considered: {c.excluded}")
            continue
        parts = []
        for label, bd in (("one device", c.single), ("several", c.multi)):
            parts.append(f"{label} {bd.total_s * 1e3:.0f} ms ({bd.plan.describe()})" if bd else f"{label}: none fits")
        mark = " <- chosen" if c.variant == choice.variant else ""
        lines.append(f"{c.variant} ({c.layout}): " + "; ".join(parts) + mark)
    return lines


def budgets_for(tasks: Mapping[str, object], unvalidated: bool = False, **overrides: object) -> dict[str, TaskBudget]:
    """A budget per task name (``TaskBudget.for_task`` with the same overrides)."""
    return {t: TaskBudget.for_task(t, unvalidated=unvalidated, **overrides) for t in tasks}
