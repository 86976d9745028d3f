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

CPU budget: measured on the development machine with nothing else running (2 cores,
``--threads 2``, torch 2.13 CPU), batch 16 x seq_len 128 = 2048 tokens/step, ``train_lm`` for 8
steps per model: standard 1.35 s/step, nd=2 nb=2 1.63 s/step, nd=4 nb=4 1.73 s/step (decoupled
layers run their sub-blocks one after another: smaller matrix products). ``DEFAULT_STEPS = 800``
keeps the slowest model at about 23 min of training plus about 2 min of evaluation (curve on
8 192 tokens every steps // 5 steps, final on 32 768 tokens, twice more for the wire dtypes): <= 30 min
for one model. That is 1.64 M training tokens (54% of one epoch of the 3.06 M-token train stream).
A GPU run of the same matrix gives the same numbers within noise; it can also pass a larger
``--steps`` (all five models must share it to be compared).

Only torch, numpy, tokenizers and safetensors are imported here (no MQTT / HTTP service
modules), so ``python -m detransformer_edge.training.paired`` runs on a bare GPU machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
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
from detransformer_edge.training.corpus import Corpus, load_corpus
from detransformer_edge.training.precision import WIRE_DTYPES, wire_rounding

log = logging.getLogger(__name__)

EOS = "<|eos|>"
VOCAB_SIZE = 4096
CACHE_DIR = Path.home() / ".cache" / "detransformer_edge" / "paired"
PARITY_TOLERANCE = 0.01  # decoupled parameter count within 1% of the standard model
TARGET_RATIO = 1.05  # decoupled perplexity within 5% of the standard model's

# Seconds per training step (batch 16 x 128) on the shared 2-core development machine, two runs:
# DTE_CORPUS_FILE=runs/paired-data/corpus.json.gz nice -n 5 python -c '...' calling
# train_lm(build_model(cfg, 0), data, LMSettings(steps=12, curve_tokens=128, eval_every=10**6))
# with torch.set_num_threads(2); the spread is the other jobs' load.
SECONDS_PER_STEP_CPU = {"std": 1.35, "nd2nb2": 1.63, "nd4nb4": 1.73}  # quiet 2-core CPU, see above
DEFAULT_STEPS = 800
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128

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


# --------------------------------------------------------------------------- tokenizer and data


def train_tokenizer(sentences: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on ``sentences``; id 0 is ``<|eos|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(sentences), trainer, length=len(sentences))
    return tok


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_tokenizer_path(corpus: Corpus, vocab_size: int = VOCAB_SIZE) -> Path:
    return CACHE_DIR / f"tokenizer-{corpus.fingerprint}-v{vocab_size}.json"


def get_tokenizer(corpus: Corpus, path: str | Path | None = None, vocab_size: int = VOCAB_SIZE):
    """(tokenizer, path). ``path`` given: load exactly that file (it must exist). Otherwise the
    cached tokenizer for this corpus, trained on its train split and saved first if missing."""
    from tokenizers import Tokenizer

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer {path}: no such file (copy the tokenizer JSON trained on "
                              "the development machine; it is not retrained from a given path)")
    else:
        path = default_tokenizer_path(corpus, vocab_size)
        if not path.is_file():
            log.info("training the byte-level BPE tokenizer (%d entries) on %d sentences", vocab_size,
                     len(corpus.train))
            tok = train_tokenizer(corpus.train, vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            os.replace(tmp, path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise ConfigError(f"{path} is not a tokenizers JSON file: {exc}") from exc
    if tok.token_to_id(EOS) is None:
        raise ConfigError(f"{path} has no {EOS} token; it is not this experiment's tokenizer")
    return tok, path


def encode_stream(tok: Any, sentences: Sequence[str]) -> np.ndarray:
    """Sentences tokenised (encode_batch, all cores) and joined, each followed by EOS (int32)."""
    eos = tok.token_to_id(EOS)
    parts: list[np.ndarray] = []
    chunk = 8192
    for k in range(0, len(sentences), chunk):
        for enc in tok.encode_batch(list(sentences[k : k + chunk]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _sha_ids(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<i4").tobytes()).hexdigest()[:16]


@dataclass
class TokenData:
    train: torch.Tensor  # 1-D int64 token stream
    val: torch.Tensor
    vocab_size: int
    eos_id: int
    tokenizer_path: str
    tokenizer_sha: str
    corpus_fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_path, "tokenizer_sha256": self.tokenizer_sha,
                "vocab_size": self.vocab_size, "corpus_fingerprint": self.corpus_fingerprint,
                "train_tokens": int(self.train.numel()), "held_out_tokens": int(self.val.numel()),
                "train_ids_sha": _sha_ids(self.train.numpy()), "held_out_ids_sha": _sha_ids(self.val.numpy())}


def load_token_data(corpus: Corpus, tokenizer_path: str | Path | None = None,
                    vocab_size: int = VOCAB_SIZE, cache: bool = True) -> TokenData:
    """Both splits tokenised; cached as .npz keyed by corpus fingerprint + tokenizer sha256."""
    tok, path = get_tokenizer(corpus, tokenizer_path, vocab_size)
    tok_sha = _sha256_file(path)
    cache_file = CACHE_DIR / f"tokens-{corpus.fingerprint}-{tok_sha[:16]}.npz"
    arrays = None
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = z["train"], z["val"]
        except (OSError, ValueError, KeyError):
            arrays = None
    if arrays is None:
        t0 = time.monotonic()
        arrays = encode_stream(tok, corpus.train), encode_stream(tok, corpus.held_out)
        log.info("tokenised %d + %d tokens in %.1f s", len(arrays[0]), len(arrays[1]), time.monotonic() - t0)
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + ".tmp.npz")
            np.savez(tmp, train=arrays[0], val=arrays[1])
            os.replace(tmp, cache_file)
    return TokenData(torch.from_numpy(arrays[0].astype(np.int64)), torch.from_numpy(arrays[1].astype(np.int64)),
                     tok.get_vocab_size(), tok.token_to_id(EOS), str(path), tok_sha, corpus.fingerprint)


def windows(stream: torch.Tensor, seq_len: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i = stream[i*seq_len : i*seq_len + seq_len + 1] -> (inputs, targets), each (n, seq_len)."""
    starts = index.to(torch.int64)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    w = stream[starts]
    return w[:, :-1], w[:, 1:]


def n_windows(stream: torch.Tensor, seq_len: int) -> int:
    return max(0, (stream.numel() - 1) // seq_len)


class Batches:
    """Batch of step k, computed directly (a resumed run needs no skipping): epoch e visits the
    training windows in ``numpy.random.default_rng([seed, e]).permutation`` order."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.n = n_windows(stream, seq_len)
        if self.n < batch_size:
            raise ConfigError(f"the training stream has {self.n} windows of {seq_len} tokens, fewer than "
                              f"batch size {batch_size}")
        self.per_epoch = self.n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = torch.from_numpy(self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size].copy())
        return windows(self.stream, self.seq_len, idx)


def validation_set(data: TokenData, seq_len: int, val_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``val_tokens // seq_len`` held-out windows (all if fewer), in order."""
    n = min(val_tokens // seq_len, n_windows(data.val, seq_len))
    if n < 1:
        raise ConfigError(f"the held-out split has no window of {seq_len} tokens")
    return windows(data.val, seq_len, torch.arange(n))


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
    return {**data.describe(), "first_batch_sha": _sha_ids(first.numpy())}


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
