"""How long to wait for a home to start: as long as it makes progress, not a fixed number of seconds.

A home's start-up time is the host's speed times the work (calibration, three BERT-base-sized
models loaded by a 0.2-CPU device, a re-placement per device that joins): a fixed deadline that a
fast host meets with room to spare is missed by a slower one while every agent is still loading.
So the wait is bounded by *silence*: it goes on while any agent writes to its log (each model
loaded, each placement, each election is a line at the default level) or the leader's answer to
the readiness probe changes, and gives up after ``quiet_s`` of neither — or at ``cap_s`` in all, so
an agent that logs the same warning forever cannot hold the bench for ever.

Agents that log only warnings (the test fleets, ``service/fleet.py``) say nothing while Python
imports torch or a model loads, which on a slow host is most of the start: there the watch also
counts the agents' own CPU time (``cpu``) as progress while they use at least ``busy_fraction`` of
a core together. Idle agents (a status message every half second) stay far below that, so a home
that waits for nothing still runs into ``quiet_s``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


class StartupWatch:
    """Tracks the agents' logs and the probe's answers while a home starts."""

    def __init__(self, logs: Mapping[str, Path], quiet_s: float, cap_s: float,
                 clock: Callable[[], float] = time.monotonic, cpu: Callable[[], float] | None = None,
                 busy_fraction: float = 0.1) -> None:
        if quiet_s <= 0 or cap_s < quiet_s:
            raise ValueError(f"need 0 < quiet_s <= cap_s, got quiet_s={quiet_s}, cap_s={cap_s}")
        self.logs = dict(logs)
        self.quiet_s = quiet_s
        self.cap_s = cap_s
        self._clock = clock
        self.started = clock()
        self.last_progress = self.started
        self._sizes = {name: self._size(path) for name, path in self.logs.items()}
        self._answer: Any = None
        self._cpu, self.busy_fraction = cpu, busy_fraction
        self._cpu_mark = (self.started, cpu() if cpu is not None else 0.0)  # (wall, CPU seconds)

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def saw(self, answer: Any) -> None:
        """The probe's latest answer (a plan description or an error): a new one is progress."""
        if answer != self._answer:
            self._answer = answer
            self._progressed()

    def poll(self) -> None:
        """Look at the logs (any that grew is progress) and, over windows of at least a second, at
        the agents' CPU time (busy agents are progress)."""
        for name, path in self.logs.items():
            size = self._size(path)
            if size != self._sizes[name]:
                self._sizes[name] = size
                self._progressed()
        if self._cpu is not None:
            now, (then, used) = self._clock(), self._cpu_mark
            if now - then >= 1.0:
                cpu = self._cpu()
                if cpu - used >= self.busy_fraction * (now - then):
                    self._progressed()
                self._cpu_mark = (now, cpu)

    def _progressed(self) -> None:
        self.last_progress = self._clock()

    def remaining(self) -> float:
        """Seconds before the watch gives up if nothing new happens (never below 0)."""
        now = self._clock()
        return max(0.0, min(self.last_progress + self.quiet_s, self.started + self.cap_s) - now)

    def why_stop(self) -> str | None:
        """None while the home may still become ready; else why waiting longer is pointless."""
        self.poll()
        now = self._clock()
        if now - self.started >= self.cap_s:
            return (f"the home was not ready after {self.cap_s:.0f} s in all, though its agents were still "
                    f"logging (last answer: {self._answer}); {self.tails()}")
        if now - self.last_progress >= self.quiet_s:
            busy = "" if self._cpu is None else ", none was busy"
            return (f"the home was not ready: nothing new for {self.quiet_s:.0f} s (no agent logged a line{busy}, "
                    f"the leader's answer stayed {self._answer!r}) after {now - self.started:.0f} s; {self.tails()}")
        return None

    def tails(self) -> str:
        """Each agent's last log line: where each one stopped."""
        return "last lines: " + "; ".join(f"{name}: {last_line(path) or '(empty)'}" for name, path in self.logs.items())


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log (its final ``limit`` bytes), shortened to 200 characters."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # splitlines also splits a progress bar's carriage-return redraws: the last is the latest
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used; 0.0 when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15
    except (OSError, IndexError, ValueError):
        return 0.0
