"""The cost model's fitted constants: what a request costs beyond FLOPs and wire bytes.

Fitted on the committed quiet-host benchmark results by ``python -m detransformer_edge.bench.fit``
(docs/PLANNER.md, "The fit"); a new results file refits them with the same command. Device CPU
terms are given for a reference core of ``REF_CORE_GFLOPS`` and scale with a device's
``core_gflops`` (single-threaded Python: message codecs, the MQTT client, the request path).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from detransformer_edge.planner.breakdown import PlanningError

REF_CORE_GFLOPS = 10.0  # a Raspberry Pi 5 core runs ~12 GFLOPS at transformer shapes


@dataclass(frozen=True)
class CostTerms:
    """``msg_cpu_ms``: device CPU per message it sends or receives (serialisation, the MQTT
    client, asyncio), ms on the reference core; ``msg_cpu_ms_per_mb``: the same per MB of payload
    (copies, casts, the codec); ``request_cpu_ms``: the coordinator's work per request outside the
    model (parse, tokenise, plan, reply); ``control_bytes``: the signed run-control message that
    starts a multi-device run on every other device of its plan."""

    msg_cpu_ms: float = 0.0
    msg_cpu_ms_per_mb: float = 0.0
    request_cpu_ms: float = 0.0
    control_bytes: int = 1500

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0:
                raise PlanningError(f"cost term {f.name} must be >= 0, got {value!r}")


    def message_cpu_s(self, nbytes: float, core_gflops: float) -> float:
        """Seconds one message costs a device's CPU (sender or receiver)."""
        ms = self.msg_cpu_ms + self.msg_cpu_ms_per_mb * nbytes / 1e6
        return ms / 1e3 * REF_CORE_GFLOPS / core_gflops

    def request_cpu_s(self, core_gflops: float) -> float:
        return self.request_cpu_ms / 1e3 * REF_CORE_GFLOPS / core_gflops


FITTED = CostTerms(msg_cpu_ms=0.875, msg_cpu_ms_per_mb=0.0, request_cpu_ms=175.0)  # bench.fit on the committed results
