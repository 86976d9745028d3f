"""The decision after the heads: rejection thresholds, the lock rule, clean slots, spoken values,
and the calibration that picks the thresholds. Pure functions: no model is loaded."""

from __future__ import annotations

import pytest
import torch

from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.nlu.calibration import CalibrationTarget, choose_thresholds
from detransformer_edge.nlu.dataset import SlotSpan
from detransformer_edge.nlu.decision import (
    INTENT_LABELS,
    NOT_RECOGNISED,
    Thresholds,
    clean_slots,
    clean_spans,
    decide,
)
from detransformer_edge.nlu.locks import is_question, names_door_or_lock
from detransformer_edge.nlu.values import SlotValueError, normalise, parse_duration, parse_level
from detransformer_edge.nlu.vocabulary import INTENTS, KIND_NUMBER, KIND_PERCENTAGE


def _probs(label: str, conf: float) -> torch.Tensor:
    p = torch.full((len(INTENT_LABELS),), (1 - conf) / (len(INTENT_LABELS) - 1))
    p[INTENT_LABELS.index(label)] = conf
    return p


@pytest.mark.parametrize(("text", "names"), [
    ("unlock the front door", True), ("open the lock", True), ("lock up", True), ("release the deadbolt", True),
    ("unlock my phone", False), ("unlock the car", False), ("return the vacuum cleaner to base", False),
    ("unlock the garage", False), ("unblock the sink", False), ("the doorbell rang", False),
])
def test_door_or_lock_words(text: str, names: bool) -> None:
    assert names_door_or_lock(text) is names


@pytest.mark.parametrize(("text", "question"), [
    ("is the back door locked", True), ("hey, who unlocked the front door", True), ("did I lock the door", True),
    ("lock the back door", False), ("can you unlock the front door", False), ("okay lock up", False),
])
def test_questions_about_locks(text: str, question: bool) -> None:
    assert is_question(text) is question


def test_decide_rejects_below_threshold_without_a_door_and_on_questions() -> None:
    th = Thresholds({**{i: 0.5 for i in INTENTS}, "UnlockDoor": 0.95})
    assert decide(_probs("TurnOnLight", 0.9), "lights on", th) == ("TurnOnLight", pytest.approx(0.9))
    assert decide(_probs("TurnOnLight", 0.4), "lights on", th)[0] is None
    assert decide(_probs(NOT_RECOGNISED, 0.9), "tell me a joke", th)[0] is None  # the best intent has 0.007
    assert decide(_probs("LockDoor", 0.99), "is the back door locked", th)[0] is None
    assert decide(_probs("UnlockDoor", 0.99), "unlock the front door", th)[0] == "UnlockDoor"
    assert decide(_probs("UnlockDoor", 0.99), "return the vacuum cleaner to base", th)[0] is None  # no door named
    assert decide(_probs("UnlockDoor", 0.9), "unlock the front door", th)[0] is None  # stricter threshold


@pytest.mark.parametrize("text", ["unbolt the side door please", "unlatch the front door", "unlock the back door",
                                  "let me in the front door", "i'm outside, let her in through the side door"])
def test_an_unlocking_utterance_is_never_answered_with_a_lock(text: str) -> None:
    """The model once answered "unbolt the side door please" with LockDoor at its threshold: an un-
    verb or "let ... in" rules LockDoor out, and the rule rejects rather than flipping to an unlock."""
    th = Thresholds({i: 0.5 for i in INTENTS})
    assert decide(_probs("LockDoor", 0.999), text, th)[0] is None
    assert decide(_probs("LockDoor", 0.999), "lock the side door please", th)[0] == "LockDoor"


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="missing"):
        Thresholds({"TurnOnLight": 0.5})
    with pytest.raises(ConfigError, match="0..1"):
        Thresholds({**{i: 0.5 for i in INTENTS}, "GetTime": 1.5})
    assert Thresholds.from_config({"threshold": 0.3}).of("GetTime") == 0.3  # a model saved before per-intent ones
    assert Thresholds.from_config({"thresholds": {i: 0.1 for i in INTENTS}}).of("LockDoor") == 0.1


def _span(text: str, slot: str, piece: str, nth: int = 0) -> SlotSpan:
    start = -1
    for _ in range(nth + 1):
        start = text.index(piece, start + 1)
    return SlotSpan(slot, start, start + len(piece))


def _values(text: str, intent: str, spans: list[SlotSpan]) -> dict[str, object]:
    return {s.slot_name: s.value for s in clean_slots(text, intent, spans)}


def test_spans_are_widened_to_whole_words_and_joined() -> None:
    text = "add avocados to the list"
    assert _values(text, "AddToShoppingList", [_span(text, "item", "av"), _span(text, "item", "dos")]) == {"item": "avocados"}
    text = "we need toothpaste"
    assert _values(text, "AddToShoppingList", [_span(text, "item", "toothpas")]) == {"item": "toothpaste"}
    text = "put peanut butter on the list"
    assert _values(text, "AddToShoppingList", [_span(text, "item", "peanut"), _span(text, "item", "butter")]) == \
        {"item": "peanut butter"}
    text = "set a timer for 2 hours and 30 minutes"
    got = clean_slots(text, "SetTimer", [_span(text, "duration", "2 hours"), _span(text, "duration", "30 minutes")])
    assert [(s.slot_name, s.value, s.raw_value) for s in got] == [("duration", 9000, "2 hours and 30 minutes")]
    text = "set the heating to 24.5 degrees"
    assert _values(text, "SetTemperature", [_span(text, "level", "24"), _span(text, "level", "5 degrees")]) == \
        {"level": 24.5}


def test_a_room_word_inside_an_item_stays_in_the_item() -> None:
    text = "put ground beef on the list"
    spans = [_span(text, "room", "ground"), _span(text, "item", "beef")]
    assert _values(text, "AddToShoppingList", spans) == {"item": "ground beef"}
    text = "can you put kitchen roll on the shopping list"
    assert _values(text, "AddToShoppingList", [_span(text, "room", "kitchen"), _span(text, "item", "roll")]) == \
        {"item": "kitchen roll"}


def test_slots_the_intent_does_not_take_are_dropped() -> None:
    text = "set a 3 minute timer for the eggs"
    spans = [_span(text, "duration", "3 minute"), _span(text, "item", "eggs")]
    assert _values(text, "SetTimer", spans) == {"duration": 180}
    text = "remove the kitchen timer"
    assert clean_slots(text, "CancelTimer", [_span(text, "room", "kitchen")]) == []
    assert clean_spans("x", "GetTime", []) == []


def test_a_span_without_a_value_is_dropped_not_raised() -> None:
    text = "set the lights to bright"
    assert clean_slots(text, "SetBrightness", [_span(text, "level", "bright")]) == []


@pytest.mark.parametrize(("text", "seconds"), [
    ("half a minute", 30), ("15-second", 15), ("3-hour", 10800), ("2 hours and 30 minutes", 9000),
    ("an hour and a half", 5400), ("a minute and a half", 90), ("1.5 hours", 5400), ("one and a half hours", 5400),
    ("four and a half minutes", 270), ("three quarters of an hour", 2700), ("a quarter of an hour", 900),
    ("a quarter hour", 900), ("a couple of minutes", 120), ("1 hour 45 minutes", 6300), ("1 hour 45", 6300),
    ("2 minutes 30 seconds", 150), ("twenty-five minute", 1500), ("five minutes and ten seconds", 310),
    ("2 hrs", 7200), ("30 mins", 1800), ("ninety seconds", 90), ("one hundred seconds", 100), ("a second", 1),
    ("two hours and a half", 9000), ("an hour and a quarter", 4500), ("7 and a half minute", 450),
])
def test_spoken_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "value", "kind"), [
    ("24.5 degrees", 24.5, KIND_NUMBER), ("twenty two point five", 22.5, KIND_NUMBER),
    ("twenty three and a half", 23.5, KIND_NUMBER), ("2.5 percent", 2.5, KIND_PERCENTAGE),
    ("seventy five percent", 75, KIND_PERCENTAGE), ("half", 50, KIND_NUMBER), ("max", 100, KIND_NUMBER),
    ("one hundred per cent", 100, KIND_PERCENTAGE), ("80%", 80, KIND_PERCENTAGE),
])
def test_spoken_levels(text: str, value: float, kind: str) -> None:
    assert parse_level(text) == (value, kind)


@pytest.mark.parametrize(("slot", "raw", "value"), [
    ("item", "some parmesan", "parmesan"), ("item", "a pineapple", "pineapple"), ("item", "More cat litter.", "cat litter"),
    ("item", "extra virgin olive oil", "extra virgin olive oil"), ("room", "the Living  Room", "living room"),
    ("media", "the beatles", "the beatles"), ("media", "some jazz", "jazz"),
])
def test_words_are_cleaned(slot: str, raw: str, value: str) -> None:
    assert normalise(slot, raw).value == value


def test_bad_values_are_typed_errors_with_a_hint() -> None:
    with pytest.raises(SlotValueError, match="no unit"):
        parse_duration("five")
    with pytest.raises(SlotValueError, match="no duration"):
        parse_duration("soon")
    with pytest.raises(SlotValueError, match="no number"):
        parse_level("bright")
    assert issubclass(SlotValueError, DetransformerError)


def test_calibration_meets_its_target_and_keeps_locks_strict() -> None:
    # validation: lights answered at 0.95, out-of-domain that looks like lights at 0.6 and 0.7,
    # an unlock with a door at 0.97, an out-of-domain "unlock" with a door at 0.93
    rows = [("TurnOnLight", "TurnOnLight", 0.95, "lights on")] * 20 + [
        (None, "TurnOnLight", 0.6, "open the blinds"), (None, "TurnOnLight", 0.7, "make the lights blue"),
        ("UnlockDoor", "UnlockDoor", 0.97, "unlock the front door"), (None, "UnlockDoor", 0.93, "unlock the car door"),
        (None, "UnlockDoor", 0.99, "unlock my phone"),  # no door named: rejected before any threshold
        (None, "LockDoor", 0.99, "is the back door locked"),  # a question: rejected before any threshold
    ] + [(None, NOT_RECOGNISED, 0.9, "tell me a joke")] * 100
    probs = [_probs(label, conf) for _, label, conf, _ in rows]
    th, summary = choose_thresholds(probs, [r[3] for r in rows], [r[0] for r in rows], CalibrationTarget(0.01, 0.9))
    assert 0.7 < th.of("TurnOnLight") <= 0.95
    assert 0.93 < th.of("UnlockDoor") <= 0.97 and th.of("LockDoor") >= 0.9
    assert summary["met"] and summary["validation_false_acceptance"] == 0.0
    with pytest.raises(ConfigError):
        CalibrationTarget(max_false_acceptance=1.5)


def test_an_intent_without_evidence_takes_the_pooled_threshold() -> None:
    # SetTemperature: commands at 0.95 and no out-of-domain row of its own, so its own cost is
    # flat on 0..0.95; the lights' false acceptances at 0.6 and 0.7 put the pooled optimum above
    # 0.7, and the pooled term carries it there instead of the flat range's middle.
    rows = [("TurnOnLight", "TurnOnLight", 0.95, "lights on")] * 20 + [
        (None, "TurnOnLight", 0.6, "open the blinds"), (None, "TurnOnLight", 0.7, "make the lights blue"),
    ] + [("SetTemperature", "SetTemperature", 0.95, "heat to 20")] * 20 + [(None, NOT_RECOGNISED, 0.9, "hi")] * 100
    probs = [_probs(label, conf) for _, label, conf, _ in rows]
    args = (probs, [r[3] for r in rows], [r[0] for r in rows], CalibrationTarget(0.01, 0.9))
    pooled, _ = choose_thresholds(*args)
    alone, _ = choose_thresholds(*args, pooled_weight=0.0)
    assert 0.7 < pooled.of("SetTemperature") <= 0.95 and alone.of("SetTemperature") < 0.6
    assert 0.7 < pooled.of("TurnOnLight") <= 0.95


def test_rare_intents_weigh_more() -> None:
    from detransformer_edge.nlu.dataset import Example
    from detransformer_edge.training.intent import class_weights

    examples = [Example("x", None, (), "x")] * 90 + [Example("y", "GetTime", (), "y")] * 10
    w = class_weights(examples)
    assert w[INTENT_LABELS.index("GetTime")] == pytest.approx(3 * w[INTENT_LABELS.index(NOT_RECOGNISED)])
    assert (90 * w[INTENT_LABELS.index(NOT_RECOGNISED)] + 10 * w[INTENT_LABELS.index("GetTime")]) / 100 == \
        pytest.approx(1.0)
