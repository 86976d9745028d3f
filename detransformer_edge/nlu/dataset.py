"""Smart-home command dataset: templates x slot values, split by template, BIO tags per wordpiece.

``build_dataset(seed)`` is deterministic. Each intent's templates (and each out-of-domain
domain's) are shuffled with the seed and dealt into train / validation / test, so a test
phrasing never occurs in training; slot values are drawn from the same lists in every split.
Out-of-domain examples carry the intent ``None`` ("not recognised") and no slots.

Spoken variety comes from the values (levels and durations as digits or words, fractions,
decimals, compound durations, "15-second" before "timer"), a leading "hey"/"okay" or a trailing
"please" now and then, the frames people put around a command (a clause of context before it, "could
you" before an imperative, a remark after it) on commands and out-of-domain utterances alike, and
the case and punctuation of speech-to-text front ends.
``could_be_generated(text)`` answers whether any template could have produced a text, so the
independent evaluation sets can be checked against it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from detransformer_edge.errors import ConfigError
from detransformer_edge.nlu.evalsets import EVAL_SETS, load_eval_set
from detransformer_edge.nlu.locks import asks_to_unlock, names_door_or_lock, says_unlock_verb
from detransformer_edge.nlu.templates import (
    DOORS,
    ITEMS,
    MEDIA,
    OOD_FILLERS,
    OUT_OF_DOMAIN,
    ROOMS,
    TEMPLATES,
)
from detransformer_edge.nlu.values import number_to_words
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS, INTENTS, LOCK_INTENTS, SLOTS

Split = Literal["train", "validation", "test"]
SLOT_NAMES: tuple[str, ...] = tuple(SLOTS)
BIO_TAGS: tuple[str, ...] = ("O",) + tuple(f"{p}-{s}" for s in SLOT_NAMES for p in ("B", "I"))
IGNORE = -100  # label of special tokens ([CLS], [SEP], padding): no loss, no prediction
_PLACEHOLDER = re.compile(r"\{(~?\w+)\}")  # "{~duration}": filled like a duration, but not a slot
PREFIXES: tuple[str, ...] = ("hey ", "okay ", "um ", "so ", "right, ", "hey there, ")
SUFFIXES: tuple[str, ...] = (" please", " thanks", " now", " thank you")
# People put a command inside a sentence: a clause of context before it, a polite frame around an
# imperative, a remark after it. Rendered on commands and out-of-domain utterances alike, so the
# frame never decides the intent, and its nouns ("work", "sleep") are never slot values. None
# starts with a question word: the lock rule would refuse a lock command after one.
LEAD_INS: tuple[str, ...] = (
    "before i forget, ", "while you're at it, ", "one more thing, ", "actually, ", "alright, ", "quick one, ",
    "sorry, ", "it's getting late, ", "i'm back, ", "we've got guests, ", "i'm working from home today, ",
    "morning, ", "evening, ", "listen, ", "i'm off to work, ", "the baby is asleep, ", "it's movie night, ",
    "ok so ", "oh and ", "just a sec, ",
)
IMPERATIVE_FRAMES: tuple[str, ...] = (  # before a template that starts with a verb
    "can you ", "could you ", "would you ", "will you ", "please ", "i'd like you to ", "i want you to ",
    "do me a favour and ", "can you please ", "just ", "could you please ", "i need you to ",
)
TAILS: tuple[str, ...] = (
    " for me", " if you can", " when you get a chance", ", thanks a lot", ", cheers", ", i'm reading",
    ", it's late", ", i'm going to sleep", ", we're going out", " right away", ", would you", " for a bit",
)
IMPERATIVE_VERBS: frozenset[str] = frozenset({  # first words that make a template an imperative
    "turn", "switch", "set", "put", "dim", "make", "lock", "unlock", "add", "play", "stop", "pause", "start",
    "cancel", "change", "adjust", "raise", "lower", "bring", "heat", "warm", "cool", "keep", "kill", "shut",
    "power", "activate", "deactivate", "flick", "get", "brighten", "darken", "increase",
    "reduce", "tell", "check", "read", "give", "create", "begin", "count", "remind", "wake", "alert",
    "delete", "remove", "clear", "abort", "end", "dismiss", "scrap", "forget", "silence", "quit", "halt",
    "resume", "unpause", "continue", "secure", "bolt", "engage", "deadbolt", "close", "release", "disengage",
    "open", "undo", "unlatch", "unbolt", "take", "write", "note", "pick", "buy", "order", "reorder",
    "send", "show", "call", "ring", "text", "mute", "unmute", "skip", "go", "mow", "vacuum", "mop", "dock",
    "return", "park", "tilt", "lift", "draw", "roll", "cross", "tick", "mark", "empty", "arm", "disarm",
    "answer", "boost", "preheat", "run", "water", "schedule", "navigate", "book", "find", "translate",
    "convert", "define", "recommend", "flip", "sing", "restart", "update", "charge", "connect",
    "throw", "stick", "fire", "queue", "crank", "bump", "drop", "knock", "jot", "grab", "ping", "hit",
})


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
    domain: str = ""  # out-of-domain examples: which domain (OUT_OF_DOMAIN key)


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
                if slot not in INTENT_SLOTS[intent] and not (slot.startswith("~") and slot[1:] in SLOTS):
                    raise ConfigError(f"template {t!r} uses slot {slot!r} that {intent} does not carry")
            if intent in LOCK_INTENTS and not names_door_or_lock(t.replace("{room}", "")):
                raise ConfigError(f"{intent} template {t!r} names no door or lock; the decision would reject it")
            if intent == "UnlockDoor" and not asks_to_unlock(t):
                raise ConfigError(f"UnlockDoor template {t!r} has no unlocking word; the decision would reject it")
            if intent == "LockDoor" and says_unlock_verb(t):
                raise ConfigError(f"LockDoor template {t!r} has an unlocking word; the decision would reject it")
    for domain, (nearness, templates) in OUT_OF_DOMAIN.items():
        if nearness not in ("near", "far"):
            raise ConfigError(f"out-of-domain group {domain!r} must be 'near' or 'far', not {nearness!r}")
        for t in templates:
            for slot in _PLACEHOLDER.findall(t):
                if slot not in SLOTS and slot not in OOD_FILLERS:
                    raise ConfigError(f"out-of-domain template {t!r} uses unknown placeholder {slot!r}")


def _spoken(rng: random.Random, n: int) -> str:
    return str(n) if rng.random() < 0.5 else number_to_words(n)


def _level(rng: random.Random, intent: str | None) -> str:
    if intent == "SetTemperature":
        n = rng.randint(15, 28) if rng.random() < 0.85 else rng.randint(60, 78)
        if rng.random() < 0.2:  # half degrees
            form = rng.random()
            if form < 0.5:
                number = f"{n}.5"
            elif form < 0.75:
                number = f"{number_to_words(n)} point five"
            else:
                number = f"{_spoken(rng, n)} and a half"
        else:
            number = _spoken(rng, n)
        return number + rng.choice(["", "", " degrees", " degrees", " degrees celsius", " degrees fahrenheit", "°"])
    if rng.random() < 0.06:
        return rng.choice(["half", "full", "max", "maximum", "fifty percent", "half way"])
    n = rng.choice([rng.randrange(5, 101, 5), rng.randint(1, 100)])
    unit = rng.choice(["", " percent", " percent", "%", " per cent"])
    return _spoken(rng, n) + unit


_UNITS = (("second", "seconds", "secs"), ("minute", "minutes", "mins"), ("hour", "hours", "hrs"))


def _duration(rng: random.Random, adjective: bool = False) -> str:
    """A spoken duration; ``adjective`` for the "15-second timer" form (singular unit, maybe a hyphen)."""
    if adjective:
        form = rng.random()
        if form < 0.1:
            return rng.choice(["half hour", "half-hour", "quarter hour", "one and a half minute", "two and a half minute"])
        n = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 45, 90]) if rng.random() < 0.8 else rng.randint(1, 59)
        unit = rng.choice(["second", "minute", "minute", "hour"]) if n < 13 else rng.choice(["second", "minute"])
        spoken = _spoken(rng, n).replace(" ", "-" if rng.random() < 0.5 else " ")
        return f"{spoken}{'-' if rng.random() < 0.5 else ' '}{unit}"
    form = rng.random()
    if form < 0.15:
        return rng.choice([
            "a minute", "an hour", "half an hour", "an hour and a half", "a second", "half a minute",
            "a minute and a half", "a quarter of an hour", "three quarters of an hour", "a couple of minutes",
            "a quarter hour", "a half hour", "one and a half hours", "1.5 hours", "two and a half hours",
            "half a second", "a couple of hours",
        ])
    n = rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 40, 45, 90]) if rng.random() < 0.7 else rng.randint(1, 59)
    k = rng.choice([0, 1, 1, 2]) if n < 10 else rng.choice([0, 1])
    names = _UNITS[k]
    unit = names[0] if n == 1 else (names[1] if rng.random() < 0.85 else names[2])
    text = f"{_spoken(rng, n)} {unit}"
    if rng.random() < 0.12 and n < 10:
        text = f"{_spoken(rng, n)} and a half {names[1]}"
    elif rng.random() < 0.25 and k > 0:  # compound: "2 hours and 30 minutes", "5 minutes 10 seconds"
        m = rng.choice([5, 10, 15, 20, 30, 45]) if rng.random() < 0.7 else rng.randint(1, 59)
        joiner = rng.choice([" and ", " ", ", "])
        text += f"{joiner}{_spoken(rng, m)} {_UNITS[k - 1][1] if m != 1 else _UNITS[k - 1][0]}"
    return text


def _items(rng: random.Random) -> str:
    value = rng.choice(ITEMS)
    if rng.random() < 0.15:
        value = f"{rng.choice(ITEMS)} and {value}"
    return value


def _value(slot: str, intent: str | None, template: str, end: int, rng: random.Random) -> str:
    if slot == "room":
        return rng.choice(DOORS if intent in LOCK_INTENTS or "door" in template or "lock" in template else ROOMS)
    if slot == "level":
        return _level(rng, intent)
    if slot == "duration":
        after = template[end:]
        return _duration(rng, adjective=after.startswith((" timer", " countdown")))
    if slot == "item":
        return _items(rng)
    if slot == "media":
        return rng.choice(MEDIA)
    if intent is None and slot in OOD_FILLERS:
        return rng.choice(OOD_FILLERS[slot])
    raise ConfigError(f"unknown slot {slot!r} in template {template!r}")


def is_imperative(template: str) -> bool:
    """Does ``template`` start with a verb (so "could you " may go before it)?"""
    first = template.split(" ", 1)[0].strip(",")
    return first in IMPERATIVE_VERBS


def _frame_before(template: str, rng: random.Random) -> list[str]:
    """What goes before a rendering: "hey " (12 %), a clause of context (8 %), a polite frame
    around an imperative (12 % of imperatives)."""
    out = []
    if rng.random() < 0.12:
        out.append(rng.choice(PREFIXES))
    if rng.random() < 0.08:
        out.append(rng.choice(LEAD_INS))
    if is_imperative(template) and rng.random() < 0.12:
        out.append(rng.choice(IMPERATIVE_FRAMES))
    return out


def _fill(template: str, intent: str | None, rng: random.Random) -> tuple[str, tuple[SlotSpan, ...]]:
    """Render one template; returns text and the character spans of its slots."""
    out: list[str] = []
    spans: list[SlotSpan] = []
    pos = 0
    length = 0
    for prefix in _frame_before(template, rng):
        out.append(prefix)
        length += len(prefix)
    for m in _PLACEHOLDER.finditer(template):
        literal = template[pos : m.start()]
        out.append(literal)
        length += len(literal)
        slot = m.group(1)
        value = _value(slot.lstrip("~"), intent, template, m.end(), rng)
        if intent is not None and not slot.startswith("~"):
            spans.append(SlotSpan(slot, length, length + len(value)))
        out.append(value)
        length += len(value)
        pos = m.end()
    out.append(template[pos:])
    r = rng.random()
    if r < 0.1:
        out.append(rng.choice(SUFFIXES))
    elif r < 0.16:
        out.append(rng.choice(TAILS))
    text = "".join(out)
    if rng.random() < 0.15:  # spoken-to-text front ends differ in case and punctuation
        text = text[0].upper() + text[1:]
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


def normalised_text(text: str) -> str:
    """Lower case, single spaces, no end punctuation: how two utterances are compared."""
    return " ".join(text.lower().strip().rstrip(".?!").split())


@lru_cache(maxsize=1)
def _independent_texts() -> frozenset[str]:
    return frozenset(normalised_text(line.text) for name in EVAL_SETS for line in load_eval_set(name))


def build_dataset(seed: int = 0, per_train_template: int = 16, per_eval_template: int = 8,
                  fractions: tuple[float, float] = (0.15, 0.12), per_plain_template: int = 10) -> Dataset:
    """The whole dataset. ``fractions`` = (validation, test) share of templates per intent and per
    out-of-domain domain; a template without placeholders gets ``per_plain_template`` tries
    (its variants differ only in prefix, suffix, case and punctuation). A rendering that equals a
    line of the independent evaluation sets (``nlu/eval``) is dropped: they stay unseen."""
    _check_vocabulary()
    held_out = _independent_texts()
    rng = random.Random(seed)
    ds = Dataset()
    groups: list[tuple[str | None, str, tuple[str, ...]]] = [(i, "", TEMPLATES[i]) for i in INTENTS]
    groups += [(None, domain, templates) for domain, (_, templates) in OUT_OF_DOMAIN.items()]
    for intent, domain, templates in groups:
        dealt = _deal(templates, rng, fractions)
        for split, chosen in dealt.items():
            per = per_train_template if split == "train" else per_eval_template
            seen: set[str] = set()
            for template in chosen:
                tries = per if _PLACEHOLDER.search(template) else per_plain_template
                for _ in range(tries):
                    text, spans = _fill(template, intent, rng)
                    if text in seen or normalised_text(text) in held_out:
                        continue
                    seen.add(text)
                    ds.split(split).append(Example(text, intent, spans, template, domain))
    for split in ("train", "validation", "test"):
        random.Random(seed + 1).shuffle(ds.split(split))
    return ds


def nearness(domain: str) -> str:
    """'near' or 'far' for an out-of-domain domain."""
    return OUT_OF_DOMAIN[domain][0]


# --------------------------------------------------------------------------------------------
# Could a template have produced this text?

_NUMBERISH = (r"(?:[\d.]+|a|an|half|quarter|three|couple|one|two|four|five|six|seven|eight|nine|ten|eleven|"
              r"twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|"
              r"sixty|seventy|eighty|ninety|hundred|full|max|maximum)\b[\w .%°'-]*")


def _alternation(values: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"


@lru_cache(maxsize=1)
def _template_patterns() -> tuple[re.Pattern[str], ...]:
    slot_pattern = {
        "room": _alternation(ROOMS + DOORS),
        "item": f"{_alternation(ITEMS)}(?: and {_alternation(ITEMS)})?",
        "media": _alternation(MEDIA),
        "level": _NUMBERISH, "duration": _NUMBERISH,
        **{k: _alternation(v) for k, v in OOD_FILLERS.items()},
    }
    prefix = f"(?:{_alternation(tuple(p.strip() for p in PREFIXES))}[ ,]*)?"
    lead_in = f"(?:{_alternation(tuple(p.strip() for p in LEAD_INS))}[ ,]*)?"
    frame = f"(?:{_alternation(tuple(p.strip() for p in IMPERATIVE_FRAMES))} )?"
    suffix = f"(?:{_alternation(tuple(s.strip() for s in SUFFIXES))}|{_alternation(tuple(s.strip(' ,') for s in TAILS))})"
    templates = [t for ts in TEMPLATES.values() for t in ts] + [t for _, ts in OUT_OF_DOMAIN.values() for t in ts]
    out = []
    for t in templates:
        body = "".join(slot_pattern[piece.lstrip("~")] if k % 2 else re.escape(piece)
                       for k, piece in enumerate(_PLACEHOLDER.split(t)))
        before = prefix + lead_in + (frame if is_imperative(t) else "")
        out.append(re.compile(f"{before}{body}(?:,? {suffix})?[.?]?", re.IGNORECASE))
    return tuple(out)


def could_be_generated(text: str) -> str | None:
    """The pattern of the first template that could render ``text`` with some value from the
    lists, else None: the phrasing of ``text`` is covered by the templates."""
    t = normalised_text(text)
    for pattern in _template_patterns():
        if pattern.fullmatch(t):
            return pattern.pattern
    return None


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


MAX_LEN = 48  # spoken commands are short; longer input is cut


@dataclass(frozen=True)
class EncodedText:
    """Tokens of one text: ids, character offsets, which are special ([CLS]/[SEP])."""

    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]


def encode_text(tokenizer: Any, text: str, max_len: int = MAX_LEN) -> EncodedText:
    """Wordpieces of ``text`` with offsets, cut to ``max_len`` tokens keeping the final [SEP]."""
    enc = tokenizer.backend.encode(text)
    ids, offs, spec = list(enc.ids), list(enc.offsets), [bool(m) for m in enc.special_tokens_mask]
    if len(ids) > max_len:
        ids, offs, spec = ids[: max_len - 1] + ids[-1:], offs[: max_len - 1] + offs[-1:], spec[: max_len - 1] + spec[-1:]
    return EncodedText(tuple(ids), tuple((int(a), int(b)) for a, b in offs), tuple(spec))
