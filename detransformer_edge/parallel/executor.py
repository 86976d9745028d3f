"""Runs one device's part of a plan.

Every device of a plan runs :meth:`Executor.execute` with the same :class:`Job` (the
coordinator's carries the token ids); the devices meet only through collectives keyed by
``(request id, step)``, so many requests can be in flight on the same devices. The pass itself
(the hidden state's slices and full forms, the plan's modes, where activations cross the wire)
is ``parallel/forward.py``; here the requests around it: checks, KV caches, deadlines, failures.

Decoder requests keep per-device KV caches between forward passes (prefill, then one pass per
decode step) until :meth:`Executor.release` frees them.

Model compute never runs on the event loop: each device has one compute thread, and the
loop stays free to receive the activations of other devices (and, on the leader, to keep its
lease and answer the home) while a layer group computes. A traced job (``Job.trace``) records
the pass's spans (``parallel/trace.py``) and returns them with its result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.forward import ForwardPass, RequestState
from detransformer_edge.parallel.plan import Plan, PlanError
from detransformer_edge.parallel.shards import DeviceShard
from detransformer_edge.parallel.trace import NULL_TIMELINE, Span, Timeline
from detransformer_edge.transport.base import Transport
from detransformer_edge.transport.errors import (
    RequestCancelled,
    TransportError,
    TransportOverflow,
    TransportTimeout,
    WireError,
)

log = logging.getLogger(__name__)

JobKind = Literal["encode", "prefill", "decode"]


FailureKind = Literal["timeout", "cancelled", "overflow", "transport", "wire", "plan", "internal"]


@dataclass(frozen=True)
class Failure:
    """Why a pass failed on a device, as data: the leader re-plans without ``device`` (the
    device a receive waited for in vain, when known) and workers stay quiet on ``cancelled``."""

    kind: FailureKind
    device: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, TransportTimeout):
            return cls("timeout", exc.src, str(exc))
        if isinstance(exc, RequestCancelled):
            return cls("cancelled", None, str(exc))
        if isinstance(exc, TransportOverflow):
            return cls("overflow", None, str(exc))
        if isinstance(exc, WireError):
            return cls("wire", None, str(exc))
        if isinstance(exc, TransportError):
            return cls("transport", None, str(exc))
        if isinstance(exc, TimeoutError):
            return cls("timeout", None, "the pass's deadline passed")
        if isinstance(exc, PlanError):
            return cls("plan", None, str(exc))
        return cls("internal", None, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Job:
    """One forward pass of one request, as every device of the plan sees it."""

    req: str
    plan: Plan
    kind: JobKind
    input_ids: torch.Tensor | None = None  # (B, T) on the coordinator only
    attention_mask: torch.Tensor | None = None  # (B, T) encoder padding mask, on every device
    last_only: bool = True  # decoder: logits of the last position only
    timeout: float = 30.0  # budget of the whole pass on this device
    trace: bool = False  # record this pass's timeline (JobResult.spans)

    def __post_init__(self) -> None:
        if self.kind not in ("encode", "prefill", "decode"):
            raise PlanError(f"unknown job kind {self.kind!r}")


@dataclass
class JobResult:
    req: str
    device: str
    output: torch.Tensor | None = None  # coordinator: hidden (encode) or logits (decoder)
    failure: Failure | None = None
    seconds: float = 0.0
    bytes_sent: int = 0
    spans: list[Span] = field(default_factory=list)  # traced jobs only

    @property
    def ok(self) -> bool:
        return self.failure is None


T = TypeVar("T")


class Executor:
    def __init__(self, transport: Transport, shard: DeviceShard,
                 compute: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
        self.transport = transport
        self.shard = shard
        self.cfg = shard.cfg
        self.me = transport.device_id
        self._requests: dict[str, RequestState] = {}
        # the device's compute thread (shared by the executors of one device's models)
        self._owns_pool = compute is None
        self.compute_pool = compute or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"compute-{self.me}")

    def close(self) -> None:
        """Stop the compute thread this executor made (a shared one belongs to its host)."""
        if self._owns_pool:
            self.compute_pool.shutdown(wait=False, cancel_futures=True)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run model compute off the event loop, on this device's compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute_pool, fn, *args)

    # --- public API ---------------------------------------------------------------------------

    async def execute(self, job: Job) -> JobResult:
        """Run this device's part; request-level failures come back as an error result."""
        t0 = time.perf_counter()
        sent0 = self.transport.stats.bytes_sent if hasattr(self.transport, "stats") else 0
        failure = None
        out = None
        timeline = Timeline(self.me) if job.trace else NULL_TIMELINE
        try:
            # the receives inside time out at the job's deadline and name the silent device; the
            # outer bound only catches a pass stuck elsewhere, so it waits a little longer
            out = await asyncio.wait_for(self._run(job, timeline), timeout=job.timeout * 1.1 + 0.05)
        except (DetransformerError, TimeoutError) as exc:
            failure = Failure.of(exc)
            self.release(job.req)
            if failure.kind != "cancelled":
                log.warning("request %s failed on %s: %s", job.req, self.me, failure)
        sent = (self.transport.stats.bytes_sent - sent0) if hasattr(self.transport, "stats") else 0
        return JobResult(job.req, self.me, out, failure, time.perf_counter() - t0, sent, timeline.spans)

    def release(self, req: str) -> None:
        """Free the request's caches and anything the transport buffered for it."""
        self._requests.pop(req, None)

    def cache_bytes(self, req: str) -> int:
        state = self._requests.get(req)
        return 0 if state is None else state.nbytes()

    @property
    def active_requests(self) -> tuple[str, ...]:
        return tuple(self._requests)

    # --- one forward pass ---------------------------------------------------------------------

    async def _run(self, job: Job, timeline: Timeline) -> torch.Tensor | None:
        plan = job.plan
        cfg = self.cfg
        plan.check(cfg.n_layers, cfg.nd, cfg.is_decoupled, cfg.n_heads)
        if self.me not in plan.devices:
            raise PlanError(f"device {self.me} is not part of plan {plan.describe()}")
        is_coord = self.me == plan.coordinator
        if is_coord and job.input_ids is None:
            raise PlanError("the coordinator needs the request's input ids")
        decoder = cfg.family == "decoder"
        if decoder != (job.kind != "encode"):
            raise PlanError(f"a {cfg.family} cannot run a {job.kind} job")
        state = self._requests.setdefault(job.req, RequestState()) if decoder else RequestState()
        if job.kind == "prefill" and state.passes:
            raise PlanError(f"request {job.req} was already prefilled; send decode jobs")
        if job.kind == "decode" and not state.passes:
            raise PlanError(f"request {job.req} has no prefill on this device")
        # No grad mode around the whole pass: a mode entered before an ``await`` would leak into
        # whatever else the event loop runs meanwhile, so each synchronous computation below
        # enters it itself (``torch.no_grad`` on the compute methods).
        out = await ForwardPass(self, job, state, timeline).run()
        state.passes += 1
        return out
