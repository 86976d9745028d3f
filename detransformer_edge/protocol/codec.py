"""The one codec of the control plane: strict JSON, typed field readers, the message base.

Every control message is a frozen dataclass deriving from :class:`Message`: ``to_dict`` /
``from_dict`` for its fields, ``to_json`` / ``from_json`` here, so every message is written and
read the same way. Parsing never returns ``None`` for a bad payload: it raises
:class:`ProtocolError` (a ``DetransformerError``) naming the schema and the offending field.
Activations and weight chunks carry bytes and use msgpack envelopes instead
(``transport/wire.py``, ``protocol/weights.py``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from detransformer_edge.errors import DetransformerError

# ids and cluster names become topic levels and HA object ids: keep them boring
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_JSON_BYTES = 4 << 20  # a cluster message is far smaller; refuse floods before parsing
MAX_INT = 2**53 - 1  # larger integers are not portable in JSON (I-JSON), and no term gets there


class ProtocolError(DetransformerError, ValueError):
    """A message on the wire does not match its topic's schema."""


def check_name(value: str, what: str) -> str:
    """Validate a device id / cluster name used as a topic level."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ProtocolError(
            f"{what} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return value


def check_publish_topic(value: str, what: str) -> str:
    """A topic a message may be published to: non-empty, no wildcards, no NUL."""
    if not isinstance(value, str) or not value or len(value) > 512:
        raise ProtocolError(f"{what} must be a non-empty topic string of at most 512 characters")
    if any(c in value for c in "+#\x00"):
        raise ProtocolError(f"{what} {value!r} must not contain the wildcards '+' or '#' or NUL")
    return value


# ---------------------------------------------------------------------------- field readers


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 overflows to inf: the service could never send it back
        raise ValueError(f"number {token[:20]} is out of range")
    return value


def strict_loads(payload: str | bytes | bytearray, schema: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Decode JSON the way the service writes it, or raise ProtocolError naming the schema.

    Python's json accepts NaN, Infinity and numbers that overflow to infinity; none of them is
    JSON (RFC 8259) and the service cannot send them back (``allow_nan=False``), so a message
    carrying one is refused here rather than failing later when a reply is encoded."""
    if not isinstance(payload, (str, bytes, bytearray)):
        raise ProtocolError(f"{schema}: payload must be text or bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{schema}: payload of {len(payload)} bytes is too large "
                            f"(at most {max_bytes})")
    try:
        text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, NaN, too many digits, too deep
        raise ProtocolError(f"{schema}: payload is not valid UTF-8 JSON ({exc})") from exc


def load_object(payload: str | bytes | bytearray, schema: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Decode a JSON object payload or raise ProtocolError naming the schema."""
    data = strict_loads(payload, schema, max_bytes)
    if not isinstance(data, dict):
        raise ProtocolError(f"{schema}: payload must be a JSON object, got {type(data).__name__}")
    return data


def missing_field(schema: str, key: str) -> ProtocolError:
    return ProtocolError(f"{schema}: missing required field {key!r}")


def req_str(d: Mapping[str, Any], key: str, schema: str, *, allow_empty: bool = False) -> str:
    if key not in d:
        raise missing_field(schema, key)
    v = d[key]
    if not isinstance(v, str) or (not allow_empty and not v):
        raise ProtocolError(f"{schema}: field {key!r} must be a non-empty string, got {v!r}")
    return v


def opt_str(d: Mapping[str, Any], key: str, schema: str, default: str = "") -> str:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ProtocolError(f"{schema}: field {key!r} must be a string, got {v!r}")
    return v


def req_num(d: Mapping[str, Any], key: str, schema: str, *, minimum: float | None = None) -> float:
    if key not in d:
        raise missing_field(schema, key)
    return check_num(d[key], key, schema, minimum)


def check_num(v: Any, key: str, schema: str, minimum: float | None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
        raise ProtocolError(f"{schema}: field {key!r} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ProtocolError(f"{schema}: field {key!r} must be >= {minimum}, got {v!r}")
    return float(v)


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def opt_num(d: Mapping[str, Any], key: str, schema: str, *, minimum: float | None = None) -> float | None:
    v = d.get(key)
    return None if v is None else check_num(v, key, schema, minimum)


def req_int(d: Mapping[str, Any], key: str, schema: str, *, minimum: int | None = None) -> int:
    if key not in d:
        raise missing_field(schema, key)
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_INT:
        raise ProtocolError(f"{schema}: field {key!r} must be an integer of at most 2^53 - 1, "
                            f"got {str(v)[:40]!r}")
    if minimum is not None and v < minimum:
        raise ProtocolError(f"{schema}: field {key!r} must be >= {minimum}, got {v!r}")
    return v


def req_bool(d: Mapping[str, Any], key: str, schema: str) -> bool:
    if key not in d:
        raise missing_field(schema, key)
    v = d[key]
    if not isinstance(v, bool):
        raise ProtocolError(f"{schema}: field {key!r} must be true or false, got {v!r}")
    return v


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON; refuses NaN and Infinity (they are not JSON)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


class Message:
    """Base of wire messages: frozen dataclasses with `to_json` / `from_json`."""

    SCHEMA: ClassVar[str] = "message"

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        return cls.from_dict(load_object(payload, cls.SCHEMA))


