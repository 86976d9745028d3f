"""`detransformer-edge agent --config agent.toml`: run this device's agent until Ctrl-C."""

from __future__ import annotations

import argparse

HELP = "run this device's agent (joins the home cluster over MQTT)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="agent TOML file (see deploy/agent.example.toml)")
    p.add_argument("--catalog", default="pretrained", choices=("pretrained", "tiny", "shapes"),
                   help="pretrained models, tiny random ones (tests) or random ones of benchmark shapes")
    p.add_argument("--models", default="", help="serve only these catalog models, comma-separated")
    p.add_argument("--replicate-all", action="store_true",
                   help="every device holds every model, so fixed baseline plans can run (benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's cores)")
    p.add_argument("--intent-threshold", type=float, default=0.0,
                   help="extra confidence floor for intents, on top of the model's own calibrated "
                        "threshold (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from detransformer_edge.integrations import plugins_for
    from detransformer_edge.service.runner import AgentOptions, run_agent

    opts = AgentOptions(
        config_path=args.config, catalog=args.catalog,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        replicate_all=args.replicate_all, threads=args.threads, intent_threshold=args.intent_threshold,
    )
    return asyncio.run(run_agent(opts, plugins_for=plugins_for))
