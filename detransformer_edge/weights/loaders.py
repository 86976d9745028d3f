"""Pretrained weights and tokenizers from the offline model packages: the one entry point.

Models are built on the ``meta`` device and filled with ``load_state_dict(assign=True)``, so the
weights are never copied. Pretrained weights exist only for the standard layout (``nb=None``);
a decoupled model has other shapes and is made by distillation (``training/convert.py``).
One loader per model family: ``weights/bert.py`` (MiniLM safetensors), ``weights/llama.py``
(SmolLM2 GGUF); ``weights/sources.py`` finds the files.
"""

from __future__ import annotations

import logging
import time

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.bert import load_minilm
from detransformer_edge.weights.llama import load_smollm2
from detransformer_edge.weights.quant import check_scheme
from detransformer_edge.weights.sources import LoadedModel, Progress, source_of

log = logging.getLogger(__name__)


def load_model(
    name: str, nd: int = 1, nb: int | None = None, progress: Progress | None = None, cache: bool = True,
    quant: str = "float32",
) -> LoadedModel:
    """Pretrained preset ``name`` (``minilm-l6`` or ``smollm2-135m``) with tokenizer, offline.

    ``nd``/``nb`` must describe the standard layout (``nb=None``): pretrained checkpoints have
    no decoupled sub-blocks. ``progress`` receives one-line status messages while loading.
    ``cache``: keep/reuse dequantised GGUF weights under ``cache_dir()`` (the GGUF takes seconds
    to dequantise; the cache maps in well under one).
    ``quant``: weight format, ``float32``, ``int8`` or ``int4`` (``weights/quant``); SmolLM2's int4
    is read straight from the GGUF's Q4_1 blocks.
    """
    check_scheme(quant)
    if nb is not None:
        raise ConfigError(
            f"pretrained {name!r} weights exist only for the standard model (nb=None, got nb={nb}); "
            "a decoupled model has to be distilled first"
        )
    source = source_of(name)
    started = time.perf_counter()
    say = progress or (lambda message: log.info("%s", message))
    if source.kind == "encoder":
        loaded = load_minilm(name, nd, say)
        if quant != "float32":
            from detransformer_edge.weights.quant.linear import quantize_model

            say(f"quantizing to {quant}")
            quantize_model(loaded.model, quant)
            loaded.metadata["quant"] = quant
    else:
        loaded = load_smollm2(name, nd, say, cache, quant)
    loaded.load_seconds = time.perf_counter() - started
    from detransformer_edge.weights.quant.linear import module_nbytes

    size = f"{module_nbytes(loaded.model) / 1e6:.0f} MB"
    say(f"loaded {name} ({loaded.model.num_params() / 1e6:.1f} M float parameters, {size} {quant}) "
        f"in {loaded.load_seconds:.1f} s")
    return loaded
