"""Inference API of the intent model, for the home service.

    parser = IntentParser.load_default()
    parser.parse("dim the kitchen lights to 40 percent")
    # ParsedIntent(intent_name='SetBrightness', confidence=0.99, slots=[Slot('room', 'room', 'kitchen', ...),
    #              Slot('level', 'level', 40, '40 percent', 26, 36, kind='Percentage')])

When the encoder runs across devices, the leader tokenises with ``parser.encode(text)``, lets the
engine compute the last hidden states of ``encoded.ids`` and finishes with
``parser.parse_from_hidden(text, hidden, encoded)``: only the small heads run on the leader.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import EncoderConfig
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.nlu.dataset import (
    BIO_TAGS,
    IGNORE,
    EncodedText,
    encode_text,
    spans_from_bio,
)
from detransformer_edge.nlu.decision import (
    INTENT_LABELS,
    NOT_RECOGNISED,
    Thresholds,
    clean_slots,
    decide,
)
from detransformer_edge.nlu.model import IntentSlotHeads, IntentSlotModel

log = logging.getLogger(__name__)


def default_weights_dir() -> Path:
    return Path(str(resources.files("detransformer_edge.nlu") / "weights"))


@dataclass(frozen=True)
class Slot:
    entity: str  # Hermes entity (= slot name here)
    slot_name: str
    value: str | int | float  # normalised: level -> number, duration -> seconds, others -> text
    raw_value: str  # the text as heard
    start: int  # character offsets into the input, end exclusive
    end: int
    kind: str = "Custom"  # Hermes value kind: Custom, Number, Percentage, Duration


@dataclass(frozen=True)
class ParsedIntent:
    intent_name: str | None  # None: not recognised (nlu/decision.py decided it)
    confidence: float
    slots: list[Slot] = field(default_factory=list)  # only slots the intent takes


class IntentParser:
    def __init__(self, model: IntentSlotModel, tokenizer: Any, thresholds: Thresholds, max_len: int = 48) -> None:
        self.model = model.eval().requires_grad_(False)  # inference only
        self.tokenizer = tokenizer
        self.thresholds = thresholds
        self.max_len = max_len

    @classmethod
    def load(cls, weights_dir: str | Path, encoder: bool = True) -> IntentParser:
        """A model saved by ``train-intent`` (float16 weights are run in float32).

        ``encoder=False`` reads only the heads and leaves the encoder on ``meta``: a cluster's
        leader tokenises and runs the heads, the devices hold the encoder (service/weights.py)."""
        from safetensors import safe_open

        from detransformer_edge.model.tokenizer import TextTokenizer
        from detransformer_edge.weights.sources import weights_path

        weights_dir = Path(weights_dir)
        if not (weights_dir / "model.safetensors").exists():
            raise ConfigError(f"no intent model in {weights_dir}; run `detransformer-edge train-intent --out {weights_dir}`")
        config = json.loads((weights_dir / "config.json").read_text())
        labels = json.loads((weights_dir / "labels.json").read_text())
        if tuple(labels["intents"]) != INTENT_LABELS or tuple(labels["bio_tags"]) != BIO_TAGS:
            raise ConfigError(f"{weights_dir} was trained on other labels; retrain with `detransformer-edge train-intent`")
        cfg = EncoderConfig(**config["encoder"])
        with torch.device("meta"):
            model = IntentSlotModel(Encoder(cfg), len(INTENT_LABELS), len(BIO_TAGS))
        with safe_open(str(weights_dir / "model.safetensors"), framework="pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys() if encoder or not k.startswith("encoder.")}
        model.load_state_dict(state, assign=True, strict=encoder)
        tokenizer = TextTokenizer.from_file(weights_path(config.get("tokenizer_from", "minilm-l6")).parent / "tokenizer.json")
        return cls(model, tokenizer, Thresholds.from_config(config), int(config.get("max_len", 48)))

    @classmethod
    def load_default(cls) -> IntentParser:
        """The shipped model (decoupled MiniLM, nd=4, nb=2) from ``detransformer_edge/nlu/weights``."""
        return cls.load(default_weights_dir())

    @property
    def encoder(self) -> Encoder:
        return self.model.encoder

    @property
    def heads(self) -> IntentSlotHeads:
        return self.model.heads

    def encode(self, text: str) -> EncodedText:
        return encode_text(self.tokenizer, text, self.max_len)

    @torch.no_grad()
    def parse(self, text: str) -> ParsedIntent:
        encoded = self.encode(text)
        ids = torch.tensor([encoded.ids])  # (1, T)
        hidden = self.model.encoder(ids, torch.ones_like(ids))  # (1, T, d)
        return self.parse_from_hidden(text, hidden, encoded)

    @torch.no_grad()
    def parse_from_hidden(self, text: str, hidden: Any, encoded: EncodedText | None = None,
                          allowed: frozenset[str] | None = None) -> ParsedIntent:
        """Finish a parse from the encoder's last hidden states of ``encoded.ids``: (T, d) or (1, T, d),
        a tensor or a numpy array of any float dtype. ``allowed`` (a voice assistant's intent
        filter) masks every other intent out before the decision, without renormalising: an
        utterance that clearly asks for an excluded intent is then not recognised."""
        encoded = encoded or self.encode(text)
        h = torch.as_tensor(hidden).float()
        if h.dim() == 2:
            h = h[None]  # (1, T, d)
        if h.shape[1] != len(encoded.ids) or h.shape[2] != self.model.encoder.cfg.d_model:
            raise ConfigError(
                f"hidden states of shape {tuple(h.shape)} do not match {len(encoded.ids)} tokens x "
                f"{self.model.encoder.cfg.d_model} features"
            )
        intent_logits, tag_logits = self.model.heads(h, None)
        probs = intent_logits[0].softmax(-1)
        if allowed is not None:
            keep = torch.tensor([label in allowed or label == NOT_RECOGNISED for label in INTENT_LABELS])
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        name, conf = decide(probs, text, self.thresholds)
        if name is None:
            return ParsedIntent(None, conf, [])
        tags = [IGNORE if s else int(t) for t, s in zip(tag_logits[0].argmax(-1).tolist(), encoded.special)]
        slots = [Slot(v.slot_name, v.slot_name, v.value, v.raw_value, v.start, v.end, v.kind)
                 for v in clean_slots(text, name, spans_from_bio(tags, encoded.offsets))]
        return ParsedIntent(name, conf, slots)
