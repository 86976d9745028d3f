"""One device's one MQTT connection, kept alive: everything a device says or hears goes through it.

An agent used to hold two connections (the cluster shell's and the tensor transport's), each
with its own reconnect loop. One session carries both now, so a run's control message and its
activations share one TCP stream (they arrive in the order they were sent) and there is one
place that connects, falls back from MQTT 5 to 3.1.1, reconnects with backoff and logs each
attempt::

    session = MqttSession(SessionSettings("broker.local", 1883, client_id="kitchen-pi"))
    session.subscribe("detransformer/home/leader", on_leader, qos=1)   # kept across reconnects
    session.on_connect(announce)                                       # after every (re)connect
    async with session:                                                # never fails to start:
        await session.wait_connected(10)                               # waits for the broker
        await session.publish(topic, payload, qos=1)

Handlers get ``(topic, payload, properties)``; a handler may be a plain function (run inline:
the tensor transport's inbox) or return an awaitable, which the session awaits before reading
the next message, so one handler sees its topics in the broker's order (the election needs
that). A handler that would block does its work in a task of its own. A handler that raises is
logged and the session goes on: one hostile message must not end the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from detransformer_edge.errors import DetransformerError
from detransformer_edge.transport.errors import TransportClosed

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, Properties | None], Awaitable[None] | None]
Callback = Callable[[], Awaitable[None] | None]
ProtocolChoice = Literal["auto", "3.1.1", "5"]


class NotConnectedError(TransportClosed):
    """The session has no broker connection right now; it reconnects by itself."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class SessionSettings:
    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    protocol: ProtocolChoice = "auto"  # "auto": MQTT 5 where the broker offers it, else 3.1.1
    keepalive_s: int = 10
    tls_context: ssl.SSLContext | None = None
    tls_insecure: bool = False
    will: Will | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __repr__(self) -> str:  # never show the password
        return f"SessionSettings({self.host}:{self.port}, client_id={self.client_id!r}, protocol={self.protocol})"


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [low/2, min(high, low * 2^attempt)]."""
    cap = min(high, low * (2 ** min(attempt, 30)))
    return (rng or random).uniform(low / 2, cap)


@dataclass
class _Subscription:
    filter: str
    qos: int
    handler: Handler
    no_local: bool


async def _call(fn: Callable[..., Any], *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class MqttSession:
    """One reconnecting MQTT connection with a subscription registry (see the module docstring)."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self._protocol = aiomqtt.ProtocolVersion.V311 if settings.protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self._subs: list[_Subscription] = []
        self._on_connect: list[Callback] = []
        self._on_disconnect: list[Callback] = []
        self._client: aiomqtt.Client | None = None
        self._session_id: str | None = None
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._crashed = False
        self._task: asyncio.Task[None] | None = None
        self._spawned: set[asyncio.Task[Any]] = set()
        self.before_disconnect: Callable[[], Awaitable[None]] | None = None  # e.g. say "offline"
        self.attempts = 0  # connection attempts since the last successful one

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._client is not None and self._session_id is not None

    @property
    def session_id(self) -> str | None:
        """A random token per connection: a reconnect is a new session."""
        return self._session_id

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    @property
    def closing(self) -> bool:
        """``close()`` or ``abort()`` has begun."""
        return self._stopping.is_set()

    @property
    def is_v5(self) -> bool:
        return self._protocol == aiomqtt.ProtocolVersion.V5

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # ------------------------------------------------------------------ registry

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0, *, no_local: bool = False) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; subscribed again after every
        reconnect. ``no_local`` (MQTT 5 only) keeps this client's own publishes from coming back."""
        sub = _Subscription(topic_filter, qos, handler, no_local)
        self._subs.append(sub)
        client = self._client
        if client is not None:
            self.spawn(self._subscribe(client, [sub]), f"subscribe {topic_filter}")

    def on_connect(self, callback: Callback) -> None:
        """Run ``callback`` after every (re)connect, once the subscriptions are active (and now,
        in a task, when the session is connected already)."""
        self._on_connect.append(callback)
        if self.connected:
            self.spawn(_call(callback), "on-connect")

    def on_disconnect(self, callback: Callback) -> None:
        """Run ``callback`` when a connection is lost (or closed)."""
        self._on_disconnect.append(callback)

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, payload: str | bytes, *, qos: int = 0, retain: bool = False,
                      properties: Properties | None = None, timeout: float | None = None,
                      wait_ack: bool = True) -> None:
        """Publish now; ``NotConnectedError`` while there is no connection (nothing is queued:
        callers decide whether a message is worth sending again). ``wait_ack=False`` returns once
        the message is handed to the connection, without waiting for the broker's PUBACK (QoS 1
        still resends it after a reconnect): a run's control message must not cost the leader a
        round trip before it starts computing."""
        client = self._client
        if client is None or self._session_id is None:
            raise NotConnectedError(f"{self.settings.client_id}: not connected to the broker")
        if not wait_ack:
            # aiomqtt has no fire-and-forget publish: hand it to its paho client, which writes it
            # from the event loop (aiomqtt's writer callback) and takes the PUBACK on its own
            info = client._client.publish(topic, payload, qos, retain, properties)
            if info.rc != 0:
                raise NotConnectedError(f"{self.settings.client_id}: publish to {topic} failed (rc {info.rc})")
            return
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=properties, timeout=timeout)
        except aiomqtt.MqttError as exc:
            raise NotConnectedError(f"{self.settings.client_id}: publish to {topic} failed: {exc}") from exc

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A task the session keeps a reference to and cancels when it closes."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.settings.client_id}-{name}")
        self._spawned.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, DetransformerError | aiomqtt.MqttError):
                log.warning("task %s: %s", task.get_name(), exc)
            else:
                log.error("task %s failed", task.get_name(), exc_info=exc)

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> MqttSession:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (returns at once; see ``wait_connected``)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mqtt-session-{self.settings.client_id}")

    async def close(self) -> None:
        """Clean exit: ``before_disconnect`` (e.g. presence ``offline``), DISCONNECT, cancel tasks."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        spawned = [t for t in self._spawned if t is not asyncio.current_task()]
        for t in spawned:
            t.cancel()
        await asyncio.gather(*spawned, return_exceptions=True)

    async def abort(self) -> None:
        """Simulate a crash (tests): drop the TCP connection without DISCONNECT, so the broker
        publishes the will, and stop without reconnecting."""
        self._crashed = True
        self._stopping.set()
        client = self._client
        if client is not None:
            sock = client._client.socket()  # paho's socket; no public API for a hard drop
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        await self.close()

    # ------------------------------------------------------------------ the connection loop

    async def _run(self) -> None:
        s = self.settings
        while not self._stopping.is_set():
            established = False
            try:
                established = await self._serve_one_connection()
            except MqttConnectError as exc:
                if s.protocol == "auto" and self.is_v5 and exc.rc in (1, 132):  # "unacceptable / unsupported protocol"
                    log.info("%s: the broker refuses MQTT 5; using 3.1.1", s.client_id)
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                log.warning("%s: the broker %s:%d refused the connection: %s", s.client_id, s.host, s.port, exc)
            except aiomqtt.MqttError as exc:
                log.warning("%s: broker %s:%d unavailable: %s", s.client_id, s.host, s.port, exc)
            except OSError as exc:  # e.g. TLS files unreadable, DNS failure
                log.warning("%s: cannot reach the broker %s:%d: %s", s.client_id, s.host, s.port, exc)
            finally:
                await self._lost()
            if established:
                self.attempts = 0
            elif s.protocol == "auto":
                # some 3.1.1-only brokers (amqtt) cannot parse a v5 CONNECT with a will and just
                # drop it: alternate versions until one connects
                self._protocol = aiomqtt.ProtocolVersion.V311 if self.is_v5 else aiomqtt.ProtocolVersion.V5
            if self._stopping.is_set():
                break
            delay = backoff_delay(self.attempts, s.reconnect_min_s, s.reconnect_max_s)
            self.attempts += 1
            log.warning("%s: connecting to the broker %s:%d again in %.1f s (attempt %d)",
                        s.client_id, s.host, s.port, delay, self.attempts)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    def _client_args(self) -> dict[str, Any]:
        s = self.settings
        args: dict[str, Any] = dict(
            hostname=s.host, port=s.port, username=s.username, password=s.password,
            identifier=s.client_id, protocol=self._protocol, keepalive=s.keepalive_s,
            timeout=max(2.0, min(10.0, float(s.keepalive_s))),  # connect + acks
            # Nagle + delayed ACK hold a small message that follows another for ~40 ms
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            logger=logging.getLogger(f"{__name__}.paho"),
        )
        if s.will is not None:
            args["will"] = aiomqtt.Will(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        if not self.is_v5:
            args["clean_session"] = True
        if s.tls_context is not None:
            args["tls_context"] = s.tls_context
            args["tls_insecure"] = s.tls_insecure
        return args

    async def _subscribe(self, client: aiomqtt.Client, subs: list[_Subscription]) -> None:
        plain = [(sub.filter, sub.qos) for sub in subs if not (sub.no_local and self.is_v5)]
        if plain:
            await client.subscribe(plain)
        for sub in subs:
            if sub.no_local and self.is_v5:
                await client.subscribe(sub.filter, sub.qos, options=SubscribeOptions(qos=sub.qos, noLocal=True))

    async def _serve_one_connection(self) -> bool:
        async with aiomqtt.Client(**self._client_args()) as client:
            self._client = client
            self._session_id = uuid.uuid4().hex[:12]
            if self._subs:
                await self._subscribe(client, list(self._subs))
            for callback in list(self._on_connect):
                await _call(callback)
            self._connected.set()
            if self.attempts:
                log.warning("%s: connected to the broker %s:%d (MQTT %s) after %d attempts",
                            self.settings.client_id, self.settings.host, self.settings.port, self.protocol, self.attempts)
            else:
                log.info("%s: connected to the broker (MQTT %s)", self.settings.client_id, self.protocol)
            self.attempts = 0
            reader = self.spawn(self._read(client), "read")
            stop = self.spawn(self._stopping.wait(), "stop-wait")
            done, _ = await asyncio.wait([reader, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, stop):
                task.cancel()
            await asyncio.gather(reader, stop, return_exceptions=True)
            if reader in done and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
            if self._stopping.is_set() and not self._crashed and self.before_disconnect is not None:
                with contextlib.suppress(aiomqtt.MqttError, DetransformerError, TimeoutError):
                    await asyncio.wait_for(self.before_disconnect(), 3.0)
        return True

    async def _lost(self) -> None:
        was = self._client is not None
        self._client = None
        self._session_id = None
        self._connected.clear()
        if was:
            for callback in list(self._on_disconnect):
                try:
                    await _call(callback)
                except Exception:
                    log.exception("%s: disconnect callback failed", self.settings.client_id)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            for sub in self._subs:
                if not message.topic.matches(sub.filter):
                    continue
                try:
                    result = sub.handler(topic, bytes(payload), message.properties)
                    if result is not None:
                        await result
                except aiomqtt.MqttError:
                    raise
                except DetransformerError as exc:
                    log.warning("%s: ignoring message on %s: %s", self.settings.client_id, topic, exc)
                except Exception:  # one hostile message must not end the connection
                    log.exception("%s: ignoring message on %s that broke its handler", self.settings.client_id, topic)
