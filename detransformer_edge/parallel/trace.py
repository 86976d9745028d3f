"""Where a request's time goes, per device: a timeline of spans.

A traced pass records on each device the spans of its work — ``compute`` (per layer group),
``encode`` / ``decode`` of activations, ``publish`` and ``wait`` (a receive that had to wait) —
with wall-clock times, so the spans of every device of a run line up (the testbed's devices
share one clock; a real home's NTP keeps them within a few ms). Workers send their spans to
the coordinator when their part ends; the leader adds its planning and reply spans. Untraced
passes use ``NULL_TIMELINE``, whose spans cost one attribute lookup.

``breakdown`` sums a timeline per device and kind; ``where_time_went`` splits a request's
latency into its slowest device's compute, its bytes on the wire and the residual (what
``bench --trace`` prints); ``summary`` is both for people, in ms (the dashboard's timeline).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SPAN_KINDS = ("plan", "compute", "encode", "decode", "publish", "wait", "reply")


@dataclass(frozen=True)
class Span:
    device: str
    kind: str  # one of SPAN_KINDS
    name: str  # e.g. "L3-5 sub-blocks 0,1", "ag.L5"
    start: float  # unix time, seconds
    end: float
    nbytes: int = 0  # publish: the message's size
    copies: int = 0  # publish: how many devices receive it (the broker's fan-out)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def to_list(self) -> list[Any]:
        return [self.device, self.kind, self.name, round(self.start, 6), round(self.end, 6), self.nbytes, self.copies]

    @classmethod
    def from_list(cls, row: Sequence[Any]) -> Span:
        device, kind, name, start, end, nbytes, copies = row
        if kind not in SPAN_KINDS or not all(isinstance(v, str) for v in (device, name)):
            raise ValueError(f"bad span {row!r}")
        return cls(device, kind, name, float(start), float(end), int(nbytes), int(copies))


@dataclass
class Timeline:
    """The spans one device records during a pass (or the leader during a request)."""

    device: str
    spans: list[Span] = field(default_factory=list)
    enabled: bool = True

    @contextlib.contextmanager
    def span(self, kind: str, name: str = "", nbytes: int = 0, copies: int = 0) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.time()
        try:
            yield
        finally:
            self.spans.append(Span(self.device, kind, name, t0, time.time(), nbytes, copies))

    def add(self, kind: str, name: str, start: float, end: float) -> None:
        if self.enabled:
            self.spans.append(Span(self.device, kind, name, start, end))

    def extend(self, spans: Sequence[Span]) -> None:
        self.spans.extend(spans)

    def to_bytes(self) -> bytes:
        return json.dumps([s.to_list() for s in self.spans], separators=(",", ":")).encode()

    @staticmethod
    def spans_from_bytes(payload: bytes, max_spans: int = 10_000) -> list[Span]:
        rows = json.loads(payload)
        if not isinstance(rows, list) or len(rows) > max_spans:
            raise ValueError("a timeline is a list of at most 10 000 spans")
        return [Span.from_list(r) for r in rows]


NULL_TIMELINE = Timeline("", enabled=False)


def breakdown(spans: Sequence[Span]) -> dict[str, dict[str, float]]:
    """Seconds per device and kind (a device's ``wait`` is time it could not work)."""
    out: dict[str, dict[str, float]] = {}
    for s in spans:
        per = out.setdefault(s.device, {k: 0.0 for k in SPAN_KINDS})
        per[s.kind] = per.get(s.kind, 0.0) + s.seconds
    return out


def critical_compute(spans: Sequence[Span]) -> float:
    """Compute seconds on the slowest device: the part of a run no network could remove."""
    per = breakdown(spans)
    return max((d["compute"] for d in per.values()), default=0.0)


def wire_seconds(spans: Sequence[Span], link_mbit: float) -> float:
    """Time the bytes of a run need on the devices' links (each device's link carries its own
    uploads and its share of the broker's copies down), for the busiest device."""
    up: dict[str, int] = {}
    delivered = 0
    for s in spans:
        if s.kind == "publish":
            up[s.device] = up.get(s.device, 0) + s.nbytes
            delivered += s.nbytes * s.copies
    devices = {s.device for s in spans} or {""}
    busiest = max(max(up.values(), default=0), delivered / len(devices))
    return busiest * 8 / (link_mbit * 1e6) if link_mbit > 0 else 0.0


def residual(latency_s: float, spans: Sequence[Span], link_mbit: float) -> float:
    """What a request spent beyond its slowest device's compute and its bytes on the wire."""
    return latency_s - critical_compute(spans) - wire_seconds(spans, link_mbit)


def where_time_went(latency_s: float, spans: Sequence[Span], link_mbit: float) -> dict[str, float]:
    """One traced run in seconds: the slowest device's compute, the wire time of its bytes, the
    activation codec and publishing on the busiest device, and the residual (the rest)."""
    per = breakdown(spans)
    return {
        "latency_s": latency_s,
        "compute_s": critical_compute(spans),
        "wire_s": wire_seconds(spans, link_mbit),
        "codec_s": max((d["encode"] + d["decode"] for d in per.values()), default=0.0),
        "publish_s": max((d["publish"] for d in per.values()), default=0.0),
        "plan_s": max((d["plan"] for d in per.values()), default=0.0),
        "residual_s": residual(latency_s, spans, link_mbit),
    }


def summary(latency_s: float, spans: Sequence[Span], link_mbit: float, first: str = "") -> dict[str, Any]:
    """A traced request for people, in ms: ``where_time_went`` (``compute_ms``, ``wire_ms``, …,
    ``residual_ms``), the link rate it assumed, and ``devices``: each device's ms per kind
    (``breakdown``) in lane order — ``first`` (the coordinator) first, then by first span."""
    starts: dict[str, float] = {}
    for s in spans:
        starts[s.device] = min(s.start, starts.get(s.device, s.start))
    order = sorted(starts, key=lambda d: (d != first, starts[d], d))
    per = breakdown(spans)
    split = where_time_went(latency_s, spans, link_mbit)
    return {
        **{k.removesuffix("_s") + "_ms": round(v * 1e3, 3) for k, v in split.items()},
        "link_mbit": link_mbit,
        "devices": [{"device": d, **{k: round(per[d][k] * 1e3, 3) for k in SPAN_KINDS}} for d in order],
    }
