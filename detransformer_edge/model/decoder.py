"""Pre-norm Llama decoder (GQA, RoPE, SwiGLU, RMSNorm), standard or decoupled (DeTransformer).

Decoupled sub-blocks are causal like any decoder layer and keep their own KV caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detransformer_edge.model.config import DecoderConfig
from detransformer_edge.model.layers import (
    Attention,
    DecoupledLayer,
    KVCache,
    RotaryEmbedding,
    SubBlockGroup,
    SwiGLU,
    attend_heads,
)

Rope = tuple[torch.Tensor, torch.Tensor]
LayerCache = KVCache | list[KVCache]


class DecoderLayer(nn.Module):
    """x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)). A coupled layer or a sub-block."""

    def __init__(self, cfg: DecoderConfig, d_in: int, n_heads: int, n_kv_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_in, eps=cfg.norm_eps)
        self.attn = Attention(d_in, n_heads, n_kv_heads, cfg.head_dim, bias=False, causal=True)
        self.ffn_norm = nn.RMSNorm(d_in, eps=cfg.norm_eps)
        self.ffn = SwiGLU(d_in, d_ff)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope=rope, cache=cache)
        out: torch.Tensor = x + self.ffn(self.ffn_norm(x))
        return out

    @staticmethod
    def group_forward(g: SubBlockGroup, x: torch.Tensor, rope: Rope, cache: KVCache | None = None) -> torch.Tensor:
        """``forward`` of every sub-block of group ``g`` at once: x (B, T, n * w); ``cache``
        holds all n sub-blocks' K/V heads (n * B, Hkv, S, hd)."""
        B, T, _ = x.shape
        first = g.blocks[0]
        assert isinstance(first, DecoderLayer)  # a group holds sub-blocks of one layer class
        H, Hkv = first.attn.n_heads, first.attn.n_kv_heads
        xs = g.split(x)  # (n, B*T, w)
        a = g.rms_norm("attn_norm", xs, first.attn_norm.eps)
        q = g.heads(g.linear("attn.q_proj", a), B, T, H)  # (n*B, H, T, hd)
        k = g.heads(g.linear("attn.k_proj", a), B, T, Hkv)  # (n*B, Hkv, T, hd)
        v = g.heads(g.linear("attn.v_proj", a), B, T, Hkv)
        o = g.unheads(attend_heads(q, k, v, causal=True, rope=rope, cache=cache))  # (n, B*T, H*hd)
        xs = xs + g.linear("attn.o_proj", o)
        f = g.rms_norm("ffn_norm", xs, first.ffn_norm.eps)
        up = F.silu(g.linear("ffn.gate", f), inplace=True).mul_(g.linear("ffn.up", f))  # in place: see encoder
        xs = xs + g.linear("ffn.down", up)
        return g.merge(xs, B, T)

    def new_cache(self) -> KVCache:
        return KVCache()


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        layers: list[nn.Module] = []
        for kind in cfg.layer_kinds:
            if kind == "coupled":
                layers.append(DecoderLayer(cfg, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff))
            else:
                layers.append(
                    DecoupledLayer(
                        [
                            DecoderLayer(cfg, cfg.d_sub, cfg.sub_heads, cfg.sub_kv_heads, cfg.d_ff_sub)
                            for _ in range(cfg.nd)
                        ]
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.apply(_init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the output head (call again after assign-loading)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def rope(self, start_pos: int, length: int, device: torch.device | None = None) -> Rope:
        positions = torch.arange(start_pos, start_pos + length, device=device)
        cos_sin: Rope = self.rotary(positions)
        return cos_sin

    def forward(
        self, input_ids: torch.Tensor, start_pos: int = 0, caches: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab). With ``caches`` (from ``new_caches``) keys/values accumulate."""
        h = self.tok_emb(input_ids)  # (B, T, d)
        rope = self.rope(start_pos, input_ids.shape[1], input_ids.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache=None if caches is None else caches[i])
        logits: torch.Tensor = self.lm_head(self.norm(h))
        return logits

    def new_caches(self) -> list[LayerCache]:
        caches: list[LayerCache] = []
        for layer in self.layers:
            assert isinstance(layer, (DecoderLayer, DecoupledLayer))  # what __init__ builds
            caches.append(layer.new_cache())
        return caches

    def fuse_sub_blocks(self) -> None:
        """Run each decoupled layer's sub-blocks as one batched computation when no gradient is
        wanted (``DecoupledLayer.fuse``): what a device holding a whole decoupled layer does.
        Call after loading weights (and before ``new_caches``)."""
        for layer in self.layers:
            if isinstance(layer, DecoupledLayer):
                layer.fuse()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
        nn.init.normal_(module.weight, std=0.02)
