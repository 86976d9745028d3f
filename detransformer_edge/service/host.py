"""The model side of one device: the weights the placement gave it, and its part of each run.

An assignment names, per model, the :class:`DeviceWeights` this device must hold. The host builds
the model on the ``meta`` device and materialises only those weights (``service/weights.py``):
read from the device's local files (in a worker thread, so the agent keeps answering pings and
elections), or, without local files, streamed from the leader (``service/weight_stream.py``).
It keeps one :class:`Executor` per model. Runs from the leader (``RunControl``) are executed here; a
generation is a prefill pass followed by decode passes until the leader says ``end``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import ctypes
import gc
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from detransformer_edge.errors import ConfigError, DetransformerError, ModelNotInstalledError
from detransformer_edge.parallel.executor import Executor, Job, JobKind, JobResult
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.parallel.shards import DeviceShard, build_shard, quantize_shard
from detransformer_edge.parallel.trace import Span, Timeline
from detransformer_edge.progress import progress
from detransformer_edge.protocol.runs import RunControl
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.weights import (
    WeightSourceError,
    build_selective_shard,
    load_selective_shard,
    shard_units,
)
from detransformer_edge.transport.base import Transport
from detransformer_edge.transport.errors import RequestCancelled
from detransformer_edge.weights.manifest import WeightIntegrityError
from detransformer_edge.weights.quant import AUTO, DEVICE_CHOICES, check_scheme, resolve_scheme

log = logging.getLogger(__name__)
T = TypeVar("T")


LOADER_NICENESS = 5  # how much lower the weight loader runs than the agent's event loop (nice 5: about a third of its CPU share)


def _lower_priority() -> None:
    """Lower this thread's scheduling priority (Linux niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)
    except (OSError, AttributeError):  # not Linux, or not allowed: load at normal priority
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's own starting value, kept instead of raised


def pin_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more (weight tensors) from its own mapping, returned to
    the OS when freed. glibc raises its mmap threshold after each large free (up to 32 MiB), after
    which weight tensors come from the heap, where a freed shard stays in the process's RSS
    (measured: a BERT-base-family re-placement left 1.1 GB of freed heap, RSS 2.64 GB for 1.56 GB
    of weights, and the bench's first device was OOM-killed; pinned: 1.89 GB). Fixing the
    threshold also stops glibc from adjusting it. No-op without glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def return_free_memory() -> None:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``). A re-placement frees the
    old weights, but glibc keeps freed heap pages, so without this a device's RSS stays at the
    high-water mark of every placement it ever held (in the chaos soak: up to ~10 MB more per
    agent after a few re-placements with the tiny catalog). No-op without glibc. Collects
    reference cycles first, so weights held only by a cycle are free when the heap is trimmed."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def trace_step(n: int) -> str:
    """The transport step a worker's timeline of pass ``n`` travels on."""
    return f"trace.{n}"


@dataclass(frozen=True)
class HeldModel:
    weights: DeviceWeights
    shard: DeviceShard
    executor: Executor


WeightsMode = Literal["auto", "local", "stream"]
WEIGHTS_MODES: tuple[str, ...] = ("auto", "local", "stream")


class ModelHost:
    def __init__(self, transport: Transport, catalog: Catalog, fetcher: object | None = None,
                 weights: WeightsMode = "auto", quant: str = AUTO) -> None:
        """``weights``: ``local`` reads the device's files; ``stream`` asks the leader (``fetcher``,
        a :class:`WeightFetcher`); ``auto`` reads local files and streams only when they are missing.
        ``quant``: the weight format of every model held here (the profile's ``quant``), or
        ``auto`` for each model's catalog format; shards are quantized after they are built."""
        check_scheme(quant, "quant", DEVICE_CHOICES)
        if weights not in WEIGHTS_MODES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHTS_MODES)}, got {weights!r}")
        if weights == "stream" and fetcher is None:
            raise ConfigError("weights = 'stream' needs a connection to the leader (a WeightFetcher)")
        self.transport = transport
        self.catalog = catalog
        self.fetcher = fetcher
        self.weights_mode = weights
        self.quant = quant
        self.device_id = transport.device_id
        self.held: dict[str, HeldModel] = {}
        self.version = 0
        self.ready = False
        self._runs: dict[str, asyncio.Task] = {}
        # the device's one compute thread: model compute of every held model runs there, off the
        # event loop (parallel/executor.py)
        pin_mmap_threshold()  # before any weights are loaded: a freed shard must leave the RSS
        self.compute_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"compute-{self.device_id}")
        # weights load on a thread of their own at a lower CPU priority: on a small CPU the event
        # loop (lease renewals, status, the leader's answers) must not starve behind a long load
        self.loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"loader-{self.device_id}",
                                                            initializer=_lower_priority)
        self._assign_lock = asyncio.Lock()

    # --- weights ---------------------------------------------------------------------------------

    async def assign(self, version: int, models: Mapping[str, DeviceWeights]) -> None:
        """Hold exactly ``models`` (model -> weights); models not named are dropped."""
        async with self._assign_lock:
            self.ready = False
            held: dict[str, HeldModel] = {}
            to_load = {}
            for model, weights in models.items():
                current = self.held.get(model)
                if current is not None and current.weights == weights:
                    held[model] = current
                elif weights != DeviceWeights():
                    to_load[model] = weights
            with progress(f"{self.device_id}: loading placement v{version}", total=len(to_load), unit="model",
                          quiet=not to_load) as bar:
                for model, weights in to_load.items():
                    bar.set_postfix_str(model)
                    shard = await self._load(model, weights, version)
                    scheme = self.scheme(model)
                    if scheme != "float32":
                        await self._in_loader(quantize_shard, shard, scheme)
                    held[model] = HeldModel(weights, shard, Executor(self.transport, shard, self.compute_pool))
                    log.info("%s holds %s of %s: %.1f MB %s", self.device_id, weights, model, shard.nbytes() / 1e6,
                             scheme)
                    bar.update(1)
            replaced = bool(to_load) or held.keys() != self.held.keys()
            self.held = held
            self.version = version
            self.ready = True
            if replaced:
                await self._in_loader(return_free_memory)  # the old weights are garbage now

    def scheme(self, model: str) -> str:
        """The weight format this device runs ``model`` in."""
        return resolve_scheme(self.catalog.get(model).quant, self.quant)

    async def _load(self, model: str, weights: DeviceWeights, version: int) -> DeviceShard:
        if self.weights_mode != "stream":
            try:
                return await self._in_loader(self._cut, model, weights)
            except (ModelNotInstalledError, WeightSourceError, WeightIntegrityError) as exc:
                if self.fetcher is None or self.weights_mode == "local":
                    raise
                log.warning("%s: no local weights for %s (%s): streaming them from the leader", self.device_id, model, exc)
        cfg = self.catalog.get(model).config()
        tensors = await self.fetcher.fetch(model, version, shard_units(cfg, weights))  # type: ignore[union-attr]
        return await self._in_loader(build_selective_shard, cfg, weights, tensors)

    async def _in_loader(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.loader, fn, *args)

    def _cut(self, model: str, weights: DeviceWeights) -> DeviceShard:
        """Only ``weights`` from the local files (a full load and cut where the model has no
        selective source)."""
        served = self.catalog.get(model)
        if served.tensors is not None:
            return load_selective_shard(served.config(), weights, served.tensors)
        loaded = self.catalog.load(model)
        # quantization replaces modules in place: never in the catalog's shared copy
        full = loaded.model if self.scheme(model) == "float32" else copy.deepcopy(loaded.model)
        with torch.no_grad():
            return build_shard(full, weights)

    def loading(self) -> dict[str, float]:
        """Percent received of each weight shard streaming in now (empty when none)."""
        fetcher = self.fetcher
        return fetcher.progress() if fetcher is not None else {}  # type: ignore[attr-defined]

    def weight_bytes(self) -> dict[str, int]:
        return {model: h.shard.nbytes() for model, h in self.held.items()}

    def sub_blocks(self) -> tuple[tuple[int, int], ...]:
        """(layer, sub-block) pairs held of decoupled models (what the dashboard draws)."""
        return tuple(sorted({key for h in self.held.values() for key in h.shard.sub_blocks}))

    def executor(self, model: str) -> Executor:
        h = self.held.get(model)
        if h is None:
            raise DetransformerError(f"device {self.device_id} holds no weights for {model!r}")
        return h.executor

    # --- runs --------------------------------------------------------------------------------------

    async def run_coordinator(self, model: str, job: Job) -> JobResult:
        return await self.executor(model).execute(job)

    def start_worker(self, ctl: RunControl) -> None:
        """Run this device's part of a request in the background (non-coordinators)."""
        if ctl.req in self._runs or self.device_id not in ctl.plan.devices:
            return
        task = asyncio.create_task(self._work(ctl), name=f"run-{ctl.req}")
        self._runs[ctl.req] = task
        task.add_done_callback(lambda t, r=ctl.req: self._runs.pop(r, None))

    async def collect_trace(self, req: str, devices: tuple[str, ...], n: int, timeout: float = 2.0) -> list[Span]:
        """The timelines of pass ``n`` of ``req`` from the other devices of its plan (a device
        that does not send one within ``timeout`` is left out)."""
        spans: list[Span] = []
        for d in devices:
            try:
                spans += Timeline.spans_from_bytes(await self.transport.recv(d, (req, trace_step(n)), timeout=timeout))
            except (DetransformerError, ValueError, TypeError) as exc:
                log.warning("no timeline of %s from %s: %s", req, d, exc)
        return spans

    def cancel(self, req: str, reason: str) -> None:
        """Wake every receive ``req`` is waiting on with ``RequestCancelled`` (a device of its plan
        went offline); the run's coordinator then fails over at once."""
        self.transport.cancel(req, reason)

    def end(self, req: str) -> None:
        """The leader finished (or abandoned) ``req``: stop waiting for it and free its caches."""
        self.transport.cancel(req, "request ended")
        for h in self.held.values():
            h.executor.release(req)

    async def _work(self, ctl: RunControl) -> None:
        try:
            ex = self.executor(ctl.model)
        except DetransformerError as exc:
            log.warning("cannot run %s: %s", ctl.req, exc)
            return
        mask = None if ctl.attention_mask is None else torch.tensor(ctl.attention_mask)
        try:
            kinds: list[JobKind] = ["encode"] if ctl.kind == "encode" else ["prefill"] + ["decode"] * (ctl.max_passes - 1)
            for n, kind in enumerate(kinds):
                res = await ex.execute(Job(ctl.req, ctl.plan, kind, None, mask, timeout=ctl.timeout_s, trace=ctl.trace))
                if not res.ok:
                    if res.failure is not None and res.failure.kind != "cancelled":
                        log.warning("run %s failed here: %s", ctl.req, res.failure)
                    return
                if ctl.trace:  # the coordinator merges every device's timeline into the request's
                    await self.transport.send(ctl.plan.coordinator, (ctl.req, trace_step(n)),
                                              Timeline(self.device_id, res.spans).to_bytes())
        except RequestCancelled:
            pass
        finally:
            ex.release(ctl.req)

    async def close(self) -> None:
        for task in list(self._runs.values()):
            task.cancel()
        for task in list(self._runs.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.compute_pool.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)
