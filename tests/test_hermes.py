"""Rhasspy Hermes schemas: round trips, field names on the wire, typed errors."""

from __future__ import annotations

import json

import pytest

from detransformer_edge.errors import DetransformerError
from detransformer_edge.integrations.hermes import (
    INTENT_SLOTS,
    INTENTS,
    SLOTS,
    TOPIC_NOT_RECOGNIZED,
    HermesError,
    IntentNotRecognized,
    NluIntent,
    NluQuery,
    intent_name_from_topic,
    not_recognized,
    parse_nlu_query,
    recognized,
    slot,
)

QUERY = b'{"input": "set the kitchen lights to 40 percent", "siteId": "kitchen", "id": "q1", "sessionId": "s1", "intentFilter": null, "customData": "x"}'


def test_vocabulary() -> None:
    assert len(INTENTS) == 15 and set(INTENTS) == set(INTENT_SLOTS)
    assert set(SLOTS) == {"room", "level", "duration", "item", "media"}
    assert all(set(s) <= set(SLOTS) for s in INTENT_SLOTS.values())


def test_parse_query_and_build_intent_wire_format() -> None:
    q = parse_nlu_query(QUERY)
    assert (q.input, q.site_id, q.id, q.session_id, q.intent_filter) == (
        "set the kitchen lights to 40 percent", "kitchen", "q1", "s1", None)
    msg = recognized(
        q, "SetBrightness", 0.93,
        [slot("room", "kitchen", "kitchen", start=8, end=15),
         slot("level", 40, "40 percent", kind="Percentage", start=26, end=36)],
    )
    assert msg.topic == "hermes/intent/SetBrightness"
    wire = json.loads(msg.to_json())
    assert wire["intent"] == {"intentName": "SetBrightness", "confidenceScore": 0.93}
    assert wire["siteId"] == "kitchen" and wire["id"] == "q1" and wire["sessionId"] == "s1"
    assert wire["slots"][1] == {
        "entity": "level", "slotName": "level", "value": {"kind": "Percentage", "value": 40},
        "rawValue": "40 percent", "confidence": 1.0, "range": {"start": 26, "end": 36},
    }
    assert NluIntent.from_json(msg.to_json()) == msg
    assert intent_name_from_topic(msg.topic) == "SetBrightness"


def test_round_trips() -> None:
    q = NluQuery("hi", "den", "1", "2", ("GetTime",), "en")
    assert NluQuery.from_json(q.to_json()) == q
    nr = not_recognized(q)
    assert IntentNotRecognized.from_json(nr.to_json()) == nr
    assert json.loads(nr.to_json())["siteId"] == "den" and TOPIC_NOT_RECOGNIZED.endswith("intentNotRecognized")
    t = recognized(NluQuery("timer 5 minutes"), "SetTimer", 1.0, [slot("duration", 300, "5 minutes")])
    assert NluIntent.from_json(t.to_json()) == t


def test_rhasspy_style_intent_parses() -> None:
    """An intent as Rhasspy publishes it (extra fields, no kind) still parses."""
    payload = {
        "input": "turn on the kitchen light", "siteId": "default", "id": "", "sessionId": "",
        "intent": {"intentName": "TurnOnLight", "confidenceScore": 1.0},
        "slots": [{"entity": "room", "slotName": "room", "value": {"value": "kitchen"},
                   "rawValue": "kitchen", "range": {"start": 12, "end": 19, "rawStart": 12, "rawEnd": 19}}],
        "asrTokens": [], "asrConfidence": None, "customData": None, "lang": None,
    }
    m = NluIntent.from_json(json.dumps(payload))
    assert m.slots[0].value.kind == "Custom" and m.slots[0].range is not None


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"{", "not valid UTF-8 JSON"),
        (b'"text"', "JSON object"),
        (b"{}", "'input'"),
        (b'{"input": 5}', "'input'"),
        (b'{"input": "x", "siteId": 3}', "siteId"),
        (b'{"input": "x", "intentFilter": "GetTime"}', "intentFilter"),
    ],
)
def test_bad_queries_raise_typed_errors(payload: bytes, fragment: str) -> None:
    with pytest.raises(HermesError, match=fragment) as info:
        parse_nlu_query(payload)
    assert isinstance(info.value, DetransformerError)


def test_builder_checks_vocabulary() -> None:
    q = NluQuery("x")
    with pytest.raises(HermesError, match="unknown intent"):
        recognized(q, "Fly", 0.5)
    with pytest.raises(HermesError, match="takes slots"):
        recognized(q, "GetTime", 0.5, [slot("room", "den", "den")])
    with pytest.raises(HermesError, match="kinds"):
        slot("room", 3, "3", kind="Number")
    with pytest.raises(HermesError, match="0..1"):
        recognized(q, "GetTime", 1.5)
    with pytest.raises(HermesError, match="intentFilter"):
        recognized(NluQuery("x", intent_filter=("GetTime",)), "GetWeather", 0.9)
    with pytest.raises(HermesError):
        NluIntent.from_json(b'{"input":"x","intent":{"intentName":"a/b","confidenceScore":1}}')
    with pytest.raises(HermesError, match="slot"):
        NluIntent.from_json(b'{"input":"x","intent":{"intentName":"A","confidenceScore":1},"slots":[{"slotName":"r","value":{"value":[1]}}]}')
