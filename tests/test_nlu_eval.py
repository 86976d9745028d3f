"""The independent evaluation sets: well-formed, large enough, unseen in the generated data;
the scoring counts what the report says it counts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from detransformer_edge.nlu.dataset import build_dataset, could_be_generated, normalised_text
from detransformer_edge.nlu.evalsets import EVAL_SETS, EvalSetError, load_eval_set
from detransformer_edge.nlu.evaluate import parse_lines, score


@pytest.fixture(scope="module")
def sets():
    return {name: load_eval_set(name) for name in EVAL_SETS}


def test_sets_are_large_enough_and_cover_every_intent(sets) -> None:
    in_domain = [x for name in ("household", "slot_values") for x in sets[name] if x.intent]
    ood = sets["out_of_domain"]
    assert len(in_domain) >= 400 and len({x.intent for x in in_domain}) == 15
    assert sum(x.ood == "near" for x in ood) >= 150 and sum(x.ood == "far" for x in ood) >= 100
    items = {v for x in in_domain for v in x.slots.get("item", ())}
    assert {"ground beef", "peanut butter", "toothpaste", "avocados"} <= items
    durations = {v for x in in_domain for v in x.slots.get("duration", ())}
    assert {30, 15, 10800, 9000} <= durations  # half a minute, 15-second, 3-hour, 2 hours and 30 minutes
    assert 24.5 in {v for x in in_domain for v in x.slots.get("level", ())}
    texts = [normalised_text(x.text) for name in EVAL_SETS for x in sets[name]]
    assert len(texts) == len(set(texts)), "a line occurs twice"


def test_no_test_utterance_occurs_in_the_generated_data(sets) -> None:
    ds = build_dataset(seed=0)
    generated = {normalised_text(e.text) for split in (ds.train, ds.validation, ds.test) for e in split}
    leaked = [x.text for name in EVAL_SETS for x in sets[name] if normalised_text(x.text) in generated]
    assert not leaked


def test_the_paraphrase_set_is_phrased_unlike_any_template(sets) -> None:
    covered = [x.text for x in sets["paraphrase"] if could_be_generated(x.text)]
    assert len(covered) <= 0.02 * len(sets["paraphrase"]), covered
    assert could_be_generated("set a timer for 10 minutes") and could_be_generated("Lock the front door.")
    assert not could_be_generated("abort the timer")  # "a" is not a number inside "abort"


def test_a_bad_line_names_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "household.jsonl").write_text('{"text": "lights on", "intent": "TurnOnLight", "slots": {}}\n'
                                              '{"text": "x", "intent": "Dance", "slots": {}}\n')
    with pytest.raises(EvalSetError, match=r"household.jsonl:2: unknown intent 'Dance'"):
        load_eval_set("household", tmp_path)
    (tmp_path / "out_of_domain.jsonl").write_text('{"text": "hi", "intent": null, "slots": {}}\n')
    with pytest.raises(EvalSetError, match="near"):
        load_eval_set("out_of_domain", tmp_path)
    with pytest.raises(EvalSetError, match="no evaluation set"):
        load_eval_set("missing", tmp_path)


def test_scoring_counts_false_unlocks_and_exact_values(tmp_path: Path) -> None:
    (tmp_path / "household.jsonl").write_text(
        '{"text": "set a timer for half a minute", "intent": "SetTimer", "slots": {"duration": 30}}\n'
        '{"text": "put ground beef on the list", "intent": "AddToShoppingList", "slots": {"item": "ground beef"}}\n'
        '{"text": "return the vacuum to base", "intent": null, "ood": "near", "slots": {}}\n'
        '{"text": "tell me a joke", "intent": null, "ood": "far", "slots": {}}\n')
    answers = {
        "set a timer for half a minute": ("SetTimer", [("duration", 60)]),
        "put ground beef on the list": ("AddToShoppingList", [("item", "ground beef")]),
        "return the vacuum to base": ("UnlockDoor", []),
        "tell me a joke": (None, []),
    }
    parser = SimpleNamespace(parse=lambda text: SimpleNamespace(
        intent_name=answers[text][0], slots=[SimpleNamespace(slot_name=k, value=v) for k, v in answers[text][1]]))
    s = score(parse_lines(parser, load_eval_set("household", tmp_path))).summary()
    assert s["intent_accuracy"] == 1.0 and s["false_rejection"] == 0.0
    assert s["slot_exact"]["duration"] == (0.0, 1) and s["slot_exact"]["item"] == (1.0, 1)
    assert s["near_rejection"] == 0.0 and s["far_rejection"] == 1.0 and s["false_unlocks"] == 1
