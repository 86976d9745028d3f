"""`detransformer-edge demo`: the multi-device demo on this machine (the README's main job)."""

from __future__ import annotations

import argparse

HELP = "run a 4-device home on this machine: broker, agents, voice queries and a generation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", default="pretrained", choices=("pretrained", "tiny"),
                   help="pretrained models (default) or tiny random ones (a fast smoke run)")
    p.add_argument("--home", default="default", choices=("default", "speakers"),
                   help="default: two Pis, a Pi 4 and a speaker; speakers: four smart speakers, none of which can "
                        "hold the language model, which the planner then splits across them")
    p.add_argument("--broker", default="auto", choices=("auto", "mosquitto", "amqtt"),
                   help="embedded broker: Mosquitto when installed, else amqtt (default: auto)")
    p.add_argument("--devices", type=int, default=4, choices=(2, 3, 4), help="agents to start (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: 24)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=None,
                      help="keep the agents running after the script until Ctrl-C (default on a terminal)")
    wait.add_argument("--no-wait", dest="wait", action="store_false", help="exit when the script is done")


def run(args: argparse.Namespace) -> int:
    from detransformer_edge.service.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(catalog=args.catalog, home=args.home, broker=args.broker, devices=args.devices,
                                max_new_tokens=args.max_new_tokens, wait=args.wait))
