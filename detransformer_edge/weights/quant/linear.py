"""Quantized linear layers and the pass that puts them into a built model or device shard
(gpt-fast's ``quantize.py`` idea: the model code stays unchanged; a separate pass swaps each
``nn.Linear`` for a quantized one). The formats are described in ``weights/quant/__init__.py``.

Activation precision: on x86, torch's int8/int4 CPU kernels are vectorised (AVX2 / AVX-512) for
bfloat16 activations only; their float32 path is a scalar loop, 10-30x slower than float32
``F.linear`` here. On aarch64 (Raspberry Pi) the NEON kernels take float32. So a quantized linear
casts its input to ``activation_dtype`` — bfloat16 on x86, float32 elsewhere
(:func:`default_activation_dtype`) — and its output back to the input's dtype. The kernels
accumulate in float32 either way; in bfloat16 mode the input and the output are rounded to
bfloat16 (8 significant bits), well below int8's own weight error (see docs/MODELS.md).

Scales are stored in the activation dtype (the kernels require it). For int8 the scale is chosen
representable in bfloat16 (rounded *up*, so no weight is clipped) and the codes are computed from
that scale, so the stored weights mean the same in both modes.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.quant import SCHEMES, check_scheme

GROUP_SIZE = 32  # inputs per int4 group: llama.cpp's Q4_0/Q4_1 block, so Q4_1 maps block for block
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
INT8_K_MULTIPLE = 16  # the AVX-512 int8 kernel reads 16 inputs per step with aligned loads: pad K
HEAD_NAMES = ("lm_head",)  # output heads: int8 even in the int4 scheme


def default_activation_dtype() -> torch.dtype:
    """bfloat16 on x86 (the only vectorised path of torch's int8/int4 CPU kernels there),
    float32 on ARM (NEON kernels for float32)."""
    machine = platform.machine().lower()
    return torch.float32 if machine in ("aarch64", "arm64") or machine.startswith("arm") else torch.bfloat16


def _check_activation_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"activation dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype


def _round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each element of a positive float32 tensor, as float32."""
    down = x.to(torch.bfloat16).to(torch.float32)
    # bfloat16 rounds to nearest: step once upwards (one unit in bit 16) where it went below
    bumped = (down.view(torch.int32) + (1 << 16)).view(torch.float32)
    return torch.where(down < x, bumped, down)


def _apply_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and one scale per output channel.

    torch's x86 kernel steps through the inputs 16 at a time with aligned loads and no tail loop
    (an in-features count like 253 reads past the row and crashes), so the codes are stored
    zero-padded to a multiple of 16 columns and the input padded likewise when needed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.padded_in = -(-in_features // INT8_K_MULTIPLE) * INT8_K_MULTIPLE
        dtype = _check_activation_dtype(activation_dtype or default_activation_dtype())
        self.register_buffer("weight_int8", torch.zeros(out_features, self.padded_in, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))  # (N,)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    activation_dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize a float weight (N, K): scale = max|w[n]| / 127 rounded up to a bfloat16 value."""
        w = weight.detach().to(torch.float32)
        out = cls(w.shape[1], w.shape[0], bias is not None, activation_dtype, device=w.device)
        amax = w.abs().amax(dim=1).clamp_min(1e-12)  # (N,); an all-zero row gets codes 0
        scale = _round_up_to_bfloat16(amax / 127.0)
        with torch.no_grad():
            out.weight_int8[:, : w.shape[1]] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out.scales.copy_(scale.to(out.scales.dtype))
            if bias is not None:
                out.bias.copy_(bias.detach().to(torch.float32))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()  # (M, K)
        if self.padded_in != self.in_features:
            a = F.pad(a, (0, self.padded_in - self.in_features))  # (M, K padded)
        y = torch.ops.aten._weight_int8pack_mm(a, self.weight_int8, self.scales)  # (M, N)
        return _apply_bias(y.to(x.dtype).view(*lead, self.out_features), self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer computes with."""
        q = self.weight_int8[:, : self.in_features]
        return q.to(torch.float32) * self.scales.to(torch.float32)[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={self.activation_dtype}")


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit weights in groups of ``group_size`` inputs: one (scale, zero) per
    group and output, ``w = (q - 8) * scale + zero`` (torch's int4 CPU kernel convention)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = GROUP_SIZE,
                 activation_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not int4_fits(in_features, out_features, group_size):
            raise ConfigError(
                f"int4 needs out features divisible by {INT4_N_MULTIPLE} and in features by the group size "
                f"{group_size}; got {out_features} x {in_features} (use int8 for this layer)"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        dtype = _check_activation_dtype(activation_dtype or default_activation_dtype())
        # torch's packed layout: (N, K / 2) bytes for inner_k_tiles = 1 (opaque; built by torch)
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None = None, group_size: int = GROUP_SIZE,
                   activation_dtype: torch.dtype | None = None) -> Int4Linear:
        """From codes (N, K) in 0..15 and per-group ``scales``/``zeros`` (N, K / group) such that
        ``w = (codes - 8) * scale + zero``. The codes are kept exactly; scales and zeros are
        stored in the activation dtype (rounded when that is bfloat16)."""
        n, k = codes.shape
        if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
            raise ConfigError(f"int4 scales/zeros must be ({n}, {k // group_size}), got "
                              f"{tuple(scales.shape)} / {tuple(zeros.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) > 15:
            raise ConfigError("int4 codes must lie in 0..15")
        out = cls(k, n, bias is not None, group_size, activation_dtype, device=codes.device)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        with torch.no_grad():
            out.weight_int4 = packed
            sz = torch.stack([scales.to(torch.float32).t(), zeros.to(torch.float32).t()], dim=-1)  # (K/G, N, 2)
            out.scales_and_zeros.copy_(sz.to(out.scales_and_zeros.dtype))
            if bias is not None:
                out.bias.copy_(bias.detach().to(torch.float32))
        return out

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = GROUP_SIZE,
                    activation_dtype: torch.dtype | None = None) -> Int4Linear:
        """Min-max quantization per group: the group's range spread over the 16 codes. The scale
        and zero are rounded to the activation dtype first and the codes computed from the
        rounded values, so the rounding is absorbed by the choice of codes."""
        w = weight.detach().to(torch.float32)
        n, k = w.shape
        if not int4_fits(k, n, group_size):
            raise ConfigError(f"int4 cannot hold a {n} x {k} weight with groups of {group_size}")
        dtype = _check_activation_dtype(activation_dtype or default_activation_dtype())
        g = w.reshape(n, k // group_size, group_size)  # (N, K/G, G)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp_min(1e-12)
        scale = scale.to(dtype).to(torch.float32)
        zero = (lo + 8.0 * scale).to(dtype).to(torch.float32)  # the value of code 8
        codes = torch.round((g - zero[..., None]) / scale[..., None] + 8.0).clamp_(0, 15)
        return cls.from_codes(codes.reshape(n, k).to(torch.int32), scale, zero, bias, group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype).contiguous()  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.weight_int4, self.group_size, self.scales_and_zeros)
        return _apply_bias(y.to(x.dtype).view(*lead, self.out_features), self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K), read back through the kernel (x = identity): the packed
        layout is torch's own, so we never decode it ourselves."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        sz = self.scales_and_zeros.to(torch.float32)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, sz).t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, activations={self.activation_dtype}")


QuantLinear = Int8Linear | Int4Linear


def int4_fits(in_features: int, out_features: int, group_size: int = GROUP_SIZE) -> bool:
    """Whether torch's int4 CPU kernel takes a layer of this shape."""
    return (group_size > 0 and group_size % 2 == 0 and in_features % group_size == 0
            and out_features % INT4_N_MULTIPLE == 0)


# --- the pass ---------------------------------------------------------------------------------------


def _format_for(name: str, linear: nn.Linear, scheme: str, group_size: int) -> str:
    if scheme == "int4" and name.rpartition(".")[2] not in HEAD_NAMES \
            and int4_fits(linear.in_features, linear.out_features, group_size):
        return "int4"
    return "int8"


def quantize_model(module: nn.Module, scheme: str, *, group_size: int = GROUP_SIZE,
                   activation_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Replace every ``nn.Linear`` inside ``module`` (in place) by its ``scheme`` version.

    Works on any module tree: an Encoder or Decoder (standard or decoupled), a sub-block, a
    tensor-parallel shard. Returns ``{qualified name: format}`` of the replaced layers (empty for
    ``float32``). Layers already quantized are left alone, so the pass is idempotent. A linear on
    the ``meta`` device (not loaded on this device) is left alone too.
    """
    scheme = check_scheme(scheme)
    if scheme == "float32":
        return {}
    dtype = _check_activation_dtype(activation_dtype or default_activation_dtype())
    done: dict[str, str] = {}
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        if linear.weight.device.type == "meta":
            continue
        fmt = _format_for(name, linear, scheme, group_size)
        with torch.no_grad():
            if fmt == "int4":
                new: nn.Module = Int4Linear.from_weight(linear.weight, linear.bias, group_size, dtype)
            else:
                new = Int8Linear.from_weight(linear.weight, linear.bias, dtype)
        replace_module(module, name, new)
        done[name] = fmt
    return done


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) of ``root`` is."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers (quantized weights live in
    buffers), each tensor counted once (a tied weight is one tensor)."""
    seen: set[int] = set()
    total = 0
    for t in module.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_formats(module: nn.Module) -> dict[str, int]:
    """How many linear layers of each format a module holds: {"float32": n, "int8": n, "int4": n}."""
    counts = {s: 0 for s in SCHEMES}
    for m in module.modules():
        if isinstance(m, Int4Linear):
            counts["int4"] += 1
        elif isinstance(m, Int8Linear):
            counts["int8"] += 1
        elif isinstance(m, nn.Linear):
            counts["float32"] += 1
    return counts


def linear_error(layer: nn.Module, weight: torch.Tensor) -> float:
    """max |W_quantized - W| / max |W| of a quantized layer against a float weight (N, K)."""
    deq = layer.dequantized()  # type: ignore[operator]
    return float((deq - weight.to(torch.float32)).abs().max() / weight.abs().max().clamp_min(1e-30))
