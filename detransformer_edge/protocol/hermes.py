"""Rhasspy Hermes protocol schemas for the home's voice assistant (NLU).

A voice client publishes `hermes/nlu/query`; the cluster leader answers as Rhasspy's NLU does:
`hermes/nlu/intentParsed` then `hermes/intent/<intentName>` for a recognised intent, else
`hermes/nlu/intentNotRecognized`; `hermes/error/nlu` only for a query it cannot read. With
``answer_questions`` an out-of-domain question is also answered by `hermes/tts/say`
(``protocol/hermes_tts.py``). Field names
follow the Hermes JSON used by Rhasspy (camelCase: siteId, sessionId, intentName, confidenceScore,
slotName, rawValue, customData); every message here is parsed by rhasspy-hermes 0.6.2 in the tests
(`rhasspyhermes/nlu.py`, `intent.py`).

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
TOPIC_INTENT_PARSED = "hermes/nlu/intentParsed"
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
    custom_data: str | None = None  # the session's customData, echoed in the answer

    @property
    def allowed(self) -> frozenset[str] | None:
        """The intents the query's filter allows, as Rhasspy reads ``intentFilter``: absent, null
        or ``[]`` is no filter (None); a list of names allows only those (names we do not know
        allow nothing)."""
        return frozenset(self.intent_filter) if self.intent_filter else None

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
        if self.custom_data is not None:
            d["customData"] = self.custom_data
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
            custom_data=_opt_str_or_none(d, "customData", s),
        )


# Snips' Duration value: every unit spelled out, plus our total in seconds as `value` (Rhasspy's
# Slot contract: a value object "contains at least a 'value' key").
_DURATION_UNITS = ("years", "quarters", "months", "weeks", "days", "hours", "minutes", "seconds")


def duration_parts(seconds: float) -> dict[str, int | float]:
    """A number of seconds as Snips' Duration fields: days, hours, minutes and seconds filled in
    (300 -> minutes 5), the calendar units 0."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    frac = seconds - whole
    parts: dict[str, int | float] = dict.fromkeys(_DURATION_UNITS, 0)
    parts.update(days=days, hours=hours, minutes=minutes, seconds=secs + frac if frac else secs)
    return parts


@dataclass(frozen=True)
class SlotValue:
    kind: str  # KIND_*
    value: str | float

    def __post_init__(self) -> None:
        if self.kind in (KIND_NUMBER, KIND_PERCENTAGE, KIND_DURATION):
            _wrap(check_num, self.value, "value", f"slot value of kind {self.kind}", None)
        elif not isinstance(self.value, str):
            raise HermesError(f"slot value of kind {self.kind} must be a string, got {self.value!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.kind == KIND_DURATION:
            assert not isinstance(self.value, str)
            d.update(duration_parts(self.value), precision="Exact")
        return d


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
            "value": self.value.to_dict(),
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


def _opt_str_or_none(d: Mapping[str, Any], key: str, schema: str) -> str | None:
    """An optional string that keeps null apart from "" (customData is echoed as it came)."""
    return None if d.get(key) is None else _wrap(opt_str, d, key, schema)


def _intent_part(d: Mapping[str, Any], s: str) -> tuple[str, float]:
    intent = d.get("intent")
    if not isinstance(intent, dict):
        raise HermesError(f"{s}: 'intent' must be an object with intentName, confidenceScore")
    return req_str(intent, "intentName", s), check_num(intent.get("confidenceScore"), "confidenceScore", s, 0.0)


def _slots_part(d: Mapping[str, Any], s: str) -> tuple[Slot, ...]:
    slots = d.get("slots") or []
    if not isinstance(slots, list):
        raise HermesError(f"{s}: 'slots' must be a list")
    return tuple(Slot.from_dict(x) for x in slots)


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
    custom_data: str | None = None
    lang: str = ""

    def __post_init__(self) -> None:
        intent_topic(self.intent_name)
        if not (0.0 <= self.confidence_score <= 1.0):
            raise HermesError(f"confidenceScore must be within 0..1, got {self.confidence_score}")

    @property
    def topic(self) -> str:
        return intent_topic(self.intent_name)

    def parsed(self) -> NluIntentParsed:
        """The `hermes/nlu/intentParsed` message Rhasspy's NLU sends just before this one."""
        return NluIntentParsed(self.input, self.intent_name, self.confidence_score, self.slots,
                               self.site_id, self.id, self.session_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "intent": {"intentName": self.intent_name, "confidenceScore": self.confidence_score},
            "slots": [slot.to_dict() for slot in self.slots],
            "siteId": self.site_id,
            "id": self.id,
            "sessionId": self.session_id,
            "customData": self.custom_data,
            "lang": self.lang or None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        name, confidence = _intent_part(d, s)
        return cls(
            input=req_str(d, "input", s, allow_empty=True),
            intent_name=name,
            confidence_score=confidence,
            slots=_slots_part(d, s),
            site_id=opt_str(d, "siteId", s, "default") or "default",
            id=opt_str(d, "id", s),
            session_id=opt_str(d, "sessionId", s),
            custom_data=_opt_str_or_none(d, "customData", s),
            lang=opt_str(d, "lang", s),
        )


@dataclass(frozen=True)
class NluIntentParsed(_HermesMessage):
    """`hermes/nlu/intentParsed`: the low-level twin of an intent, published just before it."""

    SCHEMA: ClassVar[str] = "hermes/nlu/intentParsed"
    input: str
    intent_name: str
    confidence_score: float
    slots: tuple[Slot, ...] = ()
    site_id: str = "default"
    id: str = ""
    session_id: str = ""

    topic: ClassVar[str] = TOPIC_INTENT_PARSED

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "intent": {"intentName": self.intent_name, "confidenceScore": self.confidence_score},
            "slots": [slot.to_dict() for slot in self.slots],
            "siteId": self.site_id,
            "id": self.id,
            "sessionId": self.session_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        name, confidence = _intent_part(d, s)
        return cls(req_str(d, "input", s, allow_empty=True), name, confidence, _slots_part(d, s),
                   opt_str(d, "siteId", s, "default") or "default", opt_str(d, "id", s), opt_str(d, "sessionId", s))


@dataclass(frozen=True)
class IntentNotRecognized(_HermesMessage):
    """`hermes/nlu/intentNotRecognized`."""

    SCHEMA: ClassVar[str] = "hermes/nlu/intentNotRecognized"
    input: str
    site_id: str = "default"
    id: str = ""
    session_id: str = ""
    custom_data: str | None = None

    topic: ClassVar[str] = TOPIC_NOT_RECOGNIZED

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
            custom_data=_opt_str_or_none(d, "customData", s),
        )


@dataclass(frozen=True)
class NluError(_HermesMessage):
    """`hermes/error/nlu`: a query the NLU could not read. ``context`` is the start of the query as
    received; ``siteId`` and ``sessionId`` are the query's where they could be read."""

    SCHEMA: ClassVar[str] = "hermes/error/nlu"
    error: str
    site_id: str = "default"
    session_id: str | None = None
    context: str | None = None

    topic: ClassVar[str] = TOPIC_NLU_ERROR

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "siteId": self.site_id, "sessionId": self.session_id,
                "context": self.context}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(req_str(d, "error", s, allow_empty=True), opt_str(d, "siteId", s, "default") or "default",
                   _opt_str_or_none(d, "sessionId", s), _opt_str_or_none(d, "context", s))


def parse_nlu_query(payload: str | bytes | bytearray) -> NluQuery:
    """Parse a `hermes/nlu/query` payload; HermesError on bad JSON or field types."""
    return NluQuery.from_json(payload)


def nlu_error(payload: str | bytes | bytearray, error: str) -> NluError:
    """The `hermes/error/nlu` answer to a query that could not be parsed: its ``siteId`` and
    ``sessionId`` when they can still be read from the payload, and its start as ``context``."""
    site_id, session_id = "default", None
    try:
        d = load_object(payload, NluQuery.SCHEMA)
    except ProtocolError:
        d = {}
    if isinstance(d.get("siteId"), str) and d["siteId"]:
        site_id = d["siteId"]
    if isinstance(d.get("sessionId"), str) and d["sessionId"]:
        session_id = d["sessionId"]
    text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")
    return NluError(error, site_id, session_id, text[:200])


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


def intent_slots(intent_name: str, slots: tuple[Slot, ...] | list[Slot]) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
    """(kept, dropped): the slots ``intent_name`` takes (INTENT_SLOTS), in order, and the rest. A
    stray slot from the tagger never costs a correct intent its answer."""
    takes = INTENT_SLOTS.get(intent_name, ())
    kept = tuple(s for s in slots if s.slot_name in takes)
    return kept, tuple(s for s in slots if s.slot_name not in takes)


def recognized(query: NluQuery, intent_name: str, confidence: float,
               slots: tuple[Slot, ...] | list[Slot] = ()) -> NluIntent:
    """The reply to `query` for a recognised vocabulary intent: the query's siteId, id, sessionId,
    lang and customData echoed; slots the intent does not take (INTENT_SLOTS) dropped."""
    if intent_name not in INTENT_SLOTS:
        raise HermesError(f"unknown intent {intent_name!r}; known intents: {list(INTENTS)}")
    kept, _ = intent_slots(intent_name, slots)
    return NluIntent(
        input=query.input,
        intent_name=intent_name,
        confidence_score=confidence,
        slots=kept,
        site_id=query.site_id,
        id=query.id,
        session_id=query.session_id,
        custom_data=query.custom_data,
        lang=query.lang,
    )


def not_recognized(query: NluQuery) -> IntentNotRecognized:
    return IntentNotRecognized(query.input, query.site_id, query.id, query.session_id, query.custom_data)
