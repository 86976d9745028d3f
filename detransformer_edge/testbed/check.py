"""`python -m detransformer_edge.testbed.check`: build a small home and show that the
shaping does what it says, with numbers (run as root).

Default: 2 devices at 100 Mbit/s and 0.5 CPU; measures TCP throughput device -> device
(both ways) and device -> broker, then a busy loop's CPU share. `--mbit 20 50 100 300 1000`
sweeps rates (one home per rate), which is how docs/TESTBED.md's table was measured.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import TestbedUnavailable
from .home import Home
from .measure import measure_cpu_shares, measure_throughput, ping
from .spec import BROKER, BrokerSpec, DeviceSpec, HomeSpec


def _bytes_for(mbit: int, seconds: float) -> int:
    """Enough bytes for `seconds` at the configured rate, so every rate is timed alike."""
    return max(2_000_000, int(mbit * 1e6 / 8 * seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detransformer_edge.testbed.check")
    parser.add_argument("--mbit", type=int, nargs="+", default=[100], help="device link rates")
    parser.add_argument("--cpu", type=float, default=0.5, help="CPU quota of each device")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each transfer")
    parser.add_argument("--broker-mbit", type=int, default=None, help="default: unshaped hub")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    print(f"{'configured':>10}  {'path':<16} {'bytes':>11} {'seconds':>8} {'measured':>9} {'ratio':>6}")
    for mbit in args.mbit:
        spec = HomeSpec(
            devices=[DeviceSpec("dev1", cpu=args.cpu, mbit=mbit),
                     DeviceSpec("dev2", cpu=args.cpu, mbit=mbit)],
            broker=BrokerSpec(mbit=args.broker_mbit),
        )  # fmt: skip
        try:
            with Home(spec) as home:
                for src, dst in (("dev1", "dev2"), ("dev2", "dev1"), ("dev1", BROKER)):
                    p = ping(home, src, dst)
                    if p.received != p.sent:
                        print(f"{src} -> {dst}: ping lost {p.sent - p.received}/{p.sent}")
                        return 1
                    t = measure_throughput(home, src, dst, _bytes_for(mbit, args.seconds))
                    print(
                        f"{mbit:>7} Mb  {src + ' -> ' + dst:<16} {t.bytes:>11} "
                        f"{t.seconds:>8.3f} {t.mbit:>6.1f} Mb {t.mbit / mbit:>6.3f}"
                    )
                if mbit == args.mbit[-1]:
                    shares = measure_cpu_shares(home, ["dev1"])
                    print(f"busy loop at cpu={args.cpu:g}: achieved share {shares['dev1']:.3f}")
        except TestbedUnavailable as exc:
            print(exc, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
