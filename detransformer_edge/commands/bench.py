"""`detransformer-edge bench`: the real agents and Mosquitto in an emulated home (needs root),
timed end to end per plan; writes JSON, a markdown table and PNG plots under --out."""

from __future__ import annotations

import argparse

HELP = "benchmark plans (single/pipeline/tp/bp-fixed/adaptive) in an emulated home (root)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="encoder seq 128, 100 Mbit, 4 homogeneous devices, single/tp/bp-fixed/adaptive, 5 runs")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--out", default="bench/results", help="where JSON, markdown and PNGs go (default %(default)s)")
    p.add_argument("--name", default=None, help="file stem under --out (default: quick for --quick, else results)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite --out/<name>.json instead of merging this run's results into it")
    p.add_argument("--runs", type=int, default=None, help="timed runs per plan after warm-up (default 10; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per plan first (default 2; quick 1)")
    p.add_argument("--bandwidths", default="20,50,100,300,1000", help="device link rates, Mbit/s")
    p.add_argument("--devices", default="2,3,4", help="device counts")
    p.add_argument("--homes", default="homo,hetero", help="homo (0.4 CPU each) and/or hetero (0.8/0.4/0.2/0.2)")
    p.add_argument("--workloads", default="enc16,enc64,enc128,dec",
                   help="enc16, enc64, enc128, dec; N_b = 2 sliced variants: enc16-bp2, enc64-bp2, enc128-bp2, "
                        "mini128-bp2 (MiniLM); enc128-bp-slice (N_b = 4 sliced)")
    p.add_argument("--plans", default="single,pipeline,tp,bp-fixed,adaptive", help="plans to time")
    p.add_argument("--broker-mbit", type=int, default=None,
                   help="shape the broker's link too (default: unshaped, a wired hub)")
    p.add_argument("--gflops", type=float, default=None,
                   help="one host core's GFLOPS at BERT-base shapes for the device profiles "
                        "(default: calibrated in every home, inside a device's namespace and quota)")
    p.add_argument("--cfs-period-ms", type=float, default=None,
                   help="experiment: CPU quota period in ms, same shares (testbed default 100); results are "
                        "kept apart from the default ones")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds one request may take (default %(default)s)")
    p.add_argument("--keep-logs", default=None, help="keep agent/broker logs and configs under this folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--trace", action="store_true",
                   help="trace the timed runs and print where the time goes per plan (compute, wire, codec, residual)")


def config_from_args(args: argparse.Namespace):  # -> BenchConfig
    from dataclasses import replace

    from detransformer_edge.bench.spec import (
        HOMES,
        PLANS,
        WORKLOADS,
        BenchConfig,
        parse_int_list,
        parse_name_list,
    )

    if args.quick:
        cfg = BenchConfig.quick()
    else:
        cfg = BenchConfig(
            bandwidths=parse_int_list(args.bandwidths, "bandwidths"), devices=parse_int_list(args.devices, "devices"),
            homes=parse_name_list(args.homes, "homes", HOMES),
            workloads=parse_name_list(args.workloads, "workloads", tuple(WORKLOADS)),
            plans=parse_name_list(args.plans, "plans", PLANS),
        )
    changes = {"broker_mbit": args.broker_mbit, "request_timeout_s": args.timeout,
               "cfs_period_ms": args.cfs_period_ms, "trace": args.trace}
    if args.runs is not None:
        changes["runs"] = args.runs
    if args.warmup is not None:
        changes["warmup"] = args.warmup
    return replace(cfg, **changes)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from detransformer_edge.bench.results import (
        aggregate,
        load_report,
        markdown_table,
        merge,
        report,
        sort_results,
        where_table,
    )
    from detransformer_edge.bench.runner import HostRates, run_bench, stderr_progress
    from detransformer_edge.bench.spec import broker_link

    cfg = config_from_args(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quick" if args.quick else "results")
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    link = broker_link(cfg.broker_mbit)
    # device profiles: one core's rate x quota; measured in each home unless --gflops fixes it
    rates = HostRates(args.gflops, args.gflops, 8.0) if args.gflops is not None else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    meta = {
        "command": "detransformer-edge bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit, "host_cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg()),
        "host_core_rates": rates.to_dict() if rates else "calibrated per home (bench.calibrate)",
        "device_profile_rule": "gflops = attn_gflops = a BERT-base seq-128 forward timed in the first device's "
                               "namespace and quota, scaled by quota; link_mbit = the shaped rate; "
                               "see device_gflops per result",
        "runs": cfg.runs, "warmup": cfg.warmup,
    }
    previous = []
    if json_path.exists() and not args.fresh and not args.quick:
        previous, _, old_meta = load_report(json.loads(json_path.read_text()))
        # every command whose results the merged file holds, oldest first
        meta["commands"] = [*old_meta.get("commands", [old_meta.get("command", "")]), meta["command"]]

    def save(samples) -> list:
        results = merge(previous, aggregate(samples)) if previous else sort_results(aggregate(samples))
        meta["load_avg_end"] = list(os.getloadavg())
        data = report(results, link, meta)
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        md_path.write_text(f"# Benchmark results\n\nCommand: `{meta['command']}` (commit {commit}, "
                           f"{meta['started_utc']})\n\n" + markdown_table(results, link))
        return results

    samples = run_bench(cfg, stderr_progress, rates=rates, keep_logs=Path(args.keep_logs) if args.keep_logs else None,
                           on_scenario=save)
    results = save(samples)
    if not args.no_plots:
        try:
            from detransformer_edge.bench.plots import write_plots

            for path in write_plots(results, out_dir, link):
                stderr_progress(f"wrote {path}")
        except Exception as exc:  # plots are a convenience; the numbers are saved already
            stderr_progress(f"plots skipped: {exc}")
    stderr_progress(f"wrote {json_path} and {md_path}")
    where = where_table(samples)
    if where:
        (out_dir / f"{name}-where.md").write_text(f"# Where the time goes\n\nCommand: `{meta['command']}` "
                                                  f"(commit {commit}, {meta['started_utc']})\n\n{where}")
    if args.json:
        data = report(sort_results(aggregate(samples)), link, meta)
        if where:
            data["where"] = [{"workload": s.workload, "plan": s.plan, "bandwidth_mbit": s.bandwidth_mbit,
                              "runs": s.where} for s in samples if s.where]
        print(json.dumps(data))
    else:
        print(markdown_table(sort_results(aggregate(samples)), link))
        if where:
            print(where)
    return 0
