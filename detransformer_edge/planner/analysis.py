"""FLOPs, memory traffic and parameter counts computed from a model config.

The planner's cost model reads these; nothing here touches torch. Counts follow the layers in
``model/layers.py``: a *coupled* layer is an ordinary layer of width ``d_model``; a *sub-block* of
a decoupled layer is a layer of residual width ``d_sub = d_model / nd`` whose attention has
``sub_heads`` heads (all heads with ``sub_attn="full"``) and whose FFN has width ``d_ff_sub``.

Conventions: a multiply-add is 2 FLOPs; bytes are memory traffic of one forward pass (weights
read once, activations written and read back, the KV cache read); weights are held in FP32 at
run time (``WEIGHT_BYTES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from detransformer_edge.errors import ConfigError

WEIGHT_BYTES = 4  # FP32 weights at run time (GGUF weights are dequantised on load)
ACT_BYTES = 4  # FP32 activations inside a device
Mode = Literal["encode", "prefill", "decode"]
MODES: tuple[Mode, ...] = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class Workload:
    """The shape of one forward pass: ``tokens`` new tokens per sequence, attending to
    ``context`` tokens (the new ones included), for ``batch`` sequences."""

    tokens: int
    context: int
    batch: int = 1
    causal: bool = False

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.batch <= 0 or self.context < self.tokens:
            raise ConfigError(
                f"workload needs tokens > 0, batch > 0 and context >= tokens, got {self}"
            )

    @classmethod
    def for_request(cls, mode: Mode, seq_len: int, batch: int = 1) -> Workload:
        """``encode``/``prefill``: ``seq_len`` new tokens; ``decode``: one new token after a
        context of ``seq_len`` tokens (so the step attends to ``seq_len + 1``)."""
        if mode == "encode":
            return cls(seq_len, seq_len, batch, causal=False)
        if mode == "prefill":
            return cls(seq_len, seq_len, batch, causal=True)
        if mode == "decode":
            return cls(1, seq_len + 1, batch, causal=True)
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    @property
    def rows(self) -> int:
        """Rows of the hidden-state matrix that cross the wire (batch x new tokens)."""
        return self.batch * self.tokens

    @property
    def mean_context(self) -> float:
        """Keys each new token attends to on average (causal: later tokens see more)."""
        if self.causal:
            return self.context - self.tokens + (self.tokens + 1) / 2
        return float(self.context)


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of a piece of work, split into GEMMs and attention (different rates)."""

    gemm_flops: float = 0.0
    gemm_bytes: float = 0.0
    attn_flops: float = 0.0
    attn_bytes: float = 0.0

    def __add__(self, other: OpCost) -> OpCost:
        return OpCost(
            self.gemm_flops + other.gemm_flops,
            self.gemm_bytes + other.gemm_bytes,
            self.attn_flops + other.attn_flops,
            self.attn_bytes + other.attn_bytes,
        )

    def __mul__(self, k: float) -> OpCost:
        return OpCost(self.gemm_flops * k, self.gemm_bytes * k, self.attn_flops * k, self.attn_bytes * k)

    __rmul__ = __mul__

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attn_flops

    @property
    def bytes(self) -> float:
        return self.gemm_bytes + self.attn_bytes


def _is_decoder(cfg: object) -> bool:
    return getattr(cfg, "family", "") == "decoder"


def _kv_heads(cfg: object, heads: int) -> int:
    n_heads: int = getattr(cfg, "n_heads")
    n_kv: int = getattr(cfg, "n_kv_heads", n_heads)
    return n_kv * heads // n_heads


def _layer_cost(
    cfg: object, width: int, heads: int, ffn: int, work: Workload, shard: float = 1
) -> OpCost:
    """One layer of residual width ``width``; ``shard`` > 1 is one tensor-parallel shard of it
    (heads and FFN split ``shard`` ways, the residual stream and norms replicated)."""
    head_dim: int = getattr(cfg, "head_dim")
    d_q = heads * head_dim
    d_kv = _kv_heads(cfg, heads) * head_dim
    ffn_mats = 3 if _is_decoder(cfg) else 2  # SwiGLU has gate, up, down
    rows = work.rows
    s = float(shard)
    lin_params = (width * (d_q + 2 * d_kv) + d_q * width + ffn_mats * width * ffn) / s
    gemm_flops = 2.0 * rows * lin_params
    act = rows * (6 * width + 3 * (d_q + 2 * d_kv) / s + 3 * ffn_mats * ffn / s)
    gemm_bytes = lin_params * WEIGHT_BYTES + act * ACT_BYTES
    ctx = work.mean_context
    attn_flops = 4.0 * rows * ctx * d_q / s  # scores Q K^T and weights x V
    scores = rows * ctx * heads / s
    kv_read = work.batch * work.context * 2 * d_kv / s
    attn_bytes = (3 * scores + kv_read + 2 * rows * d_q / s) * ACT_BYTES
    return OpCost(gemm_flops, gemm_bytes, attn_flops, attn_bytes)


# -- per-piece costs --------------------------------------------------------------------------


def subblock_cost(cfg: object, work: Workload) -> OpCost:
    """One sub-block of one decoupled layer."""
    return _layer_cost(cfg, getattr(cfg, "d_sub"), getattr(cfg, "sub_heads"), getattr(cfg, "d_ff_sub"), work)


def coupled_layer_cost(cfg: object, work: Workload, shard: int = 1) -> OpCost:
    """One ordinary (coupled) layer, or one of ``shard`` tensor-parallel shards of it."""
    heads: int = getattr(cfg, "n_heads")
    if shard > heads:
        raise ConfigError(f"tensor parallelism over {shard} devices needs at least {shard} heads, the model has {heads}")
    # Heads split in contiguous, possibly uneven ranges (parallel.shards.even_ranges): the slowest
    # shard holds ceil(heads / shard) of them, so it works like an even split of that size.
    effective = heads / math.ceil(heads / shard) if shard > 1 else 1
    return _layer_cost(cfg, getattr(cfg, "d_model"), heads, getattr(cfg, "d_ff"), work, effective)


def embedding_cost(cfg: object, work: Workload) -> OpCost:
    """Token (+ position/segment) embedding lookup and its norm: pure memory traffic."""
    d: int = getattr(cfg, "d_model")
    lookups = 1 if _is_decoder(cfg) else 3
    return OpCost(gemm_bytes=(lookups + 2) * work.rows * d * ACT_BYTES)


def head_cost(cfg: object, work: Workload) -> OpCost:
    """Output head on the coordinator: LM head logits for the last position of each sequence
    (decoder), or mean pooling (encoder)."""
    d: int = getattr(cfg, "d_model")
    if _is_decoder(cfg):
        vocab: int = getattr(cfg, "vocab_size")
        return OpCost(
            gemm_flops=2.0 * work.batch * d * vocab,
            gemm_bytes=(vocab * d) * WEIGHT_BYTES + work.batch * (d + vocab) * ACT_BYTES,
        )
    return OpCost(gemm_flops=work.rows * d, gemm_bytes=2 * work.rows * d * ACT_BYTES)


# -- structure and parameters -----------------------------------------------------------------


def layer_counts(cfg: object) -> tuple[int, int]:
    """(decoupled layers, coupled layers)."""
    kinds: tuple[str, ...] = getattr(cfg, "layer_kinds")
    n_dec = sum(1 for k in kinds if k == "decoupled")
    return n_dec, len(kinds) - n_dec


def subblock_params(cfg: object) -> int:
    """Parameters of one sub-block in one decoupled layer."""
    return int(getattr(cfg, "layer_params")(getattr(cfg, "d_sub"), getattr(cfg, "sub_heads"), getattr(cfg, "d_ff_sub")))


def coupled_layer_params(cfg: object) -> int:
    return int(getattr(cfg, "layer_params")(getattr(cfg, "d_model"), getattr(cfg, "n_heads"), getattr(cfg, "d_ff")))


def embedding_params(cfg: object) -> int:
    """Embeddings, final norm and head (the coordinator's weights)."""
    d: int = getattr(cfg, "d_model")
    vocab: int = getattr(cfg, "vocab_size")
    if _is_decoder(cfg):
        head = 0 if getattr(cfg, "tie_embeddings", True) else vocab * d
        return vocab * d + d + head
    positions: int = getattr(cfg, "max_position") + getattr(cfg, "type_vocab_size")
    return (vocab + positions) * d + 2 * d


def model_params(cfg: object) -> int:
    n_dec, n_cpl = layer_counts(cfg)
    nd: int = getattr(cfg, "nd")
    return n_dec * nd * subblock_params(cfg) + n_cpl * coupled_layer_params(cfg) + embedding_params(cfg)


def kv_cache_bytes(cfg: object, heads: int, context: int, batch: int = 1, shard: int = 1) -> int:
    """K and V cache of one layer (or sub-block with ``heads`` query heads) for ``context``
    tokens, FP32. Encoders keep no cache: returns 0."""
    if not _is_decoder(cfg):
        return 0
    head_dim: int = getattr(cfg, "head_dim")
    d_kv = _kv_heads(cfg, heads) * head_dim
    return int(2 * batch * context * d_kv * ACT_BYTES // shard)


def subblock_kv_bytes(cfg: object, context: int, batch: int = 1) -> int:
    return kv_cache_bytes(cfg, getattr(cfg, "sub_heads"), context, batch)


def coupled_kv_bytes(cfg: object, context: int, batch: int = 1, shard: int = 1) -> int:
    return kv_cache_bytes(cfg, getattr(cfg, "n_heads"), context, batch, shard)


def activation_peak_bytes(cfg: object, work: Workload) -> int:
    """Working memory of one layer's forward pass (largest of the FFN hidden, attention scores
    and the full hidden state copies), FP32."""
    d: int = getattr(cfg, "d_model")
    ffn = max(getattr(cfg, "d_ff"), getattr(cfg, "d_ff_sub"))
    heads: int = getattr(cfg, "n_heads")
    rows = work.rows
    peak = max(4 * rows * d, 3 * rows * ffn, rows * work.context * heads + 2 * rows * d)
    return int(peak * ACT_BYTES)


def model_flops(cfg: object, work: Workload) -> float:
    """Total FLOPs of one forward pass on one device (for reports and the anchor check)."""
    n_dec, n_cpl = layer_counts(cfg)
    nd: int = getattr(cfg, "nd")
    total = subblock_cost(cfg, work) * (n_dec * nd) + coupled_layer_cost(cfg, work) * n_cpl
    total = total + embedding_cost(cfg, work) + head_cost(cfg, work)
    return total.flops
