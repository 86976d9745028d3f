"""Convert a pretrained (standard) encoder into a decoupled DeTransformer student and distil it.

Initialisation (``init_student``) copies what carries over exactly and slices the rest:

* embeddings and coupled layers: copied;
* decoupled layer i, sub-block j owning features ``s = cfg.sub_slice(j)`` and heads
  ``r = cfg.sub_head_rows(j)``: Q/K/V take the teacher's rows ``r`` and input columns ``s``
  (``W[r, s]``, bias ``b[r]``); the output projection takes rows ``s`` and columns ``r``
  (``W_o[s, r]``, bias ``b_o[s]``). With ``sub_attn="full"`` ``r`` is every head; with
  ``"slice"`` it is the sub-block's own ``n_heads / nd`` heads — the heads whose Q/K/V rows lie
  in its slice, so each head keeps its own query, key, value and output weights and only loses
  the input columns of the other slices. Both LayerNorms take slice ``s``; the FFN takes input columns / output
  rows ``s`` of the teacher's intermediate units, ordered with the sub-block's own group of
  ``d_ff / nd`` units first and the other groups after it, trimmed (or zero-padded) to I'.
  With I' close to d_ff (the parameter-matched I' of MiniLM is 1526 of 1536 with full-width
  attention) every sub-block keeps almost all of the teacher's units instead of a quarter of them;
  the group order decides which few units are trimmed. Sliced sub-blocks have I' > d_ff (2112 for
  MiniLM nd = 4): they keep all 1536 units and the rest start silent (random up, zero down).

With ``nd == 1`` (and I' = d_ff) the student is the teacher exactly; ``tests/test_convert.py``
checks that. Distillation (``distil``) then trains the student to match the teacher's hidden
states at every block boundary (MSE) and its sentence embedding (1 - cosine).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import DecoderConfig, EncoderConfig
from detransformer_edge.model.encoder import Encoder, mean_pool, padding_mask

log = logging.getLogger(__name__)

_LAYER_PARAMS = (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn_norm", "ffn.up", "ffn.down", "ffn_norm",
)


def _ffn_unit_order(d_ff: int, nd: int, j: int) -> torch.Tensor:
    """Teacher FFN unit indices for sub-block j: its own group first, then the following groups."""
    group = d_ff // nd
    return torch.roll(torch.arange(d_ff), -j * group)


@torch.no_grad()
def init_student(teacher: Encoder, student_cfg: EncoderConfig, seed: int = 0) -> Encoder:
    """A decoupled student initialised from ``teacher``'s weights (see module docstring)."""
    tcfg = teacher.cfg
    for name in ("d_model", "n_layers", "n_heads", "vocab_size", "max_position"):
        if getattr(tcfg, name) != getattr(student_cfg, name):
            raise ConfigError(f"student {name}={getattr(student_cfg, name)} differs from teacher's {getattr(tcfg, name)}")
    if teacher.cfg.is_decoupled:
        raise ConfigError("the teacher must be a standard (coupled) encoder")
    torch.manual_seed(seed)
    student = Encoder(student_cfg)
    T = teacher.state_dict()
    S = student.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key in S:
        if key.startswith("embeddings."):
            out[key] = T[key].clone()
    for i, kind in enumerate(student_cfg.layer_kinds):
        if kind == "coupled":
            for p in _LAYER_PARAMS:
                for w in ("weight", "bias"):
                    out[f"layers.{i}.{p}.{w}"] = T[f"layers.{i}.{p}.{w}"].clone()
            continue
        I_sub = student_cfg.d_ff_sub
        for j in range(student_cfg.nd):
            s = student_cfg.sub_slice(j)

            def t(p: str, i: int = i) -> torch.Tensor:
                return T[f"layers.{i}.{p}"]

            r = student_cfg.sub_head_rows(j)
            pre = f"layers.{i}.sub_blocks.{j}."
            for p in ("q_proj", "k_proj", "v_proj"):
                out[pre + f"attn.{p}.weight"] = t(f"attn.{p}.weight")[r, s].clone()  # (sub_heads*hd, d_sub)
                out[pre + f"attn.{p}.bias"] = t(f"attn.{p}.bias")[r].clone()
            out[pre + "attn.o_proj.weight"] = t("attn.o_proj.weight")[s, r].clone()  # (d_sub, sub_heads*hd)
            out[pre + "attn.o_proj.bias"] = t("attn.o_proj.bias")[s].clone()
            for norm in ("attn_norm", "ffn_norm"):
                for w in ("weight", "bias"):
                    out[pre + f"{norm}.{w}"] = t(f"{norm}.{w}")[s].clone()
            units = _ffn_unit_order(tcfg.d_ff, student_cfg.nd, j)[:I_sub]
            n = len(units)
            up_w = S[pre + "ffn.up.weight"].clone()  # (I', d_sub), random init for padded units
            up_b = torch.zeros(I_sub)
            down_w = torch.zeros(student_cfg.d_sub, I_sub)  # padded units start silent
            up_w[:n] = t("ffn.up.weight")[units][:, s]
            up_b[:n] = t("ffn.up.bias")[units]
            down_w[:, :n] = t("ffn.down.weight")[s][:, units]
            out[pre + "ffn.up.weight"], out[pre + "ffn.up.bias"] = up_w, up_b
            out[pre + "ffn.down.weight"] = down_w
            out[pre + "ffn.down.bias"] = t("ffn.down.bias")[s].clone()
    missing = set(S) - set(out)
    if missing:
        raise ConfigError(f"conversion left student parameters unset: {sorted(missing)[:5]}")
    student.load_state_dict(out)
    return student


def layout_of(cfg: EncoderConfig | DecoderConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into a student of ``cfg``."""
    return {"nd": cfg.nd, "nb": cfg.nb, "sub_attn": cfg.sub_attn, "d_ff_sub": cfg.d_ff_sub}


def load_resumable(ckpt: Path, student: torch.nn.Module, device: str) -> dict[str, Any]:
    """The checkpoint at ``ckpt``, its student weights loaded into ``student``; a ConfigError
    (not a shape error deep in torch) when it was written for another layout."""
    state = torch.load(ckpt, map_location=device, weights_only=True)
    want = layout_of(student.cfg)
    have = state.get("layout")
    if have is not None and have != want:
        raise ConfigError(f"{ckpt} is a checkpoint of layout {have}, not {want}: "
                          f"use another --out or delete {ckpt.parent}")
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as exc:
        raise ConfigError(f"{ckpt} does not fit a student of layout {want} ({str(exc).splitlines()[0]}): "
                          f"use another --out or delete {ckpt.parent}") from None
    return state


def block_ends(cfg: EncoderConfig | DecoderConfig) -> list[int]:
    """Indices of the layers that end a block (the coupled layers of a decoupled model)."""
    return [blk[-1] for blk in cfg.blocks]


@dataclass
class DistilSettings:
    # Defaults: the best recipe of `python bench/distil_sweep.py` (docs/ACCURACY.md): every layer's
    # output matched by per-token cosine, lr 5e-4; 1 200 steps fit the 20-minute budget on 2 cores.
    steps: int = 1200
    batch_size: int = 16
    max_len: int = 48  # most corpus sentences are shorter; longer ones are cut
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.01
    cos_weight: float = 1.0  # weight of (1 - cosine) on the sentence embedding vs the hidden-state loss
    targets: str = "layers"  # hidden states matched: "blocks" (block ends) or "layers" (every layer)
    hidden_loss: str = "cos"  # "mse" (masked mean squared error) or "cos" (1 - per-token cosine)
    local_frac: float = 0.0  # first fraction of steps: every block runs from the teacher's input to it
    checkpoint_every: int = 100
    seed: int = 0
    eval_sentences: int = 2000

    def __post_init__(self) -> None:
        if self.targets not in ("blocks", "layers"):
            raise ConfigError(f"targets must be 'blocks' or 'layers', got {self.targets!r}")
        if self.hidden_loss not in ("mse", "cos"):
            raise ConfigError(f"hidden_loss must be 'mse' or 'cos', got {self.hidden_loss!r}")
        if not 0.0 <= self.local_frac <= 1.0:
            raise ConfigError(f"local_frac must be within [0, 1], got {self.local_frac}")
        if self.steps < 0 or self.batch_size <= 0 or self.max_len < 2:
            raise ConfigError("steps must be >= 0, batch_size > 0 and max_len >= 2")


def warmup_cosine(step: int, warmup: int, steps: int, floor: float, progress: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``
    at ``steps``; ``progress`` (0..1, e.g. the share of a time budget used) can move the decay ahead."""
    if step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, max((step - warmup) / max(1, steps - warmup), progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def target_layers(cfg: EncoderConfig, targets: str) -> list[int]:
    """Layers whose outputs the student is trained to match."""
    return block_ends(cfg) if targets == "blocks" else list(range(cfg.n_layers))


def teacher_states(teacher: Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """[embeddings output, output of layer 0, ..., output of layer L-1] of the teacher."""
    h = teacher.embeddings(input_ids)
    mask = padding_mask(attention_mask)
    states = [h]
    for layer in teacher.layers:
        h = layer(h, mask)
        states.append(h)
    return states


def _hidden_loss(h: torch.Tensor, t: torch.Tensor, m: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cos":
        return ((1.0 - F.cosine_similarity(h, t, dim=-1)) * m[..., 0]).sum() / m.sum()
    return ((h - t) ** 2 * m).sum() / (m.sum() * h.shape[-1])


def distillation_loss(student: Encoder, states: list[torch.Tensor], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, settings: DistilSettings, local: bool = False) -> torch.Tensor:
    """Hidden-state loss at the target layers + ``cos_weight`` * (1 - sentence-embedding cosine).

    ``states`` come from ``teacher_states``. With ``local`` every block starts from the
    teacher's input to it (block-local distillation: no error carried in from earlier blocks).
    """
    cfg = student.cfg
    targets = set(target_layers(cfg, settings.targets))
    starts = {blk[0] for blk in cfg.blocks} if local else {0}
    mask = padding_mask(attention_mask)
    m = attention_mask.to(states[0].dtype)[..., None]  # (B, T, 1)
    h = states[0]  # embeddings are frozen copies of the teacher's
    losses: list[torch.Tensor] = []
    for i, layer in enumerate(student.layers):
        if i in starts:
            h = states[i]
        h = layer(h, mask)
        if i in targets:
            losses.append(_hidden_loss(h, states[i + 1], m, settings.hidden_loss))
    emb = mean_pool(h, attention_mask)
    cos = F.cosine_similarity(emb, mean_pool(states[-1], attention_mask), dim=-1).mean()
    return torch.stack(losses).mean() + settings.cos_weight * (1.0 - cos)


class Progress:
    """Training progress (``detransformer_edge.progress``: tqdm on a terminal, log lines elsewhere):
    ``update(step, loss=...)`` with the absolute step."""

    def __init__(self, total: int, start: int = 0, label: str = "", stream: Any = None) -> None:
        from detransformer_edge.progress import progress

        self.done = start
        self.bar = progress(label, total=total, unit="step", initial=start, stream=stream)

    def update(self, done: int, **info: float) -> None:
        if info:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()}, refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()


def _batches(sentences: Sequence[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless shuffled batches; epoch e uses seed + e so a resumed run sees the same order."""
    epoch = 0
    while True:
        order = list(range(len(sentences)))
        random.Random(seed + epoch).shuffle(order)
        for k in range(0, len(order) - batch_size + 1, batch_size):
            yield [sentences[i] for i in order[k : k + batch_size]]
        epoch += 1


Tokenize = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def embedding_cosine(student: Encoder, teacher: Encoder, sentences: Sequence[str], tokenize: Tokenize,
                     max_len: int = 64, batch_size: int = 64, device: str = "cpu") -> float:
    """Mean cosine between student and teacher sentence embeddings."""
    total, n = 0.0, 0
    student.eval()
    teacher.eval()
    for k in range(0, len(sentences), batch_size):
        ids, mask = tokenize(list(sentences[k : k + batch_size]), max_len)
        ids, mask = ids.to(device), mask.to(device)
        cos = F.cosine_similarity(student.sentence_embedding(ids, mask), teacher.sentence_embedding(ids, mask))
        total += cos.sum().item()
        n += len(cos)
    return total / max(1, n)


def distil(student: Encoder, teacher: Encoder, train: Sequence[str], tokenize: Tokenize,
           settings: DistilSettings, out_dir: Path | None = None, device: str = "cpu",
           progress: bool = True, on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``student`` towards ``teacher``; checkpoint to ``out_dir`` and resume from it if present.

    Embeddings stay frozen (they are exact copies and the teacher's inputs to layer 0).
    Returns the loss of every step run in this call. ``on_step(step)`` runs after each step
    (e.g. to evaluate a learning curve; the student is in train mode, the hook may switch it).
    """
    student.to(device).train()
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for n, p in student.named_parameters() if not n.startswith("embeddings.")]
    for p in student.embeddings.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, settings.warmup, settings.steps, 0.1))
    step = 0
    ckpt = out_dir / "checkpoint.pt" if out_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = load_resumable(ckpt, student, device)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        log.info("resuming distillation at step %d from %s", step, ckpt)
    batches = _batches(train, settings.batch_size, settings.seed)
    for _ in range(step):  # skip what the checkpoint already saw (cheap: no tokenising)
        next(batches)
    bar = Progress(settings.steps, step, "distil") if progress else None
    losses: list[float] = []
    while step < settings.steps:
        ids, mask = tokenize(next(batches), settings.max_len)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            states = teacher_states(teacher, ids, mask)
        local = step < settings.local_frac * settings.steps
        loss = distillation_loss(student, states, ids, mask, settings, local=local)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if bar is not None:
            bar.update(step, loss=losses[-1])
        if on_step is not None:
            on_step(step)
            student.train()
        if ckpt is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step, "layout": layout_of(student.cfg)}, tmp)
            os.replace(tmp, ckpt)
    if bar is not None:
        bar.close()
    student.eval()
    return losses


def save_student(student: Encoder, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """DIR/model.safetensors (float32) + DIR/config.json (the EncoderConfig fields)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out_dir / "model.safetensors"))
    cfg = {k: v for k, v in asdict(student.cfg).items() if k in _config_init_fields()}
    (out_dir / "config.json").write_text(json.dumps({"encoder": cfg, **(extra or {})}, indent=2) + "\n")


def _config_init_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(EncoderConfig) if f.init}


def load_student(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Encoder:
    """Read a converted model written by ``save_student``."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise ConfigError(f"{model_dir} has no model.safetensors; run `detransformer-edge convert --out {model_dir}`")
    meta = json.loads((model_dir / "config.json").read_text())
    cfg = EncoderConfig(**meta["encoder"])
    with torch.device("meta"):
        model = Encoder(cfg)
    sd = load_file(str(model_dir / "model.safetensors"))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model.eval()


def load_pretrained(name: str = "minilm-l6") -> tuple[Encoder, Any]:
    """The pretrained standard encoder (float32, eval) and its ``TextTokenizer``."""
    from detransformer_edge.weights.loaders import load_model

    loaded = load_model(name)
    return loaded.model.float().eval(), loaded.tokenizer


def make_tokenize(tokenizer: Any) -> Tokenize:
    """``tokenize(texts, max_len) -> (input_ids, attention_mask)`` from a ``TextTokenizer``;
    texts longer than ``max_len`` tokens are cut (keeping the final [SEP]), batches padded to the
    longest row."""
    backend = tokenizer.backend  # tokenizers.Tokenizer, padding and truncation off

    def tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids if len(e.ids) <= max_len else e.ids[: max_len - 1] + e.ids[-1:]
                for e in backend.encode_batch(texts)]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        return ids, mask

    return tokenize


def convert_and_distil(source: str, nd: int, nb: int, out_dir: str | Path, settings: DistilSettings,
                       device: str = "cpu", sub_attn: str = "full") -> dict[str, Any]:
    """The whole `convert` command: init from ``source``, distil, write model, config and quality."""
    from detransformer_edge.model.config import get_config
    from detransformer_edge.training.corpus import load_corpus

    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_pretrained(source)
    cfg = get_config(source, nd=nd, nb=nb, sub_attn=sub_attn)
    if not isinstance(cfg, EncoderConfig):
        raise ConfigError(f"{source!r} is not an encoder; conversion handles encoders only")
    cfg = dataclasses_replace(cfg, norm_eps=teacher.cfg.norm_eps)
    tokenize = make_tokenize(tokenizer)
    corpus = load_corpus()
    held = corpus.held_out[: settings.eval_sentences]
    student = init_student(teacher, cfg, seed=settings.seed)
    quality_path = out_dir / "quality.json"
    init_cos = None
    if quality_path.exists():  # resumed run: keep the first measurement
        init_cos = json.loads(quality_path.read_text()).get("cosine_init")
    if init_cos is None:
        init_cos = embedding_cosine(student, teacher, held, tokenize, settings.max_len)
        quality_path.write_text(json.dumps({"cosine_init": init_cos}) + "\n")
    losses = distil(student, teacher.to(device), corpus.train, tokenize, settings, out_dir, device)
    student.to("cpu")
    teacher.to("cpu")
    after = embedding_cosine(student, teacher, held, tokenize, settings.max_len)
    quality = {
        "source": source, "nd": nd, "nb": nb, "sub_attn": cfg.sub_attn, "d_ff_sub": cfg.d_ff_sub,
        "params_teacher": teacher.num_params(), "params_student": student.num_params(),
        "cosine_init": init_cos, "cosine_after": after, "held_out_sentences": len(held),
        "train_sentences": len(corpus.train), "corpus_fingerprint": corpus.fingerprint,
        "settings": asdict(settings), "final_loss": losses[-1] if losses else None,
        "seconds": time.monotonic() - started, "device": device, "threads": torch.get_num_threads(),
    }
    save_student(student, out_dir, {"source": source, "quality": "quality.json"})
    quality_path.write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def dataclasses_replace(cfg: EncoderConfig, **changes: Any) -> EncoderConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def embedding_cosine_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine of two (N, d) embedding matrices."""
    return float(F.cosine_similarity(a, b, dim=-1).mean())
