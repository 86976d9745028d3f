"""Weights over MQTT, as messages (the behaviour is in ``service/weight_stream.py``):

    device -> P/weights/<device>/want      JSON ``WeightWant``  {model, placement_version, shards, have}
    leader -> P/weights/<device>/manifest  JSON ``WeightManifest`` {model, shard, total, sha256} (signed)
    leader -> P/weights/<device>/chunk     msgpack ``WeightChunk`` {model, shard, index, total, sha256, data}

Wants and manifests are control messages (JSON, the codec of ``protocol/codec.py``); a chunk
carries up to 256 KiB of bytes, so it is a bounded msgpack map like the tensor envelope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack

from detransformer_edge.protocol.codec import Message, ProtocolError, load_object, req_int, req_str

CHUNK_BYTES = 256 * 1024  # MQTT brokers and small devices handle messages of this size well
MAX_SHARD_BYTES = 1 << 30  # SmolLM2's largest unit (embeddings + head, float32) is ~113 MB
MAX_WANT_BYTES = 1 << 22  # a want lists chunk indices: ~4 M chunks at most, far beyond any shard
MAX_SHARDS_PER_WANT = 256


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_model_and_shard(model: Any, shard: Any) -> None:
    if not isinstance(model, str) or not 0 < len(model) <= 128:
        raise ProtocolError(f"weights: model must be a name, got {model!r}")
    if not isinstance(shard, str) or not 0 < len(shard) <= 64 or "/" in shard:
        raise ProtocolError(f"weights: shard must be a shard id, got {shard!r}")


@dataclass(frozen=True)
class WeightWant(Message):
    """A device asks for shards of a model, listing the chunk indices it already has."""

    SCHEMA: ClassVar[str] = "weights want"
    model: str
    placement_version: int
    shards: tuple[str, ...]
    have: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "have", {k: tuple(v) for k, v in self.have.items()})
        if not isinstance(self.placement_version, int) or isinstance(self.placement_version, bool) or self.placement_version < 0:
            raise ProtocolError(f"weights want: bad placement_version {self.placement_version!r}")
        if not 1 <= len(self.shards) <= MAX_SHARDS_PER_WANT:
            raise ProtocolError(f"weights want: 1..{MAX_SHARDS_PER_WANT} shards, got {len(self.shards)}")
        for s in self.shards:
            _check_model_and_shard(self.model, s)
        for s, idx in self.have.items():
            if s not in self.shards:
                raise ProtocolError(f"weights want: 'have' names shard {s!r} that is not wanted")
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (1 << 24) for i in idx):
                raise ProtocolError(f"weights want: chunk indices of {s!r} must be integers >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "placement_version": self.placement_version,
                "shards": list(self.shards), "have": {k: list(v) for k, v in self.have.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        if not isinstance(d.get("shards"), list) or not isinstance(d.get("have", {}), dict):
            raise ProtocolError("weights want must be an object with 'shards' (list) and 'have' (object)")
        have = d.get("have", {})
        if not all(isinstance(v, list) for v in have.values()):
            raise ProtocolError("weights want: 'have' maps shard ids to lists of chunk indices")
        return cls(d.get("model"), d.get("placement_version"), tuple(d["shards"]), have)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        return cls.from_dict(load_object(payload, cls.SCHEMA, max_bytes=MAX_WANT_BYTES))


@dataclass(frozen=True)
class WeightManifest(Message):
    """The SHA-256 a shard must have, sent (signed) before its chunks when the cluster has a key:
    the per-chunk SHA-256 catches corruption, the signature a forger on the broker."""

    SCHEMA: ClassVar[str] = "weights manifest"
    model: str
    shard: str
    total: int
    sha256: str

    def __post_init__(self) -> None:
        _check_model_and_shard(self.model, self.shard)
        if not _is_sha256(self.sha256):
            raise ProtocolError("weights manifest: sha256 must be 64 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "shard": self.shard, "total": self.total, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(req_str(d, "model", s), req_str(d, "shard", s), req_int(d, "total", s, minimum=1),
                   req_str(d, "sha256", s))


@dataclass(frozen=True)
class WeightChunk:
    """Chunk ``index`` of ``total`` of a shard; ``index = -1``: "you have it all" (no data)."""

    model: str
    shard: str
    index: int
    total: int
    sha256: str  # hex digest of the whole shard
    data: bytes = b""

    def __post_init__(self) -> None:
        _check_model_and_shard(self.model, self.shard)
        for k in ("index", "total"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ProtocolError(f"weights chunk: {k} must be an integer, got {v!r}")
        if not 1 <= self.total <= math.ceil(MAX_SHARD_BYTES / 1024):
            raise ProtocolError(f"weights chunk: total {self.total} out of range")
        if not -1 <= self.index < self.total:
            raise ProtocolError(f"weights chunk: index {self.index} not in -1..{self.total - 1}")
        if not _is_sha256(self.sha256):
            raise ProtocolError("weights chunk: sha256 must be 64 lowercase hex digits")
        if not isinstance(self.data, bytes) or len(self.data) > CHUNK_BYTES:
            raise ProtocolError(f"weights chunk: data must be at most {CHUNK_BYTES} bytes")
        if self.index == -1 and self.data:
            raise ProtocolError("weights chunk: a 'complete' message (index -1) carries no data")

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb({"model": self.model, "shard": self.shard, "index": self.index,
                                       "total": self.total, "sha256": self.sha256, "data": self.data}, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, payload: bytes) -> WeightChunk:
        if len(payload) > CHUNK_BYTES + 4096:
            raise ProtocolError(f"weights chunk of {len(payload)} bytes is too large")
        try:
            d = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=CHUNK_BYTES,
                                max_str_len=256, max_array_len=16, max_map_len=16, max_ext_len=0)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"weights chunk is not msgpack: {exc}") from None
        if not isinstance(d, dict) or set(d) != {"model", "shard", "index", "total", "sha256", "data"}:
            raise ProtocolError("weights chunk must be a map of model, shard, index, total, sha256, data")
        return cls(d["model"], d["shard"], d["index"], d["total"], d["sha256"], d["data"])


