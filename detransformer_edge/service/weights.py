"""Selective weight loading: a device materialises only the parameters its placement needs.

The model is built on the ``meta`` device (no memory), the names a :class:`DeviceWeights` needs
are worked out from the config (:func:`needed_parameters`), only those tensors are read from the
device's local files (a :class:`LocalWeightSource`) or received from the leader (see
``weight_stream``), and ``load_state_dict(assign=True)`` puts them in place. Everything else stays
on ``meta``: :func:`build_shard` only keeps modules the placement names, so nothing unloaded is
ever run.

Weights travel and are cached in *shard units* (:func:`shard_units`):

* ``embeddings``    token/position embeddings (+ final norm and LM head of a decoder);
* ``sub_block.<j>`` sub-block ``j`` of every decoupled layer;
* ``layer.<i>``     the whole layer ``i`` (coupled layers, and decoupled layers held whole).

A tensor-parallel shard of a coupled layer needs its whole layer (TP slices are cut after
loading), so ``tp_shards`` map to the ``layer.<i>`` units of the coupled layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.model.config import DecoderConfig, EncoderConfig
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.parallel.shards import DeviceShard, build_shard

log = logging.getLogger(__name__)

ModelConfig = EncoderConfig | DecoderConfig
EMBEDDINGS = "embeddings"


class WeightSourceError(DetransformerError):
    """Local weight files are missing, unreadable, or lack a tensor the placement needs."""


class LocalWeightSource(Protocol):
    """Reads named tensors (our state-dict names, float32) from a device's own files."""

    def __call__(self, names: Collection[str], /) -> Mapping[str, Any]: ...  # name -> torch.Tensor


# --- which names a placement needs -----------------------------------------------------------------


def empty_model(cfg: ModelConfig) -> nn.Module:
    """The model on the ``meta`` device: shapes and names, no memory."""
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.encoder import Encoder

    with torch.device("meta"):
        return Encoder(cfg) if isinstance(cfg, EncoderConfig) else Decoder(cfg)


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of the model (a tied LM head is stored once, as ``tok_emb.weight``)."""
    return _layout(cfg)[0]


def _decoupled(cfg: ModelConfig) -> frozenset[int]:
    """Indices of the decoupled layers (those made of sub-blocks)."""
    return _layout(cfg)[1]


_LAYOUTS: dict[str, tuple[dict[str, tuple[int, ...]], frozenset[int]]] = {}


def _layout(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[int]]:
    # configs are unhashable dataclasses: cached by their repr, which names every field
    key = repr(cfg)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    shapes = {name: tuple(t.shape) for name, t in empty_model(cfg).state_dict().items()}
    if isinstance(cfg, DecoderConfig) and cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    _LAYOUTS[key] = shapes, frozenset(int(n.split(".")[1]) for n in shapes if ".sub_blocks." in n)
    return _LAYOUTS[key]


def shard_units(cfg: ModelConfig, weights: DeviceWeights) -> tuple[str, ...]:
    """The transfer/cache units that together hold everything ``weights`` needs, in load order."""
    units: list[str] = [EMBEDDINGS] if weights.embeddings else []
    decoupled = _decoupled(cfg)
    layers = set(weights.whole_layers)
    # sub-blocks of a model without decoupled layers mean nothing (full replicas name them all);
    # when every decoupled layer is held whole, the layer units already hold the sub-blocks
    if decoupled - layers:
        units += [f"sub_block.{j}" for j in sorted(set(weights.sub_blocks))]
    if weights.tp_shards:
        layers |= set(range(cfg.n_layers)) - decoupled
    units += [f"layer.{i}" for i in sorted(layers)]
    for u in units:
        check_unit(cfg, u)
    return tuple(units)


def check_unit(cfg: ModelConfig, unit: str) -> None:
    """ConfigError unless ``unit`` names a shard unit of this model."""
    kind, _, index = unit.partition(".")
    ok = unit == EMBEDDINGS
    if kind in ("sub_block", "layer") and index.isdigit() and str(int(index)) == index:
        ok = int(index) < (cfg.nd if kind == "sub_block" else cfg.n_layers)
        if kind == "sub_block":
            ok = ok and bool(_decoupled(cfg))
    if not ok:
        raise ConfigError(f"no weight shard {unit!r} in this model ({cfg.n_layers} layers, nd={cfg.nd})")


def unit_parameters(cfg: ModelConfig, unit: str) -> tuple[str, ...]:
    """Our state-dict names stored in shard unit ``unit`` (sorted)."""
    check_unit(cfg, unit)
    names = parameter_shapes(cfg)
    if unit == EMBEDDINGS:
        keep = [n for n in names if not n.startswith("layers.")]
    elif unit.startswith("sub_block."):
        j = int(unit.partition(".")[2])
        keep = [n for n in names if n.startswith("layers.") and n.split(".")[2:4] == ["sub_blocks", str(j)]]
    else:
        i = int(unit.partition(".")[2])
        keep = [n for n in names if n.startswith(f"layers.{i}.")]
    return tuple(sorted(keep))


def needed_parameters(cfg: ModelConfig, weights: DeviceWeights) -> set[str]:
    """Our state-dict names a device holding ``weights`` must materialise."""
    return {n for u in shard_units(cfg, weights) for n in unit_parameters(cfg, u)}


# --- building a shard from some tensors --------------------------------------------------------------


def materialise(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A ``meta`` model with ``tensors`` assigned in place; every other parameter stays on ``meta``."""
    from detransformer_edge.model.layers import RotaryEmbedding

    shapes = parameter_shapes(cfg)
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        raise WeightSourceError(f"tensors not in the model: {unknown[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise WeightSourceError(f"tensor {name} has shape {tuple(t.shape)}, the model wants {shapes[name]}")
    # ordinary tensors whatever mode the caller is in: a tensor made under inference mode cannot
    # become a Parameter outside it (and the executor's inference mode can leak into the event
    # loop's thread across awaits), so such tensors are copied
    with torch.inference_mode(False):
        plain = {n: t.clone() if t.is_inference() else t for n, t in tensors.items()}
        model = empty_model(cfg)
        model.load_state_dict(plain, assign=True, strict=False)
    if isinstance(cfg, DecoderConfig):
        model.tie_weights()  # type: ignore[operator]
        # inv_freq is a non-persistent buffer: assign-loading leaves it on meta
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    return model.eval()


def build_selective_shard(cfg: ModelConfig, weights: DeviceWeights, tensors: Mapping[str, torch.Tensor]) -> DeviceShard:
    """The device's shard from exactly the tensors it needs (checked: none missing)."""
    need = needed_parameters(cfg, weights)
    missing = sorted(need - set(tensors))
    if missing:
        raise WeightSourceError(f"weights for {weights} lack {len(missing)} tensors, e.g. {missing[:3]}")
    model = materialise(cfg, {n: tensors[n] for n in need})
    with torch.no_grad():
        return build_shard(model, weights)  # type: ignore[arg-type]


def load_selective_shard(cfg: ModelConfig, weights: DeviceWeights, source: LocalWeightSource) -> DeviceShard:
    """Read only the tensors ``weights`` needs from ``source`` and build the shard."""
    return build_selective_shard(cfg, weights, source(needed_parameters(cfg, weights)))


# --- shard units as bytes (what the leader streams) -----------------------------------------------


def unit_bytes(cfg: ModelConfig, unit: str, source: LocalWeightSource) -> bytes:
    """Shard unit ``unit`` serialised with safetensors (deterministic for the same tensors)."""
    from safetensors.torch import save

    names = unit_parameters(cfg, unit)
    tensors = source(names)
    return save({n: tensors[n].contiguous() for n in names}, metadata={"unit": unit})


def unit_tensors(cfg: ModelConfig, unit: str, blob: bytes) -> dict[str, torch.Tensor]:
    """Parse a shard unit received from the leader; it must hold exactly the unit's tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightSourceError(f"shard {unit} is not a safetensors file: {exc}") from None
    want = set(unit_parameters(cfg, unit))
    if set(tensors) != want:
        raise WeightSourceError(f"shard {unit} holds {sorted(set(tensors) ^ want)[:3]} unexpectedly")
    shapes = parameter_shapes(cfg)
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise WeightSourceError(f"shard {unit}: {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
    return {n: t.to(torch.float32) for n, t in tensors.items()}


# --- local sources ----------------------------------------------------------------------------------


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensors(cfg: ModelConfig, seed: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Deterministic random weights per name, so any subset equals the full model's slice:
    N(0, 0.02) matrices (from a generator seeded by (seed, name)), unit norms, zero biases."""
    shapes = parameter_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in shapes:
            raise WeightSourceError(f"no tensor {name!r} in {cfg.name}")
        shape = shapes[name]
        if len(shape) >= 2:
            g = torch.Generator().manual_seed(_seed_for(seed, name))
            out[name] = torch.randn(shape, generator=g) * 0.02
        elif name.endswith("bias"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.ones(shape)
    return out


class SafetensorsSource:
    """Tensors from one safetensors file, read one by one (``safe_open``), renamed to ours."""

    def __init__(self, path: Path, file_names: Mapping[str, str], aliases: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.file_names = dict(file_names)  # our name -> name in the file
        self.aliases = dict(aliases or {})  # our name -> our name it equals (tied weights)

    def __call__(self, names: Collection[str]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                for name in names:
                    stored = self.file_names.get(self.aliases.get(name, name))
                    if stored is None:
                        raise WeightSourceError(f"{self.path.name} has no tensor for {name!r}")
                    out[name] = f.get_tensor(stored).to(torch.float32)
        except (OSError, SafetensorError) as exc:
            raise WeightSourceError(f"cannot read {self.path}: {exc}") from None
        return out

    @classmethod
    def mapped(cls, path: Path, rename: Callable[[str], str | None], **kwargs: Any) -> SafetensorsSource:
        """Names in the file mapped to ours by ``rename`` (None: a tensor we do not use)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except (OSError, SafetensorError) as exc:
            raise WeightSourceError(f"cannot read {path}: {exc}") from None
        mapping = {ours: k for k in keys if (ours := rename(k)) is not None}
        return cls(path, mapping, **kwargs)


def _verified(path: Path) -> Path:
    """``path``, checked against the SHA-256 recorded when it was first loaded
    (``weights/manifest.py``; WeightIntegrityError if it changed under us)."""
    from detransformer_edge.weights.manifest import verify_file
    from detransformer_edge.weights.sources import cache_dir

    verify_file(path, cache_dir())
    return path


def minilm_source() -> LocalWeightSource:
    """all-MiniLM-L6-v2 from its package (HF BERT names mapped to ours)."""
    from detransformer_edge.weights.bert import bert_name
    from detransformer_edge.weights.sources import weights_path

    return SafetensorsSource.mapped(_verified(weights_path("minilm-l6")), bert_name)


def intent_source(weights_dir: Path | None = None) -> LocalWeightSource:
    """The trained intent encoder (``encoder.*`` in the intent model's file)."""
    from detransformer_edge.nlu.parser import default_weights_dir

    path = (weights_dir or default_weights_dir()) / "model.safetensors"
    if not path.is_file():
        raise WeightSourceError(f"no intent model at {path}; run `detransformer-edge train-intent`")
    return SafetensorsSource.mapped(_verified(path), lambda k: k.removeprefix("encoder.") if k.startswith("encoder.") else None)


def smollm2_source() -> LocalWeightSource:
    """SmolLM2 from the dequantised-GGUF cache (built on first use: one full dequantisation)."""
    from detransformer_edge.weights.llama import CACHE_FORMAT, read_llama_gguf
    from detransformer_edge.weights.sources import cache_dir, file_sha256, weights_path

    path = _verified(weights_path("smollm2-135m"))
    cache = cache_dir()
    if cache is None:  # no cache allowed: dequantise the file on each read and keep only the names asked for
        def uncached(names: Collection[str]) -> dict[str, torch.Tensor]:
            sd = read_llama_gguf(path, cache=None)[1]
            sd.setdefault("lm_head.weight", sd["tok_emb.weight"])
            missing = sorted(set(names) - set(sd))
            if missing:
                raise WeightSourceError(f"{path.name} has no tensors {missing[:3]}")
            return {n: sd[n] for n in names}

        return uncached
    entry = cache / f"{path.stem}-{file_sha256(path)[:16]}-v{CACHE_FORMAT}"
    weights_file = entry / "weights.safetensors"
    if not weights_file.is_file():
        log.info("building the dequantised SmolLM2 cache in %s (once)", entry)
        read_llama_gguf(path, cache=cache)
    if not weights_file.is_file():
        raise WeightSourceError(f"could not build the dequantised cache {weights_file}")
    tied = json.loads((entry / "metadata.json").read_text()).get("general.architecture") == "llama"
    source = SafetensorsSource.mapped(weights_file, lambda k: k)
    if "lm_head.weight" not in source.file_names and tied:
        source.aliases["lm_head.weight"] = "tok_emb.weight"
    return source
