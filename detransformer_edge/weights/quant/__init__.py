"""Quantized weights: which formats exist and which one a device runs (no torch import here, so
profiles and the catalog can validate names cheaply).

Formats (``SCHEMES``):

* ``float32`` — the model as loaded.
* ``int8``  — per-output-channel int8 weights, ``w[n, k] = scale[n] * q[n, k]`` (symmetric,
  ``|q| <= 127``), run by torch's ``aten._weight_int8pack_mm``.
* ``int4``  — group-wise asymmetric 4-bit weights, 32 inputs per group (llama.cpp's Q4 block),
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 — the convention of torch's
  ``aten._weight_int4pack_mm_for_cpu``. A layer the kernel cannot take (out features not a
  multiple of 16, in features not a multiple of 32) stays int8, and so does the LM head:
  llama.cpp keeps it 8-bit too (SmolLM2's ``token_embd`` is Q8_0) and it is the most sensitive
  matrix.

Only ``nn.Linear`` layers change: embeddings and norms stay float32. A tied LM head (SmolLM2's
``lm_head.weight is tok_emb.weight``) gets its own int8 copy; the token embedding stays float32
for lookups, so the tie is broken and the head costs ``vocab * d`` more bytes (+ scales).

Which format runs: each catalog model names one (``ServedModel.quant``); a device's profile may
override it for every model it holds (``quant`` in the profile TOML; ``auto`` = the catalog's).
Code: ``linear.py`` (the layers and the pass), ``gguf.py`` (GGUF Q4_1 / Q8_0 blocks), ``parity.py``
(the float32 comparisons the tests and ``bench/quant.py`` report).
"""

from __future__ import annotations

from typing import Literal

from detransformer_edge.errors import ConfigError

Scheme = Literal["float32", "int8", "int4"]
SCHEMES: tuple[str, ...] = ("float32", "int8", "int4")
AUTO = "auto"  # a device that follows the catalog's choice
DEVICE_CHOICES: tuple[str, ...] = (AUTO, *SCHEMES)


def check_scheme(value: object, what: str = "quant", allowed: tuple[str, ...] = SCHEMES) -> str:
    """``value`` if it is one of ``allowed``, else a ConfigError naming the allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def resolve_scheme(model_default: str, device_choice: str = AUTO) -> str:
    """The format a device runs a model in: its own choice, or the catalog's for ``auto``."""
    check_scheme(device_choice, "the device's quant", DEVICE_CHOICES)
    return check_scheme(model_default, "the model's quant") if device_choice == AUTO else device_choice
