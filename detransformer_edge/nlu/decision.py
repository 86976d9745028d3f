"""From the heads' outputs to the answer: recognised or not, and the clean slots.

Everything that decides "recognised or not" lives here, so every consumer (Hermes, Wyoming)
gets the same answer and only checks ``intent is None``:

1. The most probable of the 15 intents (the softmax also has a "not recognised" class, trained on
   out-of-domain utterances: its share of the probability is what keeps an intent's low).
2. That intent's own confidence threshold (``Thresholds``, chosen on the validation split by
   ``nlu/calibration.py`` for a stated false-acceptance target) rejects below it. On validation
   this rejects as many out-of-domain utterances as "reject when not-recognised wins" and fewer
   commands (docs/ACCURACY.md).
3. ``LockDoor`` / ``UnlockDoor`` also need the utterance to name a door or a lock
   (``names_door_or_lock``, a fixed word list) and not to be a question (``is_question``: "is the
   front door locked" asks, it does not command); ``UnlockDoor`` also needs an unlocking word
   (``asks_to_unlock``): "unlock my phone", "return the vacuum to base", "who unlocked the back
   door", "open the garage door", "the front door needs to be locked" can never unlock a door,
   whatever the model says.

Slots (``clean_slots``): tagged spans are widened to whole words (a tag never cuts "avocados"
into "av" + "dos"), neighbouring spans of one slot are joined ("peanut" + "butter"; "2 hours"
+ "and" + "30 minutes" is one duration), a span of a slot the intent does not take that touches
one it does take is joined to it ("kitchen" + "roll" is one item, not a room and an item), and
slots the intent does not take are dropped, never an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.nlu.dataset import SlotSpan
from detransformer_edge.nlu.locks import lock_allowed
from detransformer_edge.nlu.values import NormalisedValue, SlotValueError, normalise
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS, INTENTS, LOCK_INTENTS

log = logging.getLogger(__name__)

NOT_RECOGNISED = "<not-recognised>"  # intent label of out-of-domain training examples
INTENT_LABELS: tuple[str, ...] = INTENTS + (NOT_RECOGNISED,)

@dataclass(frozen=True)
class Thresholds:
    """Per-intent confidence thresholds: an intent is recognised only at or above its own."""

    per_intent: Mapping[str, float]

    def __post_init__(self) -> None:
        missing = set(INTENTS) - set(self.per_intent)
        unknown = set(self.per_intent) - set(INTENTS)
        if missing or unknown:
            raise ConfigError(f"thresholds must name exactly the intents; missing {sorted(missing)}, "
                              f"unknown {sorted(unknown)}; retrain with `detransformer-edge train-intent`")
        bad = {k: v for k, v in self.per_intent.items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ConfigError(f"thresholds must lie within 0..1, got {bad}")

    @classmethod
    def uniform(cls, value: float) -> Thresholds:
        return cls({i: float(value) for i in INTENTS})

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Thresholds:
        """``thresholds`` (per intent) from a saved model's config.json; older models have one
        ``threshold`` for all."""
        per = config.get("thresholds")
        if isinstance(per, Mapping):
            return cls({str(k): float(v) for k, v in per.items()})  # type: ignore[arg-type]
        return cls.uniform(float(config.get("threshold", 0.0)))  # type: ignore[arg-type]

    def of(self, intent: str) -> float:
        return float(self.per_intent[intent])


def best_intent(probs: torch.Tensor) -> tuple[str, float]:
    """The most probable intent (never "not recognised") and its probability. ``probs`` are the
    softmax over ``INTENT_LABELS``."""
    idx = int(probs[: len(INTENTS)].argmax())
    return INTENTS[idx], float(probs[idx])


def decide(probs: torch.Tensor, text: str, thresholds: Thresholds) -> tuple[str | None, float]:
    """Intent name, or None when not recognised, and the intent's probability."""
    label, conf = best_intent(probs)
    if conf < thresholds.of(label):
        return None, conf
    if label in LOCK_INTENTS and not lock_allowed(text, label):
        return None, conf
    return label, conf


# --------------------------------------------------------------------------------------------
# slots

_WORD_SPAN = re.compile(r"[\w'’]+(?:[.,\-][\w'’]+)*%?")
_JOIN_GAP = {  # what may stand between two spans of one slot for them to be one value
    "duration": re.compile(r"[\s,]*(?:and)?[\s,]*"),
    "item": re.compile(r"\s*(?:and|&)?\s*"),
}
_DEFAULT_GAP = re.compile(r"[\s\-]*")


def _to_words(text: str, span: SlotSpan) -> SlotSpan:
    """``span`` widened to the whole words it touches."""
    start, end = span.start, span.end
    for m in _WORD_SPAN.finditer(text):
        if m.start() < span.end and m.end() > span.start:
            start, end = min(start, m.start()), max(end, m.end())
    return SlotSpan(span.slot_name, start, end)


def _join(text: str, spans: list[SlotSpan], may_join: object) -> list[SlotSpan]:
    out: list[SlotSpan] = []
    for s in spans:
        if out:
            prev = out[-1]
            gap = text[prev.end : s.start] if s.start >= prev.end else ""
            joined = may_join(prev, s, gap)  # type: ignore[operator]
            if s.start < prev.end or joined:
                out[-1] = SlotSpan(joined or prev.slot_name, prev.start, max(prev.end, s.end))
                continue
        out.append(s)
    return out


def clean_spans(text: str, intent: str, spans: Sequence[SlotSpan]) -> list[SlotSpan]:
    """Whole words, joined values, only the slots ``intent`` takes (see module docstring)."""
    takes = INTENT_SLOTS[intent]
    words = sorted((_to_words(text, s) for s in spans), key=lambda s: (s.start, s.end))

    def same_slot(a: SlotSpan, b: SlotSpan, gap: str) -> str | None:
        pattern = _JOIN_GAP.get(a.slot_name, _DEFAULT_GAP)
        return a.slot_name if a.slot_name == b.slot_name and pattern.fullmatch(gap) else None

    def foreign_touching(a: SlotSpan, b: SlotSpan, gap: str) -> str | None:
        if not _DEFAULT_GAP.fullmatch(gap) or (a.slot_name in takes) == (b.slot_name in takes):
            return None
        return a.slot_name if a.slot_name in takes else b.slot_name

    joined = _join(text, _join(text, words, same_slot), foreign_touching)
    return [s for s in joined if s.slot_name in takes]


@dataclass(frozen=True)
class SlotValue:
    slot_name: str
    value: str | int | float  # normalised (values.py)
    kind: str  # Hermes value kind
    raw_value: str  # the words as heard
    start: int  # character offsets into the text, end exclusive
    end: int


def clean_slots(text: str, intent: str, spans: Sequence[SlotSpan]) -> list[SlotValue]:
    """The normalised slots of a recognised ``intent``; a span whose words hold no value (a level
    without a number) is dropped and logged."""
    out: list[SlotValue] = []
    for span in clean_spans(text, intent, spans):
        raw = text[span.start : span.end]
        try:
            value: NormalisedValue = normalise(span.slot_name, raw)
        except SlotValueError as exc:
            log.info("dropping slot %s=%r: %s", span.slot_name, raw, exc)
            continue
        out.append(SlotValue(span.slot_name, value.value, value.kind, raw, span.start, span.end))
    return out
