"""The multi-device demo: a broker, four agent processes with the profiles of real home devices,
then voice queries over the Hermes topics and one generation request, each with its plan and
latency. Everything runs on this machine; the agents talk only through the broker.

    detransformer-edge demo            # Ctrl-C to stop
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiomqtt

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.transport.broker import LocalBroker, free_port, local_broker

PROFILES_DIR = Path(__file__).resolve().parents[2] / "firmware_profiles"

# id, name, profile: a home's mix of devices (the planner sees their real capabilities)
DEVICES: tuple[tuple[str, str, str], ...] = (
    ("kitchen-pi5", "Kitchen Raspberry Pi 5", "raspberry-pi-5"),
    ("living-pi5", "Living-room Raspberry Pi 5", "raspberry-pi-5"),
    ("hall-pi4", "Hall Raspberry Pi 4", "raspberry-pi-4b"),
    ("bedroom-speaker", "Bedroom smart speaker", "smart-speaker-a53"),
)

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
    log: list[dict[str, Any]] = field(default_factory=list)

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


def write_configs(workdir: Path, broker: LocalBroker, cluster: str, n: int) -> list[tuple[str, Path, int]]:
    out = []
    for dev_id, name, profile in DEVICES[:n]:
        port = free_port()
        path = workdir / f"{dev_id}.toml"
        path.write_text(
            f'id = "{dev_id}"\nname = "{name}"\ncluster = "{cluster}"\n'
            f'profile = "{(PROFILES_DIR / (profile + ".toml")).as_posix()}"\n'
            f"dashboard_port = {port}\ndiscovery = true\nhomeassistant = true\nstatus_interval_s = 2.0\n"
            f'\n[broker]\nurl = "{broker.url}"\nprotocol = "auto"\nkeepalive_s = 10\n'
            f"\n[election]\nlease_s = 6.0\n"
        )
        out.append((dev_id, path, port))
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
        self._pending: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}
        self._stream: dict[str, list[str]] = {}

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def status_line(self, text: str) -> None:
        if self.out.isatty():
            self.out.write("\r" + text + "\x1b[K")
            self.out.flush()

    # --- processes ---------------------------------------------------------------------------------

    def start_agents(self, configs: list[tuple[str, Path, int]], workdir: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DETRANSFORMER_THREADS": "1"}
        for dev_id, path, _ in configs:
            log = (workdir / f"{dev_id}.log").open("wb")
            argv = [sys.executable, "-m", "detransformer_edge.cli", "agent", "--config", str(path),
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
        for (dev_id, _, _), p in zip(DEVICES, self.procs):
            if p.poll() is not None:
                tail = (workdir / f"{dev_id}.log").read_text(errors="replace")[-1500:]
                raise DemoError(f"agent {dev_id} exited with code {p.returncode}:\n{tail}")

    # --- MQTT -------------------------------------------------------------------------------------

    async def listen(self, client: aiomqtt.Client) -> None:
        p = self.prefix
        for topic, qos in ((f"{p}/devices/+/presence", 1), (f"{p}/devices/+/status", 0), (f"{p}/leader", 1),
                           (f"{p}/log", 0), ("hermes/intent/#", 1), ("hermes/nlu/intentNotRecognized", 1),
                           ("hermes/error/nlu", 1), (f"{p}/replies/demo", 1)):
            await client.subscribe(topic, qos=qos)
        async for msg in client.messages:
            topic = msg.topic.value
            try:
                payload = msg.payload.decode() if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload or "")
                t = self.topics
                if (dev := t.presence.match(topic)) is not None:
                    self.watch.presence[dev] = bool(payload) and t.presence.decode(payload).online
                elif (dev := t.status.match(topic)) is not None:
                    self.watch.status[dev] = t.status.decode(payload).to_dict()
                elif t.leader.match(topic) is not None:
                    self.watch.leader = t.leader.decode(payload).to_dict() if payload else None
                elif topic == f"{p}/log":
                    self.watch.log.append(json.loads(payload))
                else:
                    body = json.loads(payload)
                    if body.get("event") == "token":
                        self._stream.setdefault(body["id"], []).append(body["text"])
                        self.out.write(body["text"])
                        self.out.flush()
                        continue
                    # Hermes errors (hermes/error/nlu) carry only the session id
                    key = body.get("id") or body.get("sessionId")
                    fut = self._pending.pop(key, None)
                    if fut is not None and not fut.done():
                        fut.set_result((topic, body))
            except (ValueError, KeyError, TypeError, DetransformerError):
                continue

    async def request(self, client: aiomqtt.Client, topic: str, body: dict[str, Any], timeout: float = 120.0,
                      key: str | None = None) -> tuple[str, dict[str, Any], float]:
        fut: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending[body["id"]] = fut
        if key is not None:
            self._pending[key] = fut
        t0 = time.perf_counter()
        await client.publish(topic, json.dumps(body), qos=1)
        topic_out, reply = await asyncio.wait_for(fut, timeout)
        return topic_out, reply, (time.perf_counter() - t0) * 1e3

    def plan_of(self, client_id: str) -> dict[str, Any] | None:
        for rec in reversed(self.watch.log):
            if rec.get("client_id") == client_id:
                return rec
        return None

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
            configs = write_configs(workdir, broker, self.cluster, opts.devices)
            for dev_id, name, profile in DEVICES[: opts.devices]:
                self.say(f"  starting agent {dev_id:16s} {name} (profile {profile})")
            stack.callback(self.stop_agents)
            self.start_agents(configs, workdir)
            async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V311,
                                      identifier=f"demo-{uuid.uuid4().hex[:8]}",
                                      socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]) as client:
                listener = asyncio.create_task(self.listen(client))
                try:
                    devices = [d for d, _, _ in configs]
                    leader = await self.wait_for_cluster(devices, workdir)
                    port = next(port for d, _, port in configs if d == leader)
                    self.say(f"cluster ready in {time.monotonic() - t_start:.1f} s: leader {leader}; "
                             f"dashboard http://127.0.0.1:{port}/")
                    await self.voice_queries(client)
                    await self.embedding(client)
                    await self.generation(client)
                    self.say(f"\ndemo finished in {time.monotonic() - t_start:.1f} s; agent logs were in {workdir}")
                    self.say(f"dashboard: http://127.0.0.1:{port}/")
                    wait = opts.wait if opts.wait is not None else sys.stdin.isatty()
                    if wait:
                        self.say("agents keep running; press Ctrl-C to stop")
                        await asyncio.Event().wait()
                finally:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await listener
        return 0

    async def voice_queries(self, client: aiomqtt.Client) -> None:
        self.say("\nvoice assistant -> hermes/nlu/query")
        for k, text in enumerate(QUERIES):
            qid = f"demo-q{k}"
            body = {"input": text, "siteId": "kitchen", "id": qid, "sessionId": f"demo-s{k}"}
            topic, reply, ms = await self.request(client, "hermes/nlu/query", body, key=body["sessionId"])
            if topic.startswith("hermes/intent/"):
                slots = ", ".join(f"{s['slotName']}={s['value']['value']!r}" for s in reply.get("slots", []))
                answer = f"{reply['intent']['intentName']} ({reply['intent']['confidenceScore']:.2f}){' ' + slots if slots else ''}"
            elif topic.endswith("intentNotRecognized"):
                answer = "not recognised"
            else:
                answer = f"error: {reply.get('error')}"
            await asyncio.sleep(0.05)  # the leader's log line follows its reply
            rec = self.plan_of(qid) or {}
            self.say(f"  {text!r}\n      -> {answer}\n      plan {rec.get('plan', '?')}, "
                     f"{ms:.0f} ms end to end (leader {rec.get('latency_ms', '?')} ms)")

    async def embedding(self, client: aiomqtt.Client) -> None:
        self.say(f"\nembedding -> {self.prefix}/request: a {len(DOCUMENT.split())}-word note")
        body = {"id": "demo-e1", "reply_to": f"{self.prefix}/replies/demo", "op": "embed", "input": DOCUMENT}
        _, reply, ms = await self.request(client, f"{self.prefix}/request", body)
        if "error" in reply:
            self.say(f"  error: {reply['error']}")
            return
        r = reply["result"]
        self.say(f"  {r['dim']}-dim vector; plan {r['plan']}, {ms:.0f} ms end to end (leader {r['latency_ms']} ms)")

    async def generation(self, client: aiomqtt.Client) -> None:
        self.say(f"\ngeneration -> {self.prefix}/request: {PROMPT!r}\n  ", )
        body = {"id": "demo-g1", "reply_to": f"{self.prefix}/replies/demo", "op": "generate", "input": PROMPT,
                "params": {"max_new_tokens": self.opts.max_new_tokens}}
        _, reply, ms = await self.request(client, f"{self.prefix}/request", body, timeout=300)
        if "error" in reply:
            self.say(f"\n  error: {reply['error']}")
            return
        r = reply["result"]
        self.say(f"\n  plan {r['plan']}; {r['tokens']} tokens, {r['tokens_per_s']} tokens/s, "
                 f"first token {r['ttft_ms']:.0f} ms, {ms:.0f} ms end to end")


def run_demo(opts: DemoOptions) -> int:
    try:
        return asyncio.run(Demo(opts).run())
    except KeyboardInterrupt:
        print("\nstopped", file=opts.out)
        return 0
