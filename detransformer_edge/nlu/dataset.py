"""Smart-home command dataset: templates x slot values, split by template, BIO tags per wordpiece.

``build_dataset(seed)`` is deterministic. Each intent's templates (and the out-of-domain
templates) are shuffled with the seed and dealt into train / validation / test, so a test
phrasing never occurs in training; slot values are drawn from the same lists in every split.
Out-of-domain examples carry the intent ``None`` ("not recognised").
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from detransformer_edge.errors import ConfigError
from detransformer_edge.nlu.templates import (
    DOORS,
    ITEMS,
    OOD_FILLERS,
    OUT_OF_DOMAIN,
    ROOMS,
    TEMPLATES,
)
from detransformer_edge.nlu.values import number_to_words
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS, INTENTS, SLOTS

Split = Literal["train", "validation", "test"]
SLOT_NAMES: tuple[str, ...] = tuple(SLOTS)
BIO_TAGS: tuple[str, ...] = ("O",) + tuple(f"{p}-{s}" for s in SLOT_NAMES for p in ("B", "I"))
IGNORE = -100  # label of special tokens ([CLS], [SEP], padding): no loss, no prediction
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class SlotSpan:
    slot_name: str
    start: int  # character offsets into the text, end exclusive
    end: int


@dataclass(frozen=True)
class Example:
    text: str
    intent: str | None  # None: out of domain
    spans: tuple[SlotSpan, ...]
    template: str


@dataclass
class Dataset:
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def split(self, name: Split) -> list[Example]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def _check_vocabulary() -> None:
    if set(TEMPLATES) != set(INTENTS):
        raise ConfigError(f"templates and vocabulary.INTENTS disagree: {set(TEMPLATES) ^ set(INTENTS)}")
    for intent, templates in TEMPLATES.items():
        for t in templates:
            for slot in _PLACEHOLDER.findall(t):
                if slot not in INTENT_SLOTS[intent]:
                    raise ConfigError(f"template {t!r} uses slot {slot!r} that {intent} does not carry")


def _level(rng: random.Random, intent: str) -> str:
    if intent == "SetTemperature":
        n = rng.randint(15, 28)
        unit = rng.choice(["", " degrees", " degrees", " degrees celsius"])
    else:
        n = rng.choice([rng.randrange(5, 101, 5), rng.randint(1, 100)])
        unit = rng.choice(["", " percent", " percent", "%", " per cent"])
    number = str(n) if rng.random() < 0.5 else number_to_words(n)
    return number + unit


def _duration(rng: random.Random) -> str:
    form = rng.random()
    if form < 0.12:
        return rng.choice(["a minute", "an hour", "half an hour", "an hour and a half", "a second"])
    n = rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 40, 45, 90]) if rng.random() < 0.7 else rng.randint(1, 59)
    unit = rng.choice(["second", "minute", "minute", "hour"]) if n < 10 else rng.choice(["second", "minute"])
    spoken = str(n) if rng.random() < 0.5 else number_to_words(min(n, 100))
    text = f"{spoken} {unit}{'' if n == 1 else 's'}"
    if form > 0.9 and unit == "hour":
        m = rng.choice([10, 15, 20, 30, 45])
        text += f" and {m if rng.random() < 0.5 else number_to_words(m)} minutes"
    return text


def _fill(template: str, intent: str | None, rng: random.Random) -> tuple[str, tuple[SlotSpan, ...]]:
    """Render one template; returns text and the character spans of its slots."""
    out: list[str] = []
    spans: list[SlotSpan] = []
    pos = 0
    length = 0
    for m in _PLACEHOLDER.finditer(template):
        literal = template[pos : m.start()]
        out.append(literal)
        length += len(literal)
        slot = m.group(1)
        if intent is None:
            value = rng.choice(OOD_FILLERS[slot])
        elif slot == "room":
            value = rng.choice(DOORS if intent in ("LockDoor", "UnlockDoor") else ROOMS)
        elif slot == "level":
            value = _level(rng, intent)
        elif slot == "duration":
            value = _duration(rng)
        elif slot == "item":
            value = rng.choice(ITEMS)
            if rng.random() < 0.2:
                value = f"{rng.choice(ITEMS)} and {value}"
        else:
            raise ConfigError(f"unknown slot {slot!r} in template {template!r}")
        if intent is not None:
            spans.append(SlotSpan(slot, length, length + len(value)))
        out.append(value)
        length += len(value)
        pos = m.end()
    out.append(template[pos:])
    text = "".join(out)
    if rng.random() < 0.15:  # spoken-to-text front ends differ in case and punctuation
        text = text.capitalize()
    if rng.random() < 0.15:
        text += "?" if text.lower().startswith(("what", "how", "is ", "will", "do ", "can", "who")) else "."
    return text, tuple(spans)


def _deal(items: Sequence[str], rng: random.Random, fractions: tuple[float, float]) -> dict[Split, list[str]]:
    """Shuffle and deal into train / validation / test (each gets at least one)."""
    order = list(items)
    rng.shuffle(order)
    n = len(order)
    n_test = max(1, round(n * fractions[1]))
    n_val = max(1, round(n * fractions[0]))
    return {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def build_dataset(seed: int = 0, per_train_template: int = 30, per_eval_template: int = 12,
                  fractions: tuple[float, float] = (0.15, 0.2)) -> Dataset:
    """The whole dataset. ``fractions`` = (validation, test) share of templates per intent."""
    _check_vocabulary()
    rng = random.Random(seed)
    ds = Dataset()
    groups: list[tuple[str | None, tuple[str, ...]]] = [(i, TEMPLATES[i]) for i in INTENTS]
    groups.append((None, OUT_OF_DOMAIN))
    for intent, templates in groups:
        dealt = _deal(templates, rng, fractions)
        for split, chosen in dealt.items():
            per = per_train_template if split == "train" else per_eval_template
            seen: set[str] = set()
            for template in chosen:
                n_slots = len(_PLACEHOLDER.findall(template))
                tries = per if n_slots else 1  # a template without slots has one rendering (+ variants)
                for _ in range(max(tries, 3 if not n_slots else 0)):
                    text, spans = _fill(template, intent, rng)
                    if text in seen:
                        continue
                    seen.add(text)
                    ds.split(split).append(Example(text, intent, spans, template))
    for split in ("train", "validation", "test"):
        random.Random(seed + 1).shuffle(ds.split(split))
    return ds


# --------------------------------------------------------------------------------------------
# BIO tags on wordpieces


def bio_labels(offsets: Sequence[tuple[int, int]], special: Sequence[bool], spans: Sequence[SlotSpan]) -> list[int]:
    """Tag index per token: B-slot on the first token inside a span, I-slot on the rest, O outside,
    IGNORE on special tokens. ``offsets`` are the tokenizer's character offsets."""
    labels: list[int] = []
    for (s, e), is_special in zip(offsets, special, strict=True):
        if is_special:
            labels.append(IGNORE)
            continue
        tag = "O"
        for span in spans:
            if s >= span.start and e <= span.end and e > s:
                first = not any(lab != IGNORE and _inside(offsets[k], span) for k, lab in enumerate(labels))
                tag = f"{'B' if first else 'I'}-{span.slot_name}"
                break
        labels.append(BIO_TAGS.index(tag))
    return labels


def _inside(offset: tuple[int, int], span: SlotSpan) -> bool:
    return offset[0] >= span.start and offset[1] <= span.end and offset[1] > offset[0]


def spans_from_bio(tags: Sequence[int], offsets: Sequence[tuple[int, int]]) -> list[SlotSpan]:
    """Inverse of ``bio_labels``: character spans from tag indices (an I- without B- starts a span)."""
    spans: list[SlotSpan] = []
    current: list[int] | None = None  # [slot index, start, end]
    cur_name = ""
    for tag_id, (s, e) in zip(tags, offsets, strict=True):
        tag = BIO_TAGS[tag_id] if tag_id != IGNORE else "O"
        if tag == "O" or e <= s:
            if current is not None:
                spans.append(SlotSpan(cur_name, current[0], current[1]))
                current = None
            continue
        prefix, name = tag.split("-", 1)
        if prefix == "I" and current is not None and name == cur_name:
            current[1] = e
            continue
        if current is not None:
            spans.append(SlotSpan(cur_name, current[0], current[1]))
        current, cur_name = [s, e], name
    if current is not None:
        spans.append(SlotSpan(cur_name, current[0], current[1]))
    return spans
