"""Control messages of one distributed request: the leader tells the devices of a plan what to
run (``P/run/<req>/ctl``) and when it is over (``P/run/<req>/end``). Activations then flow on the
transport's own topics (``P/run/<req>/<step>/...``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

from detransformer_edge.cluster.topics import ProtocolError, check_name, load_object
from detransformer_edge.parallel.plan import Plan, PlanError

RunKind = Literal["encode", "generate"]
MAX_MASK_TOKENS = 8192


@dataclass(frozen=True)
class RunControl:
    """Start one request on the devices of ``plan`` (QoS 1, JSON)."""

    SCHEMA: ClassVar[str] = "run"
    req: str
    model: str  # catalog name
    kind: RunKind
    plan: Plan
    term: int
    timeout_s: float
    attention_mask: tuple[tuple[int, ...], ...] | None = None  # encode: (B, T) 1/0
    max_passes: int = 1  # generate: prefill + decode steps at most

    def __post_init__(self) -> None:
        check_name(self.req, "request id")
        check_name(self.model, "model name")
        if self.kind not in ("encode", "generate"):
            raise ProtocolError(f"run: unknown kind {self.kind!r}")
        if not (0 < self.timeout_s <= 3600) or not (1 <= self.max_passes <= 100_000):
            raise ProtocolError("run: timeout_s must be in (0, 3600] and max_passes in [1, 100000]")
        if self.attention_mask is not None:
            if sum(len(r) for r in self.attention_mask) > MAX_MASK_TOKENS:
                raise ProtocolError("run: attention mask too large")
            if any(v not in (0, 1) for r in self.attention_mask for v in r):
                raise ProtocolError("run: attention mask must be 0/1")

    def to_json(self) -> str:
        return json.dumps({
            "req": self.req, "model": self.model, "kind": self.kind, "plan": self.plan.to_dict(),
            "term": self.term, "timeout_s": self.timeout_s, "max_passes": self.max_passes,
            "attention_mask": None if self.attention_mask is None else [list(r) for r in self.attention_mask],
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, payload: str | bytes) -> RunControl:
        d = load_object(payload, cls.SCHEMA, max_bytes=256 * 1024)
        try:
            mask = d.get("attention_mask")
            if mask is not None:
                if not isinstance(mask, list) or not all(isinstance(r, list) for r in mask):
                    raise ProtocolError("run: attention_mask must be a list of lists")
                mask = tuple(tuple(int(v) for v in r) for r in mask)
            for key, typ in (("req", str), ("model", str), ("kind", str), ("term", int), ("max_passes", int)):
                if not isinstance(d.get(key), typ) or isinstance(d.get(key), bool):
                    raise ProtocolError(f"run: {key!r} missing or not a {typ.__name__}")
            if not isinstance(d.get("timeout_s"), (int, float)):
                raise ProtocolError("run: 'timeout_s' missing or not a number")
            return cls(d["req"], d["model"], d["kind"], Plan.from_dict(d.get("plan")), d["term"],
                       float(d["timeout_s"]), mask, d["max_passes"])
        except PlanError as exc:
            raise ProtocolError(f"run: bad plan: {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"run: malformed: {exc}") from None


def ctl_topic(prefix: str, req: str) -> str:
    return f"{prefix}/run/{req}/ctl"


def end_topic(prefix: str, req: str) -> str:
    return f"{prefix}/run/{req}/end"


def parse_run_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """``P/run/<req>/ctl`` -> (req, "ctl"); None for anything else."""
    parts = topic[len(prefix) + 1:].split("/") if topic.startswith(prefix + "/") else []
    if len(parts) == 3 and parts[0] == "run" and parts[2] in ("ctl", "end"):
        return parts[1], parts[2]
    return None
