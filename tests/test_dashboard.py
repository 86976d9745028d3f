"""The dashboard: routes, the event stream, shutdown, no secrets; then the real page in headless
Chromium against three agents on Mosquitto (the DOM after load, and a live update over SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from detransformer_edge.integrations.dashboard import Dashboard, DashboardError, model_layouts
from detransformer_edge.service.catalog import tiny_catalog

CHROMIUM = "/usr/bin/chromium"


def fake_snapshot(**over):
    snap = {
        "cluster": "home", "me": "dev0", "role": "leader", "leader": {"id": "dev0", "term": 3},
        "devices": [{"id": "dev0", "online": True, "role": "leader", "profile": None, "status": None}],
        "placement": None, "requests": [], "version": "0.1.0",
    }
    snap.update(over)
    return snap


@contextlib.asynccontextmanager
async def served(snapshot, **kw):
    async with Dashboard(snapshot, port=0, **kw) as dash, aiohttp.ClientSession(dash.url) as http:
        yield dash, http


async def next_event(stream, timeout=5.0):
    """The next ``event: state`` of an SSE response, parsed."""
    data = None
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.content.readline()).decode()
            if not line:
                raise EOFError("event stream closed")
            if line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "\n" and data is not None:
                return data


# --- unit: routes, events, shutdown ---------------------------------------------------------------

async def test_routes_serve_page_state_and_health():
    layouts = model_layouts(tiny_catalog())
    assert layouts["tiny-encoder-bp"] == {"task": "embed", "layers": ["decoupled", "coupled", "decoupled", "coupled"], "nd": 4}
    async with served(lambda: fake_snapshot(), layouts=layouts) as (dash, http):
        assert dash.port > 0 and dash.host == "127.0.0.1"
        page = await http.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert "/static/app.js" in html and "/static/style.css" in html
        assert "http" not in html  # works offline: no CDN, no remote font
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = await http.get(f"/static/{name}")
            assert r.status == 200 and r.content_type == ctype
            assert (await r.text()).replace("http://www.w3.org/2000/svg", "").count("http") == 0, name
        for bad in ("/static/..%2Fdashboard.py", "/static/dashboard.py", "/static/.hidden.js", "/nope"):
            assert (await http.get(bad)).status == 404, bad
        state = await (await http.get("/api/state")).json()
        assert state["me"] == "dev0" and state["leader"]["id"] == "dev0" and state["layouts"] == layouts
        health = await http.get("/healthz")
        assert health.status == 200 and (await health.text()).strip() == "ok leader"


async def test_read_only_no_write_routes():
    async with served(lambda: fake_snapshot()) as (dash, http):
        for path in ("/", "/api/state", "/api/events", "/healthz"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                r = await http.request(method, path)
                assert r.status == 405, (method, path)


async def test_state_is_json_safe_and_failures_are_reported():
    holder = {"snap": fake_snapshot(requests=[{"id": "r", "latency_ms": float("nan"), "plan": ("a", "b")}])}

    def snapshot():
        if holder["snap"] is None:
            raise RuntimeError("cluster gone")
        return holder["snap"]

    async with served(snapshot) as (dash, http):
        state = await (await http.get("/api/state")).json()
        assert state["requests"][0]["latency_ms"] is None and state["requests"][0]["plan"] == ["a", "b"]
        holder["snap"] = None
        r = await http.get("/api/state")
        assert r.status == 500 and "cluster gone" not in await r.text()
        h = await http.get("/healthz")
        assert h.status == 503


async def test_event_stream_pushes_on_notify_from_any_thread():
    snap = fake_snapshot()
    # a long periodic interval: only notify() can explain a quick second event
    async with served(lambda: snap, push_interval_s=30.0, coalesce_s=0.01) as (dash, http):
        async with http.get("/api/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            first = await next_event(stream)
            assert first["requests"] == []
            assert dash.clients == 1
            snap["requests"] = [{"id": "i1", "kind": "intent", "text": "lights on", "latency_ms": 3.0}]
            dash.notify("request", snap["requests"][0])
            second = await next_event(stream, timeout=2.0)
            assert second["requests"][0]["id"] == "i1"
            # the leader plans placements in a worker thread and emits from there
            snap["placement"] = {"version": 2, "models": {}, "ready": []}
            threading.Thread(target=dash.notify, args=("placement", snap["placement"])).start()
            third = await next_event(stream, timeout=2.0)
            assert third["placement"]["version"] == 2


async def test_event_stream_pushes_periodically():
    n = {"calls": 0}

    def snapshot():
        n["calls"] += 1
        return fake_snapshot(version=str(n["calls"]))

    async with served(snapshot, push_interval_s=0.2) as (dash, http), http.get("/api/events") as stream:
        a = await next_event(stream)
        b = await next_event(stream, timeout=2.0)
        assert a["version"] != b["version"]


async def test_stop_closes_open_streams():
    dash = Dashboard(lambda: fake_snapshot(), port=0, push_interval_s=30.0)
    await dash.start()
    async with aiohttp.ClientSession() as http:
        streams = [await http.get(dash.url + "api/events") for _ in range(3)]
        for s in streams:
            await next_event(s)
        assert dash.clients == 3
        t0 = time.monotonic()
        await dash.stop()
        assert time.monotonic() - t0 < 3.0
        assert dash.clients == 0
        for s in streams:
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                await next_event(s, timeout=3.0)
            s.release()


async def test_port_in_use_is_a_typed_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DashboardError, match="dashboard_port"):
            await Dashboard(lambda: fake_snapshot(), port=port).start()


def test_a_traced_record_carries_its_breakdown():
    """What the timeline's table and residual line show is computed on the leader by
    parallel/trace.py (never again in the page): ms per device and kind in lane order, the
    critical compute, the wire time at the slowest link of the run's devices, the residual."""
    from types import SimpleNamespace

    from detransformer_edge.parallel.trace import (
        Span,
        breakdown,
        critical_compute,
        residual,
        summary,
        wire_seconds,
    )
    from detransformer_edge.service.tasks import Tasks

    t = 1_700_000_000.0
    spans = [Span("dev1", "wait", "ag.1 from dev0", t + 0.001, t + 0.004),
             Span("dev0", "plan", "block", t, t + 0.001),
             Span("dev0", "compute", "L0-1", t + 0.001, t + 0.011),
             Span("dev0", "publish", "ag.1", t + 0.011, t + 0.012, nbytes=50_000, copies=2),
             Span("dev2", "compute", "L0-1", t + 0.0005, t + 0.020),
             Span("dev1", "compute", "L0-1", t + 0.004, t + 0.009),
             Span("dev1", "publish", "ag.1", t + 0.009, t + 0.010, nbytes=20_000, copies=2)]
    profiles = {"dev0": SimpleNamespace(link_mbit=940.0), "dev1": SimpleNamespace(link_mbit=100.0),
                "dev2": SimpleNamespace(link_mbit=300.0), "dev9": SimpleNamespace(link_mbit=1.0)}
    runs = SimpleNamespace(me="dev0", placements=SimpleNamespace(state=SimpleNamespace(profiles=profiles)))
    tasks = Tasks(tiny_catalog(), runs)  # type: ignore[arg-type]
    assert tasks.slowest_link(spans) == 100.0  # dev9 is not in the run

    seen = []
    tasks.listeners.append(lambda kind, data: seen.append(data))
    rec = tasks.record("embed", "hello home", trace=True)
    rec.spans.extend(spans)
    tasks.finish(rec, time.perf_counter() - 0.030, "1 x 32")
    b = seen[-1]["breakdown"]
    assert b == rec.to_dict()["breakdown"] == summary(rec.latency_ms / 1e3, spans, 100.0, first="dev0")
    assert [d["device"] for d in b["devices"]] == ["dev0", "dev2", "dev1"]  # the leader, then by first span
    per = breakdown(spans)
    for d in b["devices"]:
        assert d["compute"] == pytest.approx(per[d["device"]]["compute"] * 1e3, abs=1e-3)
    assert b["compute_ms"] == pytest.approx(critical_compute(spans) * 1e3, abs=1e-3) == pytest.approx(19.5, abs=1e-3)
    assert b["wire_ms"] == pytest.approx(wire_seconds(spans, 100.0) * 1e3, abs=1e-3)
    assert b["residual_ms"] == pytest.approx(residual(rec.latency_ms / 1e3, spans, 100.0) * 1e3, abs=1e-3)
    assert b["latency_ms"] == rec.latency_ms and b["link_mbit"] == 100.0
    assert seen[-1]["trace"] == [s.to_list() for s in spans]
    json.dumps(b, allow_nan=False)

    plain = tasks.record("embed", "hello home")
    tasks.finish(plain, time.perf_counter())
    assert "trace" not in plain.to_dict() and "breakdown" not in plain.to_dict()
    refused = tasks.record("embed", "hello home", trace=True)  # traced, but it never ran
    tasks.finish(refused, time.perf_counter(), error="busy")
    assert refused.to_dict()["trace"] == [] and "breakdown" not in refused.to_dict()


def test_agent_config_dashboard_host():
    from detransformer_edge.cluster.config import AgentConfig
    from detransformer_edge.errors import ConfigError

    base = 'id = "d"\ndiscovery = false\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
    assert AgentConfig.loads(base).dashboard_host == "127.0.0.1"
    assert AgentConfig.loads('dashboard_host = "0.0.0.0"\n' + base).dashboard_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="dashboard_host"):
        AgentConfig.loads('dashboard_host = " "\n' + base)


# --- three agents on Mosquitto, then the page in Chromium ------------------------------------------

SECRET_KEY = "cluster-key-" + uuid.uuid4().hex
SECRET_PASSWORD = "mqtt-password-" + uuid.uuid4().hex


@contextlib.asynccontextmanager
async def home_with_dashboard(broker, n=3, **agent_kwargs):
    """Three agents (tiny models) with a cluster key and broker password set, and a Dashboard on
    the leader wired the way runner.run_agent wires it (``agent_kwargs``: more HomeAgent options)."""
    from detransformer_edge.integrations import plugins_for
    from detransformer_edge.planner.profile import load_profile
    from detransformer_edge.service.agent import HomeAgent
    from tests.test_service import PROFILES, ROOT, agent_config, wait_for_placement

    host, port = broker
    cluster = f"t{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(n):
            cfg = agent_config(f"dev{i}", cluster, host, port)
            cfg = replace(cfg, cluster_key=SECRET_KEY,
                          broker=replace(cfg.broker, username=f"dev{i}", password=SECRET_PASSWORD))
            agent = HomeAgent(cfg, load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml"), tiny_catalog(),
                              plugins=plugins_for(cfg), broker=broker, intent_threshold=0.0, replan_delay_s=0.2,
                              **agent_kwargs)
            agents.append(await stack.enter_async_context(agent))
        leader = await wait_for_placement(agents)
        dash = await stack.enter_async_context(Dashboard(leader.snapshot, port=0, layouts=model_layouts(leader.catalog)))
        leader.add_listener(dash.notify)
        yield cluster, agents, leader, dash


async def voice_query(broker, text, qid):
    from tests.test_service import ask

    return await ask(broker, "hermes/nlu/query", {"input": text, "id": qid},
                     ["hermes/intent/#", "hermes/nlu/intentNotRecognized"])


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_no_secrets_in_any_output(mosquitto_broker):
    async with home_with_dashboard(mosquitto_broker) as (cluster, agents, leader, dash):
        await voice_query(mosquitto_broker, "turn on the kitchen light", "s1")
        async with aiohttp.ClientSession(dash.url) as http:
            bodies = [await (await http.get(p)).text() for p in ("/", "/api/state", "/healthz", "/static/app.js")]
            async with http.get("/api/events") as stream:
                bodies.append(json.dumps(await next_event(stream)))
        state = json.loads(bodies[1])
        assert {d["id"] for d in state["devices"]} == {"dev0", "dev1", "dev2"} and state["requests"]
        for body in bodies:
            for secret in (SECRET_KEY, SECRET_PASSWORD):
                assert secret not in body
            assert "cluster_key" not in body and "password" not in body.lower()


def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh test installs chromium)")
    return CHROMIUM


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        out = subprocess.run(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


@pytest.mark.browser
@pytest.mark.mosquitto
@pytest.mark.slow
async def test_page_shows_devices_leader_and_placement(mosquitto_broker):
    chromium()
    async with home_with_dashboard(mosquitto_broker) as (cluster, agents, leader, dash):
        await voice_query(mosquitto_broker, "dim the hall lights", "b1")
        # ?poll=1: an open event stream would keep the virtual-time budget from ever running out
        dom = await asyncio.to_thread(dump_dom, dash.url + "?poll=1")
    assert 'data-loaded="1"' in dom
    for dev in ("dev0", "dev1", "dev2"):
        assert f'data-device="{dev}"' in dom
    assert f'<article class="card" data-device="{leader.id}" data-role="leader"' in dom
    assert dom.count('class="badge leader"') == 1 and "★ leader" in dom
    for model in ("intent", "tiny-encoder", "tiny-encoder-bp", "tiny-decoder"):
        assert f'data-model="{model}"' in dom
    assert dom.count('class="placement-grid"') == 4 and 'data-held="1"' in dom
    assert 'class="latency-chart"' in dom and "dim the hall lights" in dom


class Cdp:
    """The smallest DevTools client: evaluate JavaScript in a page of a headless Chromium that
    runs in real time (so the page's event stream stays open, as in a real browser)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = iter(range(1, 1 << 30))

    async def __aenter__(self) -> Cdp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={self._profile.name}",
             f"--remote-debugging-port={port}", "--remote-allow-origins=*", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.http = aiohttp.ClientSession()
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    pages = await (await self.http.get(f"http://127.0.0.1:{port}/json/list")).json()
                    pages = [p for p in pages if p.get("type") == "page" and p["url"].startswith(self.url)]
                    if pages:
                        break
                await asyncio.sleep(0.2)
        self.ws = await self.http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def eval(self, expression: str):
        msg_id = next(self._ids)
        await self.ws.send_json({"id": msg_id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}})
        while True:
            reply = await self.ws.receive_json()
            if reply.get("id") == msg_id:
                return reply["result"]["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0):
        async with asyncio.timeout(timeout):
            while not (value := await self.eval(expression)):
                await asyncio.sleep(0.2)
        return value

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._profile.cleanup()  # Chromium helpers may still be writing; leftovers are ignored


@pytest.mark.browser
@pytest.mark.mosquitto
@pytest.mark.slow
async def test_page_updates_live_over_sse(mosquitto_broker):
    chromium()
    async with home_with_dashboard(mosquitto_broker) as (cluster, agents, leader, dash):
        dash.push_interval_s = 60.0  # only the leader's request event can explain a quick update
        async with Cdp(dash.url) as page:
            await page.wait_for("document.body.dataset.loaded === '1' && document.getElementById('live').dataset.state === 'live'")
            assert await page.eval("document.querySelectorAll('[data-device]').length") == 3
            assert dash.clients == 1
            before = await page.eval("document.querySelectorAll('[data-request]').length")
            t0 = time.monotonic()
            await voice_query(mosquitto_broker, "open the garage door", "live1")
            text = await page.wait_for(
                "[...document.querySelectorAll('#requests .text')].map(td => td.textContent).join('|')"
                ".includes('open the garage door') && document.querySelectorAll('[data-request]').length", timeout=10)
            assert text == before + 1
            assert time.monotonic() - t0 < 10
    assert dash.clients == 0


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_ask_trace_reaches_the_dashboard_with_its_timeline(mosquitto_broker):
    """``ask --trace`` logs a traced intent on the leader, and the trace and its breakdown reach
    the page: in /api/state and in the event stream (P/log's LogEntry is not the page's path)."""
    import argparse
    import io

    from detransformer_edge.commands import ask

    async with home_with_dashboard(mosquitto_broker) as (cluster, agents, leader, dash):
        p = argparse.ArgumentParser()
        ask.add_arguments(p)
        host, port = mosquitto_broker
        out = io.StringIO()
        code = await ask.ask_hermes(p.parse_args(["turn on the kitchen light", "--broker", f"{host}:{port}",
                                                  "--cluster", cluster, "--trace"]), out)
        assert code == ask.RECOGNISED, out.getvalue()
        rec = next(r for r in reversed(leader.tasks.log) if r.text == "turn on the kitchen light")
        assert rec.kind == "intent" and rec.spans and rec.breakdown is not None
        assert f"trace    request {rec.id}: click it" in out.getvalue() and f"plan     {rec.plan}" in out.getvalue()
        async with aiohttp.ClientSession(dash.url) as http:
            state = await (await http.get("/api/state")).json()
            async with http.get("/api/events") as stream:
                event = await next_event(stream)
        for snap in (state, event):
            shown = next(r for r in snap["requests"] if r["id"] == rec.id)
            assert shown["trace"] == json.loads(json.dumps(rec.trace()))
            assert shown["breakdown"]["devices"][0]["device"] == leader.id
            assert shown["breakdown"]["residual_ms"] == rec.breakdown["residual_ms"]
        # the voice path is untraced: tracing is only ever asked for
        await voice_query(mosquitto_broker, "turn on the kitchen light", "untraced")
        assert leader.tasks.log[-1].spans is None
    assert ask.run(p.parse_args(["hello", "--wyoming", "127.0.0.1:1", "--trace"])) == ask.FAILED  # MQTT only


@pytest.mark.browser
@pytest.mark.mosquitto
@pytest.mark.slow
async def test_clicking_a_traced_request_draws_one_lane_per_device(mosquitto_broker):
    from detransformer_edge.protocol.client import HomeClient

    chromium()
    async with home_with_dashboard(mosquitto_broker, replicate_all=True) as (cluster, agents, leader, dash):
        async with HomeClient(*mosquitto_broker, cluster=cluster) as client:
            traced = await client.request("embed", "hello home",
                                          {"model": "tiny-encoder-bp", "plan": "bp-fixed", "trace": True})
            plain = await client.request("embed", "hello home", {"model": "tiny-encoder-bp", "plan": "bp-fixed"})
        assert traced.error is None and plain.error is None, (traced, plain)
        rec = next(r for r in leader.tasks.log if r.client_id == traced.id)
        untraced = next(r for r in leader.tasks.log if r.client_id == plain.id)
        assert rec.breakdown is not None and rec.spans
        lanes = [d["device"] for d in rec.breakdown["devices"]]
        assert set(lanes) == {a.id for a in agents} and lanes[0] == leader.id  # bp-fixed runs on every device
        async with Cdp(dash.url) as page:
            await page.wait_for(f"!!document.querySelector('[data-request=\"{rec.id}\"]')")
            assert await page.eval("document.getElementById('timeline-panel').hidden") is True
            assert await page.eval(f"document.querySelector('[data-request=\"{rec.id}\"]').dataset.traced") == "1"
            await page.eval(f"document.querySelector('[data-request=\"{rec.id}\"]').click()")
            shown = await page.wait_for(
                "[...document.querySelectorAll('#timeline [data-lane]')].map((g) => g.dataset.lane)")
            assert shown == lanes
            bars = await page.eval("[...document.querySelectorAll('#timeline [data-lane]')].map((g) => "
                                   "[...g.querySelectorAll('rect.span')].map((r) => r.dataset.kind))")
            for dev, kinds in zip(lanes, bars, strict=True):
                assert sorted(kinds) == sorted(s.kind for s in rec.spans if s.device == dev), dev
            kinds = {s.kind for s in rec.spans}
            assert {"plan", "compute", "encode", "decode", "publish", "wait"} <= kinds
            legend = await page.eval("[...document.querySelectorAll('#timeline .legend [data-kind]')]"
                                     ".map((e) => e.dataset.kind)")
            assert set(legend) == kinds
            publish_tip = await page.eval("document.querySelector('#timeline rect.span.publish title').textContent")
            assert " ms at +" in publish_tip and " B to " in publish_tip
            rows = await page.eval("[...document.querySelectorAll('#timeline table.breakdown tbody tr')]"
                                   ".map((r) => r.dataset.device)")
            assert rows == lanes
            residual = await page.eval("document.querySelector('#timeline .residual-ms').textContent")
            assert residual.startswith("residual ") and residual.endswith(" ms")
            assert float(residual.split()[1].replace(",", "")) == pytest.approx(rec.breakdown["residual_ms"], abs=0.006)
            line = await page.eval("document.querySelector('#timeline .residual').textContent")
            assert line.startswith("latency ") and " ms = compute " in line and " at 100 Mbit/s" in line

            # an untraced request says how to trace one; clicking it again closes the panel
            await page.eval(f"document.querySelector('[data-request=\"{untraced.id}\"]').click()")
            hint = await page.wait_for("document.querySelector('#timeline .untraced')?.textContent")
            assert "params.trace = true" in hint and "detransformer-edge bench --trace" in hint
            await page.eval(f"document.querySelector('[data-request=\"{untraced.id}\"]').click()")
            assert await page.eval("document.getElementById('timeline-panel').hidden") is True


def synthetic_trace(devices, t0, passes):
    """Spans the shape of a block-parallel run: per pass, each device computes, publishes, waits."""
    rows = []
    for p in range(passes):
        for i, dev in enumerate(devices):
            t = t0 + p * 0.010 + i * 0.0005
            rows += [[dev, "compute", f"L{p}", t, t + 0.004, 0, 0],
                     [dev, "encode", f"ag.{p}", t + 0.004, t + 0.0043, 0, 0],
                     [dev, "publish", f"ag.{p}", t + 0.0043, t + 0.005, 12_000, len(devices) - 1],
                     [dev, "wait", f"ag.{p} from {devices[i - 1]}", t + 0.005, t + 0.008, 0, 0],
                     [dev, "decode", f"ag.{p}", t + 0.008, t + 0.0085, 0, 0]]
    return [[devices[0], "plan", "block", t0 - 0.001, t0, 0, 0], *rows]


@pytest.mark.browser
@pytest.mark.slow
async def test_timeline_stays_quick_with_100_requests_and_4_devices():
    """The page lists 100 requests (every fifth traced: 4 devices, 60 passes, 1 200 spans each)
    and still opens a timeline at once; periodic pushes do not redraw an open timeline."""
    from detransformer_edge.parallel.trace import Span, summary

    chromium()
    devices = ["kitchen-pi", "hall-pi", "n100", "garage-pi"]
    now = time.time()
    requests = []
    for k in range(120):
        started = now - 120 + k
        r = {"id": f"e{k}", "kind": "embed", "text": f"text {k}", "started": started, "plan": "block",
             "latency_ms": 612.0, "result": "1 x 384", "error": None, "client_id": None}
        if k % 5 == 0:
            rows = synthetic_trace(devices, started, 60)
            r["trace"] = rows
            r["breakdown"] = summary(0.612, [Span.from_list(x) for x in rows], 100.0, first=devices[0])
        requests.append(r)
    snap = fake_snapshot(me=devices[0], requests=requests,
                         devices=[{"id": d, "online": True, "role": "leader" if d == devices[0] else "follower",
                                   "profile": None, "status": None} for d in devices])
    async with served(lambda: snap, push_interval_s=0.3) as (dash, http), Cdp(dash.url) as page:
        assert await page.wait_for("document.querySelectorAll('[data-request]').length") == 100
        ms = await page.eval("(() => { const t = performance.now(); "
                             "document.querySelector('[data-request=\"e115\"]').click(); return performance.now() - t; })()")
        assert await page.eval("document.querySelectorAll('#timeline [data-lane]').length") == 4
        assert await page.eval("document.querySelectorAll('#timeline rect.span').length") == 1 + 60 * 4 * 5
        assert ms < 1000, f"opening a timeline of 1 201 spans took {ms:.0f} ms"
        await page.eval("document.querySelector('#timeline svg').dataset.mark = 'first'")
        await asyncio.sleep(1.0)  # a few periodic pushes
        assert await page.eval("document.querySelector('#timeline svg').dataset.mark") == "first"
        assert await page.eval("document.querySelector('[data-request=\"e115\"]').classList.contains('selected')")
