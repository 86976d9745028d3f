"""The benchmark's timing client (``bench/client.py``): jobs in on stdin, timed answers out on
stdout, every request through ``HomeClient``; a fake leader on a real Mosquitto answers."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import pytest

from detransformer_edge.protocol.messages import Reply, Request, TokenEvent
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.transport.session import MqttSession, SessionSettings

pytestmark = pytest.mark.mosquitto


async def test_the_timing_client_asks_through_the_home_client(mosquitto_broker: tuple[str, int]) -> None:
    host, port = mosquitto_broker
    cluster = f"b{uuid.uuid4().hex[:8]}"
    topics = ClusterTopics(cluster)
    seen: list[Request] = []
    leader = MqttSession(SessionSettings(host, port, f"leader-{cluster}", protocol="3.1.1"))

    async def answer(topic: str, payload: bytes, _props: object) -> None:
        req = topics.request.decode(payload)
        seen.append(req)
        if req.input == "never answered":
            return
        if req.op == "generate":
            await leader.publish(req.reply_to, TokenEvent(req.id, 1, "hel").to_json(), qos=0)
            reply = Reply(req.id, {"text": "hello", "tokens": 2, "plan": "single on dev0"})
        elif req.input == "too long":
            reply = Reply.failure(req.id, "bad_request", "too many tokens")
        else:
            reply = Reply(req.id, {"embeddings": [[0.6, 0.8]], "plan": "single on dev0"})
        await leader.publish(req.reply_to, topics.reply.encode(reply), qos=1)

    leader.subscribe(topics.request.format(), answer, 1)
    async with leader:
        await leader.wait_connected(10)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "detransformer_edge.bench.client", "--host", host, "--port", str(port),
            "--cluster", cluster, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async def ask(job: dict) -> dict:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write((json.dumps(job) + "\n").encode())
                await proc.stdin.drain()
                return json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))

            assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)) == {"ok": True, "ready": True}
            emb = await ask({"op": "embed", "input": "hi", "params": {"model": "m"}})
            assert emb["ok"] and emb["result"] == {"plan": "single on dev0"} and "embeddings" not in emb
            assert 0 < emb["latency_s"] < 30
            kept = await ask({"op": "embed", "input": ["a", "b"], "want_embeddings": True})
            assert kept["embeddings"] == [[0.6, 0.8]]
            gen = await ask({"op": "generate", "input": "say", "params": {"max_new_tokens": 2}})
            assert gen["ok"] and gen["result"] == {"tokens": 2, "plan": "single on dev0"}  # the streamed piece is skipped
            bad = await ask({"op": "embed", "input": "too long"})
            assert bad["ok"] is False and bad["error"] == {"code": "bad_request", "message": "too many tokens"}
            lost = await ask({"op": "embed", "input": "never answered", "timeout_s": 0.5})
            assert lost == {"ok": False, "error": "no reply within 0.5 s"}
            refused = await ask({"op": "generate", "input": ["not", "one", "prompt"]})  # never sent
            assert refused["ok"] is False and "single string" in str(refused["error"])
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
    assert [r.op for r in seen] == ["embed", "embed", "generate", "embed", "embed"]
    assert {r.reply_to for r in seen} == {seen[0].reply_to}
    assert seen[0].reply_to.startswith(f"detransformer/{cluster}/replies/bench-")
    assert seen[0].params == {"model": "m"} and seen[1].input == ("a", "b")
    assert proc.returncode == 0
