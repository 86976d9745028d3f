"""The ``Transport`` seam: keyed point-to-point and fan-out messages between devices.

API (all a collective needs; the executor calls collectives, not this)::

    async with SomeTransport(device_id, ...) as t:          # start() / close()
        await t.send(dst, (req, step), payload)              # one message to one device
        await t.publish([d1, d2], (req, step), payload)      # ONE upload, fanned out to d1, d2
        data = await t.recv(src, (req, step), timeout=5.0)   # wait for exactly that message
        t.cancel(req)                                        # free buffers, wake waiters
        t.stats                                              # TransportStats counters

Why it looks like this:

* Every message is addressed by the triple ``(request id, step, sender)``. A receive waits for
  that exact triple, so three requests interleaved on the same devices never mix, and the
  order in which messages arrive does not matter.
* Messages that arrive before anyone asked for them are buffered in a :class:`Mailbox`
  (bounded in count and bytes, with a time-to-live). On overflow the *new* message is dropped
  and its key remembered, so a later ``recv`` for it fails at once with
  :class:`TransportOverflow` instead of waiting for a timeout.
* ``publish`` takes the receivers, not a topic: over MQTT it becomes one publish to a topic all
  receivers subscribe to (the broker fans out), so an all-gather costs each device one upload
  instead of n-1. The memory transport delivers it to each receiver directly.
* ``cancel(req)`` is the single way to end a request: it frees what is buffered for it, makes
  pending receives raise :class:`RequestCancelled`, and drops late messages for it. Call it
  also when a request finishes normally; request ids must therefore never be reused.
* The step is normalised with ``str()``: ``(req, 3)`` and ``(req, "3")`` are the same key.
  Request ids and steps must match ``[A-Za-z0-9_.:-]`` (they become MQTT topic levels).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from detransformer_edge.transport.errors import (
    RequestCancelled,
    TransportClosed,
    TransportError,
    TransportOverflow,
    TransportTimeout,
)

__all__ = [
    "Mailbox",
    "MailboxLimits",
    "MessageKey",
    "Transport",
    "TransportStats",
    "check_device_id",
    "normalise_key",
]

log = logging.getLogger(__name__)

MessageKey = tuple[str, str | int]
"""``(request id, step)``; the sender is a separate argument of ``recv``."""

_DEVICE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_device_id(device_id: str) -> str:
    """Device ids become topic levels and are joined with commas, so keep them plain."""
    if not isinstance(device_id, str) or not _DEVICE_RE.match(device_id):
        raise TransportError(
            f"invalid device id {device_id!r}: use 1-64 chars of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return device_id


def normalise_key(key: MessageKey) -> tuple[str, str]:
    """Validate ``(req, step)`` and return it with the step as a string."""
    if not isinstance(key, tuple) or len(key) != 2:
        raise TransportError(f"message key must be a (request id, step) tuple, got {key!r}")
    req, step = key
    if isinstance(step, bool) or not isinstance(step, str | int):
        raise TransportError(f"step must be a str or int, got {step!r}")
    step_s = str(step)
    for name, value in (("request id", req), ("step", step_s)):
        if not isinstance(value, str) or not _TOKEN_RE.match(value):
            raise TransportError(f"invalid {name} {value!r}: use 1-128 chars of [A-Za-z0-9_.:-]")
    return req, step_s


@dataclass(frozen=True, slots=True)
class MailboxLimits:
    """Bounds of the early-arrival buffer; defaults fit a Raspberry Pi with room to spare."""

    max_messages: int = 4096  # thousands of in-flight activations is far beyond a real plan
    max_bytes: int = 512 * 1024 * 1024  # a few requests' worth of full hidden states
    ttl_s: float = 120.0  # unclaimed messages (e.g. of a request this device left) expire
    remember_cancelled: int = 4096  # cancelled request ids whose late messages are dropped

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.ttl_s <= 0:
            raise TransportError(f"mailbox limits must be positive: {self}")


@dataclass(slots=True)
class TransportStats:
    """Counters per device; uploads count a fan-out publish once, as the broker sees it."""

    msgs_sent: int = 0
    bytes_sent: int = 0
    msgs_received: int = 0
    bytes_received: int = 0
    dropped_overflow: int = 0
    dropped_unwanted: int = 0  # cancelled requests, own echoes, not addressed to us


_FullKey = tuple[str, str, str]  # (req, step, src)


@dataclass(slots=True)
class _Buffered:
    payload: bytes
    arrived: float


class Mailbox:
    """Matches arriving messages with receives by ``(req, step, src)``; bounded.

    Not thread-safe: every call must come from the event loop that owns the transport.
    """

    def __init__(
        self,
        limits: MailboxLimits | None = None,
        stats: TransportStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = limits or MailboxLimits()
        self._clock = clock  # injectable so TTL tests need no sleeping or global patching
        self.stats = stats or TransportStats()
        self._buf: OrderedDict[_FullKey, _Buffered] = OrderedDict()
        self._bytes = 0
        self._waiters: dict[_FullKey, asyncio.Future[bytes]] = {}
        self._dropped: OrderedDict[_FullKey, None] = OrderedDict()
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        self._closed: BaseException | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def deliver(self, req: str, step: str, src: str, payload: bytes) -> bool:
        """Hand an arriving message over; returns False if it was dropped."""
        key = (req, step, src)
        if req in self._cancelled or self._closed is not None:
            self.stats.dropped_unwanted += 1
            return False
        self.stats.msgs_received += 1
        self.stats.bytes_received += len(payload)
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)
            return True
        self._expire()
        old = self._buf.pop(key, None)
        if old is not None:  # a resend replaces the earlier copy
            self._bytes -= len(old.payload)
        lim = self.limits
        if len(self._buf) + 1 > lim.max_messages or self._bytes + len(payload) > lim.max_bytes:
            self.stats.dropped_overflow += 1
            self._remember_dropped(key)
            log.warning(
                "mailbox full (%d msgs, %d bytes): dropped %s from %s",
                len(self._buf),
                self._bytes,
                (req, step),
                src,
            )
            return False
        self._buf[key] = _Buffered(payload, self._clock())
        self._bytes += len(payload)
        return True

    async def get(self, req: str, step: str, src: str, timeout: float | None) -> bytes:
        """Wait for the message ``(req, step, src)``; typed errors for every way to fail."""
        key = (req, step, src)
        item = self._buf.pop(key, None)
        if item is not None:
            self._bytes -= len(item.payload)
            return item.payload
        if self._closed is not None:
            raise TransportClosed(f"transport closed: {self._closed}")
        if req in self._cancelled:
            raise RequestCancelled(f"request {req!r} was cancelled: {self._cancelled[req]}")
        if key in self._dropped:
            raise TransportOverflow(f"message {(req, step)} from {src!r} was dropped: buffer full")
        if key in self._waiters:
            raise TransportError(
                f"two receives wait for the same message {(req, step)} from {src!r}"
            )
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise TransportTimeout(f"no message {(req, step)} from {src!r} within {timeout} s", src) from None
        finally:
            if self._waiters.get(key) is fut:
                del self._waiters[key]

    def cancel(self, req: str, reason: str = "cancelled") -> int:
        """Free buffered messages of ``req``, fail its waiters, drop its late messages."""
        self._cancelled[req] = reason
        self._cancelled.move_to_end(req)
        while len(self._cancelled) > self.limits.remember_cancelled:
            self._cancelled.popitem(last=False)
        freed = 0
        for key in [k for k in self._buf if k[0] == req]:
            self._bytes -= len(self._buf.pop(key).payload)
            freed += 1
        for key in [k for k in self._waiters if k[0] == req]:
            fut = self._waiters.pop(key)
            if not fut.done():
                fut.set_exception(RequestCancelled(f"request {req!r} was cancelled: {reason}"))
        for key in [k for k in self._dropped if k[0] == req]:
            del self._dropped[key]
        return freed

    def interrupt(self, error: BaseException) -> None:
        """Fail every pending receive with ``error`` and drop buffered messages, but stay open:
        the connection was lost and is being re-established (their requests are lost anyway)."""
        self._buf.clear()
        self._bytes = 0
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)

    def close(self, error: BaseException) -> None:
        """Fail every pending receive with ``error`` (connection lost, transport closed)."""
        self._closed = error
        self._buf.clear()
        self._bytes = 0
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)

    def _expire(self) -> None:
        deadline = self._clock() - self.limits.ttl_s
        while self._buf:
            key, item = next(iter(self._buf.items()))
            if item.arrived > deadline:
                break
            del self._buf[key]
            self._bytes -= len(item.payload)
            log.debug("expired unclaimed message %s", key)

    def _remember_dropped(self, key: _FullKey) -> None:
        self._dropped[key] = None
        while len(self._dropped) > self.limits.max_messages:
            self._dropped.popitem(last=False)


class Transport(ABC):
    """One device's endpoint. Subclasses implement ``_start``, ``_close``, ``_send``."""

    def __init__(self, device_id: str, limits: MailboxLimits | None = None):
        self._device_id = check_device_id(device_id)
        self.stats = TransportStats()
        self._mailbox = Mailbox(limits, self.stats)
        self._started = False
        self._closed = False

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    async def start(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport {self.device_id!r} was closed; make a new one")
        if not self._started:
            await self._start()
            self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mailbox.close(TransportClosed(f"transport {self.device_id!r} closed"))
        if self._started:
            await self._close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, dst: str, key: MessageKey, payload: bytes) -> None:
        """Send ``payload`` to one device, addressed by ``key`` and this device as sender."""
        await self.publish([dst], key, payload)

    async def publish(self, dsts: Sequence[str], key: MessageKey, payload: bytes) -> None:
        """Send ``payload`` once to every device in ``dsts`` (one upload; fan-out elsewhere)."""
        self._check_open()
        req, step = normalise_key(key)
        targets = [check_device_id(d) for d in dsts if d != self.device_id]
        if not targets:
            return
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        await self._send(targets, req, step, payload)
        self.stats.msgs_sent += 1
        self.stats.bytes_sent += len(payload)

    async def recv(self, src: str, key: MessageKey, timeout: float | None = 30.0) -> bytes:
        """Wait for the message ``key`` from ``src``.

        Raises :class:`TransportTimeout`, :class:`RequestCancelled`,
        :class:`TransportOverflow` or :class:`TransportClosed`.
        """
        self._check_open()
        req, step = normalise_key(key)
        return await self._mailbox.get(req, step, check_device_id(src), timeout)

    def cancel(self, request_id: str, reason: str = "cancelled") -> int:
        """End ``request_id`` on this device; returns how many buffered messages were freed."""
        return self._mailbox.cancel(request_id, reason)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport {self.device_id!r} is closed")
        if not self._started:
            raise TransportClosed(f"transport {self.device_id!r} not started; use `async with`")

    @abstractmethod
    async def _start(self) -> None:
        """Connect and subscribe; after it returns, messages addressed to us are delivered."""

    @abstractmethod
    async def _close(self) -> None:
        """Disconnect and cancel every task this transport started."""

    @abstractmethod
    async def _send(self, dsts: list[str], req: str, step: str, payload: bytes) -> None:
        """Deliver ``payload`` to ``dsts`` (never empty, never containing ourselves)."""
