"""SIGTERM and SIGINT tear down everything a command started: the demo's broker and agents go
with it (as they do on Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import find_mosquitto

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_tears_down_its_broker_and_agents(sig: signal.Signals) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "detransformer_edge.cli", "demo", "--catalog", "tiny",
                             "--devices", "2", "--broker", "mosquitto", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "press Ctrl-C to stop" in line or not line:
                break
        assert any("press Ctrl-C" in ln for ln in lines), "".join(lines[-30:])
        started = _children(proc.pid)
        assert len(started) >= 3  # mosquitto and two agents (at least)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 15
        while any(_alive(p) for p in started) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], "processes left running after the demo stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.mosquitto
def test_an_agent_started_before_its_broker_waits_and_joins_when_it_comes(tmp_path: Path) -> None:
    from tests.conftest import free_port, run_mosquitto

    port = free_port()
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'id = "early"\ncluster = "early-{port}"\ndiscovery = false\ndashboard_port = 0\n'
                   f'homeassistant = false\nprofile = "{ROOT / "firmware_profiles" / "raspberry-pi-5.toml"}"\n'
                   f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "detransformer_edge.cli", "agent", "--config", str(cfg),
                                 "--catalog", "tiny", "--threads", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("connecting to the broker") < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()  # it must not give up
            time.sleep(0.2)
        assert log.read_text().count("connecting to the broker") >= 3, log.read_text()  # one line per attempt
        (tmp_path / "m").mkdir()
        with run_mosquitto(workdir=tmp_path / "m", port=port):
            deadline = time.monotonic() + 30
            while "connected to the broker" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "connected to the broker" in log.read_text(), log.read_text()
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


async def test_without_a_url_the_agent_keeps_looking_for_a_broker(monkeypatch, tmp_path: Path) -> None:
    """mDNS finds nothing at first: the agent asks again (with backoff) instead of exiting."""
    import asyncio

    from detransformer_edge.cluster import discovery
    from detransformer_edge.cluster.config import AgentConfig, BrokerConfig
    from detransformer_edge.service.runner import find_broker

    calls = []

    async def resolve(config, timeout=3.0, interfaces=None):
        calls.append(timeout)
        if len(calls) < 3:
            raise discovery.BrokerNotFoundError("no _mqtt._tcp service answered")
        return "10.0.0.5", 1883

    monkeypatch.setattr(discovery, "resolve_broker", resolve)
    cfg = AgentConfig(id="pi", broker=BrokerConfig(reconnect_min_s=0.01, reconnect_max_s=0.05))
    stop = asyncio.Event()
    assert await find_broker(cfg, stop, attempt_s=0.1) == ("10.0.0.5", 1883)
    assert len(calls) == 3
    stop.set()
    assert await find_broker(cfg, stop) is None  # asked to stop: no broker, no error


@pytest.mark.slow
@pytest.mark.mosquitto
def test_a_demo_killed_outright_leaves_no_broker_or_agent_behind() -> None:
    """SIGKILL gives the demo no chance to stop anything: its agents notice they were orphaned and
    leave (DETRANSFORMER_PARENT_PID), and the kernel stops its broker (PR_SET_PDEATHSIG)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "detransformer_edge.cli", "demo", "--catalog", "tiny",
                             "--devices", "2", "--broker", "mosquitto", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    started: set[int] = set()
    try:
        lines = []
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "press Ctrl-C to stop" in line or not line:
                break
        assert any("press Ctrl-C" in ln for ln in lines), "".join(lines[-30:])
        started = _children(proc.pid)
        assert len(started) >= 3  # mosquitto and two agents (at least)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 20
        while any(_alive(p) for p in started) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], "processes left running after the demo was killed"
    finally:
        for p in started:  # never leave them to the next test
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
