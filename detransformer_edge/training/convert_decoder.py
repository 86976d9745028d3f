"""Convert a pretrained (standard) Llama-style decoder into a decoupled DeTransformer student and
distil it; the decoder counterpart of ``training/convert.py`` (which handles encoders).

Initialisation (``init_decoder_student``) copies what carries over exactly and slices the rest:

* token embedding (tied with the output head), final RMSNorm and coupled layers: copied;
* decoupled layer i, sub-block j owning features ``s = cfg.sub_slice(j)``, query-head rows
  ``r = cfg.sub_head_rows(j)`` and K/V rows ``kv = cfg.sub_kv_rows(j)``: Q takes ``W_q[r, s]``,
  K and V take ``W[kv, s]``, the output projection ``W_o[s, r]``. With ``sub_attn="full"`` ``r``
  and ``kv`` are every head; with ``"slice"`` (nd must divide both head counts: SmolLM2's 9/3
  heads, nd = 3) sub-block j owns query heads 3j..3j+2 and the one K/V head j they share in the
  teacher, so the GQA grouping is the teacher's. Heads keep their 64 dimensions in the
  rotate-half order (the GGUF permutation is undone on load), so RoPE applies unchanged in
  either layout; both RMSNorm weights
  take slice ``s`` (the sub-block normalises by the RMS of its own slice: the one approximation at
  init besides the cut cross-slice terms); SwiGLU gate/up take input columns ``s`` and down takes
  output rows ``s`` of the teacher's intermediate units, ordered with the sub-block's own group of
  ``d_ff / nd`` units first and the others after it (as for encoders), trimmed or zero-padded
  (padded units: random gate/up, zero down, so they start silent) to I' = ``cfg.d_ff_sub``.
  For SmolLM2-135M with nd=2 the parameter-matched I' equals d_ff (1536), so nothing is trimmed.

With ``nd == 1`` and I' = d_ff the student is the teacher exactly (``tests/test_convert_decoder.py``).

Optionally (``calibrate_norms``, off by default: it did not help SmolLM2) every sub-block's
RMSNorm weights are rescaled before training so that its slice is normalised to the scale the
teacher's full-width norm gives it.

Distillation and evaluation live in ``training/distil_decoder.py``; here the initialisation,
saving and loading a converted decoder, and the whole command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import DecoderConfig
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.training.convert import _ffn_unit_order
from detransformer_edge.training.distil_decoder import (
    DecoderDistilSettings,
    distil_decoder,
    evaluate,
    pack_sentences,
)

log = logging.getLogger(__name__)

_LAYER_WEIGHTS = (
    "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "attn_norm", "ffn.gate", "ffn.up",
    "ffn.down", "ffn_norm",
)
_SAME_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim")


# --------------------------------------------------------------------------------------------
# Initialisation


def student_config(teacher_cfg: DecoderConfig, nd: int, nb: int | None, **overrides: Any) -> DecoderConfig:
    """The teacher's config (norm eps, RoPE theta from its file) with the DeTransformer knobs set."""
    if not isinstance(teacher_cfg, DecoderConfig):
        raise ConfigError(f"decoder conversion needs a DecoderConfig, got {type(teacher_cfg).__name__}")
    return dataclasses.replace(teacher_cfg, nd=nd, nb=nb, **overrides)


@torch.no_grad()
def init_decoder_student(teacher: Decoder, student_cfg: DecoderConfig, seed: int = 0) -> Decoder:
    """A decoupled student initialised from ``teacher``'s weights (see module docstring)."""
    if not isinstance(teacher, Decoder) or not isinstance(getattr(teacher, "cfg", None), DecoderConfig):
        raise ConfigError(f"the teacher must be a standard Decoder, got {type(teacher).__name__}")
    if not isinstance(student_cfg, DecoderConfig):
        raise ConfigError(f"the student config must be a DecoderConfig, got {type(student_cfg).__name__}")
    tcfg = teacher.cfg
    if tcfg.is_decoupled:
        raise ConfigError("the teacher must be a standard (coupled) decoder")
    for name in _SAME_FIELDS:
        if getattr(tcfg, name) != getattr(student_cfg, name):
            raise ConfigError(
                f"student {name}={getattr(student_cfg, name)} differs from teacher's {getattr(tcfg, name)}"
            )
    if student_cfg.tie_embeddings != tcfg.tie_embeddings:
        raise ConfigError("student and teacher must agree on tied embeddings")
    T = teacher.state_dict()
    torch.manual_seed(seed)
    student = Decoder(student_cfg)
    S = student.state_dict()
    for key, value in S.items():  # the teacher's actual tensors must fit the shapes its config claims
        if key in T and not key.startswith("layers.") and T[key].shape != value.shape:
            raise ConfigError(f"teacher {key} has shape {tuple(T[key].shape)}, expected {tuple(value.shape)}")
    out: dict[str, torch.Tensor] = {}
    for key in ("tok_emb.weight", "norm.weight", "lm_head.weight"):
        out[key] = T[key].detach().clone().float()

    def t(i: int, p: str) -> torch.Tensor:
        key = f"layers.{i}.{p}.weight"
        if key not in T:
            raise ConfigError(f"teacher has no {key}")
        return T[key].detach().float()

    for i, kind in enumerate(student_cfg.layer_kinds):
        if kind == "coupled":
            for p in _LAYER_WEIGHTS:
                out[f"layers.{i}.{p}.weight"] = t(i, p).clone()
            continue
        I_sub = student_cfg.d_ff_sub
        for j in range(student_cfg.nd):
            s = student_cfg.sub_slice(j)
            r, kv = student_cfg.sub_head_rows(j), student_cfg.sub_kv_rows(j)
            pre = f"layers.{i}.sub_blocks.{j}."
            out[pre + "attn.q_proj.weight"] = t(i, "attn.q_proj")[r, s].clone()  # (sub_heads*hd, d_sub)
            for p in ("k_proj", "v_proj"):
                out[pre + f"attn.{p}.weight"] = t(i, f"attn.{p}")[kv, s].clone()  # (sub_kv_heads*hd, d_sub)
            out[pre + "attn.o_proj.weight"] = t(i, "attn.o_proj")[s, r].clone()  # (d_sub, sub_heads*hd)
            for norm in ("attn_norm", "ffn_norm"):
                out[pre + f"{norm}.weight"] = t(i, norm)[s].clone()
            units = _ffn_unit_order(tcfg.d_ff, student_cfg.nd, j)[:I_sub]
            n = len(units)
            gate_w = S[pre + "ffn.gate.weight"].clone()  # (I', d_sub); random rows for padded units
            up_w = S[pre + "ffn.up.weight"].clone()
            down_w = torch.zeros(student_cfg.d_sub, I_sub)  # padded units start silent
            gate_w[:n] = t(i, "ffn.gate")[units][:, s]
            up_w[:n] = t(i, "ffn.up")[units][:, s]
            down_w[:, :n] = t(i, "ffn.down")[s][:, units]
            out[pre + "ffn.gate.weight"], out[pre + "ffn.up.weight"] = gate_w, up_w
            out[pre + "ffn.down.weight"] = down_w
    missing = set(S) - set(out)
    if missing:
        raise ConfigError(f"conversion left student parameters unset: {sorted(missing)[:5]}")
    bad = [k for k in S if out[k].shape != S[k].shape]
    if bad:
        raise ConfigError(f"teacher weights do not fit the student: {bad[:5]}")
    student.load_state_dict(out)
    student.tie_weights()
    return student.eval()


@torch.no_grad()
def calibrate_norms(student: Decoder, teacher: Decoder, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Rescale each sub-block's RMSNorm weights so its slice is normalised to the teacher's scale.

    The teacher normalises slice ``s`` of x by rms(x) over all features; a sub-block only sees
    x_s and divides by rms(x_s). Multiplying the sub-block's norm weight by the mean of
    rms(x_s) / rms(x) over the teacher's activations on ``input_ids`` (B, T) restores the typical
    scale (models with a few huge "massive activation" features make the two differ a lot).
    Returns the factors used, by parameter name. With nd=1 every factor is 1.
    """
    cfg = student.cfg
    sums: dict[tuple[int, str], torch.Tensor] = {}
    count = 0
    hooks = []

    def hook(i: int, which: str):
        def fn(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            full = x.pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
            parts = torch.stack([x[..., cfg.sub_slice(j)].pow(2).mean(-1).sqrt() for j in range(cfg.nd)], -1)
            ratio = (parts / full.clamp_min(1e-12)).reshape(-1, cfg.nd).sum(0)  # (nd,)
            sums[(i, which)] = sums.get((i, which), 0) + ratio
        return fn

    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "decoupled":
            layer = teacher.layers[i]
            hooks.append(layer.attn_norm.register_forward_pre_hook(hook(i, "attn_norm")))
            hooks.append(layer.ffn_norm.register_forward_pre_hook(hook(i, "ffn_norm")))
    try:
        for k in range(0, len(input_ids), batch_size):
            ids = input_ids[k : k + batch_size]
            teacher(ids)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    factors: dict[str, float] = {}
    for (i, which), total in sums.items():
        for j in range(cfg.nd):
            f = float(total[j]) / max(1, count)
            getattr(student.layers[i].sub_blocks[j], which).weight.mul_(f)
            factors[f"layers.{i}.sub_blocks.{j}.{which}"] = f
    return factors


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_decoder_student(student: Decoder, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """DIR/model.safetensors (float32; the tied output head is stored once, as tok_emb) +
    DIR/config.json (the DecoderConfig fields under "decoder")."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous() for k, v in student.state_dict().items()}
    if student.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out_dir / "model.safetensors"))
    init = {f.name for f in dataclasses.fields(DecoderConfig) if f.init}
    cfg = {k: v for k, v in asdict(student.cfg).items() if k in init}
    (out_dir / "config.json").write_text(json.dumps({"decoder": cfg, **(extra or {})}, indent=2) + "\n")


def load_decoder_student(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Decoder:
    """Read a converted decoder written by ``save_decoder_student``."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").exists():
        raise ConfigError(f"{model_dir} has no model.safetensors; run `detransformer-edge convert --out {model_dir}`")
    meta = json.loads((model_dir / "config.json").read_text())
    if "decoder" not in meta:
        raise ConfigError(f"{model_dir}/config.json does not describe a decoder")
    cfg = DecoderConfig(**meta["decoder"])
    model = Decoder(cfg)
    sd = load_file(str(model_dir / "model.safetensors"))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    model.tie_weights()
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# The whole command


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def convert_decoder_and_distil(source: str, nd: int, nb: int, out_dir: str | Path,
                               settings: DecoderDistilSettings, device: str = "cpu",
                               progress: bool = True, sub_attn: str = "full") -> dict[str, Any]:
    """`detransformer-edge convert --from <decoder>`: init from ``source``, evaluate, distil,
    evaluate again, write model, config and quality.json. With ``settings.max_minutes`` the whole
    call (loading, evaluations, training, saving) aims to finish within that many minutes."""
    from detransformer_edge.training.corpus import load_corpus
    from detransformer_edge.weights.loaders import load_model

    started = time.monotonic()
    deadline = None if settings.max_minutes is None else started + 60.0 * settings.max_minutes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(source)
    teacher = loaded.model.float().eval()
    if not isinstance(teacher, Decoder):
        raise ConfigError(f"{source!r} is not a decoder")
    for p in teacher.parameters():
        p.requires_grad_(False)
    tokenizer = loaded.tokenizer
    cfg = student_config(teacher.cfg, nd, nb, sub_attn=sub_attn)
    corpus = load_corpus()
    train = pack_sentences(corpus.train, tokenizer, settings.seq_len, seed=settings.seed)
    held = pack_sentences(corpus.held_out, tokenizer, settings.seq_len, seed=12345, max_tokens=settings.eval_tokens)
    log.info("packed %d train and %d held-out sequences of %d tokens", len(train), len(held), settings.seq_len)
    student = init_decoder_student(teacher, cfg, seed=settings.seed)
    factors: dict[str, float] = {}
    if settings.calibrate_norms:
        factors = calibrate_norms(student, teacher, train[: max(1, settings.calibration_tokens // settings.seq_len)])
    quality_path = out_dir / "quality.json"
    previous: dict[str, Any] = json.loads(quality_path.read_text()) if quality_path.exists() else {}
    ref_path = out_dir / "teacher_eval.pt"

    def ev(model: Decoder, ref: torch.Tensor | None) -> tuple[dict[str, Any], float]:
        t0 = time.monotonic()
        r = evaluate(model.to(device), held, settings.eval_batch_size, device, ref)
        return r, time.monotonic() - t0

    eval_seconds = None
    if ref_path.exists() and "ppl_teacher" in previous and "ppl_init" in previous:  # resumed run
        teacher_top1 = torch.load(ref_path, weights_only=True)
        ppl_teacher, ppl_init = previous["ppl_teacher"], previous["ppl_init"]
        agree_init, eval_seconds = previous.get("agreement_init"), previous.get("eval_seconds")
    else:
        r_t, _ = ev(teacher, None)
        teacher_top1, ppl_teacher = r_t["top1"], r_t["perplexity"]
        torch.save(teacher_top1, ref_path)
        r_i, eval_seconds = ev(student, teacher_top1)
        ppl_init, agree_init = r_i["perplexity"], r_i["agreement"]
        quality_path.write_text(json.dumps({"ppl_teacher": ppl_teacher, "ppl_init": ppl_init,
                                            "agreement_init": agree_init, "eval_seconds": eval_seconds}) + "\n")
    log.info("held-out perplexity: teacher %.2f, sliced student %.2f", ppl_teacher, ppl_init)
    if progress:
        print(f"held-out perplexity ({len(held) * settings.seq_len} tokens): teacher {ppl_teacher:.2f}, "
              f"sliced student {ppl_init:.2f} (top-1 agreement {agree_init:.3f})", flush=True)
    train_deadline = None
    if deadline is not None:
        # keep room for the final evaluation (as long as the initial one, plus a margin) and saving
        reserve = 1.25 * (eval_seconds or 60.0) + 30.0
        train_deadline = deadline - reserve
    result = distil_decoder(student, teacher, train, settings, out_dir, device, progress, train_deadline)
    r_a, _ = ev(student, teacher_top1)
    student.to("cpu")
    save_decoder_student(student, out_dir, {"source": source, "quality": "quality.json"})
    s_per_step = result.train_seconds / result.steps_this_call if result.steps_this_call else None
    quality = {
        "source": source, "nd": nd, "nb": nb, "sub_attn": cfg.sub_attn, "d_ff_sub": cfg.d_ff_sub,
        "ppl_teacher": ppl_teacher, "ppl_init": ppl_init, "ppl_after": r_a["perplexity"],
        # what the planner reads (planner/variants.py): held-out perplexity as a multiple of the
        # teacher's; a decoupled decoder serves generation only within the task's budget (1.10x)
        "ppl_ratio": r_a["perplexity"] / ppl_teacher,
        "agreement_init": agree_init, "agreement_after": r_a["agreement"],
        "eval_tokens": r_a["tokens"], "eval_seconds": eval_seconds,
        "steps": result.step, "steps_this_run": result.steps_this_call, "stopped_by": result.stopped_by,
        "train_seconds": result.train_seconds, "seconds_per_step": s_per_step,
        "final_loss": result.losses[-1] if result.losses else None,
        "first_loss": result.losses[0] if result.losses else None,
        "seconds": time.monotonic() - started, "cpu_seconds": _cpu_seconds(),
        "threads": torch.get_num_threads(), "device": device,
        "params_teacher": teacher.num_params(), "params_student": student.num_params(),
        "train_sequences": len(train), "train_sentences": len(corpus.train),
        "held_out_sentences": len(corpus.held_out), "corpus_fingerprint": corpus.fingerprint,
        "loss": "KL(teacher||student) + hidden_weight * normalised block-end MSE",
        "norm_calibration": ({"min": min(factors.values()), "max": max(factors.values()),
                              "median": sorted(factors.values())[len(factors) // 2]} if factors else None),
        "settings": asdict(settings),
    }
    quality_path.write_text(json.dumps(quality, indent=2) + "\n")
    return quality
