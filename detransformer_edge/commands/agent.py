"""`detransformer-edge agent --config agent.toml`: run this device's agent until Ctrl-C."""

from __future__ import annotations

import argparse

HELP = "run this device's agent (joins the home cluster over MQTT)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="agent TOML file (see deploy/agent.example.toml)")
    p.add_argument("--models", default="intent,embed,generate",
                   help="roles this home serves, comma-separated (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="serve small random models instead of the pretrained ones (tests, benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's cores)")
    p.add_argument("--intent-threshold", type=float, default=0.5,
                   help="below this confidence a query is answered 'not recognised' (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from detransformer_edge.service.runner import AgentOptions, run_agent

    opts = AgentOptions(
        config_path=args.config, roles=tuple(r.strip() for r in args.models.split(",") if r.strip()),
        tiny=args.tiny, threads=args.threads, intent_threshold=args.intent_threshold,
    )
    return asyncio.run(run_agent(opts))
