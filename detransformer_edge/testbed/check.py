"""`python -m detransformer_edge.testbed.check`: build a small home and show that the
shaping does what it says, with numbers (run as root).

Default: 2 devices at 100 Mbit/s; measures TCP throughput device -> device (both ways)
and device -> broker, then a busy loop's CPU share at quotas 0.2, 0.5, 0.8 and unlimited. `--mbit 20 50 100 300 1000`
sweeps rates (one home per rate), which is how docs/TESTBED.md's table was measured.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import TestbedUnavailable
from .home import Home
from .measure import measure_cpu_shares, measure_throughput, ping
from .registry import cleanup_stale
from .spec import BROKER, BrokerSpec, DeviceSpec, HomeSpec


def _bytes_for(mbit: int, seconds: float) -> int:
    """Enough bytes for `seconds` at the configured rate, so every rate is timed alike."""
    return max(2_000_000, int(mbit * 1e6 / 8 * seconds))


def _check_links(mbit: int, cpu: float | None, broker_mbit: int | None, seconds: float) -> bool:
    spec = HomeSpec(
        devices=[DeviceSpec("dev1", cpu=cpu, mbit=mbit), DeviceSpec("dev2", cpu=cpu, mbit=mbit)],
        broker=BrokerSpec(mbit=broker_mbit),
    )
    with Home(spec) as home:
        for src, dst in (("dev1", "dev2"), ("dev2", "dev1"), ("dev1", BROKER)):
            p = ping(home, src, dst)
            if p.received != p.sent:
                print(f"{src} -> {dst}: ping lost {p.sent - p.received} of {p.sent}")
                return False
            rate = mbit if broker_mbit is None or dst != BROKER else min(mbit, broker_mbit)
            t = measure_throughput(home, src, dst, _bytes_for(rate, seconds))
            print(
                f"{rate:>7} Mb  {src + ' -> ' + dst:<16} {t.bytes:>11} "
                f"{t.seconds:>8.3f} {t.mbit:>7.1f} Mb {t.mbit / rate:>6.3f}"
            )
    return True


def _check_quotas(quotas: list[float], seconds: float) -> None:
    devices = [DeviceSpec(f"q{i}", cpu=q) for i, q in enumerate(quotas)]
    with Home(HomeSpec(devices=[*devices, DeviceSpec("free")])) as home:
        shares = measure_cpu_shares(home, [d.name for d in devices] + ["free"], seconds)
    for d in devices:
        print(f"busy loop at cpu={d.cpu:<5g} achieved share {shares[d.name]:.3f}")
    print(f"busy loop unlimited     achieved share {shares['free']:.3f} (what the host leaves)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detransformer_edge.testbed.check")
    parser.add_argument("--mbit", type=int, nargs="+", default=[100], help="device link rates")
    parser.add_argument("--cpu", type=float, default=None, help="CPU quota of the link devices")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each transfer")
    parser.add_argument("--broker-mbit", type=int, default=None, help="default: unshaped hub")
    parser.add_argument(
        "--quotas", type=float, nargs="*", default=[0.2, 0.5, 0.8], help="CPU quotas to measure"
    )
    parser.add_argument(
        "--cleanup-stale", action="store_true", help="only remove homes left by crashed runs"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cleanup_stale:
        print("removed:", " ".join(cleanup_stale()) or "nothing")
        return 0
    try:
        print(
            f"{'configured':>10}  {'path':<16} {'bytes':>11} {'seconds':>8} {'measured':>10} ratio"
        )
        for mbit in args.mbit:
            if not _check_links(mbit, args.cpu, args.broker_mbit, args.seconds):
                return 1
        if args.quotas:
            _check_quotas(args.quotas, seconds=3.0)
    except TestbedUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
