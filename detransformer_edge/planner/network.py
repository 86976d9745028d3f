"""How activations cross the home's network: every message goes through the MQTT broker.

A message is uploaded by its sender, handled by the broker, and downloaded by each subscriber.
A *phase* is a set of messages sent at the same time (one collective); it takes

    max_sender(upload bytes / link)      (or the broker's link taking in every upload, if slower)
  + publishes x broker per-message cost  (a single-threaded broker handles them one by one)
  + max_receiver(download bytes / link)  (or the broker's link sending every copy, if slower)
  + latency: half the slowest sender's plus half the slowest receiver's round trip to the broker

The broker stores and forwards a message whole, so upload and download add up. Collectives are
the ones in ``parallel/collectives.py``: an all-gather is one publish per device and n-1
downloads each; an all-reduce is a reduce-scatter (n-1 point-to-point chunks of 1/n) followed by
an all-gather of 1/n chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from detransformer_edge.planner.breakdown import PlanningError
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.terms import CostTerms
from detransformer_edge.transport.wire import WIRE_ITEMSIZE, WireDtype

INT8_SCALE_BYTES = 4  # one float32 scale per row
ENVELOPE_BYTES = 120  # msgpack envelope + MQTT fixed header + topic, per message
# One-way-and-back device <-> broker latency when a profile has no measured rtt_ms.
DEFAULT_RTT_MS = {"ethernet": 0.5, "loopback": 0.1, "wifi6": 2.0, "wifi5": 3.0, "wifi4": 5.0, "other": 3.0}

Message = tuple[str, float, tuple[str, ...]]  # (sender, bytes, receivers)


@dataclass(frozen=True)
class Broker:
    """The MQTT broker as the cost model sees it.

    ``link_mbit``: the broker host's own link (one direction, full duplex); ``None`` when the
    broker sits on a wired hub/router whose link is never the bottleneck. ``per_message_ms``:
    broker CPU time per publish, fan-out included (Mosquitto on a small board: ~0.2-1 ms).
    """

    link_mbit: float | None = None
    per_message_ms: float = 0.3

    def __post_init__(self) -> None:
        if self.link_mbit is not None and not self.link_mbit > 0:
            raise PlanningError(f"broker link_mbit must be positive, got {self.link_mbit!r}")
        if not self.per_message_ms >= 0:
            raise PlanningError(f"broker per_message_ms must be >= 0, got {self.per_message_ms!r}")


@dataclass(frozen=True)
class Phase:
    """One phase's time, and bytes up / down per device and publishes (for the breakdown)."""

    seconds: float
    up: Mapping[str, float]
    down: Mapping[str, float]
    publishes: int


def wire_bytes(rows: int, width: int, wire: WireDtype) -> float:
    """Payload of one message carrying a (rows, width) activation in ``wire`` precision."""
    scales = rows * INT8_SCALE_BYTES if wire == "int8" else 0
    return rows * width * WIRE_ITEMSIZE[wire] + scales + ENVELOPE_BYTES


class Network:
    """The devices' links and the broker: phase times of message sets."""

    def __init__(self, profiles: Mapping[str, DeviceProfile], broker: Broker, terms: CostTerms) -> None:
        self.broker = broker
        self.terms = terms
        self._link = {n: p.link_bytes_per_s for n, p in profiles.items()}
        self._core = {n: p.core_gflops for n, p in profiles.items()}
        self._rtt = {
            n: (p.rtt_ms if p.rtt_ms is not None else DEFAULT_RTT_MS.get(p.link, 3.0)) / 1e3
            for n, p in profiles.items()
        }

    def rtt_s(self, device: str) -> float:
        return self._rtt[device]

    def phase(self, messages: Iterable[Message]) -> Phase:
        """Seconds for messages sent together; also bytes up/down per device and publishes."""
        up: dict[str, float] = {}
        down: dict[str, float] = {}
        first_in: dict[str, float] = {}  # receiver -> the quickest upload of a message to it
        last_out: dict[str, float] = {}  # sender -> the quickest download of one of its messages
        cpu_out: dict[str, float] = {}
        cpu_in: dict[str, float] = {}
        smallest = float("inf")
        link, terms, core = self._link, self.terms, self._core
        n_pub = 0
        for src, nbytes, receivers in messages:
            if not receivers:
                continue
            n_pub += 1
            smallest = min(smallest, nbytes)
            up[src] = up.get(src, 0.0) + nbytes
            t_up = nbytes / link[src]
            cpu_out[src] = cpu_out.get(src, 0.0) + terms.message_cpu_s(nbytes, core[src])
            fastest_down = min(nbytes / link[r] for r in receivers)
            last_out[src] = min(last_out.get(src, fastest_down), fastest_down)
            for r in receivers:
                down[r] = down.get(r, 0.0) + nbytes
                first_in[r] = min(first_in.get(r, t_up), t_up)
                cpu_in[r] = cpu_in.get(r, 0.0) + terms.message_cpu_s(nbytes, core[r])
        if not n_pub:
            return Phase(0.0, up, down, 0)
        # The broker forwards each message as soon as it has it whole: a sender's last upload
        # still has to be downloaded, a receiver's first download waits for one upload.
        t_wire = max(
            max(b / link[d] + last_out[d] for d, b in up.items()),
            max(first_in[d] + b / link[d] for d, b in down.items()),
        )
        if self.broker.link_mbit is not None:
            rate = self.broker.link_mbit * 1e6 / 8
            t_wire = max(t_wire, max(sum(up.values()), sum(down.values())) / rate + smallest / rate)
        rtt = self._rtt
        latency = 0.5 * (max(rtt[d] for d in up) + max(rtt[d] for d in down))
        cpu = max(cpu_out.values()) + max(cpu_in.values())
        broker = n_pub * self.broker.per_message_ms / 1e3
        return Phase(t_wire + broker + cpu + latency, up, down, n_pub)
