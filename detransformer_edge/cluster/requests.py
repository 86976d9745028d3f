"""The leader's request desk: ``P/request`` in, exactly one ``Reply`` out per request.

Clients publish a JSON ``Request`` with a reply topic (or the MQTT 5 ResponseTopic /
CorrelationData properties); the desk parses it, bounds how many run at once (beyond
``max_pending`` the answer is ``busy`` at once), calls the service's handler and turns whatever
happens into one ``Reply``: a result, or a typed error code (bad_request, busy, timeout,
internal). A handler bug still answers the client.

A client that got no reply sends the same request again under the same id (docs/API.md). A copy
that arrives while the desk is still serving that id (same reply topic) is not run again: the
one reply answers both, so a re-send can never produce a second reply from this leader.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
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


class _Busy(Exception):
    """Internal: too many requests in flight."""


class RequestDesk:
    def __init__(self, session: MqttSession, reply: TopicFamily[Reply], handler: RequestHandler | None,
                 max_pending: int = 16) -> None:
        self.session = session
        self.reply_family = reply
        self.handler = handler
        self.max_pending = max_pending  # beyond this, reply "busy"
        self.pending = 0
        self.serving: set[tuple[str, str]] = set()  # (reply topic, request id) being served now
        self.resends_joined = 0  # copies of a request that arrived while it was being served

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
            if busy:
                raise _Busy
            key = (reply_to or request.reply_to, request.id)
            if key in self.serving:
                self.resends_joined += 1
                log.info("request %s sent again while it runs: its one reply answers both", request.id)
                return
            self.serving.add(key)
            try:
                reply = await self._reply_for(request)
            finally:
                self.serving.discard(key)
        except _Busy:
            reply = Reply.failure(request_id, "busy", f"{self.max_pending} requests in flight; retry later")
        except ProtocolError as exc:
            reply = Reply.failure(request_id, "bad_request", str(exc))
        except TimeoutError:
            reply = Reply.failure(request_id, "timeout", "the cluster did not finish in time")
        except DetransformerError as exc:
            reply = Reply.failure(request_id, "internal", str(exc))
        except Exception as exc:  # a handler bug must still answer the client
            log.exception("request %s failed", request_id)
            reply = Reply.failure(request_id, "internal", f"{type(exc).__name__}: {exc}")
        if not reply_to or any(c in reply_to for c in "+#"):
            log.warning("request %s has no usable reply topic; dropping the reply", request_id)
            return
        out_props = None
        if correlation is not None and self.session.is_v5:
            out_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out_props.CorrelationData = correlation
        try:
            await self.session.publish(reply_to, self.reply_family.encode(reply), qos=1, properties=out_props)
        except NotConnectedError as exc:
            log.warning("reply to %s lost: %s", request_id, exc)
