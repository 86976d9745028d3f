"""Benchmark: how long the runtime planner takes to choose a plan, and how long static planning
takes, for clusters of 2-8 devices. Also prints the DESIGN.md anchor table as the cost model
predicts it.

    .venv/bin/python bench/planner.py            # 2, 4, 6, 8 devices
    .venv/bin/python bench/planner.py --quick    # 4 and 8 devices only

Decision times are per request on a warm planner (built once per placement, as the leader
does) for request shapes it has not seen before, so no per-shape cache helps; the "cold"
column includes building the planner. "mean CPU" is process time per decision, which a busy
shared machine inflates less than wall time. Single-threaded pure Python; markdown on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import Plan
from detransformer_edge.planner.cost import CostModel, Request
from detransformer_edge.planner.profile import DeviceProfile, bundled_profiles_dir, load_profile
from detransformer_edge.planner.runtime import RuntimePlanner
from detransformer_edge.planner.static import plan_static

LINKS = (20.0, 100.0, 300.0, 940.0)


def cluster(n: int) -> list[DeviceProfile]:
    """n heterogeneous devices: compute 20-90 GFLOPS, links from 20 Mbit WiFi to Ethernet."""
    return [
        DeviceProfile(f"d{i}", gflops=20.0 + 10.0 * i, mem_bw_gbs=5.0 + i, ram_mb=4000,
                      link_mbit=LINKS[i % len(LINKS)], rtt_ms=0.5 + (i % 3))
        for i in range(n)
    ]


def decision_times(n: int, cfg: object, mode: str) -> tuple[float, float, float, float, str]:
    profiles = cluster(n)
    static = plan_static(profiles, cfg)
    t0 = time.perf_counter()
    planner = RuntimePlanner(static.placement, profiles, cfg)
    planner.choose(Request(mode, 7))  # type: ignore[arg-type]
    cold = time.perf_counter() - t0
    times = []
    plan = ""
    cpu0 = time.process_time()
    for seq in range(16, 16 + 40 * 13, 13):  # 40 unseen shapes
        t = time.perf_counter()
        bd = planner.choose(Request(mode, seq))  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
        plan = bd.plan.describe()
    cpu = (time.process_time() - cpu0) / len(times)
    return statistics.median(times), max(times), cpu, cold, plan


def anchors() -> None:
    base = load_profile(bundled_profiles_dir() / "testbed-0.45cpu.toml")
    request = Request("encode", 128)
    names = tuple(f"d{i}" for i in range(4))
    print("\n## DESIGN.md anchors as predicted (4 devices at 0.45 CPU, BERT-base, seq 128, fp32 wire)\n")
    print("| link | single | TP x4 | block (nd=nb=4, all-gather) | measured (gloo/TCP): single / TP / BP |")
    print("| --- | --- | --- | --- | --- |")
    measured = {20.0: "0.46 / 5.8 / 0.61", 100.0: "0.46 / 1.26 / 0.31", 1000.0: "0.46 / 0.25 / 0.26"}
    for mbit in (20.0, 100.0, 1000.0):
        profiles = [replace(base, name=n, link_mbit=mbit, rtt_ms=0.0) for n in names]
        std = CostModel(get_config("bert-base"), profiles)
        bp = CostModel(get_config("bert-base", nd=4, nb=4), profiles)
        single = std.predict(Plan("single", ("d0",)), request).total_s
        tp = std.predict(Plan("tp", names), request).total_s
        block = bp.predict(Plan("block", names, sub_block_owner=names), request).total_s
        print(f"| {mbit:.0f} Mbit | {single:.3f} s | {tp:.3f} s | {block:.3f} s | {measured[mbit]} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = (4, 8) if args.quick else (2, 4, 6, 8)
    models = [
        ("bert-base nd=8 nb=4", get_config("bert-base", nd=8, nb=4), "encode"),
        ("bert-base nd=4 nb=4", get_config("bert-base", nd=4, nb=4), "encode"),
        ("bert-base standard", get_config("bert-base"), "encode"),
        ("smollm2-135m nd=8 nb=3", get_config("smollm2-135m", nd=8, nb=3), "prefill"),
        ("smollm2-135m nd=8 nb=3", get_config("smollm2-135m", nd=8, nb=3), "decode"),
    ]
    print("## Runtime planner decision time (per request, warm planner, unseen shapes)\n")
    print("| devices | model | mode | median wall | max wall | mean CPU | cold (build + first) | static planning | last plan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for label, cfg, mode in models:
            t = time.perf_counter()
            plan_static(cluster(n), cfg)
            static_s = time.perf_counter() - t
            med, worst, cpu, cold, plan = decision_times(n, cfg, mode)
            print(f"| {n} | {label} | {mode} | {med * 1e3:.2f} ms | {worst * 1e3:.2f} ms | {cpu * 1e3:.2f} ms | {cold * 1e3:.1f} ms | "
                  f"{static_s:.2f} s | {plan} |")
    anchors()


if __name__ == "__main__":
    main()
