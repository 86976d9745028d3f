"""Weights over MQTT, for devices without the model files: the leader streams shard units.

The messages (a device's ``WeightWant``, the leader's ``WeightChunk``s and, with a cluster key,
a signed ``WeightManifest`` before the chunks of each shard) are in ``protocol/weights.py``;
the device accepts a shard only when its bytes match the signed SHA-256: the per-chunk
SHA-256 catches corruption, the manifest's signature catches a forger on the broker.

A *shard* is one unit of ``service/weights.py`` (``embeddings``, ``sub_block.<j>``, ``layer.<i>``)
serialised with safetensors; it travels in chunks of at most 256 KiB, each carrying the SHA-256
of the whole shard. The device keeps chunks on disk as they arrive, so a restart asks only for
what is missing (``have``); a shard whose reassembled bytes do not match the SHA-256 is deleted and
asked for again. When ``have`` already covers a shard the leader answers with one *complete*
message (``index = -1``, no data) so the device can check the copy it kept against the leader's.
See docs/WEIGHTS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path

import aiomqtt
import torch

from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.progress import progress
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.signing import CommandSigner, CommandVerifier
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.protocol.weights import (
    CHUNK_BYTES,
    MAX_SHARD_BYTES,
    WeightChunk,
    WeightManifest,
    WeightWant,
)
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.weights import check_unit, unit_bytes, unit_tensors

log = logging.getLogger(__name__)


Publish = Callable[[str, bytes, int], Awaitable[None]]


class WeightTransferError(DetransformerError):
    """Streaming weights from the leader failed (no answer after retries, or bad shards)."""


def _sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# --- the leader's side ---------------------------------------------------------------------------------


class WeightServer:
    """Answers wants from the leader's local files; one task per (device, model, shard), a newer
    want for the same shard replaces the older one, at most ``max_concurrent`` shards at a time."""

    def __init__(self, catalog: Catalog, publish: Publish, topics: ClusterTopics, *, chunk_bytes: int = CHUNK_BYTES,
                 max_shard_bytes: int = MAX_SHARD_BYTES, max_concurrent: int = 2,
                 cache_bytes: int = 256 << 20, signer: CommandSigner | None = None,
                 term: Callable[[], int] = lambda: 1) -> None:
        """``signer``/``term``: with a cluster key, each shard's SHA-256 is sent in a manifest
        signed for the current lease term."""
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be 1..{CHUNK_BYTES}")
        self.catalog, self.publish, self.topics = catalog, publish, topics
        self.chunk_bytes, self.max_shard_bytes, self.cache_bytes = chunk_bytes, max_shard_bytes, cache_bytes
        self.signer, self.term = signer, term
        self._sem = asyncio.Semaphore(max_concurrent)
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._blobs: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()
        self._blob_lock = asyncio.Lock()
        # test hooks: rewrite (or drop, returning None) a chunk before it is sent; a log of sent chunks
        self.on_send: Callable[[str, WeightChunk], WeightChunk | None] | None = None
        self.sent: deque[tuple[str, str, str, int]] = deque(maxlen=100_000)  # (device, model, shard, index)

    async def handle_want(self, device: str, payload: bytes) -> None:
        try:
            want = WeightWant.from_json(payload)
            cfg = self.catalog.get(want.model).config()
            for s in want.shards:
                check_unit(cfg, s)
        except (ProtocolError, ConfigError) as exc:
            log.warning("ignoring weights want from %s: %s", device, exc)
            return
        for shard in want.shards:
            key = (device, want.model, shard)
            old = self._tasks.pop(key, None)
            if old is not None:
                old.cancel()
            task = asyncio.create_task(self._serve(device, want.model, shard, set(want.have.get(shard, ()))),
                                       name=f"weights-{device}-{shard}")
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: tuple[str, str, str], task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    async def _blob(self, model: str, shard: str) -> tuple[bytes, str]:
        async with self._blob_lock:
            hit = self._blobs.get((model, shard))
            if hit is not None:
                self._blobs.move_to_end((model, shard))
                return hit
            served = self.catalog.get(model)
            if served.tensors is None:
                raise WeightTransferError(f"model {model!r} has no selective weight source on this device")
            blob = await asyncio.to_thread(unit_bytes, served.config(), shard, served.tensors)
            if len(blob) > self.max_shard_bytes:
                raise WeightTransferError(f"shard {model}/{shard} is {len(blob)} bytes, above the {self.max_shard_bytes} limit")
            hit = (blob, _sha256_hex(blob))
            self._blobs[(model, shard)] = hit
            while len(self._blobs) > 1 and sum(len(b) for b, _ in self._blobs.values()) > self.cache_bytes:
                self._blobs.popitem(last=False)
            return hit

    async def _serve(self, device: str, model: str, shard: str, have: set[int]) -> None:
        try:
            async with self._sem:
                blob, sha = await self._blob(model, shard)
                total = max(1, math.ceil(len(blob) / self.chunk_bytes))
                missing = [i for i in range(total) if i not in have]
                topic = self.topics.chunk_topic(device)
                if self.signer is not None:
                    family = self.topics.weights_manifest
                    mtopic = family.format(device)
                    body = family.encode(WeightManifest(model, shard, total, sha))
                    await self.publish(mtopic, self.signer.sign(mtopic, self.term(), body).encode(), 1)
                if not missing:
                    await self.publish(topic, WeightChunk(model, shard, -1, total, sha).to_bytes(), 1)
                    return
                log.info("streaming %s/%s to %s: %d of %d chunks (%.1f MB)", model, shard, device, len(missing), total,
                         len(missing) * self.chunk_bytes / 1e6)
                for i in missing:
                    chunk: WeightChunk | None = WeightChunk(model, shard, i, total, sha,
                                                            blob[i * self.chunk_bytes:(i + 1) * self.chunk_bytes])
                    if self.on_send is not None:
                        chunk = self.on_send(device, chunk)  # type: ignore[arg-type]
                    self.sent.append((device, model, shard, i))
                    if chunk is not None:
                        await self.publish(topic, chunk.to_bytes(), 1)
        except (DetransformerError, OSError, ValueError, RuntimeError, aiomqtt.MqttError) as exc:
            # one bad shard must not stop the leader; the device retries
            log.warning("cannot stream %s/%s to %s: %s", model, shard, device, exc)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the device's side ----------------------------------------------------------------------------------


class _Transfer:
    """One shard being received: chunk files under ``path`` (``manifest.json`` + ``<index>.chunk``)."""

    def __init__(self, path: Path, max_chunks: int) -> None:
        self.path, self.max_chunks = path, max_chunks
        self.total: int | None = None
        self.sha256: str | None = None
        self.have: set[int] = set()
        self.complete_notice = False
        self.signed_sha256: str | None = None  # from the leader's signed manifest (cluster key set)
        self.verifying = False  # the received copy is being read and checked: hold other copies off
        self.event = asyncio.Event()
        self._logged = -1
        manifest = path / "manifest.json"
        try:
            m = json.loads(manifest.read_text())
            self.total, self.sha256 = int(m["total"]), str(m["sha256"])
            self.have = {int(p.stem) for p in path.glob("*.chunk") if p.stem.isdigit() and int(p.stem) < self.total}
        except (OSError, ValueError, KeyError, TypeError):
            self.wipe()

    def wipe(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.total, self.sha256, self.have, self.complete_notice = None, None, set(), False

    def received_all(self) -> bool:
        return self.total is not None and len(self.have) == self.total

    def add(self, chunk: WeightChunk) -> None:
        if chunk.total > self.max_chunks:
            raise ProtocolError(f"shard {chunk.shard} of {chunk.total} chunks is above the size limit")
        if self.sha256 is not None and (chunk.sha256, chunk.total) != (self.sha256, self.total):
            if self.verifying:
                return  # asked for again once this copy's verdict is in
            log.info("the leader's %s differs from the copy kept here: starting it again", chunk.shard)
            self.wipe()
        if self.sha256 is None:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / "manifest.json.tmp"
            tmp.write_text(json.dumps({"total": chunk.total, "sha256": chunk.sha256}))
            os.replace(tmp, self.path / "manifest.json")
            self.total, self.sha256 = chunk.total, chunk.sha256
        if chunk.index == -1:
            self.complete_notice = True
        elif chunk.index not in self.have:
            tmp = self.path / f"{chunk.index}.tmp"
            tmp.write_bytes(chunk.data)
            os.replace(tmp, self.path / f"{chunk.index}.chunk")  # a torn write never looks like a chunk
            self.have.add(chunk.index)
        self.event.set()

    def percent(self) -> float:
        return 100.0 * len(self.have) / self.total if self.total else 0.0

    def log_progress(self, model: str, shard: str) -> None:
        step = int(self.percent() // 10)
        if step != self._logged:
            self._logged = step
            log.info("weights %s/%s: %.0f%% (%d/%s chunks)", model, shard, self.percent(), len(self.have), self.total)

    def assemble(self) -> bytes:
        assert self.total is not None
        return b"".join((self.path / f"{i}.chunk").read_bytes() for i in range(self.total))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def prune_cache(cache_dir: Path, max_bytes: float, keep: Collection[tuple[str, str]] = ()) -> int:
    """Delete the least recently used shards under ``cache_dir`` (``<model>/<shard>/``) until the
    rest fits in ``max_bytes``; shards in ``keep`` (the placement in use) are never deleted.
    Returns the bytes freed. Last use is the shard's manifest time (touched on every use)."""
    units = []
    for model_dir in (d for d in cache_dir.iterdir() if d.is_dir()) if cache_dir.is_dir() else ():
        for unit in (u for u in model_dir.iterdir() if u.is_dir()):
            manifest = unit / "manifest.json"
            used = manifest.stat().st_mtime if manifest.exists() else 0.0
            units.append((used, unit, _dir_bytes(unit), (model_dir.name, unit.name) in keep))
    total = sum(u[2] for u in units)
    freed = 0
    for _, unit, size, kept in sorted(units, key=lambda u: u[0]):
        if total - freed <= max_bytes:
            break
        if kept:
            continue
        shutil.rmtree(unit, ignore_errors=True)
        freed += size
        log.info("weights cache: removed %s (%.1f MB, least recently used)", unit, size / 1e6)
    for model_dir in (d for d in cache_dir.iterdir() if d.is_dir()) if cache_dir.is_dir() else ():
        if not any(model_dir.iterdir()):
            model_dir.rmdir()
    return freed


class WeightFetcher:
    """Gets shard units from the leader into ``cache_dir``; ``fetch`` returns their tensors.
    The cache is bounded (``prune``: least recently used shards beyond ``max_cache_bytes``)."""

    def __init__(self, device_id: str, catalog: Catalog, publish: Publish, topics: ClusterTopics, cache_dir: Path, *,
                 max_concurrent: int = 2, timeout_s: float = 10.0, retries: int = 5,
                 max_shard_bytes: int = MAX_SHARD_BYTES, verifier: CommandVerifier | None = None,
                 max_cache_bytes: float = 2048e6) -> None:
        """``verifier``: with a cluster key, a shard is accepted only when it matches the SHA-256
        of a manifest the leader signed."""
        self.verifier = verifier
        self.device_id, self.catalog, self.publish, self.topics = device_id, catalog, publish, topics
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.max_concurrent, self.timeout_s, self.retries = max_concurrent, timeout_s, retries
        self.max_chunks = math.ceil(max_shard_bytes / 1024)  # chunks may be as small as 1 KiB
        self._active: dict[tuple[str, str], _Transfer] = {}
        self.corrupt_shards = 0  # shards that failed their sha256 (and were fetched again)
        self._units = 0  # shards of the fetch in progress, and how many of them are done
        self._units_done = 0

    def prune(self, keep: Collection[tuple[str, str]] = ()) -> int:
        """Bound the cache (at start, and after each placement with the placement's shards kept)."""
        try:
            return prune_cache(self.cache_dir, self.max_cache_bytes, set(keep) | set(self._active))
        except OSError as exc:
            log.warning("%s: cannot prune the weights cache %s: %s", self.device_id, self.cache_dir, exc)
            return 0

    def progress(self) -> dict[str, float]:
        """Percent received of each shard being fetched now (``model/shard`` -> percent)."""
        return {f"{m}/{s}": round(t.percent(), 1) for (m, s), t in self._active.items()}

    def percent(self) -> float | None:
        """Percent of the current fetch received (finished shards plus the parts of active ones);
        None when nothing is being fetched."""
        if not self._units:
            return None
        partial = sum(t.percent() / 100 for t in self._active.values())
        return round(100.0 * min(self._units, self._units_done + partial) / self._units, 1)

    def handle_manifest(self, topic: str, payload: bytes) -> None:
        """A signed manifest: the SHA-256 a shard must have (ignored without a cluster key)."""
        if self.verifier is None:
            return
        try:
            self.verifier.verify(topic, payload, "weights")  # SignatureError: forged or replayed
            manifest = self.topics.weights_manifest.decode(payload)
            model, shard, sha = manifest.model, manifest.shard, manifest.sha256
        except ProtocolError as exc:
            log.warning("%s: dropping weights manifest: %s", self.device_id, exc)
            return
        t = self._active.get((model, shard))
        if t is not None:
            t.signed_sha256 = sha
            t.event.set()

    def handle_chunk(self, payload: bytes) -> None:
        try:
            chunk = WeightChunk.from_bytes(payload)
            t = self._active.get((chunk.model, chunk.shard))
            if t is None:
                return  # a shard not (or no longer) being fetched: a late duplicate
            t.add(chunk)
            t.log_progress(chunk.model, chunk.shard)
        except (ProtocolError, OSError) as exc:
            log.warning("%s: dropping weights chunk: %s", self.device_id, exc)

    async def fetch(self, model: str, placement_version: int, units: Sequence[str]) -> dict[str, torch.Tensor]:
        cfg = self.catalog.get(model).config()
        sem = asyncio.Semaphore(self.max_concurrent)

        bar = progress(f"{self.device_id}: weights of {model} from the leader", total=len(units), unit="shard")

        async def one(unit: str) -> dict[str, torch.Tensor]:
            async with sem:
                blob = await self._fetch_unit(model, placement_version, unit)
                self._units_done += 1
                bar.update(1)
                return await asyncio.to_thread(unit_tensors, cfg, unit, blob)

        self._units, self._units_done = len(units), 0
        tasks = [asyncio.create_task(one(u), name=f"fetch-{model}-{u}") for u in units]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:  # one shard failed (or we were cancelled): stop the others too
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._units = self._units_done = 0
            bar.close()
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            out.update(part)
        return out

    async def _fetch_unit(self, model: str, version: int, unit: str) -> bytes:
        key = (model, unit)
        if key in self._active:
            raise WeightTransferError(f"{model}/{unit} is already being fetched")
        t = _Transfer(self.cache_dir / model / unit, self.max_chunks)
        self._active[key] = t
        failures = 0
        try:
            while True:
                t.complete_notice = False
                t.event.clear()
                if t.have:
                    log.info("%s: resuming %s/%s with %d/%s chunks kept", self.device_id, model, unit, len(t.have), t.total)
                want = WeightWant(model, version, (unit,), {unit: tuple(sorted(t.have))})
                family = self.topics.weights_want
                await self.publish(family.format(self.device_id), family.encode(want), 1)
                heard = False  # anything from the leader since this want
                while not ((t.received_all() and heard) or t.complete_notice):
                    try:
                        await asyncio.wait_for(t.event.wait(), self.timeout_s)
                    except TimeoutError:
                        break  # silence: ask again for what is still missing
                    t.event.clear()
                    heard = True
                if t.received_all() and heard and self.verifier is not None and t.signed_sha256 is None:
                    failures += 1  # chunks, but no signed manifest: ask again
                    log.warning("%s: no signed manifest for %s/%s (is the leader's cluster_key set?)",
                                self.device_id, model, unit)
                elif t.received_all() and heard:
                    expected = t.sha256
                    t.verifying = True
                    try:
                        blob = await asyncio.to_thread(t.assemble)
                        digest = await asyncio.to_thread(_sha256_hex, blob)
                    except OSError:
                        continue  # the chunk files went away underneath (disk trouble): ask again
                    finally:
                        t.verifying = False
                    if digest == expected == t.sha256 and t.signed_sha256 in (None, digest):
                        with contextlib.suppress(OSError):
                            os.utime(t.path / "manifest.json")  # used now: the cache keeps it longest
                        return blob
                    self.corrupt_shards += 1
                    log.warning("%s: shard %s/%s failed its %s: fetching it again", self.device_id, model, unit,
                                "sha256" if digest != t.sha256 else "signed sha256")
                    t.wipe()
                    failures += 1
                elif t.complete_notice:  # the leader thinks we have it all, but our copy was stale
                    failures += 1
                elif not heard:
                    failures += 1
                    log.warning("%s: no weights for %s/%s from the leader in %.0f s (try %d of %d)", self.device_id,
                                model, unit, self.timeout_s, failures, self.retries)
                if failures > self.retries:
                    raise WeightTransferError(
                        f"could not get {model}/{unit} from the leader after {failures} tries; "
                        "check that the leader has the model files")
        finally:
            self._active.pop(key, None)
