"""Rhasspy Hermes, as a plug-in: the home answers ``hermes/nlu/query`` the way Rhasspy's NLU
(rhasspy-nlu-hermes) does.

Every agent subscribes; only the one that leads answers. Each query it can read gets exactly one
answer: ``hermes/nlu/intentParsed`` followed by ``hermes/intent/<intentName>``, or
``hermes/nlu/intentNotRecognized``. Rhasspy's dialogue manager waits for one of those two and does
not listen to ``hermes/error/nlu``, so a home that is busy, still loading or failing answers
"not recognised" (the reason goes to the agent's log and the request log); ``hermes/error/nlu``
is sent only for a query that cannot be read at all. The messages are in ``protocol/hermes.py``.

With ``answer_questions = true`` a query the intent model rejects as out of its domain is, after
its ``intentNotRecognized``, answered by the home's language model on ``hermes/tts/say`` (the
query's siteId, sessionId and lang; its id).

Rhasspy's rules, kept here: ``intentFilter`` masks the intents before the decision (absent,
null or ``[]``: no filter; nothing allowed: not recognised); slots the chosen intent does not take
are dropped, never an error; ``siteId``, ``id``, ``sessionId``, ``lang`` and ``customData`` are
echoed.

A voice client that got no answer asks again with the same query id (docs/API.md). A copy that
arrives while the leader is still answering that query (same ``siteId`` and ``id``), or within a
lease after it answered it, is not answered again (``cluster.requests.AnswerMemory``): one query,
one answer, even when the broker delivers a burst of held-back copies late. A query that finishes
after another device took the lease is not answered from here: the voice client asks the new
leader again, and that one answers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from detransformer_edge.cluster.requests import AnswerMemory
from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol import hermes, hermes_tts
from detransformer_edge.protocol.codec import Message, ProtocolError
from detransformer_edge.service.answers import asks_a_question
from detransformer_edge.service.intents import IntentResult
from detransformer_edge.service.plugins import Home
from detransformer_edge.transport.session import NotConnectedError

log = logging.getLogger(__name__)


def hermes_slots(result: IntentResult) -> list[hermes.Slot]:
    """The result's slots as Hermes slots; a slot whose value does not fit its kind is dropped
    (logged), never an error."""
    out = []
    for s in result.slots:
        try:
            out.append(hermes.slot(s.slot_name, s.value, s.raw_value, kind=s.kind, start=s.start, end=s.end))
        except hermes.HermesError as exc:
            log.info("hermes: dropping slot %s=%r: %s", s.slot_name, s.raw_value, exc)
    return out


def answer(query: hermes.NluQuery, result: IntentResult | None) -> list[Message]:
    """What Rhasspy's NLU publishes for ``query`` given the home's ``result`` (None: the home
    could not answer): ``[intentParsed, intent]`` or ``[intentNotRecognized]``."""
    allowed = query.allowed
    if (result is None or result.intent is None or result.intent not in hermes.INTENT_SLOTS
            or (allowed is not None and result.intent not in allowed)):
        return [hermes.not_recognized(query)]
    slots = hermes_slots(result)
    kept, dropped = hermes.intent_slots(result.intent, slots)
    if dropped:
        log.info("hermes: %s takes slots %s; dropping %s", result.intent, hermes.INTENT_SLOTS[result.intent],
                 ", ".join(f"{s.slot_name}={s.raw_value!r}" for s in dropped))
    intent = hermes.recognized(query, result.intent, min(1.0, max(0.0, result.confidence)), kept)
    return [intent.parsed(), intent]


def should_answer(home: Home, query: hermes.NluQuery, result: IntentResult | None) -> bool:
    """Is ``query`` a question for the language model? Only with ``answer_questions``, only when
    the intent model itself rejected it (not when the home could not run it), only a question
    (``asks_a_question``: a command the home cannot carry out gets no reply that sounds done), and
    never inside a dialogue that asked for particular intents (an ``intentFilter``: the user is
    answering a question there, not asking one)."""
    return (result is not None and result.intent is None and query.allowed is None
            and home.config.answer_questions and asks_a_question(query.input))


class HermesNlu:
    """Answers Hermes NLU queries with the home's intent model."""

    name = "hermes"

    def __init__(self) -> None:
        self.home: Home | None = None
        self.memory: AnswerMemory | None = None  # (siteId, query id); made with the agent's lease

    async def start(self, home: Home) -> None:
        self.home = home
        self.memory = AnswerMemory(home.cluster.config.election.lease_s)
        home.session.subscribe(hermes.TOPIC_NLU_QUERY, self._on_query, 1)

    async def stop(self) -> None:
        self.home = None

    def _on_query(self, topic: str, payload: bytes, _props: object) -> None:
        home = self.home
        if home is not None and home.cluster.is_leader:
            home.spawn(self._answer(home, payload), "hermes")  # a query must not hold up the session
        elif home is not None and home.cluster.holds_lease:  # leading, or back from a cut link? (Leadership.still_leading)
            home.spawn(self._answer_if_still_leading(home, payload), "hermes")

    async def _answer_if_still_leading(self, home: Home, payload: bytes) -> None:
        if await home.cluster.leadership.still_leading():
            await self._answer(home, payload)
        else:
            log.info("hermes: a query read while this device's lease was running out was not answered here")

    async def _answer(self, home: Home, payload: bytes) -> None:
        try:
            query = hermes.parse_nlu_query(payload)
        except ProtocolError as exc:
            log.warning("hermes: unreadable nlu query: %s", exc)
            await self._publish(home, [hermes.nlu_error(payload, f"bad nlu query: {exc}")])
            return
        memory, key = self.memory, (query.site_id, query.id)
        if memory is None or not query.id:  # no id: nothing to recognise a copy by
            await self._answer_query(home, query)
            return
        if not memory.begin(key):
            log.info("hermes: query %s: a copy of one being answered or just answered; not answered again",
                     query.id)
            return
        delivered = False
        try:
            delivered = await self._answer_query(home, query)
        finally:
            memory.done(key, delivered)

    async def _answer_query(self, home: Home, query: hermes.NluQuery) -> bool:
        """Answer ``query``; False when the answer could not be sent."""
        client_id = query.id or query.session_id or f"hermes-{uuid.uuid4().hex[:8]}"
        result: IntentResult | None = None
        allowed = query.allowed
        if allowed is not None and not allowed & set(hermes.INTENT_SLOTS):
            log.info("hermes: query %s allows none of our intents (intentFilter %s): not recognised",
                     client_id, list(query.intent_filter or ()))
        else:
            try:
                result = await home.recognize(query.input, client_id=client_id, allowed=allowed)
            except DetransformerError as exc:  # busy, loading, a failed run: "not recognised" for now
                code = getattr(exc, "code", None)
                log.warning("hermes: query %s answered not recognised: %s%s", client_id,
                            f"{code}: " if code else "", exc)
            except Exception:  # every query gets an answer, even when a handler has a bug
                log.exception("hermes: query %s failed; answered not recognised", client_id)
        try:
            messages = answer(query, result)
        except DetransformerError as exc:  # a result the protocol cannot carry: a bug, logged
            log.exception("hermes: query %s: cannot build the answer", client_id)
            messages = [hermes.not_recognized(query)]
            home.answer_failed(client_id, f"hermes answer: {exc}")
        if home.cluster.superseded:
            lease = home.cluster.lease
            log.warning("hermes: query %s finished after %s took the lease: not answered from here (the "
                        "client asks the new leader again)", client_id, lease.id if lease else "another device")
            home.answer_failed(client_id, "hermes answer dropped: another device leads now")
            return False
        if not await self._publish(home, messages):
            home.answer_failed(client_id, "hermes answer lost: the broker connection is down")
            return False
        if should_answer(home, query, result):
            await self._speak_answer(home, query, client_id)
        return True

    async def _speak_answer(self, home: Home, query: hermes.NluQuery, client_id: str) -> None:
        """A question out of the intent model's domain: the language model's short answer, spoken
        at the query's site (``hermes/tts/say``). Rhasspy's dialogue manager already has its
        intentNotRecognized and has ended the session; the speech synthesiser says any text."""
        try:
            text = await home.answer(query.input, client_id=f"{client_id}-answer")
        except DetransformerError as exc:
            log.warning("hermes: no spoken answer to %s: %s", client_id, exc)
            return
        except Exception:  # a bug in the answer path must not cost the session
            log.exception("hermes: the spoken answer to %s failed", client_id)
            return
        if text and not home.cluster.superseded:
            await self._publish(home, [hermes_tts.say(query, text, query.id or uuid.uuid4().hex)])

    async def _publish(self, home: Home, messages: Sequence[Message]) -> bool:
        for message in messages:
            topic = message.topic  # type: ignore[attr-defined]
            try:
                await home.session.publish(topic, message.to_json(), qos=1)
            except NotConnectedError as exc:
                log.warning("hermes answer on %s lost: %s", topic, exc)
                return False
        return True
