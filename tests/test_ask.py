"""`detransformer-edge ask`: Hermes over MQTT and Wyoming against running agents; exit codes."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest

from detransformer_edge.commands import ask
from detransformer_edge.transport.broker import free_port
from tests.test_service import wait_for_placement
from tests.test_wyoming import server_of, wyoming_home

ROOT = Path(__file__).resolve().parents[1]


def args(text: str, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    ask.add_arguments(p)
    argv = [text]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


@pytest.mark.mosquitto
async def test_ask_over_hermes_and_wyoming(mosquitto_broker) -> None:
    host, port = mosquitto_broker
    async with wyoming_home(mosquitto_broker) as agents:
        leader = await wait_for_placement(agents)
        cluster = leader.config.cluster
        expected = await leader.recognize("turn on the kitchen light")

        out = io.StringIO()
        code = await ask.ask_hermes(args("turn on the kitchen light", broker=f"{host}:{port}", cluster=cluster), out)
        text = out.getvalue()
        assert code == ask.RECOGNISED, text
        assert text.startswith(f"intent   {expected.intent} (confidence ")
        plan = next(r.plan for r in reversed(leader.tasks.log) if r.text == "turn on the kitchen light")
        assert f"plan     {plan}" in text and "ms end to end (leader " in text

        out = io.StringIO()
        code = await ask.ask_hermes(args("turn on the kitchen light", broker=f"{host}:{port}", cluster=cluster,
                                         intent_filter="Dance"), out)
        assert code == ask.NOT_RECOGNISED and "not recognised: 'turn on the kitchen light'" in out.getvalue()

        out = io.StringIO()
        code = await ask.ask_wyoming("turn on the kitchen light", "127.0.0.1", server_of(agents[1]).port, 30, out)
        assert code == ask.RECOGNISED and "intent   Hass" in out.getvalue() and "reply    '" in out.getvalue()


def test_typed_slot_values() -> None:
    assert ask._typed({"kind": "Percentage", "value": 40}) == "40 [Percentage]"
    assert ask._typed({"kind": "Duration", "value": 180, "minutes": 3}) == "180 s (3 minutes) [Duration]"
    assert ask._typed({"kind": "Custom", "value": "kitchen"}) == "'kitchen' [Custom]"


def test_nobody_to_ask_exits_2_with_a_clear_message() -> None:
    port = free_port()
    cli = [sys.executable, "-m", "detransformer_edge.cli", "ask"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*cli, "--broker", f"127.0.0.1:{port}", "--timeout", "1", "hello"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 2 and f"no MQTT broker answered at 127.0.0.1:{port}" in done.stderr, done.stderr
    assert ask.run(args("hello", wyoming=f"127.0.0.1:{port}", timeout=2)) == ask.FAILED
    assert ask.run(args("hello", broker="nohost:notaport")) == ask.FAILED
