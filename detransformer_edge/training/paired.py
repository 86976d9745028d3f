"""The paper's paired experiment at laptop scale: a standard and decoupled decoders trained from
scratch on the same text, same steps, same hyper-parameters; validation perplexity compared.

* Tokenizer: byte-level BPE (``tokenizers``), 4096 entries incl. the end-of-sentence token
  ``<|eos|>``, trained on the corpus' train split and saved as one JSON file. ``--tokenizer PATH``
  makes another machine (a GPU box, another Python or ``tokenizers`` version) use exactly this
  file; the token streams' sha256 is recorded so two machines can check they saw the same ids.
* Data: train sentences tokenised, joined with EOS into one stream and cut into windows of
  ``seq_len + 1`` tokens at stride ``seq_len`` (inputs = first ``seq_len``, targets = last
  ``seq_len``); epoch e visits them in the order ``numpy.random.default_rng([seed, e])`` gives.
  Validation: the held-out split packed the same way, in order, the first ``val_tokens``
  (32 768 of its 161 515) predicted tokens; the curve during training uses the first
  ``curve_tokens`` (8 192).
* Models: ``paired_config(nd, nb)``: Llama-style decoder, vocab 4096, d_model 384, 8 layers,
  6 heads of 64 (no GQA), SwiGLU 1024, tied embeddings: 15.73 M parameters. Decoupled variants
  (sub_attn "full") derive I' for parameter parity; ``run_paired`` checks every variant is within
  1% of the standard model before training anything.
* Training: AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up (5%)
  then cosine decay to 10%, grad clip 1.0, float32 everywhere (TF32 off on CUDA). Checkpoint
  every ``checkpoint_every`` steps to ``DIR/<model>/checkpoint.pt`` and resume from it; a model
  whose ``DIR/<model>/result.json`` exists with the same settings is not trained again.
* Wire precision: after training, each decoupled model's validation perplexity with the hidden
  state rounded (``training.precision.round_trip``) at the input of every coupled layer (where the
  sub-block outputs are all-gathered over the network), for ``float16`` and ``int8``.

The experiment's parts: the token data in ``training/token_data.py``, training and evaluation
(with the CPU budget behind ``DEFAULT_STEPS``) in ``training/lm.py``; here the model shapes, the
parity check, one model's run and the report.

Only torch, numpy, tokenizers and safetensors are imported by these modules (no MQTT / HTTP
service modules), so ``python -m detransformer_edge.training.paired`` runs on a bare GPU machine.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import DecoderConfig
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.training.corpus import Corpus, load_corpus
from detransformer_edge.training.lm import LMSettings, build_model, evaluate, train_lm, wire_layers
from detransformer_edge.training.precision import WIRE_DTYPES
from detransformer_edge.training.token_data import (
    VOCAB_SIZE,
    Batches,
    TokenData,
    load_token_data,
    sha_ids,
    validation_set,
)

PARITY_TOLERANCE = 0.01  # decoupled parameter count within 1% of the standard model
TARGET_RATIO = 1.05  # decoupled perplexity within 5% of the standard model's

MODEL_NAMES = ("std", "nd2nb2", "nd2nb4", "nd4nb2", "nd4nb4")
_NAME = re.compile(r"^nd(\d+)nb(\d+)$")


# --------------------------------------------------------------------------- model shapes


def paired_config(nd: int = 1, nb: int | None = None, vocab_size: int = VOCAB_SIZE,
                  **overrides: Any) -> DecoderConfig:
    """The experiment's decoder (``nb=None``: standard) -- about 15.7 M parameters."""
    fields: dict[str, Any] = dict(
        name="paired-lm", vocab_size=vocab_size, d_model=384, n_layers=8, n_heads=6, n_kv_heads=6,
        d_ff=1024, max_position=2048, rope_theta=10000.0, tie_embeddings=True, bos_token_id=0,
        eos_token_id=0, sub_attn="full",
    )
    fields.update(overrides)
    return DecoderConfig(nd=nd, nb=nb, **fields)


def parse_model_name(name: str) -> tuple[int, int | None]:
    """'std' -> (1, None); 'nd4nb2' -> (4, 2)."""
    if name == "std":
        return 1, None
    m = _NAME.match(name)
    if not m:
        raise ConfigError(f"unknown model {name!r}: use 'std' or 'nd<N>nb<M>', e.g. {', '.join(MODEL_NAMES)}")
    return int(m.group(1)), int(m.group(2))


def parse_only(only: str | Sequence[str] | None) -> list[str]:
    if only is None:
        return list(MODEL_NAMES)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    if not names:
        raise ConfigError("--only names no model")
    for n in names:
        parse_model_name(n)
    return list(dict.fromkeys(names))


def model_configs(names: Sequence[str], vocab_size: int = VOCAB_SIZE,
                  **overrides: Any) -> dict[str, DecoderConfig]:
    """Configs for ``names``; a DecoderConfig error (nd not dividing d_model, ...) names the model."""
    out: dict[str, DecoderConfig] = {}
    for name in names:
        nd, nb = parse_model_name(name)
        try:
            out[name] = paired_config(nd, nb, vocab_size=vocab_size, **overrides)
        except ConfigError as exc:
            raise ConfigError(f"model {name}: {exc}") from exc
    return out


def param_count(cfg: DecoderConfig) -> int:
    with torch.device("meta"):
        return Decoder(cfg).num_params()


def check_parity(configs: dict[str, DecoderConfig], tolerance: float = PARITY_TOLERANCE) -> dict[str, int]:
    """Parameter counts; ConfigError unless every model is within ``tolerance`` of the standard one."""
    counts = {name: param_count(cfg) for name, cfg in configs.items()}
    ref_cfg = dataclasses.replace(next(iter(configs.values())), nd=1, nb=None)
    ref = param_count(ref_cfg)
    for name, n in counts.items():
        if abs(n - ref) / ref > tolerance:
            raise ConfigError(f"model {name} has {n} parameters, {100 * (n - ref) / ref:+.2f}% vs the "
                              f"standard model's {ref} (limit {100 * tolerance:.0f}%)")
    return counts


# --------------------------------------------------------------------------- the experiment


def _runtime(device: str) -> dict[str, Any]:
    info = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}
    try:
        import tokenizers

        info["tokenizers"] = tokenizers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def train_one(name: str, cfg: DecoderConfig, data: TokenData, settings: LMSettings, out: Path,
              device: str = "cpu", progress: bool = True, save_weights: bool = True) -> dict[str, Any]:
    """Train model ``name``, evaluate it (plus wire precision when decoupled), write DIR/name/result.json."""
    model_dir = out / name
    model_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, settings.seed)
    t0 = time.monotonic()
    run = train_lm(model, data, settings, model_dir, device, progress, label=name)
    vx, vy = validation_set(data, settings.seq_len, settings.val_tokens)
    final = evaluate(model, vx, vy, settings.eval_batch_size, device)
    wire: dict[str, float] = {}
    if cfg.is_decoupled:
        wire["float32"] = final["ppl"]  # float32 on the wire is the model itself
        for dt in WIRE_DTYPES[1:]:
            wire[dt] = evaluate(model, vx, vy, settings.eval_batch_size, device, wire=dt)["ppl"]
    result = {
        "model": name, "nd": cfg.nd, "nb": cfg.nb, "layer_kinds": list(cfg.layer_kinds),
        "d_ff_sub": cfg.d_ff_sub if cfg.is_decoupled else None, "params": model.num_params(),
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init},
        "settings": settings.record(), "data": data_record(data, settings),
        "val_ppl": final["ppl"], "val_nll": final["nll"], "val_tokens": final["tokens"],
        "wire_ppl": wire, "wire_layers": wire_layers(model) if cfg.is_decoupled else [],
        "curve": run["curve"], "final_train_loss": float(np.mean(run["losses"][-settings.eval_interval:])),
        "first_train_loss": run["losses"][0] if run["losses"] else None,
        "train_seconds": run["train_seconds"], "seconds_per_step": run["train_seconds"] / max(1, run["step"]),
        "total_seconds_this_call": time.monotonic() - t0, **_runtime(device),
    }
    if save_weights:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                 if k != "lm_head.weight" or not cfg.tie_embeddings}
        save_file(state, str(model_dir / "model.safetensors"))
    (model_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    ckpt = model_dir / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()  # result.json marks the model done; the optimizer state is 3x the weights
    return result


def data_record(data: TokenData, settings: LMSettings) -> dict[str, Any]:
    """What a run trained and validated on, plus a hash of its first batch (the shuffled order)."""
    first = Batches(data.train, settings.seq_len, settings.batch_size, settings.seed).get(0)[0]
    return {**data.describe(), "first_batch_sha": sha_ids(first.numpy())}


def _comparable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("tokenizer_sha256", "corpus_fingerprint", "train_ids_sha", "held_out_ids_sha", "first_batch_sha")
    return a["settings"] == b["settings"] and all(a["data"].get(k) == b["data"].get(k) for k in keys)


def write_report(out: Path) -> dict[str, Any]:
    """Merge every DIR/<model>/result.json into DIR/paired.json and DIR/paired.md."""
    results = {}
    for p in sorted(out.glob("*/result.json")):
        r = json.loads(p.read_text())
        results[r["model"]] = r
    order = [n for n in MODEL_NAMES if n in results] + sorted(n for n in results if n not in MODEL_NAMES)
    std = results.get("std")
    rows = []
    for name in order:
        r = results[name]
        row = {"model": name, "nd": r["nd"], "nb": r["nb"], "params": r["params"], "val_ppl": r["val_ppl"],
               "wire_ppl": r["wire_ppl"], "seconds_per_step": r["seconds_per_step"],
               "train_seconds": r["train_seconds"], "device": r["device"], "threads": r["threads"]}
        if std is not None and name != "std":
            if _comparable(r, std):
                row["param_ratio"] = r["params"] / std["params"]
                row["ppl_ratio"] = r["val_ppl"] / std["val_ppl"]
                row["within_target"] = row["ppl_ratio"] <= TARGET_RATIO
            else:
                row["ppl_ratio"] = None
                row["note"] = "settings or data differ from the standard model's run: not compared"
        rows.append(row)
    report = {
        "experiment": "paired standard vs decoupled decoder, trained from scratch (issue 7, 3a + 4)",
        "target": f"decoupled val ppl <= {TARGET_RATIO} x standard",
        "wire_precision": "hidden state rounded at the input of every coupled layer (sub-block outputs "
                          "all-gathered there); float32 = no rounding",
        "rows": rows, "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "paired.md").write_text(markdown_table(report) + "\n")
    return report


def markdown_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = ["| model | nd | nb | params | val ppl | ratio vs std | <= 1.05 | ppl float16 wire | ppl int8 wire "
             "| s/step | train s | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, ok, w = r.get("ppl_ratio"), r.get("within_target"), r["wire_ppl"]
        cells = [r["model"], str(r["nd"]), str(r["nb"] or "-"), f"{r['params']:,}", f"{r['val_ppl']:.3f}",
                 "-" if ratio is None else f"{ratio:.4f}", "-" if ok is None else ("yes" if ok else "no"),
                 f"{w['float16']:.3f}" if w else "-", f"{w['int8']:.3f}" if w else "-",
                 f"{r['seconds_per_step']:.3f}", f"{r['train_seconds']:.0f}", f"{r['device']} x{r['threads']}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        any_r = next(iter(report["results"].values()))
        s, d = any_r["settings"], any_r["data"]
        lines += ["", f"steps {s['steps']}, batch {s['batch_size']} x seq_len {s['seq_len']}, lr {s['lr']} "
                  f"(warm-up {s['warmup']}, cosine to {s['min_lr_ratio']}), AdamW wd {s['weight_decay']}, "
                  f"seed {s['seed']}; validation: first {any_r['val_tokens']} held-out tokens; "
                  f"tokenizer sha256 {d['tokenizer_sha256'][:16]}, corpus {d['corpus_fingerprint']}, "
                  f"{d['train_tokens']:,} train tokens."]
    return "\n".join(lines)


def run_paired(out: str | Path, only: str | Sequence[str] | None = None, settings: LMSettings | None = None,
               device: str = "cpu", threads: int | None = None, tokenizer: str | Path | None = None,
               corpus: Corpus | None = None, vocab_size: int = VOCAB_SIZE, save_weights: bool = True,
               progress: bool = True, model_overrides: dict[str, Any] | None = None,
               echo: bool = True) -> dict[str, Any]:
    """Train the standard model and the decoupled ones (``only``: a subset) with identical settings,
    then write DIR/paired.json and DIR/paired.md (merged with results already in DIR)."""
    settings = settings or LMSettings()
    out = Path(out)
    names = parse_only(only)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device available to this torch build")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if threads is not None:
        if threads <= 0:
            raise ConfigError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    overrides = dict(model_overrides or {})
    model_configs(names, vocab_size, **overrides)  # bad --only / shapes fail before any data work
    if corpus is None:
        corpus = load_corpus()
    data = load_token_data(corpus, tokenizer, vocab_size)
    configs = model_configs(names, data.vocab_size, **overrides)
    if settings.seq_len > next(iter(configs.values())).max_position:
        raise ConfigError(f"seq_len {settings.seq_len} exceeds max_position")
    counts = check_parity(configs)
    if echo:
        std_n = param_count(dataclasses.replace(next(iter(configs.values())), nd=1, nb=None))
        for name, n in counts.items():
            print(f"{name}: {n:,} parameters ({100 * (n - std_n) / std_n:+.3f}% vs standard)")
    for name, cfg in configs.items():
        done = out / name / "result.json"
        if done.exists():
            prev = json.loads(done.read_text())
            if _comparable(prev, {"settings": settings.record(), "data": data_record(data, settings)}):
                if echo:
                    print(f"{name}: already trained ({done}), val ppl {prev['val_ppl']:.3f}")
                continue
            raise ConfigError(f"{done} was trained with other settings or data; use another --out")
        r = train_one(name, cfg, data, settings, out, device, progress, save_weights)
        if echo:
            wire = ", ".join(f"{k} {v:.3f}" for k, v in r["wire_ppl"].items())
            print(f"{name}: val ppl {r['val_ppl']:.3f}{f' (wire: {wire})' if wire else ''}; "
                  f"{r['seconds_per_step']:.3f} s/step, {r['train_seconds']:.0f} s training")
        write_report(out)
    return write_report(out)
