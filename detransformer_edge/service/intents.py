"""The intent role's two ends around the distributed encoder.

The leader turns an utterance into token ids (``prepare``), the devices compute the decoupled
encoder's hidden states together, and the leader turns those into an intent with slots
(``decode``). The trained heads live in ``detransformer_edge.nlu``; this module adapts them and
provides a tiny deterministic head for tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from detransformer_edge.protocol.codec import ProtocolError


@dataclass(frozen=True)
class SlotValue:
    entity: str
    slot_name: str
    value: Any  # normalised: a number for levels, seconds for durations, text otherwise
    raw_value: str
    start: int
    end: int
    kind: str | None = None  # Hermes value kind (Custom, Number, Percentage, Duration)


@dataclass(frozen=True)
class IntentResult:
    intent: str | None  # None: not recognised
    confidence: float
    slots: tuple[SlotValue, ...] = field(default_factory=tuple)


def intent_to_dict(result: IntentResult) -> dict[str, Any]:
    """An intent result as plain data (the ``intent`` request's reply)."""
    return {"intent": result.intent, "confidence": result.confidence,
            "slots": [{"entity": s.entity, "slot_name": s.slot_name, "value": s.value, "raw_value": s.raw_value,
                       "start": s.start, "end": s.end, "kind": s.kind} for s in result.slots]}


def intent_from_dict(d: Mapping[str, Any]) -> IntentResult:
    """The inverse of ``intent_to_dict``; ProtocolError for anything else."""
    try:
        slots = tuple(SlotValue(s["entity"], s["slot_name"], s["value"], s["raw_value"], int(s["start"]),
                                int(s["end"]), s.get("kind")) for s in d.get("slots", []))
        intent = d.get("intent")
        if intent is not None and not isinstance(intent, str):
            raise TypeError("intent must be a name or null")
        return IntentResult(intent, float(d["confidence"]), slots)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"intent result: malformed ({exc})") from None


@dataclass(frozen=True)
class Prepared:
    input_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, T)
    extra: Any = None  # whatever decode needs (token offsets)


class IntentHead(Protocol):
    def prepare(self, text: str) -> Prepared: ...
    def decode(self, text: str, hidden: torch.Tensor, prepared: Prepared,
               allowed: frozenset[str] | None = None) -> IntentResult:
        """``allowed``: only these intents may be recognised (a voice assistant's filter)."""
        ...


class TinyIntentHead:
    """A fixed random linear map from the mean hidden state to an intent (tests only)."""

    def __init__(self, d_model: int, vocab_size: int, seed: int = 0, threshold: float = 0.0) -> None:
        from detransformer_edge.model.tokenizer import ByteTokenizer
        from detransformer_edge.nlu.vocabulary import INTENTS

        self.intents = tuple(INTENTS)
        self.tokenizer = ByteTokenizer(vocab_size)
        g = torch.Generator().manual_seed(seed + 1)
        self.weight = torch.randn(len(self.intents), d_model, generator=g)
        self.threshold = threshold

    def prepare(self, text: str) -> Prepared:
        ids = self.tokenizer.encode(text)
        t = torch.tensor([ids])
        return Prepared(t, torch.ones_like(t))

    def decode(self, text: str, hidden: torch.Tensor, prepared: Prepared,
               allowed: frozenset[str] | None = None) -> IntentResult:
        probs = torch.softmax(hidden.mean(dim=1)[0] @ self.weight.T, dim=-1)
        if allowed is not None:
            probs = probs * torch.tensor([name in allowed for name in self.intents])
        conf, idx = probs.max(dim=-1)
        name = self.intents[int(idx)] if float(conf) >= self.threshold else None
        return IntentResult(name, float(conf))


class ParserHead:
    """The trained intent and slot heads of ``detransformer_edge.nlu`` (the leader runs them)."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser

    def prepare(self, text: str) -> Prepared:
        encoded = self.parser.encode(text)
        ids = torch.tensor([encoded.ids])  # (1, T)
        return Prepared(ids, torch.ones_like(ids), encoded)

    def decode(self, text: str, hidden: torch.Tensor, prepared: Prepared,
               allowed: frozenset[str] | None = None) -> IntentResult:
        parsed = self.parser.parse_from_hidden(text, hidden, prepared.extra, allowed)
        slots = tuple(SlotValue(s.entity, s.slot_name, s.value, s.raw_value, s.start, s.end, s.kind) for s in parsed.slots)
        return IntentResult(parsed.intent_name, float(parsed.confidence), slots)


def intent_model_config() -> Any:
    """The shipped intent encoder's config, read without loading its weights."""
    import json

    from detransformer_edge.model.config import EncoderConfig
    from detransformer_edge.nlu.parser import default_weights_dir

    path = default_weights_dir() / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        from detransformer_edge.errors import ConfigError

        raise ConfigError(f"no intent model at {path.parent}; run `detransformer-edge train-intent`") from None
    return EncoderConfig(**config["encoder"])
