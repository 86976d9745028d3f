"""Slot values: how they are spoken (for the dataset) and how they are normalised (for parsing).

Normalised values, as the Hermes integration expects them:

* ``level``: a number (``"50 percent"``, ``"fifty %"``, ``"twenty one degrees"`` -> 50, 50, 21);
  kind ``Percentage`` when a percent word or sign is present, else ``Number``.
* ``duration``: total seconds as an int (``"5 minutes"`` -> 300, ``"an hour and a half"`` -> 5400),
  kind ``Duration``. Seconds rather than ISO 8601: a timer needs arithmetic, not a string.
* ``room`` and ``item``: the lower-cased text, kind ``Custom``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
_WORD_VALUE = {w: i for i, w in enumerate(_ONES)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_WORD_VALUE |= {"a": 1, "an": 1, "hundred": 100}
_UNIT_SECONDS = {"second": 1, "sec": 1, "minute": 60, "min": 60, "hour": 3600}
_PERCENT = re.compile(r"(%|\bpercent\b|\bper cent\b)")


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


def _numbers_in(text: str) -> list[tuple[float, int]]:
    """Numbers in ``text`` as (value, token index); 'twenty one' is one number, 'one hundred' too."""
    tokens = re.findall(r"\d+(?:\.\d+)?|[a-z]+", text.lower().replace("-", " "))
    out: list[tuple[float, int]] = []
    k = 0
    while k < len(tokens):
        tok = tokens[k]
        if tok[0].isdigit():
            out.append((float(tok), k))
        elif tok in _WORD_VALUE and tok not in ("a", "an", "hundred"):
            value = _WORD_VALUE[tok]
            if k + 1 < len(tokens) and value >= 20 and value % 10 == 0 and tokens[k + 1] in _ONES[1:10]:
                value += _WORD_VALUE[tokens[k + 1]]
                k += 1
            if k + 1 < len(tokens) and tokens[k + 1] == "hundred":
                value *= 100
                k += 1
            out.append((float(value), k))
        k += 1
    return out


def _as_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def parse_level(text: str) -> tuple[int | float, str]:
    """'50 percent' -> (50, 'Percentage'); 'twenty one degrees' -> (21, 'Number')."""
    nums = _numbers_in(text)
    if not nums:
        if re.search(r"\b(max|maximum|full)\b", text.lower()):
            return 100, KIND_PERCENTAGE
        raise SlotValueError(f"no number in level {text!r}")
    kind = KIND_PERCENTAGE if _PERCENT.search(text.lower()) else KIND_NUMBER
    return _as_number(nums[0][0]), kind


def parse_duration(text: str) -> int:
    """Total seconds: '5 minutes' -> 300, 'an hour and a half' -> 5400, '1 hour 30 minutes' -> 5400."""
    t = text.lower().replace("-", " ")
    if re.fullmatch(r"\s*half an? hour\s*", t):
        return 1800
    tokens = re.findall(r"\d+(?:\.\d+)?|[a-z]+", t)
    total = 0.0
    pending: float | None = None
    last_unit = 0
    k = 0
    while k < len(tokens):
        tok = tokens[k]
        unit = next((s for u, s in _UNIT_SECONDS.items() if tok.rstrip("s") == u), None)
        if tok[0].isdigit():
            pending = float(tok)
        elif tok in ("a", "an"):
            pending = 1.0 if pending is None else pending  # "a minute"; "two and a half": keep 2
        elif tok in _WORD_VALUE and tok != "hundred":
            value = float(_WORD_VALUE[tok])
            if k + 1 < len(tokens) and value >= 20 and tokens[k + 1] in _ONES[1:10]:
                value += _WORD_VALUE[tokens[k + 1]]
                k += 1
            pending = value
        elif tok == "half":
            if pending is not None and last_unit == 0:  # "two and a half minutes"
                pending += 0.5
            elif last_unit:  # "an hour and a half"
                total += 0.5 * last_unit
        elif unit is not None:
            total += (1.0 if pending is None else pending) * unit
            last_unit, pending = unit, None
        k += 1
    if pending is not None and last_unit == 0:
        raise SlotValueError(f"duration {text!r} has a number but no unit")
    if total <= 0:
        raise SlotValueError(f"no duration in {text!r}")
    return round(total)


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
    return NormalisedValue(" ".join(raw.lower().split()), KIND_CUSTOM)
