"""The host side: running `ip`/`tc`, finding cgroup controllers, checking preconditions.

Everything that asks the kernel what it can do lives here, so `Home` only composes steps
and a missing capability is reported once, precisely, before anything is built.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import TestbedError, TestbedUnavailable
from .spec import CFS_PERIOD_US, HomeSpec, TbfParams

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 15.0
"""Bound on one `ip`/`tc` call: they answer in milliseconds unless the kernel is stuck."""


def sh(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one host command; failure raises TestbedError naming the command and its stderr."""
    log.debug("run: %s", " ".join(argv))
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if check and done.returncode != 0:
        raise TestbedError(
            f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


# ---------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupController:
    """Where one controller (cpu or memory) is mounted and in which cgroup version."""

    name: str  # "cpu" | "memory"
    root: Path
    version: int  # 1 | 2

    def group(self, group: str) -> Path:
        return self.root / group


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mountpoint, fstype, options) of every cgroup mount of this mount namespace."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1].replace("\\040", " "), parts[2], set(parts[3].split(","))))
    return out


def find_controller(name: str) -> CgroupController | None:
    """The hierarchy to use for `name`: cgroup v1 if mounted (what this project's hosts
    have), else cgroup v2 when the controller is listed in its cgroup.controllers."""
    v1_marker = {"cpu": "cpu.cfs_quota_us", "memory": "memory.limit_in_bytes"}[name]
    mounts = _mounts()
    for point, fstype, opts in mounts:
        if fstype == "cgroup" and name in opts and (Path(point) / v1_marker).exists():
            return CgroupController(name, Path(point), 1)
    for point, fstype, _ in mounts:
        controllers = Path(point) / "cgroup.controllers"
        if fstype == "cgroup2" and controllers.exists() and name in controllers.read_text().split():
            return CgroupController(name, Path(point), 2)
    return None


def write_limits(
    ctrl: CgroupController, group: Path, cpu: float | None, mem_mb: int | None
) -> None:
    """Write the CPU quota or memory limit of one group in one hierarchy."""
    if ctrl.name == "cpu" and cpu is not None:
        quota = max(1000, round(cpu * CFS_PERIOD_US))  # kernel minimum quota is 1 ms
        if ctrl.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
    if ctrl.name == "memory" and mem_mb is not None:
        limit = mem_mb * 1024 * 1024
        if ctrl.version == 1:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            memsw = group / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # without it a device could spill past its limit into swap
                memsw.write_text(str(limit))
        else:
            (group / "memory.max").write_text(str(limit))
            swap = group / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")


def enable_v2_controller(ctrl: CgroupController) -> None:
    """cgroup v2 only offers a controller to children listed in the parent's subtree_control."""
    control = ctrl.root / "cgroup.subtree_control"
    if ctrl.name not in control.read_text().split():
        control.write_text(f"+{ctrl.name}")


# ---------------------------------------------------------------- preconditions


@dataclass(frozen=True)
class HostCapabilities:
    """What this host offers the testbed; found once by `check_host`."""

    ip: str
    tc: str
    cpu: CgroupController | None
    memory: CgroupController | None

    def controllers(self) -> list[CgroupController]:
        return [c for c in (self.cpu, self.memory) if c is not None]


def _probe_kernel(ip: str, tc: str) -> list[str]:
    """Build a throw-away namespace with a bridge, a veth pair and a tbf qdisc; return
    what failed. Probing is the only reliable check: tbf may be built in (no module file)."""
    ns = f"dtbprobe{os.getpid()}{secrets.token_hex(2)}"
    missing: list[str] = []
    try:
        done = sh([ip, "netns", "add", ns], check=False)
        if done.returncode != 0:
            return [f"cannot create a network namespace (`ip netns add`): {done.stderr.strip()}"]
        done = sh([ip, "-n", ns, "link", "add", "br0", "type", "bridge"], check=False)
        if done.returncode != 0:
            missing.append(f"no Linux bridge support (kernel module bridge): {done.stderr.strip()}")
        done = sh(
            [ip, "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=False
        )
        if done.returncode != 0:
            missing.append(f"no veth support (kernel module veth): {done.stderr.strip()}")
        else:
            tbf = TbfParams.for_rate(100).tc_args()
            done = sh([tc, "-n", ns, "qdisc", "add", "dev", "va", "root", *tbf], check=False)
            if done.returncode != 0:
                missing.append(f"no tc tbf qdisc (kernel module sch_tbf): {done.stderr.strip()}")
    finally:
        sh([ip, "netns", "del", ns], check=False)
    return missing


def check_host(spec: HomeSpec | None = None) -> HostCapabilities:
    """Check every precondition of building `spec` (all features when None).

    Raises TestbedUnavailable listing everything missing at once, so one run tells the
    user the whole fix (become root, install iproute2, load a module, mount a cgroup).
    """
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append(f"must run as root (euid 0), this process has euid {os.geteuid()}")
    ip, tc = shutil.which("ip"), shutil.which("tc")
    if ip is None:
        missing.append("`ip` not found on PATH (install iproute2)")
    if tc is None:
        missing.append("`tc` not found on PATH (install iproute2)")
    need_cpu = spec is None or any(n.cpu is not None for n in spec.nodes)
    need_mem = spec is None or any(n.mem_mb is not None for n in spec.nodes)
    cpu, memory = find_controller("cpu"), find_controller("memory")
    if need_cpu and cpu is None:
        missing.append(
            "no cgroup cpu controller: neither cgroup v1 <mount>/cpu.cfs_quota_us "
            "(e.g. /sys/fs/cgroup/cpu) nor cgroup v2 with 'cpu' in cgroup.controllers"
        )
    if need_mem and memory is None:
        missing.append(
            "no cgroup memory controller: neither cgroup v1 <mount>/memory.limit_in_bytes "
            "nor cgroup v2 with 'memory' in cgroup.controllers"
        )
    for ctrl in (cpu, memory):
        if ctrl is not None and os.geteuid() == 0 and not os.access(ctrl.root, os.W_OK):
            missing.append(f"cgroup hierarchy {ctrl.root} is not writable (read-only mount?)")
    if not missing and ip is not None and tc is not None:
        missing.extend(_probe_kernel(ip, tc))
    if missing:
        raise TestbedUnavailable("home-network testbed unavailable: " + "; ".join(missing))
    assert ip is not None and tc is not None
    return HostCapabilities(ip=ip, tc=tc, cpu=cpu, memory=memory)
