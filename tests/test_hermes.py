"""Rhasspy Hermes schemas: round trips, field names on the wire, typed errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.hermes import (
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
    assert recognized(q, "GetTime", 0.5, [slot("room", "den", "den")]).slots == ()  # stray: dropped
    with pytest.raises(HermesError, match="kinds"):
        slot("room", 3, "3", kind="Number")
    with pytest.raises(HermesError, match="0..1"):
        recognized(q, "GetTime", 1.5)
    with pytest.raises(HermesError):
        NluIntent.from_json(b'{"input":"x","intent":{"intentName":"a/b","confidenceScore":1}}')
    with pytest.raises(HermesError, match="slot"):
        NluIntent.from_json(b'{"input":"x","intent":{"intentName":"A","confidenceScore":1},"slots":[{"slotName":"r","value":{"value":[1]}}]}')


# --- answers as Rhasspy's NLU gives them, read back by rhasspy-hermes 0.6.2 -------------------------

def _rhasspy(message):
    """Parse one of our messages with the reference library, from its JSON on the wire."""
    from rhasspyhermes.nlu import NluError, NluIntent, NluIntentNotRecognized, NluIntentParsed

    cls = {"hermes/nlu/intentParsed": NluIntentParsed, "hermes/nlu/intentNotRecognized": NluIntentNotRecognized,
           "hermes/error/nlu": NluError}.get(message.topic, NluIntent)
    return cls.from_dict(json.loads(message.to_json()))


def _result(intent, confidence, *slots):
    from detransformer_edge.service.intents import IntentResult, SlotValue

    return IntentResult(intent, confidence, tuple(SlotValue(n, n, v, raw, a, b, kind) for n, v, raw, a, b, kind in slots))


def test_stray_slots_are_dropped_and_ids_echoed() -> None:
    """The tracker's examples: the tagger's extra 'item' on SetTimer and 'room' on CancelTimer cost
    the answer nothing; siteId, id, sessionId, lang and customData come back as sent."""
    from detransformer_edge.integrations.hermes import answer

    q = parse_nlu_query(json.dumps({"input": "set a 3 minute timer for the eggs", "siteId": "kitchen", "id": "q7",
                                    "sessionId": "s7", "lang": "en", "customData": "eggs-session"}))
    parsed, intent = answer(q, _result("SetTimer", 0.99, ("duration", 180, "3 minute", 6, 14, "Duration"),
                                       ("item", "eggs", "eggs", 29, 33, "Custom")))
    assert (parsed.topic, intent.topic) == ("hermes/nlu/intentParsed", "hermes/intent/SetTimer")
    ref = _rhasspy(intent)
    assert ref.intent.intent_name == "SetTimer" and ref.intent.confidence_score == 0.99
    assert (ref.site_id, ref.id, ref.session_id, ref.lang, ref.custom_data) == ("kitchen", "q7", "s7", "en", "eggs-session")
    assert [s.slot_name for s in ref.slots] == ["duration"]
    duration = ref.slots[0]
    # Snips' Duration shape, and Rhasspy's "at least a value key"
    assert duration.value == {"kind": "Duration", "value": 180, "years": 0, "quarters": 0, "months": 0, "weeks": 0,
                              "days": 0, "hours": 0, "minutes": 3, "seconds": 0, "precision": "Exact"}
    assert (duration.raw_value, duration.range.start, duration.range.end) == ("3 minute", 6, 14)
    p = _rhasspy(parsed)
    assert (p.intent.intent_name, p.site_id, p.id, p.session_id) == ("SetTimer", "kitchen", "q7", "s7")
    assert [s.slot_name for s in p.slots] == ["duration"]

    q2 = parse_nlu_query(json.dumps({"input": "remove the kitchen timer", "siteId": "hall", "sessionId": "s8"}))
    _, cancel = answer(q2, _result("CancelTimer", 0.92, ("room", "kitchen", "kitchen", 11, 18, "Custom")))
    ref2 = _rhasspy(cancel)
    assert ref2.intent.intent_name == "CancelTimer" and ref2.slots == [] and ref2.session_id == "s8"
    assert ref2.custom_data is None  # absent customData stays null, as Rhasspy sends it


def test_duration_parts() -> None:
    from detransformer_edge.protocol.hermes import duration_parts

    assert {k: v for k, v in duration_parts(3 * 86400 + 2 * 3600 + 61).items() if v} == {
        "days": 3, "hours": 2, "minutes": 1, "seconds": 1}
    assert duration_parts(90.5)["minutes"] == 1 and duration_parts(90.5)["seconds"] == 30.5


@pytest.mark.parametrize("flt, allowed", [(None, None), ([], None), (["GetTime"], frozenset({"GetTime"})),
                                          (["Dance"], frozenset({"Dance"}))])
def test_intent_filter_reads_as_rhasspy(flt, allowed) -> None:
    q = parse_nlu_query(json.dumps({"input": "x", "intentFilter": flt}))
    assert q.allowed == allowed


def test_filter_and_failures_answer_not_recognized() -> None:
    from detransformer_edge.integrations.hermes import answer

    q = parse_nlu_query(json.dumps({"input": "what time is it", "siteId": "den", "id": "a", "sessionId": "b",
                                    "intentFilter": ["GetWeather"], "customData": "c"}))
    (msg,) = answer(q, _result("GetTime", 0.9))  # a result outside the filter never leaks through
    ref = _rhasspy(msg)
    assert msg.topic == "hermes/nlu/intentNotRecognized"
    assert (ref.input, ref.site_id, ref.id, ref.session_id, ref.custom_data) == ("what time is it", "den", "a", "b", "c")
    assert [m.topic for m in answer(q, None)] == ["hermes/nlu/intentNotRecognized"]  # the home could not answer
    assert [m.topic for m in answer(q, _result(None, 0.3))] == ["hermes/nlu/intentNotRecognized"]
    assert [m.topic for m in answer(q, _result("Fly", 0.9))] == ["hermes/nlu/intentNotRecognized"]
    q_all = parse_nlu_query(json.dumps({"input": "what time is it", "intentFilter": []}))
    assert [m.topic for m in answer(q_all, _result("GetTime", 0.9))] == ["hermes/nlu/intentParsed", "hermes/intent/GetTime"]


def test_slot_of_the_wrong_kind_is_dropped_not_an_error() -> None:
    from detransformer_edge.integrations.hermes import answer

    q = parse_nlu_query(b'{"input": "set the kitchen lights to bright"}')
    _, intent = answer(q, _result("SetBrightness", 0.8, ("room", "kitchen", "kitchen", 8, 15, "Custom"),
                                  ("level", "bright", "bright", 26, 32, "Percentage")))
    assert [s.slot_name for s in _rhasspy(intent).slots] == ["room"]


def test_unreadable_query_error_keeps_site_and_session() -> None:
    from detransformer_edge.protocol.hermes import nlu_error

    err = nlu_error(b'{"input": 5, "siteId": "kitchen", "sessionId": "s9"}', "bad nlu query: 'input'")
    ref = _rhasspy(err)
    assert (ref.site_id, ref.session_id, ref.error) == ("kitchen", "s9", "bad nlu query: 'input'")
    assert json.loads(ref.context)["siteId"] == "kitchen"
    ref2 = _rhasspy(nlu_error(b"\xff{", "bad"))
    assert (ref2.site_id, ref2.session_id) == ("default", None)


# --- a running home answers like Rhasspy's NLU ----------------------------------------------------

class _FakeSession:
    def __init__(self, fail: bool) -> None:
        self.fail, self.sent = fail, []

    def subscribe(self, *a, **k) -> None:
        pass

    async def publish(self, topic, payload, qos=0, retain=False) -> None:
        from detransformer_edge.transport.session import NotConnectedError

        if self.fail:
            raise NotConnectedError("broker gone")
        self.sent.append((topic, json.loads(payload)))


class _FakeHome:
    def __init__(self, fail: bool, result=None, exc=None) -> None:
        from types import SimpleNamespace

        from detransformer_edge.cluster.config import AgentConfig

        self.session, self.result, self.exc, self.failed = _FakeSession(fail), result, exc, []
        self.cluster = SimpleNamespace(superseded=False, lease=None)  # this device still leads
        self.seen_allowed = "unset"
        self.config = AgentConfig(id="fake")  # answer_questions off: no spoken answers here

    async def recognize(self, text, client_id=None, allowed=None):
        self.seen_allowed = allowed
        if self.exc is not None:
            raise self.exc
        return self.result

    def answer_failed(self, client_id, error) -> None:
        self.failed.append((client_id, error))


async def test_lost_answer_is_reported_failed_and_busy_is_not_recognized() -> None:
    from detransformer_edge.integrations.hermes import HermesNlu
    from detransformer_edge.service.placement import ServiceError

    q = json.dumps({"input": "what time is it", "id": "q1", "intentFilter": []}).encode()
    lost = _FakeHome(fail=True, result=_result("GetTime", 0.9))
    await HermesNlu()._answer(lost, q)
    assert lost.failed == [("q1", "hermes answer lost: the broker connection is down")]
    assert lost.seen_allowed is None  # [] is no filter

    busy = _FakeHome(fail=False, exc=ServiceError("busy", "36 requests in flight or queued; try again shortly"))
    await HermesNlu()._answer(busy, json.dumps({"input": "x", "id": "q2", "sessionId": "s2"}).encode())
    assert [t for t, _ in busy.session.sent] == ["hermes/nlu/intentNotRecognized"]
    assert busy.session.sent[0][1]["sessionId"] == "s2" and busy.failed == []

    none = _FakeHome(fail=False, result=_result("GetTime", 0.9))
    await HermesNlu()._answer(none, json.dumps({"input": "x", "intentFilter": ["Dance"]}).encode())
    assert [t for t, _ in none.session.sent] == ["hermes/nlu/intentNotRecognized"]
    assert none.seen_allowed == "unset"  # nothing allowed: the model is not even asked


@pytest.mark.mosquitto
async def test_running_home_answers_every_query_once_as_rhasspy_does(mosquitto_broker) -> None:
    import uuid

    import aiomqtt
    from rhasspyhermes.nlu import NluIntent, NluIntentNotRecognized

    from detransformer_edge.service.intents import IntentResult, SlotValue
    from tests.test_service import home, wait_for_placement

    site = f"site-{uuid.uuid4().hex[:8]}"
    async with home(mosquitto_broker, n=2) as (cluster, agents):
        leader = await wait_for_placement(agents)
        got: dict[str, list[tuple[str, dict]]] = {}
        arrived: dict[str, asyncio.Event] = {}
        terminal = ("hermes/intent/", "hermes/nlu/intentNotRecognized", "hermes/error/nlu")

        async with aiomqtt.Client(*mosquitto_broker, protocol=aiomqtt.ProtocolVersion.V311) as client:
            await client.subscribe("hermes/#", qos=1)

            async def listen() -> None:
                async for msg in client.messages:
                    body = json.loads(msg.payload)
                    if msg.topic.value == "hermes/nlu/query" or body.get("siteId") != site:
                        continue
                    key = body.get("id") or body.get("sessionId")
                    got.setdefault(key, []).append((msg.topic.value, body))
                    if msg.topic.value.startswith(terminal):
                        arrived.setdefault(key, asyncio.Event()).set()

            listener = asyncio.create_task(listen())

            async def ask(key: str, payload: dict | bytes) -> list[tuple[str, dict]]:
                arrived.setdefault(key, asyncio.Event())
                body = payload if isinstance(payload, bytes) else json.dumps({"siteId": site, "id": key, **payload})
                await client.publish("hermes/nlu/query", body, qos=1)
                await asyncio.wait_for(arrived[key].wait(), 30)
                return got[key]

            try:
                # a plain query: intentParsed, then the intent, every field as Rhasspy reads it
                msgs = await ask("q1", {"input": "turn on the kitchen light", "sessionId": "s1", "lang": "en",
                                        "customData": "from-dm"})
                assert [t.split("/")[1] for t, _ in msgs] == ["nlu", "intent"] and msgs[0][0] == "hermes/nlu/intentParsed"
                ref = NluIntent.from_dict(msgs[1][1])
                assert msgs[1][0] == f"hermes/intent/{ref.intent.intent_name}"
                assert (ref.input, ref.site_id, ref.id, ref.session_id, ref.lang, ref.custom_data) == (
                    "turn on the kitchen light", site, "q1", "s1", "en", "from-dm")
                first = ref.intent.intent_name

                # the filter masks before the decision: excluding the first choice gives another intent
                other = next(n for n in INTENTS if n != first)
                msgs = await ask("q2", {"input": "turn on the kitchen light", "intentFilter": [other]})
                assert msgs[-1][0] == f"hermes/intent/{other}"
                msgs = await ask("q3", {"input": "turn on the kitchen light", "intentFilter": []})
                assert msgs[-1][0] == f"hermes/intent/{first}"
                msgs = await ask("q4", {"input": "turn on the kitchen light", "intentFilter": ["Dance"],
                                        "sessionId": "s4", "customData": "cd4"})
                nr = NluIntentNotRecognized.from_dict(msgs[-1][1])
                assert [t for t, _ in msgs] == ["hermes/nlu/intentNotRecognized"]
                assert (nr.site_id, nr.id, nr.session_id, nr.custom_data) == (site, "q4", "s4", "cd4")

                # the tagger's stray slot does not cost the answer (the model's result, plus a stray slot)
                real = leader.recognize

                async def with_stray(text, client_id=None, allowed=None):
                    r = await real(text, client_id, allowed)
                    return IntentResult("SetTimer", r.confidence, (
                        SlotValue("duration", "duration", 180, "3 minute", 6, 14, "Duration"),
                        SlotValue("item", "item", "eggs", "eggs", 29, 33, "Custom")))

                leader.recognize = with_stray
                msgs = await ask("q5", {"input": "set a 3 minute timer for the eggs"})
                leader.recognize = real
                ref = NluIntent.from_dict(msgs[-1][1])
                assert ref.intent.intent_name == "SetTimer" and [s.slot_name for s in ref.slots] == ["duration"]
                assert ref.slots[0].value["minutes"] == 3

                # a busy home: not recognised, and the request log says why
                leader.tasks._max_waiting = 0
                msgs = await ask("q6", {"input": "what time is it", "sessionId": "s6"})
                leader.tasks._max_waiting = 36
                assert [t for t, _ in msgs] == ["hermes/nlu/intentNotRecognized"] and msgs[0][1]["sessionId"] == "s6"
                rec = next(r for r in leader.snapshot()["requests"] if r["client_id"] == "q6")
                assert "try again shortly" in rec["error"] and rec["latency_ms"] is not None

                # an unreadable query: hermes/error/nlu with its siteId and sessionId, nothing else
                bad = json.dumps({"input": 5, "siteId": site, "sessionId": "q7"}).encode()
                msgs = await ask("q7", bad)
                assert [t for t, _ in msgs] == ["hermes/error/nlu"]
                assert (msgs[0][1]["siteId"], msgs[0][1]["sessionId"]) == (site, "q7")

                # an answer that failed after recognition shows as failed in the log
                leader.answer_failed("q3", "hermes answer lost: test")
                rec = next(r for r in leader.snapshot()["requests"] if r["client_id"] == "q3")
                assert rec["error"] == "hermes answer lost: test"

                # a last query: by its answer every earlier one has had time to be duplicated
                await ask("q8", {"input": "what time is it"})
                for key, msgs in got.items():
                    assert sum(t.startswith(terminal) for t, _ in msgs) == 1, (key, msgs)
            finally:
                listener.cancel()
