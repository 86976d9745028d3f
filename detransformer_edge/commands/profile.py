"""`detransformer-edge profile`: measure this device and write its capability profile (TOML)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "measure this device (compute, memory, broker round trip) and write its profile TOML"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=None, metavar="HOST[:PORT]",
                        help="MQTT broker to measure the round trip and link against (skipped if absent)")
    parser.add_argument("--model", default="minilm-l6", help="model preset whose shapes are measured (default minilm-l6)")
    parser.add_argument("--nd", type=int, default=4, help="sub-blocks per decoupled layer of the measured shapes (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length of the measured shapes (default 128)")
    parser.add_argument("--out", type=Path, default=None, help="write the TOML here (default: stdout)")
    parser.add_argument("--name", default=None, help="device id in the profile (default: host name)")
    parser.add_argument("--link-mbit", type=float, default=None, help="link rate to write instead of measuring it")
    parser.add_argument("--ram-mb", type=int, default=None, help="memory budget to write instead of measuring it")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds for the compute probes (default 15)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from detransformer_edge.model.config import get_config
    from detransformer_edge.planner.measure import (
        default_device_name,
        measure_device,
        parse_broker,
    )
    from detransformer_edge.planner.profile import dump_profile, dumps_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    nd = args.nd
    base = get_config(args.model)
    if getattr(base, "d_model") % nd:
        nd = 1
    cfg = get_config(args.model, nd=nd, nb=None)
    broker = parse_broker(args.broker) if args.broker else None
    if broker is None and not args.quiet:
        print("note: no --broker given; round trip and link rate not measured", file=sys.stderr)
    m = measure_device(
        args.name or default_device_name(), cfg, args.seq, broker,
        link_mbit=args.link_mbit, ram_mb=args.ram_mb, budget_s=args.budget, quiet=args.quiet,
    )
    if args.out:
        dump_profile(m.profile, args.out, m.notes)
        if not args.quiet:
            p = m.profile
            print(f"wrote {args.out}: {p.gflops} GFLOPS, attention {p.attn_gflops}, {p.mem_bw_gbs} GB/s, "
                  f"{p.ram_mb} MB, link {p.link_mbit} Mbit" + (f", rtt {p.rtt_ms} ms" if p.rtt_ms is not None else ""),
                  file=sys.stderr)
    else:
        sys.stdout.write(dumps_profile(m.profile, m.notes))
    return 0
