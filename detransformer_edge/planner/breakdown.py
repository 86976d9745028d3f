"""What the cost model predicts, as values: a request, the steps of a plan, per-device costs and
the whole :class:`Breakdown`; and the planner's error type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.plan import Plan
from detransformer_edge.planner import analysis
from detransformer_edge.planner.analysis import Mode, Workload


class PlanningError(DetransformerError):
    """The planner cannot produce what was asked (unknown device, plan outside the placement...)."""


@dataclass(frozen=True)
class Request:
    """What the runtime planner plans for: ``encode``/``prefill`` ``seq_len`` tokens, or one
    ``decode`` step after ``seq_len`` tokens of context."""

    mode: Mode
    seq_len: int
    batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in analysis.MODES:
            raise PlanningError(f"request mode must be one of {', '.join(analysis.MODES)}, got {self.mode!r}")
        if self.seq_len <= 0 or self.batch <= 0:
            raise PlanningError(f"request needs seq_len > 0 and batch > 0, got {self.seq_len}, {self.batch}")

    @cached_property
    def workload(self) -> Workload:
        return Workload.for_request(self.mode, self.seq_len, self.batch)


@dataclass(frozen=True)
class Step:
    """One step of a plan, repeated ``count`` times (e.g. once per block)."""

    name: str
    kind: Literal["compute", "comm"]
    seconds: float  # one occurrence
    count: int = 1
    messages: int = 0  # publishes, one occurrence
    bytes: int = 0  # bytes uploaded by all senders, one occurrence

    @property
    def total_s(self) -> float:
        return self.seconds * self.count


@dataclass(frozen=True)
class DeviceCost:
    device: str
    compute_s: float  # busy computing, whole request
    upload_bytes: int
    download_bytes: int
    memory_bytes: int  # weights this plan needs there + KV cache + activations + runtime
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.budget_bytes


@dataclass(frozen=True)
class Breakdown:
    """Predicted cost of one plan for one request."""

    plan: Plan
    request: Request
    steps: tuple[Step, ...]
    devices: tuple[DeviceCost, ...]
    total_s: float = field(init=False)
    compute_s: float = field(init=False)
    comm_s: float = field(init=False)

    def __post_init__(self) -> None:
        compute = math.fsum(s.total_s for s in self.steps if s.kind == "compute")
        comm = math.fsum(s.total_s for s in self.steps if s.kind == "comm")
        object.__setattr__(self, "compute_s", compute)
        object.__setattr__(self, "comm_s", comm)
        object.__setattr__(self, "total_s", compute + comm)

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def device(self, name: str) -> DeviceCost:
        for d in self.devices:
            if d.device == name:
                return d
        raise PlanningError(f"device {name!r} is not part of plan {self.plan.describe()}")

    def messages(self) -> int:
        return sum(s.messages * s.count for s in self.steps)
