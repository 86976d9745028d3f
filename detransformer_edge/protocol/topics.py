"""Every topic of a cluster, each bound to the message it carries (docs/API.md is the table).

Publishing goes through ``TopicFamily.format(...)`` + ``TopicFamily.encode(message)``, parsing
through ``TopicFamily.match(topic)`` + ``TopicFamily.decode(payload)``, so the two cannot drift
apart. ``RunTopics`` is the one place the per-request topics (``P/run/<req>/...``) are built and
parsed: run control, run end, and the activation topics of the MQTT transport, which receives a
``RunTopics`` when it is made (the transport sits below this package). The Rhasspy Hermes
topics are in ``protocol/hermes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from detransformer_edge.protocol.codec import Message, ProtocolError, check_name
from detransformer_edge.protocol.messages import (
    Assignment,
    DeviceStatus,
    LeaderLease,
    LogEntry,
    Presence,
    ProfileRecord,
    Reply,
    Request,
)
from detransformer_edge.protocol.runs import RunControl, RunEnd
from detransformer_edge.protocol.weights import WeightManifest, WeightWant

ROOT = "detransformer"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class TopicFamily(Generic[M]):
    """A topic pattern with one optional ``{id}`` level, bound to its schema and QoS/retain."""

    pattern: str  # e.g. "detransformer/home/devices/{id}/presence"
    schema: type[M]
    qos: int
    retain: bool

    @property
    def filter(self) -> str:
        """Subscription filter: ``{id}`` becomes ``+``."""
        return self.pattern.replace("{id}", "+")

    def format(self, device_id: str | None = None) -> str:
        if "{id}" in self.pattern:
            if device_id is None:
                raise ProtocolError(f"topic {self.pattern} needs a device id")
            return self.pattern.replace("{id}", check_name(device_id, "device id"))
        return self.pattern

    def match(self, topic: str) -> str | None:
        """Device id if ``topic`` belongs to this family ("" for id-less topics), else None.

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


@dataclass(frozen=True)
class ActivationAddress:
    """Where an activation message goes: request, step key, sender, receivers."""

    req: str
    step: str
    src: str
    dsts: tuple[str, ...]


class RunTopics:
    """The per-request topics under ``P/run/<req>/``.

    * ``P/run/<req>/ctl`` — ``RunControl``, leader → the plan's devices (QoS 1)
    * ``P/run/<req>/end`` — ``RunEnd``, leader → the plan's devices (QoS 1)
    * ``P/run/<req>/<step>/<src>/to/<dst>`` — an activation for one device (QoS 0)
    * ``P/run/<req>/<step>/<src>/all/<d1>,<d2>,...`` — a fan-out: ONE publish, the broker copies it

    A device subscribes once to its inbox and to every fan-out (``inbox_filters``) and drops on
    the topic alone a fan-out that does not name it.
    """

    def __init__(self, prefix: str) -> None:
        if not prefix or any(c in prefix for c in "+#") or prefix.endswith("/"):
            raise ProtocolError(f"invalid topic prefix {prefix!r}: no wildcards, no trailing /")
        self.prefix = prefix
        self._root = f"{prefix}/run/"
        self.control = TopicFamily(f"{self._root}{{id}}/ctl", RunControl, qos=1, retain=False)
        self.end = TopicFamily(f"{self._root}{{id}}/end", RunEnd, qos=1, retain=False)

    def activation(self, req: str, step: str, src: str, dsts: list[str] | tuple[str, ...]) -> str:
        """Topic of one activation message; a single receiver uses ``to``, several ``all``."""
        if len(dsts) == 1:
            return f"{self._root}{req}/{step}/{src}/to/{dsts[0]}"
        return f"{self._root}{req}/{step}/{src}/all/{','.join(dsts)}"

    def inbox_filters(self, device_id: str) -> tuple[str, str]:
        """(this device's inbox, every fan-out): the two subscriptions of a device."""
        base = f"{self._root}+/+/+"
        return f"{base}/to/{check_name(device_id, 'device id')}", f"{base}/all/+"

    def parse_activation(self, topic: str) -> ActivationAddress | None:
        """The address of an activation topic; None for any other topic."""
        if not topic.startswith(self._root):
            return None
        parts = topic[len(self._root) :].split("/")
        if len(parts) != 5 or parts[3] not in ("to", "all"):
            return None
        req, step, src, _, dst = parts
        return ActivationAddress(req, step, src, tuple(dst.split(",")))


class ClusterTopics:
    """All topics of one cluster, prefix ``detransformer/<cluster>``."""

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
        self.log = TopicFamily(f"{p}/log", LogEntry, qos=0, retain=False)
        self.weights_want = TopicFamily(f"{p}/weights/{{id}}/want", WeightWant, qos=1, retain=False)
        self.weights_manifest = TopicFamily(f"{p}/weights/{{id}}/manifest", WeightManifest, qos=1, retain=False)
        self.weights_chunk = f"{p}/weights/{{id}}/chunk"  # msgpack WeightChunk (protocol/weights.py)
        self.run = RunTopics(p)

    def default_reply_to(self, client_id: str) -> str:
        """Conventional reply topic for a client: ``P/replies/<client_id>``."""
        return self.reply.format(client_id)

    def chunk_topic(self, device_id: str) -> str:
        return self.weights_chunk.replace("{id}", check_name(device_id, "device id"))
