"""One device's cluster membership over its MQTT session: presence, profile, status, election,
leader commands and the request desk — no model.

``ClusterAgent`` rides on the device's one ``MqttSession`` (``transport/session.py``), which
connects, reconnects with backoff and keeps subscriptions; on every (re)connect the agent
publishes its retained profile and presence (its will is presence ``offline``), keeps a
membership view from the retained device records, runs the lease election of ``election.py``
and publishes ``offline`` on a clean exit. The service wires planning and execution through
hooks (each may be a plain or async function):

* ``on_membership_change(view: MembershipView)`` — online set or a profile changed.
* ``on_become_leader(lease)`` / ``on_lose_leadership(lease | None)``.
* ``on_request(request: Request) -> Reply | Mapping`` — leader only (``cluster/requests.py``).
* ``on_assignment(assignment: Assignment)`` — commands on ``P/assign/<me>`` that pass term
  fencing (and the signature check, with a cluster key).
* ``work_state`` — what this device is doing; published on the status topic every
  ``status_interval_s`` and by ``publish_status()``.

Other topics (run control, Hermes, weights...) are subscribed on ``agent.session`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from paho.mqtt.properties import Properties

from detransformer_edge.cluster import election
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.cluster.leadership import Leadership
from detransformer_edge.cluster.membership import Membership, MembershipView, WorkState
from detransformer_edge.cluster.requests import RequestDesk
from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.protocol import signing
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.messages import (
    Assignment,
    DeviceStatus,
    LeaderLease,
    Presence,
    ProfileRecord,
)
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.transport.session import (
    MqttSession,
    NotConnectedError,
    SessionSettings,
    Will,
)

log = logging.getLogger(__name__)

Hook = Callable[..., Any]


class NotLeaderError(DetransformerError):
    """Only the current leader may do this."""


async def _call(hook: Hook | None, *args: Any) -> Any:
    if hook is None:
        return None
    result = hook(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_load() -> float:
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return 0.0


def tls_context(config: AgentConfig, broker_override: tuple[str, int] | None = None) -> ssl.SSLContext | None:
    """The TLS context of the configured broker (None: plain MQTT)."""
    cfg = config.broker
    use_tls = cfg.tls is not None if broker_override is not None else cfg.endpoint()[2]
    if not use_tls:
        return None
    tls = cfg.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
    if tls and tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls and tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def session_for(config: AgentConfig, broker: tuple[str, int] | None = None) -> MqttSession:
    """The device's one MQTT session: its broker, credentials, TLS and will (presence offline)."""
    cfg = config.broker
    if broker is None and cfg.url is None:
        raise ConfigError("no broker: set broker.url or pass broker=(host, port) from discovery.resolve_broker")
    host, port = broker if broker is not None else cfg.endpoint()[:2]
    user, password = cfg.credentials()
    presence = ClusterTopics(config.cluster).presence
    will = Will(presence.format(config.id), presence.encode(Presence(False)), presence.qos, True)
    return MqttSession(SessionSettings(
        host, port, f"detransformer-{config.cluster}-{config.id}", user, password, cfg.protocol,  # type: ignore[arg-type]
        cfg.keepalive_s, tls_context(config, broker), bool(cfg.tls and cfg.tls.insecure), will,
        cfg.reconnect_min_s, cfg.reconnect_max_s))


class ClusterAgent:
    """One device's cluster membership. Use ``async with agent:``."""

    def __init__(
        self,
        config: AgentConfig,
        profile: ProfileRecord,
        *,
        broker: tuple[str, int] | None = None,
        session: MqttSession | None = None,
        sw_version: str = "",
        clock: Callable[[], float] = time.time,
        on_membership_change: Hook | None = None,
        on_become_leader: Hook | None = None,
        on_lose_leadership: Hook | None = None,
        on_request: Hook | None = None,
        on_assignment: Hook | None = None,
        max_pending_requests: int = 16,
    ) -> None:
        if profile.id != config.id:
            raise ProtocolError(f"profile id {profile.id!r} differs from agent id {config.id!r}")
        self.config = config
        self.profile = profile
        self.topics = ClusterTopics(config.cluster)
        self.sw_version = sw_version or profile.version
        self._owns_session = session is None
        self.session = session if session is not None else session_for(config, broker)
        self.clock = clock
        self.on_membership_change = on_membership_change
        self.on_become_leader = on_become_leader
        self.on_lose_leadership = on_lose_leadership
        self.on_assignment = on_assignment
        self.work_state = WorkState()
        # leader commands are HMAC-signed when the cluster has a key (protocol/signing.py)
        self.signer, self.verifier = signing.from_config(config.cluster_key, config.id)
        # a copy of a request answered within a lease is not answered again (cluster/requests.py)
        self.desk = RequestDesk(self.session, self.topics.reply, on_request, max_pending_requests,
                                copies_window_s=config.election.lease_s, superseded=lambda: self.superseded)
        self.members = Membership()
        self.leadership = Leadership(self, lambda lease: self._safe_hook(self.on_become_leader, lease),
                                     lambda lease: self._safe_hook(self.on_lose_leadership, lease))
        self._loops: list[asyncio.Task[Any]] = []
        t, me = self.topics, config.id
        s = self.session
        s.subscribe(t.presence.filter, self._on_presence, 1)
        s.subscribe(t.profile.filter, self._on_profile, 1)
        s.subscribe(t.status.filter, self._on_status, 0)
        s.subscribe(t.leader.filter, self._on_leader, 1)
        s.subscribe(t.request.filter, self._on_request, 1)
        s.subscribe(t.assign.format(me), self._on_assign, 1)
        s.on_connect(self._on_connect)
        s.on_disconnect(self._on_disconnect)
        s.before_disconnect = self._say_goodbye

    # ------------------------------------------------------------------ public state

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def protocol(self) -> str:
        return self.session.protocol

    @property
    def max_pending_requests(self) -> int:
        return self.desk.max_pending

    @max_pending_requests.setter
    def max_pending_requests(self, value: int) -> None:
        self.desk.max_pending = value

    @property
    def is_leader(self) -> bool:
        return self.leadership.is_leader

    @property
    def holds_lease(self) -> bool:
        """The followed lease record is this session's own, even if its renewal echo is late (a
        busy event loop reads it late): nobody else claimed it, so requests are still ours."""
        lease, session = self.leadership.lease, self.session.session_id
        return (session is not None and lease is not None and lease.record.id == self.config.id
                and lease.record.session == session)

    @property
    def superseded(self) -> bool:
        """Another device holds the lease this one follows. What this device took while it led
        is then the new leader's to answer: the clients send it again there (docs/API.md), so an
        answer from here would be a second one."""
        lease = self.leadership.lease
        return lease is not None and lease.record.id != self.config.id

    @property
    def role(self) -> str:
        if not self.leadership.settled:
            return "starting"
        return "leader" if self.is_leader else "follower"

    @property
    def lease(self) -> LeaderLease | None:
        return self.leadership.record

    @property
    def membership(self) -> MembershipView:
        return self.members.view(self.lease)

    def subscribe(self, topic_filter: str, handler: Any, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler(topic, payload, properties)``."""
        self.session.subscribe(topic_filter, handler, qos)

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.session.wait_connected(timeout)

    def tls_context(self) -> ssl.SSLContext | None:
        return self.session.settings.tls_context

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None) -> None:
        await self.session.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    async def publish_status(self) -> None:
        ws = self.work_state
        status = DeviceStatus(
            id=self.config.id, ready=ws.ready, role=self.role, load=_cpu_load(),
            rss_mb=round(_current_rss_mb(), 1), placement_version=ws.placement_version,
            sub_blocks=ws.sub_blocks, last_latency_ms=ws.last_latency_ms, ts=round(self.clock(), 3),
            weights_percent=ws.weights_percent, loading=ws.loading,
        )
        t = self.topics.status
        await self.publish(t.format(self.config.id), t.encode(status), qos=t.qos, retain=t.retain)

    def sign(self, topic: str, term: int, payload: bytes) -> bytes:
        """``payload`` with its HMAC when the cluster has a key (``protocol/signing.py``)."""
        return payload if self.signer is None else self.signer.sign(topic, term, payload).encode("utf-8")

    async def send_assignment(self, device_id: str, placement_version: int, body: Mapping[str, Any]) -> Assignment:
        """Leader only: publish a term-stamped assignment to ``P/assign/<device_id>``."""
        lease = self.lease
        if not self.is_leader or lease is None:
            raise NotLeaderError(f"agent {self.config.id} is not the leader")
        msg = Assignment(self.config.id, lease.term, placement_version, dict(body))
        t = self.topics.assign
        topic = t.format(device_id)
        await self.publish(topic, self.sign(topic, lease.term, t.encode(msg)), qos=t.qos, retain=t.retain)
        return msg

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> ClusterAgent:
        if self.config.cluster_key is None:
            log.warning("agent %s: no cluster_key configured: leader commands (the lease, assignments, "
                        "run plans) are NOT signed; anyone who can publish on the broker can command "
                        "this device (see docs/OPERATIONS.md)", self.config.id)
        elif signing.key_is_weak(self.config.cluster_key):
            log.warning("agent %s: the cluster key is shorter than %d characters",
                        self.config.id, signing.MIN_KEY_CHARS)
        if self._owns_session:
            self.session.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Clean exit: publish ``offline``, disconnect, cancel every task."""
        if self._owns_session:
            await self.session.close()
        await self._stop_loops()

    async def abort(self) -> None:
        """Simulate a crash (tests): drop the TCP connection without DISCONNECT or ``offline``."""
        await self.session.abort()
        await self._stop_loops()

    async def _stop_loops(self) -> None:
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    async def _on_connect(self) -> None:
        """Every (re)connect: a new session must claim anew; announce ourselves; start the loops."""
        self.leadership.reset()
        await self._stop_loops()
        t, me = self.topics, self.config.id
        await self.publish(t.profile.format(me), t.profile.encode(self.profile), qos=1, retain=True)
        await self.publish(t.presence.format(me), t.presence.encode(Presence(True)), qos=1, retain=True)
        self._loops = [self.session.spawn(self.leadership.loop(), "election"),
                       self.session.spawn(self._status_loop(), "status")]

    async def _on_disconnect(self) -> None:
        await self._stop_loops()
        await self.leadership.check_role()

    async def _say_goodbye(self) -> None:
        t = self.topics.presence
        await self.session.publish(t.format(self.config.id), t.encode(Presence(False)), qos=1, retain=True,
                                   timeout=2.0)

    # ------------------------------------------------------------------ loops

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(NotConnectedError):
                await self.publish_status()
            await asyncio.sleep(self.config.status_interval_s)

    # ------------------------------------------------------------------ election and membership

    async def _safe_hook(self, hook: Hook | None, *args: Any) -> None:
        try:
            await _call(hook, *args)
        except Exception:
            log.exception("agent %s: hook %s failed", self.config.id, getattr(hook, "__name__", hook))

    async def _membership_maybe_changed(self) -> None:
        self.leadership.wake.set()
        if self.members.changed():
            await self._safe_hook(self.on_membership_change, self.membership)

    # ------------------------------------------------------------------ handlers

    def _mine_and_live(self, dev: str) -> bool:
        return dev == self.config.id and self.connected and not self.session.closing

    async def _on_presence(self, topic: str, payload: bytes, _props: object) -> None:
        t, dev = self.topics.presence, self.topics.presence.match(topic)
        if not dev:
            return
        if self._mine_and_live(dev) and (not payload or not t.decode(payload).online):
            # someone cleared our presence, or a stale will of our previous connection: we are here
            await self.publish(topic, t.encode(Presence(True)), qos=1, retain=True)
            self.members.presence[dev] = True
        elif not payload:
            self.members.presence.pop(dev, None)
        else:
            self.members.presence[dev] = t.decode(payload).online
        await self._membership_maybe_changed()

    async def _on_profile(self, topic: str, payload: bytes, _props: object) -> None:
        t, dev, me = self.topics.profile, self.topics.profile.match(topic), self.config.id
        if not dev:
            return
        if not payload:
            self.members.profiles.pop(dev, None)
        else:
            rec = t.decode(payload)
            if rec.id != dev:
                raise ProtocolError(f"profile on {topic} names device {rec.id!r}")
            self.members.profiles[dev] = rec
        if self._mine_and_live(dev) and self.members.profiles.get(me) != self.profile:
            log.warning("agent %s: restoring its profile overwritten on %s", me, topic)
            await self.publish(topic, t.encode(self.profile), qos=1, retain=True)
            self.members.profiles[me] = self.profile
        await self._membership_maybe_changed()

    def _on_status(self, topic: str, payload: bytes, _props: object) -> None:
        dev = self.topics.status.match(topic)
        if dev and payload:
            status = self.members.status[dev] = self.topics.status.decode(payload)
            if dev == self.config.id:
                self.leadership.heard_self(status.ts)

    async def _on_leader(self, topic: str, payload: bytes, _props: object) -> None:
        if payload:
            await self.leadership.on_record(topic, payload)

    def _on_request(self, topic: str, payload: bytes, props: Any) -> None:
        if self.is_leader:
            self.desk.take(payload, props)
        elif self.holds_lease:  # leading still, or back from a cut link? (Leadership.still_leading)
            self.session.spawn(self.leadership.take_if_still_leading(self.desk.take, payload, props), "request")

    async def _on_assign(self, topic: str, payload: bytes, _props: object) -> None:
        msg = self.topics.assign.decode(payload)
        if self.verifier is not None:
            stamp = self.verifier.verify(topic, payload, "assign")  # SignatureError: ignored, logged
            if (stamp.leader, stamp.term) != (msg.leader, msg.term):
                raise signing.SignatureError(f"assign: signed by {stamp.leader} term {stamp.term}, "
                                             f"but names {msg.leader} term {msg.term}")
        if election.accepts_command(self.leadership.lease, msg.leader, msg.term):
            await self._safe_hook(self.on_assignment, msg)
        else:
            log.warning("dropping assignment from %s term %d (stale)", msg.leader, msg.term)


__all__ = ["ClusterAgent", "NotLeaderError", "session_for", "tls_context"]
