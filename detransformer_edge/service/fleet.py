"""Agents as separate processes plus a client that watches them: what fault tests, load tests
and the soak benchmark need to treat a home as a black box over MQTT.

    fleet = AgentFleet(workdir, broker=(host, port), n=3, keepalive_s=2, lease_s=3.0)
    fleet.start()                      # detransformer-edge agent --config ... --catalog tiny
    async with HomeWatcher(host, port, fleet.cluster) as watch:
        leader, version = await fleet.wait_ready(watch)   # as long as the agents progress
        reply = await watch.request("embed", "hi", {"plan": "pipeline"})
        fleet.kill("dev1")             # SIGKILL: no goodbye, the broker fires the LWT
    fleet.stop()

With ``home=`` (a testbed ``Home``) each agent runs in the node named after it, on its shaped link
(``bench/chaos.py``, the link test of tests/test_faults.py). The watcher is the project's one
``HomeClient`` plus the records a test needs (presence, status, leases, every answer per id).

Times are ``time.monotonic()`` of this process; the watcher stamps every message on arrival.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.client import HomeClient
from detransformer_edge.protocol.hermes import (
    TOPIC_INTENT_FILTER,
    TOPIC_INTENT_PREFIX,
    TOPIC_NLU_ERROR,
    TOPIC_NOT_RECOGNIZED,
)
from detransformer_edge.service.readiness import StartupWatch, process_cpu_s

TREE = Path(__file__).resolve().parents[2]  # the source tree the agents must run, not an installed copy
PROFILES_DIR = TREE / "firmware_profiles"
PROFILES = ("intel-n100-minipc", "raspberry-pi-5", "raspberry-pi-4b", "smart-speaker-a53")
HERMES_REPLIES = (TOPIC_INTENT_FILTER, TOPIC_NOT_RECOGNIZED, TOPIC_NLU_ERROR)


class FleetError(DetransformerError):
    """An agent process or the home did not do what a test waited for."""


def agent_toml(dev: str, cluster: str, host: str, port: int, profile: str, *, keepalive_s: int,
               lease_s: float, status_interval_s: float, homeassistant: bool) -> str:
    return (
        f'id = "{dev}"\ncluster = "{cluster}"\nprofile = "{(PROFILES_DIR / (profile + ".toml")).as_posix()}"\n'
        f"dashboard_port = 0\ndiscovery = false\nhomeassistant = {str(homeassistant).lower()}\n"
        f"status_interval_s = {status_interval_s}\n"
        f'\n[broker]\nurl = "mqtt://{host}:{port}"\nprotocol = "3.1.1"\nkeepalive_s = {keepalive_s}\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 0.5\n"
        f"\n[election]\nlease_s = {lease_s}\n"
    )


@dataclass
class AgentFleet:
    """``n`` agent processes (ids ``dev0``…) on one broker; each can be killed and restarted."""

    workdir: Path
    broker: tuple[str, int]
    n: int = 3
    catalog: str = "tiny"
    keepalive_s: int = 2
    lease_s: float = 3.0
    status_interval_s: float = 0.5
    homeassistant: bool = False
    replicate_all: bool = True  # every device holds every model: fixed multi-device plans can run
    cluster: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:8]}")
    home: Any = None  # a testbed Home: each agent runs in the node named after it (testbed/home.py)
    # agents' -v: 1 logs every election step and request outcome (INFO); DTE_FLEET_VERBOSE=1 sets it
    # for every fleet a test starts (the logs are the agents' dev*.log in the test's tmp_path)
    verbose: int = field(default_factory=lambda: int(os.environ.get("DTE_FLEET_VERBOSE", "0") or 0))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [f"dev{i}" for i in range(self.n)]

    def config_path(self, dev: str) -> Path:
        return self.workdir / f"{dev}.toml"

    def argv(self, dev: str) -> list[str]:
        argv = [sys.executable, "-m", "detransformer_edge.cli", *(["-v"] * self.verbose), "agent",
                "--config", str(self.config_path(dev)), "--catalog", self.catalog, "--threads", "1"]
        return argv + (["--replicate-all"] if self.replicate_all else [])

    def write_configs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i, dev in enumerate(self.ids):
            self.config_path(dev).write_text(agent_toml(
                dev, self.cluster, *self.broker, PROFILES[i % len(PROFILES)], keepalive_s=self.keepalive_s,
                lease_s=self.lease_s, status_interval_s=self.status_interval_s, homeassistant=self.homeassistant))

    def start(self, devs: list[str] | None = None) -> None:
        if not self.config_path(self.ids[0]).exists():
            self.write_configs()
        for dev in devs or self.ids:
            log = (self.workdir / f"{dev}.log").open("ab")
            if self.home is not None:  # the home adds these to this process's environment
                self.procs[dev] = self.home.spawn(dev, self.argv(dev), env=self.env(), stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
            else:
                self.procs[dev] = subprocess.Popen(self.argv(dev), stdout=log, stderr=subprocess.STDOUT,
                                                   env={**os.environ, **self.env()}, start_new_session=True)
            log.close()

    @staticmethod
    def env() -> dict[str, str]:
        """What the agents get on top of this process's environment: this source tree first on
        ``PYTHONPATH``, so they run the code under test (the venv may hold another checkout)."""
        path = [str(TREE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {"PYTHONUNBUFFERED": "1", "DETRANSFORMER_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}

    def pid(self, dev: str) -> int:
        return self.procs[dev].pid

    def kill(self, dev: str, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; returns the moment it was sent."""
        t = time.monotonic()
        self.procs[dev].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[dev].wait(timeout=10)
        return t

    def check_alive(self) -> None:
        for dev, p in self.procs.items():
            if p.poll() is not None and p.returncode not in (-signal.SIGKILL, 0):
                raise FleetError(f"agent {dev} exited with {p.returncode}: {self.log_tail(dev)}")

    def log_tail(self, dev: str, chars: int = 1500) -> str:
        path = self.workdir / f"{dev}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    async def wait_ready(self, watch: HomeWatcher, devices: list[str] | None = None, quiet_s: float = 60.0,
                         cap_s: float = 480.0) -> tuple[str, int]:
        """The first placement with every one of ``devices`` (default: all) ready; returns (leader,
        version). Start-up is the host's speed times the work, so this waits as long as the home
        progresses (``service/readiness.py``: an agent's log grows, an agent is busy, the leader or
        a device's state changes) and fails after ``quiet_s`` of none, at ``cap_s`` in all, or at
        once when an agent exits, saying what each agent and the watcher saw last."""
        devices = devices or self.ids
        sw = StartupWatch({d: self.workdir / f"{d}.log" for d in self.ids}, quiet_s, cap_s,
                          cpu=lambda: sum(process_cpu_s(p.pid) for p in self.procs.values()))
        while (why := sw.why_stop()) is None:
            self.check_alive()
            lead, v = watch.leader(), watch.placement(devices)
            if lead is not None and v:
                return lead, v
            sw.saw((lead, tuple(watch.state_of(d) for d in devices)))
            await asyncio.sleep(0.1)
        raise FleetError(f"{why}; the watcher saw {watch.describe(devices)}")

    def __enter__(self) -> AgentFleet:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if exc_type is not None:  # pytest shows a failing test's output: the agents' last words
            for dev in self.ids:
                print(f"--- {dev}.log (last lines) ---\n{self.log_tail(dev, 4000)}")


@dataclass
class Answer:
    """One final reply to a request or a Hermes query."""

    id: str
    topic: str
    body: dict[str, Any]
    sent: float
    at: float

    @property
    def ok(self) -> bool:
        return "result" in self.body or self.topic.startswith(TOPIC_INTENT_PREFIX) or self.topic == HERMES_REPLIES[1]

    @property
    def error(self) -> str | None:
        if self.ok:
            return None
        err = self.body.get("error")
        return err.get("code", "error") if isinstance(err, dict) else str(err)

    @property
    def latency_s(self) -> float:
        return self.at - self.sent


class HomeWatcher:
    """A client of the home (the project's one ``HomeClient``) that also records presence, status,
    leases, Home Assistant discovery and every final answer to what it sent, duplicates included."""

    def __init__(self, host: str, port: int, cluster: str) -> None:
        self.me = f"watch{uuid.uuid4().hex[:6]}"
        self.client = HomeClient(host, port, cluster, client_id=self.me)
        self.topics = self.client.topics
        self.prefix = self.topics.prefix
        self.reply_to = self.client.requester.reply_to
        self.presence: dict[str, bool] = {}
        self.presence_events: list[tuple[float, str, bool]] = []
        self.status: dict[str, dict[str, Any]] = {}
        self.leases: list[tuple[float, dict[str, Any]]] = []
        self.discovery: dict[str, float] = {}  # Home Assistant config topic -> first seen
        self.answers: dict[str, list[Answer]] = defaultdict(list)
        self.sent: dict[str, float] = {}
        session, t = self.client.session, self.topics
        session.subscribe(t.presence.filter, self._on_presence, 1)
        session.subscribe(t.status.filter, self._on_status, 0)
        session.subscribe(t.leader.filter, self._on_leader, 1)
        session.subscribe("homeassistant/#", self._on_discovery, 1)
        self.client.follow_answers(self._on_answer)

    async def __aenter__(self) -> HomeWatcher:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    # --- what arrives (stamped on arrival) ------------------------------------------------------

    def _on_presence(self, topic: str, payload: bytes, _props: object) -> None:
        dev = self.topics.presence.match(topic)
        if dev:
            online = payload.strip() == b"online"  # plain text online / offline (LWT)
            self.presence[dev] = online
            self.presence_events.append((time.monotonic(), dev, online))

    def _on_discovery(self, topic: str, payload: bytes, _props: object) -> None:
        if topic.endswith("/config") and payload and self.prefix.split("/")[-1] in payload.decode("utf-8", "replace"):
            self.discovery.setdefault(topic, time.monotonic())

    @staticmethod
    def _object(payload: bytes) -> dict[str, Any] | None:
        try:
            body = json.loads(payload) if payload else {}
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _on_status(self, topic: str, payload: bytes, _props: object) -> None:
        body = self._object(payload)
        if body is not None and self.topics.status.match(topic):
            self.status[str(body.get("id"))] = {**body, "_at": time.monotonic()}

    def _on_leader(self, topic: str, payload: bytes, _props: object) -> None:
        body = self._object(payload)
        if body is not None:
            self.leases.append((time.monotonic(), body))

    def _on_answer(self, rid: str, topic: str, body: dict[str, Any]) -> None:
        if rid in self.sent:
            self.answers[rid].append(Answer(rid, topic, body, self.sent[rid], time.monotonic()))

    # --- asking ---------------------------------------------------------------------------------

    async def request(self, op: str, text: str | list[str], params: dict[str, Any] | None = None,
                      timeout: float = 30.0, rid: str | None = None) -> Answer | None:
        """One general request on ``P/request``; None when no final reply came within ``timeout``."""
        rid = rid or f"r{uuid.uuid4().hex[:10]}"
        self.sent.setdefault(rid, time.monotonic())
        try:
            await self.client.request(op, text, params, timeout=timeout, request_id=rid)
        except TimeoutError:
            return None
        return self.answers[rid][-1]

    async def hermes(self, text: str, timeout: float = 30.0, rid: str | None = None) -> Answer | None:
        """One Hermes NLU query (session id = query id, so errors can be matched too)."""
        rid = rid or f"q{uuid.uuid4().hex[:10]}"
        self.sent.setdefault(rid, time.monotonic())
        try:
            await self.client.hermes_query(text, site_id="test", session_id=rid, timeout=timeout, query_id=rid)
        except TimeoutError:
            return None
        return self.answers[rid][-1]

    # --- waiting for the home -------------------------------------------------------------------

    def leader(self) -> str | None:
        if not self.leases:
            return None
        lid = self.leases[-1][1].get("id")
        return lid if isinstance(lid, str) else None

    def placement(self, devices: list[str]) -> int:
        """The leader's placement version when every one of ``devices`` reports ready at it; else 0."""
        lead = self.leader()
        if lead is None or lead not in self.status:
            return 0
        v = int(self.status[lead].get("placement_version") or 0)
        ok = all(self.status.get(d, {}).get("ready") and self.status[d].get("placement_version") == v for d in devices)
        return v if ok and v else 0

    async def wait_placement(self, devices: list[str], timeout: float = 60.0, newer_than: int = 0,
                             leader_not: str | None = None) -> tuple[str, int]:
        """Wait until a leader (not ``leader_not``) has a placement newer than ``newer_than`` with
        all of ``devices`` ready; returns (leader, version). On timeout the TimeoutError says what
        the home showed instead (leader, each device's state)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    lead, v = self.leader(), self.placement(devices)
                    if lead is not None and v > newer_than and lead != leader_not:
                        return lead, v
                    await asyncio.sleep(0.05)
        except TimeoutError as e:
            raise TimeoutError(f"no placement newer than v{newer_than} with {', '.join(devices)} ready "
                               f"within {timeout:g} s: {self.describe(devices)}") from e

    def state_of(self, dev: str) -> tuple[Any, ...]:
        """What changes as ``dev`` starts: presence, role, readiness, loading, placement version."""
        st = self.status.get(dev, {})
        return (self.presence.get(dev), st.get("role"), st.get("ready"), st.get("loading"),
                st.get("weights_percent"), st.get("placement_version"))

    def describe(self, devices: list[str]) -> str:
        """The home as this watcher sees it now: leader, lease records seen, each device's state."""
        now = time.monotonic()
        parts = [f"leader {self.leader()} ({len(self.leases)} lease records)"]
        for d in devices:
            st = self.status.get(d)
            state = "no status" if st is None else (
                f"{st.get('role')}, ready={st.get('ready')} loading={st.get('loading')} "
                f"placement v{st.get('placement_version')}, "
                f"status {now - float(st['_at']):.1f} s old")
            parts.append(f"{d}: {'online' if self.presence.get(d) else 'offline'}, {state}")
        return "; ".join(parts)

    async def wait_presence(self, dev: str, online: bool, after: float, timeout: float = 30.0) -> float:
        """The moment (after ``after``) ``dev``'s presence became ``online``."""
        async with asyncio.timeout(timeout):
            while True:
                for t, d, on in self.presence_events:
                    if d == dev and on == online and t >= after:
                        return t
                await asyncio.sleep(0.02)

    async def wait_leader(self, not_id: str, after: float, timeout: float = 30.0) -> tuple[float, str]:
        async with asyncio.timeout(timeout):
            while True:
                for t, lease in self.leases:
                    if t >= after and lease.get("id") not in (None, not_id):
                        return t, str(lease["id"])
                await asyncio.sleep(0.02)


def rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` (VmRSS, kB); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
