"""The cluster's control messages (docs/API.md): device records, the leader lease, assignments,
requests and replies. Each is a frozen, validated dataclass read and written by the one codec of
``protocol/codec.py``; ``protocol/topics.py`` binds each to its topic."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from detransformer_edge.protocol.codec import (
    Message,
    ProtocolError,
    check_name,
    check_num,
    check_publish_topic,
    missing_field,
    opt_num,
    opt_str,
    req_bool,
    req_int,
    req_num,
    req_str,
)

PRESENCE_ONLINE = "online"
PRESENCE_OFFLINE = "offline"
REQUEST_OPS = ("generate", "embed", "intent", "answer")
ROLES = ("leader", "follower", "starting")
ERROR_CODES = ("bad_request", "not_leader", "busy", "timeout", "unsupported", "internal")


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
    has_models: bool = False  # the device holds the model files itself (preferred as leader)

    def __post_init__(self) -> None:
        check_name(self.id, "device id")
        for key in ("gflops", "mem_mb", "link_mbit", "score"):
            check_num(getattr(self, key), key, self.SCHEMA, 0.0)

    @classmethod
    def from_device_profile(
        cls, device_id: str, profile: Any, *, name: str = "", device_class: str = "", version: str = "",
        has_models: bool = False,
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
            has_models=has_models,
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
            "has_models": self.has_models,
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
            has_models=req_bool(d, "has_models", s) if "has_models" in d else False,
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
    loading: bool = False  # reading or receiving model weights right now

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
            **({"loading": True} if self.loading else {}),
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
            loading=req_bool(d, "loading", s) if "loading" in d else False,
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
    `op` "embed": `input` is a string or a list of strings.
    `op` "intent": `input` is one utterance; the result is the intent with its slots (a follower
    forwards a voice query this way).
    `op` "answer": `input` is a question; the result is a short spoken answer from the language
    model (tokens stream as for "generate"). The reply goes to `reply_to` with
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
        if self.op in ("generate", "intent", "answer") and not isinstance(self.input, str):
            raise ProtocolError(f"request: '{self.op}' takes a single string as 'input'")

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
            raise missing_field(s, "input")
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


@dataclass(frozen=True)
class TokenEvent(Message):
    """A piece of a generation streamed to the request's reply topic (QoS 0) before its final
    ``Reply``; ``seq`` counts from 1 so a client can spot a lost piece."""

    SCHEMA: ClassVar[str] = "token"
    id: str
    seq: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event": "token", "seq": self.seq, "text": self.text}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        if d.get("event") != "token":
            raise ProtocolError(f"{s}: 'event' must be 'token'")
        return cls(req_str(d, "id", s), req_int(d, "seq", s, minimum=1), req_str(d, "text", s, allow_empty=True))

    @staticmethod
    def is_event(d: Mapping[str, Any]) -> bool:
        """Whether a JSON object on a reply topic is a streamed event rather than the Reply."""
        return "event" in d


@dataclass(frozen=True)
class LogEntry(Message):
    """``P/log`` (QoS 0): one finished request, for dashboards and clients that follow the home."""

    SCHEMA: ClassVar[str] = "log"
    id: str
    kind: str  # intent | embed | generate | answer
    text: str  # the input, cut to 120 characters
    started: float  # unix time
    plan: str = ""
    latency_ms: float | None = None
    result: str = ""  # cut to 200 characters
    error: str | None = None
    client_id: str | None = None  # the caller's id (Hermes query id, request id)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.text[:120])
        object.__setattr__(self, "result", self.result[:200])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "client_id": self.client_id, "kind": self.kind, "text": self.text,
                "started": self.started, "plan": self.plan, "latency_ms": self.latency_ms,
                "result": self.result, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        s = cls.SCHEMA
        err, cid = d.get("error"), d.get("client_id")
        if err is not None and not isinstance(err, str) or cid is not None and not isinstance(cid, str):
            raise ProtocolError(f"{s}: 'error' and 'client_id' must be strings or null")
        return cls(req_str(d, "id", s), req_str(d, "kind", s), opt_str(d, "text", s), req_num(d, "started", s),
                   opt_str(d, "plan", s), opt_num(d, "latency_ms", s, minimum=0), opt_str(d, "result", s), err, cid)
