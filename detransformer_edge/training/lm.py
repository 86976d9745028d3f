"""A decoder language model trained from scratch, and its held-out perplexity.

* Training (``train_lm``): AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices), linear
  warm-up (5%) then cosine decay to 10%, grad clip 1.0, float32 everywhere (TF32 off on CUDA).
  Checkpoint every ``checkpoint_every`` steps to ``DIR/checkpoint.pt`` and resume from it; a
  resumed run gives the same losses as an uninterrupted one.
* Evaluation (``evaluate``): mean next-token NLL over all target tokens and exp(NLL); with a wire
  dtype, the hidden state is rounded (``training.precision.wire_rounding``) at the input of every
  coupled layer, where a decoupled model all-gathers its sub-block outputs over the network.

CPU budget: measured on the development machine with nothing else running (2 cores,
``--threads 2``, torch 2.13 CPU), batch 16 x seq_len 128 = 2048 tokens/step, ``train_lm`` for 8
steps per model: standard 1.35 s/step, nd=2 nb=2 1.63 s/step, nd=4 nb=4 1.73 s/step (decoupled
layers run their sub-blocks one after another: smaller matrix products). ``DEFAULT_STEPS = 800``
keeps the slowest model at about 23 min of training plus about 2 min of evaluation (curve on
8 192 tokens every steps // 5 steps, final on 32 768 tokens, twice more for the wire dtypes): <= 30 min
for one model. That is 1.64 M training tokens (54% of one epoch of the 3.06 M-token train stream).
A GPU run of the same matrix gives the same numbers within noise; it can also pass a larger
``--steps`` (all five models must share it to be compared).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import DecoderConfig
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.training.convert import Progress, warmup_cosine
from detransformer_edge.training.precision import WIRE_DTYPES, wire_rounding
from detransformer_edge.training.token_data import Batches, TokenData, validation_set

log = logging.getLogger(__name__)

# Seconds per training step (batch 16 x 128) on the shared 2-core development machine, two runs:
# DTE_CORPUS_FILE=runs/paired-data/corpus.json.gz nice -n 5 python -c '...' calling
# train_lm(build_model(cfg, 0), data, LMSettings(steps=12, curve_tokens=128, eval_every=10**6))
# with torch.set_num_threads(2); the spread is the other jobs' load.
SECONDS_PER_STEP_CPU = {"std": 1.35, "nd2nb2": 1.63, "nd4nb4": 1.73}  # quiet 2-core CPU, see above
DEFAULT_STEPS = 800
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128


# --------------------------------------------------------------------------- evaluation


def wire_layers(model: Decoder) -> list[int]:
    """Layers whose input crosses the network in a decoupled model: every coupled layer (it
    all-gathers the sub-block outputs of the decoupled layers before it)."""
    kinds = model.cfg.layer_kinds
    if not model.cfg.is_decoupled:
        return []
    return [i for i, k in enumerate(kinds) if k == "coupled"]


def decoder_wire_rounding(model: Decoder, dtype: str,
                          layers: Sequence[int] | None = None) -> AbstractContextManager[None]:
    """Round the hidden state to wire ``dtype`` at the inputs of ``layers`` (default wire_layers)."""
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"unknown wire dtype {dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    return wire_rounding(model, dtype, wire_layers(model) if layers is None else list(layers))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(model: Decoder, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 32,
             device: str = "cpu", wire: str | None = None) -> dict[str, float]:
    """Validation NLL (mean over all target tokens) and perplexity exp(NLL)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ctx = decoder_wire_rounding(model, wire) if wire is not None else nullcontext()
    with ctx:
        for k in range(0, inputs.shape[0], batch_size):
            x, y = inputs[k : k + batch_size].to(device), targets[k : k + batch_size].to(device)
            logits = model(x)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").double().item()
            count += y.numel()
    model.train(was_training)
    nll = total / max(1, count)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class LMSettings:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int | None = None  # None: 5% of steps (at least 1)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int | None = None  # None: steps // 5
    val_tokens: int = 32768
    curve_tokens: int = 8192
    eval_batch_size: int = 32
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "val_tokens", "curve_tokens", "eval_batch_size",
                     "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    @property
    def eval_interval(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.steps // 5)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["warmup"], d["eval_every"] = self.warmup_steps, self.eval_interval
        return d


def lr_factor(step: int, settings: LMSettings) -> float:
    return warmup_cosine(step, settings.warmup_steps, settings.steps, settings.min_lr_ratio)


def set_precision(device: str) -> None:
    """Plain float32 matmuls everywhere (no TF32 on CUDA) so GPU and CPU runs agree closely."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def build_model(cfg: DecoderConfig, seed: int) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(cfg)


def _optimizer(model: Decoder, settings: LMSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=settings.betas)


def train_lm(model: Decoder, data: TokenData, settings: LMSettings, out_dir: Path | None = None,
             device: str = "cpu", progress: bool = True, label: str = "train",
             stop_after: int | None = None) -> dict[str, Any]:
    """Train ``model`` for ``settings.steps``; checkpoint to ``out_dir`` and resume from it.

    Returns {"losses": every step's training loss, "curve": [{"step", "ppl", "nll"}] on the first
    ``curve_tokens`` validation tokens every ``eval_interval`` steps, "train_seconds", "step"}.
    ``stop_after`` ends the call early at that step (after checkpointing; for tests).
    """
    set_precision(device)
    model.to(device).train()
    opt = _optimizer(model, settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    batches = Batches(data.train, settings.seq_len, settings.batch_size, settings.seed)
    cx, cy = validation_set(data, settings.seq_len, settings.curve_tokens)
    step, losses, curve, seconds = 0, [], [], 0.0
    ckpt = out_dir / "checkpoint.pt" if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("settings") != settings.record():
            raise ConfigError(f"{ckpt} was written with other settings; remove it to start again")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses, curve, seconds = int(state["step"]), state["losses"], state["curve"], state["seconds"]
        log.info("resuming %s at step %d from %s", label, step, ckpt)
    bar = Progress(settings.steps, step, label) if progress else None
    vocab = model.cfg.vocab_size
    while step < settings.steps:
        t0 = time.monotonic()
        x, y = batches.get(step)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        seconds += time.monotonic() - t0
        if step % settings.eval_interval == 0 or step == settings.steps:
            ev = evaluate(model, cx, cy, settings.eval_batch_size, device)
            curve.append({"step": step, "nll": ev["nll"], "ppl": ev["ppl"],
                          "train_loss": float(np.mean(losses[-settings.eval_interval:]))})
        if bar is not None:
            bar.update(step, loss=losses[-1])
        stop = stop_after is not None and step >= stop_after
        if ckpt is not None and (step % settings.checkpoint_every == 0 or step == settings.steps or stop):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step, "losses": losses, "curve": curve,
                        "seconds": seconds, "settings": settings.record()}, tmp)
            os.replace(tmp, ckpt)
        if stop:
            break
    if bar is not None:
        bar.close()
    model.eval()
    return {"losses": losses, "curve": curve, "train_seconds": seconds, "step": step}
