"""Garbage on every topic an agent subscribes to: three agents keep their broker connections and
their single leader, and still answer a Hermes query and an embedding request correctly.

Garbage: random bytes, empty payloads, truncated JSON, messages of the wrong schema, valid-looking
messages with wrong-typed fields, huge numbers, NaN, deep nesting and multi-megabyte payloads.
Run once without a cluster key (every payload reaches the parsers) and once with one (leader
commands must also pass the signature check)."""

import asyncio
import contextlib
import json
import logging
import random
import uuid
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
import torch

from detransformer_edge.integrations import plugins_for
from detransformer_edge.model.encoder import mean_pool
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.catalog import tiny_catalog
from tests.test_fuzz_parsers import VALID
from tests.test_service import PROFILES, agent_config, ask, wait_for_placement

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).resolve().parents[1]
HUGE = 6 << 20  # above every parser's limit; Mosquitto's default allows up to 256 MB


GENERIC = [b"", b"\x00", b"\xff\xfe", b"null", b"[]", b"{}", b'"online "', b"NaN", b"-Infinity",
           b"1" * 5000, b"[" * 100_000, b'{"a":' * 20_000]
BAD_VALUES = ("x", 10**400, float("nan"), [[[]]], {"k": True})


def schema_of(topic: str) -> str | None:
    """The VALID example whose schema a topic carries (None: plain text or binary topics)."""
    for suffix, name in (("/profile", "profile"), ("/status", "status"), ("/leader", "leader"),
                         ("/request", "request"), ("/ctl", "run"), ("hermes/nlu/query", "hermes")):
        if topic.endswith(suffix):
            return name
    return "assign" if "/assign/" in topic else None


def garbage(rng: random.Random, topic: str, prefix: str) -> list[bytes]:
    """Payloads that are not a valid message for ``topic`` (never a bare online/offline)."""
    out = [*GENERIC, rng.randbytes(64), rng.randbytes(3000)]
    for name, msg in VALID.items():  # every other schema, and truncated JSON of each
        text = json.dumps(msg).encode()
        out += [text[: rng.randrange(1, len(text))]] + ([text] if name != schema_of(topic) else [])
    own = schema_of(topic)
    if own is not None:
        msg = VALID[own]
        for key in msg:  # the topic's own schema with one wrong-typed field at a time
            out += [json.dumps({**msg, key: bad}).encode() for bad in BAD_VALUES]
    if topic.endswith("/request"):  # replies reflected onto control topics
        out += [json.dumps({"id": "evil", "reply_to": f"{prefix}/leader", "op": "embed", "input": 5}).encode(),
                json.dumps({"id": "evil2", "reply_to": f"{prefix}/assign/dev1", "op": "dance",
                            "input": "x"}).encode()]
    if "/assign/" in topic:  # current-looking term, broken bodies
        out += [json.dumps({"leader": "dev0", "term": 10**6, "placement_version": 1, "body": body}).encode()
                for body in ({"models": 7}, {"models": {"intent": {"embeddings": "yes", "sub_blocks": [[-1]]}}})]
    return out


def huge_targets(prefix: str) -> list[str]:
    """Topics that also get one multi-megabyte payload (one per parser kind)."""
    return [f"{prefix}/devices/dev1/profile", f"{prefix}/devices/dev1/status", f"{prefix}/leader",
            f"{prefix}/assign/dev1", f"{prefix}/request", "hermes/nlu/query", f"{prefix}/run/r1/ctl",
            f"{prefix}/run/r1/0/dev0/to/dev1"]


def hostile_topics(prefix: str, ha_prefix: str) -> list[str]:
    """Every topic an agent subscribes to, for real and ghost devices and requests."""
    topics = []
    for dev in ("dev0", "dev1", "dev2", "ghost"):
        topics += [f"{prefix}/devices/{dev}/{kind}" for kind in ("presence", "profile", "status")]
        topics.append(f"{prefix}/assign/{dev}")
    topics += [f"{prefix}/leader", f"{prefix}/request", "hermes/nlu/query", f"{ha_prefix}/status"]
    for req in ("r1", "x-y"):
        topics += [f"{prefix}/run/{req}/ctl", f"{prefix}/run/{req}/end",
                   f"{prefix}/run/{req}/0/dev0/to/dev1", f"{prefix}/run/{req}/3/dev1/to/dev0",
                   f"{prefix}/run/{req}/1/dev2/all/dev0,dev1"]
    return topics


@contextlib.asynccontextmanager
async def hostile_home(broker, cluster, ha_prefix, key):
    host, port = broker
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(3):
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            cfg = replace(agent_config(f"dev{i}", cluster, host, port), cluster_key=key,
                          homeassistant=True, homeassistant_prefix=ha_prefix)
            agent = HomeAgent(cfg, prof, tiny_catalog(), plugins=plugins_for(cfg), broker=broker, intent_threshold=0.0, replan_delay_s=0.2)
            agents.append(await stack.enter_async_context(agent))
        yield agents


def describe(agents) -> str:
    return "; ".join(
        f"{a.id}: connected={a.cluster.connected} leader={a.cluster.is_leader} "
        f"lease={a.cluster.lease} online={a.cluster.membership.online} "
        f"ready={a.placements.state.ready if a.cluster.is_leader else '-'} "
        f"version={a.placements.state.version if a.cluster.is_leader else '-'} work={a.cluster.work_state}"
        for a in agents)


def reference_intent(text):
    loaded = tiny_catalog().load("intent")
    prep = loaded.intent_head.prepare(text)
    with torch.inference_mode():
        return loaded.intent_head.decode(text, loaded.model(prep.input_ids, prep.attention_mask), prep)


def reference_embedding(text):
    m = tiny_catalog().load("tiny-encoder")
    ids = torch.tensor([m.tokenizer.encode(text)])
    with torch.inference_mode():
        return mean_pool(m.model(ids, torch.ones_like(ids)), torch.ones_like(ids))


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "a cluster key of decent length"], ids=["unsigned", "signed"])
async def test_garbage_on_every_topic(mosquitto_broker, caplog, key):
    caplog.set_level(logging.WARNING)
    host, port = mosquitto_broker
    cluster = f"h{uuid.uuid4().hex[:8]}"
    prefix, ha_prefix = f"detransformer/{cluster}", f"ha{uuid.uuid4().hex[:6]}"
    async with hostile_home(mosquitto_broker, cluster, ha_prefix, key) as agents:
        leader = await wait_for_placement(agents)
        sessions = [a.session.session_id for a in agents]
        if key is None:
            assert any("NOT signed" in r.getMessage() for r in caplog.records)

        rng = random.Random(8)
        async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311, timeout=60) as attacker:
            sent = 0
            for topic in hostile_topics(prefix, ha_prefix):
                for payload in garbage(rng, topic, prefix):
                    await attacker.publish(topic, payload, qos=sent % 2)
                    sent += 1
            for topic in huge_targets(prefix):
                await attacker.publish(topic, b"{" + b"x" * (HUGE - 2) + b"}", qos=1)
            assert sent > 1000
        # let every agent chew through its queue, then check nothing broke
        try:
            async with asyncio.timeout(60):
                while True:
                    await asyncio.sleep(1.0)
                    leaders = [a for a in agents if a.cluster.is_leader]
                    if len(leaders) == 1 and leaders[0].placements.state.placement_ready():
                        break
        except TimeoutError:
            pytest.fail(f"cluster did not recover: {describe(agents)}")
        assert [a.cluster.connected for a in agents] == [True] * 3
        assert [a.session.session_id for a in agents] == sessions, "an agent reconnected"
        assert [a for a in agents if a.cluster.is_leader] == [leader]
        assert {a.cluster.lease.id for a in agents} == {leader.id}
        assert all(a.cluster.membership.online == ("dev0", "dev1", "dev2") for a in agents)

        q = {"input": "turn on the kitchen light", "siteId": "kitchen", "id": "hq1", "sessionId": "hs1"}
        (topic, body), = await ask(mosquitto_broker, "hermes/nlu/query", q,
                                   ["hermes/intent/#", "hermes/nlu/intentNotRecognized"])
        ref = reference_intent(q["input"])
        assert body["id"] == "hq1" and body["intent"]["intentName"] == ref.intent
        assert abs(body["intent"]["confidenceScore"] - ref.confidence) < 1e-3

        reply_to = f"{prefix}/replies/hostile"
        (_, emb), = await ask(mosquitto_broker, f"{prefix}/request",
                              {"id": "he1", "reply_to": reply_to, "op": "embed", "input": "hello home",
                               "params": {"model": "tiny-encoder"}}, [reply_to])
        assert emb["id"] == "he1" and "result" in emb, emb
        got = torch.tensor(emb["result"]["embeddings"])
        assert torch.nn.functional.cosine_similarity(got, reference_embedding("hello home")).min() > 0.999

        # every hostile message was handled as a warning, none as a crash
        crashes = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("detransformer_edge")]
        assert not crashes, [(r.name, r.getMessage()) for r in crashes[:5]]
