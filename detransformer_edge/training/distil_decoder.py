"""Distil a decoupled decoder student towards its teacher, and measure both on held-out text.

Distillation (``distil_decoder``): the corpus' train sentences, tokenised with the teacher's
tokenizer and packed into ``seq_len``-token sequences separated by EOS. Loss per batch::

    KL(teacher || student) of the next-token distributions (temperature 1, mean over all positions)
    + hidden_weight * mean over block ends b of ||h_s,b - h_t,b||^2 / ||h_t,b||^2

where the block ends are the outputs of the coupled layers (the last one is the final hidden
state before the output norm) and ``hidden_weight`` defaults to 1.0: the normalised MSE starts
around the size of the KL term and keeps the block boundaries (where devices synchronise) close to
the teacher's, while the KL term is what perplexity measures. The token embedding (= output head)
stays frozen. AdamW, linear warm-up then cosine decay to 10 %, gradient clipping at 1.0,
checkpoint/resume as the encoder conversion. With a deadline (``--max-minutes``) the cosine
follows whichever is further along, steps or time, so a time-limited run still decays its rate,
and training stops at a step boundary with enough time left to evaluate and save.

Evaluation: perplexity of held-out text (held-out sentences packed the same way, first
``eval_tokens`` tokens) for the teacher, the sliced initial student and the distilled student,
and top-1 next-token agreement of each student with the teacher.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.training.convert import (
    Progress,
    _batches,
    block_ends,
    layout_of,
    load_resumable,
    warmup_cosine,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Data


def pack_sentences(sentences: Sequence[str], tokenizer: Any, seq_len: int, seed: int | None = 0,
                   max_tokens: int | None = None) -> torch.Tensor:
    """Token id sequences (N, seq_len): sentences (shuffled with ``seed``; None keeps the order)
    tokenised without special tokens, each followed by EOS, concatenated and cut into rows (the
    incomplete tail is dropped). ``max_tokens`` stops once that many tokens are packed."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS id to separate sentences")
    order = list(range(len(sentences)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    stream: list[int] = []
    backend = tokenizer.backend
    chunk = 4096
    for k in range(0, len(order), chunk):
        texts = [sentences[i] for i in order[k : k + chunk]]
        for enc in backend.encode_batch(texts, add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    n_rows = len(stream) // seq_len
    if max_tokens is not None:
        n_rows = min(n_rows, max_tokens // seq_len)
    if n_rows == 0:
        raise ConfigError(f"too little text to fill one {seq_len}-token sequence")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


# --------------------------------------------------------------------------------------------
# Forward passes, loss and evaluation


def forward_with_hidden(model: Decoder, input_ids: torch.Tensor,
                        layers: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (B, T, V) and the hidden states (B, T, d) after each layer in ``layers``."""
    h = model.tok_emb(input_ids)
    rope = model.rope(0, input_ids.shape[1], input_ids.device)
    wanted = set(layers)
    hidden: list[torch.Tensor] = []
    for i, layer in enumerate(model.layers):
        h = layer(h, rope)
        if i in wanted:
            hidden.append(h)
    return model.lm_head(model.norm(h)), hidden


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, mean over all positions (T = 1)."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def normalised_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over block ends of ||h_s - h_t||^2 / ||h_t||^2."""
    terms = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
             for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return torch.stack(terms).mean()


def nll_sum(model: Decoder, ids: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """Summed next-token NLL of ``ids`` (B, T) under ``model``, the number of predicted tokens and
    the model's top-1 prediction at every position (B, T)."""
    logits = model(ids).float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel(), logits.argmax(-1)


@torch.no_grad()
def evaluate(model: Decoder, sequences: torch.Tensor, batch_size: int = 8, device: str = "cpu",
             reference_top1: torch.Tensor | None = None) -> dict[str, Any]:
    """Perplexity (exp of the mean next-token NLL) of ``sequences`` and the model's top-1
    predictions; with ``reference_top1`` (another model's predictions) also the share of positions
    where both agree."""
    model.eval()
    total, count = 0.0, 0
    tops: list[torch.Tensor] = []
    for k in range(0, len(sequences), batch_size):
        ids = sequences[k : k + batch_size].to(device)
        with _autocast(device):
            s, n, top = nll_sum(model, ids)
        total += s
        count += n
        tops.append(top.cpu())
    top1 = torch.cat(tops)
    result: dict[str, Any] = {"perplexity": math.exp(total / max(1, count)), "nll": total / max(1, count),
                              "tokens": count, "top1": top1}
    if reference_top1 is not None:
        result["agreement"] = float((top1 == reference_top1).float().mean())
    return result


def perplexity(model: Decoder, sequences: torch.Tensor, batch_size: int = 8, device: str = "cpu") -> float:
    """exp(mean next-token NLL) of ``sequences`` (N, T) under ``model``."""
    return float(evaluate(model, sequences, batch_size, device)["perplexity"])


def _autocast(device: str) -> Any:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# --------------------------------------------------------------------------------------------
# Distillation


@dataclass
class DecoderDistilSettings:
    steps: int = 2000  # a GPU run; a CPU run is normally limited by max_minutes instead
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    warmup: int = 10
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    hidden_weight: float = 1.0  # weight of the normalised block-end MSE next to the KL term
    checkpoint_every: int = 25
    seed: int = 0
    eval_tokens: int = 16384
    eval_batch_size: int = 8
    max_minutes: float | None = None  # wall budget of the whole conversion (training + evaluation)
    # Rescale sub-block RMSNorms to the teacher's scale at init. Off: on SmolLM2-135M nd=2 nb=5 it
    # raised the sliced student's held-out perplexity (352k -> 541k, 8192 tokens).
    calibrate_norms: bool = False
    calibration_tokens: int = 2048  # train tokens the calibration reads


def lr_factor(step: int, settings: DecoderDistilSettings, time_fraction: float = 0.0) -> float:
    """Warm-up then cosine decay to ``min_lr_fraction``; progress is the larger of step and time."""
    return warmup_cosine(step, settings.warmup, settings.steps, settings.min_lr_fraction, time_fraction)


@dataclass
class DistilResult:
    losses: list[float]
    step: int  # total steps done (including those of earlier, resumed calls)
    steps_this_call: int
    train_seconds: float  # training wall time of this call
    stopped_by: str  # "steps" or "time"


def distil_decoder(student: Decoder, teacher: Decoder, sequences: torch.Tensor, settings: DecoderDistilSettings,
                   out_dir: Path | None = None, device: str = "cpu", progress: bool = True,
                   deadline: float | None = None, stop_at: int | None = None) -> DistilResult:
    """Train ``student`` towards ``teacher`` on ``sequences`` (N, seq_len) token ids; checkpoint to
    ``out_dir`` and resume from it if present. ``deadline`` (``time.monotonic()`` value): stop at
    the first step boundary after which another step would not fit. ``stop_at``: stop after that
    many steps in all (the schedule still spans ``settings.steps``; a later call resumes)."""
    student.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.tok_emb.weight.requires_grad_(False)  # tied with lm_head: both frozen
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    step = 0
    ckpt = out_dir / "checkpoint.pt" if out_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = load_resumable(ckpt, student, device)
        student.tie_weights()
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("resuming decoder distillation at step %d from %s", step, ckpt)
    ends = block_ends(student.cfg)
    batches = _batches(range(len(sequences)), settings.batch_size, settings.seed)
    for _ in range(step):  # skip what the checkpoint already saw
        next(batches)
    started = time.monotonic()
    budget = None if deadline is None else max(1e-9, deadline - started)
    bar = Progress(settings.steps, step, "distil") if progress else None
    losses: list[float] = []
    stopped_by = "steps"
    step_times: list[float] = []
    last = settings.steps if stop_at is None else min(stop_at, settings.steps)
    while step < last:
        now = time.monotonic()
        if deadline is not None and step_times:
            per_step = max(step_times[-5:])  # pessimistic: the load on a shared CPU varies
            if now + per_step > deadline:
                stopped_by = "time"
                break
        t0 = now
        time_fraction = 0.0 if budget is None else (now - started) / budget
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor(step, settings, time_fraction)
        ids = sequences[next(batches)].to(device)
        with _autocast(device):
            with torch.no_grad():
                t_logits, t_hidden = forward_with_hidden(teacher, ids, ends)
            s_logits, s_hidden = forward_with_hidden(student, ids, ends)
            kl = kl_teacher_student(s_logits, t_logits)
            mse = normalised_mse(s_hidden, t_hidden)
            loss = kl + settings.hidden_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        step_times.append(time.monotonic() - t0)
        if bar is not None and bar.tty:
            bar.update(step, loss=losses[-1], kl=kl.item(), mse=mse.item(), s_per_step=step_times[-1])
        elif progress and (len(losses) <= 3 or step % 5 == 0):  # a log file: one line every 5 steps
            print(f"step {step} loss {losses[-1]:.4f} kl {kl.item():.4f} mse {mse.item():.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {step_times[-1]:.1f} s/step "
                  f"elapsed {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if ckpt is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
            _save_checkpoint(ckpt, student, opt, step)
    if ckpt is not None and losses and step % settings.checkpoint_every and step != settings.steps:
        _save_checkpoint(ckpt, student, opt, step)  # stopped early, between checkpoints
    if stopped_by == "steps" and step < settings.steps:
        stopped_by = "stop_at"
    if bar is not None:
        bar.close()
    student.eval()
    return DistilResult(losses, step, len(losses), time.monotonic() - started, stopped_by)


def _save_checkpoint(ckpt: Path, student: Decoder, opt: torch.optim.Optimizer, step: int) -> None:
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "layout": layout_of(student.cfg)}, tmp)
    os.replace(tmp, ckpt)
