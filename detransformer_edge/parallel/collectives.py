"""Collectives written once over :class:`~detransformer_edge.transport.base.Transport`.

Every call takes ``(transport, group, req, step, tensor, ...)`` where ``group`` is the ordered
list of participating device ids (it must contain ``transport.device_id``), and returns a
float32 tensor of the same kind as the input (numpy in, numpy out; torch in, torch out on the
input's device). Each call is addressed by ``(req, step)``, so concurrent requests on the same
devices never mix; within one request every collective call needs its own ``step`` (a layer
index, ``"L3.ag"``...). ``all_reduce`` uses the sub-steps ``<step>.rs`` and ``<step>.ag``.

Costs, in messages per device (the broker is what makes fan-out cheap):

==============  =====================================  ==========================
collective      uploads per device                     downloads per device
==============  =====================================  ==========================
broadcast       root 1, others 0                       root 0, others 1
gather          others 1, root 0                       root n-1
scatter         root n-1, others 0                     others 1
all_gather      1 (one fan-out publish)                n-1
all_reduce      n-1 (reduce-scatter) + 1 (all-gather)  2(n-1)
==============  =====================================  ==========================

A group of one device sends nothing and returns the input as float32.

Lossy wire dtypes (float16, int8): ``broadcast``, ``all_gather`` and ``all_reduce`` pass the
device's *own* contribution through the same quantiser locally, so every device of the
group ends with bitwise-identical tensors and replicas of the coupled layer cannot drift.

``timeout`` is the budget of the whole call, not of each message. ``timeline`` (optional)
records the call's ``encode``, ``publish``, ``wait`` and ``decode`` spans (``parallel/trace.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from detransformer_edge.parallel.trace import NULL_TIMELINE, Timeline
from detransformer_edge.transport.base import Transport, normalise_key
from detransformer_edge.transport.errors import CollectiveError, WireError
from detransformer_edge.transport.wire import (
    WIRE_DTYPES,
    WireDtype,
    decode_tensor,
    encode_tensor,
)

__all__ = [
    "all_gather",
    "all_reduce",
    "broadcast",
    "gather",
    "recv",
    "scatter",
    "send",
    "split_widths",
]

Tensor = Any  # np.ndarray or torch.Tensor; torch is only imported when the input is one
DEFAULT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- helpers


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_f32(x: Tensor) -> np.ndarray:
    if _is_torch(x):
        return cast(np.ndarray, x.detach().cpu().float().numpy())
    return np.asarray(x, dtype=np.float32)


def _like(arr: np.ndarray, like: Tensor | None) -> Tensor:
    """Return ``arr`` as the same kind of tensor as ``like`` (torch stays on its device)."""
    if like is not None and _is_torch(like):
        import torch

        out = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        return out.to(like.device)
    return arr


def _check_group(transport: Transport, group: Sequence[str], root: str | None = None) -> int:
    """Validate the group and return this device's rank in it."""
    members = list(group)
    if not members:
        raise CollectiveError("group is empty")
    if len(set(members)) != len(members):
        raise CollectiveError(f"group has duplicate devices: {members}")
    if transport.device_id not in members:
        raise CollectiveError(f"device {transport.device_id!r} is not in group {members}")
    if root is not None and root not in members:
        raise CollectiveError(f"root {root!r} is not in group {members}")
    return members.index(transport.device_id)


def _check_dtype(wire_dtype: str) -> None:
    if wire_dtype not in WIRE_DTYPES:
        raise CollectiveError(
            f"unknown wire dtype {wire_dtype!r}; choose one of {sorted(WIRE_DTYPES)}"
        )


def _as_received(x: np.ndarray, payload: bytes, wire_dtype: str) -> np.ndarray:
    """What receivers will see of ``x`` sent as ``payload``: identity for float32, the decoded
    payload otherwise (the device's own copy goes through the same quantiser)."""
    if wire_dtype == "float32":
        return x
    return decode_tensor(payload).array


async def _encode_and_send(transport: Transport, dsts: list[str], req: str, step: str, x: np.ndarray,
                           wire_dtype: str, tl: Timeline) -> bytes:
    """Encode once and publish to ``dsts`` (one receiver: a send; several: one fan-out)."""
    with tl.span("encode", step):
        payload = encode_tensor(x, req, step, transport.device_id, wire_dtype)
    with tl.span("publish", step, len(payload), len(dsts)):
        if len(dsts) == 1:
            await transport.send(dsts[0], (req, step), payload)
        else:
            await transport.publish(dsts, (req, step), payload)
    return payload


class _Deadline:
    """One time budget shared by every receive of a collective call."""

    def __init__(self, timeout: float | None):
        self._end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


async def _recv_array(
    transport: Transport, src: str, req: str, step: str, deadline: _Deadline, tl: Timeline = NULL_TIMELINE
) -> np.ndarray:
    with tl.span("wait", f"{step} from {src}"):
        payload = await transport.recv(src, (req, step), timeout=deadline.left())
    with tl.span("decode", step):
        msg = decode_tensor(payload)
    if msg.req != req or str(msg.step) != step or msg.src != src:
        raise WireError(
            f"envelope says {(msg.req, msg.step, msg.src)} but arrived as {(req, step, src)}"
        )
    return msg.array


def split_widths(total: int, parts: int) -> list[int]:
    """Even split of ``total`` into ``parts`` widths, the first ones one larger (numpy's rule)."""
    if parts < 1:
        raise CollectiveError(f"cannot split into {parts} parts")
    q, r = divmod(total, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def _concat(chunks: list[np.ndarray], axis: int, group: Sequence[str]) -> np.ndarray:
    ndims = {c.ndim for c in chunks}
    if len(ndims) != 1:
        raise CollectiveError(
            f"chunks of different ranks {[c.shape for c in chunks]} from {list(group)}"
        )
    ndim = ndims.pop()
    if ndim == 0:
        raise CollectiveError("cannot concatenate scalars; send at least 1-D chunks")
    ax = axis % ndim
    others = {c.shape[:ax] + c.shape[ax + 1 :] for c in chunks}
    if len(others) != 1:
        raise CollectiveError(
            f"chunks {[c.shape for c in chunks]} from {list(group)} differ outside axis {axis}"
        )
    return np.concatenate(chunks, axis=ax)


# --------------------------------------------------------------------------- point to point


async def send(
    transport: Transport,
    dst: str,
    req: str,
    step: str | int,
    tensor: Tensor,
    wire_dtype: WireDtype = "float32",
    *,
    timeline: Timeline = NULL_TIMELINE,
) -> None:
    """Send one tensor to ``dst``; pair it with :func:`recv` on the other side."""
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    if dst == transport.device_id:
        raise CollectiveError(f"device {dst!r} cannot send to itself")
    await _encode_and_send(transport, [dst], req, step_s, _to_f32(tensor), wire_dtype, timeline)


async def recv(
    transport: Transport,
    src: str,
    req: str,
    step: str | int,
    *,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    like: Tensor | None = None,
    timeline: Timeline = NULL_TIMELINE,
) -> Tensor:
    """Receive the tensor ``(req, step)`` from ``src`` as float32 (torch if ``like`` is torch)."""
    req, step_s = normalise_key((req, step))
    arr = await _recv_array(transport, src, req, step_s, _Deadline(timeout), timeline)
    return _like(arr, like)


# --------------------------------------------------------------------------- collectives


async def broadcast(
    transport: Transport,
    group: Sequence[str],
    req: str,
    step: str | int,
    tensor: Tensor | None,
    wire_dtype: WireDtype = "float32",
    *,
    root: str,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    timeline: Timeline = NULL_TIMELINE,
) -> Tensor:
    """Root's ``tensor`` to every device of ``group`` with ONE publish; others pass ``None``."""
    _check_group(transport, group, root)
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    me = transport.device_id
    if me == root:
        if tensor is None:
            raise CollectiveError(f"root {root!r} must pass the tensor to broadcast")
        x = _to_f32(tensor)
        others = [d for d in group if d != me]
        if others:
            payload = await _encode_and_send(transport, others, req, step_s, x, wire_dtype, timeline)
            x = _as_received(x, payload, wire_dtype)
        return _like(x, tensor)
    arr = await _recv_array(transport, root, req, step_s, _Deadline(timeout), timeline)
    return _like(arr, tensor)


async def gather(
    transport: Transport,
    group: Sequence[str],
    req: str,
    step: str | int,
    tensor: Tensor,
    wire_dtype: WireDtype = "float32",
    *,
    root: str,
    axis: int = -1,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> Tensor | None:
    """Concatenate every device's chunk along ``axis`` in group order on ``root``.

    Chunks may differ in width along ``axis`` (uneven sub-block assignment). Returns the
    full tensor on ``root`` and ``None`` elsewhere.
    """
    _check_group(transport, group, root)
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    me = transport.device_id
    x = _to_f32(tensor)
    if me != root:
        payload = encode_tensor(x, req, step_s, me, wire_dtype)
        await transport.send(root, (req, step_s), payload)
        return None
    deadline = _Deadline(timeout)
    chunks = [
        x if d == me else await _recv_array(transport, d, req, step_s, deadline) for d in group
    ]
    return _like(_concat(chunks, axis, group), tensor)


async def scatter(
    transport: Transport,
    group: Sequence[str],
    req: str,
    step: str | int,
    tensor: Tensor | None,
    wire_dtype: WireDtype = "float32",
    *,
    root: str,
    widths: Sequence[int] | None = None,
    axis: int = -1,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> Tensor:
    """Split root's ``tensor`` along ``axis`` by ``widths`` (default: even) and send part i to
    device i of ``group``; every device returns its own part. Non-roots pass ``None``."""
    _check_group(transport, group, root)
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    me = transport.device_id
    if me != root:
        arr = await _recv_array(transport, root, req, step_s, _Deadline(timeout))
        return _like(arr, tensor)
    if tensor is None:
        raise CollectiveError(f"root {root!r} must pass the tensor to scatter")
    x = _to_f32(tensor)
    if x.ndim == 0:
        raise CollectiveError("cannot scatter a scalar")
    ax = axis % x.ndim
    w = list(widths) if widths is not None else split_widths(x.shape[ax], len(group))
    if len(w) != len(group) or any(v < 0 for v in w) or sum(w) != x.shape[ax]:
        raise CollectiveError(
            f"widths {w} must be {len(group)} non-negative ints summing to {x.shape[ax]}"
        )
    parts = np.split(x, np.cumsum(w)[:-1], axis=ax)
    mine: np.ndarray | None = None
    for d, part in zip(group, parts, strict=True):
        if d == me:
            mine = part
            continue
        payload = encode_tensor(part, req, step_s, me, wire_dtype)
        await transport.send(d, (req, step_s), payload)
    assert mine is not None
    return _like(np.ascontiguousarray(mine), tensor)


async def all_gather(
    transport: Transport,
    group: Sequence[str],
    req: str,
    step: str | int,
    tensor: Tensor,
    wire_dtype: WireDtype = "float32",
    *,
    axis: int = -1,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    timeline: Timeline = NULL_TIMELINE,
) -> Tensor:
    """Every device's chunk, concatenated along ``axis`` in group order, on every device.

    Each device publishes its chunk once to the rest of the group (broker fan-out), so a
    device uploads 1 message and downloads n-1. Chunk widths may differ (e.g. 8 sub-blocks
    over 3 devices as 4/2/2); all other dimensions must agree.
    """
    _check_group(transport, group)
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    me = transport.device_id
    x = _to_f32(tensor)
    if x.ndim == 0:
        raise CollectiveError("all_gather needs at least 1-D chunks")
    if len(group) == 1:
        return _like(x, tensor)
    others = [d for d in group if d != me]
    payload = await _encode_and_send(transport, others, req, step_s, x, wire_dtype, timeline)
    own = _as_received(x, payload, wire_dtype)
    deadline = _Deadline(timeout)
    chunks = [
        own if d == me else await _recv_array(transport, d, req, step_s, deadline, timeline) for d in group
    ]
    with timeline.span("decode", step_s):
        return _like(_concat(chunks, axis, group), tensor)


async def all_reduce(
    transport: Transport,
    group: Sequence[str],
    req: str,
    step: str | int,
    tensor: Tensor,
    wire_dtype: WireDtype = "float32",
    *,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    timeline: Timeline = NULL_TIMELINE,
) -> Tensor:
    """Element-wise sum over the group, as reduce-scatter then all-gather.

    The last axis is split into n parts (even split; rows stay intact so int8 keeps per-row
    scales); device i sums part i from everyone (sub-step ``<step>.rs``, in group order, so
    the result does not depend on arrival order), then the reduced parts are all-gathered
    (sub-step ``<step>.ag``). Each device moves 2(n-1)/n of the tensor instead of n-1 times
    it, which is why this beats "everyone broadcasts everything" for n > 2.
    """
    rank = _check_group(transport, group)
    _check_dtype(wire_dtype)
    req, step_s = normalise_key((req, step))
    me = transport.device_id
    x = _to_f32(tensor)
    if len(group) == 1:
        return _like(x, tensor)
    flat = x.reshape(1) if x.ndim == 0 else x  # a scalar reduces as a 1-element vector
    widths = split_widths(flat.shape[-1], len(group))
    parts = np.split(flat, np.cumsum(widths)[:-1], axis=-1)
    rs, ag = f"{step_s}.rs", f"{step_s}.ag"
    normalise_key((req, ag))  # fail early if the sub-step is too long
    for d, part in zip(group, parts, strict=True):
        if d != me:
            await _encode_and_send(transport, [d], req, rs, np.ascontiguousarray(part), wire_dtype, timeline)
    deadline = _Deadline(timeout)
    acc = np.zeros_like(parts[rank])
    for d in group:
        if d == me:
            acc += parts[rank]
            continue
        got = await _recv_array(transport, d, req, rs, deadline, timeline)
        if got.shape != acc.shape:
            raise CollectiveError(
                f"all_reduce: {d!r} sent part {got.shape}, expected {acc.shape}; "
                "every device must pass the same shape"
            )
        acc += got
    remaining = deadline.left()
    full = await all_gather(transport, group, req, ag, acc, wire_dtype, axis=-1, timeout=remaining,
                            timeline=timeline)
    return _like(full.reshape(x.shape), tensor)
