"""Slot values: how they are spoken (for the dataset) and how they are normalised (for parsing).

Normalised values, as ``nlu/vocabulary.py`` documents them:

* ``level``: a number (``"50 percent"``, ``"fifty %"``, ``"twenty two point five degrees"``,
  ``"23.5"``, ``"half"``, ``"max"`` -> 50, 50, 22.5, 23.5, 50, 100); kind ``Percentage`` when a
  percent word or sign is present, else ``Number``.
* ``duration``: total seconds (``"5 minutes"`` -> 300, ``"half a minute"`` -> 30,
  ``"2 hours and 30 minutes"`` -> 9000, ``"15-second"`` -> 15), kind ``Duration``. Seconds rather
  than ISO 8601: a timer needs arithmetic, not a string.
* ``room``, ``item``, ``media``: the lower-cased words, without a leading article or quantity word
  (``"some peanut butter"`` -> ``"peanut butter"``), kind ``Custom``.

Number words are read by ``text2num`` (``text_to_num.alpha2digit``): it is maintained, handles
"one hundred and five", "twenty two point five" and digits mixed with words. What it leaves to us
is spoken arithmetic on units: fractions ("half a minute", "three quarters of an hour", "an hour
and a half"), quantities ("a couple of minutes") and compound durations ("1 hour 45 minutes").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from text_to_num import alpha2digit

from detransformer_edge.errors import DetransformerError
from detransformer_edge.nlu.vocabulary import (
    KIND_CUSTOM,
    KIND_DURATION,
    KIND_NUMBER,
    KIND_PERCENTAGE,
)


class SlotValueError(DetransformerError, ValueError):
    """A slot's text could not be turned into a value (e.g. a level without a number)."""


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS = frozenset(_ONES) | frozenset(t for t in _TENS if t) | {"hundred", "thousand"}
_UNIT_SECONDS = {"second": 1, "seconds": 1, "sec": 1, "secs": 1, "s": 1,
                 "minute": 60, "minutes": 60, "min": 60, "mins": 60,
                 "hour": 3600, "hours": 3600, "hr": 3600, "hrs": 3600, "h": 3600}
_PERCENT = re.compile(r"(%|\bpercent\b|\bper cent\b|\bpercentage\b)")
_LEADING_WORDS = frozenset({"a", "an", "the", "some", "more", "any", "another"})
_MEDIA_LEADING_WORDS = frozenset({"a", "an", "some"})  # "the beatles" keeps its article
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+")


def number_to_words(n: int) -> str:
    """0..100 in words: 42 -> 'forty two'."""
    if not 0 <= n <= 100:
        raise SlotValueError(f"can only spell 0..100, got {n}")
    if n == 100:
        return "one hundred"
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])


def _tokens(text: str) -> list[str | float]:
    """Words of ``text`` with every spoken or written number turned into a float.

    Runs of number words ("twenty two point five", "one hundred and five") are read by text2num;
    "and" joins a run only after "hundred"/"thousand", "point" only before another number word."""
    words = _TOKEN.findall(text.lower().replace("-", " ").replace("'", ""))
    out: list[str | float] = []
    k = 0
    while k < len(words):
        w = words[k]
        if w[0].isdigit():
            out.append(float(w))
            k += 1
            continue
        if w not in _NUMBER_WORDS:
            out.append(w)
            k += 1
            continue
        j = k + 1
        while j < len(words):
            nxt = words[j]
            if nxt in _NUMBER_WORDS:
                j += 1
            elif nxt == "and" and words[j - 1] in ("hundred", "thousand") and j + 1 < len(words) \
                    and words[j + 1] in _NUMBER_WORDS:
                j += 1
            elif nxt == "point" and j + 1 < len(words) and words[j + 1] in _ONES:
                j += 1
            else:
                break
        for piece in alpha2digit(" ".join(words[k:j]), "en", threshold=0).split():
            try:
                out.append(float(piece))
            except ValueError:
                out.append(piece)
        k = j
    return out


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 3)


def parse_level(text: str) -> tuple[int | float, str]:
    """'50 percent' -> (50, 'Percentage'); 'twenty one degrees' -> (21, 'Number');
    '23 and a half' -> 23.5; 'half' -> 50; 'max' -> 100."""
    t = text.lower()
    kind = KIND_PERCENTAGE if _PERCENT.search(t) else KIND_NUMBER
    toks = _tokens(t)
    for k, tok in enumerate(toks):
        if isinstance(tok, float):
            value = tok
            if toks[k + 1 : k + 4] == ["and", "a", "half"]:
                value += 0.5
            return _as_number(value), kind
    if "half" in toks:
        return 50, kind
    if any(w in toks for w in ("max", "maximum", "full", "fully")):
        return 100, kind
    raise SlotValueError(f"no number in level {text!r}; say it as digits or words, e.g. '40 percent'")


def _next_unit(toks: list[str | float], k: int) -> int | None:
    """Index of the unit that ``toks[k]`` quantifies, skipping 'a', 'an', 'of' ('half an hour')."""
    j = k + 1
    while j < len(toks) and toks[j] in ("a", "an", "of"):
        j += 1
    return j if j < len(toks) and isinstance(toks[j], str) and toks[j] in _UNIT_SECONDS else None


def parse_duration(text: str) -> int:
    """Total seconds of a spoken duration.

    '5 minutes' -> 300, 'half a minute' -> 30, 'an hour and a half' -> 5400, '1.5 hours' -> 5400,
    'two and a half minutes' -> 150, 'three quarters of an hour' -> 2700, 'a couple of minutes'
    -> 120, '2 hours and 30 minutes' -> 9000, '1 hour 45' -> 6300, '15-second' -> 15."""
    toks = _tokens(text)
    total = 0.0
    pending: float | None = None  # a quantity waiting for its unit
    article = False  # pending came from "a"/"an", not from a number
    last_unit = 0
    for k, tok in enumerate(toks):
        if isinstance(tok, float):
            pending, article = tok, False
        elif tok in ("a", "an"):
            if pending is None:
                pending, article = 1.0, True
        elif tok in ("half", "quarter", "quarters"):
            part = 0.5 if tok == "half" else 0.25
            if _next_unit(toks, k) is not None:  # "half an hour", "two and a half hours", "three quarters of an hour"
                if pending is None or article:
                    pending = part
                elif tok == "quarters":
                    pending *= part
                else:
                    pending += part
                article = False
            elif last_unit and pending in (None, 1.0):  # "an hour and a half", "a minute and a quarter"
                total += part * last_unit
                pending, article = None, False
            elif pending is not None and not article:
                pending += part
        elif tok == "couple":
            pending, article = 2.0, False
        elif tok == "dozen":
            pending, article = (1.0 if pending is None or article else pending) * 12, False
        elif tok in _UNIT_SECONDS:
            if tok in ("s", "h") and pending is None:
                continue  # a stray letter, not "5 s"
            total += (1.0 if pending is None else pending) * _UNIT_SECONDS[tok]
            last_unit, pending, article = _UNIT_SECONDS[tok], None, False
    if pending is not None and not article:
        if last_unit == 0:
            raise SlotValueError(f"duration {text!r} has a number but no unit; say e.g. '{_as_number(pending)} minutes'")
        total += pending * (60 if last_unit == 3600 else 1)  # "1 hour 45", "2 minutes 30"
    if total <= 0:
        raise SlotValueError(f"no duration in {text!r}; say e.g. '5 minutes' or 'half an hour'")
    return round(total)


def clean_words(text: str, leading: frozenset[str] = _LEADING_WORDS) -> str:
    """Lower-cased words without a leading article or quantity word (``leading``) or punctuation:
    ' Some  Peanut Butter.' -> 'peanut butter'."""
    words = re.sub(r"[^\w'’\- ]+", " ", text.lower()).split()
    while len(words) > 1 and words[0] in leading:
        words = words[1:]
    return " ".join(words)


@dataclass(frozen=True)
class NormalisedValue:
    value: str | int | float
    kind: str  # Hermes slot kind


def normalise(slot_name: str, raw: str) -> NormalisedValue:
    """The value a slot's raw text stands for (see module docstring)."""
    if slot_name == "level":
        value, kind = parse_level(raw)
        return NormalisedValue(value, kind)
    if slot_name == "duration":
        return NormalisedValue(parse_duration(raw), KIND_DURATION)
    words = clean_words(raw, _MEDIA_LEADING_WORDS if slot_name == "media" else _LEADING_WORDS)
    if not words:
        raise SlotValueError(f"slot {slot_name} has no words in {raw!r}")
    return NormalisedValue(words, KIND_CUSTOM)
