"""The lease election's shell: gather the snapshot, carry out ``election.decide``, follow the
records on ``P/leader`` and say when this device starts or stops leading.

The rules are pure functions in ``election.py``; this class only keeps the bookkeeping between
ticks (the lease followed, since when it is vacant, the last publish) and does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detransformer_edge.cluster import election
from detransformer_edge.protocol import signing
from detransformer_edge.protocol.messages import LeaderLease
from detransformer_edge.transport.session import NotConnectedError

if TYPE_CHECKING:
    from detransformer_edge.cluster.agent import ClusterAgent

log = logging.getLogger(__name__)


class Leadership:
    def __init__(self, agent: ClusterAgent, on_become: Callable[[Any], Awaitable[None]],
                 on_lose: Callable[[Any], Awaitable[None]]) -> None:
        self.agent = agent
        self.on_become, self.on_lose = on_become, on_lose
        self.settled = False  # the retained state has had time to arrive after a (re)connect
        self.wake = asyncio.Event()
        self.lease: election.ObservedLease | None = None
        self._vacant_since: float | None = None
        self._conflict = False
        self._last_publish_at: float | None = None
        self._was_leader = False
        self._probe_at: float | None = None  # when the last pre-vote status was sent
        self._heard_self_at = -math.inf  # the newest own status that came back fresh (our clock)

    def reset(self) -> None:
        """A new connection is a new session: it must settle and claim anew."""
        self.settled = False
        self._conflict = False

    @property
    def record(self) -> LeaderLease | None:
        return self.lease.record if self.lease else None

    def snapshot(self) -> election.ElectionSnapshot:
        a = self.agent
        el = a.config.election
        m = a.members
        return election.ElectionSnapshot(
            self_id=a.config.id,
            session=a.session.session_id if self.settled else None,
            now=a.clock(),
            lease=self.lease,
            members=m.scores(),
            offline=m.offline(),
            vacant_since=self._vacant_since,
            conflict=self._conflict,
            last_publish_at=self._last_publish_at,
            lease_s=el.lease_s,
            stagger_s=el.stagger,
            preferred=frozenset(i for i, p in m.profiles.items() if p.has_models),
            loading=a.work_state.loading,
            heard_self_at=self._heard_self_at,
        )

    @property
    def is_leader(self) -> bool:
        return election.is_leader(self.snapshot())

    async def loop(self) -> None:
        el = self.agent.config.election
        await asyncio.sleep(el.settle)  # let retained presence/profile/leader arrive first
        self.settled = True
        tick = min(el.lease_s / 8, 1.0)
        while True:
            await self.step()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self.wake.wait()

    async def step(self) -> None:
        a = self.agent
        snap = self.snapshot()
        self._vacant_since = election.next_vacant_since(snap)
        action = election.decide(snap)
        await self._probe_link(snap)
        if isinstance(action, election.PublishLease):
            self._last_publish_at = snap.now
            record = action.record
            log.info("agent %s: %s lease term %d", a.config.id, action.reason, record.term)
            t = a.topics.leader
            props = None
            if a.session.is_v5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.MessageExpiryInterval = max(1, math.ceil(record.lease_s))
            topic = t.format()
            with contextlib.suppress(NotConnectedError):
                await a.publish(topic, a.sign(topic, record.term, t.encode(record)), qos=t.qos,
                                retain=True, properties=props)
        await self.check_role()

    async def _probe_link(self, snap: election.ElectionSnapshot) -> None:
        """Pre-vote: while the lease is vacant by silence and no own status has come back fresh
        since the vacancy began, send one now (again after a sixth of a lease if it was lost): its
        echo is what lets this device claim (``election.hears_itself_since_vacancy``)."""
        since = self._vacant_since
        if since is None or snap.session is None:
            return
        if election.hears_itself_since_vacancy(dataclasses.replace(snap, vacant_since=since)):
            return  # not a vacancy by silence, or our status already came back since it began
        if self._probe_at is not None and self._probe_at >= since and \
                snap.now - self._probe_at < snap.lease_s * election.RETRY_FRACTION:
            return
        self._probe_at = snap.now
        with contextlib.suppress(NotConnectedError):
            await self.agent.publish_status()

    def heard_self(self, sent_at: float) -> None:
        """Our own status, sent at ``sent_at`` (our clock), came back from the broker. Only an echo
        that took at most a quarter of a lease counts: after a stalled link recovers, the backlog
        brings old echoes *and* old renewals, which look expired, and an old echo must not let this
        device claim before the fresh renewals behind it arrive. A fresh echo proves the broker had
        nothing older for us, so any renewal sent before it has arrived."""
        if self.agent.clock() - sent_at > self.agent.config.election.lease_s * election.FRESH_ECHO_FRACTION:
            return
        self._heard_self_at = max(self._heard_self_at, sent_at)
        if self._vacant_since is not None:
            self.wake.set()

    async def still_leading(self) -> bool:
        """May this device take a request now? A leader: yes. One whose own lease ran out by its
        clock while no other record has reached it (``holds_lease``) is either reading its
        renewal's echo late (a busy event loop) or just back from a cut link and reading the
        backlog, where the requests that queued while it was away come *before* its successor's
        claim: answering them would answer twice (the successor answers the clients' re-sends).
        So wait, up to a quarter of a lease, until one or the other shows: its renewal echoed (it
        leads) or another device's record (superseded); a request not taken is sent again by its
        client (docs/API.md)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.agent.config.election.lease_s / 4
        while not self.agent.is_leader:
            if not self.agent.holds_lease or loop.time() >= end:
                return False
            await asyncio.sleep(0.02)
        return True

    async def take_if_still_leading(self, take: Callable[..., None], *args: Any) -> None:
        """``take(*args)`` (a request read while the lease was running out) if this device still leads."""
        if await self.still_leading():
            take(*args)
        else:
            log.info("agent %s: a request read while its lease was running out was not taken: %s",
                     self.agent.config.id, "another device leads" if self.agent.superseded else "the lease lapsed")

    async def check_role(self) -> None:
        leader = self.is_leader
        if leader and not self._was_leader:
            self._was_leader = True
            log.info("agent %s became leader (term %s)", self.agent.config.id, self.record and self.record.term)
            await self.on_become(self.record)
        elif not leader and self._was_leader:
            self._was_leader = False
            log.info("agent %s stepped down", self.agent.config.id)
            await self.on_lose(self.record)

    async def on_record(self, topic: str, payload: bytes) -> None:
        """A record on ``P/leader`` (signed by its holder when the cluster has a key)."""
        a = self.agent
        record = a.topics.leader.decode(payload)
        if a.verifier is not None:
            stamp = a.verifier.verify(topic, payload, "leader")  # SignatureError: ignored, logged
            if (stamp.leader, stamp.term) != (record.id, record.term):
                raise signing.SignatureError(f"leader: signed by {stamp.leader} term {stamp.term}, "
                                             f"but names {record.id} term {record.term}")
        obs = election.observe_lease(self.lease, record, a.clock(), a.config.id)
        prev = self.lease
        if obs.conflict and prev is not None and prev.record.session == a.session.session_id:
            self._conflict = True
        if obs.accepted and (prev is None or obs.lease is None or obs.lease.record.term != prev.record.term):
            self._conflict = False
        self.lease = obs.lease
        self.wake.set()
        await self.check_role()
