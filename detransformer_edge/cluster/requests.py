"""The leader's request desk: ``P/request`` in, exactly one ``Reply`` out per request.

Clients publish a JSON ``Request`` with a reply topic (or the MQTT 5 ResponseTopic /
CorrelationData properties); the desk parses it, bounds how many run at once (beyond
``max_pending`` the answer is ``busy`` at once), calls the service's handler and turns whatever
happens into one ``Reply``: a result, or a typed error code (bad_request, busy, timeout,
internal). A handler bug still answers the client.

A client that got no reply sends the same request again under the same id (docs/API.md). A copy
that arrives while the desk is still serving that id (same reply topic), or within a window
(a lease) after it answered it, is not run again (``AnswerMemory``): the one reply answers every
copy. Copies that the broker held back behind a stalled connection arrive in a burst, after the
first one was answered; without the window each would get a reply of its own. And a request
that finishes after another device has taken the lease is not answered from here: its client
sends it again to the new leader, which answers it (``superseded``).
"""

from __future__ import annotations

import collections
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.codec import ProtocolError, load_object
from detransformer_edge.protocol.messages import Reply, Request
from detransformer_edge.protocol.topics import TopicFamily
from detransformer_edge.transport.session import MqttSession, NotConnectedError

log = logging.getLogger(__name__)

RequestHandler = Callable[[Request], Awaitable[Reply | Mapping[str, Any]] | Reply | Mapping[str, Any]]


class AnswerMemory:
    """The ids a leader is answering now or answered within the last ``window_s``: a copy of one
    (a re-send, or a copy delivered late) is not answered again. Bounded: at most ``size`` ids are
    remembered (the oldest answered ones are forgotten first). An answer that could not be sent
    is forgotten at once, so the client's next copy is answered."""

    def __init__(self, window_s: float, size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.size = size
        self.clock = clock
        self.running: set[Hashable] = set()
        self.answered: collections.OrderedDict[Hashable, float] = collections.OrderedDict()  # key -> when
        self.copies = 0  # copies not answered again

    def begin(self, key: Hashable) -> bool:
        """True: answer ``key`` now (call ``done`` after); False: a copy, answer nothing."""
        now = self.clock()
        while self.answered and (len(self.answered) > self.size
                                 or now - next(iter(self.answered.values())) > self.window_s):
            self.answered.popitem(last=False)
        if key in self.running or key in self.answered:
            self.copies += 1
            return False
        self.running.add(key)
        return True

    def done(self, key: Hashable, delivered: bool = True) -> None:
        self.running.discard(key)
        if delivered:
            self.answered[key] = self.clock()
            self.answered.move_to_end(key)


class RequestDesk:
    def __init__(self, session: MqttSession, reply: TopicFamily[Reply], handler: RequestHandler | None,
                 max_pending: int = 16, copies_window_s: float = 10.0,
                 superseded: Callable[[], bool] = lambda: False) -> None:
        self.session = session
        self.reply_family = reply
        self.handler = handler
        self.max_pending = max_pending  # beyond this, reply "busy"
        self.pending = 0
        self.memory = AnswerMemory(copies_window_s)  # (reply topic, request id)
        self.superseded = superseded  # another device leads now
        self.dropped = 0  # answers not sent because another device took the lease meanwhile

    def take(self, payload: bytes, properties: Properties | None) -> None:
        """A request arrived (this device leads): answer it in a task of its own. Counted here,
        not when the task starts: a burst is dispatched before any of it runs."""
        busy = self.pending >= self.max_pending
        if not busy:
            self.pending += 1
        self.session.spawn(self._serve(payload, properties, busy), "request")

    async def _serve(self, payload: bytes, properties: Properties | None, busy: bool) -> None:
        try:
            await self._answer(payload, properties, busy)
        finally:
            if not busy:
                self.pending -= 1

    async def _reply_for(self, request: Request) -> Reply:
        if self.handler is None:
            return Reply.failure(request.id, "unsupported", "this cluster serves no requests yet")
        result = self.handler(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Reply):
            return result
        if isinstance(result, Mapping):
            return Reply(request.id, result=result)
        return Reply.failure(request.id, "internal", "request handler returned no result")

    async def _answer(self, payload: bytes, properties: Properties | None, busy: bool) -> None:
        response_topic = getattr(properties, "ResponseTopic", None) if properties else None
        correlation = getattr(properties, "CorrelationData", None) if properties else None
        request_id: str | None = None
        reply_to: str | None = response_topic
        try:
            raw = load_object(payload, "request")
            request_id = raw.get("id") if isinstance(raw.get("id"), str) else None
            reply_to = reply_to or (raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None)
            request = Request.from_dict(raw)
        except ProtocolError as exc:
            await self._send(Reply.failure(request_id, "bad_request", str(exc)), reply_to, correlation)
            return
        if busy:
            reply = Reply.failure(request_id, "busy", f"{self.max_pending} requests in flight; retry later")
            await self._send(reply, reply_to, correlation)
            return
        key = (reply_to or request.reply_to, request.id)
        if not self.memory.begin(key):
            log.info("request %s: a copy of one running or just answered; not answered again", request.id)
            return
        delivered = False
        try:
            reply = await self._reply_or_error(request)
            if self.superseded():
                self.dropped += 1
                log.warning("request %s finished after another device took the lease: not answered from "
                            "here (the client sends it again to the new leader)", request.id)
                return
            delivered = await self._send(reply, reply_to, correlation)
        finally:
            self.memory.done(key, delivered)

    async def _reply_or_error(self, request: Request) -> Reply:
        try:
            return await self._reply_for(request)
        except TimeoutError:
            return Reply.failure(request.id, "timeout", "the cluster did not finish in time")
        except DetransformerError as exc:
            return Reply.failure(request.id, "internal", str(exc))
        except Exception as exc:  # a handler bug must still answer the client
            log.exception("request %s failed", request.id)
            return Reply.failure(request.id, "internal", f"{type(exc).__name__}: {exc}")

    async def _send(self, reply: Reply, reply_to: str | None, correlation: Any) -> bool:
        """Publish ``reply``; False when it could not be sent."""
        if not reply_to or any(c in reply_to for c in "+#"):
            log.warning("request %s has no usable reply topic; dropping the reply", reply.id)
            return False
        out_props = None
        if correlation is not None and self.session.is_v5:
            out_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out_props.CorrelationData = correlation
        try:
            await self.session.publish(reply_to, self.reply_family.encode(reply), qos=1, properties=out_props)
        except NotConnectedError as exc:
            log.warning("reply to %s lost: %s", reply.id, exc)
            return False
        return True
