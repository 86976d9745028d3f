"""Weights streamed from the leader over a real Mosquitto: a device without local files gets its
shards, a chunk corrupted in flight is caught by the shard's sha256 and fetched again, and an
interrupted transfer resumes from the chunks kept on disk."""

import asyncio
import contextlib
import hashlib
import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
import torch

from detransformer_edge.integrations import plugins_for
from detransformer_edge.model.encoder import mean_pool
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.protocol.codec import ProtocolError
from detransformer_edge.protocol.messages import DeviceStatus
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.protocol.weights import CHUNK_BYTES, WeightChunk, WeightWant
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.weight_stream import (
    WeightFetcher,
    WeightServer,
    WeightTransferError,
)
from detransformer_edge.service.weights import unit_parameters

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-encoder-bp"
SHA = "ab" * 32


# --- messages (no broker) ------------------------------------------------------------------------------


def test_messages_round_trip_and_reject_bad_input():
    want = WeightWant(MODEL, 3, ("embeddings", "sub_block.1"), {"sub_block.1": (0, 2)})
    assert WeightWant.from_json(want.to_json()) == want
    chunk = WeightChunk(MODEL, "layer.1", 2, 5, SHA, b"\x00" * 10)
    assert WeightChunk.from_bytes(chunk.to_bytes()) == chunk
    done = WeightChunk(MODEL, "layer.1", -1, 5, SHA)
    assert WeightChunk.from_bytes(done.to_bytes()) == done
    for bad in [b"{", b"[]", json.dumps({"model": MODEL, "placement_version": 1, "shards": []}).encode(),
                json.dumps({"model": MODEL, "placement_version": -1, "shards": ["x"]}).encode(),
                json.dumps({"model": MODEL, "placement_version": 1, "shards": ["a"], "have": {"b": [1]}}).encode(),
                json.dumps({"model": MODEL, "placement_version": 1, "shards": ["a"], "have": {"a": [-1]}}).encode()]:
        with pytest.raises(ProtocolError):
            WeightWant.from_json(bad)
    with pytest.raises(ProtocolError):
        WeightChunk(MODEL, "layer.1", 5, 5, SHA)  # index beyond total
    with pytest.raises(ProtocolError):
        WeightChunk(MODEL, "layer.1", 0, 5, "nothex")
    with pytest.raises(ProtocolError):
        WeightChunk(MODEL, "layer.1", 0, 5, SHA, b"x" * (CHUNK_BYTES + 1))
    with pytest.raises(ProtocolError):
        WeightChunk.from_bytes(b"\xc1garbage")
    status = DeviceStatus("dev2", False, "follower", 0.1, 50.0, 3, weights_percent=42.5)
    assert DeviceStatus.from_dict(status.to_dict()) == status
    assert "weights_percent" not in replace(status, weights_percent=None).to_dict()
    want_topics = ClusterTopics("home").weights_want
    assert want_topics.match("detransformer/home/weights/dev2/want") == "dev2"
    assert want_topics.match("detransformer/home/weights/a/b/want") is None


# --- leader and device over Mosquitto, without agents ---------------------------------------------------


@contextlib.asynccontextmanager
async def link(broker, server: WeightServer, fetcher: WeightFetcher, prefix: str):
    """Route wants to ``server`` and chunks to ``fetcher`` through the broker."""
    host, port = broker
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as lead, \
            aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as dev:
        server.publish = lambda t, p, q: lead.publish(t, p, qos=q)
        fetcher.publish = lambda t, p, q: dev.publish(t, p, qos=q)
        topics = server.topics
        await lead.subscribe(topics.weights_want.filter, qos=1)
        await dev.subscribe(topics.chunk_topic("dev9"), qos=1)
        await dev.subscribe(topics.weights_manifest.format("dev9"), qos=1)

        async def serve():
            async for m in lead.messages:
                await server.handle_want(topics.weights_want.match(m.topic.value), bytes(m.payload))

        async def receive():
            async for m in dev.messages:
                if m.topic.value.endswith("/manifest"):
                    fetcher.handle_manifest(m.topic.value, bytes(m.payload))
                else:
                    fetcher.handle_chunk(bytes(m.payload))

        tasks = [asyncio.create_task(serve()), asyncio.create_task(receive())]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.close()


def reference(units):
    served = tiny_catalog().get(MODEL)
    cfg = served.config()
    return served.tensors({n for u in units for n in unit_parameters(cfg, u)})


def make_pair(tmp_path, prefix, signer=None, **fetcher_kw):
    cat = tiny_catalog()
    topics = ClusterTopics(prefix.split("/", 1)[1])  # the fixture's unique prefix as a cluster
    server = WeightServer(cat, None, topics, chunk_bytes=2048, signer=signer)
    fetcher = WeightFetcher("dev9", cat, None, topics, tmp_path / "cache", **fetcher_kw)
    return server, fetcher


@pytest.mark.mosquitto
async def test_corrupted_chunk_is_detected_and_fetched_again(mosquitto_broker, tmp_path, topic_prefix):
    server, fetcher = make_pair(tmp_path, topic_prefix, timeout_s=5.0)
    corrupted = []

    def flip(device, chunk):
        if chunk.shard == "sub_block.2" and chunk.index == 1 and not corrupted:
            corrupted.append(chunk.index)
            return replace(chunk, data=bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:])
        return chunk

    server.on_send = flip
    units = ("embeddings", "sub_block.2", "layer.1")
    async with link(mosquitto_broker, server, fetcher, topic_prefix):
        got = await asyncio.wait_for(fetcher.fetch(MODEL, 1, units), 60)
    ref = reference(units)
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    assert corrupted == [1] and fetcher.corrupt_shards == 1
    sent = [(s, i) for _, _, s, i in server.sent]
    assert sent.count(("sub_block.2", 1)) == 2  # the whole shard again, after the sha256 failed
    assert sent.count(("layer.1", 0)) == 1  # the good shards only once


@pytest.mark.mosquitto
async def test_interrupted_transfer_resumes_without_refetching(mosquitto_broker, tmp_path, topic_prefix):
    units = ("embeddings", "sub_block.0", "layer.1")
    server, fetcher = make_pair(tmp_path, topic_prefix, max_concurrent=1)
    stalled = asyncio.Event()

    def stall(device, chunk):  # the link dies in the middle of layer.1
        if chunk.shard == "layer.1" and chunk.index >= 3:
            stalled.set()
            return None
        return chunk

    server.on_send = stall
    async with link(mosquitto_broker, server, fetcher, topic_prefix):
        task = asyncio.create_task(fetcher.fetch(MODEL, 1, units))
        await asyncio.wait_for(stalled.wait(), 60)
        await asyncio.sleep(0.3)  # let the chunks in flight land
        assert 66 < fetcher.percent() < 100  # two of three shards, and part of the third
        assert 0 < fetcher.progress()[f"{MODEL}/layer.1"] < 100
        task.cancel()  # the device restarts
        with pytest.raises(asyncio.CancelledError):
            await task
    first = list(server.sent)
    cache = tmp_path / "cache" / MODEL
    kept = {(u, int(p.stem)) for u in units for p in (cache / u).glob("*.chunk")}
    assert {i for u, i in kept if u == "layer.1"} == {0, 1, 2}
    assert {u for u, _ in kept} == set(units)

    server2, fetcher2 = make_pair(tmp_path, topic_prefix, max_concurrent=1)  # same cache dir
    async with link(mosquitto_broker, server2, fetcher2, topic_prefix):
        got = await asyncio.wait_for(fetcher2.fetch(MODEL, 2, units), 60)
    ref = reference(units)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    resent = [(s, i) for _, _, s, i in server2.sent]
    assert not set(resent) & kept, sorted(set(resent) & kept)[:5]
    # completed shards got only a 'complete' notice; layer.1 exactly its missing chunks, once each
    total = json.loads((cache / "layer.1" / "manifest.json").read_text())["total"]
    assert resent == [("layer.1", i) for i in range(3, total)]
    assert [i for _, _, s, i in first if s == "layer.1"] == list(range(total))  # (3.. were dropped)


@pytest.mark.mosquitto
async def test_silent_leader_gives_a_clear_error(mosquitto_broker, tmp_path, topic_prefix):
    server, fetcher = make_pair(tmp_path, topic_prefix, timeout_s=0.3, retries=1)
    server.on_send = lambda device, chunk: None  # the leader's chunks never arrive
    async with link(mosquitto_broker, server, fetcher, topic_prefix):
        with pytest.raises(WeightTransferError, match="after 2 tries"):
            await asyncio.wait_for(fetcher.fetch(MODEL, 1, ("layer.1",)), 30)
    assert fetcher.progress() == {} and fetcher.percent() is None


KEY = "a long cluster secret for tests"


@pytest.mark.mosquitto
async def test_signed_manifest_rejects_a_forged_shard(mosquitto_broker, tmp_path, topic_prefix):
    """With a cluster key, chunks that agree with their own (forged) sha256 are still refused:
    the shard must match the SHA-256 the leader signed."""
    from detransformer_edge.protocol.signing import CommandSigner, CommandVerifier

    server, fetcher = make_pair(tmp_path, topic_prefix, signer=CommandSigner(KEY, "lead"),
                                verifier=CommandVerifier(KEY), timeout_s=5.0)
    fake = b"not the weights" * 500
    fake_sha = hashlib.sha256(fake).hexdigest()
    forged = []

    def forge(device, chunk):  # a forger answering in the leader's place, the first time
        if chunk.shard == "layer.1" and len(forged) < math.ceil(len(fake) / 2048):
            i = len(forged)
            forged.append(i)
            return WeightChunk(chunk.model, chunk.shard, i, math.ceil(len(fake) / 2048), fake_sha,
                               fake[i * 2048:(i + 1) * 2048])
        return chunk

    server.on_send = forge
    async with link(mosquitto_broker, server, fetcher, topic_prefix):
        got = await asyncio.wait_for(fetcher.fetch(MODEL, 1, ("layer.1",)), 60)
    ref = reference(("layer.1",))
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert forged and fetcher.corrupt_shards == 1

    # a device with the key refuses a leader without it
    server2, fetcher2 = make_pair(tmp_path / "b", topic_prefix, verifier=CommandVerifier(KEY), timeout_s=0.5, retries=1)
    async with link(mosquitto_broker, server2, fetcher2, topic_prefix):
        with pytest.raises(WeightTransferError):
            await asyncio.wait_for(fetcher2.fetch(MODEL, 1, ("layer.1",)), 30)


# --- the agents: a device configured to stream ---------------------------------------------------------


@pytest.mark.mosquitto
@pytest.mark.parametrize("key", [None, KEY])
async def test_streaming_device_gets_its_weights_and_answers(mosquitto_broker, tmp_path, key):
    from tests.test_service import PROFILES, agent_config, ask, wait_for_placement

    host, port = mosquitto_broker
    cluster = f"t{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(3):
            cfg = replace(agent_config(f"dev{i}", cluster, host, port), cluster_key=key)
            if i == 2:
                cfg = replace(cfg, weights="stream", weights_cache=tmp_path / "weights")
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            agent = HomeAgent(cfg, prof, tiny_catalog(), plugins=plugins_for(cfg), broker=mosquitto_broker, intent_threshold=0.0,
                              replan_delay_s=0.2, replicate_all=True)
            agents.append(await stack.enter_async_context(agent))
        leader = await wait_for_placement(agents, timeout=60)
        assert (agents[2].weight_fetcher.verifier is None) == (key is None)  # signed manifests with a key
        streamed = {(d, m) for d, m, _, _ in leader.weight_server.sent}
        assert {d for d, _ in streamed} == {"dev2"}, streamed  # only the streaming device asked
        assert {m for _, m in streamed} == set(agents[2].host.weight_bytes())
        assert list((tmp_path / "weights" / cluster / "dev2" / MODEL).glob("*/manifest.json"))

        m = tiny_catalog().load(MODEL)
        ids = torch.tensor([m.tokenizer.encode("dim the lights in the hall")])
        with torch.inference_mode():
            ref = mean_pool(m.model(ids, torch.ones_like(ids)), torch.ones_like(ids))
        reply_to = f"detransformer/{cluster}/replies/test"
        (_, r), = await ask(mosquitto_broker, f"detransformer/{cluster}/request",
                            {"id": "w1", "reply_to": reply_to, "op": "embed", "input": "dim the lights in the hall",
                             "params": {"model": MODEL, "plan": "bp-fixed"}}, [reply_to])
        assert "result" in r, r
        assert "dev2" in r["result"]["plan"], r["result"]["plan"]
        got = torch.tensor(r["result"]["embeddings"])
        assert torch.nn.functional.cosine_similarity(got, ref).item() > 0.9999


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_pretrained_models_stream_and_answer_like_one_device(mosquitto_broker, tmp_path):
    """MiniLM and the intent model: two devices read their share from local files, the third
    streams it; embeddings and intents equal the single-device models'."""
    from detransformer_edge.nlu.parser import IntentParser, default_weights_dir
    from detransformer_edge.service.catalog import default_catalog
    from detransformer_edge.weights.loaders import load_model
    from tests.test_service import PROFILES, agent_config, ask, wait_for_placement

    if not (default_weights_dir() / "model.safetensors").is_file():
        pytest.skip("no shipped intent model (detransformer_edge/nlu/weights)")
    torch.set_num_threads(1)
    host, port = mosquitto_broker
    cluster = f"t{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(3):
            cfg = agent_config(f"dev{i}", cluster, host, port)
            if i == 2:
                cfg = replace(cfg, weights="stream", weights_cache=tmp_path / "weights")
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            agent = HomeAgent(cfg, prof, default_catalog().subset(["intent", "minilm-l6"]), plugins=plugins_for(cfg), broker=mosquitto_broker,
                              intent_threshold=0.0, replan_delay_s=0.2, replicate_all=True)
            agents.append(await stack.enter_async_context(agent))
        leader = await wait_for_placement(agents, timeout=120)
        assert {d for d, _, _, _ in leader.weight_server.sent} == {"dev2"}
        assert set(agents[2].host.weight_bytes()) == {"intent", "minilm-l6"}

        text = "turn on the light in the kitchen"
        full = load_model("minilm-l6")
        enc = full.tokenizer.encode(text)
        ids = torch.tensor([enc])
        with torch.inference_mode():
            ref = mean_pool(full.model(ids, torch.ones_like(ids)), torch.ones_like(ids))
        reply_to = f"detransformer/{cluster}/replies/test"
        for k, plan in enumerate(["single", "pipeline", "tp"]):
            (_, r), = await ask(mosquitto_broker, f"detransformer/{cluster}/request",
                                {"id": f"m{k}", "reply_to": reply_to, "op": "embed", "input": text,
                                 "params": {"model": "minilm-l6", "plan": plan}}, [reply_to], timeout=60)
            assert "result" in r, r
            got = torch.tensor(r["result"]["embeddings"])
            assert torch.nn.functional.cosine_similarity(got, ref).item() > 0.9999, plan
            if plan != "single":
                assert "dev2" in r["result"]["plan"], r["result"]["plan"]

        parser = IntentParser.load_default()
        expected = parser.parse(text)
        q = {"input": text, "siteId": "kitchen", "id": "q1", "sessionId": "s1"}
        (_, body), = await ask(mosquitto_broker, "hermes/nlu/query", q,
                                   ["hermes/intent/#", "hermes/nlu/intentNotRecognized"], timeout=60)
        assert body["intent"]["intentName"] == expected.intent_name, body
        assert abs(body["intent"]["confidenceScore"] - expected.confidence) < 1e-3


def test_the_cache_keeps_its_bound_by_dropping_the_least_recently_used_shards(tmp_path):
    import os

    from detransformer_edge.service.weight_stream import prune_cache

    def shard(model, unit, size, used):
        d = tmp_path / model / unit
        d.mkdir(parents=True)
        (d / "0.chunk").write_bytes(b"x" * size)
        (d / "manifest.json").write_text("{}")
        os.utime(d / "manifest.json", (used, used))

    shard("m", "layer.0", 1000, used=100)  # oldest
    shard("m", "layer.1", 1000, used=200)
    shard("m", "layer.2", 1000, used=300)
    shard("n", "embeddings", 1000, used=50)  # the oldest of all, but in use
    freed = prune_cache(tmp_path, max_bytes=2500, keep={("n", "embeddings")})
    assert not (tmp_path / "m" / "layer.0").exists() and not (tmp_path / "m" / "layer.1").exists()
    assert (tmp_path / "m" / "layer.2").exists() and (tmp_path / "n" / "embeddings").exists()
    assert freed >= 2000
    assert prune_cache(tmp_path, max_bytes=0, keep={("n", "embeddings")}) > 0
    assert not (tmp_path / "m").exists() and (tmp_path / "n" / "embeddings").exists()  # empty model dirs go too
    assert prune_cache(tmp_path / "nowhere", 0) == 0
