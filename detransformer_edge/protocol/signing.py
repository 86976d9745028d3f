"""HMAC signatures on the leader's control messages (assignments, run plans).

Anyone who can publish on the broker could otherwise tell a device which weights to load or
which plan to run. With a shared cluster key (``cluster_key`` / ``cluster_key_file`` in the
agent config) the leader adds a ``sig`` object to each control message's JSON::

    {..., "sig": {"leader": "dev0", "term": 7, "seq": 1732650000123456, "mac": "<64 hex>"}}

``mac`` is HMAC-SHA256 over the canonical encoding of (topic, leader, term, seq, body), where
body is the message's JSON object without ``sig``, re-encoded with sorted keys and no spaces:
a message moved to another topic, re-stamped or edited no longer verifies. ``seq`` is a strictly
increasing number per signer (microseconds since the epoch, bumped on ties), so it also grows
across a leader restart. A verifier keeps the highest ``seq`` per (channel, leader, term) and the
newest term per channel and refuses anything at or below them: a replayed message is ignored.

Without a key the cluster runs unsigned (the agent warns at startup); a verifier with a key
refuses unsigned messages. The key itself never appears in logs, reprs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detransformer_edge.protocol.codec import ProtocolError, check_name, load_object

SIG_FIELD = "sig"
MIN_KEY_CHARS = 16  # shorter keys are accepted with a warning: a home LAN is not a bank
MAX_SIGNED_BYTES = 1 << 20  # control messages are small; never hash a flood
_DOMAIN = b"detransformer-edge/control/v1"
_TERMS_KEPT = 4  # replay windows kept per channel (older terms are refused outright)


class SignatureError(ProtocolError):
    """A control message is unsigned, forged, replayed or its signature is malformed."""


@dataclass(frozen=True)
class Stamp:
    """Who signed a control message, in which term, with which sequence number."""

    leader: str
    term: int
    seq: int


def key_bytes(key: str | bytes) -> bytes:
    """The HMAC key from the configured secret (ProtocolError if empty)."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ProtocolError("the cluster key is empty; set a long random secret or none at all")
    return raw


def key_is_weak(key: str | bytes) -> bool:
    return len(key) < MIN_KEY_CHARS


def _canonical_body(body: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"control message cannot be encoded canonically: {exc}") from None


def canonical(topic: str, stamp: Stamp, body: Mapping[str, Any]) -> bytes:
    """The bytes the MAC covers: domain, topic, leader, term, seq and body, length-prefixed."""
    parts = [_DOMAIN, topic.encode("utf-8"), stamp.leader.encode("utf-8"),
             str(stamp.term).encode("ascii"), str(stamp.seq).encode("ascii"), _canonical_body(body)]
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def _mac(key: bytes, topic: str, stamp: Stamp, body: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical(topic, stamp, body), hashlib.sha256).hexdigest()


def _load(payload: str | bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        return load_object(payload, what, max_bytes=MAX_SIGNED_BYTES)
    except SignatureError:
        raise
    except ProtocolError as exc:
        raise SignatureError(str(exc)) from None


class CommandSigner:
    """The leader side: stamps and signs control messages with the cluster key."""

    def __init__(self, key: str | bytes, leader: str,
                 clock_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self._key = key_bytes(key)
        self.leader = check_name(leader, "leader id")
        self._clock_us = clock_us
        self._last_seq = 0

    def __repr__(self) -> str:  # never show the key
        return f"CommandSigner(leader={self.leader!r})"

    def next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, self._clock_us())
        return self._last_seq

    def sign(self, topic: str, term: int, payload: str | bytes | bytearray) -> str:
        """``payload`` (a JSON object) with a ``sig`` for ``topic`` and ``term`` added."""
        body = _load(payload, "sign")
        body.pop(SIG_FIELD, None)
        stamp = Stamp(self.leader, term, self.next_seq())
        mac = _mac(self._key, topic, stamp, body)
        body[SIG_FIELD] = {"leader": stamp.leader, "term": stamp.term, "seq": stamp.seq, "mac": mac}
        return json.dumps(body, separators=(",", ":"), allow_nan=False)


class CommandVerifier:
    """The device side: checks MACs and refuses replays, per channel ("assign", "run")."""

    def __init__(self, key: str | bytes) -> None:
        self._key = key_bytes(key)
        self._last: dict[tuple[str, str, int], int] = {}  # (channel, leader, term) -> seq
        self._newest_term: dict[str, int] = {}

    def __repr__(self) -> str:
        return "CommandVerifier()"

    def verify(self, topic: str, payload: str | bytes | bytearray, channel: str) -> Stamp:
        """The stamp of a genuine, fresh message; SignatureError (with the reason) otherwise.

        Only a message that verifies advances the replay window."""
        body = _load(payload, channel)
        sig = body.pop(SIG_FIELD, None)
        if sig is None:
            raise SignatureError(f"{channel}: unsigned control message on {topic} "
                                 "(this cluster has a key; is the sender's cluster_key set?)")
        stamp = _stamp(sig, channel)
        mac = sig.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(
                mac.encode("ascii", "replace"), _mac(self._key, topic, stamp, body).encode("ascii")):
            raise SignatureError(f"{channel}: bad signature on {topic} from {stamp.leader!r} "
                                 "(forged, edited, or signed with a different cluster key)")
        newest = self._newest_term.get(channel, 0)
        if stamp.term < newest:
            raise SignatureError(f"{channel}: replayed or stale message on {topic}: term "
                                 f"{stamp.term} is older than term {newest}")
        last = self._last.get((channel, stamp.leader, stamp.term), 0)
        if stamp.seq <= last:
            raise SignatureError(f"{channel}: replayed message on {topic}: sequence {stamp.seq} "
                                 f"is not newer than {last} in term {stamp.term}")
        self._last[(channel, stamp.leader, stamp.term)] = stamp.seq
        if stamp.term > newest:
            self._newest_term[channel] = stamp.term
            stale = sorted({k[2] for k in self._last if k[0] == channel})[:-_TERMS_KEPT]
            for k in [k for k in self._last if k[0] == channel and k[2] in stale]:
                del self._last[k]
        return stamp


def _stamp(sig: Any, channel: str) -> Stamp:
    if not isinstance(sig, dict):
        raise SignatureError(f"{channel}: 'sig' must be an object")
    leader, term, seq = sig.get("leader"), sig.get("term"), sig.get("seq")
    if not isinstance(leader, str) or not leader or len(leader) > 64:
        raise SignatureError(f"{channel}: 'sig.leader' must be a device id")
    for name, v in (("term", term), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 63:
            raise SignatureError(f"{channel}: 'sig.{name}' must be a positive 63-bit integer")
    return Stamp(leader, term, seq)  # type: ignore[arg-type]


def from_config(key: str | None, me: str) -> tuple[CommandSigner | None, CommandVerifier | None]:
    """(signer, verifier) for an agent; (None, None) when the cluster has no key."""
    if key is None:
        return None, None
    return CommandSigner(key, me), CommandVerifier(key)


__all__ = [
    "CommandSigner",
    "CommandVerifier",
    "SignatureError",
    "Stamp",
    "canonical",
    "from_config",
    "key_is_weak",
]
