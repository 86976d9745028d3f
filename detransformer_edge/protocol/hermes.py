"""Rhasspy Hermes protocol schemas for the home's voice assistant (NLU part).

A voice client publishes `hermes/nlu/query`; the cluster leader answers with
`hermes/intent/<intentName>` or `hermes/nlu/intentNotRecognized`. Field names follow the Hermes
JSON used by Rhasspy (camelCase: siteId, sessionId, intentName, confidenceScore, slotName,
rawValue); checked against rhasspy-hermes `rhasspyhermes/nlu.py` and `intent.py`.

`INTENTS`, `SLOTS` and `INTENT_SLOTS` are the vocabulary the intent model is trained on; they
live in `detransformer_edge.nlu.vocabulary` and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from detransformer_edge.nlu.vocabulary import (
    INTENT_SLOTS,
    INTENTS,
    KIND_CUSTOM,
    KIND_DURATION,
    KIND_NUMBER,
    KIND_PERCENTAGE,
    SLOTS,
)
from detransformer_edge.protocol.codec import (
    Message,
    ProtocolError,
    check_num,
    load_object,
    opt_num,
    opt_str,
    req_int,
    req_str,
)

TOPIC_NLU_QUERY = "hermes/nlu/query"
TOPIC_INTENT_PREFIX = "hermes/intent/"
TOPIC_INTENT_FILTER = "hermes/intent/#"
TOPIC_NOT_RECOGNIZED = "hermes/nlu/intentNotRecognized"
TOPIC_NLU_ERROR = "hermes/error/nlu"

_INTENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class HermesError(ProtocolError):
    """A Hermes message is malformed or uses names outside the vocabulary."""


def _wrap(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except HermesError:
        raise
    except ProtocolError as exc:
        raise HermesError(str(exc)) from exc


def intent_topic(intent_name: str) -> str:
    if not _INTENT_NAME_RE.match(intent_name):
        raise HermesError(
            f"intent name {intent_name!r} must be 1-128 characters from A-Z a-z 0-9 _ . : -"
        )
    return TOPIC_INTENT_PREFIX + intent_name


def intent_name_from_topic(topic: str) -> str:
    """`hermes/intent/<name>` -> name; HermesError for any other topic."""
    if not topic.startswith(TOPIC_INTENT_PREFIX):
        raise HermesError(f"{topic!r} is not a hermes/intent/<intentName> topic")
    name = topic[len(TOPIC_INTENT_PREFIX) :]
    intent_topic(name)
    return name


class _HermesMessage(Message):
    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        try:
            return cls.from_dict(load_object(payload, cls.SCHEMA))
        except HermesError:
            raise
        except ProtocolError as exc:
            raise HermesError(str(exc)) from exc


@dataclass(frozen=True)
class NluQuery(_HermesMessage):
    """`hermes/nlu/query`: text to recognise."""

    SCHEMA: ClassVar[str] = "hermes/nlu/query"
    input: str
    site_id: str = "default"
    id: str = ""
    session_id: str = ""
    intent_filter: tuple[str, ...] | None = None  # only these intents may be recognised
    lang: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "input": self.input,
            "siteId": self.site_id,
            "id": self.id,
            "sessionId": self.session_id,
            "intentFilter": None if self.intent_filter is None else list(self.intent_filter),
        }
        if self.lang:
            d["lang"] = self.lang
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        flt = d.get("intentFilter")
        if flt is not None and (
            not isinstance(flt, list) or not all(isinstance(x, str) for x in flt)
        ):
            raise HermesError(f"{s}: 'intentFilter' must be a list of intent names or null")
        return cls(
            input=req_str(d, "input", s, allow_empty=True),
            site_id=opt_str(d, "siteId", s, "default") or "default",
            id=opt_str(d, "id", s),
            session_id=opt_str(d, "sessionId", s),
            intent_filter=None if flt is None else tuple(flt),
            lang=opt_str(d, "lang", s),
        )


@dataclass(frozen=True)
class SlotValue:
    kind: str  # KIND_*
    value: str | float

    def __post_init__(self) -> None:
        if self.kind in (KIND_NUMBER, KIND_PERCENTAGE, KIND_DURATION):
            _wrap(check_num, self.value, "value", f"slot value of kind {self.kind}", None)
        elif not isinstance(self.value, str):
            raise HermesError(f"slot value of kind {self.kind} must be a string, got {self.value!r}")


@dataclass(frozen=True)
class SlotRange:
    start: int  # inclusive character index into `input`
    end: int  # exclusive

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end):
            raise HermesError(f"slot range must satisfy 0 <= start <= end, got {self.start}..{self.end}")


@dataclass(frozen=True)
class Slot:
    slot_name: str
    value: SlotValue
    raw_value: str
    entity: str = ""  # Hermes entity; defaults to the slot name
    range: SlotRange | None = None
    confidence: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "entity": self.entity or self.slot_name,
            "slotName": self.slot_name,
            "value": {"kind": self.value.kind, "value": self.value.value},
            "rawValue": self.raw_value,
            "confidence": self.confidence,
        }
        if self.range is not None:
            d["range"] = {"start": self.range.start, "end": self.range.end}
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Slot:
        s = "hermes slot"
        if not isinstance(d, dict):
            raise HermesError(f"{s}: each slot must be a JSON object")
        v = d.get("value")
        if not isinstance(v, dict) or "value" not in v:
            raise HermesError(f"{s}: 'value' must be an object with 'kind' and 'value'")
        rng = d.get("range")
        if rng is not None and not isinstance(rng, dict):
            raise HermesError(f"{s}: 'range' must be an object with 'start' and 'end'")
        name = _wrap(req_str, d, "slotName", s)
        raw_val = v["value"]
        if isinstance(raw_val, bool) or not isinstance(raw_val, (str, int, float)):
            raise HermesError(f"{s}: value.value must be a string or a number, got {raw_val!r}")
        return cls(
            slot_name=name,
            value=SlotValue(_wrap(opt_str, v, "kind", s, KIND_CUSTOM) or KIND_CUSTOM, raw_val),
            raw_value=_wrap(opt_str, d, "rawValue", s),
            entity=_wrap(opt_str, d, "entity", s) or name,
            range=None
            if rng is None
            else SlotRange(_wrap(req_int, rng, "start", s), _wrap(req_int, rng, "end", s)),
            confidence=_wrap(opt_num, d, "confidence", s) if d.get("confidence") is not None else 1.0,
        )


@dataclass(frozen=True)
class NluIntent(_HermesMessage):
    """`hermes/intent/<intentName>`: a recognised intent."""

    SCHEMA: ClassVar[str] = "hermes/intent"
    input: str
    intent_name: str
    confidence_score: float
    slots: tuple[Slot, ...] = ()
    site_id: str = "default"
    id: str = ""
    session_id: str = ""
    custom_data: str = ""

    def __post_init__(self) -> None:
        intent_topic(self.intent_name)
        if not (0.0 <= self.confidence_score <= 1.0):
            raise HermesError(f"confidenceScore must be within 0..1, got {self.confidence_score}")

    @property
    def topic(self) -> str:
        return intent_topic(self.intent_name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "intent": {"intentName": self.intent_name, "confidenceScore": self.confidence_score},
            "slots": [slot.to_dict() for slot in self.slots],
            "siteId": self.site_id,
            "id": self.id,
            "sessionId": self.session_id,
            "customData": self.custom_data,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        intent = d.get("intent")
        if not isinstance(intent, dict):
            raise HermesError(f"{s}: 'intent' must be an object with intentName, confidenceScore")
        slots = d.get("slots", [])
        if not isinstance(slots, list):
            raise HermesError(f"{s}: 'slots' must be a list")
        return cls(
            input=req_str(d, "input", s, allow_empty=True),
            intent_name=req_str(intent, "intentName", s),
            confidence_score=check_num(intent.get("confidenceScore"), "confidenceScore", s, 0.0),
            slots=tuple(Slot.from_dict(x) for x in slots),
            site_id=opt_str(d, "siteId", s, "default") or "default",
            id=opt_str(d, "id", s),
            session_id=opt_str(d, "sessionId", s),
            custom_data=opt_str(d, "customData", s),
        )


@dataclass(frozen=True)
class IntentNotRecognized(_HermesMessage):
    """`hermes/nlu/intentNotRecognized`."""

    SCHEMA: ClassVar[str] = "hermes/nlu/intentNotRecognized"
    input: str
    site_id: str = "default"
    id: str = ""
    session_id: str = ""
    custom_data: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "siteId": self.site_id,
            "id": self.id,
            "sessionId": self.session_id,
            "customData": self.custom_data,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(
            input=req_str(d, "input", s, allow_empty=True),
            site_id=opt_str(d, "siteId", s, "default") or "default",
            id=opt_str(d, "id", s),
            session_id=opt_str(d, "sessionId", s),
            custom_data=opt_str(d, "customData", s),
        )


def parse_nlu_query(payload: str | bytes | bytearray) -> NluQuery:
    """Parse a `hermes/nlu/query` payload; HermesError on bad JSON or field types."""
    return NluQuery.from_json(payload)


def slot(slot_name: str, value: str | float, raw_value: str, *, kind: str | None = None,
         start: int | None = None, end: int | None = None, confidence: float = 1.0) -> Slot:
    """Build a vocabulary slot; the kind defaults to the slot's first kind in SLOTS."""
    if slot_name not in SLOTS:
        raise HermesError(f"unknown slot {slot_name!r}; known slots: {sorted(SLOTS)}")
    kind = kind or SLOTS[slot_name][0]
    if kind not in SLOTS[slot_name]:
        raise HermesError(f"slot {slot_name!r} takes kinds {SLOTS[slot_name]}, not {kind!r}")
    rng = SlotRange(start, end) if start is not None and end is not None else None
    return Slot(slot_name, SlotValue(kind, value), raw_value, slot_name, rng, confidence)


def recognized(query: NluQuery, intent_name: str, confidence: float,
               slots: tuple[Slot, ...] | list[Slot] = ()) -> NluIntent:
    """The reply to `query` for a recognised vocabulary intent (checks INTENT_SLOTS)."""
    if intent_name not in INTENT_SLOTS:
        raise HermesError(f"unknown intent {intent_name!r}; known intents: {list(INTENTS)}")
    for s in slots:
        if s.slot_name not in INTENT_SLOTS[intent_name]:
            raise HermesError(
                f"intent {intent_name} takes slots {INTENT_SLOTS[intent_name]}, not {s.slot_name!r}"
            )
    if query.intent_filter is not None and intent_name not in query.intent_filter:
        raise HermesError(f"intent {intent_name} is excluded by the query's intentFilter")
    return NluIntent(
        input=query.input,
        intent_name=intent_name,
        confidence_score=confidence,
        slots=tuple(slots),
        site_id=query.site_id,
        id=query.id,
        session_id=query.session_id,
    )


def not_recognized(query: NluQuery) -> IntentNotRecognized:
    return IntentNotRecognized(query.input, query.site_id, query.id, query.session_id)
