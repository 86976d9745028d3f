"""The model side of one device: the weights the placement gave it, and its part of each run.

An assignment names, per model, the :class:`DeviceWeights` this device must hold. The host loads
the model from the device's local files (in a worker thread, so the agent keeps
answering pings and elections), cuts its shard out and drops the rest, and keeps one
:class:`Executor` per model. Runs from the leader (``RunControl``) are executed here; a
generation is a prefill pass followed by decode passes until the leader says ``end``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.executor import Executor, Job, JobResult
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.parallel.shards import DeviceShard, build_shard
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.runs import RunControl
from detransformer_edge.transport.base import Transport
from detransformer_edge.transport.errors import RequestCancelled

log = logging.getLogger(__name__)


def weights_to_dict(w: DeviceWeights) -> dict:
    return {"embeddings": w.embeddings, "sub_blocks": list(w.sub_blocks),
            "whole_layers": list(w.whole_layers), "tp_shards": [list(s) for s in w.tp_shards]}


def weights_from_dict(d: Mapping) -> DeviceWeights:
    try:
        return DeviceWeights(
            bool(d.get("embeddings", False)),
            tuple(int(j) for j in d.get("sub_blocks", ())),
            tuple(int(i) for i in d.get("whole_layers", ())),
            tuple((int(r), int(k)) for r, k in d.get("tp_shards", ())),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise DetransformerError(f"bad weight assignment {d!r}: {exc}") from None


@dataclass(frozen=True)
class HeldModel:
    weights: DeviceWeights
    shard: DeviceShard
    executor: Executor


class ModelHost:
    def __init__(self, transport: Transport, catalog: Catalog) -> None:
        self.transport = transport
        self.catalog = catalog
        self.device_id = transport.device_id
        self.held: dict[str, HeldModel] = {}
        self.version = 0
        self.ready = False
        self._runs: dict[str, asyncio.Task] = {}
        self._assign_lock = asyncio.Lock()

    # --- weights ---------------------------------------------------------------------------------

    async def assign(self, version: int, models: Mapping[str, DeviceWeights]) -> None:
        """Hold exactly ``models`` (model -> weights); models not named are dropped."""
        async with self._assign_lock:
            self.ready = False
            held: dict[str, HeldModel] = {}
            for model, weights in models.items():
                current = self.held.get(model)
                if current is not None and current.weights == weights:
                    held[model] = current
                    continue
                if weights == DeviceWeights():
                    continue
                shard = await asyncio.to_thread(self._cut, model, weights)
                held[model] = HeldModel(weights, shard, Executor(self.transport, shard))
                log.info("%s holds %s of %s: %.1f MB", self.device_id, weights, model, shard.nbytes() / 1e6)
            self.held = held
            self.version = version
            self.ready = True

    def _cut(self, model: str, weights: DeviceWeights) -> DeviceShard:
        loaded = self.catalog.load(model)
        with torch.inference_mode():
            return build_shard(loaded.model, weights)

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
            if ctl.kind == "encode":
                res = await ex.execute(Job(ctl.req, ctl.plan, "encode", None, mask, timeout=ctl.timeout_s))
                if not res.ok:
                    log.warning("run %s failed here: %s", ctl.req, res.error)
                return
            kind = "prefill"
            for _ in range(ctl.max_passes):
                res = await ex.execute(Job(ctl.req, ctl.plan, kind, None, None, timeout=ctl.timeout_s))
                if not res.ok:
                    if "RequestCancelled" not in (res.error or ""):
                        log.warning("run %s failed here: %s", ctl.req, res.error)
                    return
                kind = "decode"
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
