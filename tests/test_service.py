"""The home service end to end on a real Mosquitto: three agents (tiny models) elect a leader,
receive placements, report ready, and answer Hermes queries, embeddings and generation with
results equal to one device's."""

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import aiomqtt
import pytest
import torch

from detransformer_edge.cluster.config import AgentConfig, BrokerConfig, ElectionConfig
from detransformer_edge.integrations import plugins_for
from detransformer_edge.model.encoder import mean_pool
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.catalog import tiny_catalog

pytestmark = pytest.mark.mosquitto
ROOT = Path(__file__).resolve().parents[1]
PROFILES = ["intel-n100-minipc", "raspberry-pi-5", "raspberry-pi-4b"]


def agent_config(dev, cluster, host, port):
    return AgentConfig(
        id=dev, cluster=cluster,
        broker=BrokerConfig(url=f"mqtt://{host}:{port}", keepalive_s=2, protocol="3.1.1",
                            reconnect_min_s=0.1, reconnect_max_s=0.5),
        discovery=False, homeassistant=False, status_interval_s=0.5, dashboard_port=0,
        election=ElectionConfig(lease_s=3.0, settle_s=0.3),
    )


@contextlib.asynccontextmanager
async def home(broker, n=3, **agent_kwargs):
    host, port = broker
    cluster = f"t{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(n):
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            agent = HomeAgent(agent_config(f"dev{i}", cluster, host, port), prof, tiny_catalog(),
                              plugins=plugins_for(agent_config(f"dev{i}", cluster, host, port)), broker=broker, intent_threshold=0.0, replan_delay_s=0.2, **agent_kwargs)
            agents.append(await stack.enter_async_context(agent))
        yield cluster, agents


async def wait_for_placement(agents, timeout=30.0):
    async with asyncio.timeout(timeout):
        while True:
            leaders = [a for a in agents if a.cluster.is_leader]
            if len(leaders) == 1 and leaders[0].placements.state.placement_ready():
                return leaders[0]
            await asyncio.sleep(0.1)


async def ask(broker, topic, payload, reply_topics, count=1, timeout=30.0):
    """Publish ``payload`` and collect messages from ``reply_topics``: ``count`` of them, or up
    to a final request reply (one with ``result`` or ``error``)."""
    host, port = broker
    got = []
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        for t in reply_topics:
            await client.subscribe(t, qos=1)
        await client.publish(topic, json.dumps(payload), qos=1)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                got.append((msg.topic.value, json.loads(msg.payload)))
                if len(got) >= count or "result" in got[-1][1] or "error" in got[-1][1]:
                    return got


async def test_agents_place_and_answer_every_api(mosquitto_broker):
    async with home(mosquitto_broker) as (cluster, agents):
        leader = await wait_for_placement(agents)
        assert leader.id == "dev0"  # the N100 has the highest capability score
        summary = leader.placements.summary()
        assert summary["version"] >= 1 and set(summary["models"]) == {"intent", "tiny-encoder", "tiny-encoder-bp", "tiny-decoder"}
        # each device holds only its assignment
        held = {a.id: a.host.weight_bytes() for a in agents}
        assert all(sum(v.values()) > 0 for v in held.values() if v), held

        # Hermes: a query gets exactly one intent reply with the query's ids
        q = {"input": "turn on the kitchen light", "siteId": "kitchen", "id": "q1", "sessionId": "s1"}
        (topic, body), = await ask(mosquitto_broker, "hermes/nlu/query", q, ["hermes/intent/#", "hermes/nlu/intentNotRecognized"])
        assert topic.startswith("hermes/intent/") and body["id"] == "q1" and body["sessionId"] == "s1"
        assert body["intent"]["intentName"] == topic.split("/")[-1]
        # the same intent as one device computes
        cat = tiny_catalog()
        loaded = cat.load("intent")
        prep = loaded.intent_head.prepare(q["input"])
        with torch.inference_mode():
            ref = loaded.intent_head.decode(q["input"], loaded.model(prep.input_ids, prep.attention_mask), prep)
        assert body["intent"]["intentName"] == ref.intent
        assert abs(body["intent"]["confidenceScore"] - ref.confidence) < 1e-3

        # embeddings over P/request, equal to the single-device reference (float16 wire at most)
        req_topic = f"detransformer/{cluster}/request"
        reply_to = f"detransformer/{cluster}/replies/test"
        (t, emb), = await ask(mosquitto_broker, req_topic,
                              {"id": "e1", "reply_to": reply_to, "op": "embed", "input": ["hello home", "hi"]}, [reply_to])
        assert emb["id"] == "e1", emb
        e_model = cat.load("tiny-encoder")
        rows = [e_model.tokenizer.encode(x) for x in ["hello home", "hi"]]
        w = max(map(len, rows))
        ids = torch.tensor([r + [0] * (w - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (w - len(r)) for r in rows])
        with torch.inference_mode():
            ref_vec = mean_pool(e_model.model(ids, mask), mask)
        got = torch.tensor(emb["result"]["embeddings"])
        assert torch.nn.functional.cosine_similarity(got, ref_vec).min() > 0.999

        # generation: streamed token events then one final reply, text equal to one device's greedy run
        msgs = await ask(mosquitto_broker, req_topic,
                         {"id": "g1", "reply_to": reply_to, "op": "generate", "input": "abc",
                          "params": {"max_new_tokens": 6, "chat": False}}, [reply_to], count=100)
        final = [b for _, b in msgs if "result" in b or "error" in b]
        tokens = [b for _, b in msgs if b.get("event") == "token"]
        assert len(final) == 1 and "result" in final[0], final
        g_model = cat.load("tiny-decoder")
        ids = torch.tensor([g_model.tokenizer.encode("abc")])
        out = []
        with torch.inference_mode():
            for _ in range(6):
                nxt = int(g_model.model(ids)[0, -1].argmax())
                if nxt == g_model.tokenizer.eos_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert final[0]["result"]["text"] == g_model.tokenizer.decode(out)
        assert "".join(t["text"] for t in tokens) == final[0]["result"]["text"]

        # bad requests get error replies, and the service keeps serving
        (t, bad), = await ask(mosquitto_broker, req_topic,
                              {"id": "b1", "reply_to": reply_to, "op": "generate", "input": "x",
                               "params": {"max_new_tokens": "many"}}, [reply_to])
        assert bad["error"]["code"] == "bad_request"
        (t, bad2), = await ask(mosquitto_broker, req_topic, {"id": "b2", "reply_to": reply_to, "op": "dance", "input": "x"}, [reply_to])
        assert bad2["error"]["code"] == "bad_request"
        (t, bad3), = await ask(mosquitto_broker, req_topic, {"id": "b3", "reply_to": reply_to, "op": "embed", "input": "x",
                                                              "params": {"model": "gpt-17"}}, [reply_to])
        assert bad3["error"]["code"] == "bad_request" and "unknown model" in bad3["error"]["message"]
        (t, bad4), = await ask(mosquitto_broker, req_topic, {"id": "b4", "reply_to": reply_to, "op": "embed",
                                                              "input": "x" * 500}, [reply_to])
        assert bad4["error"]["code"] == "bad_request" and "tokens" in bad4["error"]["message"]
        (topic, body), = await ask(mosquitto_broker, "hermes/nlu/query", {"input": "lock the door", "id": "q2"},
                                   ["hermes/intent/#", "hermes/nlu/intentNotRecognized"])
        assert body["id"] == "q2"


async def test_replans_when_a_device_leaves(mosquitto_broker):
    async with home(mosquitto_broker) as (cluster, agents):
        leader = await wait_for_placement(agents)
        v1 = leader.placements.state.version
        gone = agents[2]
        await gone.__aexit__(None, None, None)
        async with asyncio.timeout(20):
            while not (leader.placements.state.version > v1 and leader.placements.state.placement_ready()
                       and "dev2" not in leader.placements.state.profiles):
                await asyncio.sleep(0.1)
        q = {"input": "what time is it", "id": "q9"}
        (topic, body), = await ask(mosquitto_broker, "hermes/nlu/query", q, ["hermes/intent/#", "hermes/nlu/intentNotRecognized"])
        assert body["id"] == "q9"
        plans = [r.plan for r in leader.tasks.log if r.kind == "intent"]
        assert plans and "dev2" not in plans[-1]


@pytest.mark.parametrize("model,strategies", [("tiny-encoder", ["single", "pipeline", "tp", "adaptive"]),
                                              ("tiny-encoder-bp", ["bp-fixed", "single", "adaptive"])])
async def test_baseline_plans_on_full_replicas(mosquitto_broker, model, strategies):
    cat = tiny_catalog()
    refs = {}
    for name in cat.variants(model):  # adaptive may run another variant of the family (random weights)
        m = cat.load(name)
        ids = torch.tensor([m.tokenizer.encode("dim the lights in the hall")])
        with torch.inference_mode():
            refs[name] = mean_pool(m.model(ids, torch.ones_like(ids)), torch.ones_like(ids))
    async with home(mosquitto_broker, replicate_all=True) as (cluster, agents):
        await wait_for_placement(agents)
        reply_to = f"detransformer/{cluster}/replies/test"
        for k, strategy in enumerate(strategies):
            (t, r), = await ask(mosquitto_broker, f"detransformer/{cluster}/request",
                                {"id": f"p{k}", "reply_to": reply_to, "op": "embed", "input": "dim the lights in the hall",
                                 "params": {"model": model, "plan": strategy}}, [reply_to])
            assert "result" in r, r
            got = torch.tensor(r["result"]["embeddings"])
            plan = r["result"]["plan"]
            ran = plan.split(": ")[0] if ": " in plan else model  # "tiny-encoder: single on dev0 (float32)"
            assert strategy == "adaptive" or ran == model
            assert torch.nn.functional.cosine_similarity(got, refs[ran]).item() > 0.9999, (strategy, plan)
            if strategy != "adaptive":
                assert r["result"]["plan"].startswith({"bp-fixed": "block", "single": "single"}.get(strategy, strategy))
        (t, r), = await ask(mosquitto_broker, f"detransformer/{cluster}/request",
                            {"id": "px", "reply_to": reply_to, "op": "embed", "input": "x",
                             "params": {"model": model, "plan": "teleport"}}, [reply_to])
        assert r["error"]["code"] == "bad_request"


async def test_traced_request_carries_every_devices_timeline_and_followers_forward(mosquitto_broker):
    from detransformer_edge.parallel.trace import Span, breakdown
    from detransformer_edge.protocol.client import HomeClient

    async with home(mosquitto_broker, replicate_all=True) as (cluster, agents):
        leader = await wait_for_placement(agents)
        async with HomeClient(*mosquitto_broker, cluster=cluster) as client:
            reply = await client.request("embed", "hello home",
                                         {"model": "tiny-encoder-bp", "plan": "bp-fixed", "trace": True})
            plain = await client.request("embed", "hello home", {"model": "tiny-encoder-bp", "plan": "bp-fixed"})
        assert reply.error is None and reply.result is not None, reply
        assert "trace" not in (plain.result or {})  # tracing only when asked
        spans = [Span.from_list(row) for row in reply.result["trace"]]
        per = breakdown(spans)
        assert set(per) == {a.id for a in agents}  # bp-fixed runs on every device: every lane is there
        assert all(p["compute"] > 0 for p in per.values())
        assert any(s.kind == "plan" and s.device == leader.id for s in spans)
        publishes = [s for s in spans if s.kind == "publish"]
        assert publishes and all(s.nbytes > 0 and s.copies >= 1 for s in publishes)
        assert all(s.start <= s.end for s in spans)
        assert max(s.end for s in spans) - min(s.start for s in spans) <= reply.result["latency_ms"] / 1e3 + 0.5

        # a follower asks the leader for an intent (how a Wyoming front-end on any device answers)
        follower = next(a for a in agents if not a.cluster.is_leader)
        text = "turn on the kitchen light"
        forwarded = await follower.recognize(text)
        local = await leader.recognize(text)
        assert forwarded.intent == local.intent and abs(forwarded.confidence - local.confidence) < 1e-6
