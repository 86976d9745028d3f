"""A client of a home over MQTT: the one way programs talk to a running cluster.

``HomeClient`` is what the CLI (``ask``), the demo, the benchmark client, the fleet harness and
the tests use: general requests with their replies (``embed``, ``intent``, ``generate`` with
streamed tokens), Rhasspy Hermes NLU queries as a voice assistant sends them, and the request
log::

    async with HomeClient("127.0.0.1", 1883, cluster="home") as home:
        reply = await home.request("intent", "turn on the kitchen light")
        answer = await home.hermes_query("what time is it", site_id="kitchen")

``Requester`` is its request/reply half alone, for a program that already has a session (a
follower agent forwarding a voice query to its leader).

A caller may choose the id of a request or query (``request_id``, ``query_id``): the client
contract for a leader that dies while holding a request is to send the *same* id again
(docs/API.md). ``follow_answers`` sees every final answer as it arrives, a second answer to one
id included, which is how the fault tests and the chaos soak count "exactly once".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detransformer_edge.protocol import hermes, hermes_tts
from detransformer_edge.protocol.codec import ProtocolError, load_object
from detransformer_edge.protocol.messages import LogEntry, Reply, Request, TokenEvent
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.transport.session import MqttSession, SessionSettings

TokenCallback = Callable[[str], Awaitable[None] | None]
AnswerListener = Callable[[str, str, dict[str, Any]], None]
"""``listener(id, topic, payload)``: one final answer (a reply, or a Hermes answer)."""
_ids = itertools.count()


class Requester:
    """Requests to the home's leader (``P/request``) and their replies, on a given session."""

    def __init__(self, session: MqttSession, topics: ClusterTopics, client_id: str) -> None:
        self.session = session
        self.topics = topics
        self.reply_to = topics.default_reply_to(client_id)
        self._pending: dict[str, tuple[asyncio.Future[Reply], TokenCallback | None]] = {}
        self.answer_listeners: list[AnswerListener] = []  # every final reply, for any id
        session.subscribe(self.reply_to, self._on_reply, 1)

    def new_id(self) -> str:
        return f"{self.reply_to.rsplit('/', 1)[-1]}-{next(_ids)}-{uuid.uuid4().hex[:6]}"

    async def request(self, op: str, input: str | list[str], params: Mapping[str, Any] | None = None, *,
                      timeout: float = 60.0, on_token: TokenCallback | None = None,
                      request_id: str | None = None) -> Reply:
        """Send one request and wait for its reply (``TimeoutError`` after ``timeout``;
        ``NotConnectedError`` when the session has no broker now). ``request_id``: send again a
        request that got no reply, under its own id (a fresh id by default)."""
        rid = request_id or self.new_id()
        req = Request(rid, self.reply_to, op, input if isinstance(input, str) else tuple(input), dict(params or {}))
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, on_token)
        try:
            family = self.topics.request
            await self.session.publish(family.format(), family.encode(req), qos=family.qos)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def _on_reply(self, topic: str, payload: bytes, _props: object) -> None:
        d = load_object(payload, "reply")
        rid = d.get("id")
        if not isinstance(rid, str):
            return
        if not TokenEvent.is_event(d):
            for listener in list(self.answer_listeners):
                listener(rid, topic, d)
        if rid not in self._pending:
            return  # a reply for someone else, or for a request that timed out
        fut, on_token = self._pending[rid]
        if TokenEvent.is_event(d):
            event = TokenEvent.from_dict(d)
            if on_token is not None:
                result = on_token(event.text)
                if result is not None:
                    await result
            return
        if not fut.done():
            fut.set_result(Reply.from_dict(d))


@dataclass(frozen=True)
class HermesAnswer:
    """What a voice assistant got back for one ``hermes/nlu/query``."""

    topic: str  # hermes/intent/<name>, hermes/nlu/intentNotRecognized or hermes/error/nlu
    payload: dict[str, Any]

    @property
    def intent(self) -> str | None:
        if self.topic.startswith(hermes.TOPIC_INTENT_PREFIX):
            return self.topic[len(hermes.TOPIC_INTENT_PREFIX):]
        return None

    @property
    def recognized(self) -> bool:
        return self.intent is not None


class HomeClient:
    """A program's connection to a home (see the module docstring)."""

    def __init__(self, host: str, port: int, cluster: str = "home", *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 tls_context: ssl.SSLContext | None = None, protocol: str = "3.1.1",
                 connect_timeout_s: float = 10.0) -> None:
        self.topics = ClusterTopics(cluster)
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.session = MqttSession(SessionSettings(host, port, self.client_id, username, password, protocol,  # type: ignore[arg-type]
                                                   30, tls_context, reconnect_min_s=0.2, reconnect_max_s=5.0))
        # with the broker ACL a client may read only P/replies/<its username>
        self.requester = Requester(self.session, self.topics, username or self.client_id)
        self.connect_timeout_s = connect_timeout_s
        self._hermes_waiters: dict[str, asyncio.Future[HermesAnswer]] = {}
        self._hermes_sessions: dict[str, str] = {}  # sessionId -> query id (errors carry the session)
        self._log_listeners: list[Callable[[LogEntry], None]] = []
        self._speech: dict[str, asyncio.Future[str]] = {}  # say id -> the text spoken
        self._hermes_listeners: list[AnswerListener] = []
        self.session.subscribe(hermes.TOPIC_INTENT_FILTER, self._on_hermes, 1)
        self.session.subscribe(hermes.TOPIC_NOT_RECOGNIZED, self._on_hermes, 1)
        self.session.subscribe(hermes.TOPIC_NLU_ERROR, self._on_hermes, 1)

    async def __aenter__(self) -> HomeClient:
        self.session.start()
        try:
            await self.session.wait_connected(self.connect_timeout_s)
        except TimeoutError:
            await self.session.close()
            s = self.session.settings
            raise ConnectionError(f"no MQTT broker answered at {s.host}:{s.port} within "
                                  f"{self.connect_timeout_s:g} s") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    # --- requests --------------------------------------------------------------------------------

    async def request(self, op: str, input: str | list[str], params: Mapping[str, Any] | None = None, *,
                      timeout: float = 60.0, on_token: TokenCallback | None = None,
                      request_id: str | None = None) -> Reply:
        return await self.requester.request(op, input, params, timeout=timeout, on_token=on_token,
                                            request_id=request_id)

    def follow_answers(self, listener: AnswerListener) -> None:
        """Call ``listener(id, topic, payload)`` with every final answer as it arrives: each reply
        on this client's reply topic (token events excluded) and each Hermes answer on the broker
        (``hermes/intent/#``, ``intentNotRecognized``, ``hermes/error/nlu``; the id is the query's,
        for an error the one its session maps to, else its ``sessionId``), duplicates and
        answers to other clients' queries included."""
        self.requester.answer_listeners.append(listener)
        self._hermes_listeners.append(listener)

    # --- Rhasspy Hermes ------------------------------------------------------------------------------

    async def hermes_query(self, text: str, *, site_id: str = "default", session_id: str | None = None,
                           intent_filter: list[str] | None = None, custom_data: str | None = None,
                           timeout: float = 30.0, query_id: str | None = None) -> HermesAnswer:
        """Publish ``hermes/nlu/query`` as a voice assistant does and wait for the answer to it
        (matched by the query's id; ``query_id``: ask again under the id of a query that got no
        answer). ``TimeoutError`` after ``timeout``, ``NotConnectedError`` without a broker."""
        qid = query_id or uuid.uuid4().hex
        body: dict[str, Any] = {"input": text, "siteId": site_id, "id": qid, "sessionId": session_id or qid,
                                "intentFilter": intent_filter}
        if custom_data is not None:
            body["customData"] = custom_data
        fut: asyncio.Future[HermesAnswer] = asyncio.get_running_loop().create_future()
        self._hermes_waiters[qid] = fut
        self._hermes_sessions[body["sessionId"]] = qid
        try:
            await self.session.publish(hermes.TOPIC_NLU_QUERY, json.dumps(body), qos=1)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._hermes_waiters.pop(qid, None)
            self._hermes_sessions.pop(body["sessionId"], None)

    def listen_for_speech(self, query_id: str) -> None:
        """Catch what the home says in answer to the query ``query_id`` (``hermes/tts/say`` with that
        id: a question its intent model does not know, with ``answer_questions``); call before the
        query is sent, then ``await speech(query_id, timeout)``."""
        if not self._speech:
            self.session.subscribe(hermes_tts.TOPIC_TTS_SAY, self._on_say, 1)
        self._speech.setdefault(query_id, asyncio.get_running_loop().create_future())

    async def speech(self, query_id: str, timeout: float) -> str | None:
        """The text spoken in answer to ``query_id`` (None when nothing was said within ``timeout``)."""
        fut = self._speech.get(query_id)
        if fut is None:
            raise RuntimeError(f"listen_for_speech({query_id!r}) was not called before the query")
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self._speech.pop(query_id, None)

    def forget_speech(self, query_id: str) -> None:
        """Stop listening for an answer to ``query_id`` (a recognised command gets none)."""
        fut = self._speech.pop(query_id, None)
        if fut is not None:
            fut.cancel()

    def _on_say(self, topic: str, payload: bytes, _props: object) -> None:
        with contextlib.suppress(ProtocolError):
            say = hermes_tts.TtsSay.from_json(payload)
            fut = self._speech.get(say.id or "")
            if fut is not None and not fut.done():
                fut.set_result(say.text)

    def _on_hermes(self, topic: str, payload: bytes, _props: object) -> None:
        with contextlib.suppress(ProtocolError):
            d = load_object(payload, "hermes")
            qid = d.get("id")
            if topic == hermes.TOPIC_NLU_ERROR:  # errors carry the session and the query's start
                qid = self._hermes_sessions.get(d.get("sessionId"))  # type: ignore[arg-type]
                with contextlib.suppress(ProtocolError):
                    qid = qid or load_object(str(d.get("context", "")), "hermes error context").get("id")
                qid = qid or d.get("sessionId")
            if isinstance(qid, str):
                for listener in list(self._hermes_listeners):
                    listener(qid, topic, d)
            fut = self._hermes_waiters.get(qid) if isinstance(qid, str) else None
            if fut is not None and not fut.done():
                fut.set_result(HermesAnswer(topic, d))

    # --- the request log -------------------------------------------------------------------------------

    def follow_log(self, listener: Callable[[LogEntry], None]) -> None:
        """Call ``listener`` with every finished request of the home (``P/log``)."""
        if not self._log_listeners:
            self.session.subscribe(self.topics.log.format(), self._on_log, 0)
        self._log_listeners.append(listener)

    def _on_log(self, topic: str, payload: bytes, _props: object) -> None:
        entry = self.topics.log.decode(payload)
        for listener in list(self._log_listeners):
            listener(entry)
