#!/usr/bin/env python3
"""Regenerate docs/dashboard.png: a demo-like home (four agents with tiny random models on a
private Mosquitto), a few voice queries, embeddings and generations so the request log and the
latency chart have data, then a headless Chromium screenshot of the leader's dashboard.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--serve]
    .venv/bin/python scripts/dashboard_screenshot.py --timeline     # docs/dashboard-timeline.png

``--timeline`` replicates every model on every device (so a fixed block-parallel plan can run
on all four), ends the traffic with one traced request on that plan and shoots the page with
its timeline open (``?request=<id>``). ``--serve`` keeps the home running and prints the
dashboard URL instead of exiting (Ctrl-C).
Needs the mosquitto binary and /usr/bin/chromium (scripts/setup.sh test installs both).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402
import torch  # noqa: E402

from detransformer_edge.cluster.config import AgentConfig, BrokerConfig, ElectionConfig  # noqa: E402
from detransformer_edge.integrations import plugins_for  # noqa: E402
from detransformer_edge.integrations.dashboard import Dashboard, model_layouts  # noqa: E402
from detransformer_edge.planner.profile import load_profile  # noqa: E402
from detransformer_edge.service.agent import HomeAgent  # noqa: E402
from detransformer_edge.service.catalog import tiny_catalog  # noqa: E402

HOME = [  # device id, capability profile
    ("living-room-minipc", "intel-n100-minipc"),
    ("office-laptop", "laptop-i5-8250u"),
    ("kitchen-pi5", "raspberry-pi-5"),
    ("hall-speaker", "smart-speaker-a53"),
]
QUERIES = ["turn on the kitchen light", "what's the temperature in the bedroom", "lock the front door",
           "set a timer for ten minutes", "dim the living room lights to 30 percent", "play some jazz",
           "is the garage door open", "turn off all the lights"]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not start on port {port}")


def config(dev: str, port: int) -> AgentConfig:
    return AgentConfig(
        id=dev, cluster="home", name=dev.replace("-", " "),
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{port}", keepalive_s=2, protocol="3.1.1"),
        discovery=False, homeassistant=False, status_interval_s=1.0, dashboard_port=0,
        election=ElectionConfig(lease_s=3.0, settle_s=0.3),
    )


async def traffic(port: int, traced: bool = False) -> None:
    """Voice queries, embeddings and generations, one after the other, plus one bad request;
    ``traced``: then one traced embedding on every device (request id "traced")."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        reply_to = "detransformer/home/replies/screenshot"
        await client.subscribe("hermes/intent/#")
        await client.subscribe("hermes/nlu/intentNotRecognized")
        await client.subscribe(reply_to)

        async def one(topic: str, payload: dict) -> None:
            await client.publish(topic, json.dumps(payload), qos=1)
            async with asyncio.timeout(30):
                async for msg in client.messages:
                    body = json.loads(msg.payload)
                    if not msg.topic.value.startswith("detransformer/") or "result" in body or "error" in body:
                        return

        for k in range(18):
            q = QUERIES[k % len(QUERIES)]
            if k == 9:  # too long for the encoder: an error row
                await one("detransformer/home/request", {"id": "bad", "reply_to": reply_to, "op": "embed",
                                                         "input": "turn on the light and " * 60})
            elif k % 4 == 3:
                await one("detransformer/home/request", {"id": f"e{k}", "reply_to": reply_to, "op": "embed", "input": q})
            elif k % 6 == 5:
                await one("detransformer/home/request", {"id": f"g{k}", "reply_to": reply_to, "op": "generate",
                                                         "input": "Say hello to the", "params": {"max_new_tokens": 8, "chat": False}})
            else:
                await one("hermes/nlu/query", {"input": q, "id": f"q{k}", "siteId": "kitchen"})
        if traced:
            await one("detransformer/home/request", {"id": "traced", "reply_to": reply_to, "op": "embed",
                                                     "input": "turn on the kitchen light", "params": {
                                                         "model": "tiny-encoder-bp", "plan": "bp-fixed", "trace": True}})


def screenshot(url: str, out: Path, height: int = 900, dark: bool = False, query: str = "") -> None:
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found (scripts/setup.sh test installs chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--force-prefers-reduced-motion", f"--window-size=1280,{height}",
               *(["--force-dark-mode"] if dark else []), "--virtual-time-budget=5000", f"--screenshot={out}", url + "?poll=1" + query]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default docs/dashboard.png (with --timeline "
                    "docs/dashboard-timeline.png)")
    ap.add_argument("--timeline", action="store_true", help="a traced request's timeline, open")
    ap.add_argument("--height", type=int, default=None,
                    help="window height in pixels (width 1280; default 900, with --timeline 1800: the whole page)")
    ap.add_argument("--dark", action="store_true", help="the dark colour scheme")
    ap.add_argument("--serve", action="store_true", help="keep serving the dashboard until Ctrl-C")
    args = ap.parse_args()
    args.out = args.out or ROOT / "docs" / ("dashboard-timeline.png" if args.timeline else "dashboard.png")
    args.height = args.height or (1800 if args.timeline else 900)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            async with contextlib.AsyncExitStack() as stack:
                agents = []
                for dev, prof in HOME:
                    agent = HomeAgent(config(dev, port), load_profile(ROOT / "firmware_profiles" / f"{prof}.toml"),
                                      tiny_catalog(), plugins=plugins_for(config(dev, port)), broker=("127.0.0.1", port), intent_threshold=0.0, replan_delay_s=0.3,
                                      replicate_all=args.timeline)
                    agents.append(await stack.enter_async_context(agent))
                async with asyncio.timeout(60):
                    while not any(a.cluster.is_leader and a.placements.state.placement_ready() for a in agents):
                        await asyncio.sleep(0.1)
                leader = next(a for a in agents if a.cluster.is_leader)
                dash = await stack.enter_async_context(
                    Dashboard(leader.snapshot, port=0, layouts=model_layouts(leader.catalog)))
                leader.add_listener(dash.notify)
                await traffic(port, traced=args.timeline)
                query = ""
                if args.timeline:
                    rec = next(r for r in leader.tasks.log if r.client_id == "traced")
                    if rec.error:
                        raise SystemExit(f"the traced request failed: {rec.error}")
                    query = f"&request={rec.id}"
                await asyncio.sleep(1.5)  # one more status round, so every card shows its latest numbers
                if args.serve:
                    print(f"dashboard: {dash.url}{query.replace('&', '?', 1)} (Ctrl-C to stop)", flush=True)
                    await asyncio.Event().wait()
                args.out.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(screenshot, dash.url, args.out, args.height, args.dark, query)
                print(f"wrote {args.out}")
        finally:
            broker.terminate()
            broker.wait(timeout=5)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main()))
