"""Rhasspy Hermes, as a plug-in: the home answers ``hermes/nlu/query`` like Rhasspy's NLU does.

Every agent subscribes; only the one that leads answers, with ``hermes/intent/<intentName>``
or ``hermes/nlu/intentNotRecognized`` (the messages are in ``protocol/hermes.py``). A malformed
query, or a home that cannot answer now, gets ``hermes/error/nlu``.
"""

from __future__ import annotations

import json
import logging

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol import hermes
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.service.plugins import Home
from detransformer_edge.transport.session import NotConnectedError

log = logging.getLogger(__name__)


class HermesNlu:
    """Answers Hermes NLU queries with the home's intent model."""

    name = "hermes"

    def __init__(self) -> None:
        self.home: Home | None = None

    async def start(self, home: Home) -> None:
        self.home = home
        home.session.subscribe(hermes.TOPIC_NLU_QUERY, self._on_query, 1)

    async def stop(self) -> None:
        self.home = None

    def _on_query(self, topic: str, payload: bytes, _props: object) -> None:
        home = self.home
        if home is not None and (home.cluster.is_leader or home.cluster.holds_lease):
            home.spawn(self._answer(home, payload), "hermes")  # a query must not hold up the session

    async def _publish(self, home: Home, topic: str, body: str) -> None:
        try:
            await home.session.publish(topic, body, qos=1)
        except NotConnectedError as exc:
            log.warning("hermes answer on %s lost: %s", topic, exc)

    async def _answer(self, home: Home, payload: bytes) -> None:
        try:
            query = hermes.parse_nlu_query(payload)
        except ProtocolError as exc:
            await self._error(home, payload, f"bad nlu query: {exc}")
            return
        try:
            result = await home.recognize(query.input, client_id=query.id)
            if result.intent is None:
                await self._publish(home, hermes.TOPIC_NOT_RECOGNIZED, hermes.not_recognized(query).to_json())
                return
            slots = [hermes.slot(s.slot_name, s.value, s.raw_value, kind=s.kind, start=s.start, end=s.end)
                     for s in result.slots]
            intent = hermes.recognized(query, result.intent, result.confidence, slots)
            await self._publish(home, hermes.intent_topic(result.intent), intent.to_json())
        except DetransformerError as exc:  # "busy: ..." tells the voice assistant to try again shortly
            code = getattr(exc, "code", None)
            await self._error(home, payload, f"{code}: {exc}" if code else str(exc), query.session_id)
        except Exception as exc:  # every query gets an answer, even when a handler has a bug
            log.exception("hermes query %s failed", query.id)
            await self._error(home, payload, f"internal error: {type(exc).__name__}: {exc}", query.session_id)

    async def _error(self, home: Home, payload: bytes, error: str, session_id: str = "") -> None:
        body = json.dumps({"sessionId": session_id or None, "error": error,
                           "context": payload[:200].decode("utf-8", "replace")})
        await self._publish(home, hermes.TOPIC_NLU_ERROR, body)
