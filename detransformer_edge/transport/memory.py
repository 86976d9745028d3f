"""In-memory transport: N devices in one asyncio loop, for fast tests and the planner's dry runs.

A :class:`MemoryHub` plays the broker: a fan-out publish is one upload from the sender and
one download per receiver, and the hub counts both so tests can assert message counts
(e.g. an all-gather is exactly one upload per device). Like MQTT QoS 0, a message to a
device that is not connected is silently lost; the receiver's timeout reports it.
"""

from __future__ import annotations

import asyncio
import logging

from detransformer_edge.transport.base import MailboxLimits, Transport, TransportStats
from detransformer_edge.transport.errors import TransportError

__all__ = ["MemoryHub", "MemoryTransport"]

log = logging.getLogger(__name__)


class MemoryHub:
    """The shared "broker" of a set of :class:`MemoryTransport` objects (same event loop)."""

    def __init__(self) -> None:
        self._devices: dict[str, MemoryTransport] = {}
        self.broker = TransportStats()  # msgs_received = uploads, msgs_sent = fan-out downloads

    def transport(self, device_id: str, limits: MailboxLimits | None = None) -> MemoryTransport:
        """Make a transport attached to this hub; start it (``async with``) before use."""
        return MemoryTransport(self, device_id, limits)

    @property
    def connected(self) -> list[str]:
        return list(self._devices)

    def _attach(self, t: MemoryTransport) -> None:
        if t.device_id in self._devices:
            raise TransportError(f"device id {t.device_id!r} is already connected to this hub")
        self._devices[t.device_id] = t

    def _detach(self, t: MemoryTransport) -> None:
        if self._devices.get(t.device_id) is t:
            del self._devices[t.device_id]

    def _route(self, src: str, dsts: list[str], req: str, step: str, payload: bytes) -> None:
        self.broker.msgs_received += 1
        self.broker.bytes_received += len(payload)
        for dst in dsts:
            target = self._devices.get(dst)
            if target is None:
                log.debug("no device %r connected: %s from %s lost", dst, (req, step), src)
                continue
            self.broker.msgs_sent += 1
            self.broker.bytes_sent += len(payload)
            target.mailbox.deliver(req, step, src, payload)


class MemoryTransport(Transport):
    """A device endpoint on a :class:`MemoryHub`; payload bytes are shared, never copied."""

    def __init__(self, hub: MemoryHub, device_id: str, limits: MailboxLimits | None = None):
        super().__init__(device_id, limits)
        self._hub = hub

    async def _start(self) -> None:
        self._hub._attach(self)

    async def _close(self) -> None:
        self._hub._detach(self)

    async def _send(self, dsts: list[str], req: str, step: str, payload: bytes) -> None:
        self._hub._route(self.device_id, dsts, req, step, payload)
        await asyncio.sleep(0)  # let receivers run, as a real network would
