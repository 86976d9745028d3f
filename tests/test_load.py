"""Load against three agent processes (tiny catalog) on a real Mosquitto: 200 Hermes voice
queries in bursts of 20 concurrent clients all answered exactly once, with p50/p99 latency
printed; a burst far beyond the leader's queue gets clear ``busy`` errors (hermes/nlu/intentNotRecognized for
voice, error code ``busy`` for general requests), one reply per id, and memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
from pathlib import Path

import pytest

from detransformer_edge.service.fleet import AgentFleet, Answer, HomeWatcher, rss_kb
from detransformer_edge.transport.broker import find_mosquitto, run_mosquitto

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

QUERIES = ("turn on the kitchen light", "set a timer for ten minutes", "what's the weather like",
           "lock the front door", "add oat milk to the shopping list")
REPORT = Path(os.environ.get("DTE_LOAD_REPORT", "/tmp/dte-load.json"))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


@pytest.fixture
def home_fleet(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    with run_mosquitto(workdir=tmp_path) as broker:
        fleet = AgentFleet(tmp_path, (broker.host, broker.port), keepalive_s=5, lease_s=6.0, status_interval_s=1.0,
                           replicate_all=False)
        with fleet:
            yield (broker.host, broker.port), fleet


async def test_200_voice_queries_in_bursts_of_20(home_fleet):
    (host, port), fleet = home_fleet
    async with asyncio.timeout(None) as budget, contextlib.AsyncExitStack() as stack:
        main = await stack.enter_async_context(HomeWatcher(host, port, fleet.cluster))
        leader, _ = await fleet.wait_ready(main)  # start-up: as long as the agents progress
        budget.reschedule(asyncio.get_running_loop().time() + 150)  # then the test's own bound
        clients = [await stack.enter_async_context(HomeWatcher(host, port, fleet.cluster)) for _ in range(20)]
        warm = await main.hermes("hello")
        assert warm is not None and warm.ok
        alone = []  # for scale: one query at a time
        for k in range(20):
            a = await main.hermes(QUERIES[k % len(QUERIES)], rid=f"alone{k}")
            assert a is not None and a.ok
            alone.append(a.latency_s * 1e3)
        answers: list[Answer | None] = []
        t0 = asyncio.get_running_loop().time()
        for burst in range(10):
            answers += await asyncio.gather(*(c.hermes(QUERIES[(burst + k) % len(QUERIES)], timeout=60,
                                                       rid=f"b{burst}-c{k}") for k, c in enumerate(clients)))
        wall = asyncio.get_running_loop().time() - t0
        await asyncio.sleep(1.0)  # duplicates would arrive now
        assert len(answers) == 200 and all(a is not None for a in answers), "a query got no reply"
        for c in clients:
            assert all(len(c.answers[rid]) == 1 for rid in c.sent), "a query got more than one reply"
        errors = [a.body for a in answers if a is not None and not a.ok]
        assert not errors, errors[:3]
        lat = [a.latency_s * 1e3 for a in answers if a is not None]
        figures = {"queries": len(lat), "clients": 20, "bursts": 10, "p50_ms": round(statistics.median(lat), 1),
                   "p99_ms": round(percentile(lat, 99), 1), "max_ms": round(max(lat), 1),
                   "throughput_qps": round(len(lat) / wall, 1), "leader": leader,
                   "one_at_a_time_p50_ms": round(statistics.median(alone), 1)}
        print(f"\n[load] bursts: {json.dumps(figures)}")
        _save("bursts", figures)


async def test_burst_beyond_the_queue_gets_busy_errors(tmp_path):
    """General requests: 120 at once on multi-device plans (each waits on the network, so they pile
    up) overflow the agent's 16 pending requests: the rest get error code ``busy`` at once."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    with run_mosquitto(workdir=tmp_path) as broker:
        fleet = AgentFleet(tmp_path, (broker.host, broker.port), keepalive_s=5, lease_s=6.0, status_interval_s=1.0,
                           replicate_all=True)
        with fleet:
            async with HomeWatcher(broker.host, broker.port, fleet.cluster) as watch, asyncio.timeout(None) as budget:
                leader, _ = await fleet.wait_ready(watch)  # start-up: as long as the agents progress
                budget.reschedule(asyncio.get_running_loop().time() + 150)  # then the test's own bound
                rss0 = rss_kb(fleet.pid(leader))
                general = await asyncio.gather(*(watch.request("embed", QUERIES[k % len(QUERIES)],
                                                               {"model": "tiny-encoder", "plan": "pipeline"},
                                                               timeout=60, rid=f"g{k}") for k in range(120)))
                await asyncio.sleep(1.0)
                rss1 = rss_kb(fleet.pid(leader))
                missing = [rid for rid in watch.sent if not watch.answers.get(rid)]
                assert not missing, f"{len(missing)} requests got no reply: {missing[:10]}"
                assert all(len(watch.answers[rid]) == 1 for rid in watch.sent), "a request got more than one reply"
                busy = [a for a in general if a is not None and a.error == "busy"]
                ok = [a for a in general if a is not None and a.ok]
                assert len(busy) + len(ok) == 120, [a.body for a in general if a and not a.ok and a.error != "busy"][:3]
                assert busy and ok, (len(busy), len(ok))
                assert all("retry" in a.body["error"]["message"] for a in busy)
                figures = {"general_sent": 120, "general_ok": len(ok), "general_busy": len(busy),
                           "leader_rss_mb_before": round((rss0 or 0) / 1024, 1),
                           "leader_rss_mb_after": round((rss1 or 0) / 1024, 1)}
                print(f"\n[load] overload (general): {json.dumps(figures)}")
                _save("overload_general", figures)
                assert rss0 is not None and rss1 is not None and rss1 - rss0 < 64 * 1024, "the leader grew by > 64 MB"
                after = await watch.request("embed", "hello", {"model": "tiny-encoder", "plan": "pipeline"})
                assert after is not None and after.ok


async def test_voice_burst_beyond_the_queue_gets_hermes_busy_errors(mosquitto_broker):
    """Voice: the leader admits ``max_inflight`` + ``max_queue`` requests; a burst beyond that is
    answered ``hermes/nlu/intentNotRecognized`` at once (what Rhasspy's dialogue manager waits for;
    the request log says ``busy``). Runs are slowed (a slow home) and the queue made small so the
    burst overflows it deterministically; the tiny model recognises every query it runs."""
    from tests.test_service import home, wait_for_placement

    async with home(mosquitto_broker) as (cluster, agents):
        lead = await wait_for_placement(agents)
        lead.tasks._slots = asyncio.Semaphore(2)
        lead.tasks._max_waiting = 2 + 4
        run = lead.host.run_coordinator

        async def slow(model, job):  # a slow home: each run takes 0.3 s of waiting on the network
            await asyncio.sleep(0.3)
            return await run(model, job)

        lead.host.run_coordinator = slow  # type: ignore[method-assign]
        async with asyncio.timeout(60), HomeWatcher(*mosquitto_broker, cluster) as watch:
            voice = await asyncio.gather(*(watch.hermes(QUERIES[k % len(QUERIES)], timeout=30, rid=f"v{k}")
                                           for k in range(40)))
            await asyncio.sleep(0.5)
            assert all(a is not None for a in voice), "a query got no reply"
            assert all(len(watch.answers[rid]) == 1 for rid in watch.sent), "a query got more than one reply"
            busy = [a for a in voice if a is not None and a.topic == "hermes/nlu/intentNotRecognized"]
            ok = [a for a in voice if a is not None and a.topic.startswith("hermes/intent/")]
            assert busy and ok and len(busy) + len(ok) == 40
            assert all(a.body["sessionId"] == a.id for a in busy), busy[0].body
            refused = [r for r in lead.tasks.log if r.error and "try again shortly" in r.error]
            assert len(refused) == len(busy)
            print(f"\n[load] overload (voice, queue of 6): {len(ok)} answered, {len(busy)} busy")
            _save("overload_voice", {"voice_sent": 40, "queue": 6, "voice_ok": len(ok), "voice_busy": len(busy)})
            lead.host.run_coordinator = run  # type: ignore[method-assign]
            after = await watch.hermes("turn on the kitchen light", timeout=10)
            assert after is not None and after.ok


def _save(name: str, figures: dict) -> None:
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    data[name] = figures
    REPORT.write_text(json.dumps(data, indent=1))
