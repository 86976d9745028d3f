"""The multi-device demo: a broker, four agent processes with the profiles of real home devices,
then voice queries over the Hermes topics and one generation request, each with its plan and
latency. Everything runs on this machine; the agents talk only through the broker.

    detransformer-edge demo                  # Ctrl-C to stop
    detransformer-edge demo --home speakers  # four smart speakers, none of which can hold SmolLM2
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from detransformer_edge.errors import DetransformerError
from detransformer_edge.planner.profile import bundled_profile
from detransformer_edge.protocol.client import HomeClient
from detransformer_edge.protocol.messages import LogEntry
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.service.answers import asks_a_question
from detransformer_edge.transport.broker import LocalBroker, free_port, local_broker

# id, name, profile: a home's mix of devices (the planner sees their real capabilities)
DEVICES: tuple[tuple[str, str, str], ...] = (
    ("kitchen-pi5", "Kitchen Raspberry Pi 5", "raspberry-pi-5"),
    ("living-pi5", "Living-room Raspberry Pi 5", "raspberry-pi-5"),
    ("hall-pi4", "Hall Raspberry Pi 4", "raspberry-pi-4b"),
    ("bedroom-speaker", "Bedroom smart speaker", "smart-speaker-a53"),
)
# Four smart speakers whose memory budgets (400 MB each) are below SmolLM2-135M's size: the leader's
# static placement must split the language model across them (docs/PLANNER.md, "A model no single
# device can hold").
SPEAKERS: tuple[tuple[str, str, str], ...] = (
    ("kitchen-speaker", "Kitchen smart speaker", "smart-speaker-1gb"),
    ("living-speaker", "Living-room smart speaker", "smart-speaker-1gb"),
    ("bedroom-speaker", "Bedroom smart speaker", "smart-speaker-1gb"),
    ("hall-speaker", "Hall smart speaker", "smart-speaker-1gb"),
)
HOMES: dict[str, tuple[tuple[str, str, str], ...]] = {"default": DEVICES, "speakers": SPEAKERS}

QUERIES: tuple[str, ...] = (
    "turn on the lights in the kitchen",
    "set the living room lights to 40 percent",
    "set a timer for ten minutes",
    "what's the weather going to be like",
    "add oat milk to the shopping list",
    "lock the front door",
    "who wrote the odyssey",
    # a long, rambling command: at this length the planner splits the decoupled encoder's
    # sub-blocks across devices
    "okay so before everyone goes to sleep tonight could you please set the brightness of the "
    "lights in the living room all the way down to about twenty percent for me",
)
PROMPT = "What is the capital of France?"
ANSWER_WAIT_S = 20.0  # a spoken answer is bounded by the agents' [answers] timeout_s (8 s)
# A longer text: at this length the planner spreads the encoder over devices.
DOCUMENT = (
    "House rules for the evening routine. At sunset the hall and kitchen lights turn on at forty "
    "percent, the living room stays dim until someone asks for more light, and the thermostat goes "
    "down to nineteen degrees once everyone is in bed. The front door locks itself at eleven unless "
    "a guest is expected, in which case the porch light stays on until they arrive. On weekdays the "
    "kitchen speaker reads the weather and the first calendar entry at seven in the morning, plays "
    "quiet music while breakfast is made, and stops as soon as the front door opens. Shopping list "
    "items added during the week are read out on Saturday morning before the market opens."
)


class DemoError(DetransformerError):
    pass


@dataclass
class DemoOptions:
    catalog: str = "pretrained"
    home: str = "default"  # default | speakers (HOMES)
    broker: str = "auto"  # auto | mosquitto | amqtt
    devices: int = 4
    max_new_tokens: int = 24
    wait: bool | None = None  # keep running until Ctrl-C; None: when stdin is a terminal
    startup_timeout_s: float = 240.0
    out: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class ClusterWatch:
    """What the demo sees of the cluster through the broker (it is a client like any other)."""

    presence: dict[str, bool] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    leader: dict[str, Any] | None = None
    log: list[LogEntry] = field(default_factory=list)

    def online(self) -> list[str]:
        return sorted(d for d, up in self.presence.items() if up)

    def placement_ready(self, devices: list[str]) -> tuple[int, int]:
        """(ready devices at the leader's placement version, version)."""
        if self.leader is None:
            return 0, 0
        lead = self.status.get(self.leader["id"], {})
        version = int(lead.get("placement_version") or 0)
        ready = [d for d in devices if self.status.get(d, {}).get("ready") and self.status[d].get("placement_version") == version]
        return (len(ready), version) if version else (0, 0)


@dataclass(frozen=True)
class DemoDevice:
    id: str
    config: Path
    dashboard_port: int
    wyoming_port: int


def write_configs(workdir: Path, broker: LocalBroker, cluster: str, n: int,
                  devices: tuple[tuple[str, str, str], ...] = DEVICES) -> list[DemoDevice]:
    out = []
    for dev_id, name, profile in devices[:n]:
        dashboard, wyoming = free_port(), free_port()
        path = workdir / f"{dev_id}.toml"
        path.write_text(
            f'id = "{dev_id}"\nname = "{name}"\ncluster = "{cluster}"\n'
            f'profile = "{bundled_profile(profile).as_posix()}"\n'
            f"dashboard_port = {dashboard}\nwyoming_port = {wyoming}\nwyoming_host = \"127.0.0.1\"\n"
            f"discovery = true\nhomeassistant = true\nstatus_interval_s = 2.0\nanswer_questions = true\n"
            f'\n[broker]\nurl = "{broker.url}"\nprotocol = "auto"\nkeepalive_s = 10\n'
            f"\n[election]\nlease_s = 6.0\n"
        )
        out.append(DemoDevice(dev_id, path, dashboard, wyoming))
    return out


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.out = opts.out
        self.cluster = f"demo{uuid.uuid4().hex[:6]}"
        self.topics = ClusterTopics(self.cluster)
        self.prefix = self.topics.prefix
        self.watch = ClusterWatch()
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logged = asyncio.Event()
        if opts.home not in HOMES:
            raise DemoError(f"unknown home {opts.home!r}; use one of {', '.join(HOMES)}")
        self.devices = HOMES[opts.home]

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def status_line(self, text: str) -> None:
        if self.out.isatty():
            self.out.write("\r" + text + "\x1b[K")
            self.out.flush()

    # --- processes ---------------------------------------------------------------------------------

    def start_agents(self, configs: list[DemoDevice], workdir: Path) -> None:
        from detransformer_edge.service.runner import parent_watch_env

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DETRANSFORMER_THREADS": "1", **parent_watch_env()}
        for dev in configs:
            log = (workdir / f"{dev.id}.log").open("wb")
            argv = [sys.executable, "-m", "detransformer_edge.cli", "agent", "--config", str(dev.config),
                    "--catalog", self.opts.catalog]
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))

    def stop_agents(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def check_agents(self, workdir: Path) -> None:
        for (dev_id, _, _), p in zip(self.devices, self.procs):
            if p.poll() is not None:
                tail = (workdir / f"{dev_id}.log").read_text(errors="replace")[-1500:]
                raise DemoError(f"agent {dev_id} exited with code {p.returncode}:\n{tail}")

    # --- MQTT: the demo is a client of the home like any other ------------------------------------

    def watch_cluster(self, home: HomeClient) -> None:
        t = self.topics

        def on_presence(topic: str, payload: bytes, _props: object) -> None:
            dev = t.presence.match(topic)
            if dev is not None:
                self.watch.presence[dev] = bool(payload) and t.presence.decode(payload).online

        def on_status(topic: str, payload: bytes, _props: object) -> None:
            dev = t.status.match(topic)
            if dev is not None and payload:
                self.watch.status[dev] = t.status.decode(payload).to_dict()

        def on_leader(topic: str, payload: bytes, _props: object) -> None:
            self.watch.leader = t.leader.decode(payload).to_dict() if payload else None

        def on_log(entry: LogEntry) -> None:
            self.watch.log.append(entry)
            self._logged.set()

        home.session.subscribe(t.presence.filter, on_presence, 1)
        home.session.subscribe(t.status.filter, on_status, 0)
        home.session.subscribe(t.leader.format(), on_leader, 1)
        home.follow_log(on_log)

    async def logged(self, client_id: str, timeout: float = 2.0) -> LogEntry | None:
        """The leader's request-log line for ``client_id`` (it follows the answer by a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in reversed(self.watch.log):
                if entry.client_id == client_id:
                    return entry
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._logged.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._logged.wait(), left)

    # --- the script ---------------------------------------------------------------------------------

    async def wait_for_cluster(self, devices: list[str], workdir: Path) -> str:
        t0 = time.monotonic()
        last = ""
        while True:
            self.check_agents(workdir)
            online = [d for d in devices if self.watch.presence.get(d)]
            ready, version = self.watch.placement_ready(devices)
            leader = self.watch.leader["id"] if self.watch.leader else None
            line = (f"  [{time.monotonic() - t0:5.1f}s] discovery {len(online)}/{len(devices)} online | "
                    f"leader {leader or '-'} | placement v{version or '-'} ready {ready}/{len(devices)}")
            if line.split("|")[1:] != last.split("|")[1:] and not self.out.isatty():
                self.say(line)
            self.status_line(line)
            last = line
            if leader and ready == len(devices):
                if self.out.isatty():
                    self.say()
                return leader
            if time.monotonic() - t0 > self.opts.startup_timeout_s:
                raise DemoError(f"the cluster did not become ready within {self.opts.startup_timeout_s:.0f} s ({line.strip()})")
            await asyncio.sleep(0.25)

    async def run(self) -> int:
        opts = self.opts
        t_start = time.monotonic()
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(local_broker(opts.broker))
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dte-demo-")))
            self.say(f"DeTransformer Edge demo: broker {broker.kind} on {broker.host}:{broker.port}, cluster '{self.cluster}'")
            configs = write_configs(workdir, broker, self.cluster, opts.devices, self.devices)
            for dev_id, name, profile in self.devices[: opts.devices]:
                self.say(f"  starting agent {dev_id:16s} {name} (profile {profile})")
            if opts.home == "speakers":
                self.say("  each speaker may use 400 MB: none can hold SmolLM2-135M (538 MB of weights), so the "
                         "leader's placement splits it across them")
            stack.callback(self.stop_agents)
            self.start_agents(configs, workdir)
            async with HomeClient(broker.host, broker.port, cluster=self.cluster,
                                  client_id=f"demo-{uuid.uuid4().hex[:8]}") as home:
                self.watch_cluster(home)
                leader = await self.wait_for_cluster([d.id for d in configs], workdir)
                lead = next(d for d in configs if d.id == leader)
                self.say(f"cluster ready in {time.monotonic() - t_start:.1f} s: leader {leader}; "
                         f"dashboard http://127.0.0.1:{lead.dashboard_port}/")
                for dev in configs:  # any device answers Home Assistant (followers ask the leader)
                    self.say(f"  {dev.id:16s} wyoming tcp://127.0.0.1:{dev.wyoming_port}")
                await self.voice_queries(home)
                await self.wyoming_query(lead)
                await self.embedding(home)
                await self.generation(home)
                self.say(f"\ndemo finished in {time.monotonic() - t_start:.1f} s; agent logs were in {workdir}")
                self.say(f"dashboard: http://127.0.0.1:{lead.dashboard_port}/")
                self.say(f"wyoming tcp://127.0.0.1:{lead.wyoming_port}  (Home Assistant: Wyoming Protocol "
                         f"integration, host 127.0.0.1, port {lead.wyoming_port})")
                wait = opts.wait if opts.wait is not None else sys.stdin.isatty()
                if wait:
                    self.say(f"ask it yourself: detransformer-edge ask --broker {broker.host}:{broker.port} "
                             f"--cluster {self.cluster} \"turn off the kitchen light\"")
                    self.say("agents keep running; press Ctrl-C to stop")
                    await asyncio.Event().wait()
        return 0

    async def voice_queries(self, home: HomeClient) -> None:
        self.say("\nvoice assistant -> hermes/nlu/query")
        for text in QUERIES:
            t0 = time.perf_counter()
            qid = uuid.uuid4().hex
            home.listen_for_speech(qid)
            reply = await home.hermes_query(text, site_id="kitchen", timeout=120, query_id=qid)
            ms = (time.perf_counter() - t0) * 1e3
            body = reply.payload
            if reply.recognized:
                slots = ", ".join(f"{s['slotName']}={s['value']['value']!r}" for s in body.get("slots", []))
                answer = f"{reply.intent} ({body['intent']['confidenceScore']:.2f}){' ' + slots if slots else ''}"
            elif reply.topic == "hermes/nlu/intentNotRecognized":
                answer = "not recognised"
            else:
                answer = f"error: {body.get('error')}"
            rec = await self.logged(str(body.get("id") or ""))
            plan, leader_ms = (rec.plan, rec.latency_ms) if rec is not None else ("?", "?")
            note = f" ({rec.error})" if rec is not None and rec.error else ""
            self.say(f"  {text!r}\n      -> {answer}{note}\n      plan {plan}, "
                     f"{ms:.0f} ms end to end (leader {leader_ms} ms)")
            if reply.topic != "hermes/nlu/intentNotRecognized" or not asks_a_question(text):
                home.forget_speech(qid)
            else:  # with answer_questions the language model answers a question
                said = await home.speech(qid, timeout=ANSWER_WAIT_S)
                if said is not None:
                    spoken = await self.logged(f"{qid}-answer")
                    how = f"plan {spoken.plan}, " if spoken is not None else ""
                    self.say(f"      -> hermes/tts/say {said!r}\n      {how}"
                             f"{(time.perf_counter() - t0):.1f} s from the question")

    async def wyoming_query(self, dev: DemoDevice) -> None:
        from wyoming.asr import Transcript
        from wyoming.client import AsyncTcpClient
        from wyoming.intent import Intent

        text = QUERIES[0]
        self.say(f"\nHome Assistant Assist -> wyoming tcp://127.0.0.1:{dev.wyoming_port} (transcript)")
        t0 = time.perf_counter()
        async with asyncio.timeout(120), AsyncTcpClient("127.0.0.1", dev.wyoming_port) as client:
            await client.write_event(Transcript(text, language="en").event())
            event = await client.read_event()
        ms = (time.perf_counter() - t0) * 1e3
        if event is not None and Intent.is_type(event.type):
            intent = Intent.from_event(event)
            slots = ", ".join(f"{e.name}={e.value!r}" for e in intent.entities)
            self.say(f"  {text!r}\n      -> {intent.name} {slots} ({intent.text!r}), {ms:.0f} ms end to end")
        else:
            self.say(f"  {text!r}\n      -> {event.type if event else 'no answer'}, {ms:.0f} ms end to end")

    async def embedding(self, home: HomeClient) -> None:
        self.say(f"\nembedding -> {self.prefix}/request: a {len(DOCUMENT.split())}-word note")
        t0 = time.perf_counter()
        reply = await home.request("embed", DOCUMENT, timeout=120)
        ms = (time.perf_counter() - t0) * 1e3
        if reply.error is not None:
            self.say(f"  error: {reply.error.code}: {reply.error.message}")
            return
        r = reply.result or {}
        self.say(f"  {r['dim']}-dim vector; plan {r['plan']}, {ms:.0f} ms end to end (leader {r['latency_ms']} ms)")

    async def generation(self, home: HomeClient) -> None:
        self.say(f"\ngeneration -> {self.prefix}/request: {PROMPT!r}\n  ", )

        def show(piece: str) -> None:
            self.out.write(piece)
            self.out.flush()

        t0 = time.perf_counter()
        reply = await home.request("generate", PROMPT, {"max_new_tokens": self.opts.max_new_tokens}, timeout=300,
                                   on_token=show)
        ms = (time.perf_counter() - t0) * 1e3
        if reply.error is not None:
            self.say(f"\n  error: {reply.error.code}: {reply.error.message}")
            return
        r = reply.result or {}
        self.say(f"\n  plan {r['plan']}; {r['tokens']} tokens, {r['tokens_per_s']} tokens/s, "
                 f"first token {r['ttft_ms']:.0f} ms, {ms:.0f} ms end to end")


def run_demo(opts: DemoOptions) -> int:
    try:
        return asyncio.run(Demo(opts).run())
    except KeyboardInterrupt:
        print("\nstopped", file=opts.out)
        return 0
