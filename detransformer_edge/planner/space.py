"""The runtime planner's search space for one placement: which devices may take part, what each
holds, who may coordinate, which coupled replicas and TP shard groups exist; and per-device unit
times for one request shape (computed once, read often by the search)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from detransformer_edge.parallel.plan import DeviceWeights, Placement, Plan
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.cost import CostModel


@dataclass
class SearchSpace:
    cost: CostModel
    devices: list[str]  # available devices that hold weights, in profile order
    holdings: dict[str, DeviceWeights]
    coordinators: list[str]  # may embed and answer
    replicas: list[str]  # hold every coupled layer whole
    tp_groups: list[tuple[str, ...]]  # complete tensor-parallel shard groups, ordered by rank
    _tables: Tables | None = field(default=None, repr=False)

    @classmethod
    def build(cls, placement: Placement, cost: CostModel, names: Sequence[str], available: Sequence[str] | None,
              coordinator: str | None) -> SearchSpace:
        avail = set(names if available is None else available)
        devices = [d for d in names if d in avail and d in placement.holdings]
        holdings = {d: placement.holdings[d] for d in devices}
        coupled = {i for i, k in enumerate(cost.layer_kinds) if k == "coupled"}
        coordinators = [d for d in devices if holdings[d].embeddings and coordinator in (None, d)]
        replicas = [d for d in devices if coupled <= set(holdings[d].whole_layers)]
        ranks: dict[int, dict[int, str]] = {}
        for d in devices:
            for rank, k in holdings[d].tp_shards:
                ranks.setdefault(k, {}).setdefault(rank, d)
        groups = [tuple(r[i] for i in range(k)) for k, r in sorted(ranks.items()) if k > 1 and len(r) == k]
        return cls(cost, devices, holdings, coordinators, replicas, groups)

    @property
    def nd(self) -> int:
        return self.cost.nd

    def index(self, device: str) -> int:
        return self.devices.index(device)

    def can_run(self, plan: Plan) -> bool:
        for d in plan.devices:
            held = self.holdings.get(d)
            if held is None or not held.covers(self.cost.required(plan, d)):
                return False
        return True

    def tables(self, work: Workload) -> Tables:
        """Per-device unit times for one workload (cached: the search reads them often)."""
        if self._tables is None or self._tables.work != work:
            self._tables = Tables(self.cost, work, self.devices)
        return self._tables


class Tables:
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
