"""Soak: agent processes on a local Mosquitto under a steady stream of queries for N minutes,
sampling every agent's resident memory (VmRSS) every 10 s. Memory must stay flat.

    python bench/soak.py                         # 10 minutes, 3 agents, tiny catalog
    python bench/soak.py --minutes 2 --agents 4 --catalog pretrained

The stream mixes Hermes NLU queries (intent model, the leader's plan), embeddings on a fixed
pipeline over every device (activations cross the broker on every request) and short
generations. Prints the RSS table and each agent's slope (least squares, MB per hour, over the
samples after the first minute of warm-up) and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detransformer_edge.cli import interrupt_on_terminate  # noqa: E402
from detransformer_edge.service.fleet import AgentFleet, HomeWatcher, rss_kb  # noqa: E402
from detransformer_edge.transport.broker import run_mosquitto  # noqa: E402

QUERIES = ("turn on the kitchen light", "set a timer for ten minutes", "what's the weather like",
           "lock the front door", "add oat milk to the shopping list")


def slope_mb_per_h(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, kB) points, in MB per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    k = sum((t - mx) * (v - my) for t, v in points) / var  # kB per s
    return round(k * 3600 / 1024, 2)


async def traffic(watch: HomeWatcher, stop: asyncio.Event, counts: dict[str, int], clients: int, pause_s: float,
                  catalog: str) -> None:
    async def caller(k: int) -> None:
        i = 0
        while not stop.is_set():
            kind = ("hermes", "embed", "hermes", "generate")[i % 4]
            text = QUERIES[(i + k) % len(QUERIES)]
            if kind == "hermes":
                ans = await watch.hermes(text, timeout=60)
            elif kind == "embed":
                params = {"plan": "pipeline", "model": "tiny-encoder"} if catalog == "tiny" else {}
                ans = await watch.request("embed", text, params, timeout=60)
            else:
                ans = await watch.request("generate", text, {"max_new_tokens": 8, "chat": False}, timeout=60)
            counts["sent"] += 1
            if ans is None:
                counts["lost"] += 1
            elif ans.ok:
                counts["ok"] += 1
            else:
                counts["error"] += 1
            # keep the client's own bookkeeping flat too: a soak of hours must not grow here
            watch.answers.pop(ans.id if ans else "", None)
            watch.sent.pop(ans.id if ans else "", None)
            i += 1
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(caller(k) for k in range(clients)))


async def soak(args: argparse.Namespace, workdir: Path) -> dict:
    with run_mosquitto(workdir=workdir) as broker:
        fleet = AgentFleet(workdir, (broker.host, broker.port), n=args.agents, catalog=args.catalog,
                           keepalive_s=5, lease_s=6.0, status_interval_s=2.0, replicate_all=args.catalog == "tiny")
        with fleet:
            async with HomeWatcher(broker.host, broker.port, fleet.cluster) as watch:
                leader, version = await fleet.wait_ready(watch)  # as long as the agents progress
                print(f"soak: {args.agents} agents ({args.catalog}), leader {leader}, placement v{version}; "
                      f"{args.minutes} min, sampling every {args.interval_s:.0f} s", flush=True)
                stop = asyncio.Event()
                counts = {"sent": 0, "ok": 0, "error": 0, "lost": 0}
                load = asyncio.create_task(traffic(watch, stop, counts, args.clients, args.pause_s, args.catalog))
                t0 = time.monotonic()
                samples: list[dict] = []
                end = t0 + args.minutes * 60
                while True:
                    now = time.monotonic()
                    row = {"t_s": round(now - t0, 1), "requests": counts["sent"],
                           **{d: rss_kb(fleet.pid(d)) for d in fleet.ids}}
                    samples.append(row)
                    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                    fleet.check_alive()
                    if now >= end:
                        break
                    await asyncio.sleep(min(args.interval_s, max(0.0, end - time.monotonic())))
                stop.set()
                await load
    warm = [s for s in samples if s["t_s"] >= min(60.0, args.minutes * 60 / 3)]
    slopes = {d: slope_mb_per_h([(s["t_s"], s[d]) for s in warm if s[d] is not None]) for d in fleet.ids}
    half = samples[len(samples) // 2:]  # bounded caches (cancelled-request memory...) fill up early on
    slopes_late = {d: slope_mb_per_h([(s["t_s"], s[d]) for s in half if s[d] is not None]) for d in fleet.ids}
    growth = {d: round(((samples[-1][d] or 0) - (warm[0][d] or 0)) / 1024, 1) for d in fleet.ids} if warm else {}
    return {"agents": args.agents, "catalog": args.catalog, "minutes": args.minutes, "clients": args.clients,
            "leader": leader, "counts": counts, "samples_kb": samples, "slope_mb_per_h": slopes,
            "slope_second_half_mb_per_h": slopes_late,
            "growth_after_warmup_mb": growth,
            "command": f"python bench/soak.py --minutes {args.minutes} --agents {args.agents} --catalog {args.catalog}"}


def table(res: dict) -> str:
    devs = [k for k in res["samples_kb"][0] if k.startswith("dev")]
    lines = ["| t (s) | requests | " + " | ".join(f"{d} RSS (MB)" for d in devs) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in devs) + " |"]
    for s in res["samples_kb"]:
        lines.append(f"| {s['t_s']:.0f} | {s['requests']} | " +
                     " | ".join("-" if s[d] is None else f"{s[d] / 1024:.1f}" for d in devs) + " |")
    lines.append("| slope (MB/h, after warm-up) | | " + " | ".join(str(res["slope_mb_per_h"][d]) for d in devs) + " |")
    lines.append("| slope (MB/h, second half) | | " + " | ".join(str(res["slope_second_half_mb_per_h"][d]) for d in devs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--agents", type=int, default=3, choices=(3, 4))
    p.add_argument("--catalog", default="tiny", choices=("tiny", "pretrained"))
    p.add_argument("--clients", type=int, default=4, help="concurrent callers")
    p.add_argument("--pause-s", type=float, default=0.05, help="pause of each caller between requests")
    p.add_argument("--interval-s", type=float, default=10.0, help="RSS sampling interval")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = p.parse_args(argv)
    interrupt_on_terminate()  # SIGTERM stops the fleet like Ctrl-C: agents and broker go with it
    with tempfile.TemporaryDirectory(prefix="dte-soak-") as wd:
        res = asyncio.run(soak(args, Path(wd)))
    print(table(res))
    print(f"requests: {res['counts']}; slope MB/h: {res['slope_mb_per_h']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0 if res["counts"]["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
