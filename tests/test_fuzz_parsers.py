"""Every parser of outside input either returns a valid object or raises its module's typed
error (a DetransformerError subclass): never another exception, never unbounded work.

Inputs: arbitrary bytes, arbitrary JSON values, the valid messages with fields replaced by
wrong-typed values, huge numbers, NaN / Infinity, deep nesting, truncation and oversized payloads.
A returned object must survive its own round trip (so NaN cannot sneak through a parser into a
reply that later fails to encode). The wire envelope is fuzzed in test_wire.py.
"""

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.parallel.plan import Plan, PlanError
from detransformer_edge.protocol.codec import ProtocolError, load_object
from detransformer_edge.protocol.hermes import HermesError, NluQuery, parse_nlu_query
from detransformer_edge.protocol.hermes_tts import TtsSay
from detransformer_edge.protocol.messages import (
    Assignment,
    DeviceStatus,
    LeaderLease,
    LogEntry,
    Presence,
    ProfileRecord,
    Reply,
    Request,
    TokenEvent,
)
from detransformer_edge.protocol.runs import RunControl, RunEnd
from detransformer_edge.protocol.weights import WeightManifest, WeightWant

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PLAN = {"mode": "pipeline", "devices": ["a", "b"], "wire": "float16",
        "stages": [{"device": "a", "start": 0, "end": 2}, {"device": "b", "start": 2, "end": 4}],
        "sub_block_owner": [], "coupled": "allgather", "coupled_devices": []}

# parser name -> (parse function, typed error, a valid example as a JSON object, round trip)
VALID = {
    "request": {"id": "r1", "reply_to": "detransformer/home/replies/x", "op": "embed",
                "input": ["hi", "there"], "params": {"model": "m", "temperature": 0.5, "chat": True}},
    "reply": {"id": "r1", "result": {"text": "hello", "n": 3}},
    "assign": {"leader": "dev0", "term": 3, "placement_version": 2, "body": {"models": {"m": {}}}},
    "leader": {"id": "dev0", "term": 4, "expires_at": 1.7e9, "lease_s": 10.0, "session": "abc"},
    "status": {"id": "dev1", "ready": True, "role": "follower", "load": 0.2, "rss_mb": 300.0,
               "placement_version": 1, "sub_blocks": [[0, 1]], "last_latency_ms": 12.5, "ts": 1.0},
    "profile": {"id": "dev1", "name": "Pi", "device_class": "raspberry-pi-4b", "gflops": 9.5,
                "mem_mb": 3000.0, "link_mbit": 100.0, "score": 1.5, "version": "0.1", "planner": {}},
    "hermes": {"input": "turn on the light", "siteId": "kitchen", "id": "q1", "sessionId": "s1",
               "intentFilter": ["TurnOnLight"], "lang": "en"},
    "run": {"req": "r1", "model": "tiny-encoder", "kind": "encode", "plan": PLAN, "term": 2,
            "timeout_s": 10.0, "max_passes": 1, "attention_mask": [[1, 1, 0]]},
    "plan": PLAN,
    "weights_manifest": {"model": "minilm-l6", "shard": "layer.1", "total": 4, "sha256": "ab" * 32},
    "run_end": {"req": "r1", "term": 3},
    "token": {"id": "r1", "event": "token", "seq": 1, "text": " Paris"},
    "log": {"id": "i1-ab", "client_id": "q1", "kind": "intent", "text": "lights on", "started": 1.7e9,
            "plan": "single on dev0", "latency_ms": 12.5, "result": "TurnOnLight (0.98)", "error": None},
    "tts_say": {"text": "Homer wrote the Odyssey.", "siteId": "kitchen", "lang": "en", "id": "q1", "sessionId": "s1"},
    "weights_want": {"model": "minilm-l6", "placement_version": 3, "shards": ["block0.sub1", "embeddings"],
                     "have": {"embeddings": [0, 1, 2]}},
}


def _round_trip(cls):
    def check(obj):
        again = cls.from_json(obj.to_json())
        assert again == obj
    return check


def _parse_plan(payload):
    return Plan.from_dict(load_object(payload, "plan"))


def _plan_round_trip(obj):
    assert _parse_plan(json.dumps(obj.to_dict(), allow_nan=False)) == obj


def _want_round_trip(obj):
    assert WeightWant.from_json(obj.to_json()) == obj


def _run_round_trip(obj):
    again = RunControl.from_json(obj.to_json())
    assert again == obj


PARSERS = {
    "request": (Request.from_json, ProtocolError, _round_trip(Request)),
    "reply": (Reply.from_json, ProtocolError, _round_trip(Reply)),
    "assign": (Assignment.from_json, ProtocolError, _round_trip(Assignment)),
    "leader": (LeaderLease.from_json, ProtocolError, _round_trip(LeaderLease)),
    "status": (DeviceStatus.from_json, ProtocolError, _round_trip(DeviceStatus)),
    "profile": (ProfileRecord.from_json, ProtocolError, _round_trip(ProfileRecord)),
    "hermes": (parse_nlu_query, HermesError, _round_trip(NluQuery)),
    "run": (RunControl.from_json, ProtocolError, _run_round_trip),
    "plan": (_parse_plan, (ProtocolError, PlanError), _plan_round_trip),
    "weights_want": (WeightWant.from_json, ProtocolError, _want_round_trip),
    "weights_manifest": (WeightManifest.from_json, ProtocolError, _round_trip(WeightManifest)),
    "run_end": (RunEnd.from_json, ProtocolError, _round_trip(RunEnd)),
    "token": (TokenEvent.from_json, ProtocolError, _round_trip(TokenEvent)),
    "log": (LogEntry.from_json, ProtocolError, _round_trip(LogEntry)),
    "tts_say": (TtsSay.from_json, HermesError, _round_trip(TtsSay)),
}


def check_parser(name, payload):
    parse, error, round_trip = PARSERS[name]
    try:
        obj = parse(payload)
    except error as exc:
        assert isinstance(exc, DetransformerError)
        assert str(exc)  # a message a user can act on
        return None
    round_trip(obj)
    return obj


# ------------------------------------------------------------------------------- strategies

huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400)])
json_scalars = (st.none() | st.booleans() | st.integers() | huge_ints
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def dumps(value):
    return json.dumps(value, allow_nan=True)  # NaN / Infinity tokens on purpose


@st.composite
def mutated(draw, name):
    """The valid example with some fields replaced by arbitrary values, dropped or added."""
    base = json.loads(json.dumps(VALID[name]))
    keys = sorted(base)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        if draw(st.booleans()):
            base[key] = draw(json_values)
        else:
            base.pop(key)
    if draw(st.booleans()):
        base[draw(st.text(max_size=6))] = draw(json_values)
    return base


NAMES = sorted(PARSERS)


def test_valid_examples_parse():
    for name in NAMES:
        assert check_parser(name, json.dumps(VALID[name])) is not None, name


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name, data):
    check_parser(name, data)


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(value=json_values)
def test_arbitrary_json_values(name, value):
    check_parser(name, dumps(value).encode())


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_wrong_typed_fields(name, data):
    check_parser(name, dumps(data.draw(mutated(name))).encode())


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_truncated(name, data):
    text = json.dumps(VALID[name])
    cut = data.draw(st.integers(0, len(text) - 1))
    check_parser(name, text[:cut].encode())


NASTY = [
    "[" * 100_000,  # deep nesting: RecursionError inside json
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    "1" * 5000,  # more digits than Python converts to int by default
    '{"id": ' + "9" * 5000 + "}",
    "NaN", "Infinity", "-Infinity",
    '{"term": 1e999, "timeout_s": 1e999, "load": -1e999}',
    "\ud800",  # lone surrogate
    "",
    "\x00" * 10,
]


@pytest.mark.parametrize("name", NAMES)
def test_nasty_inputs(name):
    for text in NASTY:
        check_parser(name, text)
        check_parser(name, text.encode("utf-8", "surrogatepass"))
    base = VALID[name]
    for key in base:
        for bad in (10**400, -(10**400), float("nan"), float("inf"), -1, 2**63, [], {}, "x", None, True,
                    [[[[[[[]]]]]]], "é" * 1000):
            check_parser(name, dumps({**base, key: bad}).encode())


@pytest.mark.parametrize("name", NAMES)
def test_ten_megabytes_are_refused_quickly(name):
    big = json.dumps({**VALID[name], "pad": "x" * 10_000_000}).encode()
    parse, error, _ = PARSERS[name]
    t0 = time.perf_counter()
    with pytest.raises(error, match="too large|at most"):
        parse(big)
    assert time.perf_counter() - t0 < 0.5


# ------------------------------------------------------------------------------- presence (text)


@FUZZ
@given(data=st.binary(max_size=50))
def test_presence(data):
    try:
        p = Presence.from_json(data)
    except ProtocolError:
        return
    assert Presence.from_json(p.to_json()) == p


# ------------------------------------------------------------------------------- agent config


def load_config(text):
    try:
        cfg = AgentConfig.loads(text)
    except ConfigError as exc:
        assert str(exc)
        return None
    assert isinstance(cfg, AgentConfig)
    return cfg


toml_keys = st.sampled_from([
    "id", "cluster", "name", "discovery", "profile", "model", "dashboard_port", "cluster_key",
    "cluster_key_file", "status_interval_s", "homeassistant", "homeassistant_prefix", "bogus",
])
broker_keys = st.sampled_from(["url", "username", "password", "password_file", "protocol", "keepalive_s",
                               "reconnect_min_s", "reconnect_max_s", "nope"])
toml_values = st.sampled_from([
    '"dev0"', '""', '"~nouser_xyz/x"', '"a\\u0000b"', "1", "-1", "0", "99999999999999999999", "1e999", "nan",
    "inf", "-inf", "true", "false", "[]", "[1, 2]", "{}", "1979-05-27T07:32:00Z", '"mqtt://[::1"',
    '"mqtt://h:99999"', '"mqtts://host"', '"http://x"', '"mqtt://"', '"mqtt://h:1883/x?y#z"',
    '"3.1.1"', '"5"', "0.0001", '"' + "x" * 70 + '"',
])


@st.composite
def toml_docs(draw):
    lines = ['id = "dev0"'] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"{draw(toml_keys)} = {draw(toml_values)}")
    lines.append("[broker]")
    if draw(st.booleans()):
        lines.append('url = "mqtt://localhost:1883"')
    for _ in range(draw(st.integers(0, 3))):
        lines.append(f"{draw(broker_keys)} = {draw(toml_values)}")
    if draw(st.booleans()):
        lines.append("[broker.tls]")
        lines.append(f"{draw(st.sampled_from(['ca_file', 'insecure', 'cert_file', 'x']))} = {draw(toml_values)}")
    if draw(st.booleans()):
        lines.append("[election]")
        lines.append(f"{draw(st.sampled_from(['lease_s', 'stagger_s', 'settle_s', 'y']))} = {draw(toml_values)}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(doc=toml_docs())
def test_agent_config_fields(doc):
    load_config(doc)


@FUZZ
@given(text=st.text(max_size=300))
def test_agent_config_arbitrary_text(text):
    load_config(text)


def test_agent_config_nasty():
    for text in ["a = " + "[" * 100_000, "x = " + "{a = " * 20_000, "id = " + "9" * 5000,
                 'id = "dev0"\ndiscovery = false\n[broker]\nurl = "mqtt://[::1"\n',
                 'id = "dev0"\ncluster_key_file = "~nouser_xyz/key"\n[broker]\nurl = "mqtt://h"\n',
                 'id = "dev0"\ncluster_key_file = "a\\u0000b"\n[broker]\nurl = "mqtt://h"\n',
                 'id = "dev0"\n[broker]\nurl = "mqtt://h"\npassword_file = "/"\n',
                 'id = "dev0"\n[election]\nlease_s = nan\n[broker]\nurl = "mqtt://h"\n',
                 'id = "dev0"\nstatus_interval_s = inf\n[broker]\nurl = "mqtt://h"\n',
                 'id = "dev0"\n[broker]\nurl = "mqtt://h"\nreconnect_max_s = inf\n',
                 "\x00", "\ud800"]:
        cfg = load_config(text)
        if cfg is not None:
            assert math.isfinite(cfg.status_interval_s) and math.isfinite(cfg.election.lease_s)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="too large"):
        AgentConfig.loads('id = "dev0"\n# ' + "x" * 10_000_000 + "\n")
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_json_numbers_are_refused_anywhere(name, token):
    """Python's json reads NaN / Infinity / overflowing numbers, which the service cannot write
    back: refused wherever they sit, even nested in a field the parser does not read."""
    parse, error, _ = PARSERS[name]
    body = json.dumps({**VALID[name], "extra": {"": "@"}}).replace('"@"', token)
    with pytest.raises(error, match="not valid UTF-8 JSON"):
        parse(body.encode())
    if name == "reply":
        with pytest.raises(ProtocolError):
            Reply.from_json(f'{{"id": "r1", "result": {{"": {token}}}}}')
