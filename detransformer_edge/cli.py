"""`detransformer-edge` command line. Each subcommand lives in `detransformer_edge.commands.<name>`
and exposes `HELP`, `add_arguments(parser)` and `run(args) -> int`; modules are imported only
when their command runs so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from detransformer_edge import __version__
from detransformer_edge.errors import DetransformerError

# (command name, module under detransformer_edge.commands)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("generate", "generate"),
    ("embed", "embed"),
    ("profile", "profile"),
    ("plan", "plan"),
    ("convert", "convert"),
    ("train-intent", "train_intent"),
    ("train-lm", "train_lm"),
    ("agent", "agent"),
    ("ask", "ask"),
    ("demo", "demo"),
    ("bench", "bench"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detransformer-edge",
        description="Run one Transformer across the devices of a home (DeTransformer block parallelism).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"detransformer_edge.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def interrupt_on_terminate() -> None:
    """SIGTERM and SIGHUP unwind a command like Ctrl-C (KeyboardInterrupt), so every ``with`` and
    ``finally`` runs: the broker, agents, namespaces and cgroups a command started go with it.
    (An agent handles them itself, as a clean leave: ``service/runner.py``.)"""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    interrupt_on_terminate()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except DetransformerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
