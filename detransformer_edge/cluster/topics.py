"""Typed cluster topics: every MQTT topic string is bound to the message schema it carries.

Publishing goes through `TopicFamily.format(...)` + `Message.to_json()`, parsing through
`TopicFamily.match(topic)` + `Message.from_json(payload)`, so the two can't drift apart.
Parsing never returns `None` for a bad payload: it raises `ProtocolError` (a
`DetransformerError`) whose message names the topic schema and the offending field.

Prefix `P = detransformer/<cluster>`; see docs/API.md for the full table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

from detransformer_edge.errors import DetransformerError

ROOT = "detransformer"
PRESENCE_ONLINE = "online"
PRESENCE_OFFLINE = "offline"
# ids and cluster names become topic levels and HA object ids: keep them boring
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REQUEST_OPS = ("generate", "embed")
ROLES = ("leader", "follower", "starting")
ERROR_CODES = ("bad_request", "not_leader", "busy", "timeout", "unsupported", "internal")
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


def _missing(schema: str, key: str) -> ProtocolError:
    return ProtocolError(f"{schema}: missing required field {key!r}")


def req_str(d: Mapping[str, Any], key: str, schema: str, *, allow_empty: bool = False) -> str:
    if key not in d:
        raise _missing(schema, key)
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
        raise _missing(schema, key)
    return _num(d[key], key, schema, minimum)


def _num(v: Any, key: str, schema: str, minimum: float | None) -> float:
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
    return None if v is None else _num(v, key, schema, minimum)


def req_int(d: Mapping[str, Any], key: str, schema: str, *, minimum: int | None = None) -> int:
    if key not in d:
        raise _missing(schema, key)
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_INT:
        raise ProtocolError(f"{schema}: field {key!r} must be an integer of at most 2^53 - 1, "
                            f"got {str(v)[:40]!r}")
    if minimum is not None and v < minimum:
        raise ProtocolError(f"{schema}: field {key!r} must be >= {minimum}, got {v!r}")
    return v


def req_bool(d: Mapping[str, Any], key: str, schema: str) -> bool:
    if key not in d:
        raise _missing(schema, key)
    v = d[key]
    if not isinstance(v, bool):
        raise ProtocolError(f"{schema}: field {key!r} must be true or false, got {v!r}")
    return v


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------------------- messages


class Message:
    """Base of wire messages: frozen dataclasses with `to_json` / `from_json`."""

    SCHEMA: ClassVar[str] = "message"

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        return cls.from_dict(load_object(payload, cls.SCHEMA))


@dataclass(frozen=True)
class Presence(Message):
    """`P/devices/<id>/presence`: plain text `online` / `offline` (retained; LWT `offline`).

    Plain text rather than JSON so Home Assistant availability can read it directly."""

    SCHEMA: ClassVar[str] = "presence"
    online: bool

    def to_json(self) -> str:
        return PRESENCE_ONLINE if self.online else PRESENCE_OFFLINE

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray) -> Self:
        try:
            text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"presence: payload is not UTF-8 ({exc})") from exc
        if text == PRESENCE_ONLINE:
            return cls(True)
        if text == PRESENCE_OFFLINE:
            return cls(False)
        raise ProtocolError(f"presence: payload must be 'online' or 'offline', got {text[:40]!r}")


@dataclass(frozen=True)
class ProfileRecord(Message):
    """`P/devices/<id>/profile` (retained): what a device can do; the election ranks by `score`.

    `planner` carries the full planner profile (`planner.profile.profile_to_dict`) so the leader
    can plan with `profile_from_dict(record.planner)`; the flat fields are for dashboards, Home
    Assistant and the election."""

    SCHEMA: ClassVar[str] = "profile"
    id: str
    name: str  # human-readable device name
    device_class: str  # board / profile kind, e.g. "raspberry-pi-4b", "n100"
    gflops: float  # sustained fp32 matmul throughput
    mem_mb: float  # memory the agent may use
    link_mbit: float  # the device's link to the broker
    score: float  # capability score; higher leads (planner DeviceProfile.capability_score)
    version: str = ""  # agent software version
    planner: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.id, "device id")
        for key in ("gflops", "mem_mb", "link_mbit", "score"):
            _num(getattr(self, key), key, self.SCHEMA, 0.0)

    @classmethod
    def from_device_profile(
        cls, device_id: str, profile: Any, *, name: str = "", device_class: str = "", version: str = ""
    ) -> ProfileRecord:
        """Build the record from a `detransformer_edge.planner.profile.DeviceProfile`."""
        from dataclasses import replace

        from detransformer_edge.planner.profile import profile_to_dict

        own = replace(profile, name=device_id)  # the planner names devices by their id
        return cls(
            id=device_id,
            name=name or device_id,
            device_class=device_class or profile.name,
            gflops=float(profile.gflops),
            mem_mb=float(profile.ram_mb),
            link_mbit=float(profile.link_mbit),
            score=float(profile.capability_score),
            version=version,
            planner=profile_to_dict(own),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "device_class": self.device_class,
            "gflops": self.gflops,
            "mem_mb": self.mem_mb,
            "link_mbit": self.link_mbit,
            "score": self.score,
            "version": self.version,
            "planner": dict(self.planner),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        planner = d.get("planner", {})
        if not isinstance(planner, dict):
            raise ProtocolError(f"{s}: field 'planner' must be a JSON object")
        return cls(
            id=req_str(d, "id", s),
            name=opt_str(d, "name", s) or req_str(d, "id", s),
            device_class=opt_str(d, "device_class", s, "unknown") or "unknown",
            gflops=req_num(d, "gflops", s, minimum=0),
            mem_mb=req_num(d, "mem_mb", s, minimum=0),
            link_mbit=req_num(d, "link_mbit", s, minimum=0),
            score=req_num(d, "score", s, minimum=0),
            version=opt_str(d, "version", s),
            planner=planner,
        )


def _sub_blocks(v: Any, schema: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list):
        raise ProtocolError(f"{schema}: field 'sub_blocks' must be a list of [block, sub_block]")
    out: list[tuple[int, int]] = []
    for item in v:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item)
        ):
            raise ProtocolError(
                f"{schema}: each sub_blocks entry must be [block, sub_block] of non-negative "
                f"integers, got {item!r}"
            )
        out.append((item[0], item[1]))
    return tuple(out)


@dataclass(frozen=True)
class DeviceStatus(Message):
    """`P/devices/<id>/status` (periodic, retained so dashboards start with a value)."""

    SCHEMA: ClassVar[str] = "status"
    id: str
    ready: bool  # weights for the current placement are loaded
    role: str  # "leader" | "follower" | "starting"
    load: float  # CPU load, 0..1 of this device's budget
    rss_mb: float
    placement_version: int  # 0 = no placement yet
    sub_blocks: tuple[tuple[int, int], ...] = ()  # assigned (block, sub_block) pairs
    last_latency_ms: float | None = None  # wall time of the last request this device served
    ts: float = 0.0  # unix time of the sample
    weights_percent: float | None = None  # streaming weights from the leader: percent received

    def __post_init__(self) -> None:
        check_name(self.id, "device id")
        if self.role not in ROLES:
            raise ProtocolError(f"status: role must be one of {ROLES}, got {self.role!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ready": self.ready,
            "role": self.role,
            "load": self.load,
            "rss_mb": self.rss_mb,
            "placement_version": self.placement_version,
            "sub_blocks": [list(p) for p in self.sub_blocks],
            "last_latency_ms": self.last_latency_ms,
            "ts": self.ts,
            **({} if self.weights_percent is None else {"weights_percent": self.weights_percent}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(
            id=req_str(d, "id", s),
            ready=req_bool(d, "ready", s),
            role=req_str(d, "role", s),
            load=req_num(d, "load", s, minimum=0),
            rss_mb=req_num(d, "rss_mb", s, minimum=0),
            placement_version=req_int(d, "placement_version", s, minimum=0),
            sub_blocks=_sub_blocks(d.get("sub_blocks", []), s),
            last_latency_ms=opt_num(d, "last_latency_ms", s, minimum=0),
            ts=opt_num(d, "ts", s) or 0.0,
            weights_percent=opt_num(d, "weights_percent", s, minimum=0),
        )


@dataclass(frozen=True)
class LeaderLease(Message):
    """`P/leader` (retained): the current leadership lease.

    `session` is a random token per MQTT connection of the holder: a leader that reconnects is a
    new session and must claim a new term; it never inherits its old record."""

    SCHEMA: ClassVar[str] = "leader"
    id: str
    term: int
    expires_at: float  # unix time, holder's clock
    lease_s: float  # lease length; followers also bound expiry by receive time + lease_s
    session: str

    def __post_init__(self) -> None:
        check_name(self.id, "leader id")
        if self.term < 1:
            raise ProtocolError(f"leader: term must be >= 1, got {self.term}")
        if not (self.lease_s > 0):
            raise ProtocolError(f"leader: lease_s must be > 0, got {self.lease_s}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "term": self.term,
            "expires_at": self.expires_at,
            "lease_s": self.lease_s,
            "session": self.session,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        return cls(
            id=req_str(d, "id", s),
            term=req_int(d, "term", s, minimum=1),
            expires_at=req_num(d, "expires_at", s),
            lease_s=req_num(d, "lease_s", s, minimum=0.001),
            session=req_str(d, "session", s),
        )


@dataclass(frozen=True)
class Assignment(Message):
    """`P/assign/<id>` (leader → agent, QoS 1): what the device must hold for a placement.

    `leader` and `term` fence it: agents drop assignments whose term is older than the lease
    they follow (`election.accepts_command`). `body` is the planner's placement for this device,
    opaque to the cluster layer."""

    SCHEMA: ClassVar[str] = "assign"
    leader: str
    term: int
    placement_version: int
    body: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "term": self.term,
            "placement_version": self.placement_version,
            "body": dict(self.body),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        body = d.get("body", {})
        if not isinstance(body, dict):
            raise ProtocolError(f"{s}: field 'body' must be a JSON object")
        return cls(
            leader=req_str(d, "leader", s),
            term=req_int(d, "term", s, minimum=1),
            placement_version=req_int(d, "placement_version", s, minimum=0),
            body=body,
        )


_PARAM_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class Request(Message):
    """`P/request` (client → leader, QoS 1): a general request.

    `op` "generate": `input` is the prompt string; params e.g. max_new_tokens, temperature.
    `op` "embed": `input` is a string or a list of strings. The reply goes to `reply_to` with
    the same `id` (on MQTT v5 the ResponseTopic / CorrelationData properties are honoured too)."""

    SCHEMA: ClassVar[str] = "request"
    id: str
    reply_to: str
    op: str
    input: str | tuple[str, ...]
    params: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id or len(self.id) > 128:
            raise ProtocolError("request: 'id' must be a non-empty string of at most 128 characters")
        check_publish_topic(self.reply_to, "request: 'reply_to'")
        if self.op not in REQUEST_OPS:
            raise ProtocolError(f"request: 'op' must be one of {REQUEST_OPS}, got {self.op!r}")
        if self.op == "generate" and not isinstance(self.input, str):
            raise ProtocolError("request: 'generate' takes a single prompt string as 'input'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reply_to": self.reply_to,
            "op": self.op,
            "input": self.input if isinstance(self.input, str) else list(self.input),
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        raw = d.get("input")
        inp: str | tuple[str, ...]
        if isinstance(raw, str):
            inp = raw
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            inp = tuple(raw)
        elif "input" not in d:
            raise _missing(s, "input")
        else:
            raise ProtocolError(f"{s}: 'input' must be a string or a non-empty list of strings")
        params = d.get("params", {})
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, _PARAM_TYPES)
            and (not isinstance(v, float) or math.isfinite(v))
            for k, v in params.items()
        ):
            raise ProtocolError(f"{s}: 'params' must be an object of string/number/bool values")
        return cls(
            id=req_str(d, "id", s),
            reply_to=req_str(d, "reply_to", s),
            op=req_str(d, "op", s),
            input=inp,
            params=params,
        )


@dataclass(frozen=True)
class ReplyError:
    code: str  # one of ERROR_CODES
    message: str

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ProtocolError(f"reply: error code must be one of {ERROR_CODES}, got {self.code!r}")


@dataclass(frozen=True)
class Reply(Message):
    """Reply to a `Request` on its `reply_to` topic: exactly one of `result` / `error`.

    Success: `{"id": ..., "result": {...}}`; failure: `{"id": ..., "error": {"code", "message"}}`.
    `id` is the request's id (null when the request was too broken to read one)."""

    SCHEMA: ClassVar[str] = "reply"
    id: str | None
    result: Mapping[str, Any] | None = None
    error: ReplyError | None = None

    def __post_init__(self) -> None:
        if (self.result is None) == (self.error is None):
            raise ProtocolError("reply: exactly one of 'result' and 'error' must be set")

    @classmethod
    def failure(cls, request_id: str | None, code: str, message: str) -> Reply:
        return cls(id=request_id, error=ReplyError(code, message))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id}
        if self.error is not None:
            d["error"] = {"code": self.error.code, "message": self.error.message}
        else:
            d["result"] = dict(self.result or {})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        rid = d.get("id")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError(f"{s}: 'id' must be a string or null")
        if "error" in d:
            e = d["error"]
            if not isinstance(e, dict):
                raise ProtocolError(f"{s}: 'error' must be an object with 'code' and 'message'")
            return cls(id=rid, error=ReplyError(req_str(e, "code", s), opt_str(e, "message", s)))
        res = d.get("result")
        if not isinstance(res, dict):
            raise ProtocolError(f"{s}: needs an object 'result' or an 'error'")
        return cls(id=rid, result=res)


# ---------------------------------------------------------------------------- topics

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class TopicFamily(Generic[M]):
    """A topic pattern with one optional `{id}` level, bound to its schema and QoS/retain."""

    pattern: str  # e.g. "detransformer/home/devices/{id}/presence"
    schema: type[M]
    qos: int
    retain: bool

    @property
    def filter(self) -> str:
        """Subscription filter: `{id}` becomes `+`."""
        return self.pattern.replace("{id}", "+")

    def format(self, device_id: str | None = None) -> str:
        if "{id}" in self.pattern:
            if device_id is None:
                raise ProtocolError(f"topic {self.pattern} needs a device id")
            return self.pattern.replace("{id}", check_name(device_id, "device id"))
        return self.pattern

    def match(self, topic: str) -> str | None:
        """Device id if `topic` belongs to this family ("" for id-less topics), else None.

        None here means "not this family" (a routing question), never a parse failure."""
        if "{id}" not in self.pattern:
            return "" if topic == self.pattern else None
        head, tail = self.pattern.split("{id}")
        if topic.startswith(head) and topic.endswith(tail) and len(topic) > len(head) + len(tail):
            dev = topic[len(head) : len(topic) - len(tail)]
            return dev if "/" not in dev else None
        return None

    def encode(self, message: M) -> bytes:
        if not isinstance(message, self.schema):
            raise ProtocolError(
                f"topic {self.pattern} carries {self.schema.__name__}, not {type(message).__name__}"
            )
        return message.to_json().encode("utf-8")

    def decode(self, payload: str | bytes | bytearray) -> M:
        return self.schema.from_json(payload)


class ClusterTopics:
    """All topics of one cluster, prefix `detransformer/<cluster>`."""

    def __init__(self, cluster: str, root: str = ROOT) -> None:
        check_name(cluster, "cluster name")
        self.cluster = cluster
        self.prefix = f"{root}/{cluster}"
        p = self.prefix
        self.presence = TopicFamily(f"{p}/devices/{{id}}/presence", Presence, qos=1, retain=True)
        self.profile = TopicFamily(f"{p}/devices/{{id}}/profile", ProfileRecord, qos=1, retain=True)
        self.status = TopicFamily(f"{p}/devices/{{id}}/status", DeviceStatus, qos=0, retain=True)
        self.leader = TopicFamily(f"{p}/leader", LeaderLease, qos=1, retain=True)
        self.assign = TopicFamily(f"{p}/assign/{{id}}", Assignment, qos=1, retain=False)
        self.request = TopicFamily(f"{p}/request", Request, qos=1, retain=False)
        self.reply = TopicFamily(f"{p}/replies/{{id}}", Reply, qos=1, retain=False)

    def default_reply_to(self, client_id: str) -> str:
        """Conventional reply topic for a client: `P/replies/<client_id>`."""
        return self.reply.format(client_id)

    def run(self, request_id: str) -> str:
        """Per-request topic root for plan/activations/results (owned by the executor)."""
        return f"{self.prefix}/run/{check_name(request_id, 'request id')}"
