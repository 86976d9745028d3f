"""Smart-home dataset: template split, BIO tags on wordpieces, slot value normalisation."""

from __future__ import annotations

import pytest

from detransformer_edge.nlu.dataset import (
    BIO_TAGS,
    IGNORE,
    SlotSpan,
    bio_labels,
    build_dataset,
    spans_from_bio,
)
from detransformer_edge.nlu.values import (
    SlotValueError,
    normalise,
    number_to_words,
    parse_duration,
    parse_level,
)
from detransformer_edge.nlu.vocabulary import INTENTS, KIND_NUMBER, KIND_PERCENTAGE


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from detransformer_edge.model.tokenizer import TextTokenizer
    from detransformer_edge.weights.sources import weights_path

    return TextTokenizer.from_file(weights_path("minilm-l6").parent / "tokenizer.json")


def test_test_templates_never_appear_in_training(dataset) -> None:
    train = {e.template for e in dataset.train}
    val = {e.template for e in dataset.validation}
    test = {e.template for e in dataset.test}
    assert not train & test and not train & val and not val & test
    assert not {e.text for e in dataset.train} & {e.text for e in dataset.test}
    for split in (dataset.train, dataset.validation, dataset.test):
        assert {e.intent for e in split} == set(INTENTS) | {None}  # every intent + out of domain


def test_dataset_is_deterministic(dataset) -> None:
    again = build_dataset(seed=0)
    assert again.test == dataset.test and again.train[:50] == dataset.train[:50]
    assert build_dataset(seed=1).test != dataset.test


def test_spans_cover_the_slot_text(dataset) -> None:
    for e in dataset.train[:300]:
        for s in e.spans:
            raw = e.text[s.start : s.end]
            assert raw == raw.strip() and raw
            normalise(s.slot_name, raw)  # every generated value normalises


def test_bio_round_trips_on_wordpieces(dataset, tokenizer) -> None:
    from detransformer_edge.nlu.dataset import encode_text

    for e in dataset.train[:400] + dataset.test:
        enc = encode_text(tokenizer, e.text)
        labels = bio_labels(enc.offsets, enc.special, e.spans)
        assert [lab == IGNORE for lab in labels] == list(enc.special)
        assert sorted(spans_from_bio(labels, enc.offsets), key=lambda s: s.start) == sorted(e.spans, key=lambda s: s.start)


def test_bio_tags_on_a_split_word(tokenizer) -> None:
    from detransformer_edge.nlu.dataset import encode_text

    text = "add sparkling water to the list"
    enc = encode_text(tokenizer, text)
    labels = bio_labels(enc.offsets, enc.special, [SlotSpan("item", 4, 19)])
    tags = [BIO_TAGS[x] if x != IGNORE else "-" for x in labels]
    assert tags[:4] == ["-", "O", "B-item", "I-item"] and tags.count("B-item") == 1
    assert spans_from_bio(labels, enc.offsets) == [SlotSpan("item", 4, 19)]


@pytest.mark.parametrize(("text", "value", "kind"), [
    ("50 percent", 50, KIND_PERCENTAGE), ("fifty %", 50, KIND_PERCENTAGE), ("twenty one degrees", 21, KIND_NUMBER),
    ("one hundred per cent", 100, KIND_PERCENTAGE), ("7", 7, KIND_NUMBER),
])
def test_level_values(text: str, value: int, kind: str) -> None:
    assert parse_level(text) == (value, kind)


@pytest.mark.parametrize(("text", "seconds"), [
    ("5 minutes", 300), ("five minutes", 300), ("an hour", 3600), ("half an hour", 1800),
    ("an hour and a half", 5400), ("1 hour and 30 minutes", 5400), ("two and a half minutes", 150),
    ("ninety seconds", 90), ("twenty five minutes", 1500),
])
def test_duration_values_are_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_bad_values_raise_typed_errors() -> None:
    with pytest.raises(SlotValueError):
        parse_level("bright")
    with pytest.raises(SlotValueError):
        parse_duration("five")
    assert number_to_words(42) == "forty two"
    assert normalise("room", " Living  Room").value == "living room"
