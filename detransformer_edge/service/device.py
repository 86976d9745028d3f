"""Every device's duties toward the leader: hold the weights an assignment names (saying how far
loading has come), and run its part of the runs the leader starts.

While it loads weights a device reports ``loading`` in its status: it does not claim a vacant
lease meanwhile (it could not serve yet), and its loading work runs below the event loop's
priority so that a leader keeps renewing its lease on a small CPU (``service/host.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from detransformer_edge.cluster.membership import WorkState
from detransformer_edge.errors import DetransformerError
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.messages import Assignment
from detransformer_edge.protocol.signing import SignatureError
from detransformer_edge.service.placement import weights_from_dict
from detransformer_edge.service.weights import shard_units
from detransformer_edge.transport.session import NotConnectedError

if TYPE_CHECKING:
    from detransformer_edge.service.agent import HomeAgent

log = logging.getLogger(__name__)


class DeviceDuties:
    def __init__(self, agent: HomeAgent) -> None:
        self.agent = agent
        self._assign_task: asyncio.Task[None] | None = None

    def _state(self, **changes: Any) -> None:
        c = self.agent.cluster
        c.work_state = dataclasses.replace(c.work_state, **changes)

    async def status_now(self) -> None:
        with contextlib.suppress(NotConnectedError):
            await self.agent.cluster.publish_status()

    # --- weights -----------------------------------------------------------------------------------

    async def on_assignment(self, msg: Assignment) -> None:
        a = self.agent
        raw = msg.body.get("models")
        if not isinstance(raw, Mapping):
            log.warning("ignoring assignment without models from %s", msg.leader)
            return
        try:
            models = {m: weights_from_dict(w) for m, w in raw.items() if m in a.catalog.names and isinstance(w, Mapping)}
        except DetransformerError as exc:
            log.warning("ignoring malformed assignment from %s: %s", msg.leader, exc)
            return
        a.cluster.work_state = WorkState(False, msg.placement_version, (), a.cluster.work_state.last_latency_ms,
                                         loading=True)
        await self.status_now()
        # loaded in a task: the message loop must keep running (streamed weight chunks arrive
        # through it); a newer assignment replaces one still loading
        if self._assign_task is not None and not self._assign_task.done():
            self._assign_task.cancel()
        self._assign_task = a.spawn(self._hold(msg.placement_version, models), "assign")

    async def _hold(self, version: int, models: Mapping[str, DeviceWeights]) -> None:
        a = self.agent
        progress = a.spawn(self._report_loading(), "loading")
        log.warning("%s: loading its part of placement v%d (%s)", a.id, version,
                    ", ".join(f"{m}: {w}" for m, w in models.items()) or "nothing")
        try:
            await a.host.assign(version, models)
            # A device holding a model's embeddings may coordinate its requests: have its
            # tokenizer (and heads, chat template) ready before saying so.
            for name, weights in models.items():
                if weights.embeddings:
                    await asyncio.to_thread(a.catalog.tools, name)
        except (DetransformerError, OSError) as exc:
            log.error("%s cannot hold its placement v%d: %s", a.id, version, exc)
            self._state(loading=False, weights_percent=None)
            return
        finally:
            progress.cancel()
        self._state(ready=True, placement_version=version, sub_blocks=a.host.sub_blocks(), loading=False,
                    weights_percent=None)
        in_use = {(m, unit) for m, w in models.items() for unit in shard_units(a.catalog.get(m).config(), w)}
        await asyncio.to_thread(a.weight_fetcher.prune, in_use)  # keep the cache within its bound
        log.warning("%s: ready with placement v%d (%.1f MB of weights)", a.id, version,
                    sum(a.host.weight_bytes().values()) / 1e6)
        await self.status_now()
        if a.cluster.is_leader:
            a.placements.mark_ready(a.id, version)

    async def _report_loading(self) -> None:
        """While weights stream in, the status record carries the percent received."""
        while True:
            await asyncio.sleep(self.agent.config.status_interval_s)
            percent = self.agent.weight_fetcher.percent()
            if percent is not None:
                self._state(weights_percent=percent)
                await self.status_now()

    def note_latency(self, ms: float | None) -> None:
        self._state(last_latency_ms=ms)

    # --- runs --------------------------------------------------------------------------------------

    def on_run_end(self, topic: str, payload: bytes, _props: object) -> None:
        a = self.agent
        family = a.cluster.topics.run.end
        req = family.match(topic)
        if not req:
            return
        try:
            if a.cluster.verifier is not None:  # SignatureError: forged, unsigned or replayed
                a.cluster.verifier.verify(topic, payload, "run")
            end = family.decode(payload)
        except ProtocolError as exc:
            log.warning("ignoring run end on %s: %s", topic, exc)
            return
        if end.req == req:
            a.host.end(req)

    def on_run_control(self, topic: str, payload: bytes, _props: object) -> None:
        a = self.agent
        family = a.cluster.topics.run.control
        req = family.match(topic)
        if not req:
            return
        try:
            stamp = None
            if a.cluster.verifier is not None:  # SignatureError: forged, unsigned or replayed
                stamp = a.cluster.verifier.verify(topic, payload, "run")
            ctl = family.decode(payload)
            if stamp is not None and stamp.term != ctl.term:
                raise SignatureError(f"run: signed for term {stamp.term}, names term {ctl.term}")
        except ProtocolError as exc:
            log.warning("ignoring run control on %s: %s", topic, exc)
            return
        lease = a.cluster.lease
        if lease is not None and ctl.term < lease.term:
            log.warning("ignoring run %s from an older term %d", ctl.req, ctl.term)
            return
        if ctl.req != req or a.id == ctl.plan.coordinator:
            return
        a.host.start_worker(ctl)
