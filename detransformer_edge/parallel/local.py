"""Several devices' executors in one process, driven together: the engine's test harness and
the single-process path of benchmarks. Devices still talk only through their transports, so
the same code runs over the in-memory hub or a real MQTT broker."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence

import torch

from detransformer_edge.errors import DetransformerError
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.parallel.executor import Executor, Job, JobKind, JobResult
from detransformer_edge.parallel.plan import Plan, required_weights
from detransformer_edge.parallel.shards import DeviceShard, build_shard
from detransformer_edge.transport.base import Transport

_ids = itertools.count()


def shards_for_plans(model: Encoder | Decoder, plans: Sequence[Plan]) -> dict[str, DeviceShard]:
    """Each device holds the union of what the given plans need of it."""
    from detransformer_edge.parallel.plan import DeviceWeights

    kinds = model.cfg.layer_kinds
    union: dict[str, DeviceWeights] = {}
    for plan in plans:
        for d in plan.devices:
            need = required_weights(plan, kinds, d)
            have = union.get(d, DeviceWeights())
            union[d] = DeviceWeights(
                have.embeddings or need.embeddings,
                tuple(sorted(set(have.sub_blocks) | set(need.sub_blocks))),
                tuple(sorted(set(have.whole_layers) | set(need.whole_layers))),
                tuple(sorted(set(have.tp_shards) | set(need.tp_shards))),
            )
    return {d: build_shard(model, w) for d, w in union.items()}


class LocalCluster:
    """Executors for ``transports`` (one per device), each with its shard of ``model``."""

    def __init__(self, transports: Mapping[str, Transport], shards: Mapping[str, DeviceShard]) -> None:
        missing = set(shards) - set(transports)
        if missing:
            raise DetransformerError(f"no transport for devices {sorted(missing)}")
        self.executors = {d: Executor(transports[d], shards[d]) for d in shards}  # a compute thread each

    async def run(
        self, plan: Plan, kind: JobKind, input_ids: torch.Tensor, req: str,
        attention_mask: torch.Tensor | None = None, last_only: bool = True, timeout: float = 30.0,
    ) -> JobResult:
        """One forward pass on every device of ``plan``; returns the coordinator's result."""
        jobs = [
            Job(req, plan, kind, input_ids if d == plan.coordinator else None, attention_mask, last_only, timeout)
            for d in plan.devices
        ]
        results = await asyncio.gather(*(self.executors[d].execute(j) for d, j in zip(plan.devices, jobs)))
        coord = results[0]
        if coord.ok:
            failed = [r for r in results if not r.ok]
            if failed:
                coord.failure = failed[0].failure
                coord.output = None
        return coord

    async def encode(self, plan: Plan, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     req: str | None = None, timeout: float = 30.0) -> JobResult:
        return await self.run(plan, "encode", input_ids, req or f"enc{next(_ids)}", attention_mask, timeout=timeout)

    async def generate(self, plan: Plan, prompt_ids: torch.Tensor, max_new_tokens: int,
                       req: str | None = None, eos_id: int | None = None, timeout: float = 60.0,
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding: (generated ids (B, n), per-step logits). Frees caches at the end."""
        req = req or f"gen{next(_ids)}"
        steps: list[torch.Tensor] = []
        out: list[torch.Tensor] = []
        try:
            res = await self.run(plan, "prefill", prompt_ids, req, timeout=timeout)
            for _ in range(max_new_tokens):
                if not res.ok:
                    raise DetransformerError(f"request {req} failed: {res.failure}")
                assert res.output is not None  # the coordinator's result: the logits
                logits = res.output[:, -1, :]
                steps.append(logits)
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
                out.append(nxt)
                if len(out) == max_new_tokens or (eos_id is not None and bool((nxt == eos_id).all())):
                    break
                res = await self.run(plan, "decode", nxt, req, timeout=timeout)
        finally:
            self.release(req)
        return torch.cat(out, dim=1), steps

    def close(self) -> None:
        for ex in self.executors.values():
            ex.close()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release(self, req: str) -> None:
        for ex in self.executors.values():
            ex.release(req)
            ex.transport.cancel(req)
