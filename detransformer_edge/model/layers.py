"""Building blocks shared by the encoder and the decoder.

A decoupled layer is nothing but ``nd`` ordinary layers of residual width ``d_model / nd`` that
each read and write their own slice of the hidden state. So one layer class per family serves
both as a coupled layer (width ``d_model``) and as a sub-block (width ``d_sub``): the unit a
device computes is an ordinary ``nn.Module`` that runs on its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KVCache:
    """Keys and values seen so far by one attention module, grown as tokens arrive."""

    k: torch.Tensor | None = None  # (B, n_kv_heads, T, head_dim)
    v: torch.Tensor | None = None
    _len: int = field(default=0, repr=False)

    @property
    def length(self) -> int:
        return self._len

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values (B, n_kv, T_new, hd); return everything cached so far."""
        if self.k is None:
            # Room for growth so decode steps do not reallocate every token.
            cap = max(16, 2 * k.shape[2])
            self.k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self.v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        assert self.v is not None
        need = self._len + k.shape[2]
        if need > self.k.shape[2]:
            cap = max(need, 2 * self.k.shape[2])
            grown_k = self.k.new_empty(self.k.shape[0], self.k.shape[1], cap, self.k.shape[3])
            grown_v = self.v.new_empty(self.v.shape[0], self.v.shape[1], cap, self.v.shape[3])
            grown_k[:, :, : self._len] = self.k[:, :, : self._len]
            grown_v[:, :, : self._len] = self.v[:, :, : self._len]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self._len : need] = k
        self.v[:, :, self._len : need] = v
        self._len = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def nbytes(self) -> int:
        if self.k is None or self.v is None:
            return 0
        return self.k.nelement() * self.k.element_size() + self.v.nelement() * self.v.element_size()


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" convention (first and second half of each head pair up).

    The frequencies are computed on use rather than held in a buffer, so a model built on the
    ``meta`` device and loaded with ``assign=True`` needs no special care.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim) for integer positions (T,)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # (hd/2,)
        freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention from residual width ``d_in`` to ``n_heads`` heads and back.

    ``d_in`` is ``d_model`` in a coupled layer and ``d_model / nd`` in a sub-block, whose Q/K/V
    still span all heads (d/nd -> d) unless the config asks for sliced attention.
    """

    kv_map: torch.Tensor | None  # a buffer (not saved): K/V head of each query head, or None

    def __init__(
        self,
        d_in: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        bias: bool,
        causal: bool,
        kv_map: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal
        # kv_map[i] = K/V head used by query head i. None: the usual even grouping. A tensor-
        # parallel shard holding an uneven range of heads passes its own map.
        if kv_map is not None and (len(kv_map) != n_heads or not all(0 <= i < n_kv_heads for i in kv_map)):
            raise ValueError(f"kv_map {kv_map} does not map {n_heads} query heads onto {n_kv_heads} K/V heads")
        self.register_buffer(
            "kv_map", None if kv_map is None else torch.tensor(kv_map, dtype=torch.long), persistent=False
        )
        self.q_proj = nn.Linear(d_in, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_in, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_in, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_in, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        out: torch.Tensor = self.o_proj(self.attend(x, mask, rope, cache))
        return out

    def attend(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attention up to (not including) the output projection: (B, T, n_heads * head_dim).

        Split from ``forward`` so tensor-parallel shards can run their heads and project
        with their rows of ``o_proj`` themselves.
        """
        B, T, _ = x.shape
        q: torch.Tensor = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k: torch.Tensor = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v: torch.Tensor = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = attend_heads(q, k, v, self.causal, mask, rope, cache, self.kv_map)  # (B, H, T, hd)
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)


def attend_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache: KVCache | None = None,
    kv_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of projected heads: q (B, H, T, hd), k/v (B, Hkv, T, hd)
    -> (B, H, T, hd). Query head i uses K/V head ``kv_map[i]``, or ``i // (H / Hkv)``."""
    T = q.shape[2]
    if rope is not None:
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(k, v)
    gqa = q.shape[1] != k.shape[1]
    if kv_map is not None:
        k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)  # (B, H, S, hd)
        gqa = False
    attn_mask, is_causal = mask, False
    if causal:
        if past == 0 and mask is None:
            is_causal = T > 1
        elif T > 1:
            # Queries sit at positions past..past+T-1 and may see keys 0..their own position.
            q_pos = torch.arange(past, past + T, device=q.device)[:, None]
            k_pos = torch.arange(past + T, device=q.device)[None, :]
            allowed = k_pos <= q_pos  # (T, past+T)
            attn_mask = allowed if mask is None else (mask & allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)


class GeluMLP(nn.Module):
    """BERT feed-forward: up, exact GELU, down."""

    def __init__(self, d_in: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_ff)
        self.down = nn.Linear(d_ff, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.gelu(self.up(x)))
        return out


class SwiGLU(nn.Module):
    """Llama feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_in: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_in, d_ff, bias=False)
        self.up = nn.Linear(d_in, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.silu(self.gate(x)) * self.up(x))
        return out


class SubBlockGroup:
    """Several equally shaped sub-blocks on one device, run as one batched computation.

    Run one by one, n sub-blocks of width w cost n times the dispatch of a layer and their
    projections are n small GEMMs (w = 192 for BERT-base nd = 4) that use a core less well than
    one large one. A group stacks each parameter of its sub-blocks into one tensor (n, ...) and
    re-points every sub-block's parameter at its view ``stack[j]`` — the storage is shared, no
    copy is kept, each sub-block still runs alone — so the group can run each projection of all n
    sub-blocks as one ``torch.bmm`` over n, all their heads in one attention call and the norms
    over (n, rows, w). The maths is the sub-blocks' (each stacked matmul is its own sub-block's
    matmul; for attention sub-block j's batch row b becomes row j*B + b, so heads, GQA groups and
    the KV cache stay per sub-block); results agree with the one-by-one path to float32 rounding.

    A group of one sub-block is useful too: it only re-lays out the FFN's up/gate weights (below).
    The family's layer class supplies the forward (``EncoderLayer.group_forward``,
    ``DecoderLayer.group_forward``). Inference only: the stacks do not carry gradients. Group
    after loading weights: if a parameter is replaced later (``load_state_dict(assign=True)``,
    ``.to()``), the next call notices and stacks again. A sub-block already in another live group
    (several simulated devices in one process, ``parallel/local.py``) is not re-pointed: the new
    group keeps its own copy of the stacks, so the two never take the storage from each other.
    """

    def __init__(self, blocks: list[nn.Module] | nn.ModuleList) -> None:
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("a sub-block group needs at least one sub-block")
        kinds = {type(b) for b in self.blocks}
        group_forward = getattr(type(self.blocks[0]), "group_forward", None)
        if len(kinds) != 1 or group_forward is None:
            raise ValueError(f"sub-blocks of one layer class with a group_forward are needed, got {kinds}")
        # the family's forward of a whole group (EncoderLayer.group_forward, DecoderLayer.group_forward)
        self._group_forward: Callable[..., torch.Tensor] = group_forward
        self.n = len(self.blocks)
        self.stacks: dict[str, torch.Tensor] = {}
        self._used: dict[str, torch.Tensor] = {}  # the stacks as the forward uses them (views)
        self._views: list[tuple[nn.Module, str, int]] = []  # (module, parameter, data_ptr it must keep)
        owners = [_GROUP_OF.get(b) for b in self.blocks]
        self.shares_storage = not any(o is not None and o() is not None for o in owners)
        if self.shares_storage:
            for b in self.blocks:
                _GROUP_OF[b] = weakref.ref(self)
        self._stack()

    def _stack(self) -> None:
        self.stacks.clear()
        self._used.clear()
        self._views.clear()
        names = [name for name, _ in self.blocks[0].named_parameters()]
        for name in names:
            path, _, attr = name.rpartition(".")
            owners = [b.get_submodule(path) if path else b for b in self.blocks]
            params = [getattr(m, attr) for m in owners]
            if len({tuple(p.shape) for p in params}) != 1:
                raise ValueError(f"sub-blocks differ in the shape of {name}")
            # A weight with fewer inputs than outputs (the FFN's up/gate, 192 -> 4224 for
            # BERT-base nd 4) is stored (n, in, out): for such short-K products x @ W took 0.54x
            # (1 row), 0.82x (16) and 0.90x (128 rows) the time of nn.Linear's (out, in) layout
            # on this project's CPU (one core, MKL). The sub-blocks see a transposed view of it,
            # which nn.Linear also runs as x @ W.
            in_out = params[0].dim() == 2 and params[0].shape[1] < params[0].shape[0]
            if in_out:
                stack = torch.stack([p.detach().T for p in params])  # (n, in, out)
                views = [v.T for v in stack.unbind(0)]
            else:
                stack = torch.stack([p.detach() for p in params])  # (n, ...)
                views = list(stack.unbind(0))
            for m, p, view in zip(owners, params, views):
                if self.shares_storage:
                    setattr(m, attr, nn.Parameter(view, requires_grad=p.requires_grad))
                self._views.append((m, attr, getattr(m, attr).data_ptr()))
            self.stacks[name] = stack
            # weights as (n, in, out) for x @ W; vectors broadcast over rows: (n, 1, out)
            if stack.dim() == 3:
                self._used[name] = stack if in_out else stack.mT
            else:
                self._used[name] = stack.unsqueeze(1)

    def _fresh(self) -> None:
        if any(getattr(m, attr).data_ptr() != ptr for m, attr, ptr in self._views):
            self._stack()

    def __call__(self, x: torch.Tensor, *args: object, cache: KVCache | None = None) -> torch.Tensor:
        """x: the group's slices side by side (B, T, n * w) -> the same shape."""
        self._fresh()
        return self._group_forward(self, x, *args, cache=cache)

    # -- helpers for the families' group_forward ---------------------------------------------

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n * w) -> (n, B * T, w), contiguous: every projection then reads plain rows."""
        B, T, D = x.shape
        return x.reshape(B * T, self.n, D // self.n).transpose(0, 1).contiguous()

    def merge(self, xs: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """(n, B * T, w) -> (B, T, n * w)."""
        return xs.transpose(0, 1).reshape(B, T, -1)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Every sub-block's ``name`` Linear on its own rows: (n, R, in) -> (n, R, out)."""
        w = self._used[f"{name}.weight"]  # (n, in, out)
        b = self._used.get(f"{name}.bias")
        return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)

    def layer_norm(self, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=eps)
        return torch.addcmul(self._used[f"{name}.bias"], y, self._used[f"{name}.weight"])

    def rms_norm(self, name: str, x: torch.Tensor, eps: float | None) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=eps) * self._used[f"{name}.weight"]

    def heads(self, t: torch.Tensor, B: int, T: int, n_heads: int) -> torch.Tensor:
        """(n, B * T, n_heads * hd) -> (n * B, n_heads, T, hd), a view: sub-block j's heads are
        those of batch rows j*B .. j*B + B - 1 (attention never mixes batch rows, like heads)."""
        return t.view(self.n * B, T, n_heads, t.shape[-1] // n_heads).transpose(1, 2)

    def unheads(self, o: torch.Tensor) -> torch.Tensor:
        """(n * B, H, T, hd) -> (n, B * T, H * hd)."""
        nB, H, T, hd = o.shape
        return o.transpose(1, 2).reshape(self.n, nB // self.n * T, H * hd)

    def batch_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A (B, 1, 1, T) padding mask for the (n * B) rows of ``heads``."""
        return None if mask is None else mask.repeat(self.n, *([1] * (mask.dim() - 1)))


# sub-block -> the group whose stacks its parameters are views of
_GROUP_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ref[SubBlockGroup]] = weakref.WeakKeyDictionary()


class DecoupledLayer(nn.Module):
    """``nd`` independent sub-blocks, each owning one contiguous slice of the hidden state.

    Running the sub-blocks one by one and concatenating is exactly this layer; no data
    crosses sub-blocks, which is what lets devices compute them without communicating.
    ``fuse()`` makes a device that runs the whole layer run it as one :class:`SubBlockGroup`.
    """

    def __init__(self, sub_blocks: list[nn.Module]) -> None:
        super().__init__()
        self.sub_blocks = nn.ModuleList(sub_blocks)
        self.group: SubBlockGroup | None = None

    def fuse(self) -> None:
        """Run all sub-blocks as one batched computation when no gradient is wanted (inference);
        the caches of ``new_cache`` become one KV cache for the whole group."""
        if self.group is None:
            self.group = SubBlockGroup(self.sub_blocks)

    def forward(
        self, h: torch.Tensor, *args: object, cache: list[KVCache] | KVCache | None = None
    ) -> torch.Tensor:
        if self.group is not None and (isinstance(cache, KVCache) or (cache is None and not torch.is_grad_enabled())):
            return self.group(h, *args, cache=cache)
        if isinstance(cache, KVCache):
            raise ValueError("a fused layer's KV cache is one for the whole group; pass a list of per-sub-block caches")
        width = h.shape[-1] // len(self.sub_blocks)
        slices = torch.split(h, width, dim=-1)
        outs = [
            block(x, *args, cache=None if cache is None else cache[j])
            for j, (block, x) in enumerate(zip(self.sub_blocks, slices))
        ]
        return torch.cat(outs, dim=-1)

    def new_cache(self) -> list[KVCache] | KVCache:
        if self.group is not None:
            return KVCache()  # (nd * B, n_kv_heads / nd, T, hd): sub-block j's in rows j*B..
        return [KVCache() for _ in self.sub_blocks]
