"""The agent's MQTT shell against a real Mosquitto: presence/LWT, election, reconnect, requests.

Short keepalive (1 s) and lease (2 s) keep each test to a few seconds; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from detransformer_edge.cluster.agent import ClusterAgent
from detransformer_edge.cluster.config import AgentConfig, BrokerConfig, ElectionConfig
from detransformer_edge.cluster.membership import MembershipView
from detransformer_edge.integrations import homeassistant
from detransformer_edge.protocol.messages import Assignment, ProfileRecord, Reply, Request
from detransformer_edge.protocol.topics import ClusterTopics

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]

KEEPALIVE = 1
LEASE = 2.0
ROOT = Path(__file__).resolve().parents[1]
# Mosquitto 2.0 scans for expired keepalives only every 5 s (src/keepalive.c,
# `last_keepalive_check + 5 < db.now_s`), so a silent-but-open client is noticed up to
# 5 s after its 1.5 x keepalive; measured here: 4.5-5.3 s for keepalive 1 and 2.
MOSQUITTO_KEEPALIVE_SCAN_S = 5.0


class LoopStalls:
    """The longest time this event loop could not run a task (the host starved the test process):
    a lease can only be renewed by a device that runs, so a stall of half a lease explains a new term."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.longest = period, 0.0
        self.task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period)
            self.longest = max(self.longest, time.monotonic() - t - self.period)

    def __enter__(self) -> LoopStalls:
        self.task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


def cluster_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def make_config(dev: str, cluster: str, host: str, port: int, **broker: Any) -> AgentConfig:
    return AgentConfig(
        id=dev,
        cluster=cluster,
        broker=BrokerConfig(url=f"mqtt://{host}:{port}", keepalive_s=KEEPALIVE,
                            reconnect_min_s=0.1, reconnect_max_s=0.5, **broker),
        discovery=False,
        homeassistant=True,
        status_interval_s=0.5,
        election=ElectionConfig(lease_s=LEASE, settle_s=0.3),
    )


def profile(dev: str, score: float) -> ProfileRecord:
    return ProfileRecord(dev, dev.title(), "test-board", 10.0, 1000.0, 100.0, score, "0.1.0")


class Watcher:
    """A plain MQTT client recording every message under a filter."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[float, str, bytes, Any]] = []
        self._new = asyncio.Event()

    async def pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((time.monotonic(), m.topic.value, payload, m.properties))
            self._new.set()

    async def wait_for(self, pred: Callable[[str, bytes], bool], timeout: float, since: int = 0) -> float:
        """Monotonic arrival time of the first message after index `since` matching `pred`."""
        deadline = time.monotonic() + timeout
        while True:
            for t, topic, payload, _ in self.messages[since:]:
                if pred(topic, payload):
                    return t
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(tp, p[:60]) for _, tp, p, _ in self.messages[-10:]]
                raise AssertionError(f"no matching message within {timeout}s; last: {seen}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass


async def watch(host: str, port: int, *filters: str, protocol: Any = None) -> AsyncIterator[Watcher]:
    async with aiomqtt.Client(host, port, identifier=f"watch-{uuid.uuid4().hex[:8]}",
                              protocol=protocol) as client:
        for f in filters:
            await client.subscribe(f, qos=1)
        w = Watcher(client)
        task = asyncio.create_task(w.pump())
        try:
            yield w
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


watcher = __import__("contextlib").asynccontextmanager(watch)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- presence


async def test_presence_and_profile_are_retained_and_offline_on_clean_exit(
    mosquitto_broker: tuple[str, int],
) -> None:
    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    changes: list[MembershipView] = []
    agent = ClusterAgent(make_config("a1", cl, host, port), profile("a1", 3.0),
                         on_membership_change=changes.append)
    async with agent:
        await agent.wait_connected(10)
        assert agent.protocol == "5"  # Mosquitto offers v5
        await until(lambda: agent.membership.online == ("a1",), 5, "own membership")
        async with watcher(host, port, f"{t.prefix}/devices/#") as w:  # a late subscriber
            await w.wait_for(lambda tp, p: tp == t.presence.format("a1") and p == b"online", 5)
            await w.wait_for(lambda tp, p: tp == t.profile.format("a1")
                             and ProfileRecord.from_json(p) == profile("a1", 3.0), 5)
            await w.wait_for(lambda tp, p: tp == t.status.format("a1")
                             and json.loads(p)["role"] in ("leader", "follower"), 5)
    assert changes and changes[0].online == ("a1",)
    async with watcher(host, port, t.presence.filter) as w:
        await w.wait_for(lambda tp, p: p == b"offline", 5)


AGENT_SCRIPT = """
import asyncio, sys
sys.path.insert(0, {root!r})
from detransformer_edge.cluster.agent import ClusterAgent
from detransformer_edge.cluster.config import AgentConfig, BrokerConfig, ElectionConfig
from detransformer_edge.protocol.messages import ProfileRecord

async def main():
    cfg = AgentConfig(id="victim", cluster={cluster!r}, discovery=False, homeassistant=False,
                      broker=BrokerConfig(url="mqtt://{host}:{port}", keepalive_s={ka}),
                      election=ElectionConfig(lease_s=2.0))
    async with ClusterAgent(cfg, ProfileRecord("victim", "Victim", "x", 1, 1, 1, 1)):
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def victim(mosquitto_broker: tuple[str, int]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    host, port = mosquitto_broker
    cl = cluster_name()
    code = AGENT_SCRIPT.format(root=str(ROOT), cluster=cl, host=host, port=port, ka=KEEPALIVE)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        yield proc, cl
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "freeze"])
async def test_lwt_offline_after_agent_dies(
    mosquitto_broker: tuple[str, int], victim: tuple[subprocess.Popen[bytes], str], sig: signal.Signals,
) -> None:
    """SIGKILL: the kernel closes the socket, no DISCONNECT: offline within 1.5 x keepalive.
    SIGSTOP: the socket stays open but goes silent, so only the broker's keepalive check
    (1.5 x keepalive, plus Mosquitto's 5 s scan period) can notice."""
    host, port = mosquitto_broker
    proc, cl = victim
    topic = ClusterTopics(cl).presence.format("victim")
    async with watcher(host, port, topic) as w:
        await w.wait_for(lambda tp, p: p == b"online", 20)
        n = len(w.messages)
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        bound = 1.5 * KEEPALIVE + (0 if sig == signal.SIGKILL else MOSQUITTO_KEEPALIVE_SCAN_S) + 1.0
        t1 = await w.wait_for(lambda tp, p: p == b"offline", bound + 2.0, since=n)
        elapsed = t1 - t0
        assert elapsed <= bound, f"offline after {elapsed:.2f}s (bound {bound}s)"
        if sig == signal.SIGKILL:
            # the kernel closes the socket: the broker fires the LWT at once, well inside 1.5 x ka
            assert elapsed <= 1.5 * KEEPALIVE, f"offline after {elapsed:.2f}s"
        else:
            # the broker counts 1.5 x keepalive from the frozen client's last packet, which can be
            # up to one keepalive (its PINGREQ period) before the freeze: never sooner than 0.5 x
            assert elapsed >= 0.5 * KEEPALIVE - 0.2, "offline before the keepalive could expire"
            os.kill(proc.pid, signal.SIGKILL)
    async with watcher(host, port, topic) as w:  # and it stays retained
        await w.wait_for(lambda tp, p: p == b"offline", 5)


# ---------------------------------------------------------------------------- election


async def test_three_agents_elect_the_best_and_fail_over_within_a_lease(
    mosquitto_broker: tuple[str, int],
) -> None:
    host, port = mosquitto_broker
    cl = cluster_name()
    events: list[tuple[str, str, int | None]] = []

    def agent(dev: str, score: float) -> ClusterAgent:
        return ClusterAgent(
            make_config(dev, cl, host, port), profile(dev, score),
            on_become_leader=lambda lease: events.append(("up", dev, lease and lease.term)),
            on_lose_leadership=lambda lease: events.append(("down", dev, lease and lease.term)),
        )

    agents = {"d1": agent("d1", 1.0), "d5": agent("d5", 5.0), "d3": agent("d3", 3.0)}
    for a in agents.values():
        await a.__aenter__()
    try:
        def leaders() -> list[str]:
            return [d for d, a in agents.items() if a.is_leader]

        def agreed() -> bool:
            ls = leaders()
            return len(ls) == 1 and all(
                a.lease is not None and a.lease.id == ls[0] for d, a in agents.items() if d in agents
            )

        await until(agreed, 10, "one agreed leader")
        assert leaders() == ["d5"]
        first_term = agents["d5"].lease.term  # type: ignore[union-attr]
        # the lease is renewed: still the same leader and term two leases later (unless the host
        # stopped this process for half a lease: then the lease may lapse, and a new term is right)
        with LoopStalls() as stalls:
            await asyncio.sleep(2 * LEASE)
        assert leaders() == ["d5"]
        assert agents["d1"].lease.term == first_term or stalls.longest >= LEASE / 2, (  # type: ignore[union-attr]
            f"a new term without a stall (longest {stalls.longest:.2f}s)")

        killed = agents.pop("d5")
        t0 = time.monotonic()
        await killed.abort()  # drop the TCP connection: no DISCONNECT, no "offline" from it
        took = await until(lambda: leaders() == ["d3"] and agreed(), 2 * LEASE, "failover")
        took = time.monotonic() - t0
        assert took <= LEASE, f"new leader after {took:.2f}s"
        assert agents["d3"].lease.term > first_term  # type: ignore[union-attr]
        assert ("up", "d3", agents["d3"].lease.term) in events  # type: ignore[union-attr]
        terms_by_leader: dict[int | None, set[str]] = {}
        for kind, dev, term in events:
            if kind == "up":
                terms_by_leader.setdefault(term, set()).add(dev)
        assert all(len(v) == 1 for v in terms_by_leader.values())

        # a higher-score device joining does not preempt the live lease
        big = agent("d9", 9.0)
        agents["d9"] = big
        await big.__aenter__()
        await until(lambda: big.membership.online == ("d1", "d3", "d9"), 5, "d9 joined")
        await asyncio.sleep(LEASE)
        assert leaders() == ["d3"]
    finally:
        for a in agents.values():
            await a.stop()


# ---------------------------------------------------------------------------- reconnect


class RestartableBroker:
    def __init__(self, workdir: Path) -> None:
        from tests.conftest import find_mosquitto, free_port

        binary = find_mosquitto()
        if binary is None:
            pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
        self.binary = binary
        self.host, self.port = "127.0.0.1", free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from tests.conftest import wait_for_port

        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_port(self.host, self.port), "mosquitto did not start"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[RestartableBroker]:
    b = RestartableBroker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.mark.parametrize("prevote", [True, False], ids=["prevote", "without-prevote"])
async def test_a_deaf_follower_does_not_depose_a_renewing_leader(
    mosquitto_broker: tuple[str, int], monkeypatch: pytest.MonkeyPatch, prevote: bool,
) -> None:
    """The chaos soak's degraded link: a follower that hears nothing for over a lease (its messages
    queue behind a stalled link, in order) while the leader renews as usual. Without the pre-vote it
    claims and the healthy leader steps down; with it, it waits for its own status to come back,
    which arrives only after the leader's renewals."""
    from detransformer_edge.cluster import election

    if not prevote:
        monkeypatch.setattr(election, "hears_itself_since_vacancy", lambda _s: True)
    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    leader = ClusterAgent(make_config("dlead", cl, host, port), profile("dlead", 5.0))
    deaf = ClusterAgent(make_config("ddeaf", cl, host, port), profile("ddeaf", 1.0))
    link = asyncio.Event()
    link.set()

    def through_the_link(handler: Any) -> Any:
        async def deliver(topic: str, payload: bytes, props: Any) -> None:
            await link.wait()  # the read loop stalls here: later messages queue behind, in order
            result = handler(topic, payload, props)
            if result is not None:
                await result
        return deliver

    for sub in deaf.session._subs:
        sub.handler = through_the_link(sub.handler)
    async with watcher(host, port, t.leader.format()) as w, leader, deaf:
        await until(lambda: leader.is_leader and deaf.lease is not None and deaf.lease.id == "dlead", 10,
                    "dlead leads and ddeaf follows")
        since = len(w.messages)
        link.clear()
        await asyncio.sleep(3 * LEASE)  # its lease runs out after one; it ranks second: one stagger more
        records = [p for _, _, p, _ in w.messages[since:]]
        by_deaf = [p for p in records if json.loads(p)["id"] == "ddeaf"]
        if not prevote:  # the scenario is real: without the pre-vote the deaf device claims
            assert by_deaf, records
            return
        assert by_deaf == [] and leader.is_leader, records
        link.set()  # the link recovers: the renewals queued first, then its own status
        await until(lambda: deaf.lease is not None and deaf.lease.id == "dlead", 5, "ddeaf follows dlead again")
        await asyncio.sleep(LEASE)
        assert leader.is_leader and not deaf.is_leader
        assert not [p for _, tp, p, _ in w.messages[since:] if b'"ddeaf"' in p]


@pytest.mark.parametrize("waits", [True, False], ids=["waits", "without-waiting"])
async def test_a_leader_back_from_a_cut_link_does_not_answer_its_backlog(
    mosquitto_broker: tuple[str, int], monkeypatch: pytest.MonkeyPatch, waits: bool,
) -> None:
    """The second chaos soak's duplicates: the leader's link is cut for longer than its lease, a
    successor takes over and answers the client's re-send; when the link returns, the old leader
    reads its backlog — the original request comes before the successor's claim — and must not
    answer it a second time."""
    if not waits:  # the scenario is real: taking the backlog at once answers twice
        from detransformer_edge.cluster.leadership import Leadership

        async def at_once(self: Leadership, wait_s: float | None = None) -> bool:
            return True
        monkeypatch.setattr(Leadership, "still_leading", at_once)
    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)

    def handler(dev: str) -> Callable[[Request], Any]:
        async def on_request(req: Request) -> Any:
            return {"by": dev}
        return on_request

    old = ClusterAgent(make_config("dold", cl, host, port), profile("dold", 5.0), on_request=handler("dold"))
    new = ClusterAgent(make_config("dnew", cl, host, port), profile("dnew", 1.0), on_request=handler("dnew"))
    link = asyncio.Event()
    link.set()

    def through_the_link(fn: Any) -> Any:
        async def call(*args: Any, **kw: Any) -> Any:
            if not link.is_set():
                await link.wait()
                await asyncio.sleep(0.1)  # the backlog trickles in over the recovering link
            result = fn(*args, **kw)
            return await result if inspect.isawaitable(result) else result
        return call

    for sub in old.session._subs:
        sub.handler = through_the_link(sub.handler)
    old.session.publish = through_the_link(old.session.publish)  # type: ignore[method-assign]
    reply_to = t.default_reply_to("phone")
    async with watcher(host, port, reply_to) as w, old, new:
        await until(lambda: old.is_leader and new.lease is not None and new.lease.id == "dold", 10, "dold leads")
        link.clear()  # dold's link is cut both ways (its TCP connection stays open, as in the soak)
        request = Request("q1", reply_to, "embed", "x").to_json()
        await w.client.publish(t.request.format(), request, qos=1)  # queued for dold; dnew does not lead
        await until(lambda: new.is_leader, 4 * LEASE, "dnew takes over")
        await w.client.publish(t.request.format(), request, qos=1)  # the client sends it again
        await w.wait_for(lambda tp, p: Reply.from_json(p).result == {"by": "dnew"}, 5)
        link.set()  # the link returns: dold reads the original request, then dnew's claim
        await until(lambda: old.superseded, 5, "dold sees dnew's claim")
        await asyncio.sleep(1.0)
        answers = [Reply.from_json(p).result for _, _, p, _ in w.messages]
    if waits:
        assert answers == [{"by": "dnew"}]
    else:
        assert {"by": "dold"} in answers and len(answers) == 2, answers


async def test_reconnect_after_broker_restart_republishes_presence(
    restartable_broker: RestartableBroker,
) -> None:
    b = restartable_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    agent = ClusterAgent(make_config("r1", cl, b.host, b.port), profile("r1", 1.0))
    async with agent:
        await agent.wait_connected(10)
        await until(lambda: agent.is_leader, 5, "sole agent leads")
        b.stop()  # no persistence: every retained message is gone with it
        await until(lambda: not agent.connected, 5, "agent notices the broker is gone")
        assert not agent.is_leader  # a leader without broker steps down
        b.start()
        await agent.wait_connected(10)
        async with watcher(b.host, b.port, f"{t.prefix}/#") as w:
            await w.wait_for(lambda tp, p: tp == t.presence.format("r1") and p == b"online", 5)
            await w.wait_for(lambda tp, p: tp == t.profile.format("r1"), 5)
            await w.wait_for(lambda tp, p: tp == t.leader.format(), 5)
        await until(lambda: agent.is_leader, 5, "leads again after reconnect")


async def test_falls_back_to_mqtt_311_on_a_broker_without_v5(amqtt_broker: tuple[str, int]) -> None:
    host, port = amqtt_broker
    cl = cluster_name()
    agent = ClusterAgent(make_config("old", cl, host, port), profile("old", 1.0))
    async with agent:
        await agent.wait_connected(10)
        assert agent.protocol == "3.1.1"
        await until(lambda: agent.is_leader, 5, "leader on 3.1.1")


# ---------------------------------------------------------------------------- requests, hooks


async def test_leader_answers_requests_and_followers_stay_silent(
    mosquitto_broker: tuple[str, int],
) -> None:
    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    served: list[str] = []

    def handler(dev: str) -> Callable[[Request], Any]:
        async def on_request(req: Request) -> Any:
            served.append(dev)
            if req.params.get("fail"):
                raise RuntimeError("boom")
            return {"echo": req.input, "by": dev}
        return on_request

    a = ClusterAgent(make_config("hi", cl, host, port), profile("hi", 5.0), on_request=handler("hi"))
    b = ClusterAgent(make_config("lo", cl, host, port), profile("lo", 1.0), on_request=handler("lo"))
    async with a, b:
        await until(lambda: a.is_leader and b.lease is not None and b.lease.id == "hi", 10, "leader")
        reply_to = t.default_reply_to("phone")
        async with watcher(host, port, reply_to) as w:
            req = Request("r1", reply_to, "embed", ("x", "y"))
            await w.client.publish(t.request.format(), req.to_json(), qos=1)
            await w.wait_for(lambda tp, p: Reply.from_json(p).id == "r1", 5)
            await w.client.publish(t.request.format(),
                                   Request("r2", reply_to, "generate", "hi", {"fail": True}).to_json(), qos=1)
            await w.wait_for(lambda tp, p: Reply.from_json(p).id == "r2", 5)
            await w.client.publish(t.request.format(), b'{"id": "r3", "reply_to": "%s", "op": "dance"}'
                                   % reply_to.encode(), qos=1)
            await w.wait_for(lambda tp, p: Reply.from_json(p).id == "r3", 5)
            await asyncio.sleep(0.3)
            replies = {Reply.from_json(p).id: Reply.from_json(p) for _, _, p, _ in w.messages}
        assert replies["r1"].result == {"echo": ["x", "y"], "by": "hi"}
        assert replies["r2"].error is not None and replies["r2"].error.code == "internal"
        assert replies["r3"].error is not None and replies["r3"].error.code == "bad_request"
        assert len(w.messages) == 3 and served == ["hi", "hi"]

        # back-pressure: beyond max_pending_requests the leader answers "busy" at once
        a.max_pending_requests = 0
        async with watcher(host, port, reply_to) as w:
            await w.client.publish(t.request.format(), Request("r5", reply_to, "embed", "x").to_json(), qos=1)
            await w.wait_for(lambda tp, p: Reply.from_json(p).id == "r5", 5)
            busy = Reply.from_json(w.messages[0][2])
            assert busy.error is not None and busy.error.code == "busy"
        a.max_pending_requests = 16

        # MQTT v5: ResponseTopic + CorrelationData are honoured
        async with watcher(host, port, f"{t.prefix}/v5replies", protocol=aiomqtt.ProtocolVersion.V5) as w:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{t.prefix}/v5replies"
            props.CorrelationData = b"\x01corr"
            await w.client.publish(t.request.format(), Request("r4", "ignored/topic", "generate", "q").to_json(),
                                   qos=1, properties=props)
            await w.wait_for(lambda tp, p: Reply.from_json(p).id == "r4", 5)
            assert w.messages[0][3].CorrelationData == b"\x01corr"


async def test_assignments_are_fenced_by_term_and_ha_discovery_resent(
    mosquitto_broker: tuple[str, int],
) -> None:
    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    got: list[Assignment] = []
    lead = ClusterAgent(make_config("boss", cl, host, port), profile("boss", 5.0))
    worker = ClusterAgent(make_config("w", cl, host, port), profile("w", 1.0), on_assignment=got.append)
    for a in (lead, worker):  # the Home Assistant plug-in, as an agent with homeassistant = true runs it
        await homeassistant.HomeAssistantDiscovery().start(SimpleNamespace(session=a.session, cluster=a))
    async with lead, worker:
        await until(lambda: lead.is_leader and worker.lease is not None and worker.lease.id == "boss",
                    10, "leader")
        sent = await lead.send_assignment("w", 1, {"sub_blocks": [[0, 0]]})
        await until(lambda: got == [sent], 5, "assignment delivered")
        async with watcher(host, port, "homeassistant/#") as w:
            stale = Assignment("boss", sent.term - 1, 2, {})
            await w.client.publish(t.assign.format("w"), stale.to_json(), qos=1)
            retained = {topic for a in (lead, worker) for topic, _ in homeassistant.discovery_messages(
                a.topics, a.profile, a.sw_version, a.config.homeassistant_prefix)}
            assert len(retained) >= 12
            # the broker sends the retained configs right after the subscription: wait for all
            await w.wait_for(lambda tp, p: retained <= {m[1] for m in w.messages}, 5)
            n = len(w.messages)
            await w.client.publish("homeassistant/status", "online", qos=1)
            await w.wait_for(lambda tp, p: "detransformer_" + cl.replace("-", "_") in tp or cl in tp, 5, since=n)
        await asyncio.sleep(0.3)
        assert got == [sent]  # the stale one was dropped


async def test_extra_subscription_serves_hermes_and_status_reports_work_state(
    mosquitto_broker: tuple[str, int],
) -> None:
    """How the lead wires Hermes: subscribe a handler; replies go out with agent.publish."""
    from detransformer_edge.cluster.membership import WorkState
    from detransformer_edge.protocol.hermes import (
        TOPIC_NLU_QUERY,
        NluIntent,
        parse_nlu_query,
        recognized,
        slot,
    )

    host, port = mosquitto_broker
    cl = cluster_name()
    t = ClusterTopics(cl)
    site = f"site-{cl}"  # the hermes topics are global: filter on our own siteId
    agent = ClusterAgent(make_config("voice", cl, host, port), profile("voice", 1.0))

    async def on_query(topic: str, payload: bytes, _props: object) -> None:
        query = parse_nlu_query(payload)
        if query.site_id != site or not agent.is_leader:
            return
        reply = recognized(query, "TurnOnLight", 0.9, [slot("room", "kitchen", "kitchen")])
        await agent.publish(reply.topic, reply.to_json(), qos=1)

    async with agent:
        await agent.wait_connected(10)
        agent.subscribe(TOPIC_NLU_QUERY, on_query)  # after connect: subscribes at once
        await until(lambda: agent.is_leader, 5, "leader")
        agent.work_state = WorkState(ready=True, placement_version=2, sub_blocks=((0, 1),),
                                     last_latency_ms=12.5)
        await agent.publish_status()
        async with watcher(host, port, "hermes/intent/#", t.status.format("voice")) as w:
            await w.wait_for(lambda tp, p: tp.endswith("/status") and json.loads(p)["placement_version"] == 2, 5)
            await w.client.publish(TOPIC_NLU_QUERY, json.dumps({"input": "lights on", "siteId": site}), qos=1)
            await w.wait_for(lambda tp, p: tp == "hermes/intent/TurnOnLight", 5)
            intent = next(NluIntent.from_json(p) for _, tp, p, _ in w.messages if tp.startswith("hermes/"))
            assert intent.site_id == site and intent.slots[0].value.value == "kitchen"
            status = next(json.loads(p) for _, tp, p, _ in w.messages
                          if tp.endswith("/status") and json.loads(p)["placement_version"] == 2)
            assert status["ready"] is True and status["sub_blocks"] == [[0, 1]]
            assert status["role"] == "leader" and status["last_latency_ms"] == 12.5


# ---------------------------------------------------------------------------- TLS + auth


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """Mosquitto on mqtts with a throwaway CA, password auth and no anonymous access."""
    import shutil

    from tests.conftest import find_mosquitto, free_port, wait_for_port

    binary, openssl, passwd = find_mosquitto(), shutil.which("openssl"), shutil.which("mosquitto_passwd")
    if binary is None or openssl is None or passwd is None:
        pytest.skip("needs mosquitto, mosquitto_passwd and openssl (scripts/setup.sh installs them)")
    d = tmp_path

    def run(*args: str) -> None:
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=detransformer-test-ca")
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    run(passwd, "-b", "-c", "pw", "agent", "s3cret")
    port = free_port()
    (d / "m.conf").write_text(
        f"listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n"
        f"keyfile {d}/server.key\nallow_anonymous false\npassword_file {d}/pw\n"
        # started as root, mosquitto drops to user "mosquitto", who cannot read pytest's tmp
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([binary, "-c", str(d / "m.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for_port("127.0.0.1", port), "mosquitto (TLS) did not start"
        yield "127.0.0.1", port, d / "ca.pem"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_tls_and_password(tls_broker: tuple[str, int, Path]) -> None:
    host, port, ca = tls_broker
    cl = cluster_name()
    text = (
        f'id = "sec"\ncluster = "{cl}"\ndiscovery = false\n'
        f'[broker]\nurl = "mqtts://agent:s3cret@{host}:{port}"\nkeepalive_s = 1\n'
        f'reconnect_min_s = 0.1\nreconnect_max_s = 0.3\n[broker.tls]\nca_file = "{ca}"\n'
        "[election]\nlease_s = 2.0\nsettle_s = 0.2\n"
    )
    agent = ClusterAgent(AgentConfig.loads(text), profile("sec", 1.0))
    async with agent:
        await agent.wait_connected(10)
        await until(lambda: agent.is_leader, 5, "leader over TLS")

    wrong = AgentConfig.loads(text.replace("s3cret", "wrong"))
    intruder = ClusterAgent(wrong, profile("sec", 1.0))
    async with intruder:
        await asyncio.sleep(1.5)
        assert not intruder.connected  # refused, retrying with backoff, never connected
