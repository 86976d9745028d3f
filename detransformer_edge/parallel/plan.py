"""Parallel plans as data: which device runs what for one request.

A :class:`Plan` is pure, frozen, validated on construction and serialisable as plain data
(``to_dict`` / ``from_dict``; the run control message carries it as JSON). Checks that need the model's shape (layer count, number of
sub-blocks) live in :meth:`Plan.check`, which the executor and the planner call.

Modes
-----
``single``    one device runs the whole model.
``pipeline``  ``stages`` give each device a contiguous range of layers, in order.
``tp``        Megatron tensor parallelism of every layer over all ``devices`` (column-parallel
              Q/K/V and FFN-up, row-parallel output and FFN-down, an all-reduce after each);
              standard (non-decoupled) models only.
``block``     DeTransformer block parallelism: sub-block ``j`` of every decoupled layer runs on
              ``sub_block_owner[j]`` (any mapping, uneven allowed); each coupled layer uses
              ``coupled``:
                * ``allgather`` every owner broadcasts its slices, all compute the layer (BP+AllGather);
                * ``gather``    owners send slices to ``coupled_devices[0]``, which computes the
                  layer and scatters the slices back (BP+Gather);
                * ``tp``        the layer runs tensor-parallel over ``coupled_devices`` (BP+TP).

``devices[0]`` is the coordinator: it holds the embeddings and output head, receives the request's
tokens and produces its result. Activations cross the network in ``wire`` precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from detransformer_edge.errors import DetransformerError
from detransformer_edge.transport.wire import WIRE_DTYPES as _WIRE_NUMPY_TYPES
from detransformer_edge.transport.wire import WireDtype

Mode = Literal["single", "pipeline", "tp", "block"]
CoupledStrategy = Literal["allgather", "gather", "tp"]

MODES: tuple[str, ...] = ("single", "pipeline", "tp", "block")
COUPLED_STRATEGIES: tuple[str, ...] = ("allgather", "gather", "tp")
WIRE_DTYPES: tuple[str, ...] = tuple(_WIRE_NUMPY_TYPES)  # transport.wire: the one vocabulary


class PlanError(DetransformerError, ValueError):
    """A plan is malformed or does not fit the model it is meant for."""


@dataclass(frozen=True)
class Stage:
    """Pipeline stage: ``device`` runs layers ``start`` (inclusive) to ``end`` (exclusive)."""

    device: str
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    mode: Mode
    devices: tuple[str, ...]
    wire: WireDtype = "float32"
    stages: tuple[Stage, ...] = ()
    sub_block_owner: tuple[str, ...] = ()
    coupled: CoupledStrategy = "allgather"
    coupled_devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so plans stay hashable.
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "sub_block_owner", tuple(self.sub_block_owner))
        object.__setattr__(self, "coupled_devices", tuple(self.coupled_devices))
        object.__setattr__(
            self, "stages", tuple(s if isinstance(s, Stage) else Stage(**s) for s in self.stages)
        )
        if self.mode not in MODES:
            raise PlanError(f"unknown plan mode {self.mode!r}; expected one of {MODES}")
        if self.wire not in WIRE_DTYPES:
            raise PlanError(f"unknown wire dtype {self.wire!r}; expected one of {WIRE_DTYPES}")
        if not self.devices or not all(isinstance(d, str) and d for d in self.devices):
            raise PlanError("a plan needs at least one device id (non-empty strings)")
        if len(set(self.devices)) != len(self.devices):
            raise PlanError(f"duplicate device in plan: {self.devices}")
        known = set(self.devices)
        if self.mode == "single" and len(self.devices) != 1:
            raise PlanError("a single-device plan names exactly one device")
        if self.mode == "pipeline":
            if [s.device for s in self.stages] != list(self.devices):
                raise PlanError("pipeline stages must name the plan's devices, in order")
            for a, b in zip(self.stages, self.stages[1:]):
                if a.end != b.start:
                    raise PlanError(f"pipeline stages must be contiguous: {a} then {b}")
            if any(s.start >= s.end or s.start < 0 for s in self.stages):
                raise PlanError("every pipeline stage needs a non-empty layer range")
            if self.stages[0].start != 0:
                raise PlanError("the first pipeline stage must start at layer 0")
        elif self.stages:
            raise PlanError(f"stages are only meaningful in pipeline mode, not {self.mode}")
        if self.coupled not in COUPLED_STRATEGIES:
            raise PlanError(f"unknown coupled strategy {self.coupled!r}; expected {COUPLED_STRATEGIES}")
        if self.mode == "block":
            if not self.sub_block_owner:
                raise PlanError("a block plan must say which device owns each sub-block")
            unknown = set(self.sub_block_owner) - known
            if unknown:
                raise PlanError(f"sub-block owners not in the plan's devices: {sorted(unknown)}")
            if self.devices[0] not in self.sub_block_owner:
                raise PlanError("the coordinator (devices[0]) must own at least one sub-block")
            if self.coupled not in COUPLED_STRATEGIES:
                raise PlanError(f"unknown coupled strategy {self.coupled!r}; expected {COUPLED_STRATEGIES}")
            if self.coupled == "allgather" and self.coupled_devices:
                raise PlanError("allgather replicates the coupled layer on every owner; coupled_devices must be empty")
            if self.coupled == "gather" and len(self.coupled_devices) != 1:
                raise PlanError("gather needs exactly one coupled device")
            if self.coupled == "tp" and len(self.coupled_devices) < 1:
                raise PlanError("tp needs at least one coupled device")
            if len(set(self.coupled_devices)) != len(self.coupled_devices):
                raise PlanError(f"duplicate coupled device: {self.coupled_devices}")
            unknown = set(self.coupled_devices) - known
            if unknown:
                raise PlanError(f"coupled devices not in the plan's devices: {sorted(unknown)}")
            unused = known - set(self.sub_block_owner) - set(self.coupled_devices)
            if unused:
                raise PlanError(f"devices with nothing to do in this plan: {sorted(unused)}")
        elif self.sub_block_owner or self.coupled_devices:
            raise PlanError(f"sub-block owners and coupled devices are only meaningful in block mode, not {self.mode}")

    # --- model-dependent checks -------------------------------------------------------------

    def check(self, n_layers: int, nd: int, decoupled: bool, n_heads: int | None = None) -> None:
        """Raise :class:`PlanError` if the plan cannot run on a model of this shape."""
        if self.mode == "pipeline" and self.stages[-1].end != n_layers:
            raise PlanError(f"pipeline stages cover layers 0..{self.stages[-1].end}, the model has {n_layers}")
        if self.mode == "block":
            if not decoupled:
                raise PlanError("block parallelism needs a decoupled model (set nd and nb)")
            if len(self.sub_block_owner) != nd:
                raise PlanError(f"plan maps {len(self.sub_block_owner)} sub-blocks, the model has nd={nd}")
        if self.mode == "tp" and decoupled:
            raise PlanError("tensor parallelism over all layers is for standard models; use block mode with coupled='tp'")
        k = len(self.devices) if self.mode == "tp" else len(self.coupled_devices) if self.coupled == "tp" else 0
        if k and n_heads is not None and k > n_heads:
            # Heads are split in contiguous, possibly uneven ranges: at most one device per head.
            raise PlanError(f"tensor parallelism over {k} devices needs at least {k} heads, the model has {n_heads}")

    # --- derived views ------------------------------------------------------------------------

    @property
    def coordinator(self) -> str:
        return self.devices[0]

    def sub_blocks_of(self, device: str) -> tuple[int, ...]:
        return tuple(j for j, owner in enumerate(self.sub_block_owner) if owner == device)

    @property
    def owners(self) -> tuple[str, ...]:
        """Devices that own sub-blocks, in plan order."""
        return tuple(d for d in self.devices if d in self.sub_block_owner)

    def describe(self) -> str:
        """One line for logs and the dashboard."""
        if self.mode == "single":
            return f"single on {self.devices[0]} ({self.wire})"
        if self.mode == "pipeline":
            parts = ", ".join(f"{s.device}[{s.start}:{s.end}]" for s in self.stages)
            return f"pipeline {parts} ({self.wire})"
        if self.mode == "tp":
            return f"tp over {','.join(self.devices)} ({self.wire})"
        counts = ", ".join(f"{d}:{len(self.sub_blocks_of(d))}" for d in self.owners)
        coupled = self.coupled + (f"@{','.join(self.coupled_devices)}" if self.coupled_devices else "")
        return f"block {counts} coupled={coupled} ({self.wire})"

    # --- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        d["stages"] = [asdict(s) for s in self.stages]
        d["sub_block_owner"] = list(self.sub_block_owner)
        d["coupled_devices"] = list(self.coupled_devices)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a mapping, got {type(data).__name__}")
        allowed = {"mode", "devices", "wire", "stages", "sub_block_owner", "coupled", "coupled_devices"}
        extra = set(data) - allowed
        if extra:
            raise PlanError(f"unknown plan fields: {sorted(map(repr, extra))}")
        if "mode" not in data or "devices" not in data:
            raise PlanError("a plan needs 'mode' and 'devices'")
        for key in ("devices", "sub_block_owner", "coupled_devices", "stages"):
            if key in data and not isinstance(data[key], (list, tuple)):
                raise PlanError(f"plan field {key!r} must be a list")
        try:
            stages = tuple(Stage(**s) if isinstance(s, Mapping) else s for s in data.get("stages", ()))
            for s in stages:
                if not (isinstance(s, Stage) and isinstance(s.device, str)
                        and all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 31
                                for v in (s.start, s.end))):
                    raise PlanError(f"bad pipeline stage {s!r}")
            return cls(**{**data, "stages": stages})
        except TypeError as exc:
            raise PlanError(f"bad plan: {exc}") from None


# --- placement: which weights each device holds ----------------------------------------------


@dataclass(frozen=True)
class DeviceWeights:
    """The weights one device holds (or must hold to run a plan)."""

    embeddings: bool = False  # token embeddings and output head (the coordinator)
    sub_blocks: tuple[int, ...] = ()  # sub-block indices, for every decoupled layer
    whole_layers: tuple[int, ...] = ()  # whole layers: a coupled layer, or every sub-block of a decoupled one
    tp_shards: tuple[tuple[int, int], ...] = ()  # (rank, k): Megatron shard of every coupled layer

    def covers(self, need: DeviceWeights) -> bool:
        return (
            (self.embeddings or not need.embeddings)
            and set(need.sub_blocks) <= set(self.sub_blocks)
            and set(need.whole_layers) <= set(self.whole_layers)
            and set(need.tp_shards) <= set(self.tp_shards)
        )


@dataclass(frozen=True)
class Placement:
    """Static placement: a version number and what every device holds."""

    version: int
    holdings: Mapping[str, DeviceWeights] = field(default_factory=dict)

    def can_run(self, plan: Plan, layer_kinds: tuple[str, ...]) -> bool:
        return all(
            self.holdings.get(d, DeviceWeights()).covers(required_weights(plan, layer_kinds, d))
            for d in plan.devices
        )


def required_weights(plan: Plan, layer_kinds: tuple[str, ...], device: str) -> DeviceWeights:
    """What ``device`` must hold to play its part in ``plan`` on a model with ``layer_kinds``."""
    n = len(layer_kinds)
    coupled_idx = tuple(i for i, k in enumerate(layer_kinds) if k == "coupled")
    emb = device == plan.coordinator
    if device not in plan.devices:
        return DeviceWeights()
    if plan.mode == "single":
        return DeviceWeights(True, (), tuple(range(n)))
    if plan.mode == "pipeline":
        stage = next(s for s in plan.stages if s.device == device)
        return DeviceWeights(emb, (), tuple(range(stage.start, stage.end)))
    if plan.mode == "tp":
        rank = plan.devices.index(device)
        return DeviceWeights(emb, (), (), ((rank, len(plan.devices)),))
    subs = plan.sub_blocks_of(device)
    if plan.coupled == "allgather":
        return DeviceWeights(emb, subs, coupled_idx if subs else ())
    if plan.coupled == "gather":
        return DeviceWeights(emb, subs, coupled_idx if device == plan.coupled_devices[0] else ())
    if device in plan.coupled_devices:
        rank = plan.coupled_devices.index(device)
        return DeviceWeights(emb, subs, (), ((rank, len(plan.coupled_devices)),))
    return DeviceWeights(emb, subs)


# --- the fixed plans users would otherwise run (benchmark baselines) -------------------------

BASELINES: tuple[str, ...] = ("single", "pipeline", "tp", "bp-fixed")


def baseline_plan(strategy: str, devices: tuple[str, ...], n_layers: int, nd: int) -> Plan:
    """A fixed plan over ``devices`` (``devices[0]`` coordinates):

    * ``single``: the coordinator alone;
    * ``pipeline``: contiguous, equal layer ranges in device order;
    * ``tp``: Megatron tensor parallelism over all devices (standard models);
    * ``bp-fixed``: the paper's fixed block parallelism: sub-blocks dealt round-robin (equal
      split), BP+AllGather coupled layers, float32 activations.
    """
    if strategy not in BASELINES:
        raise PlanError(f"unknown baseline {strategy!r}; expected one of {BASELINES}")
    if strategy == "single":
        return Plan("single", devices[:1])
    if strategy == "pipeline":
        n = min(len(devices), n_layers)
        cuts = [round(k * n_layers / n) for k in range(n + 1)]
        return Plan("pipeline", devices[:n], stages=tuple(Stage(devices[k], cuts[k], cuts[k + 1]) for k in range(n)))
    if strategy == "tp":
        return Plan("tp", devices)
    used = devices[: min(len(devices), nd)]
    return Plan("block", used, "float32", sub_block_owner=tuple(used[j % len(used)] for j in range(nd)))


def full_replica_weights(devices: tuple[str, ...], layer_kinds: tuple[str, ...], nd: int) -> dict[str, DeviceWeights]:
    """Every device holds everything (and its TP shard for ``devices`` order): any plan runs.
    Alone, a device holds no TP shard: a shard of one is the whole model a second time (a leader
    that started before the others was OOM-killed holding three models twice)."""
    whole = tuple(range(len(layer_kinds)))
    k = len(devices)
    return {
        d: DeviceWeights(True, tuple(range(nd)), whole, ((rank, k),) if k > 1 else ())
        for rank, d in enumerate(devices)
    }
