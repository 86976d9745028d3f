"""Control messages of one distributed request: the leader tells the devices of a plan what to
run (``RunControl``) and when it is over (``RunEnd``); ``protocol/topics.py`` ``RunTopics`` says
where. Activations then flow as tensor envelopes (``transport/wire.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

from detransformer_edge.parallel.plan import Plan, PlanError
from detransformer_edge.protocol.codec import (
    Message,
    ProtocolError,
    check_name,
    load_object,
    req_bool,
    req_int,
    req_num,
    req_str,
)

RunKind = Literal["encode", "generate"]
MAX_MASK_TOKENS = 8192
MAX_CONTROL_BYTES = 256 * 1024


@dataclass(frozen=True)
class RunControl(Message):
    """Start one request on the devices of ``plan``: one message starts a device's whole part
    (every pass of a generation included)."""

    SCHEMA: ClassVar[str] = "run"
    req: str
    model: str  # catalog name
    kind: RunKind
    plan: Plan
    term: int
    timeout_s: float
    attention_mask: tuple[tuple[int, ...], ...] | None = None  # encode: (B, T) 1/0
    max_passes: int = 1  # generate: prefill + decode steps at most
    trace: bool = False  # every device sends its pass timelines to the coordinator

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "req": self.req, "model": self.model, "kind": self.kind, "plan": self.plan.to_dict(),
            "term": self.term, "timeout_s": self.timeout_s, "max_passes": self.max_passes,
            "attention_mask": None if self.attention_mask is None else [list(r) for r in self.attention_mask],
            **({"trace": True} if self.trace else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        mask = d.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, list) or not all(
                isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r) for r in mask
            ):
                raise ProtocolError(f"{s}: attention_mask must be a list of lists of 0/1")
            mask = tuple(tuple(r) for r in mask)
        kind = req_str(d, "kind", s)
        raw_plan = d.get("plan")
        if not isinstance(raw_plan, Mapping):
            raise ProtocolError(f"{s}: 'plan' must be an object")
        try:
            plan = Plan.from_dict(raw_plan)
        except PlanError as exc:
            raise ProtocolError(f"{s}: bad plan: {exc}") from None
        return cls(req_str(d, "req", s), req_str(d, "model", s), kind, plan,  # type: ignore[arg-type]
                   req_int(d, "term", s, minimum=0), req_num(d, "timeout_s", s), mask,
                   req_int(d, "max_passes", s), req_bool(d, "trace", s) if "trace" in d else False)

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        return cls.from_dict(load_object(payload, cls.SCHEMA, max_bytes=MAX_CONTROL_BYTES))


@dataclass(frozen=True)
class RunEnd(Message):
    """The leader finished (or abandoned) request ``req``: devices stop waiting for it and free
    its caches. A JSON object (not an empty payload) so that it can be signed."""

    SCHEMA: ClassVar[str] = "run end"
    req: str
    term: int

    def __post_init__(self) -> None:
        check_name(self.req, "request id")

    def to_dict(self) -> dict[str, Any]:
        return {"req": self.req, "term": self.term}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        return cls(req_str(d, "req", cls.SCHEMA), req_int(d, "term", cls.SCHEMA, minimum=0))
