"""MQTT transport over aiomqtt (MQTT 3.1.1 baseline, 5 where the broker offers it).

Topics (``P`` is the cluster prefix, e.g. ``detransformer/home``)::

    P/run/<req>/<step>/<src>/to/<dst>             one device
    P/run/<req>/<step>/<src>/all/<d1>,<d2>,...    fan-out: ONE publish, the broker copies it

Each device subscribes once, at start, to two wildcards: ``P/run/+/+/+/to/<me>`` (its inbox)
and ``P/run/+/+/+/all/+`` (every fan-out). Why not subscribe per request: MQTT 3.1.1 gives a
publisher no way to know that a fresh subscription is active, so per-request subscriptions
would need an extra barrier round trip per request. With the fixed wildcards a device is
ready as soon as ``start()`` returns. The price is that a fan-out also reaches devices not
in the receiver list (and, on 3.1.1, the sender itself: no "no local" option); they drop it
on the topic alone without decoding. With MQTT 5 the fan-out subscription sets
``no_local`` so the sender's own copy is not sent back.

Activations are QoS 0: a lost message surfaces as a request-level timeout, which the
executor retries or re-plans; QoS 1 would double the round trips on every hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import uuid
from typing import Literal

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from detransformer_edge.transport.base import MailboxLimits, Transport
from detransformer_edge.transport.errors import TransportClosed, TransportError

__all__ = ["MqttTransport", "run_topic"]

log = logging.getLogger(__name__)

_QOS_ACTIVATION = 0
_RECONNECT_MIN_S = 0.1  # after a lost connection: retry quickly, then back off
_RECONNECT_MAX_S = 2.0


def run_topic(prefix: str, req: str, step: str, src: str, dsts: list[str]) -> str:
    """Topic of one activation message; a single receiver uses ``to``, several ``all``."""
    if len(dsts) == 1:
        return f"{prefix}/run/{req}/{step}/{src}/to/{dsts[0]}"
    return f"{prefix}/run/{req}/{step}/{src}/all/{','.join(dsts)}"


class MqttTransport(Transport):
    """One device's endpoint: one aiomqtt client and one dispatch task."""

    def __init__(
        self,
        device_id: str,
        hostname: str = "127.0.0.1",
        port: int = 1883,
        *,
        prefix: str = "detransformer/home",
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        limits: MailboxLimits | None = None,
        tls_context: ssl.SSLContext | None = None,
    ):
        super().__init__(device_id, limits)
        if not prefix or any(c in prefix for c in "+#") or prefix.endswith("/"):
            raise TransportError(f"invalid topic prefix {prefix!r}: no wildcards, no trailing /")
        if protocol not in ("3.1.1", "5"):
            raise TransportError(f"protocol must be '3.1.1' or '5', got {protocol!r}")
        self.hostname = hostname
        self.port = port
        self.prefix = prefix
        self.protocol = protocol
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._tls_context = tls_context  # None: plain MQTT
        self._run_prefix = f"{prefix}/run/"
        self._client: aiomqtt.Client | None = None
        self._dispatch_task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        client = await self._connect()
        self._dispatch_task = asyncio.create_task(
            self._dispatch(client), name=f"mqtt-dispatch-{self.device_id}"
        )

    async def _connect(self) -> aiomqtt.Client:
        v5 = self.protocol == "5"
        client = aiomqtt.Client(
            self.hostname,
            self.port,
            identifier=f"dte-{self.device_id}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else True,
            username=self._username,
            password=self._password,
            keepalive=self._keepalive,
            tls_context=self._tls_context,
            logger=logging.getLogger(f"{__name__}.paho"),
            # Nagle + delayed ACK hold a small message that follows another for ~40 ms;
            # a reduce-scatter sends n-1 messages back to back, so turn Nagle off.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as e:
            raise TransportError(
                f"device {self.device_id!r} cannot connect to MQTT broker "
                f"{self.hostname}:{self.port} ({self.protocol}): {e}"
            ) from e
        self._client = client
        try:
            base = f"{self.prefix}/run/+/+/+"
            await client.subscribe(f"{base}/to/{self.device_id}", qos=_QOS_ACTIVATION)
            await client.subscribe(
                f"{base}/all/+",
                qos=_QOS_ACTIVATION,
                options=SubscribeOptions(qos=_QOS_ACTIVATION, noLocal=True) if v5 else None,
            )
        except aiomqtt.MqttError as e:
            await self._disconnect()
            raise TransportError(f"subscribe failed on {self.hostname}:{self.port}: {e}") from e
        return client

    async def _close(self) -> None:
        task, self._dispatch_task = self._dispatch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._disconnect()

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)

    async def _send(self, dsts: list[str], req: str, step: str, payload: bytes) -> None:
        if self._client is None:
            raise TransportClosed(f"transport {self.device_id!r} is not connected")
        topic = run_topic(self.prefix, req, step, self.device_id, dsts)
        try:
            await self._client.publish(topic, payload, qos=_QOS_ACTIVATION)
        except aiomqtt.MqttError as e:
            raise TransportError(f"publish to {topic} failed: {e}") from e

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        """Route every incoming message into the mailbox. If the link drops, fail the pending
        receives (their requests are lost) and reconnect with backoff until it is back."""
        attempt = 0
        while True:
            try:
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    try:
                        self._on_message(message.topic.value, bytes(payload))
                    except Exception:  # one bad message must not kill the device's inbox
                        log.exception(
                            "device %s: dropping message on %s", self.device_id, message.topic
                        )
            except aiomqtt.MqttError as e:
                log.warning("device %s lost the broker connection: %s", self.device_id, e)
                self._mailbox.interrupt(TransportError(f"broker connection lost: {e}"))
            await self._disconnect()
            while True:
                await asyncio.sleep(min(_RECONNECT_MAX_S, _RECONNECT_MIN_S * 2**attempt))
                attempt = min(attempt + 1, 16)
                try:
                    client = await self._connect()
                except TransportError as e:
                    log.debug("device %s: reconnect failed: %s", self.device_id, e)
                    continue
                log.info("device %s reconnected to the broker", self.device_id)
                attempt = 0
                break

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not topic.startswith(self._run_prefix):
            self.stats.dropped_unwanted += 1
            return
        parts = topic[len(self._run_prefix) :].split("/")
        if len(parts) != 5:
            self.stats.dropped_unwanted += 1
            return
        req, step, src, kind, dst = parts
        me = self.device_id
        if src == me or not (
            (kind == "to" and dst == me) or (kind == "all" and me in dst.split(","))
        ):
            self.stats.dropped_unwanted += 1  # own echo or a fan-out for other devices
            return
        self._mailbox.deliver(req, step, src, payload)
