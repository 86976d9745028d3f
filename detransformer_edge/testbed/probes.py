"""Tiny measurement programs run *inside* a home's namespaces (stdlib only, run as a script).

Run by path (`python probes.py recv ...`) so they need nothing but the interpreter; each
prints one JSON line on stdout. `recv` prints `READY` first, once it listens, so the
caller starts the sender only when the receiver can accept.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

CHUNK = 64 * 1024


def recv(bind: str, port: int, nbytes: int, timeout: float) -> dict[str, float]:
    """Receive nbytes on one TCP connection; rate is timed from first to last byte."""
    with socket.create_server((bind, port)) as server:
        server.settimeout(timeout)
        print("READY", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            got, first = 0, 0.0
            while got < nbytes:
                data = conn.recv(CHUNK)
                if not data:
                    break
                if not got:
                    first = time.perf_counter()
                got += len(data)
            last = time.perf_counter()
            conn.sendall(b"k")  # tells the sender all arrived
    seconds = max(last - first, 1e-9)
    return {"bytes": got, "seconds": seconds, "mbit": got * 8 / seconds / 1e6}


def send(host: str, port: int, nbytes: int, timeout: float) -> dict[str, float]:
    """Send nbytes of zeros and wait for the receiver's acknowledgement."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with conn:
        start = time.perf_counter()
        block = bytes(CHUNK)
        left = nbytes
        while left > 0:
            conn.sendall(block[: min(left, CHUNK)])
            left -= min(left, CHUNK)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "mbit": nbytes * 8 / seconds / 1e6}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host: str, count: int, timeout: float) -> dict[str, float]:
    """ICMP echo over a raw socket (root), so no `ping` binary is needed."""
    ident = os.getpid() & 0xFFFF
    received, rtts = 0, []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(count):
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            payload = b"detransformer-testbed"
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq)
            sent = time.perf_counter()
            sock.sendto(packet + payload, (host, 0))
            deadline = sent + timeout
            while (left := deadline - time.perf_counter()) > 0:
                sock.settimeout(left)
                try:
                    reply, addr = sock.recvfrom(2048)
                except TimeoutError:
                    break
                ihl = (reply[0] & 0x0F) * 4
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", reply[ihl : ihl + 8])
                if kind == 0 and rid == ident and rseq == seq and addr[0] == host:
                    received += 1
                    rtts.append((time.perf_counter() - sent) * 1000)
                    break
    return {"sent": count, "received": received, "rtt_ms": min(rtts) if rtts else -1.0}


def burn(seconds: float) -> dict[str, float]:
    """Spin one thread; the CPU time it got over wall time is the share its cgroup allows."""
    wall0, cpu0 = time.monotonic(), time.process_time()
    x = 0
    while time.monotonic() - wall0 < seconds:
        for _ in range(10_000):
            x += 1
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "share": cpu / wall}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("recv")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("send")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("ping")
    p.add_argument("--host", required=True)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("burn")
    p.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.cmd == "recv":
        result = recv(args.bind, args.port, args.bytes, args.timeout)
    elif args.cmd == "send":
        result = send(args.host, args.port, args.bytes, args.timeout)
    elif args.cmd == "ping":
        result = ping(args.host, args.count, args.timeout)
    else:
        result = burn(args.seconds)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
