"""A record of every home on this host, so a crashed run's leftovers can be found.

Each home writes ``STATE_DIR``/<prefix>.json *before* creating anything,
naming its owner process and every namespace and cgroup it will make. /run is a tmpfs,
like the namespaces under /run, so records and namespaces vanish together at reboot. `cleanup_stale`
tears down homes whose owner is gone; a live owner's home is never touched unless its
prefix is named explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import TestbedError
from .host import find_controller, sh

log = logging.getLogger(__name__)

STATE_DIR = Path("/run") / "detransformer-testbed"  # tmpfs: records vanish at reboot with the namespaces
KILL_GRACE_S = 1.0
"""How long leftover processes get after SIGTERM before SIGKILL."""


def _start_time(pid: int) -> str | None:
    """Kernel start time of `pid`, which tells a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after comm


@dataclass
class HomeRecord:
    """Everything a home creates, written down before it is created."""

    prefix: str
    owner_pid: int
    owner_start: str
    netns: list[str]
    cgroups: list[str]  # absolute directories, one per node and controller hierarchy
    token: str  # tells this opening of a prefix from a later one

    @classmethod
    def for_this_process(cls, prefix: str, netns: list[str], cgroups: list[str]) -> HomeRecord:
        pid = os.getpid()
        return cls(prefix, pid, _start_time(pid) or "", netns, cgroups, secrets.token_hex(8))

    def is_current(self) -> bool:
        """Whether the record on disk is still this one (not cleaned or replaced since)."""
        try:
            return HomeRecord.load(self.path).token == self.token
        except (OSError, ValueError, TypeError):
            return False

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    def owner_alive(self) -> bool:
        return _start_time(self.owner_pid) == self.owner_start

    def save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> HomeRecord:
        return cls(**json.loads(path.read_text()))


def list_records() -> list[HomeRecord]:
    if not STATE_DIR.is_dir():
        return []
    records = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            records.append(HomeRecord.load(path))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable testbed record %s: %s", path, exc)
    return records


def list_netns() -> list[str]:
    done = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _pids_in(netns: list[str], cgroups: list[str]) -> set[int]:
    pids: set[int] = set()
    existing = set(list_netns())
    for ns in netns:
        if ns in existing:
            done = sh(["ip", "netns", "pids", ns], check=False)
            pids.update(int(p) for p in done.stdout.split() if p.isdigit())
    for group in cgroups:
        try:
            pids.update(int(p) for p in Path(group, "cgroup.procs").read_text().split())
        except OSError:
            pass
    pids.discard(os.getpid())
    return pids


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that are our own exited children: a zombie still holds its
    cgroup (rmdir fails with EBUSY) until its parent reaps it."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def kill_processes(netns: list[str], cgroups: list[str]) -> set[int]:
    """End every process still in these namespaces or cgroups: a namespace held by a live
    process outlives `ip netns del` (with its links), and a busy cgroup cannot be removed.
    Returns every pid it signalled."""
    seen = pids = _pids_in(netns, cgroups)
    if not pids:
        return set()
    log.info("stopping %d leftover process(es): %s", len(pids), sorted(pids))
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline and (pids := _pids_in(netns, cgroups)):
        _reap(seen)
        time.sleep(0.05)
    if pids:
        seen |= pids
        _signal_all(pids, signal.SIGKILL)
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline and _pids_in(netns, cgroups):
            _reap(seen)
            time.sleep(0.05)
    _reap(seen)
    return seen


def teardown(netns: list[str], cgroups: list[str]) -> list[str]:
    """Remove namespaces (their veths and the bridge go with them) and cgroups.

    Best effort: every step is tried; returns what could not be removed.
    """
    signalled = kill_processes(netns, cgroups)
    leftovers: list[str] = []
    existing = set(list_netns())
    for ns in netns:
        if ns in existing:
            done = sh(["ip", "netns", "del", ns], check=False)
            if done.returncode != 0:
                leftovers.append(f"netns {ns}: {done.stderr.strip()}")
    for group in cgroups:
        path = Path(group)
        deadline = time.monotonic() + CGROUP_EXIT_S
        while True:  # exiting tasks leave the cgroup a moment after SIGKILL (seconds on a loaded host)
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                err = exc
                alive = _kill_members(path)  # a task still there (or that joined after the first kill)
                _reap(signalled)
                # only zombies left (no live task): set it aside after a moment; live tasks: wait
                if time.monotonic() > deadline or (not alive and time.monotonic() > deadline - CGROUP_EXIT_S + 5):
                    break
                time.sleep(0.05)
        if path.exists():
            if _set_aside(path):
                continue
            leftovers.append(f"cgroup {group}: {err}")
    return leftovers


CGROUP_EXIT_S = 30.0  # how long a killed home's tasks may take to leave its cgroups


def _kill_members(path: Path) -> bool:
    """SIGKILL every task still in the cgroup; whether there was one."""
    try:
        pids = [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return False
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return bool(pids)


def _set_aside(path: Path) -> bool:
    """A cgroup with no live task can still be busy: a killed owner's children become zombies
    that only init reaps, and in a container init may never do so. Rename it aside so the home's
    names are free again (the kernel frees it once the zombies go)."""
    try:
        if Path(path, "cgroup.procs").read_text().split():
            return False
        path.rename(path.with_name(f"{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}"))
    except OSError:
        return False
    log.warning("cgroup %s holds only exited tasks; set aside", path)
    return True


def cleanup_record(record: HomeRecord) -> list[str]:
    leftovers = teardown(record.netns, record.cgroups)
    if not leftovers:
        record.path.unlink(missing_ok=True)
    return leftovers


def orphans(prefix: str, cgroup_roots: list[Path]) -> tuple[list[str], list[str]]:
    """Namespaces and cgroups named for `prefix` (prefixes hold no '-', so the match is exact)."""
    mark = f"{prefix}-"
    netns = [ns for ns in list_netns() if ns.startswith(mark)]
    groups = [
        str(p) for root in cgroup_roots if root.is_dir() for p in root.iterdir()
        if p.is_dir() and p.name.startswith(mark)
    ]  # fmt: skip
    return netns, groups


def cleanup_stale(prefix: str | None = None) -> list[str]:
    """Tear down leftovers of crashed runs; return the prefixes cleaned.

    Without `prefix`: every recorded home whose owner process is gone. With `prefix`: that
    home whatever its owner (the caller says it is dead), plus any namespace or cgroup
    carrying the prefix even without a record. Homes of live owners are left alone, so
    concurrent runs on one host are safe.
    """
    cleaned: list[str] = []
    problems: list[str] = []
    for record in list_records():
        if (prefix is None and not record.owner_alive()) or record.prefix == prefix:
            log.warning("removing testbed home %s left by pid %d", record.prefix, record.owner_pid)
            problems += cleanup_record(record)
            cleaned.append(record.prefix)
    if prefix is not None:
        roots = [c.root for c in (find_controller("cpu"), find_controller("memory")) if c]
        netns, groups = orphans(prefix, roots)
        if netns or groups:
            log.warning("removing unrecorded testbed leftovers %s", netns + groups)
            problems += teardown(netns, groups)
            if prefix not in cleaned:
                cleaned.append(prefix)
    if problems:
        raise TestbedError("could not remove testbed leftovers: " + "; ".join(problems))
    return cleaned
