"""Chaos soak: a home of real agents in the testbed answers a steady stream of voice queries and
generations while devices, links and the broker fail; every answer is counted per id, and every
agent's memory and open file descriptors are sampled. Needs root (docs/TESTBED.md).

    sudo python bench/chaos.py                          # 15 minutes, 4 agents, tiny catalog
    sudo python bench/chaos.py --minutes 1 --lease-s 3 --keepalive-s 2 --status-s 0.5   # a quick look

The home: one namespace per agent (``detransformer-edge agent``, ``--catalog tiny --replicate-all``:
random weights, every code path real) on a ``--mbit`` shaped link, Mosquitto in the broker's
namespace (a wired hub), and a voice-assistant node whose client (the project's ``HomeClient``)
sends, at ``--rate`` per second, Hermes NLU queries (3 of 4) and short generations (1 of 4, every
other one on a pipeline over every device, so activations cross the broker).

Phases (shares of ``--minutes``): steady, agent kills, link cuts, broker restarts, steady again.
A seeded scheduler (``--seed``) injects one fault at a time; the first of each phase hits the
leader (or, for links, the leader's link), the rest a random device, the leader included:

* agent kill: SIGKILL (no goodbye: the broker's will says offline), restarted 0.5-1.5 leases later;
* link cut: the device's ``eth0`` taken down, or (every other cut) both directions of its link
  shaped to 8 kbit/s, for 0.5-2 leases, then restored;
* broker restart: Mosquitto stopped (SIGTERM, then SIGKILL every other time; it keeps no state)
  and started again 0.1-0.3 leases later.

Each request has a bound: 30 s for a voice query, 60 s for a generation. The client follows the
documented contract (docs/API.md): no answer after half a lease, it sends the same id again, and
again every half lease until the answer or the bound (a leader still running that id does not run
it twice); a send that fails because its own connection is down (broker restart) is tried again
every 0.5 s. Per id:

* ``once``: exactly one answer (a result, an intent, ``intentNotRecognized``, or a typed error:
  ``busy``, ``timeout``...) within the bound;
* ``late``: one answer, after the bound;
* ``lost``: no answer by the end of the soak plus ``--grace-s``;
* ``duplicated``: more than one answer (counted even when the second came after the bound).

Every ``--sample-s`` the VmRSS and the number of open file descriptors (``/proc/<pid>/fd``) of
every agent process is sampled; a restarted agent is a new series. "Flat" is judged per series by
a least-squares slope over the samples after warm-up (the first phase for the first processes,
``--warmup-s`` after a restart); series shorter than ``--min-series-s`` after warm-up are shown
but not judged.

Writes ``--out`` (JSON: counts, latencies, the fault timeline, every sample), the plot next to it
(``.png``) and the markdown table (``.md``); prints the table. Exit status 0 only if nothing was
lost, duplicated or late and every judged series is flat.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detransformer_edge.bench.runner import find_mosquitto, mosquitto_conf  # noqa: E402
from detransformer_edge.service.fleet import AgentFleet, HomeWatcher  # noqa: E402
from detransformer_edge.transport.session import NotConnectedError  # noqa: E402

QUERIES = ("turn on the kitchen light", "set a timer for ten minutes", "what's the weather like",
           "lock the front door", "add oat milk to the shopping list", "play some jazz in the living room")
PROMPTS = ("Write a short greeting", "Say good night", "Name a colour")
MQTT_PORT = 1883
VOICE_NODE = "voice"

BOUND_S = {"voice": 30.0, "generate": 60.0}
"""How long a person waits: a spoken command, a short generation (first send to answer)."""
RESEND_LEASES = 0.5
"""The client sends an unanswered id again every half lease (docs/API.md)."""

FAULT_KINDS = ("kill", "link", "broker")
PHASES: tuple[tuple[str, float, str | None], ...] = (
    # name, share of the soak, fault kind
    ("steady", 2 / 15, None),
    ("agent kills", 4 / 15, "kill"),
    ("link cuts", 4 / 15, "link"),
    ("broker restarts", 2 / 15, "broker"),
    ("steady again", 3 / 15, None),
)
THROTTLE = ["tbf", "rate", "8kbit", "burst", "2048", "limit", "4096"]  # "shaped to ~0"


# --- pure parts: the schedule, verdicts, statistics ---------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float
    end_s: float
    fault: str | None

    def holds(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s


def phases(total_s: float) -> list[Phase]:
    out, t = [], 0.0
    for name, share, fault in PHASES:
        out.append(Phase(name, round(t, 3), round(t + share * total_s, 3), fault))
        t += share * total_s
    return out


def phase_of(plan: Sequence[Phase], t_s: float) -> str:
    for p in plan:
        if p.holds(t_s):
            return p.name
    return plan[-1].name


@dataclass(frozen=True)
class FaultTiming:
    """Fault durations and gaps, in leases: recovery scales with the lease, so the same schedule
    stresses a home with the production lease (10 s) and one with a test lease (3 s) alike."""

    kill_down: tuple[float, float] = (0.5, 1.5)
    link_down: tuple[float, float] = (0.5, 2.0)
    broker_down: tuple[float, float] = (0.1, 0.3)
    gap: tuple[float, float] = (1.0, 2.5)

    def down(self, kind: str, rng: random.Random, lease_s: float) -> float:
        lo, hi = {"kill": self.kill_down, "link": self.link_down, "broker": self.broker_down}[kind]
        return rng.uniform(lo, hi) * lease_s

    def pause(self, rng: random.Random, lease_s: float) -> float:
        return rng.uniform(*self.gap) * lease_s


@dataclass
class Outcome:
    """One request as the client saw it: when it was first sent, every answer to its id."""

    id: str
    kind: str  # voice | generate
    phase: str
    sent_s: float  # since the start of the soak
    bound_s: float
    answers: list[tuple[float, str]] = field(default_factory=list)  # (at_s, label)
    sends: int = 0  # publishes that reached the broker (1 + re-sends)
    unsent: int = 0  # publishes refused: the client's own connection was down

    def verdict(self) -> str:
        if not self.answers:
            return "lost"
        if len(self.answers) > 1:
            return "duplicated"
        return "once" if self.answers[0][0] - self.sent_s <= self.bound_s else "late"

    @property
    def latency_s(self) -> float | None:
        return self.answers[0][0] - self.sent_s if self.answers else None


VERDICTS = ("once", "late", "lost", "duplicated")


def answer_label(topic: str, body: dict[str, Any]) -> str:
    """What an answer was: ``intent``, ``not_recognized``, ``nlu_error``, ``result`` or the
    typed error code of a reply."""
    if topic.startswith("hermes/intent/"):
        return "intent"
    if topic == "hermes/nlu/intentNotRecognized":
        return "not_recognized"
    if topic == "hermes/error/nlu":
        return "nlu_error"
    err = body.get("error")
    if err is None:
        return "result"
    return f"error:{err.get('code', '?')}" if isinstance(err, dict) else "error:?"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


def summarize_requests(outcomes: Sequence[Outcome], plan: Sequence[Phase]) -> list[dict[str, Any]]:
    """Per phase (by first send), then all: counts per verdict and latency per kind."""
    rows = []
    for name in [p.name for p in plan] + ["all"]:
        mine = [o for o in outcomes if name in ("all", o.phase)]
        row: dict[str, Any] = {"phase": name, "sent": len(mine), **{v: 0 for v in VERDICTS}}
        for o in mine:
            row[o.verdict()] += 1
        row["resent"] = sum(1 for o in mine if o.sends > 1)
        labels: dict[str, int] = {}
        for o in mine:
            if o.answers:
                labels[o.answers[0][1]] = labels.get(o.answers[0][1], 0) + 1
        row["answers"] = dict(sorted(labels.items()))
        for kind in ("voice", "generate"):
            lat = [o.latency_s * 1e3 for o in mine if o.kind == kind and o.latency_s is not None]
            row[kind] = {"sent": sum(1 for o in mine if o.kind == kind), "p50_ms": _r(percentile(lat, 50)),
                         "p99_ms": _r(percentile(lat, 99)), "max_ms": _r(max(lat, default=None))}
        rows.append(row)
    return rows


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


@dataclass(frozen=True)
class Flatness:
    """When a series counts as flat after warm-up (per hour, least squares)."""

    rss_mb_per_h: float = 10.0
    fds_per_h: float = 10.0


def judge_series(samples: Sequence[tuple[float, float, float]], warm_from_s: float, min_span_s: float,
                 limits: Flatness = Flatness()) -> dict[str, Any]:
    """``samples``: (t_s, rss_kb, fds) of one process. Slopes over the samples from
    ``warm_from_s``; judged only when they span ``min_span_s``."""
    warm = [s for s in samples if s[0] >= warm_from_s]
    span = warm[-1][0] - warm[0][0] if len(warm) > 1 else 0.0
    rss = slope_per_hour([(t, kb / 1024) for t, kb, _ in warm])
    fds = slope_per_hour([(t, n) for t, _, n in warm])
    out: dict[str, Any] = {
        "samples": len(samples), "warm_samples": len(warm), "warm_span_s": round(span, 1),
        "rss_mb_first": _r(samples[0][1] / 1024) if samples else None,
        "rss_mb_warm": _r(warm[0][1] / 1024) if warm else None,
        "rss_mb_last": _r(samples[-1][1] / 1024) if samples else None,
        "fds_first": samples[0][2] if samples else None, "fds_warm": warm[0][2] if warm else None,
        "fds_last": samples[-1][2] if samples else None,
        "fds_max_warm": max((n for _, _, n in warm), default=None),
        "rss_mb_per_h": _r(rss, 2), "fds_per_h": _r(fds, 2),
    }
    if span < min_span_s or rss is None or fds is None:
        out["flat"] = None  # too short to judge
    else:
        out["flat"] = abs(rss) <= limits.rss_mb_per_h and abs(fds) <= limits.fds_per_h
    return out


def settled_from(plan: Sequence[Phase]) -> float:
    """When the faults that move weights end (the last agent kill or link cut phase): after it,
    a placement holds the same devices, so memory has no reason to move at all."""
    return max((p.end_s for p in plan if p.fault in ("kill", "link")), default=plan[0].end_s)


def judge_all(samples: dict[str, Sequence[tuple[float, float, float]]], starts: dict[str, float],
              plan: Sequence[Phase], warmup_s: float, min_series_s: float) -> dict[str, dict[str, Any]]:
    """Every process's series judged twice: after its warm-up (the first phase for the first
    processes, ``warmup_s`` after a restart) and after the faults that move weights."""
    calm = settled_from(plan)
    out = {}
    for name, pts in sorted(samples.items()):
        start = starts.get(name, 0.0)
        warm_from = plan[0].end_s if name.endswith("#1") else start + warmup_s
        judged = judge_series(pts, warm_from, min_series_s)
        late = judge_series(pts, max(warm_from, calm), min_series_s)
        judged["after_faults"] = {k: late[k] for k in ("rss_mb_per_h", "fds_per_h", "flat", "warm_span_s")}
        judged["after_faults"]["from_s"] = round(max(warm_from, calm), 1)
        judged["started_s"] = round(start, 1)
        judged["warm_from_s"] = round(warm_from, 1)
        out[name] = judged
    return out


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(VmRSS in kB, open file descriptors) of ``pid``; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return None if rss is None else (rss, fds)


# --- the home -------------------------------------------------------------------------------------------


class BrokerNode:
    """Mosquitto in the broker's namespace, stopped and started again on demand."""

    def __init__(self, home: Any, workdir: Path) -> None:
        self.home = home
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(mosquitto_conf(MQTT_PORT))
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = self.home.spawn("broker", [find_mosquitto(), "-c", str(self.conf)], stdout=log,
                                        stderr=subprocess.STDOUT)
        self.incarnation += 1

    def stop(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Chaos:
    """The soak's moving parts: the client's traffic, the fault scheduler and the sampler, all on
    one event loop in the voice node's namespace (``Home.call``)."""

    def __init__(self, args: argparse.Namespace, home: Any, fleet: AgentFleet, broker: BrokerNode,
                 abort: threading.Event) -> None:
        self.args = args
        self.home = home
        self.fleet = fleet
        self.broker = broker
        self.abort = abort
        self.rng = random.Random(args.seed)
        self.plan = phases(args.minutes * 60)
        self.timing = FaultTiming()
        self.t0 = 0.0
        self.wall0 = 0.0  # unix time of t = 0 (the agents' logs are in wall time)
        self.outcomes: dict[str, Outcome] = {}
        self.faults: list[dict[str, Any]] = []
        self.samples: dict[str, list[tuple[float, float, float]]] = {}  # series -> (t_s, rss_kb, fds)
        self.series_start: dict[str, float] = {}
        self.incarnation: dict[str, int] = {d: 1 for d in fleet.ids}
        self.down: set[str] = set()  # agents killed and not yet restarted
        self.leaders: list[tuple[float, str]] = []
        self.watch: HomeWatcher | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def series(self, dev: str) -> str:
        return f"{dev}#{self.incarnation[dev]}"

    # --- the client -------------------------------------------------------------------------------

    def _on_answer(self, rid: str, topic: str, body: dict[str, Any]) -> None:
        o = self.outcomes.get(rid)
        if o is not None:
            o.answers.append((round(self.now(), 3), answer_label(topic, body)))

    async def _ask(self, o: Outcome, text: str, params: dict[str, Any]) -> None:
        """Send, wait, send the same id again every half lease, until an answer or the bound."""
        assert self.watch is not None
        client = self.watch.client
        retry_s = self.args.lease_s * RESEND_LEASES
        deadline = o.sent_s + o.bound_s
        while not o.answers and self.now() < deadline:
            wait = max(0.1, min(retry_s, deadline - self.now()))
            try:
                if o.kind == "voice":
                    await client.hermes_query(text, site_id=VOICE_NODE, session_id=o.id, query_id=o.id,
                                              timeout=wait)
                else:
                    await client.request("generate", text, params, timeout=wait, request_id=o.id)
            except NotConnectedError:
                o.unsent += 1
                await asyncio.sleep(0.5)
                continue
            except TimeoutError:
                pass
            o.sends += 1

    async def traffic(self, stop_s: float) -> None:
        k = 0
        period = 1.0 / self.args.rate
        next_at = self.now()
        while self.now() < stop_s and not self.abort.is_set():
            kind = "generate" if k % 4 == 3 else "voice"
            t = self.now()
            o = Outcome(f"chaos-{k:05d}", kind, phase_of(self.plan, t), round(t, 3), BOUND_S[kind])
            self.outcomes[o.id] = o
            if kind == "voice":
                text, params = QUERIES[k % len(QUERIES)], {}
            else:
                text = PROMPTS[k % len(PROMPTS)]
                params = {"max_new_tokens": 8, "chat": False, **({"plan": "pipeline"} if k % 8 == 7 else {})}
            task = asyncio.create_task(self._ask(o, text, params), name=o.id)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            k += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - self.now()))

    # --- faults -----------------------------------------------------------------------------------

    def _event(self, kind: str, target: str, action: str, **detail: Any) -> dict[str, Any]:
        ev = {"t_s": round(self.now(), 2), "phase": phase_of(self.plan, self.now()), "fault": kind,
              "target": target, "action": action, **detail}
        self.faults.append(ev)
        print(f"[chaos {ev['t_s']:7.1f} s] {kind} {action} {target} {detail or ''}", flush=True)
        return ev

    def leader(self) -> str | None:
        return self.watch.leader() if self.watch is not None else None

    def _victim(self, first: bool) -> str:
        running = [d for d in self.fleet.ids if d not in self.down]
        lead = self.leader()
        if first and lead in running:
            return lead  # type: ignore[return-value]
        return self.rng.choice(running)

    async def _sleep_until(self, t_s: float) -> None:
        while self.now() < t_s and not self.abort.is_set():
            await asyncio.sleep(min(0.5, t_s - self.now()))

    async def _kill(self, first: bool, down_s: float) -> None:
        dev = self._victim(first)
        lead = dev == self.leader()
        await asyncio.to_thread(self.fleet.kill, dev)
        self.down.add(dev)
        self._event("kill", dev, "SIGKILL", leader=lead)
        await self._sleep_until(self.now() + down_s)
        self.incarnation[dev] += 1
        await asyncio.to_thread(self.fleet.start, [dev])
        self.series_start[self.series(dev)] = self.now()
        self.down.discard(dev)
        self._event("kill", dev, "restarted", pid=self.fleet.pid(dev))

    async def _cut(self, nth: int, first: bool, down_s: float) -> None:
        dev = self._victim(first)
        lead = dev == self.leader()
        link = next(lk for lk in self.home.links if lk.node == dev)
        router = self.home.netns("router")
        if nth % 2 == 0:
            await asyncio.to_thread(self.home.run, dev, ["ip", "link", "set", "eth0", "down"])
            self._event("link", dev, "down", leader=lead)
            await self._sleep_until(self.now() + down_s)
            await asyncio.to_thread(self.home.run, dev, ["ip", "link", "set", "eth0", "up"])
        else:
            for cmd in (["tc", "-n", link.netns, "qdisc", "replace", "dev", "eth0", "root", *THROTTLE],
                        ["tc", "-n", router, "qdisc", "replace", "dev", link.bridge_port, "root", *THROTTLE]):
                await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True)
            self._event("link", dev, "shaped to 8 kbit/s", leader=lead)
            await self._sleep_until(self.now() + down_s)
            restore = link.shaping.tc_args() if link.shaping is not None else ["pfifo_fast"]
            for cmd in (["tc", "-n", link.netns, "qdisc", "replace", "dev", "eth0", "root", *restore],
                        ["tc", "-n", router, "qdisc", "replace", "dev", link.bridge_port, "root", *restore]):
                await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True)
        self._event("link", dev, "restored")

    async def _restart_broker(self, nth: int, down_s: float) -> None:
        sig = signal.SIGTERM if nth % 2 == 0 else signal.SIGKILL
        await asyncio.to_thread(self.broker.stop, sig)
        self._event("broker", "broker", f"stopped ({signal.Signals(sig).name})")
        await self._sleep_until(self.now() + down_s)
        await asyncio.to_thread(self.broker.start)
        self._event("broker", "broker", "started")

    async def scheduler(self) -> None:
        lease = self.args.lease_s
        for phase in self.plan:
            await self._sleep_until(phase.start_s)
            if phase.fault is None:
                continue
            nth = 0
            start = phase.start_s + min(2.0, 0.1 * (phase.end_s - phase.start_s))
            await self._sleep_until(start)
            while not self.abort.is_set():
                down_s = self.timing.down(phase.fault, self.rng, lease)
                if nth and self.now() + down_s > phase.end_s:
                    break  # every fault ends (restored) inside its phase; the first always runs
                if phase.fault == "kill":
                    await self._kill(nth == 0, down_s)
                elif phase.fault == "link":
                    await self._cut(nth, nth == 0, down_s)
                else:
                    await self._restart_broker(nth, down_s)
                nth += 1
                await self._sleep_until(min(phase.end_s, self.now() + self.timing.pause(self.rng, lease)))
                if self.now() >= phase.end_s:
                    break

    # --- sampling ---------------------------------------------------------------------------------

    def sample(self) -> None:
        t = round(self.now(), 2)
        for dev in self.fleet.ids:
            if dev in self.down:
                continue
            got = rss_and_fds(self.fleet.pid(dev))
            if got is not None:
                self.samples.setdefault(self.series(dev), []).append((t, got[0], got[1]))
        lead = self.leader()
        if lead is not None and (not self.leaders or self.leaders[-1][1] != lead):
            self.leaders.append((t, lead))

    async def sampler(self, stop_s: float) -> None:
        while self.now() < stop_s and not self.abort.is_set():
            self.sample()
            self.fleet.check_alive()
            await asyncio.sleep(self.args.sample_s)
        self.sample()

    # --- the whole soak ---------------------------------------------------------------------------

    async def run(self) -> None:
        args = self.args
        async with HomeWatcher(self.home.address("broker"), MQTT_PORT, self.fleet.cluster) as watch:
            self.watch = watch
            leader, version = await self.fleet.wait_ready(watch, quiet_s=min(60.0, args.ready_timeout_s),
                                                          cap_s=args.ready_timeout_s)
            print(f"[chaos] home ready: leader {leader}, placement v{version}; "
                  f"{args.minutes:g} min at {args.rate:g} requests/s", flush=True)
            watch.client.follow_answers(self._on_answer)
            self.t0, self.wall0 = time.monotonic(), time.time()
            for dev in self.fleet.ids:
                self.series_start[self.series(dev)] = 0.0
            total = args.minutes * 60
            work = [asyncio.create_task(self.traffic(total), name="traffic"),
                    asyncio.create_task(self.scheduler(), name="faults"),
                    asyncio.create_task(self.sampler(total + args.grace_s), name="sampler")]
            try:
                await asyncio.gather(*work[:2])
                # each request ends with its answer or its bound; then a grace for late and duplicate answers
                if self._tasks:
                    await asyncio.gather(*self._tasks, return_exceptions=True)
                await self._sleep_until(self.now() + args.grace_s)
                work[2].cancel()
                self.sample()
            finally:
                for task in [*work, *self._tasks]:
                    task.cancel()
                await asyncio.gather(*work, *self._tasks, return_exceptions=True)

    def result(self, host_load: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        outcomes = sorted(self.outcomes.values(), key=lambda o: o.sent_s)
        series = judge_all(self.samples, self.series_start, self.plan, args.warmup_s, args.min_series_s)
        bad = [o.id for o in outcomes if o.verdict() != "once"]
        return {
            "command": command_line(args),
            "agents": args.agents, "catalog": args.catalog, "minutes": args.minutes, "rate": args.rate,
            "seed": args.seed, "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.wall0)),
            "lease_s": args.lease_s, "keepalive_s": args.keepalive_s,
            "status_interval_s": args.status_s, "mbit": args.mbit, "bounds_s": BOUND_S,
            "resend_every_s": args.lease_s * RESEND_LEASES,
            "warmup_s": args.warmup_s, "min_series_s": args.min_series_s,
            "flatness": dataclasses.asdict(Flatness()), "host_load": host_load,
            "phases": [dataclasses.asdict(p) for p in self.plan],
            "requests": summarize_requests(outcomes, self.plan),
            "not_once": [dataclasses.asdict(self.outcomes[i]) | {"verdict": self.outcomes[i].verdict()}
                         for i in bad[:200]],
            "faults": self.faults, "leaders": self.leaders, "series": series,
            "samples": {k: [list(s) for s in v] for k, v in self.samples.items()},
        }


def command_line(args: argparse.Namespace) -> str:
    parts = [f"sudo python bench/chaos.py --minutes {args.minutes:g} --agents {args.agents} --catalog {args.catalog}",
             f"--rate {args.rate:g} --seed {args.seed}"]
    if (args.lease_s, args.keepalive_s, args.status_s) != (10.0, 10, 2.0):
        parts.append(f"--lease-s {args.lease_s:g} --keepalive-s {args.keepalive_s} --status-s {args.status_s:g}")
    return " ".join(parts)


def host_load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from detransformer_edge.testbed import BrokerSpec, DeviceSpec, Home, HomeSpec

    workdir = Path(tempfile.mkdtemp(prefix="dte-chaos-"))
    workdir.chmod(0o755)  # mosquitto drops root and must read its config
    print(f"[chaos] logs in {workdir}", flush=True)
    ids = [f"dev{i}" for i in range(args.agents)]
    spec = HomeSpec(devices=[*(DeviceSpec(d, cpu=args.cpu, mbit=args.mbit) for d in ids),
                             DeviceSpec(VOICE_NODE, mbit=args.mbit)],
                    broker=BrokerSpec(mbit=None), prefix=args.prefix or f"chs{secrets.token_hex(4)}")
    load_before = host_load()
    abort = threading.Event()
    with Home(spec) as home:
        broker = BrokerNode(home, workdir)
        broker.start()
        fleet = AgentFleet(workdir, (home.address("broker"), MQTT_PORT), n=args.agents, catalog=args.catalog,
                           keepalive_s=args.keepalive_s, lease_s=args.lease_s, status_interval_s=args.status_s,
                           replicate_all=True, home=home, verbose=1)
        fleet.start()
        chaos = Chaos(args, home, fleet, broker, abort)
        try:
            home.call(VOICE_NODE, asyncio.run, chaos.run())
        finally:
            abort.set()  # if the wait was interrupted, the loop in the voice node ends by itself
            fleet.stop()
    return chaos.result({"before": load_before, "after": host_load(), "workdir": str(workdir)})


# --- the report -----------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    faults_per_phase: dict[str, int] = {}
    for ev in res["faults"]:
        if ev["action"] in ("SIGKILL", "down", "shaped to 8 kbit/s") or ev["action"].startswith("stopped"):
            faults_per_phase[ev["phase"]] = faults_per_phase.get(ev["phase"], 0) + 1
    spans = {p["name"]: p["end_s"] - p["start_s"] for p in res["phases"]}
    lines = ["| phase | s | faults | sent | once in bound | late | lost | duplicated | re-sent | "
             "voice p50 / p99 (ms) | generate p50 / p99 (ms) | answers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in res["requests"]:
        name = row["phase"]
        n_faults = sum(faults_per_phase.values()) if name == "all" else faults_per_phase.get(name, 0)
        span = res["minutes"] * 60 if name == "all" else spans[name]
        answers = ", ".join(f"{k} {v}" for k, v in row["answers"].items())
        lines.append(f"| {'**all**' if name == 'all' else name} | {span:.0f} | {n_faults} | {row['sent']} | "
                     f"{row['once']} | {row['late']} | {row['lost']} | {row['duplicated']} | {row['resent']} | "
                     f"{ms(row['voice']['p50_ms'])} / {ms(row['voice']['p99_ms'])} | "
                     f"{ms(row['generate']['p50_ms'])} / {ms(row['generate']['p99_ms'])} | {answers} |")
    lines += ["", "| agent process | started (s) | RSS MB first / warm / last | RSS MB/h after warm-up | "
              "RSS MB/h after the kills and link cuts | FDs first / warm / last (max) | FDs/h after warm-up / "
              "after faults | flat after warm-up | flat after faults |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    verdict = {True: "yes", False: "**no**", None: "too short"}

    def v(x: object) -> str:
        return "-" if x is None else str(x)

    for name, s in res["series"].items():
        late = s["after_faults"]
        lines.append(f"| {name} | {s['started_s']:.0f} | {v(s['rss_mb_first'])} / {v(s['rss_mb_warm'])} / "
                     f"{v(s['rss_mb_last'])} | {v(s['rss_mb_per_h'])} | {v(late['rss_mb_per_h'])} | "
                     f"{v(s['fds_first'])} / {v(s['fds_warm'])} / {v(s['fds_last'])} ({v(s['fds_max_warm'])}) | "
                     f"{v(s['fds_per_h'])} / {v(late['fds_per_h'])} | {verdict[s['flat']]} | {verdict[late['flat']]} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    devs = sorted({name.split("#")[0] for name in res["samples"]})
    steady_rss: list[float] = []  # RSS once each process has loaded (the boot ramp is cut off)
    for name, pts in sorted(res["samples"].items()):
        dev = name.split("#")[0]
        c = colors[devs.index(dev) % len(colors)]
        t = [p[0] / 60 for p in pts]
        label = dev if name.endswith("#1") else None
        ax_rss.plot(t, [p[1] / 1024 for p in pts], color=c, lw=1.2, label=label, marker=".", ms=2)
        ax_fd.plot(t, [p[2] for p in pts], color=c, lw=1.2, label=label)
        start = res["series"].get(name, {}).get("started_s", 0.0)
        steady_rss += [p[1] / 1024 for p in pts if p[0] >= start + 15]
    shades = {"agent kills": "#f4cccc", "link cuts": "#fff2cc", "broker restarts": "#d9ead3"}
    calm = settled_from([Phase(**p) for p in res["phases"]])
    for ax in (ax_rss, ax_fd):
        for p in res["phases"]:
            if p["name"] in shades:
                ax.axvspan(p["start_s"] / 60, p["end_s"] / 60, color=shades[p["name"]], alpha=0.6, lw=0)
        for ev in res["faults"]:
            if ev["action"] in ("SIGKILL", "down", "shaped to 8 kbit/s") or ev["action"].startswith("stopped"):
                ax.axvline(ev["t_s"] / 60, color="0.35", lw=0.6, ls=":")
        ax.axvline(res["phases"][0]["end_s"] / 60, color="k", lw=0.9, ls="--")
        ax.axvline(calm / 60, color="k", lw=0.9, ls="--")
        ax.grid(alpha=0.3)
    if steady_rss:
        ax_rss.set_ylim(min(steady_rss) - 4, max(steady_rss) + 6)
    top = ax_rss.get_ylim()[1]
    for p in res["phases"]:
        ax_rss.text((p["start_s"] + p["end_s"]) / 120, top, p["name"], ha="center", va="bottom", fontsize=8)
    for t, lead in res.get("leaders", []):
        ax_rss.annotate(f"L {lead}", (t / 60, top), xytext=(0, -9), textcoords="offset points", fontsize=6,
                        ha="left", va="top", color="0.25")
    ax_rss.set_ylabel("agent RSS (MB)")
    ax_fd.set_ylabel("open file descriptors")
    ax_fd.set_ylim(0, max((p[2] for pts in res["samples"].values() for p in pts), default=10) + 3)
    ax_fd.set_xlabel("minutes (dotted: a fault begins; dashed: end of warm-up, end of the kills and link cuts; "
                     "a restarted agent starts a new line, its loading ramp below the axis; L: a new leader)",
                     fontsize=8)
    ax_rss.legend(loc="lower right", fontsize=8, ncol=len(devs))
    all_row = res["requests"][-1]
    fig.suptitle(f"Chaos soak: {res['agents']} agents, {all_row['sent']} requests: {all_row['once']} answered once "
                 f"in bound, {all_row['lost']} lost, {all_row['duplicated']} duplicated, {all_row['late']} late",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rejudge(res: dict[str, Any]) -> dict[str, Any]:
    """A saved run judged again with this code (the samples and the fault timeline are kept)."""
    plan = [Phase(**p) for p in res["phases"]]
    starts = {name: s["started_s"] for name, s in res["series"].items()}
    samples = {k: [tuple(x) for x in v] for k, v in res["samples"].items()}
    res["series"] = judge_all(samples, starts, plan, res.get("warmup_s", 60.0), res.get("min_series_s", 180.0))
    res["flatness"] = dataclasses.asdict(Flatness())
    return res


def verdict_ok(res: dict[str, Any]) -> bool:
    total = res["requests"][-1]
    return (total["lost"] == total["duplicated"] == total["late"] == 0
            and all(s["flat"] is not False for s in res["series"].values()))


def main(argv: list[str] | None = None, on_result: Callable[[dict[str, Any]], None] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--catalog", default="tiny", choices=("tiny", "pretrained"))
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (3 of 4 voice queries)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lease-s", type=float, default=10.0, help="election lease (the default of agent.toml)")
    p.add_argument("--keepalive-s", type=int, default=10, help="MQTT keepalive (the default of agent.toml)")
    p.add_argument("--status-s", type=float, default=2.0, help="status interval")
    p.add_argument("--mbit", type=int, default=100, help="every device's link")
    p.add_argument("--cpu", type=float, default=None, help="CPU quota per agent (share of a core; none by default)")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS and FD sampling interval")
    p.add_argument("--warmup-s", type=float, default=60.0, help="warm-up of a restarted agent")
    p.add_argument("--min-series-s", type=float, default=180.0, help="shortest series judged flat or not")
    p.add_argument("--grace-s", type=float, default=10.0, help="listening for late and duplicate answers")
    p.add_argument("--ready-timeout-s", type=float, default=300.0,
                   help="start-up bound in all; it also fails after a minute with no agent progressing")
    p.add_argument("--prefix", default=None, help="testbed prefix (default chs + random hex)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, default=None,
                   help="no soak: judge, tabulate and plot the samples of a saved run again")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = soak(args) if args.from_json is None else rejudge(json.loads(args.from_json.read_text()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    if not args.no_plot:
        plot(res, args.out.with_suffix(".png"))
    print(md)
    total = res["requests"][-1]
    print(f"[chaos] {total['sent']} sent: {total['once']} once in bound, {total['late']} late, "
          f"{total['lost']} lost, {total['duplicated']} duplicated; host load {res['host_load']['before']} -> "
          f"{res['host_load']['after']}; wrote {args.out}", flush=True)
    if on_result is not None:
        on_result(res)
    return 0 if verdict_ok(res) else 1


if __name__ == "__main__":
    sys.exit(main())
