"""The MQTT shell of an agent, without the model: presence, profile, election, membership.

`ClusterAgent` connects to the broker (MQTT 5 where offered, else 3.1.1), publishes its
retained profile and presence with LWT `offline`, republishes both on every reconnect
(reconnect loop with exponential backoff), keeps a membership view from the presence/profile
topics, runs the lease election of election.py, and publishes `offline` on a clean exit.

The lead wires planning and execution through hooks (each may be a plain or async function):

* `on_membership_change(view: MembershipView)` — online set or a profile changed.
* `on_become_leader(lease: LeaderLease)` / `on_lose_leadership(lease: LeaderLease | None)`.
* `on_request(request: Request) -> Reply | Mapping` — leader only; the mapping is the
  `result`. Exceptions become error replies (`ProtocolError` → bad_request, others internal).
* `on_assignment(assignment: Assignment)` — commands on `P/assign/<me>` that pass term fencing.
* `subscribe(filter, handler)` — extra topics (e.g. `hermes/nlu/query`), kept across reconnects.
* `work_state` — what this device is doing (ready, placement, sub-blocks, latency); published
  on the status topic every `status_interval_s` and by `publish_status()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detransformer_edge.cluster import election, signing
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.cluster.topics import (
    Assignment,
    ClusterTopics,
    DeviceStatus,
    LeaderLease,
    Presence,
    ProfileRecord,
    ProtocolError,
    Reply,
    Request,
    load_object,
)
from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.integrations import homeassistant

log = logging.getLogger(__name__)

Hook = Callable[..., Any]
MessageHandler = Callable[[aiomqtt.Message], Any]


class AgentNotConnectedError(DetransformerError):
    """The agent has no broker connection right now; retry after it reconnects."""


class NotLeaderError(DetransformerError):
    """Only the current leader may do this."""


class _Busy(Exception):
    """Internal: too many requests in flight."""


@dataclass(frozen=True)
class Member:
    id: str
    online: bool
    profile: ProfileRecord | None = None
    status: DeviceStatus | None = None


@dataclass(frozen=True)
class MembershipView:
    """The agent's picture of the cluster at one instant."""

    members: Mapping[str, Member]
    lease: LeaderLease | None  # the lease record this agent follows (may be expired)

    @property
    def online(self) -> tuple[str, ...]:
        """Online devices whose profile is known, sorted by id."""
        return tuple(sorted(m.id for m in self.members.values() if m.online and m.profile))

    def profiles(self) -> dict[str, ProfileRecord]:
        return {i: p for i in self.online if (p := self.members[i].profile) is not None}

    def scores(self) -> dict[str, float]:
        return {i: p.score for i, p in self.profiles().items()}


@dataclass(frozen=True)
class WorkState:
    """What the model side reports about this device (filled in by the executor)."""

    ready: bool = False
    placement_version: int = 0
    sub_blocks: tuple[tuple[int, int], ...] = ()
    last_latency_ms: float | None = None
    weights_percent: float | None = None  # percent of the streamed weights received (None: not streaming)


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [low/2, min(high, low * 2^attempt)]."""
    cap = min(high, low * (2 ** min(attempt, 30)))
    return (rng or random).uniform(low / 2, cap)


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


class ClusterAgent:
    """One device's cluster membership over MQTT. Use `async with agent:` or `await run()`."""

    def __init__(
        self,
        config: AgentConfig,
        profile: ProfileRecord,
        *,
        broker: tuple[str, int] | None = None,
        sw_version: str = "",
        clock: Callable[[], float] = time.time,
        on_membership_change: Hook | None = None,
        on_become_leader: Hook | None = None,
        on_lose_leadership: Hook | None = None,
        on_request: Hook | None = None,
        on_assignment: Hook | None = None,
        max_pending_requests: int = 16,
    ) -> None:
        if broker is None and config.broker.url is None:
            raise ConfigError(
                "no broker: set broker.url or pass broker=(host, port) from discovery.resolve_broker"
            )
        if profile.id != config.id:
            raise ProtocolError(f"profile id {profile.id!r} differs from agent id {config.id!r}")
        self.config = config
        self.profile = profile
        self.topics = ClusterTopics(config.cluster)
        self.sw_version = sw_version or profile.version
        self._broker_override = broker
        self._clock = clock
        self.on_membership_change = on_membership_change
        self.on_become_leader = on_become_leader
        self.on_lose_leadership = on_lose_leadership
        self.on_request = on_request
        self.on_assignment = on_assignment
        self.work_state = WorkState()
        # leader commands are HMAC-signed when the cluster has a key (cluster/signing.py)
        self.signer, self.verifier = signing.from_config(config.cluster_key, config.id)
        self.max_pending_requests = max_pending_requests  # beyond this, reply "busy"
        self._pending_requests = 0

        proto = config.broker.protocol
        self._protocol = aiomqtt.ProtocolVersion.V311 if proto == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self._client: aiomqtt.Client | None = None
        self._session: str | None = None
        self._settled = False
        self._stopping = asyncio.Event()
        self._crashed = False
        self._established = False
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._run_task: asyncio.Task[None] | None = None

        # membership + election state
        self._presence: dict[str, bool] = {}
        self._profiles: dict[str, ProfileRecord] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._lease: election.ObservedLease | None = None
        self._vacant_since: float | None = None
        self._conflict = False
        self._last_publish_at: float | None = None
        self._was_leader = False
        self._last_view_key: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ public state

    @property
    def connected(self) -> bool:
        return self._client is not None and self._session is not None

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    @property
    def is_leader(self) -> bool:
        return election.is_leader(self._snapshot())

    @property
    def holds_lease(self) -> bool:
        """The followed lease record is this session's own, even if its renewal echo is late (a
        busy event loop reads it late): nobody else claimed it, so requests are still ours."""
        lease = self._lease
        return (self._session is not None and lease is not None and lease.record.id == self.config.id
                and lease.record.session == self._session)

    @property
    def role(self) -> str:
        if not self._settled:
            return "starting"
        return "leader" if self.is_leader else "follower"

    @property
    def lease(self) -> LeaderLease | None:
        return self._lease.record if self._lease else None

    @property
    def membership(self) -> MembershipView:
        ids = set(self._presence) | set(self._profiles)
        members = {
            i: Member(i, self._presence.get(i, False), self._profiles.get(i), self._status.get(i))
            for i in ids
        }
        return MembershipView(members, self.lease)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route messages matching `topic_filter` to `handler`; re-subscribed on reconnect."""
        self._handlers.append((topic_filter, qos, handler))
        if self._client is not None:
            self._spawn(self._client.subscribe(topic_filter, qos), "subscribe")

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False,
                      properties: Properties | None = None) -> None:
        client = self._client
        if client is None or self._session is None:
            raise AgentNotConnectedError(f"agent {self.config.id} is not connected to the broker")
        await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    async def publish_status(self) -> None:
        ws = self.work_state
        status = DeviceStatus(
            id=self.config.id,
            ready=ws.ready,
            role=self.role,
            load=_cpu_load(),
            rss_mb=round(_current_rss_mb(), 1),
            placement_version=ws.placement_version,
            sub_blocks=ws.sub_blocks,
            last_latency_ms=ws.last_latency_ms,
            ts=round(self._clock(), 3),
            weights_percent=ws.weights_percent,
        )
        t = self.topics.status
        await self.publish(t.format(self.config.id), t.encode(status), qos=t.qos, retain=t.retain)

    async def send_assignment(self, device_id: str, placement_version: int,
                              body: Mapping[str, Any]) -> Assignment:
        """Leader only: publish a term-stamped assignment to `P/assign/<device_id>`."""
        lease = self.lease
        if not self.is_leader or lease is None:
            raise NotLeaderError(f"agent {self.config.id} is not the leader")
        msg = Assignment(self.config.id, lease.term, placement_version, dict(body))
        t = self.topics.assign
        topic, payload = t.format(device_id), t.encode(msg)
        if self.signer is not None:
            payload = self.signer.sign(topic, lease.term, payload).encode("utf-8")
        await self.publish(topic, payload, qos=t.qos, retain=t.retain)
        return msg

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> ClusterAgent:
        self._run_task = asyncio.create_task(self.run(), name=f"agent-{self.config.id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Clean exit: publish `offline`, disconnect, cancel every task."""
        self._stopping.set()
        if self._run_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._run_task), 5.0)
            except TimeoutError:
                self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task
            self._run_task = None
        await self._cancel_tasks()

    async def abort(self) -> None:
        """Simulate a crash (tests): drop the TCP connection without DISCONNECT or `offline`,
        so the broker fires the LWT, and stop without reconnecting."""
        self._crashed = True
        self._stopping.set()
        client = self._client
        if client is not None:
            sock = client._client.socket()  # paho's socket; no public API for a hard drop
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        await self.stop()

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff until `stop()`."""
        attempt = 0
        cfg = self.config.broker
        if self.config.cluster_key is None:
            log.warning("agent %s: no cluster_key configured: leader commands (assignments, run "
                        "plans) are NOT signed; anyone who can publish on the broker can command "
                        "this device (see docs/OPERATIONS.md)", self.config.id)
        elif signing.key_is_weak(self.config.cluster_key):
            log.warning("agent %s: the cluster key is shorter than %d characters",
                        self.config.id, signing.MIN_KEY_CHARS)
        while not self._stopping.is_set():
            self._established = False
            try:
                await self._serve_one_connection()
            except MqttConnectError as exc:
                if (
                    cfg.protocol == "auto"
                    and self._protocol == aiomqtt.ProtocolVersion.V5
                    and exc.rc in (1, 132)  # 3.1.1 "unacceptable protocol" / v5 "unsupported"
                ):
                    log.info("broker refuses MQTT 5; using 3.1.1")
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                log.warning("agent %s: broker refused the connection: %s", self.config.id, exc)
            except aiomqtt.MqttError as exc:
                log.warning("agent %s: broker connection lost: %s", self.config.id, exc)
            except OSError as exc:  # e.g. TLS files unreadable, DNS failure
                log.warning("agent %s: cannot reach the broker: %s", self.config.id, exc)
            finally:
                await self._disconnected()
            if self._established:
                attempt = 0
            elif cfg.protocol == "auto":
                # some 3.1.1-only brokers (amqtt) cannot parse a v5 CONNECT with a will and just
                # drop it: alternate versions until one connects
                self._protocol = (
                    aiomqtt.ProtocolVersion.V311
                    if self._protocol == aiomqtt.ProtocolVersion.V5
                    else aiomqtt.ProtocolVersion.V5
                )
            if self._stopping.is_set():
                break
            delay = backoff_delay(attempt, cfg.reconnect_min_s, cfg.reconnect_max_s)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    # ------------------------------------------------------------------ one connection

    def _client_args(self) -> dict[str, Any]:
        cfg = self.config.broker
        if self._broker_override is not None:
            host, port = self._broker_override
            use_tls = cfg.tls is not None
        else:
            host, port, use_tls = cfg.endpoint()
        user, password = cfg.credentials()
        presence = self.topics.presence
        args: dict[str, Any] = dict(
            hostname=host,
            port=port,
            username=user,
            password=password,
            identifier=f"detransformer-{self.config.cluster}-{self.config.id}",
            protocol=self._protocol,
            will=aiomqtt.Will(
                presence.format(self.config.id),
                presence.encode(Presence(False)),
                qos=presence.qos,
                retain=True,
            ),
            keepalive=cfg.keepalive_s,
            timeout=max(2.0, min(10.0, float(cfg.keepalive_s))),  # connect + acks
            # Nagle + delayed ACK hold a small reply that follows another publish for ~40 ms.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        if self._protocol == aiomqtt.ProtocolVersion.V311:
            args["clean_session"] = True
        if use_tls:
            tls = cfg.tls
            args["tls_context"] = self._tls_context()
            args["tls_insecure"] = bool(tls and tls.insecure)
        return args

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.broker.tls
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
        if tls and tls.cert_file:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if tls and tls.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context this agent's broker connections use (None: plain MQTT); other
        clients of the same device (the tensor transport) connect with it too."""
        cfg = self.config.broker
        use_tls = cfg.tls is not None if self._broker_override is not None else cfg.endpoint()[2]
        return self._tls_context() if use_tls else None

    async def _serve_one_connection(self) -> None:
        t = self.topics
        async with aiomqtt.Client(**self._client_args()) as client:
            self._client = client
            self._established = True
            self._session = uuid.uuid4().hex[:12]
            self._settled = False
            self._conflict = False
            filters = [
                (t.presence.filter, 1),
                (t.profile.filter, 1),
                (t.status.filter, 0),
                (t.leader.filter, 1),
                (t.request.filter, 1),
                (t.assign.format(self.config.id), 1),
            ]
            if self.config.homeassistant:
                filters.append((f"{self.config.homeassistant_prefix}/status", 1))
            filters += [(f, q) for f, q, _ in self._handlers]
            await client.subscribe(filters)
            await self._announce()
            self._connected.set()
            log.info("agent %s connected (MQTT %s, session %s)", self.config.id, self.protocol, self._session)
            loops = [
                self._spawn(self._read_messages(client), "messages"),
                self._spawn(self._election_loop(), "election"),
                self._spawn(self._status_loop(), "status"),
            ]
            stop = self._spawn(self._stopping.wait(), "stop-wait")
            done, _ = await asyncio.wait([*loops, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in (*loops, stop):
                task.cancel()
            await asyncio.gather(*loops, stop, return_exceptions=True)
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if self._stopping.is_set() and not self._crashed:
                await self._say_goodbye(client)

    async def _announce(self) -> None:
        """Retained profile + presence `online` (+ HA discovery); on every (re)connect."""
        t, me = self.topics, self.config.id
        await self.publish(t.profile.format(me), t.profile.encode(self.profile), qos=1, retain=True)
        await self.publish(t.presence.format(me), t.presence.encode(Presence(True)), qos=1, retain=True)
        await self._publish_ha_discovery()

    async def _publish_ha_discovery(self) -> None:
        if not self.config.homeassistant:
            return
        for topic, payload in homeassistant.discovery_messages(
            self.topics, self.profile, self.sw_version, self.config.homeassistant_prefix
        ):
            await self.publish(topic, payload, qos=1, retain=True)

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        t = self.topics.presence
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                t.format(self.config.id), t.encode(Presence(False)), qos=1, retain=True, timeout=2.0
            )

    async def _disconnected(self) -> None:
        self._client = None
        self._session = None
        self._connected.clear()
        await self._check_role()

    # ------------------------------------------------------------------ tasks

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"agent-{self.config.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ProtocolError):
                log.warning("agent task %s: %s", task.get_name(), exc)
            elif not isinstance(exc, aiomqtt.MqttError):
                log.error("agent task %s failed", task.get_name(), exc_info=exc)

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ loops

    async def _election_loop(self) -> None:
        el = self.config.election
        await asyncio.sleep(el.settle)  # let retained presence/profile/leader arrive first
        self._settled = True
        tick = min(el.lease_s / 8, 1.0)
        while True:
            await self._election_step()
            self._wake.clear()
            # asyncio.timeout, not wait_for: wait_for can swallow a cancel (Python 3.11)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()

    async def _status_loop(self) -> None:
        while True:
            await self.publish_status()
            await asyncio.sleep(self.config.status_interval_s)

    async def _read_messages(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._dispatch(message)
            except ProtocolError as exc:
                log.warning("ignoring bad message on %s: %s", message.topic, exc)
            except aiomqtt.MqttError:
                raise
            except Exception:  # one hostile message must not end the connection
                log.exception("ignoring message on %s that broke its handler", message.topic)

    # ------------------------------------------------------------------ election

    def _snapshot(self) -> election.ElectionSnapshot:
        el = self.config.election
        return election.ElectionSnapshot(
            self_id=self.config.id,
            session=self._session if self._settled else None,
            now=self._clock(),
            lease=self._lease,
            members={i: p.score for i, p in self._profiles.items() if self._presence.get(i)},
            offline=frozenset(i for i, on in self._presence.items() if not on),
            vacant_since=self._vacant_since,
            conflict=self._conflict,
            last_publish_at=self._last_publish_at,
            lease_s=el.lease_s,
            stagger_s=el.stagger,
        )

    async def _election_step(self) -> None:
        snap = self._snapshot()
        self._vacant_since = election.next_vacant_since(snap)
        action = election.decide(snap)
        if isinstance(action, election.PublishLease):
            self._last_publish_at = snap.now
            log.info("agent %s: %s lease term %d", self.config.id, action.reason, action.record.term)
            t = self.topics.leader
            props = None
            if self._protocol == aiomqtt.ProtocolVersion.V5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.MessageExpiryInterval = max(1, math.ceil(action.record.lease_s))
            with contextlib.suppress(AgentNotConnectedError):
                await self.publish(t.format(), t.encode(action.record), qos=t.qos, retain=True,
                                   properties=props)
        await self._check_role()

    async def _check_role(self) -> None:
        leader = self.is_leader
        if leader and not self._was_leader:
            self._was_leader = True
            log.info("agent %s became leader (term %s)", self.config.id, self.lease and self.lease.term)
            await self._safe_hook(self.on_become_leader, self.lease)
        elif not leader and self._was_leader:
            self._was_leader = False
            log.info("agent %s stepped down", self.config.id)
            await self._safe_hook(self.on_lose_leadership, self.lease)

    async def _safe_hook(self, hook: Hook | None, *args: Any) -> None:
        try:
            await _call(hook, *args)
        except Exception:
            log.exception("agent %s: hook %s failed", self.config.id, getattr(hook, "__name__", hook))

    async def _membership_maybe_changed(self) -> None:
        view = self.membership
        key = tuple(sorted((i, view.members[i].profile) for i in view.online))
        if key != self._last_view_key:
            self._last_view_key = key
            await self._safe_hook(self.on_membership_change, view)

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload or "").encode()
        t, me = self.topics, self.config.id

        if (dev := t.presence.match(topic)) is not None:
            if not payload and dev == me and self.connected and not self._stopping.is_set():
                # someone cleared our retained presence: we are here, say so again
                await self.publish(topic, t.presence.encode(Presence(True)), qos=1, retain=True)
                self._presence[dev] = True
            elif not payload:
                self._presence.pop(dev, None)
            else:
                online = t.presence.decode(payload).online
                self._presence[dev] = online
                if dev == me and not online and self.connected and not self._stopping.is_set():
                    # a stale LWT of our previous connection: we are here, say so again
                    await self.publish(topic, t.presence.encode(Presence(True)), qos=1, retain=True)
                    self._presence[dev] = True
            self._wake.set()
            await self._membership_maybe_changed()
        elif (dev := t.profile.match(topic)) is not None:
            if not payload:
                self._profiles.pop(dev, None)
            else:
                rec = t.profile.decode(payload)
                if rec.id != dev:
                    raise ProtocolError(f"profile on {topic} names device {rec.id!r}")
                self._profiles[dev] = rec
            if dev == me and self._profiles.get(me) != self.profile and self.connected \
                    and not self._stopping.is_set():
                # someone cleared or overwrote our retained profile: publish ours again
                log.warning("agent %s: restoring its profile overwritten on %s", me, topic)
                await self.publish(topic, t.profile.encode(self.profile), qos=1, retain=True)
                self._profiles[me] = self.profile
            self._wake.set()
            await self._membership_maybe_changed()
        elif (dev := t.status.match(topic)) is not None:
            if payload:
                self._status[dev] = t.status.decode(payload)
        elif t.leader.match(topic) is not None:
            if payload:
                self._observe_lease(t.leader.decode(payload))
                self._wake.set()
                await self._check_role()
        elif t.request.match(topic) is not None:
            if self.is_leader or self.holds_lease:
                # counted here, not when the task starts: a burst is dispatched before any runs
                busy = self._pending_requests >= self.max_pending_requests
                if not busy:
                    self._pending_requests += 1
                self._spawn(self._serve_request(message, payload, busy), "request")
        elif t.assign.match(topic) == me:
            msg = t.assign.decode(payload)
            if self.verifier is not None:
                stamp = self.verifier.verify(topic, payload, "assign")  # SignatureError: ignored
                if (stamp.leader, stamp.term) != (msg.leader, msg.term):
                    raise signing.SignatureError(
                        f"assign: signed by {stamp.leader} term {stamp.term}, "
                        f"but names {msg.leader} term {msg.term}")
            if election.accepts_command(self._lease, msg.leader, msg.term):
                await self._safe_hook(self.on_assignment, msg)
            else:
                log.warning("dropping assignment from %s term %d (stale)", msg.leader, msg.term)
        elif homeassistant.should_resend(topic, payload, self.config.homeassistant_prefix):
            await self._publish_ha_discovery()
        for topic_filter, _, handler in self._handlers:
            if message.topic.matches(topic_filter):
                self._spawn(_call(handler, message), "handler")

    def _observe_lease(self, record: LeaderLease) -> None:
        prev = self._lease
        obs = election.observe_lease(prev, record, self._clock(), self.config.id)
        if obs.conflict and prev is not None and prev.record.session == self._session:
            self._conflict = True
        if obs.accepted and (prev is None or obs.lease is None or obs.lease.record.term != prev.record.term):
            self._conflict = False
        self._lease = obs.lease

    async def _serve_request(self, message: aiomqtt.Message, payload: bytes, busy: bool) -> None:
        try:
            await self._answer_request(message, payload, busy)
        finally:
            if not busy:
                self._pending_requests -= 1

    async def _answer_request(self, message: aiomqtt.Message, payload: bytes, busy: bool) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        request_id: str | None = None
        reply_to: str | None = response_topic
        try:
            raw = load_object(payload, "request")
            request_id = raw.get("id") if isinstance(raw.get("id"), str) else None
            reply_to = reply_to or (raw.get("reply_to") if isinstance(raw.get("reply_to"), str) else None)
            request = Request.from_dict(raw)
            if busy:
                raise _Busy
            result = await _call(self.on_request, request) if self.on_request else None
            if self.on_request is None:
                reply = Reply.failure(request.id, "unsupported", "this cluster serves no requests yet")
            elif isinstance(result, Reply):
                reply = result
            elif isinstance(result, Mapping):
                reply = Reply(request.id, result=result)
            else:
                reply = Reply.failure(request.id, "internal", "request handler returned no result")
        except _Busy:
            reply = Reply.failure(
                request_id, "busy", f"{self.max_pending_requests} requests in flight; retry later"
            )
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
        if correlation is not None and self._protocol == aiomqtt.ProtocolVersion.V5:
            out_props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out_props.CorrelationData = correlation
        with contextlib.suppress(AgentNotConnectedError, aiomqtt.MqttError):
            await self.publish(reply_to, self.topics.reply.encode(reply), qos=1, properties=out_props)


__all__ = [
    "AgentNotConnectedError",
    "ClusterAgent",
    "Member",
    "MembershipView",
    "NotLeaderError",
    "WorkState",
    "backoff_delay",
]
