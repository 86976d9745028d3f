"""Typed topics: a round trip per message, topic formatting/matching, typed parse errors."""

from __future__ import annotations

import json

import pytest

from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.messages import (
    Assignment,
    DeviceStatus,
    LeaderLease,
    Presence,
    ProfileRecord,
    Reply,
    ReplyError,
    Request,
)
from detransformer_edge.protocol.topics import ClusterTopics

T = ClusterTopics("home")

PROFILE = ProfileRecord("kitchen-pi", "Kitchen Pi", "rpi4", 13.5, 3000.0, 90.0, 12.25, "0.1.0")
STATUS = DeviceStatus("kitchen-pi", True, "leader", 0.42, 812.5, 3, ((0, 1), (1, 1)), 123.4, 1.7e9)
LEASE = LeaderLease("kitchen-pi", 1764190000123, 1764190010.5, 10.0, "9f2c")
ASSIGN = Assignment("kitchen-pi", 7, 3, {"sub_blocks": [[0, 1]], "sha256": "ab" * 32})
REQUEST_G = Request("r-1", "detransformer/home/replies/phone", "generate", "hello", {"max_new_tokens": 8})
REQUEST_E = Request("r-2", "x/y", "embed", ("a", "b"))
REPLY_OK = Reply("r-1", result={"text": "hi"})
REPLY_ERR = Reply.failure("r-1", "not_leader", "ask the leader")


@pytest.mark.parametrize(
    "family, message",
    [
        (T.presence, Presence(True)),
        (T.presence, Presence(False)),
        (T.profile, PROFILE),
        (T.status, STATUS),
        (T.status, DeviceStatus("a", False, "starting", 0.0, 0.0, 0)),
        (T.leader, LEASE),
        (T.assign, ASSIGN),
        (T.request, REQUEST_G),
        (T.request, REQUEST_E),
        (T.reply, REPLY_OK),
        (T.reply, REPLY_ERR),
    ],
)
def test_round_trip(family, message) -> None:  # type: ignore[no-untyped-def]
    payload = family.encode(message)
    assert family.decode(payload) == message
    assert type(message).from_json(message.to_json()) == message


def test_topic_strings_and_matching() -> None:
    assert T.presence.format("kitchen-pi") == "detransformer/home/devices/kitchen-pi/presence"
    assert T.presence.filter == "detransformer/home/devices/+/presence"
    assert T.presence.match("detransformer/home/devices/kitchen-pi/presence") == "kitchen-pi"
    assert T.presence.match("detransformer/home/devices/kitchen-pi/profile") is None
    assert T.presence.match("detransformer/home/devices/a/b/presence") is None
    assert T.leader.format() == "detransformer/home/leader"
    assert T.leader.match("detransformer/home/leader") == ""
    assert T.presence.retain and T.leader.retain and T.profile.retain and not T.request.retain
    assert T.default_reply_to("phone") == "detransformer/home/replies/phone"
    with pytest.raises(ProtocolError, match="device id"):
        T.presence.format("bad/id")
    with pytest.raises(ProtocolError, match="carries"):
        T.leader.encode(PROFILE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls, payload, fragment",
    [
        (Presence, b"maybe", "online' or 'offline"),
        (Presence, b"\xff", "UTF-8"),
        (ProfileRecord, b"{not json", "not valid UTF-8 JSON"),
        (ProfileRecord, b"[1,2]", "JSON object"),
        (ProfileRecord, b'{"id":"a","gflops":1,"mem_mb":1,"link_mbit":1}', "'score'"),
        (ProfileRecord, b'{"id":"a","gflops":"fast","mem_mb":1,"link_mbit":1,"score":1}', "gflops"),
        (ProfileRecord, b'{"id":"a","gflops":-1,"mem_mb":1,"link_mbit":1,"score":1}', ">= 0"),
        (DeviceStatus, b'{"id":"a","ready":1,"role":"leader","load":0,"rss_mb":0,"placement_version":0}', "true or false"),
        (DeviceStatus, b'{"id":"a","ready":true,"role":"king","load":0,"rss_mb":0,"placement_version":0}', "role"),
        (DeviceStatus, b'{"id":"a","ready":true,"role":"leader","load":0,"rss_mb":0,"placement_version":0,"sub_blocks":[[1]]}', "sub_blocks"),
        (LeaderLease, b'{"id":"a","term":0,"expires_at":1,"lease_s":1,"session":"s"}', "term"),
        (LeaderLease, b'{"id":"a","term":1.5,"expires_at":1,"lease_s":1,"session":"s"}', "integer"),
        (LeaderLease, b'{"id":"a","term":1,"expires_at":NaN,"lease_s":1,"session":"s"}', "NaN is not a JSON number"),
        (Request, b'{"id":"r","reply_to":"a/#","op":"embed","input":"x"}', "wildcards"),
        (Request, b'{"id":"r","reply_to":"a","op":"train","input":"x"}', "'op'"),
        (Request, b'{"id":"r","reply_to":"a","op":"generate","input":["x"]}', "single string"),
        (Request, b'{"id":"r","reply_to":"a","op":"embed"}', "'input'"),
        (Request, b'{"id":"r","reply_to":"a","op":"embed","input":"x","params":{"a":[1]}}', "params"),
        (Reply, b'{"id":"r"}', "'result'"),
        (Reply, b'{"id":"r","error":{"code":"oops","message":""}}', "error code"),
        (Assignment, b'{"leader":"a","term":1,"placement_version":1,"body":[]}', "body"),
    ],
)
def test_malformed_payloads_raise_typed_errors(cls, payload, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError, match=fragment) as info:
        cls.from_json(payload)
    assert isinstance(info.value, DetransformerError)


def test_reply_needs_exactly_one_of_result_and_error() -> None:
    with pytest.raises(ProtocolError):
        Reply("r", result={"a": 1}, error=ReplyError("internal", "x"))
    assert Reply.from_json('{"id":null,"error":{"code":"bad_request","message":"m"}}').id is None


def test_bad_cluster_name() -> None:
    with pytest.raises(ProtocolError, match="cluster name"):
        ClusterTopics("my home")


def test_profile_record_from_planner_profile() -> None:
    from detransformer_edge.planner.profile import load_profile, profile_from_dict

    p = load_profile("firmware_profiles/raspberry-pi-4b.toml")
    rec = ProfileRecord.from_device_profile("kitchen-pi", p, name="Kitchen Pi", version="0.1.0")
    assert rec.score == p.capability_score and rec.device_class == p.name
    back = ProfileRecord.from_json(rec.to_json())
    assert back == rec
    assert profile_from_dict(dict(back.planner)).name == "kitchen-pi"


# --- the run topics and the messages moved into protocol/ --------------------------------------------


def test_run_topics_build_and_parse_every_activation_address() -> None:
    from detransformer_edge.protocol.topics import ActivationAddress, RunTopics

    run = RunTopics("detransformer/home")
    one = run.activation("r1", "p0.ag.3", "dev0", ["dev1"])
    fan = run.activation("r1", "p0.ag.3", "dev0", ["dev1", "dev2"])
    assert one == "detransformer/home/run/r1/p0.ag.3/dev0/to/dev1"
    assert run.parse_activation(one) == ActivationAddress("r1", "p0.ag.3", "dev0", ("dev1",))
    assert run.parse_activation(fan) == ActivationAddress("r1", "p0.ag.3", "dev0", ("dev1", "dev2"))
    inbox, fan_out = run.inbox_filters("dev1")
    assert inbox == "detransformer/home/run/+/+/+/to/dev1" and fan_out.endswith("/all/+")
    for other in (run.control.format("r1"), run.end.format("r1"), "detransformer/home/run/r1/x/y/via/z",
                  "detransformer/other/run/r1/s/a/to/b", "detransformer/home/leader"):
        assert run.parse_activation(other) is None, other
    assert run.control.match("detransformer/home/run/r1/ctl") == "r1"
    assert run.end.match("detransformer/home/run/r1/ctl") is None


def test_new_messages_round_trip() -> None:
    from detransformer_edge.protocol.messages import LogEntry, TokenEvent
    from detransformer_edge.protocol.runs import RunEnd
    from detransformer_edge.protocol.weights import WeightManifest

    for msg in (RunEnd("r1", 7), WeightManifest("m", "layer.1", 3, "ab" * 32), TokenEvent("q1", 2, " Paris"),
                LogEntry("i1-abc", "intent", "lights on", 1.7e9, "single on dev0", 12.5, "TurnOnLight (0.98)",
                         None, "q1")):
        assert type(msg).from_json(msg.to_json()) == msg
    assert TokenEvent.is_event(json.loads(TokenEvent("q", 1, "x").to_json()))
    with pytest.raises(ProtocolError):
        WeightManifest("m", "layer.1", 3, "AB" * 32)  # upper-case hex is not what the leader writes
    with pytest.raises(ProtocolError):
        RunEnd.from_json(b'{"req": "a/b", "term": 1}')
