"""MQTT transport: activations over the device's one MQTT session (``transport/session.py``).

The topics come from the ``ActivationTopics`` it is given (``protocol.topics.RunTopics``, the one
place they are built): every device subscribes once, at start, to its inbox and to every
fan-out. Why not subscribe per request: MQTT 3.1.1 gives a publisher no way to know that a
fresh subscription is active, so per-request subscriptions would need an extra barrier round
trip per request. With the fixed wildcards a device is ready as soon as ``start()`` returns.
The price is that a fan-out also reaches devices not in its receiver list (and, on 3.1.1, the
sender itself: no "no local" option); they drop it on the topic alone without decoding. With
MQTT 5 the fan-out subscription sets ``no_local`` so the sender's own copy is not sent back.

Activations are QoS 0: a lost message surfaces as a request-level timeout, which the
executor retries or re-plans; QoS 1 would double the round trips on every hop.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from typing import Literal, Protocol

from detransformer_edge.transport.base import MailboxLimits, Transport
from detransformer_edge.transport.errors import TransportClosed, TransportError
from detransformer_edge.transport.session import MqttSession, NotConnectedError, SessionSettings

__all__ = ["ActivationTopics", "MqttTransport"]

log = logging.getLogger(__name__)

_QOS_ACTIVATION = 0


class ActivationAddress(Protocol):
    req: str
    step: str
    src: str
    dsts: tuple[str, ...]


class ActivationTopics(Protocol):
    """Where activations go (``protocol.topics.RunTopics``)."""

    def activation(self, req: str, step: str, src: str, dsts: list[str] | tuple[str, ...]) -> str: ...

    def inbox_filters(self, device_id: str) -> tuple[str, str]: ...

    def parse_activation(self, topic: str) -> ActivationAddress | None: ...


class MqttTransport(Transport):
    """One device's endpoint on an MQTT session (the agent's own, or one made by ``connect``)."""

    def __init__(self, device_id: str, session: MqttSession, topics: ActivationTopics, *,
                 limits: MailboxLimits | None = None, owns_session: bool = False,
                 connect_timeout_s: float = 10.0) -> None:
        super().__init__(device_id, limits)
        self.session = session
        self.topics = topics
        self._owns_session = owns_session
        self._connect_timeout_s = connect_timeout_s  # own session: how long start() waits for the broker

    @classmethod
    def connect(
        cls,
        device_id: str,
        hostname: str,
        port: int,
        topics: ActivationTopics,
        *,
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        limits: MailboxLimits | None = None,
        tls_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
    ) -> MqttTransport:
        """A transport with an MQTT session of its own (tools, benchmarks and tests)."""
        if protocol not in ("3.1.1", "5"):
            raise TransportError(f"protocol must be '3.1.1' or '5', got {protocol!r}")
        settings = SessionSettings(hostname, port, f"dte-{device_id}-{uuid.uuid4().hex[:8]}", username, password,
                                   protocol, keepalive, tls_context, reconnect_min_s=0.1, reconnect_max_s=2.0)
        return cls(device_id, MqttSession(settings), topics, limits=limits, owns_session=True,
                   connect_timeout_s=connect_timeout_s)

    async def _start(self) -> None:
        inbox, fan_out = self.topics.inbox_filters(self.device_id)
        self.session.subscribe(inbox, self._on_message, _QOS_ACTIVATION)
        self.session.subscribe(fan_out, self._on_message, _QOS_ACTIVATION, no_local=True)
        self.session.on_disconnect(self._lost)
        if self._owns_session:
            self.session.start()
            try:
                await self.session.wait_connected(self._connect_timeout_s)
            except TimeoutError as exc:
                await self.session.close()
                s = self.session.settings
                raise TransportError(f"device {self.device_id!r} cannot connect to MQTT broker {s.host}:{s.port} "
                                     f"(MQTT {s.protocol}) within {self._connect_timeout_s:g} s") from exc

    def _lost(self) -> None:
        """The link dropped: every pending receive fails now (its request is lost); the session
        reconnects by itself and later requests work again."""
        log.warning("device %s lost the broker connection", self.device_id)
        self._mailbox.interrupt(TransportError("broker connection lost"))

    async def _close(self) -> None:
        if self._owns_session:
            await self.session.close()

    async def _send(self, dsts: list[str], req: str, step: str, payload: bytes) -> None:
        topic = self.topics.activation(req, step, self.device_id, dsts)
        try:
            await self.session.publish(topic, payload, qos=_QOS_ACTIVATION)
        except NotConnectedError as exc:
            raise TransportClosed(f"transport {self.device_id!r}: {exc}") from exc

    def _on_message(self, topic: str, payload: bytes, _properties: object = None) -> None:
        address = self.topics.parse_activation(topic)
        me = self.device_id
        if address is None or address.src == me or me not in address.dsts:
            self.stats.dropped_unwanted += 1  # not an activation, our own echo, or for others
            return
        self._mailbox.deliver(address.req, address.step, address.src, payload)
