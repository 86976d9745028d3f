"""llama.cpp's block formats read straight into torch's quantized layers.

SmolLM2's file is Q4_1 (blocks of 32 values, fp16 scale ``d`` and minimum ``m``: ``w = d q + m``,
``q`` in 0..15) for every linear layer and Q8_0 (blocks of 32, fp16 ``d``: ``w = d q``, ``q``
int8) for the token embedding. A Q4_1 block is one int4 group of torch's kernel, whose convention
is ``w = (q - 8) scale + zero``: ``scale = d``, ``zero = m + 8 d``, the codes unchanged. Q8_0 has a
scale per 32 values while the int8 kernel has one per output channel, so Q8_0 is dequantised
(exactly) and requantised per channel — not exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.quant.linear import Int4Linear

if TYPE_CHECKING:
    import numpy as np

Q4_1_BLOCK = 32
Q4_1_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_BYTES = 34  # fp16 d, 32 int8


@dataclass(frozen=True)
class Q4_1Codes:
    """A Q4_1 matrix as codes and per-block parameters: ``w = d * q + m``."""

    codes: torch.Tensor  # (N, K) int32 in 0..15
    d: torch.Tensor  # (N, K / 32) float32 (exact: fp16 in the file)
    m: torch.Tensor  # (N, K / 32) float32

    def int4_scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the int4 kernel: ``(q - 8) * scale + zero = d * q + m`` needs
        ``scale = d`` and ``zero = m + 8 d``. With fp16 d and m the sum is exact in float32
        unless their exponents lie more than 13 binades apart (checked by the caller's tests)."""
        return self.d, self.m + 8.0 * self.d

    def dequantized(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.codes.to(torch.float32).reshape(n, k // Q4_1_BLOCK, Q4_1_BLOCK)
        return (g * self.d[..., None] + self.m[..., None]).reshape(n, k)


def q4_1_codes(raw: np.ndarray, shape: tuple[int, int]) -> Q4_1Codes:
    """Decode GGUF Q4_1 bytes ((N, K / 32 * 20) uint8, as ``GGUFReader`` gives them) into codes
    and parameters. Block layout (ggml): d, m as fp16, then 16 bytes whose low nibbles are
    elements 0..15 and high nibbles elements 16..31."""
    import numpy as np

    n, k = shape
    if k % Q4_1_BLOCK or raw.size != n * (k // Q4_1_BLOCK) * Q4_1_BYTES:
        raise ConfigError(f"Q4_1 data of {raw.size} bytes does not fit a {n} x {k} matrix")
    blocks = np.ascontiguousarray(raw).reshape(n, k // Q4_1_BLOCK, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # (N, K)
    return Q4_1Codes(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(m))


def int4_from_q4_1(q: Q4_1Codes, activation_dtype: torch.dtype | None = None) -> Int4Linear:
    """An Int4Linear holding exactly Q4_1's codes; its (scale, zero) are Q4_1's (d, m + 8d)
    — exact in float32 activation mode, rounded to bfloat16 in bfloat16 mode."""
    scale, zero = q.int4_scale_zero()
    return Int4Linear.from_codes(q.codes, scale, zero, None, Q4_1_BLOCK, activation_dtype)


def dequantize_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q8_0 bytes -> float32 (N, K), ``w = d * q`` per 32-value block (exact)."""
    import numpy as np

    n, k = shape
    if k % 32 or raw.size != n * (k // 32) * Q8_0_BYTES:
        raise ConfigError(f"Q8_0 data of {raw.size} bytes does not fit a {n} x {k} matrix")
    blocks = np.ascontiguousarray(raw).reshape(n, k // 32, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    return torch.from_numpy((q * d[..., None]).reshape(n, k))
