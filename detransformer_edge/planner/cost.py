"""Cost model: predicted latency and memory of a :class:`Plan` on a cluster of device profiles.

Compute: every piece of work is a roofline, ``max(flops / rate, bytes / mem_bw)``, evaluated
separately for GEMMs (``gflops``) and attention (``attn_gflops``); devices under a CPU quota or
sharing a machine go through ``planner/compute.py``. Communication: phases of
messages through the MQTT broker (``planner/network.py``). A plan is walked step by step
(``planner/walk.py``); memory is what each device holds plus what the request needs there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from detransformer_edge.model.config import ModelConfig
from detransformer_edge.parallel.plan import DeviceWeights, Plan, required_weights
from detransformer_edge.planner import analysis
from detransformer_edge.planner.analysis import OpCost, Workload
from detransformer_edge.planner.breakdown import Breakdown, DeviceCost, PlanningError, Request, Step
from detransformer_edge.planner.compute import CpuShares
from detransformer_edge.planner.network import (
    DEFAULT_RTT_MS,
    ENVELOPE_BYTES,
    INT8_SCALE_BYTES,
    Broker,
    Message,
    Network,
    Phase,
    wire_bytes,
)
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.terms import FITTED, CostTerms
from detransformer_edge.planner.walk import Accumulator, Total, walk
from detransformer_edge.transport.wire import WireDtype

PROCESS_OVERHEAD_MB = 150  # Python + torch CPU runtime resident before any weight is loaded

__all__ = [
    "DEFAULT_RTT_MS", "ENVELOPE_BYTES", "INT8_SCALE_BYTES", "PROCESS_OVERHEAD_MB", "Breakdown", "Broker",
    "CostModel", "DeviceCost", "Message", "PlanningError", "Request", "Step",
]


class CostModel:
    """Predicts :class:`Breakdown` s for plans of one model on one set of devices.

    Per-device times of the unit pieces (a sub-block, a coupled layer, a TP shard) are cached per
    workload, so evaluating many candidate plans for one request is cheap.
    """

    def __init__(self, cfg: ModelConfig, profiles: Sequence[DeviceProfile], broker: Broker | None = None,
                 terms: CostTerms | None = None):
        self.cfg = cfg
        self.profiles: dict[str, DeviceProfile] = {p.name: p for p in profiles}
        if len(self.profiles) != len(profiles):
            raise PlanningError("device profiles must have unique names")
        self.broker = broker or Broker()
        self.terms = FITTED if terms is None else terms
        self.network = Network(self.profiles, self.broker, self.terms)
        self.shares = CpuShares(self.profiles)
        self.layer_kinds: tuple[str, ...] = tuple(cfg.layer_kinds)
        self.n_dec, self.n_cpl = analysis.layer_counts(cfg)
        self.nb = max(1, self.n_cpl)
        self.nd: int = cfg.nd
        self.decoupled = self.n_dec > 0
        self.is_decoder = cfg.family == "decoder"
        self.d_model: int = cfg.d_model
        self.d_sub: int = cfg.d_sub
        self._units: dict[tuple[Workload, str, int], OpCost] = {}
        self._times: dict[tuple[Workload, str, int, str], float] = {}

    # -- compute ---------------------------------------------------------------------------------
    def unit(self, work: Workload, piece: str, shard: int = 1) -> OpCost:
        key = (work, piece, shard)
        cost = self._units.get(key)
        if cost is None:
            cfg = self.cfg
            if piece == "sub":
                cost = analysis.subblock_cost(cfg, work)
            elif piece == "layer":
                cost = analysis.coupled_layer_cost(cfg, work, shard)
            elif piece == "embed":
                cost = analysis.embedding_cost(cfg, work)
            elif piece == "head":
                cost = analysis.head_cost(cfg, work)
            else:
                raise PlanningError(f"unknown unit {piece!r}")
            self._units[key] = cost
        return cost

    def time(self, device: str, work: Workload, piece: str, shard: int = 1) -> float:
        """Seconds ``device`` needs for one unit piece (roofline per GEMM/attention part)."""
        key = (work, piece, shard, device)
        t = self._times.get(key)
        if t is None:
            p = self._profile(device)
            c = self.unit(work, piece, shard)
            bw = p.mem_bytes_per_s
            t = max(c.gemm_flops / p.flops_per_s, c.gemm_bytes / bw) + max(
                c.attn_flops / p.attn_flops_per_s, c.attn_bytes / bw
            )
            self._times[key] = t
        return t

    def request_s(self, device: str) -> float:
        """The coordinator's own work on a request, outside the model (``CostTerms``)."""
        return self.terms.request_cpu_s(self._profile(device).core_gflops)

    def _profile(self, device: str) -> DeviceProfile:
        try:
            return self.profiles[device]
        except KeyError:
            raise PlanningError(f"no profile for device {device!r}; known: {', '.join(self.profiles)}") from None

    # -- communication ---------------------------------------------------------------------------
    def phase(self, messages: Sequence[Message]) -> Phase:
        return self.network.phase(messages)

    def phase_time(self, messages: Sequence[Message]) -> tuple[float, dict[str, float], dict[str, float], int]:
        """Seconds for messages sent together; also bytes up/down per device and publishes."""
        p = self.network.phase(messages)
        return p.seconds, dict(p.up), dict(p.down), p.publishes

    def rtt_s(self, device: str) -> float:
        """Round trip device -> broker -> device, seconds (measured, or by link kind)."""
        self._profile(device)
        return self.network.rtt_s(device)

    @staticmethod
    def wire_bytes(rows: int, width: int, wire: WireDtype) -> float:
        """Payload of one message carrying a (rows, width) activation in ``wire`` precision."""
        return wire_bytes(rows, width, wire)

    # -- memory ----------------------------------------------------------------------------------
    def _pieces(self, held: DeviceWeights) -> tuple[int, int]:
        """(sub-block instances, whole coupled layers) held; a whole decoupled layer counts as
        all its sub-blocks, and a sub-block held both ways counts once."""
        whole = set(held.whole_layers)
        n_subs = 0
        n_layers = 0
        for i, kind in enumerate(self.layer_kinds):
            if kind == "coupled":
                n_layers += i in whole
            else:
                n_subs += self.nd if i in whole else len(held.sub_blocks)
        return n_subs, n_layers

    def weights_bytes(self, held: DeviceWeights) -> int:
        cfg = self.cfg
        n_subs, n_layers = self._pieces(held)
        layer = analysis.coupled_layer_params(cfg)
        params = n_subs * analysis.subblock_params(cfg) + n_layers * layer
        if held.embeddings:
            params += analysis.embedding_params(cfg)
        for _rank, k in held.tp_shards:
            params += self.n_cpl * layer // k
        return params * analysis.WEIGHT_BYTES

    def kv_bytes(self, held: DeviceWeights, work: Workload) -> int:
        cfg = self.cfg
        n_subs, n_layers = self._pieces(held)
        kv = n_subs * analysis.subblock_kv_bytes(cfg, work.context, work.batch)
        kv += n_layers * analysis.coupled_kv_bytes(cfg, work.context, work.batch)
        for _rank, k in held.tp_shards:
            kv += self.n_cpl * analysis.coupled_kv_bytes(cfg, work.context, work.batch, k)
        return kv

    def memory_bytes(self, held: DeviceWeights, work: Workload | None) -> int:
        """Resident bytes of a device holding ``held`` while running ``work`` (None: idle)."""
        total = self.weights_bytes(held) + PROCESS_OVERHEAD_MB * 1024 * 1024
        if work is not None:
            total += self.kv_bytes(held, work) + analysis.activation_peak_bytes(self.cfg, work)
        return total

    def required(self, plan: Plan, device: str) -> DeviceWeights:
        """Weights ``device`` needs for ``plan`` (``parallel.plan.required_weights``)."""
        return required_weights(plan, self.layer_kinds, device)

    def _plan_memory(
        self, plan: Plan, device: str, work: Workload, resident: Mapping[str, DeviceWeights] | None
    ) -> int:
        need = self.required(plan, device)
        held = need if resident is None else resident.get(device, need)
        base = self.weights_bytes(held) + PROCESS_OVERHEAD_MB * 1024 * 1024
        return base + self.kv_bytes(need, work) + analysis.activation_peak_bytes(self.cfg, work)

    # -- plans -----------------------------------------------------------------------------------
    def predict(
        self, plan: Plan, request: Request, resident: Mapping[str, DeviceWeights] | None = None
    ) -> Breakdown:
        """Predicted cost of ``plan``. ``resident``: what each device actually holds (a
        placement's holdings, spares included) for the memory figures; default: only what the
        plan needs."""
        for d in plan.devices:
            self._profile(d)
        work = request.workload
        acc = Accumulator(self, plan.devices)
        walk(self, plan, work, acc)
        devices = tuple(
            DeviceCost(
                d,
                acc.compute[d],
                int(acc.up[d]),
                int(acc.down[d]),
                self._plan_memory(plan, d, work, resident),
                self.profiles[d].ram_bytes,
            )
            for d in plan.devices
        )
        return Breakdown(plan, request, tuple(acc.steps), devices)

    def latency(self, plan: Plan, request: Request) -> float:
        """Predicted seconds of ``plan``: the same walk as :meth:`predict`, totals only (fast,
        for searching many candidates; no memory check)."""
        acc = Total(self, plan.devices)
        walk(self, plan, request.workload, acc)
        return acc.total

