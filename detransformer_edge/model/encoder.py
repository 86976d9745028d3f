"""Post-LN BERT encoder, standard or decoupled (DeTransformer), with sentence embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detransformer_edge.model.config import EncoderConfig
from detransformer_edge.model.layers import (
    Attention,
    DecoupledLayer,
    GeluMLP,
    KVCache,
    SubBlockGroup,
    attend_heads,
)


class EncoderLayer(nn.Module):
    """x = LN(x + Attn(x)); x = LN(x + FFN(x)). A coupled layer or, at width d/nd, a sub-block."""

    def __init__(self, cfg: EncoderConfig, d_in: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn = Attention(d_in, n_heads, n_heads, cfg.head_dim, bias=True, causal=False)
        self.attn_norm = nn.LayerNorm(d_in, eps=cfg.norm_eps)
        self.ffn = GeluMLP(d_in, d_ff)
        self.ffn_norm = nn.LayerNorm(d_in, eps=cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask))
        out: torch.Tensor = self.ffn_norm(x + self.ffn(x))
        return out

    @staticmethod
    def group_forward(
        g: SubBlockGroup, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """``forward`` of every sub-block of group ``g`` at once: x (B, T, n * w)."""
        B, T, _ = x.shape
        first = g.blocks[0]
        assert isinstance(first, EncoderLayer)  # a group holds sub-blocks of one layer class
        H, eps = first.attn.n_heads, first.attn_norm.eps
        xs = g.split(x)  # (n, B*T, w)
        q = g.heads(g.linear("attn.q_proj", xs), B, T, H)  # (n*B, H, T, hd)
        k = g.heads(g.linear("attn.k_proj", xs), B, T, H)
        v = g.heads(g.linear("attn.v_proj", xs), B, T, H)
        a = g.unheads(attend_heads(q, k, v, causal=False, mask=g.batch_mask(mask)))  # (n, B*T, H*hd)
        xs = g.layer_norm("attn_norm", xs + g.linear("attn.o_proj", a), eps)
        # in place: the (n, rows, I') intermediate is the group's largest tensor; one fewer
        # fresh allocation of it (same values as F.gelu)
        f = g.linear("ffn.down", torch.ops.aten.gelu_(g.linear("ffn.up", xs)))
        return g.merge(g.layer_norm("ffn_norm", xs + f, first.ffn_norm.eps), B, T)


class EncoderEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.d_model)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        out: torch.Tensor = self.norm(h)  # (B, T, d)
        return out


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask -> boolean (B, 1, 1, T) that attention broadcasts over heads and queries."""
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)[:, None, None, :]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """Mean over real tokens (B, T, d) -> (B, d), optionally L2-normalised as sentence-transformers does."""
    if attention_mask is None:
        pooled = hidden.mean(dim=1)
    else:
        m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = EncoderEmbeddings(cfg)
        layers: list[nn.Module] = []
        for kind in cfg.layer_kinds:
            if kind == "coupled":
                layers.append(EncoderLayer(cfg, cfg.d_model, cfg.n_heads, cfg.d_ff))
            else:
                layers.append(
                    DecoupledLayer([EncoderLayer(cfg, cfg.d_sub, cfg.sub_heads, cfg.d_ff_sub) for _ in range(cfg.nd)])
                )
        self.layers = nn.ModuleList(layers)
        self.apply(_init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, d)."""
        h: torch.Tensor = self.embeddings(input_ids, token_type_ids)
        mask = padding_mask(attention_mask)
        for layer in self.layers:
            h = layer(h, mask)
        return h

    def sentence_embedding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        return mean_pool(self(input_ids, attention_mask), attention_mask, normalize)

    def fuse_sub_blocks(self) -> None:
        """Run each decoupled layer's sub-blocks as one batched computation when no gradient is
        wanted (``DecoupledLayer.fuse``): what a device holding a whole decoupled layer does.
        Call after loading weights (and before ``new_caches``)."""
        for layer in self.layers:
            if isinstance(layer, DecoupledLayer):
                layer.fuse()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for p in self.embeddings.parameters())
        return n


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if module.weight.device.type != "meta":
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
