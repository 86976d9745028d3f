"""The chaos soak's machinery (``bench/chaos.py``): how it counts answers per id, judges memory and
file descriptors flat, and plans its phases; the client feature it relies on (every answer to an
id is seen, a second one included); and a short run of the whole thing in the testbed (root): 30 s
with one fault of each kind, every request answered exactly once within its bound."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from detransformer_edge.protocol import hermes
from detransformer_edge.protocol.client import HomeClient
from detransformer_edge.protocol.messages import Reply
from detransformer_edge.protocol.topics import ClusterTopics
from detransformer_edge.transport.session import MqttSession, SessionSettings

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "bench" / "chaos.py")
assert _spec is not None and _spec.loader is not None
chaos = importlib.util.module_from_spec(_spec)
sys.modules["bench_chaos"] = chaos  # dataclasses look their module up
_spec.loader.exec_module(chaos)


# --- counting -----------------------------------------------------------------------------------------


def outcome(answers: list[float], bound: float = 30.0, sent: float = 10.0) -> object:
    o = chaos.Outcome("q1", "voice", "steady", sent, bound)
    o.answers = [(t, "intent") for t in answers]
    return o


def test_verdicts_count_answers_per_id():
    assert outcome([]).verdict() == "lost"
    assert outcome([12.0]).verdict() == "once"
    assert outcome([40.0]).verdict() == "once"  # exactly at the bound (sent 10 + 30)
    assert outcome([40.5]).verdict() == "late"
    assert outcome([12.0, 13.0]).verdict() == "duplicated"
    assert outcome([12.0, 99.0]).verdict() == "duplicated"  # a second answer after the bound still counts
    assert outcome([12.5]).latency_s == 2.5


def test_answer_labels_are_typed():
    assert chaos.answer_label("hermes/intent/GetTime", {}) == "intent"
    assert chaos.answer_label("hermes/nlu/intentNotRecognized", {}) == "not_recognized"
    assert chaos.answer_label("hermes/error/nlu", {"error": "bad"}) == "nlu_error"
    assert chaos.answer_label("P/replies/x", {"id": "1", "result": {"text": ""}}) == "result"
    assert chaos.answer_label("P/replies/x", {"id": "1", "error": {"code": "busy", "message": ""}}) == "error:busy"


def test_summary_per_phase_and_all():
    plan = chaos.phases(150.0)
    rows = []
    for i, (phase, answers) in enumerate([("steady", [1.0]), ("steady", []), ("link cuts", [70.0, 71.0]),
                                          ("link cuts", [200.0])]):
        o = chaos.Outcome(f"q{i}", "voice" if i % 2 else "generate", phase, 0.0 if phase == "steady" else 60.0,
                          30.0 if i % 2 else 60.0)
        o.answers = [(t, "result") for t in answers]
        o.sends = 2 if i == 3 else 1
        rows.append(o)
    table = {r["phase"]: r for r in chaos.summarize_requests(rows, plan)}
    assert table["steady"]["sent"] == 2 and table["steady"]["once"] == 1 and table["steady"]["lost"] == 1
    assert table["link cuts"]["duplicated"] == 1 and table["link cuts"]["late"] == 1
    assert table["link cuts"]["resent"] == 1
    assert table["agent kills"]["sent"] == 0 and table["agent kills"]["voice"]["p50_ms"] is None
    assert table["all"]["sent"] == 4 and table["all"]["once"] + table["all"]["lost"] + table["all"]["late"] \
        + table["all"]["duplicated"] == 4
    assert table["steady"]["generate"]["p50_ms"] == 1000.0


def test_phases_cover_the_soak_in_order():
    plan = chaos.phases(900.0)
    assert [p.name for p in plan] == ["steady", "agent kills", "link cuts", "broker restarts", "steady again"]
    assert plan[0].start_s == 0 and abs(plan[-1].end_s - 900.0) < 1e-6
    assert all(a.end_s == b.start_s for a, b in zip(plan, plan[1:]))
    assert {p.fault for p in plan} == {None, *chaos.FAULT_KINDS}
    assert chaos.phase_of(plan, 130.0) == "agent kills" and chaos.phase_of(plan, 2000.0) == "steady again"


def test_fault_timing_is_seeded():
    import random

    timing = chaos.FaultTiming()
    a = [timing.down("kill", random.Random(7), 10.0) for _ in range(3)]
    b = [timing.down("kill", random.Random(7), 10.0) for _ in range(3)]
    assert a == b and all(5.0 <= x <= 15.0 for x in a)


# --- flat or not --------------------------------------------------------------------------------------


def series(rss_kb_per_s: float, fds_per_min: float, seconds: int = 600, step: int = 5) -> list[tuple]:
    return [(float(t), 300_000 + rss_kb_per_s * t, 20 + int(fds_per_min * t / 60)) for t in range(0, seconds, step)]


def test_flat_series_is_flat():
    got = chaos.judge_series(series(0.0, 0.0), warm_from_s=60.0, min_span_s=180.0)
    assert got["flat"] is True and got["rss_mb_per_h"] == 0.0 and got["fds_per_h"] == 0.0


def test_a_warm_up_jump_is_not_a_leak():
    pts = [(t, 250_000.0 if t < 60 else 330_000.0, 7 if t < 60 else 9) for t, _, _ in series(0, 0)]
    assert chaos.judge_series(pts, warm_from_s=60.0, min_span_s=180.0)["flat"] is True
    assert chaos.judge_series(pts, warm_from_s=0.0, min_span_s=180.0)["flat"] is False


def test_leaks_are_not_flat():
    fd_leak = chaos.judge_series(series(0.0, 1.0), warm_from_s=60.0, min_span_s=180.0)  # one FD a minute
    assert fd_leak["flat"] is False and 55 < fd_leak["fds_per_h"] < 65
    rss_leak = chaos.judge_series(series(10.0, 0.0), warm_from_s=60.0, min_span_s=180.0)  # 10 kB/s = 35 MB/h
    assert rss_leak["flat"] is False and 34 < rss_leak["rss_mb_per_h"] < 36


def test_short_series_are_not_judged():
    got = chaos.judge_series(series(10.0, 1.0, seconds=120), warm_from_s=60.0, min_span_s=180.0)
    assert got["flat"] is None and got["samples"] == 24


# --- the client sees every answer ---------------------------------------------------------------------


@pytest.mark.mosquitto
async def test_follow_answers_sees_a_second_answer_to_one_id(mosquitto_broker):
    """A leader that answers one request (or query) twice: ``request`` returns the first reply, and
    ``follow_answers`` reports both, which is how the soak counts duplicates."""
    host, port = mosquitto_broker
    cluster = f"c{uuid.uuid4().hex[:8]}"
    topics = ClusterTopics(cluster)
    leader = MqttSession(SessionSettings(host, port, f"twice-{cluster}", protocol="3.1.1"))

    async def answer_twice(topic: str, payload: bytes, _props: object) -> None:
        d = json.loads(payload)
        if topic == hermes.TOPIC_NLU_QUERY:
            if d.get("siteId") != cluster:
                return  # another test's query
            body = json.dumps({"input": d["input"], "siteId": cluster, "id": d["id"], "sessionId": d["sessionId"]})
            for _ in range(2):
                await leader.publish(hermes.TOPIC_NOT_RECOGNIZED, body, qos=1)
            return
        for n in range(2):
            await leader.publish(d["reply_to"], Reply(d["id"], result={"n": n}).to_json(), qos=1)

    leader.subscribe(topics.request.format(), answer_twice, 1)
    leader.subscribe(hermes.TOPIC_NLU_QUERY, answer_twice, 1)
    seen: list[tuple[str, str]] = []
    async with asyncio.timeout(20), leader:
        await leader.wait_connected(10)
        async with HomeClient(host, port, cluster) as client:
            client.follow_answers(lambda rid, topic, body: seen.append((rid, topic)))
            reply = await client.request("embed", "hi", request_id="same-id-1", timeout=10)
            assert reply.id == "same-id-1" and reply.result == {"n": 0}
            answer = await client.hermes_query("hello", site_id=cluster, query_id="q-same-1", timeout=10)
            assert answer.topic == hermes.TOPIC_NOT_RECOGNIZED and answer.payload["id"] == "q-same-1"
            while len(seen) < 4:
                await asyncio.sleep(0.02)
    assert sorted(seen) == sorted([("same-id-1", client.requester.reply_to)] * 2
                                  + [("q-same-1", hermes.TOPIC_NOT_RECOGNIZED)] * 2)


# --- a short soak in the testbed ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.testbed
@pytest.mark.mosquitto
def test_short_chaos_soak(tmp_path):
    """30 s, three agents (lease 3 s, keepalive 2 s), one fault of each kind: every request answered
    exactly once within its bound, every fault undone, every agent process sampled."""
    from detransformer_edge.testbed import TestbedUnavailable, check_host
    from detransformer_edge.transport.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    try:
        check_host()
    except TestbedUnavailable as exc:
        pytest.skip(f"testbed unavailable here: {exc}")
    pytest.importorskip("matplotlib")
    out = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--minutes", "0.5", "--agents", "3", "--rate", "2",
         "--lease-s", "3", "--keepalive-s", "2", "--status-s", "0.5", "--sample-s", "2", "--grace-s", "3",
         "--seed", "5", "--ready-timeout-s", "90", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=240)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    total = res["requests"][-1]
    assert total["sent"] >= 50, total  # 2 per second for 30 s
    assert (total["lost"], total["duplicated"], total["late"]) == (0, 0, 0), res["not_once"][:5]
    assert total["once"] == total["sent"]
    actions = [(ev["fault"], ev["action"]) for ev in res["faults"]]
    assert ("kill", "SIGKILL") in actions and ("kill", "restarted") in actions
    assert ("link", "down") in actions and ("link", "restored") in actions
    assert ("broker", "stopped (SIGTERM)") in actions and ("broker", "started") in actions
    assert any(ev["fault"] == "kill" and ev.get("leader") for ev in res["faults"]), "the first kill hits the leader"
    killed = next(ev["target"] for ev in res["faults"] if ev["action"] == "SIGKILL")
    assert f"{killed}#2" in res["samples"], sorted(res["samples"])  # the restarted agent: its own series
    assert {name.split("#")[0] for name in res["samples"]} == {"dev0", "dev1", "dev2"}
    assert all(len(s) >= 3 and all(fds > 3 and rss > 10_000 for _, rss, fds in s)
               for name, s in res["samples"].items() if not name.endswith("#1") or name.split("#")[0] != killed)
    assert out.with_suffix(".png").stat().st_size > 10_000 and out.with_suffix(".md").exists()
    assert done.returncode == 0, done.stdout[-2000:]


# --- what the soak found: a re-sent id while its first copy runs ---------------------------------------


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["request", "hermes"])
async def test_an_id_sent_again_while_it_runs_is_answered_once(mosquitto_broker, kind):
    """The client contract: no answer yet, send the same id again. If the leader is still running
    the first copy (a slow home: runs take 1.5 s here), the re-send must not run a second time and
    get a second answer; before the fix both copies ran and the client got two answers."""
    from tests.test_service import home, wait_for_placement

    host, port = mosquitto_broker
    async with home(mosquitto_broker) as (cluster, agents):
        lead = await wait_for_placement(agents)
        run, runs = lead.host.run_coordinator, []

        async def slow(model, job):
            runs.append(job)
            await asyncio.sleep(1.5)
            return await run(model, job)

        lead.host.run_coordinator = slow  # type: ignore[method-assign]
        seen: list[str] = []
        rid = f"again-{kind}-{uuid.uuid4().hex[:6]}"
        async with asyncio.timeout(30), HomeClient(host, port, cluster) as client:
            client.follow_answers(lambda answer_id, topic, body: seen.append(answer_id))

            async def ask(timeout: float) -> object:
                if kind == "request":
                    return await client.request("embed", "hello home", request_id=rid, timeout=timeout)
                return await client.hermes_query("turn on the kitchen light", site_id=cluster, query_id=rid,
                                                 timeout=timeout)

            with pytest.raises(TimeoutError):
                await ask(0.4)  # the first copy is running now
            answer = await ask(10.0)  # the same id again
            await asyncio.sleep(2.0)  # a second run would answer now
        lead.host.run_coordinator = run  # type: ignore[method-assign]
    assert seen.count(rid) == 1, seen
    assert len(runs) == 1
    if kind == "request":
        assert answer.error is None and lead.cluster.desk.memory.copies == 1
    else:
        assert answer.topic.startswith("hermes/") and next(
            p for p in lead.plugins if p.name == "hermes").memory.copies == 1


@pytest.mark.mosquitto
@pytest.mark.parametrize("kind", ["request", "hermes"])
async def test_a_copy_that_comes_just_after_the_answer_is_not_answered_again(mosquitto_broker, kind):
    """Copies the broker held back behind a stalled connection reach the leader in a burst after
    it answered the first (the soak saw nine ids answered twice this way after a link cut). A copy
    within a lease (3 s here) of the answer gets nothing; one after that is answered (the first
    answer may have been lost)."""
    from tests.test_service import home, wait_for_placement

    host, port = mosquitto_broker
    async with home(mosquitto_broker) as (cluster, agents):
        lead = await wait_for_placement(agents)
        seen: list[str] = []
        rid = f"late-{kind}-{uuid.uuid4().hex[:6]}"
        async with asyncio.timeout(30), HomeClient(host, port, cluster) as client:
            client.follow_answers(lambda answer_id, topic, body: seen.append(answer_id))

            async def ask(timeout: float) -> object:
                if kind == "request":
                    return await client.request("embed", "hello home", request_id=rid, timeout=timeout)
                return await client.hermes_query("turn on the kitchen light", site_id=cluster, query_id=rid,
                                                 timeout=timeout)

            await ask(10.0)
            t_answer = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await ask(1.0)  # a copy just after the answer: nothing
            assert seen.count(rid) == 1, seen
            await asyncio.sleep(max(0.0, t_answer + 3.0 + 0.3 - asyncio.get_running_loop().time()))
            await ask(10.0)  # a lease later: answered again
        memory = lead.cluster.desk.memory if kind == "request" else next(
            p for p in lead.plugins if p.name == "hermes").memory
    assert seen.count(rid) == 2, seen
    assert memory.copies == 1


def test_answer_memory_window_and_bound():
    from detransformer_edge.cluster.requests import AnswerMemory

    now = [0.0]
    memory = AnswerMemory(window_s=10.0, size=3, clock=lambda: now[0])
    assert memory.begin("a") and not memory.begin("a")  # running: a copy
    memory.done("a")
    now[0] = 9.9
    assert not memory.begin("a")  # answered 9.9 s ago: still a copy
    now[0] = 10.1
    assert memory.begin("a")  # a lease later: answered again
    memory.done("a", delivered=False)
    assert memory.begin("a")  # an answer that was not sent is not remembered
    memory.done("a")
    for key in "bcde":
        assert memory.begin(key)
        memory.done(key)
    assert memory.begin("e") is False and len(memory.answered) == 3
    assert memory.begin("a")  # the oldest was forgotten to keep the bound
    assert memory.copies == 3


# --- what the soak found: RSS that steps up with every re-placement -----------------------------------

_REPLACE_40_TIMES = """
import asyncio
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.host import ModelHost
from detransformer_edge.transport.memory import MemoryHub, MemoryTransport

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

def models(tp):
    full = (0, 1, 2, 3)
    return {name: DeviceWeights(embeddings=True, sub_blocks=full if name in ("intent", "tiny-encoder-bp") else (0,),
                                whole_layers=full, tp_shards=(tp,))
            for name in ("intent", "tiny-decoder", "tiny-encoder", "tiny-encoder-bp")}

async def main():
    host = ModelHost(MemoryTransport(MemoryHub(), "dev1"), tiny_catalog())
    shards = [(1, 4), (0, 3), (1, 3), (0, 4)]  # what a device of a 4-device home gets as devices come and go
    for i in range(40):
        await host.assign(i + 1, models(shards[i % 4]))
        if i == 0:
            first = rss_mb()
    print(round(rss_mb() - first, 2))
    await host.close()

asyncio.run(main())
"""


@pytest.mark.slow
def test_replacements_do_not_ratchet_the_rss_up():
    """A device re-placed 40 times (its TP shard of every tiny model changing each time, as in the
    soak when devices leave and return) must not keep the high-water mark of every placement: glibc
    keeps freed heap pages unless told to give them back. Measured: +9 MB before the fix, +3.5 MB
    with it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _REPLACE_40_TIMES], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mb = float(done.stdout.strip().splitlines()[-1])
    assert growth_mb < 6.0, f"RSS grew {growth_mb} MB over 40 re-placements"


# --- what the soak found: a deposed leader answering what its successor answered ----------------------


class _Session:
    """What the request desk needs of a session: publish (recorded) and spawn."""

    is_v5 = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.tasks: list[asyncio.Task] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, properties: object = None) -> None:
        self.sent.append((topic, json.loads(payload)))

    def spawn(self, coro, name: str) -> asyncio.Task:
        self.tasks.append(asyncio.ensure_future(coro))
        return self.tasks[-1]


@pytest.mark.parametrize("taken_over", [False, True])
async def test_a_request_that_finishes_after_another_device_took_the_lease_is_not_answered(taken_over):
    """The soak (lease 3 s) saw a leader whose link was cut answer, once back, a query it had
    taken before the cut, after the new leader had already answered the client's re-send: two
    answers. A request that finishes when another device holds the lease is left to it."""
    from detransformer_edge.cluster.requests import RequestDesk

    session, release = _Session(), asyncio.Event()
    leader_now = ["dev0"]

    async def handler(request):
        await release.wait()  # the run; meanwhile the lease may move
        return {"ok": True}

    desk = RequestDesk(session, ClusterTopics("home").reply, handler, superseded=lambda: leader_now[0] != "dev0")
    desk.take(json.dumps({"id": "r1", "reply_to": "detransformer/home/replies/c", "op": "embed",
                          "input": "hi"}).encode(), None)
    await asyncio.sleep(0.01)
    if taken_over:
        leader_now[0] = "dev1"
    release.set()
    await asyncio.gather(*session.tasks)
    assert len(session.sent) == (0 if taken_over else 1)
    assert desk.dropped == (1 if taken_over else 0) and desk.pending == 0
    assert desk.memory.running == set()


async def test_a_hermes_query_that_finishes_after_another_device_took_the_lease_is_not_answered():
    from types import SimpleNamespace

    from detransformer_edge.integrations.hermes import HermesNlu
    from detransformer_edge.service.intents import IntentResult

    failed: list[tuple[str, str]] = []
    session = _Session()
    home_ = SimpleNamespace(session=session, cluster=SimpleNamespace(superseded=True, lease=SimpleNamespace(id="dev1")),
                            answer_failed=lambda cid, err: failed.append((cid, err)))

    async def recognize(text, client_id=None, allowed=None):
        return IntentResult("GetTime", 0.9)

    home_.recognize = recognize
    await HermesNlu()._answer(home_, json.dumps({"input": "what time is it", "id": "q1"}).encode())
    assert session.sent == [] and failed == [("q1", "hermes answer dropped: another device leads now")]
    home_.cluster.superseded = False
    await HermesNlu()._answer(home_, json.dumps({"input": "what time is it", "id": "q2"}).encode())
    assert [t for t, _ in session.sent] == ["hermes/nlu/intentParsed", "hermes/intent/GetTime"]
