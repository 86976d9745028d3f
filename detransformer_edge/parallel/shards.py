"""The weights one device holds, cut from a full model by a placement (gpt-fast style: the
model code stays unchanged; parallelism is applied to it in a separate pass).

* a sub-block of a decoupled layer is an ordinary module; the sub-blocks a device holds of one
  layer (one or several) also form a :class:`SubBlockGroup` that runs them as one batched
  computation on the same storage, with the FFN's up/gate weights laid out for short-K
  products (see ``model/layers.py``);
* a coupled layer is either a whole replica or a Megatron tensor-parallel shard
  (:class:`TPShard`): a contiguous range of heads (column-parallel Q/K/V, row-parallel output)
  and of FFN units (column-parallel up/gate, row-parallel down). Ranges may be uneven, so any
  number of devices up to the number of heads can share a layer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from detransformer_edge.model.config import DecoderConfig, EncoderConfig
from detransformer_edge.model.decoder import Decoder, DecoderLayer
from detransformer_edge.model.encoder import Encoder, EncoderLayer
from detransformer_edge.model.layers import (
    Attention,
    DecoupledLayer,
    KVCache,
    SubBlockGroup,
    SwiGLU,
)
from detransformer_edge.parallel.plan import DeviceWeights, PlanError
from detransformer_edge.weights.quant.linear import GROUP_SIZE, quantize_model

Reduce = Callable[[torch.Tensor, str], Awaitable[torch.Tensor]]


def even_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into ``parts`` contiguous ranges, the first ones one longer."""
    if not 1 <= parts <= total:
        raise PlanError(f"cannot split {total} into {parts} non-empty parts")
    q, r = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append((start, end))
        start = end
    return out


def _linear(src: nn.Linear, rows: slice | None = None, cols: slice | None = None, bias: bool = True) -> nn.Linear:
    if not isinstance(src, nn.Linear):  # e.g. weights/quant's Int8Linear: no float weight to slice
        raise PlanError(f"tensor-parallel shards are cut from float weights, not {type(src).__name__}: "
                        "quantize the shard after build_shard (parallel.shards.quantize_shard)")
    w = src.weight
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    keep_bias = bias and src.bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=keep_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if keep_bias:
            b = src.bias if rows is None else src.bias[rows]
            out.bias.copy_(b)
    return out


class TPShard(nn.Module):
    """Rank ``rank`` of ``k`` of one coupled layer; partial sums meet in an all-reduce."""

    def __init__(self, layer: EncoderLayer | DecoderLayer, cfg: EncoderConfig | DecoderConfig, rank: int, k: int) -> None:
        super().__init__()
        self.family = cfg.family
        hd = cfg.head_dim
        h0, h1 = even_ranges(cfg.n_heads, k)[rank]
        n_kv = cfg.n_kv_heads if isinstance(cfg, DecoderConfig) else cfg.n_heads
        group = cfg.n_heads // n_kv
        kv0, kv1 = h0 // group, (h1 - 1) // group + 1
        kv_map = [(h0 + i) // group - kv0 for i in range(h1 - h0)]
        src: Attention = layer.attn
        self.attn = Attention(cfg.d_model, h1 - h0, kv1 - kv0, hd, bias=False, causal=src.causal, kv_map=kv_map)
        self.attn.q_proj = _linear(src.q_proj, rows=slice(h0 * hd, h1 * hd))
        self.attn.k_proj = _linear(src.k_proj, rows=slice(kv0 * hd, kv1 * hd))
        self.attn.v_proj = _linear(src.v_proj, rows=slice(kv0 * hd, kv1 * hd))
        self.attn.o_proj = _linear(src.o_proj, cols=slice(h0 * hd, h1 * hd), bias=False)
        self.o_bias = src.o_proj.bias  # added once, after the all-reduce (None for Llama)
        f0, f1 = even_ranges(cfg.d_ff, k)[rank]
        ffn = layer.ffn
        self.up = _linear(ffn.up, rows=slice(f0, f1))
        self.gate = _linear(ffn.gate, rows=slice(f0, f1)) if isinstance(ffn, SwiGLU) else None
        self.down = _linear(ffn.down, cols=slice(f0, f1), bias=False)
        self.down_bias = ffn.down.bias
        self.attn_norm, self.ffn_norm = layer.attn_norm, layer.ffn_norm  # replicated

    async def forward(
        self,
        x: torch.Tensor,
        reduce: Reduce,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        # Grad mode is entered per synchronous segment: held across an ``await`` it would leak
        # into whatever else the event loop runs meanwhile.
        part: torch.Tensor
        if self.family == "encoder":  # post-LN
            assert self.o_bias is not None and self.down_bias is not None  # BERT's linears have biases
            with torch.no_grad():
                part = self.attn(x, mask)
            a = await reduce(part, "attn")
            with torch.no_grad():
                x = self.attn_norm(x + a + self.o_bias)
                part = self.down(F.gelu(self.up(x)))
            f = await reduce(part, "ffn")
            with torch.no_grad():
                out: torch.Tensor = self.ffn_norm(x + f + self.down_bias)
                return out
        with torch.no_grad():  # pre-norm
            part = self.attn(self.attn_norm(x), rope=rope, cache=cache)
        x = x + await reduce(part, "attn")
        assert self.gate is not None
        with torch.no_grad():
            n = self.ffn_norm(x)
            part = self.down(F.silu(self.gate(n)) * self.up(n))
        return x + await reduce(part, "ffn")


def _param_bytes(modules: list[nn.Module]) -> int:
    """Parameters and persistent buffers (quantized weights are buffers), each tensor once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.state_dict(keep_vars=True).values():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


@dataclass
class DeviceShard:
    """What one device holds of a model: the modules it can run, nothing else."""

    cfg: EncoderConfig | DecoderConfig
    weights: DeviceWeights
    embed: nn.Module | None = None  # encoder embeddings / decoder token embedding
    head: nn.Module | None = None  # decoder: final norm + lm_head (encoder: none, pooling is free)
    sub_blocks: dict[tuple[int, int], nn.Module] = field(default_factory=dict)  # (layer, j)
    coupled: dict[int, nn.Module] = field(default_factory=dict)  # layer -> whole layer
    tp: dict[tuple[int, int, int], TPShard] = field(default_factory=dict)  # (layer, rank, k)
    # layer -> (indices of the sub-blocks this device holds, their group)
    groups: dict[int, tuple[tuple[int, ...], SubBlockGroup]] = field(default_factory=dict)
    rope: nn.Module | None = None  # decoder rotary table (no parameters)

    def nbytes(self) -> int:
        mods: list[nn.Module] = [m for m in (self.embed, self.head) if m is not None]
        mods += list(self.sub_blocks.values()) + list(self.coupled.values()) + list(self.tp.values())
        return _param_bytes(mods)

    def need(self, what: str) -> PlanError:
        return PlanError(f"this device holds no weights for {what}; placement {self.weights}")


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(self.norm(h))
        return logits


def build_shard(model: Encoder | Decoder, weights: DeviceWeights) -> DeviceShard:
    """Cut ``weights`` out of a full model (modules are shared, TP shards are copies)."""
    cfg = model.cfg
    shard = DeviceShard(cfg=cfg, weights=weights)
    if isinstance(model, Decoder):
        shard.rope = model.rotary
        if weights.embeddings:
            shard.embed = model.tok_emb
            shard.head = _Head(model.norm, model.lm_head)
    elif weights.embeddings:
        shard.embed = model.embeddings
    for i, layer in enumerate(model.layers):
        if isinstance(layer, DecoupledLayer):
            held = range(cfg.nd) if i in weights.whole_layers else weights.sub_blocks
            for j in held:
                shard.sub_blocks[(i, j)] = layer.sub_blocks[j]
            js = tuple(sorted(held))
            if js:
                shard.groups[i] = (js, SubBlockGroup([layer.sub_blocks[j] for j in js]))
        else:
            if i in weights.whole_layers:
                shard.coupled[i] = layer
            for rank, k in weights.tp_shards:
                assert isinstance(layer, (EncoderLayer, DecoderLayer))  # what the models build
                shard.tp[(i, rank, k)] = TPShard(layer, cfg, rank, k).eval()
    return shard


def shard_modules(shard: DeviceShard) -> Iterable[nn.Module]:
    """Every module a device shard runs (the embeddings/head, sub-blocks, layers, TP shards)."""
    for m in (shard.embed, shard.head):
        if m is not None:
            yield m
    yield from shard.sub_blocks.values()
    yield from shard.coupled.values()
    yield from shard.tp.values()


def quantize_shard(shard: DeviceShard, scheme: str, *, group_size: int = GROUP_SIZE,
                   activation_dtype: torch.dtype | None = None) -> dict[str, str]:
    """``quantize_model`` over the modules of a device shard (in place). The shard's executor
    runs them unchanged: a quantized linear is called like ``nn.Linear``."""
    # fused sub-block groups run float weights stacked for one batched matmul: a quantized shard
    # runs its (quantized) sub-blocks one by one instead, and the stacked float copies go
    shard.groups.clear()
    done: dict[str, str] = {}
    for i, m in enumerate(shard_modules(shard)):
        for name, fmt in quantize_model(m, scheme, group_size=group_size, activation_dtype=activation_dtype).items():
            done[f"{i}:{name}"] = fmt
    return done
