"""One forward pass of one job on one device: the hidden state's forms and the plan's modes.

The hidden state of a block-parallel forward pass is, at any moment, in one of two forms:

* *slices* — every owner holds the slices of the sub-blocks it owns (after a decoupled layer);
* *full* — a set of devices hold the whole hidden state (after a coupled layer, or the
  embedding on the coordinator).

Each layer asks for the form it needs and the pass moves data only when the form changes:
decoupled layers need slices, a coupled layer needs the full state on the devices that compute it
(every owner for ``allgather``, one device for ``gather``, the TP group for ``tp``). So
consecutive decoupled layers never communicate: that is block parallelism.

Activations cross the wire exactly where the hidden state changes form between devices
(``plan.wire_crossings``): into the first layer a device computes on state it does not hold,
into each coupled layer, and out to the coordinator. Layer compute runs on the device's compute
thread (``Executor.compute``); the pass itself, and every collective, on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch

from detransformer_edge.model.encoder import padding_mask
from detransformer_edge.model.layers import KVCache
from detransformer_edge.parallel import collectives as coll
from detransformer_edge.parallel.trace import Timeline

if TYPE_CHECKING:
    from detransformer_edge.parallel.executor import Executor, Job

T = TypeVar("T")


Rope = tuple[torch.Tensor, torch.Tensor]
CacheKey = tuple[str | int, ...]  # ("c", layer), ("s", layer, j), ("g", layer), ("t", layer, rank, k)
LayerArg = torch.Tensor | Rope | None  # what a layer takes after x: the padding mask or the rope


def _torch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Collectives return numpy when this device contributed nothing; the executor wants torch."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(x if x.flags.writeable else x.copy())


@dataclass
class RequestState:
    """Per-request state of a decoder on one device: KV caches and the position reached."""

    caches: dict[CacheKey, KVCache] = field(default_factory=dict)
    pos: int = 0
    passes: int = 0

    def cache(self, key: CacheKey) -> KVCache:
        c = self.caches.get(key)
        if c is None:
            c = self.caches[key] = KVCache()
        return c

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())


class _Hidden:
    """The hidden state on this device: its own slices, or the full tensor, or nothing."""

    def __init__(self) -> None:
        self.slices: dict[int, torch.Tensor] = {}
        self.full: torch.Tensor | None = None
        self.full_on: tuple[str, ...] = ()  # devices that hold the full state (when in full form)
        self.form: Literal["slices", "full"] = "full"


class ForwardPass:
    """One forward pass of one job on this device (kept separate so state never leaks)."""

    def __init__(self, ex: Executor, job: Job, state: RequestState, timeline: Timeline) -> None:
        self.ex, self.job, self.state, self.tl = ex, job, state, timeline
        self.plan, self.cfg, self.shard, self.me = job.plan, ex.cfg, ex.shard, ex.me
        self.t = ex.transport
        self.wire = job.plan.wire
        self.prefix = f"p{state.passes}"
        self.deadline = time.monotonic() + job.timeout
        self.mask = padding_mask(job.attention_mask) if job.attention_mask is not None else None
        self.rope: Rope | None = None
        self.seq_len: int | None = None

    def left(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def key(self, *parts: object) -> str:
        return ".".join([self.prefix, *map(str, parts)])

    # --- driver --------------------------------------------------------------------------------

    async def compute(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """Model compute on the device's compute thread, as one ``compute`` span."""
        with self.tl.span("compute", name):
            return await self.ex.compute(fn, *args)

    def _layers(self, start: int, end: int, h: torch.Tensor) -> torch.Tensor:
        for i in range(start, end):
            h = self._layer_full(i, h)
        return h

    def _sub_blocks(self, layers: range, slices: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """This device's sub-blocks of consecutive decoupled layers: no communication between them."""
        for i in layers:
            slices = self._sub_layer(i, slices)
        return slices

    async def run(self) -> torch.Tensor | None:
        plan, job = self.plan, self.job
        h = None
        if self.me == plan.coordinator:
            h = await self.compute("embed", self._embed, job.input_ids)
        out: torch.Tensor | None
        if plan.mode == "single":
            assert h is not None
            out = await self.compute(f"L0-{self.cfg.n_layers - 1}", self._layers, 0, self.cfg.n_layers, h)
        elif plan.mode == "pipeline":
            out = await self._pipeline(h)
        elif plan.mode == "tp":
            out = await self._tensor_parallel(h)
        else:
            out = await self._block(h)
        if self.cfg.family == "decoder":
            # Every device saw the pass's length through the tensors it computed on.
            self.state.pos += self.seq_len or 0
        if self.me != plan.coordinator:
            return None
        assert out is not None
        if self.cfg.family == "decoder":
            assert self.shard.head is not None
            if job.last_only:
                out = out[:, -1:, :]
            return await self.compute("head", self._head, out)
        return out

    @torch.no_grad()
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        assert self.shard.head is not None
        logits: torch.Tensor = self.shard.head(h)
        return logits

    @torch.no_grad()
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.embed is None:
            raise self.shard.need("the embeddings (coordinator)")
        h: torch.Tensor = self.shard.embed(ids)
        return h

    # --- local layer computations --------------------------------------------------------------

    def _layer_args(self, x: torch.Tensor) -> tuple[LayerArg]:
        if self.cfg.family == "encoder":
            return (self.mask,)
        if self.rope is None:
            # Workers learn the pass's length from the first activation they receive, so a
            # decode step costs no extra control message.
            assert self.shard.rope is not None
            self.seq_len = x.shape[1]
            self.rope = self.shard.rope(torch.arange(self.state.pos, self.state.pos + self.seq_len))
        return (self.rope,)

    def _cache(self, *key: str | int) -> KVCache | None:
        return self.state.cache(key) if self.cfg.family == "decoder" else None

    @torch.no_grad()
    def _layer_full(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i on the full hidden state, with whole weights held here."""
        if self.cfg.layer_kinds[i] == "decoupled":
            if self.shard.groups.get(i, ((),))[0] == tuple(range(self.cfg.nd)):
                return self._sub_group(i, h)
            return torch.cat([self._sub_block(i, j, h[..., self.cfg.sub_slice(j)]) for j in range(self.cfg.nd)], -1)
        layer = self.shard.coupled.get(i)  # a coupled layer held whole
        if layer is None:
            raise self.shard.need(f"layer {i}")
        out: torch.Tensor = layer(h, *self._layer_args(h), cache=self._cache("c", i))
        return out

    @torch.no_grad()
    def _sub_block(self, i: int, j: int, x: torch.Tensor) -> torch.Tensor:
        block = self.shard.sub_blocks.get((i, j))
        if block is None:
            raise self.shard.need(f"sub-block {j} of layer {i}")
        out: torch.Tensor = block(x, *self._layer_args(x), cache=self._cache("s", i, j))
        return out

    @torch.no_grad()
    def _sub_group(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """This device's sub-blocks of layer i as one batched computation (``shard.groups``):
        x holds their slices side by side, in index order."""
        _, group = self.shard.groups[i]
        return group(x, *self._layer_args(x), cache=self._cache("g", i))

    def _sub_layer(self, i: int, slices: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Layer i on the slices this device owns: grouped when it holds exactly these."""
        js = self.shard.groups.get(i, ((),))[0]
        if js and set(js) == set(slices):
            outs = torch.split(self._sub_group(i, torch.cat([slices[j] for j in js], -1)), self.cfg.d_sub, dim=-1)
            return dict(zip(js, outs))
        return {j: self._sub_block(i, j, x) for j, x in slices.items()}

    async def _tp_layer(self, i: int, h: torch.Tensor, group: tuple[str, ...]) -> torch.Tensor:
        rank, k = group.index(self.me), len(group)
        shard = self.shard.tp.get((i, rank, k))
        if shard is None:
            raise self.shard.need(f"tensor-parallel shard {rank}/{k} of layer {i}")

        async def reduce(x: torch.Tensor, what: str) -> torch.Tensor:
            summed: torch.Tensor = await coll.all_reduce(
                self.t, list(group), self.job.req, self.key("L", i, what), x, self.wire, timeout=self.left()
            , timeline=self.tl)
            return summed

        out: torch.Tensor
        if self.cfg.family == "encoder":
            out = await shard(h, reduce, mask=self.mask)
            return out
        (rope,) = self._layer_args(h)
        out = await shard(h, reduce, rope=rope, cache=self._cache("t", i, rank, k))
        return out

    # --- modes ---------------------------------------------------------------------------------

    async def _pipeline(self, h: torch.Tensor | None) -> torch.Tensor | None:
        stages = self.plan.stages
        idx = self.plan.devices.index(self.me)
        stage = stages[idx]
        if idx > 0:
            h = await coll.recv(self.t, stages[idx - 1].device, self.job.req, self.key("pp", idx), timeout=self.left(), like=torch.empty(0), timeline=self.tl)
        assert h is not None
        h = await self.compute(f"L{stage.start}-{stage.end - 1}", self._layers, stage.start, stage.end, h)
        if idx + 1 < len(stages):
            await coll.send(self.t, stages[idx + 1].device, self.job.req, self.key("pp", idx + 1), h, self.wire, timeline=self.tl)
            h = None
        if len(stages) > 1 and idx == len(stages) - 1:
            await coll.send(self.t, self.plan.coordinator, self.job.req, self.key("pp", "out"), h, self.wire, timeline=self.tl)
            return None
        if self.me == self.plan.coordinator and len(stages) > 1:
            out: torch.Tensor = await coll.recv(self.t, stages[-1].device, self.job.req, self.key("pp", "out"), timeout=self.left(), like=torch.empty(0), timeline=self.tl)
            return out
        return h

    async def _tensor_parallel(self, h: torch.Tensor | None) -> torch.Tensor:
        group = self.plan.devices
        h = _torch(await coll.broadcast(
            self.t, list(group), self.job.req, self.key("tp", "in"), h, self.wire,
            root=self.plan.coordinator, timeout=self.left(), timeline=self.tl,
        ))
        for i in range(self.cfg.n_layers):
            h = await self._tp_layer(i, h, group)
        return h

    async def _block(self, h: torch.Tensor | None) -> torch.Tensor | None:
        plan, cfg = self.plan, self.cfg
        hs = _Hidden()
        hs.full, hs.full_on, hs.form = h, (plan.coordinator,), "full"
        kinds = cfg.layer_kinds
        for i, kind in enumerate(kinds):
            if kind == "decoupled":
                if i > 0 and kinds[i - 1] == "decoupled":
                    continue  # computed with the run of decoupled layers it belongs to
                end = next((k for k in range(i, len(kinds)) if kinds[k] != "decoupled"), len(kinds))
                await self._to_slices(hs, i)
                if hs.slices:
                    js = ",".join(map(str, sorted(hs.slices)))
                    hs.slices = await self.compute(f"L{i}-{end - 1} sub-blocks {js}", self._sub_blocks,
                                                   range(i, end), hs.slices)
                continue
            if plan.coupled == "allgather":
                targets = plan.owners
            elif plan.coupled == "gather":
                targets = plan.coupled_devices
            else:
                targets = plan.coupled_devices
            await self._to_full(hs, targets, i)
            if self.me in targets:
                assert hs.full is not None
                if plan.coupled == "tp":
                    hs.full = await self._tp_layer(i, hs.full, plan.coupled_devices)
                else:
                    hs.full = await self.compute(f"L{i}", self._layer_full, i, hs.full)
        await self._to_full(hs, (plan.coordinator,), "out")
        return hs.full if self.me == plan.coordinator else None

    async def _to_slices(self, hs: _Hidden, i: int) -> None:
        """Full form on ``hs.full_on`` -> every owner holds its own slices."""
        if hs.form == "slices":
            return
        plan, cfg = self.plan, self.cfg
        src = plan.coordinator if plan.coordinator in hs.full_on else hs.full_on[0]
        mine = plan.sub_blocks_of(self.me)
        if self.me in hs.full_on:
            assert hs.full is not None
            full = hs.full
            hs.slices = {j: full[..., cfg.sub_slice(j)] for j in mine}
            if self.me == src:
                for dst in plan.owners:
                    if dst not in hs.full_on:
                        chunk = torch.cat([full[..., cfg.sub_slice(j)] for j in plan.sub_blocks_of(dst)], -1)
                        await coll.send(self.t, dst, self.job.req, self.key("sc", i, dst), chunk, self.wire, timeline=self.tl)
        elif mine:
            chunk = await coll.recv(self.t, src, self.job.req, self.key("sc", i, self.me), timeout=self.left(), like=torch.empty(0), timeline=self.tl)
            hs.slices = dict(zip(mine, chunk.split(cfg.d_sub, dim=-1)))
        hs.full, hs.form = None, "slices"

    async def _to_full(self, hs: _Hidden, targets: tuple[str, ...], tag: object) -> None:
        """Bring the full hidden state to every device of ``targets``."""
        plan, cfg = self.plan, self.cfg
        req = self.job.req
        if hs.form == "full":
            missing = tuple(d for d in targets if d not in hs.full_on)
            if missing:
                src = hs.full_on[0]
                group = [src, *missing]
                if self.me in group:
                    hs.full = _torch(await coll.broadcast(
                        self.t, group, req, self.key("bc", tag), hs.full if self.me == src else None,
                        self.wire, root=src, timeout=self.left(), timeline=self.tl,
                    ))
                hs.full_on = hs.full_on + missing
            return
        owners = plan.owners
        mine = sorted(hs.slices)
        chunk = torch.cat([hs.slices[j] for j in mine], -1) if mine else None
        if tuple(targets) == owners:
            # The paper's BP+AllGather: one fan-out publish per owner.
            cat = await coll.all_gather(self.t, list(owners), req, self.key("ag", tag), chunk, self.wire, timeout=self.left(), timeline=self.tl)
            pieces = cat.split(cfg.d_sub, dim=-1)
            order = [j for d in owners for j in plan.sub_blocks_of(d)]
            by_j: dict[int, torch.Tensor] = dict(zip(order, pieces))
            hs.full = torch.cat([by_j[j] for j in range(cfg.nd)], -1)
        else:
            # Each owner publishes its chunk once to the targets (gather: one target); all
            # publish first, then receive, so no owner waits on another before sending.
            received: dict[str, torch.Tensor] = {}
            if chunk is not None:
                group = [self.me, *[d for d in targets if d != self.me]]
                received[self.me] = _torch(await coll.broadcast(
                    self.t, group, req, self.key("bc", tag, self.me), chunk, self.wire,
                    root=self.me, timeout=self.left(), timeline=self.tl,
                ))
            if self.me in targets:
                for owner in owners:
                    if owner == self.me:
                        continue
                    group = [owner, *[d for d in targets if d != owner]]
                    received[owner] = _torch(await coll.broadcast(
                        self.t, group, req, self.key("bc", tag, owner), None, self.wire,
                        root=owner, timeout=self.left(), timeline=self.tl,
                    ))
            if self.me in targets:
                by_j = {}
                for owner in owners:
                    js = plan.sub_blocks_of(owner)
                    by_j.update(zip(js, torch.split(received[owner], cfg.d_sub, dim=-1)))
                hs.full = torch.cat([by_j[j] for j in range(cfg.nd)], -1)
            else:
                hs.full = None
        hs.slices, hs.form, hs.full_on = {}, "full", tuple(targets)
