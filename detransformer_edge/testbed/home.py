"""`Home`: build an emulated home from a `HomeSpec`, run processes in it, tear it down.

Topology: one namespace per node (devices and broker), each with `eth0` on a veth pair
whose other end is a port of bridge `br0` in the home's own router namespace. The host's
root namespace gets no link, address or route, so test traffic cannot leave the home.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

from .errors import TestbedError
from .host import HostCapabilities, check_host, enable_v2_controller, sh, write_limits
from .registry import HomeRecord, cleanup_record, list_records, orphans, teardown
from .spec import BROKER, ROUTER, HomeSpec, NodeSpec, TbfParams

log = logging.getLogger(__name__)

BRIDGE = "br0"
NODE_IF = "eth0"
T = TypeVar("T")
_CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace
STOP_GRACE_S = 2.0
"""How long spawned processes get after SIGTERM at teardown before SIGKILL."""

# Joins the cgroups named before "--" (writing its own pid), then execs the rest, so the
# program starts inside its cgroups; `ip netns exec` then execs it inside the namespace,
# keeping the pid: the Popen's pid is the program's own.
_JOIN_AND_EXEC = (
    'p=$$; while [ "$1" != -- ]; do echo "$p" > "$1" || exit 125; shift; done; shift; exec "$@"'
)


@dataclass(frozen=True)
class NodeLink:
    """How one node is attached and limited; what `Home.report` shows."""

    node: str
    address: str
    netns: str
    bridge_port: str  # the veth end on the bridge, in the router namespace
    shaping: TbfParams | None  # None: unshaped (a wired hub for the broker)
    cpu: float | None
    mem_mb: int | None
    cgroups: tuple[str, ...]

    def describe(self) -> str:
        link = (
            f"{self.shaping.mbit} Mbit/s both ways (tbf burst {self.shaping.burst_bytes} B, "
            f"queue {self.shaping.limit_bytes} B = {self.shaping.max_queue_ms:.0f} ms)"
            if self.shaping
            else "unshaped (wired hub)"
        )
        cpu = f"{self.cpu:g} CPU" if self.cpu is not None else "unlimited CPU"
        mem = f"{self.mem_mb} MiB" if self.mem_mb is not None else "unlimited memory"
        return f"{self.node:<10} {self.address:<12} {link}; {cpu}; {mem}"


class Home:
    """An emulated home on this host, live between `open()` and `close()`.

    Use as a context manager. Teardown also runs on SIGTERM/SIGHUP (turned into SystemExit
    while a home is open), Ctrl-C (KeyboardInterrupt unwinds the `with`) and interpreter
    exit (atexit); after SIGKILL, `cleanup_stale()` or the next home with the same prefix
    removes the leftovers.
    """

    def __init__(self, spec: HomeSpec) -> None:
        self.spec = spec
        self._caps: HostCapabilities | None = None
        self._record: HomeRecord | None = None
        self._links: dict[str, NodeLink] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_on_leftovers=exc is None)

    @property
    def is_open(self) -> bool:
        return self._record is not None

    def open(self) -> None:
        """Check the host, clear leftovers of a crashed run with this prefix, then build."""
        if self.is_open:
            raise TestbedError(f"home {self.spec.prefix} is already open")
        started = time.monotonic()
        caps = check_host(self.spec)
        self._caps = caps
        self._clear_previous_run(caps)
        spec = self.spec
        netns = [spec.netns(ROUTER)] + [spec.netns(n.name) for n in spec.nodes]
        cgroups = sorted(
            {str(c.group(spec.cgroup(n.name))) for n in spec.nodes for c in caps.controllers()}
        )
        record = HomeRecord.for_this_process(spec.prefix, netns, cgroups)
        try:
            record.save()  # before creating anything, so a crash mid-build is still recorded
        except OSError as exc:
            raise TestbedError(f"cannot write the home's record {record.path}: {exc}") from exc
        self._record = record
        _register(self)
        try:
            self._build(caps)
        except BaseException:
            self.close(raise_on_leftovers=False)
            raise
        log.info(
            "home %s up in %.2f s:\n%s", spec.prefix, time.monotonic() - started, self.report()
        )

    def close(self, raise_on_leftovers: bool = True) -> None:
        """Stop every process of the home and remove all it created. Idempotent."""
        with self._lock:
            record, self._record = self._record, None
        if record is None:
            return
        self._stop_spawned()
        _unregister(self)
        if not record.is_current():
            log.warning("home %s was already removed (cleanup_stale?)", record.prefix)
            return
        leftovers = teardown(record.netns, record.cgroups)
        if leftovers:
            msg = f"home {record.prefix}: could not remove " + "; ".join(leftovers)
            log.error("%s (run cleanup_stale(%r) later)", msg, record.prefix)
            if raise_on_leftovers:
                raise TestbedError(msg)
            return
        record.path.unlink(missing_ok=True)
        log.info("home %s torn down", record.prefix)

    def _clear_previous_run(self, caps: HostCapabilities) -> None:
        for record in list_records():
            if record.prefix != self.spec.prefix:
                continue
            if record.owner_alive():
                raise TestbedError(
                    f"prefix {record.prefix} is in use by live process {record.owner_pid}; "
                    "choose another prefix"
                )
            log.warning("clearing home %s left by a crashed run", record.prefix)
            left = cleanup_record(record)
            if left:
                raise TestbedError("could not clear the previous run: " + "; ".join(left))
        netns, groups = orphans(self.spec.prefix, [c.root for c in caps.controllers()])
        if netns or groups:
            log.warning("clearing unrecorded leftovers %s", netns + groups)
            left = teardown(netns, groups)
            if left:
                raise TestbedError("could not clear the previous run: " + "; ".join(left))

    def _build(self, caps: HostCapabilities) -> None:
        spec, ip = self.spec, caps.ip
        router = spec.netns(ROUTER)
        sh([ip, "netns", "add", router])
        sh([ip, "-n", router, "link", "set", "lo", "up"])
        sh([ip, "-n", router, "link", "add", BRIDGE, "type", "bridge"])
        sh([ip, "-n", router, "addr", "add", f"{spec.address(ROUTER)}/24", "dev", BRIDGE])
        sh([ip, "-n", router, "link", "set", BRIDGE, "up"])
        for c in caps.controllers():
            if c.version == 2:
                enable_v2_controller(c)
        for index, node in enumerate(spec.nodes):
            self._links[node.name] = self._attach(caps, node, f"p{index}")

    def _attach(self, caps: HostCapabilities, node: NodeSpec, port: str) -> NodeLink:
        spec, ip, tc = self.spec, caps.ip, caps.tc
        ns, router, addr = spec.netns(node.name), spec.netns(ROUTER), spec.address(node.name)
        sh([ip, "netns", "add", ns])
        sh([ip, "-n", ns, "link", "set", "lo", "up"])
        # Created inside the router namespace with its peer sent straight to the node's:
        # the root namespace never sees either end.
        sh([ip, "-n", router, "link", "add", port, "type", "veth",
            "peer", "name", NODE_IF, "netns", ns])  # fmt: skip
        sh([ip, "-n", router, "link", "set", port, "master", BRIDGE])
        sh([ip, "-n", router, "link", "set", port, "up"])
        sh([ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IF])
        sh([ip, "-n", ns, "link", "set", NODE_IF, "up"])
        shaping = TbfParams.for_rate(node.mbit) if node.mbit is not None else None
        if shaping is not None:
            # Egress of each end: the node side shapes its upload, the bridge side its download.
            sh([tc, "-n", ns, "qdisc", "replace", "dev", NODE_IF, "root", *shaping.tc_args()])
            sh([tc, "-n", router, "qdisc", "replace", "dev", port, "root", *shaping.tc_args()])
        groups = []
        for c in caps.controllers():
            group = c.group(spec.cgroup(node.name))
            if str(group) not in groups:
                group.mkdir(exist_ok=True)
                groups.append(str(group))
            try:
                write_limits(c, group, node.cpu, node.mem_mb)
            except OSError as exc:
                raise TestbedError(f"{node.name}: cannot set {c.name} limit in {group}: {exc}") from exc
        return NodeLink(node.name, addr, ns, port, shaping, node.cpu, node.mem_mb, tuple(groups))

    # ------------------------------------------------------------ queries

    def _link(self, name: str) -> NodeLink:
        if not self.is_open:
            raise TestbedError(f"home {self.spec.prefix} is not open")
        self.spec.node(name)  # ConfigError naming the nodes if unknown
        return self._links[name]

    def address(self, name: str) -> str:
        """IPv4 address of a node ("broker" included, "router" is the bridge) in the home."""
        return self.spec.address(name)

    def netns(self, name: str) -> str:
        """Network namespace of a node (or "router": the bridge's), for `ip -n` by hand."""
        if name == ROUTER:
            return self.spec.netns(ROUTER)
        return self._link(name).netns

    @property
    def links(self) -> tuple[NodeLink, ...]:
        return tuple(self._links[n.name] for n in self.spec.nodes if n.name in self._links)

    def report(self) -> str:
        """One line per node: address, link shaping, CPU and memory limits."""
        hub = "wired hub (unshaped)" if self.spec.broker.mbit is None else "shaped like a device"
        lines = [f"home {self.spec.prefix}: subnet {self.spec.subnet}, broker link {hub}"]
        lines += ["  " + link.describe() for link in self.links]
        return "\n".join(lines)

    # ------------------------------------------------------------ processes

    def spawn(
        self,
        node: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `node`'s namespace and cgroups; stopped at teardown.

        env: variables added to this process's environment (not a replacement).
        popen_kwargs: passed to subprocess.Popen (stdout, stderr, text, cwd, ...).

        The program also gets DETRANSFORMER_TESTBED_{NODE,CPU,MEM_MB,MBIT} (empty when
        unlimited): `ip netns exec` mounts a fresh /sys, so the cgroup limits are not
        readable from inside, and os.cpu_count() still counts the host's cores.
        """
        link = self._link(node)
        assert self._caps is not None
        procs_files = [str(Path(g) / "cgroup.procs") for g in link.cgroups]
        cmd = [
            "sh", "-c", _JOIN_AND_EXEC, "testbed-join", *procs_files, "--",
            self._caps.ip, "netns", "exec", link.netns, *argv,
        ]  # fmt: skip
        full_env = {**os.environ, **self._node_env(link), **(env or {})}
        proc = subprocess.Popen(cmd, env=full_env, **popen_kwargs)
        log.debug("spawned pid %d in %s: %s", proc.pid, node, " ".join(argv))
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(
        self,
        node: str,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in `node`, wait for it, return its captured text output."""
        proc = self.spawn(
            node, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise TestbedError(f"{node}: `{' '.join(argv)}` timed out after {timeout} s") from None
        done = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and done.returncode != 0:
            raise TestbedError(
                f"{node}: `{' '.join(argv)}` exited {done.returncode}: {err.strip()}"
            )
        return done

    def call(self, node: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a thread of this process that has joined ``node``'s network
        namespace, and return its result (or raise its exception). Sockets belong to the
        namespace of the thread that creates them, so an asyncio client run this way
        (``home.call("voice", asyncio.run, main())``) talks to the home's broker; threads it
        starts inherit the namespace. The calling thread stays where it is. The thread is a
        daemon: if the wait is interrupted (Ctrl-C), ``fn`` should notice by itself and end."""
        netns = self._link(node).netns
        out: dict[str, Any] = {}

        def target() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    out["error"] = TestbedError(f"cannot join {netns}: {os.strerror(ctypes.get_errno())}")
                    return
            try:
                out["value"] = fn(*args)
            except BaseException as exc:  # re-raised in the caller's thread
                out["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]  # type: ignore[no-any-return]

    @staticmethod
    def _node_env(link: NodeLink) -> dict[str, str]:
        def text(value: float | None) -> str:
            return "" if value is None else f"{value:g}"

        return {
            "DETRANSFORMER_TESTBED_NODE": link.node,
            "DETRANSFORMER_TESTBED_CPU": text(link.cpu),
            "DETRANSFORMER_TESTBED_MEM_MB": text(link.mem_mb),
            "DETRANSFORMER_TESTBED_MBIT": text(link.shaping.mbit if link.shaping else None),
        }

    def _stop_spawned(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- process-wide teardown

_open_homes: list[Home] = []
_previous_handlers: dict[int, Any] = {}
_registry_lock = threading.Lock()
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn a termination signal into SystemExit so `with` blocks and atexit tear down."""
    raise SystemExit(128 + signum)


def _register(home: Home) -> None:
    with _registry_lock:
        _open_homes.append(home)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _TEARDOWN_SIGNALS:
            if sig not in _previous_handlers and signal.getsignal(sig) is signal.SIG_DFL:
                _previous_handlers[sig] = signal.signal(sig, _exit_on_signal)


def _unregister(home: Home) -> None:
    with _registry_lock:
        if home in _open_homes:
            _open_homes.remove(home)
        if _open_homes or threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in list(_previous_handlers.items()):
            signal.signal(sig, previous)
            del _previous_handlers[sig]


@atexit.register
def _close_all() -> None:
    for home in _open_homes.copy():  # close() removes it from the list
        try:
            home.close(raise_on_leftovers=False)
        except Exception:  # interpreter exit: log and go on with the other homes
            log.exception("teardown of home %s failed", home.spec.prefix)


__all__ = ["BROKER", "Home", "NodeLink"]
