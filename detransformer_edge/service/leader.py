"""The leader's work: placement on every membership change, and serving requests.

* **Static planning.** When the set of online devices (or a profile) changes, the leader plans
  a placement per served model with itself as coordinator, bumps the placement version and
  publishes each device's assignment. Devices report ``ready`` with that version in their status.
* **Runtime planning.** Each request gets the lowest-predicted-latency plan among the devices
  that are ready, with the leader as coordinator (it tokenised the input and will decode the
  result). Devices of the plan get a ``RunControl``; activations flow between them; the leader
  publishes ``end`` when done so caches are freed everywhere.
* **Backpressure.** At most ``max_inflight`` requests run at once and at most ``max_queue`` wait;
  beyond that a request gets a ``busy`` error at once instead of growing memory.
* **Failures.** A distributed run that fails (a device timed out, went offline, the transport
  broke) marks the devices to blame not-ready and is retried ONCE on a new plan over the devices
  still ready (the leader alone when it holds the whole model), within the request's time bound
  ``request_timeout_s``; otherwise the caller gets an explicit error. A device whose presence
  goes offline (``mark_gone``) cancels the runs that include it at once instead of waiting for
  their timeout. Every request ends in exactly one result or one error.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from detransformer_edge.cluster.signing import CommandSigner
from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.executor import Job
from detransformer_edge.parallel.plan import (
    BASELINES,
    Placement,
    Plan,
    PlanError,
    baseline_plan,
    full_replica_weights,
)
from detransformer_edge.planner.cost import Broker, PlanningError
from detransformer_edge.planner.cost import Request as PlanRequest
from detransformer_edge.planner.profile import DeviceProfile, profile_from_dict
from detransformer_edge.planner.runtime import RuntimePlanner
from detransformer_edge.planner.static import plan_static
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.host import ModelHost, weights_to_dict
from detransformer_edge.service.runs import RunControl

log = logging.getLogger(__name__)

_req_ids = itertools.count()
_SILENT_DEVICE = re.compile(r"from '([A-Za-z0-9_.:-]+)'")  # TransportTimeout: "no message ... from 'dev2' ..."


class ServiceError(DetransformerError):
    """A request the service cannot serve now; ``code`` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RequestRecord:
    """One line of the request log (dashboard, Home Assistant sensor)."""

    id: str
    kind: str
    text: str
    started: float
    plan: str = ""
    latency_ms: float | None = None
    result: str = ""
    error: str | None = None
    client_id: str | None = None  # the caller's id (Hermes query id, request id)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "client_id": self.client_id, "kind": self.kind, "text": self.text[:120], "started": self.started,
                "plan": self.plan, "latency_ms": self.latency_ms, "result": self.result[:200], "error": self.error}


@dataclass
class ModelPlacement:
    placement: Placement
    expected_s: float
    label: str


@dataclass
class ClusterState:
    """What the leader knows: profiles, placement per model, who is ready at which version."""

    version: int = 0
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    models: dict[str, ModelPlacement] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)  # device -> placement version it is ready at

    def ready_devices(self) -> tuple[str, ...]:
        return tuple(d for d, v in self.ready.items() if v == self.version and d in self.profiles)

    def holders(self) -> set[str]:
        out: set[str] = set()
        for rp in self.models.values():
            out |= {d for d, w in rp.placement.holdings.items() if w.sub_blocks or w.whole_layers or w.tp_shards or w.embeddings}
        return out

    def placement_ready(self) -> bool:
        return bool(self.models) and self.holders() <= set(self.ready_devices())


Publish = Callable[[str, str | bytes, int], Awaitable[None]]


class Leader:
    def __init__(
        self,
        me: str,
        host: ModelHost,
        catalog: Catalog,
        publish: Publish,
        run_prefix: str,
        *,
        broker: Broker | None = None,
        max_inflight: int = 4,
        max_queue: int = 32,
        replicate_all: bool = False,
        request_timeout_s: float = 60.0,
        log_size: int = 200,
    ) -> None:
        self.me = me
        self.host = host
        self.catalog = catalog
        self.publish = publish
        self.run_prefix = run_prefix
        self.broker = broker
        self.replicate_all = replicate_all  # every device holds every model: any plan runs (benchmarks)
        self.state = ClusterState()
        self.term = 0
        self.request_timeout_s = request_timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_waiting = max_inflight + max_queue
        self._waiting = 0
        self._ready_event = asyncio.Event()
        self._planners: dict[tuple[str, tuple[str, ...]], RuntimePlanner] = {}
        self.log: collections.deque[RequestRecord] = collections.deque(maxlen=log_size)
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []  # dashboard events
        self.signer: CommandSigner | None = None  # set by the agent when the cluster has a key
        self._runs: dict[str, tuple[str, ...]] = {}  # distributed run id -> its other devices
        self._blamed: dict[str, set[str]] = {}  # run id -> devices that went offline during it
        self.retries = 0  # distributed runs retried after a failure (dashboard, tests)
        # the lease term now (set by the agent): a re-election without a membership change (e.g.
        # after a broker restart) raises the term, and devices refuse runs of an older one
        self.lease_term: Callable[[], int] | None = None

    # --- static planning ---------------------------------------------------------------------------

    def plan_placement(self, profiles: Mapping[str, Mapping[str, Any]], term: int) -> dict[str, dict[str, Any]]:
        """Plan every model for ``profiles`` (device -> planner profile dict); return each device's
        assignment body. Pure apart from updating ``self.state``."""
        devs = {d: profile_from_dict(dict(p), source=f"profile of {d}") for d, p in profiles.items()}
        if self.me not in devs:
            raise ServiceError("internal", f"the leader {self.me} has no profile of its own")
        ordered = [devs[d] for d in sorted(devs)]
        models: dict[str, ModelPlacement] = {}
        version = self.state.version + 1
        for name in self.catalog.names:
            cfg = self.catalog.get(name).config()
            if self.replicate_all:
                holdings = full_replica_weights(self.device_order(devs), cfg.layer_kinds, cfg.nd)
                models[name] = ModelPlacement(Placement(version, holdings), 0.0, "full replicas")
                continue
            sp = plan_static(ordered, cfg, broker=self.broker, coordinator=self.me, version=version)
            models[name] = ModelPlacement(sp.placement, sp.expected_s, sp.label)
        self.term = term
        self.state = ClusterState(version, devs, models, {d: v for d, v in self.state.ready.items() if d in devs})
        self._planners.clear()
        self._ready_event.clear()
        bodies = {
            d: {"models": {name: weights_to_dict(mp.placement.holdings[d]) for name, mp in models.items()
                           if d in mp.placement.holdings}}
            for d in devs
        }
        self._emit("placement", self.placement_summary())
        return bodies

    def device_order(self, devs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The leader first, then the others by id: the device order of baseline plans."""
        names = sorted(devs if devs is not None else self.state.profiles)
        return (self.me, *[d for d in names if d != self.me])

    def mark_ready(self, device: str, version: int) -> None:
        self.state.ready[device] = version
        if self.state.placement_ready():
            self._ready_event.set()
        self._emit("ready", {"device": device, "version": version})

    def mark_gone(self, device: str) -> None:
        """``device`` went offline: drop it from the ready set and cancel the runs that need it now
        (their coordinator would otherwise wait for the whole timeout)."""
        self.state.ready.pop(device, None)
        for run, devices in list(self._runs.items()):
            if device in devices:
                self._blamed.setdefault(run, set()).add(device)
                self.host.transport.cancel(run, f"device {device} went offline")

    def run_devices(self) -> set[str]:
        """Devices that in-flight distributed runs depend on."""
        return {d for devices in self._runs.values() for d in devices}

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def placement_summary(self) -> dict[str, Any]:
        return {
            "version": self.state.version,
            "models": {
                name: {"label": mp.label, "expected_ms": round(mp.expected_s * 1e3, 2),
                       "holdings": {d: weights_to_dict(w) for d, w in mp.placement.holdings.items()}}
                for name, mp in self.state.models.items()
            },
            "ready": sorted(self.state.ready_devices()),
        }

    # --- runtime planning -------------------------------------------------------------------------

    def choose(self, model: str, mode: str, seq_len: int, strategy: str = "adaptive") -> tuple[Plan, float]:
        """The plan for a request: the adaptive planner's best among ready devices with the leader
        as coordinator, or a fixed baseline (``single``, ``pipeline``, ``tp``, ``bp-fixed``)."""
        mp = self.state.models.get(model)
        if mp is None:
            raise ServiceError("busy", "no placement yet: the cluster is still starting")
        ready = tuple(sorted(set(self.state.ready_devices()) | {self.me}))
        cfg = self.catalog.get(model).config()
        if strategy != "adaptive":
            if strategy not in BASELINES:
                raise ServiceError("bad_request", f"unknown plan strategy {strategy!r}; use adaptive or one of {', '.join(BASELINES)}")
            order = tuple(d for d in self.device_order() if d in ready)
            try:
                plan = baseline_plan(strategy, order, cfg.n_layers, cfg.nd)
                plan.check(cfg.n_layers, cfg.nd, cfg.is_decoupled, cfg.n_heads)
            except PlanError as exc:
                raise ServiceError("bad_request", f"plan {strategy!r} does not fit model {model!r}: {exc}") from None
            if not mp.placement.can_run(plan, cfg.layer_kinds):
                raise ServiceError("unsupported", f"the placement cannot run {plan.describe()}; baselines need full replicas")
            return plan, 0.0
        key = (model, ready)
        planner = self._planners.get(key)
        if planner is None:
            profiles = [self.state.profiles[d] for d in sorted(self.state.profiles)]
            planner = self._planners[key] = RuntimePlanner(mp.placement, profiles, cfg, self.broker, available=ready,
                                                           coordinator=self.me)
        try:
            bd = planner.choose(PlanRequest(mode, seq_len))  # type: ignore[arg-type]
        except PlanningError as exc:
            raise ServiceError("busy", f"no plan fits the ready devices: {exc}") from None
        return bd.plan, bd.total_s

    # --- serving ----------------------------------------------------------------------------------

    async def _admit(self) -> None:
        if self._waiting >= self._max_waiting:
            raise ServiceError("busy", f"{self._waiting} requests in flight or queued; try again shortly")
        self._waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._waiting -= 1
            raise

    def _leave(self) -> None:
        self._slots.release()
        self._waiting -= 1

    def _resolve(self, task: str, model: str | None) -> str:
        try:
            return self.catalog.resolve(task, model)
        except DetransformerError as exc:
            raise ServiceError("bad_request", str(exc)) from None

    def _record(self, kind: str, text: str, client_id: str | None = None) -> RequestRecord:
        rec = RequestRecord(f"{kind[0]}{next(_req_ids)}-{uuid.uuid4().hex[:6]}", kind, text, time.time(),
                            client_id=client_id)
        self.log.append(rec)
        return rec

    def _finish(self, rec: RequestRecord, t0: float, result: str = "", error: str | None = None) -> None:
        rec.latency_ms = round((time.perf_counter() - t0) * 1e3, 2)
        rec.result, rec.error = result, error
        self._emit("request", rec.to_dict())

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, data)
            except Exception:  # a broken dashboard client must not break serving
                log.exception("listener failed")

    def current_term(self) -> int:
        return max(self.term, self.lease_term() if self.lease_term is not None else 0)

    async def _start_workers(self, ctl: RunControl) -> None:
        if len(ctl.plan.devices) > 1:
            topic, payload = f"{self.run_prefix}/{ctl.req}/ctl", ctl.to_json()
            if self.signer is not None:  # cluster/signing.py: devices refuse unsigned plans
                payload = self.signer.sign(topic, ctl.term, payload)
            await self.publish(topic, payload, 1)

    def _blame(self, plan: Plan, error: str | None, offline: set[str]) -> set[str]:
        """The devices a failed run points at: those that went offline during it, or the one a
        receive timed out on. They leave the ready set until their next ``ready`` status."""
        blamed = set(offline)
        blamed |= {d for d in _SILENT_DEVICE.findall(error or "") if d in plan.devices and d != self.me}
        for d in blamed:
            self.state.ready.pop(d, None)
        return blamed

    def _retry_plan(self, model: str, mode: str, seq_len: int, strategy: str, failed: Plan,
                    blamed: set[str]) -> Plan:
        """A new plan for a failed run: the planner's choice over the devices still ready (no
        blamed one), else the leader alone when its weights hold the whole model."""
        try:
            plan, _ = self.choose(model, mode, seq_len, strategy)
            if not blamed & set(plan.devices) and (blamed or plan.devices != failed.devices):
                return plan
        except ServiceError:
            pass
        cfg = self.catalog.get(model).config()
        mp = self.state.models.get(model)
        single = baseline_plan("single", (self.me,), cfg.n_layers, cfg.nd)
        if mp is None or not mp.placement.can_run(single, cfg.layer_kinds):
            raise ServiceError("busy", f"a device of the plan failed ({', '.join(sorted(blamed)) or 'no answer'}) "
                                              f"and the remaining ready devices cannot run {model!r}; try again shortly")
        return single

    async def _run_pass(self, model: str, run: str, plan: Plan, kind: str, x: torch.Tensor,
                        mask: torch.Tensor | None, timeout: float) -> Any:
        """One coordinator pass; the run's devices are known so ``mark_gone`` can cancel it."""
        others = tuple(d for d in plan.devices if d != self.me)
        if others:
            self._runs[run] = others
        return await self.host.run_coordinator(model, Job(run, plan, kind, x, mask, timeout=timeout))  # type: ignore[arg-type]

    async def _end(self, req: str, plan: Plan) -> set[str]:
        """Free the run everywhere; returns the devices that went offline during it."""
        self._runs.pop(req, None)
        offline = self._blamed.pop(req, set())
        self.host.end(req)
        if len(plan.devices) > 1:
            try:
                await self.publish(f"{self.run_prefix}/{req}/end", b"", 1)
            except DetransformerError:
                log.warning("could not publish the end of %s", req)
        return offline

    def _attempt_timeout(self, plan: Plan, deadline: float) -> float:
        """A distributed first attempt gets half the request's budget so a retry still fits."""
        left = deadline - time.monotonic()
        return max(0.05, left / 2 if len(plan.devices) > 1 else left)

    async def encode(self, model: str, input_ids: torch.Tensor, mask: torch.Tensor, rec: RequestRecord,
                     strategy: str = "adaptive") -> torch.Tensor:
        """The model's encoder hidden states (B, T, d), computed across the chosen devices; a
        failed distributed run is re-planned and retried once within ``request_timeout_s``."""
        deadline = time.monotonic() + self.request_timeout_s
        seq_len = int(input_ids.shape[1])
        plan, predicted = self.choose(model, "encode", seq_len, strategy)
        run = rec.id
        mask_rows = tuple(tuple(int(v) for v in row) for row in mask.tolist())
        for attempt in (0, 1):
            rec.plan = plan.describe()
            timeout = self._attempt_timeout(plan, deadline) if attempt == 0 else max(0.05, deadline - time.monotonic())
            ctl = RunControl(run, model, "encode", plan, self.current_term(), timeout, mask_rows)
            try:
                await self._start_workers(ctl)
                res = await self._run_pass(model, run, plan, "encode", input_ids, mask, timeout)
            finally:
                offline = await self._end(run, plan)
            if res.ok:
                return res.output
            if attempt == 1 or len(plan.devices) == 1 or time.monotonic() >= deadline:
                break
            blamed = self._blame(plan, res.error, offline)
            log.warning("request %s: run on %s failed (%s); retrying without %s", rec.id, plan.describe(), res.error,
                        ", ".join(sorted(blamed)) or "changes")
            plan = self._retry_plan(model, "encode", seq_len, strategy, plan, blamed)
            run = f"{rec.id}-r"
            self.retries += 1
        raise ServiceError("internal", f"distributed run failed: {res.error}")

    async def embed(self, texts: list[str], model: str | None = None, strategy: str = "adaptive",
                    client_id: str | None = None) -> tuple[list[list[float]], RequestRecord]:
        from detransformer_edge.model.encoder import mean_pool

        model = self._resolve("embed", model)
        served = self.catalog.get(model)
        tools = self.catalog.tools(model)
        rec = self._record("embed", " | ".join(texts), client_id)
        t0 = time.perf_counter()
        await self._admit()
        try:
            rows = [tools.tokenizer.encode(t) for t in texts]
            too_long = max(len(r) for r in rows)
            if too_long > served.max_tokens:
                raise ServiceError("bad_request", f"input is {too_long} tokens; the embedding model reads at most {served.max_tokens}")
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            hidden = await self.encode(model, ids, mask, rec, strategy)
            vectors = mean_pool(hidden, mask).tolist()
            self._finish(rec, t0, f"{len(vectors)} x {len(vectors[0])}")
            return vectors, rec
        except DetransformerError as exc:
            self._finish(rec, t0, error=str(exc))
            raise
        finally:
            self._leave()

    async def intent(self, text: str, model: str | None = None, client_id: str | None = None,
                     ) -> tuple[Any, RequestRecord]:
        model = self._resolve("intent", model)
        tools = self.catalog.tools(model)
        head = tools.intent_head
        rec = self._record("intent", text, client_id)
        t0 = time.perf_counter()
        await self._admit()
        try:
            served = self.catalog.get(model)
            prepared = head.prepare(text)
            if prepared.input_ids.shape[1] > served.max_tokens:
                raise ServiceError("bad_request", f"utterance is {prepared.input_ids.shape[1]} tokens; at most {served.max_tokens}")
            hidden = await self.encode(model, prepared.input_ids, prepared.attention_mask, rec)
            result = head.decode(text, hidden, prepared)
            self._finish(rec, t0, f"{result.intent or 'not recognised'} ({result.confidence:.2f})")
            return result, rec
        except DetransformerError as exc:
            self._finish(rec, t0, error=str(exc))
            raise
        finally:
            self._leave()

    async def generate(
        self, prompt: str, max_new_tokens: int = 32, on_text: Callable[[str], Awaitable[None]] | None = None,
        chat: bool = True, model: str | None = None, strategy: str = "adaptive", client_id: str | None = None,
    ) -> tuple[str, RequestRecord, dict[str, float]]:
        """Greedy generation; ``on_text`` receives decoded pieces as they arrive."""
        from detransformer_edge.model.generation import build_prompt
        from detransformer_edge.model.tokenizer import IncrementalDecoder

        model = self._resolve("generate", model)
        served = self.catalog.get(model)
        tools = self.catalog.tools(model)
        tok = tools.tokenizer
        rec = self._record("generate", prompt, client_id)
        t0 = time.perf_counter()
        if not 1 <= max_new_tokens <= 512:
            raise ServiceError("bad_request", "max_new_tokens must be between 1 and 512")
        await self._admit()
        plan: Plan | None = None
        run = rec.id
        try:
            ids = build_prompt(tok, prompt, tools.chat_template if chat else None)
            if len(ids) + max_new_tokens > served.max_tokens:
                raise ServiceError("bad_request", f"prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds {served.max_tokens}")
            plan, _ = self.choose(model, "prefill", len(ids), strategy)
            rec.plan = plan.describe()
            ctl = RunControl(run, model, "generate", plan, self.current_term(), self.request_timeout_s, None, max_new_tokens)
            await self._start_workers(ctl)
            decoder = IncrementalDecoder(tok)
            out_ids: list[int] = []
            pieces: list[str] = []
            kind, x = "prefill", torch.tensor([ids])
            first_token_s = None
            eos = getattr(tok, "eos_id", None)
            retried = False
            while len(out_ids) < max_new_tokens:
                res = await self._run_pass(model, run, plan, kind, x, None, self.request_timeout_s)
                if not res.ok:
                    # retry once: a new run on a new plan re-reads the prompt and the tokens so far
                    offline = await self._end(run, plan)
                    if retried or len(plan.devices) == 1:
                        raise ServiceError("internal", f"distributed run failed: {res.error}")
                    retried = True
                    blamed = self._blame(plan, res.error, offline)
                    log.warning("request %s: generation on %s failed (%s); retrying without %s", rec.id,
                                plan.describe(), res.error, ", ".join(sorted(blamed)) or "changes")
                    seen = ids + out_ids
                    plan = self._retry_plan(model, "prefill", len(seen), strategy, plan, blamed)
                    run, rec.plan = f"{rec.id}-r", plan.describe()
                    self.retries += 1
                    await self._start_workers(RunControl(run, model, "generate", plan, self.current_term(), self.request_timeout_s,
                                                         None, max_new_tokens - len(out_ids)))
                    kind, x = "prefill", torch.tensor([seen])
                    continue
                nxt = int(res.output[0, -1].argmax())
                if first_token_s is None:
                    first_token_s = time.perf_counter() - t0
                if eos is not None and nxt == eos:
                    break
                out_ids.append(nxt)
                piece = decoder.push(nxt)
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        await on_text(piece)
                kind, x = "decode", torch.tensor([[nxt]])
            tail = decoder.flush()
            if tail:
                pieces.append(tail)
                if on_text is not None:
                    await on_text(tail)
            text_out = "".join(pieces)
            total = time.perf_counter() - t0
            stats = {"tokens": len(out_ids), "seconds": round(total, 3),
                     "ttft_ms": round((first_token_s or total) * 1e3, 1),
                     "tokens_per_s": round(len(out_ids) / total, 2) if total > 0 else 0.0}
            self._finish(rec, t0, text_out)
            return text_out, rec, stats
        except DetransformerError as exc:
            self._finish(rec, t0, error=str(exc))
            raise
        finally:
            if plan is not None:
                await self._end(run, plan)
            self._leave()
