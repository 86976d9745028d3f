"""Fine-tune an encoder + intent/slot heads on the smart-home dataset, evaluate, save.

The decoupled MiniLM (from ``detransformer-edge convert``) and the original MiniLM are trained by
the same function with the same settings, so their numbers compare (docs/ACCURACY.md).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from detransformer_edge.model.encoder import Encoder
from detransformer_edge.nlu.calibration import CalibrationTarget, choose_thresholds
from detransformer_edge.nlu.dataset import (
    BIO_TAGS,
    IGNORE,
    MAX_LEN,
    Dataset,
    Example,
    SlotSpan,
    bio_labels,
    encode_text,
    spans_from_bio,
)
from detransformer_edge.nlu.decision import (
    INTENT_LABELS,
    NOT_RECOGNISED,
    Thresholds,
    clean_spans,
    decide,
)
from detransformer_edge.nlu.model import IntentSlotModel
from detransformer_edge.nlu.vocabulary import INTENTS
from detransformer_edge.training.convert import Progress

log = logging.getLogger(__name__)

@dataclass
class TrainSettings:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 1e-3
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    balance_intents: bool = True  # class_weights(): rare intents are not drowned by "not recognised"
    seed: int = 0


def _batch(tokenizer: Any, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    encs = [encode_text(tokenizer, e.text) for e in examples]
    T = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), T), tokenizer.pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(encs), T, dtype=torch.long)
    tags = torch.full((len(encs), T), IGNORE, dtype=torch.long)
    for b, (enc, ex) in enumerate(zip(encs, examples)):
        n = len(enc.ids)
        ids[b, :n] = torch.tensor(enc.ids)
        mask[b, :n] = 1
        tags[b, :n] = torch.tensor(bio_labels(enc.offsets, enc.special, ex.spans))
    intents = torch.tensor([INTENT_LABELS.index(e.intent or NOT_RECOGNISED) for e in examples])
    return ids, mask, intents, tags


def class_weights(examples: Sequence[Example]) -> torch.Tensor:
    """Intent loss weights (n / n_class) ** 0.5, mean 1 over the examples: slotless intents have
    few distinct renderings (GetTime: 70 of 6 900), out-of-domain ones many (2 500); unweighted,
    the model learns to answer "not recognised" for a rare intent's unusual phrasing."""
    counts = torch.zeros(len(INTENT_LABELS))
    for e in examples:
        counts[INTENT_LABELS.index(e.intent or NOT_RECOGNISED)] += 1
    w = (len(examples) / counts.clamp(min=1)) ** 0.5
    return w / ((w * counts).sum() / counts.sum())


def train_step_loss(model: IntentSlotModel, ids: torch.Tensor, mask: torch.Tensor, intents: torch.Tensor,
                    tags: torch.Tensor, intent_weight: torch.Tensor | None = None) -> torch.Tensor:
    intent_logits, tag_logits = model(ids, mask)
    return F.cross_entropy(intent_logits, intents, weight=intent_weight) + F.cross_entropy(
        tag_logits.reshape(-1, tag_logits.shape[-1]), tags.reshape(-1), ignore_index=IGNORE
    )


def train(encoder: Encoder, tokenizer: Any, dataset: Dataset, settings: TrainSettings,
          label: str = "train", progress: bool = True) -> IntentSlotModel:
    """Fine-tune ``encoder`` (embeddings frozen) with fresh heads on ``dataset.train``."""
    torch.manual_seed(settings.seed)
    model = IntentSlotModel(encoder, len(INTENT_LABELS), len(BIO_TAGS))
    for p in encoder.embeddings.parameters():
        p.requires_grad_(False)
    enc_params = [p for n, p in encoder.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": settings.lr}, {"params": model.heads.parameters(), "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    train_set = list(dataset.train)
    weights = class_weights(train_set) if settings.balance_intents else None
    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, int(settings.warmup_frac * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    bar = Progress(total, 0, label) if progress else None
    rng = random.Random(settings.seed)
    step = 0
    model.train()
    for _ in range(settings.epochs):
        rng.shuffle(train_set)
        for k in range(0, len(train_set), settings.batch_size):
            loss = train_step_loss(model, *_batch(tokenizer, train_set[k : k + settings.batch_size]), weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if bar is not None:
                bar.update(step, loss=loss.item())
    if bar is not None:
        bar.close()
    return model.eval()


@dataclass(frozen=True)
class Prediction:
    intent_probs: torch.Tensor  # (n_intent_labels,)
    spans: tuple[SlotSpan, ...]


@torch.no_grad()
def predict(model: IntentSlotModel, tokenizer: Any, examples: Sequence[Example], batch_size: int = 64) -> list[Prediction]:
    model.eval()
    out: list[Prediction] = []
    for k in range(0, len(examples), batch_size):
        chunk = examples[k : k + batch_size]
        ids, mask, _, _ = _batch(tokenizer, chunk)
        intent_logits, tag_logits = model(ids, mask)
        probs = intent_logits.softmax(-1)
        tags = tag_logits.argmax(-1)
        for b, ex in enumerate(chunk):
            enc = encode_text(tokenizer, ex.text)
            n = len(enc.ids)
            t = [IGNORE if s else int(x) for x, s in zip(tags[b, :n].tolist(), enc.special)]
            out.append(Prediction(probs[b], tuple(spans_from_bio(t, enc.offsets))))
    return out


def evaluate(preds: Sequence[Prediction], examples: Sequence[Example], thresholds: Thresholds) -> dict[str, float]:
    """Intent accuracy on in-domain examples (rejections count as errors), the same without
    rejection (argmax over the 15 intents), entity-level slot F1 of the cleaned slots (whole
    words, only the intent's slots), out-of-domain rejection rate, false rejection rate."""
    ind = [(p, e) for p, e in zip(preds, examples) if e.intent is not None]
    ood = [(p, e) for p, e in zip(preds, examples) if e.intent is None]
    n_int = len(INTENTS)
    answer = {id(e): decide(p.intent_probs, e.text, thresholds)[0] for p, e in zip(preds, examples)}
    acc = sum(answer[id(e)] == e.intent for _, e in ind) / max(1, len(ind))
    closed = sum(INTENTS[int(p.intent_probs[:n_int].argmax())] == e.intent for p, e in ind) / max(1, len(ind))
    false_reject = sum(answer[id(e)] is None for _, e in ind) / max(1, len(ind))
    ood_reject = sum(answer[id(e)] is None for _, e in ood) / max(1, len(ood))
    tp = fp = fn = 0
    for p, e in ind:
        gold = {(s.slot_name, s.start, s.end) for s in e.spans}
        got = {(s.slot_name, s.start, s.end) for s in clean_spans(e.text, e.intent, p.spans)}  # type: ignore[arg-type]
        tp += len(gold & got)
        fp += len(got - gold)
        fn += len(gold - got)
    prec = tp / max(1, tp + fp)
    rec = tp / max(1, tp + fn)
    f1 = 2 * prec * rec / max(1e-12, prec + rec)
    return {
        "intent_accuracy": acc, "intent_accuracy_closed_set": closed, "false_rejection": false_reject,
        "ood_rejection": ood_reject, "slot_f1": f1, "slot_precision": prec, "slot_recall": rec,
        "n_in_domain": len(ind), "n_out_of_domain": len(ood),
    }


def save_intent_model(model: IntentSlotModel, out_dir: Path, thresholds: Thresholds | float,
                      extra: dict[str, Any]) -> None:
    """DIR/model.safetensors (float16) + DIR/config.json (encoder config, per-intent thresholds; a
    float is one threshold for every intent) + DIR/labels.json."""
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.uniform(thresholds)
    import dataclasses

    from safetensors.torch import save_file

    from detransformer_edge.model.config import EncoderConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    init_fields = {f.name for f in dataclasses.fields(EncoderConfig) if f.init}
    enc_cfg = {k: v for k, v in asdict(model.encoder.cfg).items() if k in init_fields}
    config = {"encoder": enc_cfg, "max_len": MAX_LEN, "thresholds": dict(thresholds.per_intent), **extra}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    labels = {"intents": list(INTENT_LABELS), "not_recognised": NOT_RECOGNISED, "bio_tags": list(BIO_TAGS)}
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    return fn(*args, **kw), time.monotonic() - t0


def calibrate(model: IntentSlotModel, tokenizer: Any, validation: Sequence[Example],
              target: CalibrationTarget | None = None) -> tuple[Thresholds, dict[str, Any]]:
    """Per-intent thresholds from the validation split only (nlu/calibration.py)."""
    target = target or CalibrationTarget()
    preds = predict(model, tokenizer, validation)
    return choose_thresholds([p.intent_probs for p in preds], [e.text for e in validation],
                             [e.intent for e in validation], target)


def train_and_evaluate(encoder: Encoder, tokenizer: Any, dataset: Dataset, settings: TrainSettings,
                       label: str, progress: bool = True) -> tuple[IntentSlotModel, Thresholds, dict[str, Any]]:
    """Train, pick the rejection thresholds on validation, evaluate on the template test split."""
    model, seconds = timed(train, encoder, tokenizer, dataset, settings, label, progress)
    thresholds, calibration = calibrate(model, tokenizer, dataset.validation)
    report = {
        "train_seconds": seconds, "threads": torch.get_num_threads(),
        "thresholds": dict(thresholds.per_intent), "calibration": calibration,
        "validation": evaluate(predict(model, tokenizer, dataset.validation), dataset.validation, thresholds),
        "test": evaluate(predict(model, tokenizer, dataset.test), dataset.test, thresholds),
        "sizes": {s: len(dataset.split(s)) for s in ("train", "validation", "test")},
        "settings": asdict(settings),
    }
    return model, thresholds, report
