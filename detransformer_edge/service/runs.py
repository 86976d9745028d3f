"""Running one request on the devices of a plan, with the retry.

One ``RunControl`` message starts every other device's part of a run (all passes of a
generation included); the leader runs its own part on its host; a ``RunEnd`` frees the run
everywhere. A distributed run that fails (a device timed out, went offline, the transport broke)
marks the devices it points at not-ready — the failure says which, as data — and is retried
ONCE on a new plan over the devices still ready (the leader alone when it holds the whole
model), within the request's time bound; otherwise the caller gets an explicit error. A device
whose presence goes offline (``mark_gone``) cancels the runs that include it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import torch

from detransformer_edge.errors import DetransformerError
from detransformer_edge.model.generation import DecodeLoop
from detransformer_edge.parallel.executor import Failure, Job, JobKind, JobResult
from detransformer_edge.parallel.plan import Plan
from detransformer_edge.parallel.trace import Span
from detransformer_edge.protocol.runs import RunControl, RunEnd, RunKind
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.service.placement import Chosen, Placements, ServiceError

log = logging.getLogger(__name__)

Publish = Callable[..., Awaitable[None]]  # (topic, payload, qos, *, wait_ack=True)
OnPlan = Callable[[str, Plan], None]  # (the model that runs, its plan)


def plan_label(requested: str, model: str, plan: Plan) -> str:
    """The request log's plan: the plan, prefixed by the variant when it is not the model asked
    for (``bert-base: single on dev0 (float32)``)."""
    return plan.describe() if model == requested else f"{model}: {plan.describe()}"


Sign = Callable[[str, int, bytes], bytes]


class CoordinatorHost(Protocol):
    """What the coordinator needs of the model host (a fake one in unit tests)."""

    async def run_coordinator(self, model: str, job: Job) -> JobResult: ...

    async def collect_trace(self, req: str, devices: tuple[str, ...], n: int) -> list[Span]: ...

    def end(self, req: str) -> None: ...

    def cancel(self, req: str, reason: str) -> None: ...


class RunCoordinator:
    def __init__(self, me: str, host: CoordinatorHost, placements: Placements, publish: Publish,
                 run_topics: RunTopics, *, sign: Sign | None = None, term: Callable[[], int] = lambda: 0,
                 request_timeout_s: float = 60.0) -> None:
        self.me = me
        self.host = host
        self.placements = placements
        self.publish = publish
        self.run_topics = run_topics
        self.sign: Sign = sign or (lambda topic, term, payload: payload)
        self.term = term  # the lease term now: devices refuse runs of an older one
        self.request_timeout_s = request_timeout_s
        self._runs: dict[str, tuple[str, ...]] = {}  # distributed run id -> its other devices
        self._gone: dict[str, set[str]] = {}  # run id -> devices that went offline during it
        self.retries = 0  # distributed runs retried after a failure (dashboard, tests)

    # --- membership -------------------------------------------------------------------------------

    def mark_gone(self, device: str) -> None:
        """``device`` went offline: it leaves the ready set and the runs that need it are
        cancelled now (their coordinator would otherwise wait for the whole timeout)."""
        self.placements.mark_not_ready(device)
        for run, devices in list(self._runs.items()):
            if device in devices:
                self._gone.setdefault(run, set()).add(device)
                self.host.cancel(run, f"device {device} went offline")

    def run_devices(self) -> set[str]:
        """Devices that in-flight distributed runs depend on."""
        return {d for devices in self._runs.values() for d in devices}

    # --- one run ----------------------------------------------------------------------------------

    async def start(self, ctl: RunControl) -> None:
        """Tell the plan's other devices to run their part (nothing to send for a single device)."""
        if len(ctl.plan.devices) > 1:
            family = self.run_topics.control
            topic = family.format(ctl.req)
            await self.publish(topic, self.sign(topic, ctl.term, family.encode(ctl)), 1, wait_ack=False)

    async def pass_(self, model: str, run: str, plan: Plan, kind: JobKind, x: torch.Tensor,
                    mask: torch.Tensor | None, timeout: float, spans: list[Span] | None = None,
                    n: int = 0) -> JobResult:
        """The leader's part of pass ``n`` of a run; the run's devices are known so ``mark_gone``
        can cancel it. With ``spans``, the pass is traced on every device and the timelines of
        all of them are appended there."""
        others = tuple(d for d in plan.devices if d != self.me)
        if others:
            self._runs[run] = others
        res = await self.host.run_coordinator(model, Job(run, plan, kind, x, mask, timeout=timeout,
                                                          trace=spans is not None))
        if spans is not None:
            spans += res.spans
            if others and res.ok:
                spans += await self.host.collect_trace(run, others, n)
        return res

    async def end(self, run: str, plan: Plan) -> set[str]:
        """Free the run everywhere; returns the devices that went offline during it."""
        self._runs.pop(run, None)
        gone = self._gone.pop(run, set())
        self.host.end(run)
        if len(plan.devices) > 1:
            try:
                family, term = self.run_topics.end, self.term()
                topic = family.format(run)
                await self.publish(topic, self.sign(topic, term, family.encode(RunEnd(run, term))), 1, wait_ack=False)
            except DetransformerError:
                log.warning("could not publish the end of %s", run)
        return gone

    def blame(self, plan: Plan, failure: Failure | None, gone: set[str]) -> set[str]:
        """The devices a failed run points at: those that went offline during it, or the one a
        receive timed out on. They leave the ready set until their next ``ready`` status."""
        blamed = set(gone)
        if failure is not None and failure.device in plan.devices and failure.device != self.me:
            blamed.add(failure.device)
        for d in blamed:
            self.placements.mark_not_ready(d)
        return blamed

    def control(self, run: str, model: str, kind: RunKind, plan: Plan, timeout: float,
                mask: tuple[tuple[int, ...], ...] | None = None, max_passes: int = 1,
                trace: bool = False) -> RunControl:
        return RunControl(run, model, kind, plan, self.term(), timeout, mask, max_passes, trace)

    def choose(self, model: str, mode: str, seq_len: int, strategy: str,
               spans: list[Span] | None) -> Chosen:
        t0 = time.time()
        chosen = self.placements.choose(model, mode, seq_len, strategy)
        if spans is not None:
            spans.append(Span(self.me, "plan", plan_label(model, chosen.model, chosen.plan), t0, time.time()))
        return chosen

    # --- whole requests ---------------------------------------------------------------------------

    async def encode(self, model: str, input_ids: torch.Tensor, mask: torch.Tensor, req: str,
                     strategy: str = "adaptive", on_plan: OnPlan | None = None,
                     spans: list[Span] | None = None) -> torch.Tensor:
        """The encoder hidden states (B, T, d) of ``model`` or the variant of its family the
        planner chose, computed across the chosen devices; a failed distributed run is re-planned
        and retried once within ``request_timeout_s``. With ``spans`` the request is traced
        (``parallel/trace.py``)."""
        deadline = time.monotonic() + self.request_timeout_s
        seq_len = int(input_ids.shape[1])
        chosen = self.choose(model, "encode", seq_len, strategy, spans)
        run = req
        mask_rows = tuple(tuple(int(v) for v in row) for row in mask.tolist())
        for attempt in (0, 1):
            variant, plan = chosen.model, chosen.plan
            if on_plan is not None:
                on_plan(variant, plan)
            left = deadline - time.monotonic()
            # a distributed first attempt gets half the budget so that a retry still fits
            timeout = max(0.05, left / 2 if attempt == 0 and len(plan.devices) > 1 else left)
            try:
                await self.start(self.control(run, variant, "encode", plan, timeout, mask_rows, trace=spans is not None))
                res = await self.pass_(variant, run, plan, "encode", input_ids, mask, timeout, spans)
            finally:
                gone = await self.end(run, plan)
            if res.ok:
                assert res.output is not None
                return res.output
            if attempt == 1 or len(plan.devices) == 1 or time.monotonic() >= deadline:
                break
            blamed = self.blame(plan, res.failure, gone)
            log.warning("request %s: run on %s failed (%s); retrying without %s", req, plan.describe(), res.failure,
                        ", ".join(sorted(blamed)) or "changes")
            chosen = self.placements.retry_plan(model, "encode", seq_len, strategy, plan, blamed)
            run = f"{req}-r"
            self.retries += 1
        raise ServiceError("internal", f"distributed run failed: {res.failure}")

    def generation(self, model: str, req: str, strategy: str, loop: DecodeLoop,
                   on_plan: OnPlan | None = None, spans: list[Span] | None = None) -> GenerationRun:
        return GenerationRun(self, model, req, strategy, loop, on_plan, spans)


class GenerationRun:
    """The passes of one generation on the devices of a plan: ``async with`` it, then ``step()``
    per token. A failed pass is retried once on a new plan that re-reads everything so far.
    ``requested`` is the model asked for; ``model`` the variant the planner chose (every pass of
    a run uses the same one: the KV caches are its)."""

    def __init__(self, coord: RunCoordinator, model: str, req: str, strategy: str, loop: DecodeLoop,
                 on_plan: OnPlan | None, spans: list[Span] | None) -> None:
        self.coord, self.requested, self.model, self.req, self.strategy, self.loop = (
            coord, model, model, req, strategy, loop)
        self.on_plan: OnPlan = on_plan or (lambda model, plan: None)
        self.spans = spans
        self.run = req
        self.plan: Plan | None = None
        self.passes = 0  # passes of the current run
        self.retried = False

    async def __aenter__(self) -> GenerationRun:
        await self._begin(self.run, self.coord.choose(self.requested, "prefill", self.loop.position, self.strategy,
                                                      self.spans))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.plan is not None:
            await self.coord.end(self.run, self.plan)

    async def _begin(self, run: str, chosen: Chosen) -> None:
        plan = chosen.plan
        self.run, self.model, self.plan, self.passes = run, chosen.model, plan, 0
        self.on_plan(chosen.model, plan)
        passes = self.loop.cfg.max_new_tokens - len(self.loop.tokens)
        await self.coord.start(self.coord.control(run, self.model, "generate", plan, self.coord.request_timeout_s,
                                                  None, max(1, passes), trace=self.spans is not None))

    async def step(self) -> torch.Tensor:
        """The logits of the next position, for ``loop.next_input()``."""
        assert self.plan is not None
        kind, ids = self.loop.next_input()
        res = await self.coord.pass_(self.model, self.run, self.plan, kind, torch.tensor([ids]), None,
                                     self.coord.request_timeout_s, self.spans, self.passes)
        self.passes += 1
        if res.ok:
            assert res.output is not None
            return res.output
        gone = await self.coord.end(self.run, self.plan)
        if self.retried or len(self.plan.devices) == 1:
            self.plan = None
            raise ServiceError("internal", f"distributed run failed: {res.failure}")
        self.retried = True
        blamed = self.coord.blame(self.plan, res.failure, gone)
        log.warning("request %s: generation on %s failed (%s); retrying without %s", self.req,
                    self.plan.describe(), res.failure, ", ".join(sorted(blamed)) or "changes")
        self.loop.restart()  # a new plan has no caches: it re-reads the prompt and the tokens so far
        chosen = self.coord.placements.retry_plan(self.requested, "prefill", self.loop.position, self.strategy,
                                                  self.plan, blamed)
        self.coord.retries += 1
        await self._begin(f"{self.req}-r", chosen)
        return await self.step()


__all__: list[Any] = ["CoordinatorHost", "GenerationRun", "RunCoordinator"]
