"""One device's agent: its MQTT session, the cluster shell (presence, profile, election), the
model host, the leader's work and the plug-ins (voice assistants, Home Assistant, dashboard).

    async with HomeAgent(config, profile, catalog, broker=(host, port), plugins=[...]) as agent:
        await stop.wait()

The agent is the composition root: the leader's work is split between ``placement.py``
(static and runtime planning), ``runs.py`` (running a request on a plan, with the retry),
``tasks.py`` (embed / intent / generate) and ``leading.py`` (replanning, readiness, silence);
every device's own duties are in ``device.py``. The agent never imports a plug-in
(``plugins.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detransformer_edge import __version__
from detransformer_edge.cluster.agent import ClusterAgent, session_for
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.errors import DetransformerError
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.protocol.client import Requester
from detransformer_edge.protocol.messages import ProfileRecord, Reply, Request, TokenEvent
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.device import DeviceDuties
from detransformer_edge.service.host import ModelHost
from detransformer_edge.service.intents import IntentResult, intent_from_dict, intent_to_dict
from detransformer_edge.service.leading import LeaderDuties
from detransformer_edge.service.placement import Placements, ServiceError
from detransformer_edge.service.plugins import Plugin
from detransformer_edge.service.runs import RunCoordinator
from detransformer_edge.service.tasks import Tasks
from detransformer_edge.service.weight_stream import WeightFetcher, WeightServer
from detransformer_edge.transport.mqtt import MqttTransport
from detransformer_edge.transport.session import NotConnectedError

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 30.0  # a follower waits this long for the leader's answer to a forwarded query


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
        plugins: Sequence[Plugin] = (),
        has_models: bool = False,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.id = config.id
        self.intent_threshold = intent_threshold
        self.plugins = list(plugins)
        self.started = time.time()
        self.session = session_for(config, broker)
        record = ProfileRecord.from_device_profile(config.id, profile, name=config.name or config.id,
                                                   device_class=profile.name, version=__version__,
                                                   has_models=has_models)
        self.device = DeviceDuties(self)
        self.leading = LeaderDuties(self, replan_delay_s)
        self.cluster = ClusterAgent(
            config, record, session=self.session, sw_version=__version__,
            on_membership_change=self.leading.on_membership, on_become_leader=self.leading.on_become_leader,
            on_lose_leadership=self.leading.on_lose_leadership, on_request=self._on_request,
            on_assignment=self.device.on_assignment,
        )
        topics = self.cluster.topics
        self.transport = MqttTransport(config.id, self.session, topics.run)
        # weights: the leader streams shard units to devices without local model files
        from detransformer_edge.weights.sources import cache_dir

        weights_cache = config.weights_cache or (cache_dir() or Path.home() / ".cache" / "detransformer-edge") / "weights"
        term = self._term
        self.weight_server = WeightServer(catalog, self._publish, topics, signer=self.cluster.signer,
                                          term=lambda: term() or 1)
        self.weight_fetcher = WeightFetcher(config.id, catalog, self._publish, topics,
                                            weights_cache / config.cluster / config.id, verifier=self.cluster.verifier,
                                            max_cache_bytes=config.weights_cache_mb * 1e6)
        self.host = ModelHost(self.transport, catalog, self.weight_fetcher, config.weights, quant=profile.quant)
        self.placements = Placements(config.id, catalog, replicate_all=replicate_all, emit=self._emit)
        self.runs = RunCoordinator(config.id, self.host, self.placements, self._publish, topics.run,
                                   sign=self.cluster.sign, term=term)
        self.tasks = Tasks(catalog, self.runs)
        self.tasks.listeners.append(self._publish_log)
        self.requester = Requester(self.session, topics, f"{config.id}-forward")  # followers ask the leader
        self._stack: contextlib.AsyncExitStack | None = None
        s = self.session
        s.subscribe(topics.run.control.filter, self.device.on_run_control, 1)
        s.subscribe(topics.run.end.filter, self.device.on_run_end, 1)
        s.subscribe(topics.status.filter, self.leading.on_status, 0)
        s.subscribe(topics.weights_want.filter, self._on_weights_want, 1)
        s.subscribe(topics.chunk_topic(config.id), lambda t, p, _: self.weight_fetcher.handle_chunk(p), 1)
        s.subscribe(topics.weights_manifest.format(config.id), lambda t, p, _: self.weight_fetcher.handle_manifest(t, p), 1)

    # --- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> HomeAgent:
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(self.transport)
        await self._stack.enter_async_context(self.cluster)
        await self._stack.enter_async_context(self.session)  # connects in the background, forever
        self.spawn(self.leading.watch_silence(), "silence")
        self.spawn(asyncio.to_thread(self.weight_fetcher.prune), "prune-weights")  # the cache's bound, at start
        for plugin in self.plugins:
            await plugin.start(self)
            self._stack.push_async_callback(plugin.stop)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            await self._stack.aclose()  # plug-ins first, then the session, cluster and transport
        await self.weight_server.close()
        await self.host.close()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A task kept, logged if it fails, and cancelled when the agent's session closes."""
        return self.session.spawn(coro, name)

    def _term(self) -> int:
        lease = self.cluster.lease
        return max(self.placements.term, lease.term if lease is not None else 0)

    async def _publish(self, topic: str, payload: str | bytes, qos: int, *, wait_ack: bool = True) -> None:
        try:
            await self.session.publish(topic, payload, qos=qos, wait_ack=wait_ack)
        except NotConnectedError as exc:
            raise ServiceError("internal", f"broker unavailable: {exc}") from None

    @property
    def role(self) -> str:
        return self.cluster.role

    # --- what the dashboard and the plug-ins see ------------------------------------------------------

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        self.tasks.listeners.append(listener)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.tasks.emit(kind, data)

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
            "placement": self.placements.summary() if leading else None,
            "requests": [r.to_dict() for r in self.tasks.log] if leading else [],
            "version": __version__,
            "weights_loading": self.host.loading(),
        }

    def answer_failed(self, client_id: str, error: str) -> None:
        """A plug-in could not deliver the answer to a logged request (its newest record with this
        ``client_id``): the record turns into a failure and is published again. On a device that
        does not lead there is no record here; the failure is only logged."""
        rec = next((r for r in reversed(self.tasks.log) if r.client_id == client_id), None)
        log.warning("answer to %s failed: %s", client_id, error)
        if rec is not None and rec.error is None:
            rec.error = error
            self.tasks.emit("request", rec.to_dict())

    def _publish_log(self, kind: str, data: dict[str, Any]) -> None:
        """Finished requests go to ``P/log`` (QoS 0) so any dashboard or client can follow them."""
        if kind != "request":
            return
        family = self.cluster.topics.log

        async def send() -> None:
            with contextlib.suppress(ServiceError, DetransformerError):
                await self._publish(family.format(), family.encode(family.schema.from_dict(data)), 0)

        self.spawn(send(), "log")

    def _on_weights_want(self, topic: str, payload: bytes, _props: object) -> Awaitable[None] | None:
        dev = self.cluster.topics.weights_want.match(topic)
        if dev and dev != self.id and self.cluster.is_leader:
            return self.weight_server.handle_want(dev, payload)
        return None

    # --- requests --------------------------------------------------------------------------------

    async def _await_ready(self) -> None:
        if not self.placements.state.placement_ready() and not await self.placements.wait_ready(10.0):
            raise ServiceError("busy", "the cluster is still loading its model placement")

    @property
    def leads(self) -> bool:
        return self.cluster.is_leader or self.cluster.holds_lease

    async def recognize(self, text: str, client_id: str | None = None,
                        allowed: frozenset[str] | None = None, trace: bool = False) -> IntentResult:
        """The intent of an utterance (``allowed``: only these intents may be recognised): computed
        by the home when this device leads, else asked of the leader over MQTT (``P/request``, op
        ``intent``). ``trace``: the request log keeps its timeline. ServiceError when it cannot
        answer."""
        if not self.leads:
            params: dict[str, Any] = {} if allowed is None else {"intent_filter": ",".join(sorted(allowed))}
            if trace:
                params["trace"] = True
            reply = await self.requester.request("intent", text, params, timeout=FORWARD_TIMEOUT_S)
            if reply.error is not None:
                raise ServiceError(reply.error.code, reply.error.message)
            return intent_from_dict(reply.result or {})
        await self._await_ready()
        result, rec = await self.tasks.intent(text, client_id=client_id, trace=trace, allowed=allowed)
        self.device.note_latency(rec.latency_ms)
        if result.intent is not None and result.confidence < self.intent_threshold:
            return IntentResult(None, result.confidence)
        return result

    async def generate(self, prompt: str, max_new_tokens: int = 32,
                       on_text: Callable[[str], Awaitable[None]] | None = None) -> str:
        if not self.leads:
            raise ServiceError("not_leader", f"{self.id} does not lead; send generations to the leader")
        await self._await_ready()
        text, rec, _ = await self.tasks.generate(prompt, max_new_tokens, on_text)
        self.device.note_latency(rec.latency_ms)
        return text

    async def answer(self, question: str, client_id: str | None = None,
                     on_text: Callable[[str], Awaitable[None]] | None = None) -> str:
        """A spoken answer to a question (``service/answers.py``), by the leader's language model
        within the leader's ``[answers]`` bounds; forwarded to the leader (op ``answer``) when this
        device does not lead. ServiceError when the home cannot answer."""
        if not self.leads:
            reply = await self.requester.request("answer", question, {},
                                                 timeout=FORWARD_TIMEOUT_S + self.config.answers.timeout_s)
            if reply.error is not None:
                raise ServiceError(reply.error.code, reply.error.message)
            text = (reply.result or {}).get("text", "")
            return text if isinstance(text, str) else ""
        await self._await_ready()
        text, rec, _ = await self.tasks.answer(question, self.config.answers, on_text, client_id)
        self.device.note_latency(rec.latency_ms)
        return text

    async def _on_request(self, request: Request) -> Reply | Mapping[str, Any]:
        try:
            params = dict(request.params)
            model = params.get("model")
            strategy = params.get("plan", "adaptive")
            if model is not None and not isinstance(model, str):
                raise ServiceError("bad_request", "params.model must be a model name")
            if not isinstance(strategy, str):
                raise ServiceError("bad_request", "params.plan must be a string")
            trace = params.get("trace", False)
            if not isinstance(trace, bool):
                raise ServiceError("bad_request", "params.trace must be true or false")
            await self._await_ready()
            if request.op == "intent":
                if not isinstance(request.input, str):
                    raise ServiceError("bad_request", "'intent' takes one utterance as 'input'")
                flt = params.get("intent_filter")
                if flt is not None and not isinstance(flt, str):
                    raise ServiceError("bad_request", "params.intent_filter must be intent names, comma-separated")
                allowed = None if flt is None else frozenset(n for n in flt.split(",") if n)
                result = await self.recognize(request.input, request.id, allowed, trace)
                return intent_to_dict(result)
            if request.op == "embed":
                texts = [request.input] if isinstance(request.input, str) else list(request.input)
                if len(texts) > 32:
                    raise ServiceError("bad_request", "at most 32 texts per embed request")
                vectors, rec = await self.tasks.embed(texts, model, strategy, request.id, trace)
                self.device.note_latency(rec.latency_ms)
                return {"embeddings": vectors, "dim": len(vectors[0]), "plan": rec.plan, "latency_ms": rec.latency_ms,
                        **({"trace": rec.trace()} if trace else {})}
            seq = 0

            async def stream(piece: str) -> None:
                nonlocal seq
                seq += 1
                with contextlib.suppress(ServiceError):
                    await self._publish(request.reply_to, TokenEvent(request.id, seq, piece).to_json(), 0)

            if request.op == "answer":
                assert isinstance(request.input, str)  # Request checks it
                text, rec, stats = await self.tasks.answer(request.input, self.config.answers, stream, request.id)
                self.device.note_latency(rec.latency_ms)
                return {"text": text, "plan": rec.plan, "latency_ms": rec.latency_ms, **stats}
            max_new = params.get("max_new_tokens", 32)
            if not isinstance(max_new, int) or isinstance(max_new, bool):
                raise ServiceError("bad_request", "params.max_new_tokens must be an integer")
            chat = params.get("chat", True)
            if not isinstance(chat, bool):
                raise ServiceError("bad_request", "params.chat must be true or false")
            assert isinstance(request.input, str)
            text, rec, stats = await self.tasks.generate(request.input, max_new, stream, chat, model, strategy,
                                                         request.id, trace)
            self.device.note_latency(rec.latency_ms)
            return {"text": text, "plan": rec.plan, "latency_ms": rec.latency_ms, **stats,
                    **({"trace": rec.trace()} if trace else {})}
        except ServiceError as exc:
            return Reply.failure(request.id, exc.code, str(exc))
