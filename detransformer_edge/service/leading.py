"""The leader's housekeeping: plan a placement whenever the home changes, send the assignments,
track which devices are ready, and treat a device that falls silent as gone.

A device whose status stops arriving is treated as gone before the broker's will (which
Mosquitto 2.0 fires up to ~6 s after 1.5 × keepalive) until its status is heard again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from detransformer_edge.cluster.membership import MembershipView
from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.codec import ProtocolError

if TYPE_CHECKING:
    from detransformer_edge.service.agent import HomeAgent

log = logging.getLogger(__name__)


class LeaderDuties:
    def __init__(self, agent: HomeAgent, replan_delay_s: float) -> None:
        self.agent = agent
        self.replan_delay_s = replan_delay_s
        self._replan_task: asyncio.Task[None] | None = None
        self._heard: dict[str, float] = {}  # device -> when its status was last heard (monotonic)
        self.silent: set[str] = set()
        cfg = agent.config
        self.silence_s = max(1.5 * cfg.broker.keepalive_s, 2.5 * cfg.status_interval_s)

    # --- hooks of the cluster agent ------------------------------------------------------------------

    def on_become_leader(self, lease: Any) -> None:
        self.schedule_replan()

    def on_lose_leadership(self, lease: Any) -> None:
        if self._replan_task is not None:
            self._replan_task.cancel()

    def on_membership(self, view: MembershipView) -> None:
        a = self.agent
        # a device gone offline leaves the ready set now, and the runs that need it are cancelled
        for dev in (set(a.placements.state.ready) | a.runs.run_devices()) - set(view.online):
            a.runs.mark_gone(dev)
        for dev in set(self._heard) - set(view.online):
            del self._heard[dev]
        if a.cluster.is_leader:
            self.schedule_replan()

    def on_status(self, topic: str, payload: bytes, _props: object) -> None:
        a = self.agent
        family = a.cluster.topics.status
        dev = family.match(topic)
        if not dev:
            return
        self._heard[dev] = time.monotonic()
        if dev in self.silent:
            self.silent.discard(dev)
            log.warning("device %s is heard again", dev)
            if a.cluster.is_leader:
                self.schedule_replan()
        if not a.cluster.is_leader:
            return
        try:
            status = family.decode(payload)
        except ProtocolError:
            return
        if status.ready:
            a.placements.mark_ready(dev, status.placement_version)

    # --- placement ---------------------------------------------------------------------------------

    def schedule_replan(self) -> None:
        """Debounce: several devices often appear within a moment of each other."""
        if self._replan_task is not None and not self._replan_task.done():
            self._replan_task.cancel()
        self._replan_task = self.agent.spawn(self._replan(), "replan")

    async def _replan(self) -> None:
        a = self.agent
        await asyncio.sleep(self.replan_delay_s)
        if not a.cluster.is_leader:
            return
        view = a.cluster.membership
        profiles = {d: rec.planner for d, rec in view.profiles().items() if rec.planner and d not in self.silent}
        profiles.setdefault(a.id, a.cluster.profile.planner)
        lease = a.cluster.lease
        term = lease.term if lease is not None else 0
        # placement versions keep rising across leaders: a new leader continues after the last
        # assignment it received as a follower
        a.placements.state.version = max(a.placements.state.version, a.host.version)
        try:
            bodies = await asyncio.to_thread(a.placements.plan, profiles, term)
        except DetransformerError as exc:
            log.error("placement failed: %s", exc)
            return
        version = a.placements.state.version
        log.warning("leader %s: placement v%d over %s", a.id, version, ", ".join(sorted(bodies)))
        for dev, body in bodies.items():
            try:
                await a.cluster.send_assignment(dev, version, body)
            except DetransformerError as exc:
                log.warning("assignment to %s not sent: %s", dev, exc)

    async def watch_silence(self) -> None:
        """A device online by presence but silent for ``silence_s`` is treated as gone (its runs
        cancelled, a placement without it) until its status is heard again."""
        a = self.agent
        while True:
            await asyncio.sleep(min(1.0, self.silence_s / 6))
            if not a.cluster.is_leader:
                continue
            now = time.monotonic()
            for dev in a.cluster.membership.online:
                if dev == a.id or dev in self.silent:
                    continue
                last = self._heard.setdefault(dev, now)
                if now - last > self.silence_s:
                    log.warning("device %s silent for %.1f s: treating it as gone", dev, now - last)
                    self.silent.add(dev)
                    a.runs.mark_gone(dev)
                    self.schedule_replan()
