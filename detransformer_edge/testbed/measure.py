"""Measurements taken inside a running `Home`: ping, TCP throughput, achieved CPU share.

Used by `python -m detransformer_edge.testbed.check`, the tests and benchmarks, so that
"the shaping works" is always checked the same way. Traffic only ever goes between
addresses of the home, i.e. between its namespaces.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TestbedError
from .home import Home

PROBES = str(Path(__file__).with_name("probes.py"))


def _probe(*args: str) -> list[str]:
    return [sys.executable, PROBES, *args]


def _result(node: str, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError) as exc:
        raise TestbedError(f"{node}: probe gave no result: {done.stderr.strip()}") from exc


@dataclass(frozen=True)
class PingResult:
    src: str
    dst: str
    sent: int
    received: int
    rtt_ms: float  # best round trip; -1 when nothing came back


def ping(home: Home, src: str, dst: str, count: int = 3) -> PingResult:
    """ICMP echo from node `src` to node `dst`."""
    done = home.run(src, _probe("ping", "--host", home.address(dst), "--count", str(count)))
    r = _result(src, done)
    return PingResult(src, dst, int(r["sent"]), int(r["received"]), float(r["rtt_ms"]))


@dataclass(frozen=True)
class Throughput:
    """Goodput of one TCP transfer, timed by the receiver from its first to last byte."""

    src: str
    dst: str
    bytes: int
    seconds: float
    mbit: float


def measure_throughput(
    home: Home, src: str, dst: str, nbytes: int = 8_000_000, port: int = 5201,
    timeout: float = 60.0,
) -> Throughput:  # fmt: skip
    """Send `nbytes` over TCP from node `src` to node `dst` and time it at the receiver."""
    addr = home.address(dst)
    receiver = home.spawn(
        dst,
        _probe("recv", "--bind", addr, "--port", str(port), "--bytes", str(nbytes),
               "--timeout", str(timeout)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert receiver.stdout is not None
        ready, _, _ = select.select([receiver.stdout], [], [], 15.0)
        if not ready or receiver.stdout.readline().strip() != "READY":
            raise TestbedError(f"{dst}: receiver did not start listening on {addr}:{port}")
        home.run(src, _probe("send", "--host", addr, "--port", str(port),
                             "--bytes", str(nbytes), "--timeout", str(timeout)),
                 timeout=timeout + 5)  # fmt: skip
        out, err = receiver.communicate(timeout=timeout)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    r = _result(dst, subprocess.CompletedProcess([], receiver.returncode, out, err))
    if int(r["bytes"]) != nbytes:
        raise TestbedError(f"{src}->{dst}: {r['bytes']} of {nbytes} bytes arrived")
    return Throughput(src, dst, nbytes, float(r["seconds"]), float(r["mbit"]))


def measure_cpu_shares(
    home: Home, devices: list[str], seconds: float = 3.0, concurrent: bool = False
) -> dict[str, float]:
    """Run a one-thread busy loop in each device; return its CPU time / wall time.

    The quota is a ceiling: on a busy host a loop gets less. One device at a time (the
    default) keeps the loops from competing with each other; `concurrent` saves time.
    """
    shares: dict[str, float] = {}
    argv = _probe("burn", "--seconds", str(seconds))
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    if concurrent:
        procs = {d: home.spawn(d, argv, **pipes) for d in devices}
        for d, proc in procs.items():
            out, err = proc.communicate(timeout=seconds + 30)
            done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
            shares[d] = float(_result(d, done)["share"])
    else:
        for d in devices:
            shares[d] = float(_result(d, home.run(d, argv, timeout=seconds + 30))["share"])
    return shares
