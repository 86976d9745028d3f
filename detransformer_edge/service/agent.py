"""One device's agent: the cluster shell (presence, profile, election, Home Assistant) plus the
model host, the leader's serving logic and the voice-assistant API, wired together.

    async with HomeAgent(config, profile, catalog, broker=(host, port)) as agent:
        await agent.wait_stopped()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiomqtt

from detransformer_edge import __version__
from detransformer_edge.cluster.agent_io import (
    AgentNotConnectedError,
    ClusterAgent,
    MembershipView,
    WorkState,
)
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.cluster.signing import SignatureError
from detransformer_edge.cluster.topics import (
    Assignment,
    ProfileRecord,
    ProtocolError,
    Reply,
    Request,
)
from detransformer_edge.errors import DetransformerError
from detransformer_edge.integrations import hermes
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.host import ModelHost, weights_from_dict
from detransformer_edge.service.leader import Leader, ServiceError
from detransformer_edge.service.runs import RunControl, parse_run_topic
from detransformer_edge.service.weight_stream import (
    WeightFetcher,
    WeightServer,
    chunk_topic,
    manifest_topic,
    want_device,
    want_filter,
)
from detransformer_edge.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

HERMES_QUERY = "hermes/nlu/query"
HERMES_NOT_RECOGNIZED = "hermes/nlu/intentNotRecognized"
HERMES_ERROR = "hermes/error/nlu"


class HomeAgent:
    def __init__(
        self,
        config: AgentConfig,
        profile: DeviceProfile,
        catalog: Catalog,
        *,
        broker: tuple[str, int],
        intent_threshold: float = 0.0,
        replan_delay_s: float = 0.5,
        replicate_all: bool = False,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.broker = broker
        self.intent_threshold = intent_threshold
        self.replan_delay_s = replan_delay_s
        self.id = config.id
        user, password = config.broker.credentials()
        record = ProfileRecord.from_device_profile(config.id, profile, name=config.name or config.id,
                                                   device_class=profile.name, version=__version__)
        self.cluster = ClusterAgent(
            config, record, broker=broker, sw_version=__version__,
            on_membership_change=self._on_membership, on_become_leader=self._on_become_leader,
            on_lose_leadership=self._on_lose_leadership, on_request=self._on_request,
            on_assignment=self._on_assignment,
        )
        prefix = self.cluster.topics.prefix
        self.transport = MqttTransport(config.id, broker[0], broker[1], prefix=prefix, username=user, password=password,
                                       tls_context=self.cluster.tls_context())
        # weights: the leader streams shard units to devices without local model files
        from detransformer_edge.weights.sources import cache_dir

        weights_cache = config.weights_cache or (cache_dir() or Path.home() / ".cache" / "detransformer-edge") / "weights"
        self.weight_server = WeightServer(catalog, self._publish, prefix, signer=self.cluster.signer,
                                          term=lambda: self.cluster.lease.term if self.cluster.lease is not None else 1)
        self.weight_fetcher = WeightFetcher(config.id, catalog, self._publish, prefix, weights_cache / config.cluster / config.id,
                                            verifier=self.cluster.verifier)
        self.host = ModelHost(self.transport, catalog, self.weight_fetcher, config.weights,  # type: ignore[arg-type]
                              quant=profile.quant)
        self._assign_task: asyncio.Task | None = None
        self.leader = Leader(config.id, self.host, catalog, self._publish, f"{prefix}/run", replicate_all=replicate_all)
        self.leader.signer = self.cluster.signer
        self.leader.lease_term = lambda: self.cluster.lease.term if self.cluster.lease is not None else 0
        self._replan_task: asyncio.Task | None = None
        # a device whose status stops arriving is treated as gone before the broker's LWT (which
        # Mosquitto 2.0 fires up to ~6 s after 1.5 x keepalive): device -> last status (monotonic)
        self._heard: dict[str, float] = {}
        self._silent: set[str] = set()
        self.silence_s = max(1.5 * config.broker.keepalive_s, 2.5 * config.status_interval_s)
        self._tasks: set[asyncio.Task] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self.started = time.time()
        self.cluster.subscribe(f"{prefix}/run/+/ctl", self._on_run_message, qos=1)
        self.cluster.subscribe(f"{prefix}/run/+/end", self._on_run_message, qos=1)
        self.cluster.subscribe(self.cluster.topics.status.filter, self._on_status, qos=0)
        self.cluster.subscribe(HERMES_QUERY, self._on_hermes_query, qos=1)
        self.cluster.subscribe(want_filter(prefix), self._on_weights_want, qos=1)
        self.cluster.subscribe(chunk_topic(prefix, config.id), self._on_weights_chunk, qos=1)
        self.cluster.subscribe(manifest_topic(prefix, config.id), self._on_weights_manifest, qos=1)
        self.leader.listeners.append(self._publish_log)

    # --- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> HomeAgent:
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(self.transport)
        await self._stack.enter_async_context(self.cluster)
        self._spawn(self._watch_silence(), "silence")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.weight_server.close()
        await self.host.close()
        if self._stack is not None:
            await self._stack.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _publish(self, topic: str, payload: str | bytes, qos: int) -> None:
        try:
            await self.cluster.publish(topic, payload, qos=qos)
        except (AgentNotConnectedError, aiomqtt.MqttError) as exc:
            raise ServiceError("internal", f"broker unavailable: {exc}") from None

    @property
    def role(self) -> str:
        return self.cluster.role

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-ready data (no secrets)."""
        view = self.cluster.membership
        lease = self.cluster.lease
        devices = []
        for dev_id in sorted(view.members):
            m = view.members[dev_id]
            p, st = m.profile, m.status
            devices.append({
                "id": dev_id,
                "online": m.online,
                "role": "leader" if lease is not None and lease.id == dev_id and m.online else ("follower" if m.online else "offline"),
                "profile": None if p is None else {"name": p.name, "device_class": p.device_class, "gflops": p.gflops,
                                                   "mem_mb": p.mem_mb, "link_mbit": p.link_mbit, "score": p.score},
                "status": None if st is None else st.to_dict(),
            })
        leading = self.cluster.is_leader
        return {
            "cluster": self.config.cluster,
            "me": self.id,
            "role": self.role,
            "leader": None if lease is None else {"id": lease.id, "term": lease.term},
            "devices": devices,
            "placement": self.leader.placement_summary() if leading else None,
            "requests": [r.to_dict() for r in self.leader.log] if leading else [],
            "version": __version__,
            "weights_loading": self.host.loading(),
        }

    def _publish_log(self, kind: str, data: dict[str, Any]) -> None:
        """Finished requests go to ``P/log`` (QoS 0) so any dashboard or client can follow them."""
        if kind != "request":
            return

        async def send() -> None:
            with contextlib.suppress(ServiceError):
                await self._publish(f"{self.cluster.topics.prefix}/log", json.dumps(data), 0)

        self._spawn(send(), "log")

    # --- membership, placement, readiness -------------------------------------------------------

    def _on_become_leader(self, lease: Any) -> None:
        self._schedule_replan()

    def _on_lose_leadership(self, lease: Any) -> None:
        if self._replan_task is not None:
            self._replan_task.cancel()

    def _on_membership(self, view: MembershipView) -> None:
        # a device gone offline leaves the ready set now, and the runs that need it are cancelled
        for dev in (set(self.leader.state.ready) | self.leader.run_devices()) - set(view.online):
            self.leader.mark_gone(dev)
        for dev in set(self._heard) - set(view.online):
            del self._heard[dev]
        if self.cluster.is_leader:
            self._schedule_replan()

    def _schedule_replan(self) -> None:
        """Debounce: several devices often appear within a moment of each other."""
        if self._replan_task is not None and not self._replan_task.done():
            self._replan_task.cancel()
        self._replan_task = self._spawn(self._replan(), "replan")

    async def _replan(self) -> None:
        await asyncio.sleep(self.replan_delay_s)
        if not self.cluster.is_leader:
            return
        view = self.cluster.membership
        profiles = {d: rec.planner for d, rec in view.profiles().items() if rec.planner and d not in self._silent}
        profiles.setdefault(self.id, self.cluster.profile.planner)
        lease = self.cluster.lease
        term = lease.term if lease is not None else 0
        # placement versions keep rising across leaders: a new leader continues after the last
        # assignment it received as a follower
        self.leader.state.version = max(self.leader.state.version, self.host.version)
        try:
            bodies = await asyncio.to_thread(self.leader.plan_placement, profiles, term)
        except DetransformerError as exc:
            log.error("placement failed: %s", exc)
            return
        version = self.leader.state.version
        log.info("leader %s: placement v%d over %s", self.id, version, ", ".join(sorted(bodies)))
        for dev, body in bodies.items():
            try:
                await self.cluster.send_assignment(dev, version, body)
            except DetransformerError as exc:
                log.warning("assignment to %s not sent: %s", dev, exc)

    async def _on_assignment(self, msg: Assignment) -> None:
        body = msg.body
        raw = body.get("models") if isinstance(body, Mapping) else None
        if not isinstance(raw, Mapping):
            log.warning("ignoring assignment without models from %s", msg.leader)
            return
        try:
            models = {m: weights_from_dict(w) for m, w in raw.items() if m in self.catalog.names and isinstance(w, Mapping)}
        except DetransformerError as exc:
            log.warning("ignoring malformed assignment from %s: %s", msg.leader, exc)
            return
        self.cluster.work_state = WorkState(False, msg.placement_version, ())
        await self._status_now()
        # loaded in a task: the message loop must keep running (streamed weight chunks arrive
        # through it); a newer assignment replaces one still loading
        if self._assign_task is not None and not self._assign_task.done():
            self._assign_task.cancel()
        self._assign_task = self._spawn(self._hold(msg.placement_version, models), "assign")

    async def _hold(self, version: int, models: Mapping[str, Any]) -> None:
        progress = self._spawn(self._report_loading(version), "loading")
        try:
            await self.host.assign(version, models)
            # A device holding a model's embeddings may coordinate its requests: have its
            # tokenizer (and heads, chat template) ready before saying so.
            for name, weights in models.items():
                if weights.embeddings:
                    await asyncio.to_thread(self.catalog.tools, name)
        except (DetransformerError, OSError) as exc:
            log.error("%s cannot hold its placement v%d: %s", self.id, version, exc)
            return
        finally:
            progress.cancel()
        self.cluster.work_state = WorkState(True, version, self.host.sub_blocks(),
                                            self.cluster.work_state.last_latency_ms)
        await self._status_now()
        if self.cluster.is_leader:
            self.leader.mark_ready(self.id, version)

    async def _report_loading(self, version: int) -> None:
        """While weights stream in, the status record carries the percent received."""
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            percent = self.weight_fetcher.percent()
            if percent is not None:
                self.cluster.work_state = WorkState(False, version, (), weights_percent=percent)
                await self._status_now()

    async def _on_weights_want(self, message: aiomqtt.Message) -> None:
        dev = want_device(self.cluster.topics.prefix, message.topic.value)
        if dev is not None and dev != self.id and self.cluster.is_leader:
            await self.weight_server.handle_want(dev, bytes(message.payload))  # type: ignore[arg-type]

    def _on_weights_chunk(self, message: aiomqtt.Message) -> None:
        self.weight_fetcher.handle_chunk(bytes(message.payload))  # type: ignore[arg-type]

    def _on_weights_manifest(self, message: aiomqtt.Message) -> None:
        self.weight_fetcher.handle_manifest(message.topic.value, bytes(message.payload))  # type: ignore[arg-type]

    async def _status_now(self) -> None:
        with contextlib.suppress(AgentNotConnectedError, aiomqtt.MqttError):
            await self.cluster.publish_status()

    async def _watch_silence(self) -> None:
        """Leader: a device online by presence but silent for ``silence_s`` is treated as gone
        (its runs cancelled, a placement without it) until its status is heard again."""
        while True:
            await asyncio.sleep(min(1.0, self.silence_s / 6))
            if not self.cluster.is_leader:
                continue
            now = time.monotonic()
            for dev in self.cluster.membership.online:
                if dev == self.id or dev in self._silent:
                    continue
                last = self._heard.setdefault(dev, now)
                if now - last > self.silence_s:
                    log.warning("device %s silent for %.1f s: treating it as gone", dev, now - last)
                    self._silent.add(dev)
                    self.leader.mark_gone(dev)
                    self._schedule_replan()

    def _on_status(self, message: aiomqtt.Message) -> None:
        dev = self.cluster.topics.status.match(message.topic.value)
        if dev:
            self._heard[dev] = time.monotonic()
            if dev in self._silent:
                self._silent.discard(dev)
                log.warning("device %s is heard again", dev)
                if self.cluster.is_leader:
                    self._schedule_replan()
        if not self.cluster.is_leader:
            return
        try:
            status = self.cluster.topics.status.decode(message.payload)  # type: ignore[arg-type]
        except (ProtocolError, TypeError):
            return
        if dev and status.ready:
            self.leader.mark_ready(dev, status.placement_version)

    # --- runs ------------------------------------------------------------------------------------

    def _on_run_message(self, message: aiomqtt.Message) -> None:
        parsed = parse_run_topic(self.cluster.topics.prefix, message.topic.value)
        if parsed is None:
            return
        req, what = parsed
        if what == "end":
            self.host.end(req)
            return
        try:
            payload = bytes(message.payload)  # type: ignore[arg-type]
            stamp = None
            if self.cluster.verifier is not None:  # SignatureError: forged, unsigned or replayed
                stamp = self.cluster.verifier.verify(message.topic.value, payload, "run")
            ctl = RunControl.from_json(payload)
            if stamp is not None and stamp.term != ctl.term:
                raise SignatureError(f"run: signed for term {stamp.term}, names term {ctl.term}")
        except (ProtocolError, TypeError) as exc:
            log.warning("ignoring run control on %s: %s", message.topic.value, exc)
            return
        lease = self.cluster.lease
        if lease is not None and ctl.term < lease.term:
            log.warning("ignoring run %s from an older term %d", ctl.req, ctl.term)
            return
        if ctl.req != req or self.id == ctl.plan.coordinator:
            return
        self.host.start_worker(ctl)

    # --- requests --------------------------------------------------------------------------------

    def _note_latency(self, ms: float | None) -> None:
        ws = self.cluster.work_state
        self.cluster.work_state = WorkState(ws.ready, ws.placement_version, ws.sub_blocks, ms)

    async def _await_ready(self) -> None:
        if not self.leader.state.placement_ready() and not await self.leader.wait_ready(10.0):
            raise ServiceError("busy", "the cluster is still loading its model placement")

    async def _on_request(self, request: Request) -> Reply | Mapping[str, Any]:
        try:
            params = dict(request.params)
            model = params.get("model")
            strategy = params.get("plan", "adaptive")
            if model is not None and not isinstance(model, str):
                raise ServiceError("bad_request", "params.model must be a model name")
            if not isinstance(strategy, str):
                raise ServiceError("bad_request", "params.plan must be a string")
            await self._await_ready()
            if request.op == "embed":
                texts = [request.input] if isinstance(request.input, str) else list(request.input)
                if len(texts) > 32:
                    raise ServiceError("bad_request", "at most 32 texts per embed request")
                vectors, rec = await self.leader.embed(texts, model, strategy, request.id)
                self._note_latency(rec.latency_ms)
                return {"embeddings": vectors, "dim": len(vectors[0]), "plan": rec.plan, "latency_ms": rec.latency_ms}
            max_new = params.get("max_new_tokens", 32)
            if not isinstance(max_new, int) or isinstance(max_new, bool):
                raise ServiceError("bad_request", "params.max_new_tokens must be an integer")
            chat = params.get("chat", True)
            if not isinstance(chat, bool):
                raise ServiceError("bad_request", "params.chat must be true or false")
            seq = 0

            async def stream(piece: str) -> None:
                nonlocal seq
                seq += 1
                event = json.dumps({"id": request.id, "event": "token", "seq": seq, "text": piece})
                with contextlib.suppress(ServiceError):
                    await self._publish(request.reply_to, event, 0)

            text, rec, stats = await self.leader.generate(request.input, max_new, stream, chat, model, strategy,  # type: ignore[arg-type]
                                                          request.id)
            self._note_latency(rec.latency_ms)
            return {"text": text, "plan": rec.plan, "latency_ms": rec.latency_ms, **stats}
        except ServiceError as exc:
            return Reply.failure(request.id, exc.code, str(exc))

    async def _on_hermes_query(self, message: aiomqtt.Message) -> None:
        if not (self.cluster.is_leader or self.cluster.holds_lease):
            return
        payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else str(message.payload or "").encode()
        try:
            query = hermes.parse_nlu_query(payload)
        except ProtocolError as exc:
            await self._hermes_error(payload, f"bad nlu query: {exc}")
            return
        try:
            await self._await_ready()
            result, rec = await self.leader.intent(query.input, client_id=query.id)
            self._note_latency(rec.latency_ms)
            if result.intent is None or result.confidence < self.intent_threshold:
                reply = hermes.not_recognized(query)
                await self._publish(HERMES_NOT_RECOGNIZED, reply.to_json(), 1)
                return
            slots = [
                hermes.slot(s.slot_name, s.value, s.raw_value, kind=s.kind, start=s.start, end=s.end)
                for s in result.slots
            ]
            intent = hermes.recognized(query, result.intent, result.confidence, slots)
            await self._publish(hermes.intent_topic(result.intent), intent.to_json(), 1)
        except ServiceError as exc:  # "busy: ..." tells the voice assistant to try again shortly
            await self._hermes_error(payload, f"{exc.code}: {exc}", query.session_id)
        except ProtocolError as exc:
            await self._hermes_error(payload, str(exc), query.session_id)
        except Exception as exc:  # every query gets an answer, even when a handler has a bug
            log.exception("hermes query %s failed", query.id)
            await self._hermes_error(payload, f"internal error: {type(exc).__name__}: {exc}", query.session_id)

    async def _hermes_error(self, payload: bytes, error: str, session_id: str = "") -> None:
        body = json.dumps({"sessionId": session_id or None, "error": error, "context": payload[:200].decode("utf-8", "replace")})
        with contextlib.suppress(ServiceError):
            await self._publish(HERMES_ERROR, body, 1)
