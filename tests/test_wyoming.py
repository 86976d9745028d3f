"""Wyoming (Home Assistant Assist): the intent table, and running agents answering the wyoming
package's own TCP client (describe, transcript, recognize, the handle program, a follower
forwarding to the leader); the mDNS announcement; the real intent model (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from pathlib import Path

import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info, SelectProgram
from wyoming.intent import Intent, NotRecognized, Recognize

from detransformer_edge.cluster.config import BrokerConfig
from detransformer_edge.integrations import plugins_for
from detransformer_edge.integrations.wyoming import (
    ASSIST_INTENTS,
    HANDLE_PROGRAM,
    INTENT_PROGRAM,
    SERVICE_TYPE,
    WyomingServer,
    describe,
    to_assist,
)
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS, INTENTS
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.intents import IntentResult, SlotValue
from tests.test_cluster_discovery import LO, loopback_multicast  # noqa: F401, F811 - a fixture
from tests.test_service import PROFILES, agent_config, wait_for_placement

ROOT = Path(__file__).resolve().parents[1]


def result(intent, *slots, confidence=0.9):
    return IntentResult(intent, confidence, tuple(SlotValue(n, n, v, str(v), 0, 1, k) for n, v, k in slots))


# --- the table ---------------------------------------------------------------------------------------

HA_BUILT_IN = {"HassTurnOn", "HassTurnOff", "HassLightSet", "HassClimateSetTemperature", "HassClimateGetTemperature",
               "HassStartTimer", "HassCancelTimer", "HassGetCurrentTime", "HassGetWeather", "HassMediaUnpause",
               "HassMediaSearchAndPlay", "HassMediaPause", "HassSetVolume", "HassShoppingListAddItem"}


def test_every_intent_has_a_home_assistant_intent_and_every_slot_a_home() -> None:
    assert set(ASSIST_INTENTS) == set(INTENTS)
    assert set().union(*(spec.names() for spec in ASSIST_INTENTS.values())) == HA_BUILT_IN
    for name, spec in ASSIST_INTENTS.items():
        assert set(spec.slots) == set(INTENT_SLOTS[name]), name


@pytest.mark.parametrize("ours, expected", [
    (result("TurnOnLight", ("room", "kitchen", "Custom")), ("HassTurnOn", {"area": "kitchen", "domain": "light"})),
    (result("TurnOffLight"), ("HassTurnOff", {"domain": "light"})),
    (result("SetBrightness", ("room", "hall", "Custom"), ("level", 40, "Percentage")),
     ("HassLightSet", {"area": "hall", "brightness": 40})),
    (result("SetTemperature", ("level", 21.5, "Number")), ("HassClimateSetTemperature", {"temperature": 21.5})),
    (result("GetTemperature", ("room", "bedroom", "Custom")), ("HassClimateGetTemperature", {"area": "bedroom"})),
    (result("SetTimer", ("duration", 180, "Duration")), ("HassStartTimer", {"minutes": 3})),
    (result("SetTimer", ("duration", 3725, "Duration")), ("HassStartTimer", {"hours": 1, "minutes": 2, "seconds": 5})),
    (result("CancelTimer"), ("HassCancelTimer", {})),
    (result("GetTime"), ("HassGetCurrentTime", {})),
    (result("GetWeather"), ("HassGetWeather", {})),
    (result("PlayMusic", ("room", "kitchen", "Custom")), ("HassMediaUnpause", {"area": "kitchen"})),
    (result("PlayMusic", ("media", "miles davis", "Custom"), ("room", "den", "Custom")),
     ("HassMediaSearchAndPlay", {"search_query": "miles davis", "area": "den"})),
    (result("StopMusic"), ("HassMediaPause", {})),
    (result("SetVolume", ("level", 130, "Number")), ("HassSetVolume", {"volume_level": 100})),
    (result("LockDoor", ("room", "front", "Custom")), ("HassTurnOn", {"name": "front door", "domain": "lock"})),
    (result("UnlockDoor", ("room", "garage door", "Custom")), ("HassTurnOff", {"name": "garage door", "domain": "lock"})),
    (result("AddToShoppingList", ("item", "oat milk", "Custom")), ("HassShoppingListAddItem", {"item": "oat milk"})),
])
def test_our_intents_read_as_home_assistants(ours, expected) -> None:
    answer = to_assist(ours)
    assert answer is not None and (answer.intent, answer.slots) == expected
    assert answer.reply and "{" not in answer.reply


def test_stray_and_unreadable_slots_are_left_out_and_replies_speak() -> None:
    # the tagger's stray 'item' on a timer, a level that is not a number
    timer = to_assist(result("SetTimer", ("duration", 180, "Duration"), ("item", "eggs", "Custom")))
    assert timer.slots == {"minutes": 3} and timer.reply == "Timer set for 3 minutes."
    dim = to_assist(result("SetBrightness", ("room", "kitchen", "Custom"), ("level", "bright", "Percentage")))
    assert dim.slots == {"area": "kitchen"}
    assert to_assist(result("TurnOnLight", ("room", "kitchen", "Custom"))).reply == "Turning on the lights in the kitchen."
    assert to_assist(result("LockDoor")).reply == "Locking the door."
    assert to_assist(result(None)) is None and to_assist(result("Fly")) is None


def test_plugins_for_serves_wyoming_when_configured() -> None:
    from detransformer_edge.cluster.config import AgentConfig

    assert not [p for p in plugins_for(AgentConfig(id="a")) if isinstance(p, WyomingServer)]
    (lan,) = [p for p in plugins_for(AgentConfig(id="a", wyoming_port=10600)) if isinstance(p, WyomingServer)]
    assert (lan.host, lan.port, lan.announce) == ("0.0.0.0", 10600, True)
    (local,) = [p for p in plugins_for(AgentConfig(id="a", wyoming_port=0, wyoming_host="127.0.0.1"))
                if isinstance(p, WyomingServer)]
    assert local.announce is False  # nobody else could connect: not announced on the LAN
    (quiet,) = [p for p in plugins_for(AgentConfig(id="a", wyoming_port=1, discovery=False,
                                                   broker=BrokerConfig(url="mqtt://b")))
                if isinstance(p, WyomingServer)]
    assert quiet.announce is False


def test_describe_lists_the_programs_and_their_intents() -> None:
    info = Info.from_event(describe().event())  # through the wire form, as a client reads it
    (intent,), (handle,) = info.intent, info.handle
    assert (intent.name, intent.installed, handle.name, handle.installed) == (INTENT_PROGRAM, True, HANDLE_PROGRAM, True)
    assert intent.models[0].languages == ["en"] and handle.models[0].languages == ["en"]
    assert all(name in intent.models[0].description for name in HA_BUILT_IN)
    assert handle.supports_home_control is False


# --- running agents -----------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def wyoming_home(broker, n=2, catalog=None):
    from detransformer_edge.service.catalog import tiny_catalog

    host, port = broker
    cluster = f"w{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(n):
            config = dataclasses.replace(agent_config(f"dev{i}", cluster, host, port), wyoming_port=0,
                                         wyoming_host="127.0.0.1")
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            agents.append(await stack.enter_async_context(HomeAgent(
                config, prof, catalog() if catalog else tiny_catalog(), broker=broker, plugins=plugins_for(config),
                replan_delay_s=0.2)))
        yield agents


def server_of(agent) -> WyomingServer:
    (server,) = [p for p in agent.plugins if isinstance(p, WyomingServer)]
    assert server.port > 0
    return server


async def exchange(server: WyomingServer, *events):
    """Send events on one connection; read one event back for each request (select-program has none)."""
    out = []
    async with AsyncTcpClient("127.0.0.1", server.port) as client:
        for event in events:
            await client.write_event(event)
            if not SelectProgram.is_type(event.type):
                out.append(await asyncio.wait_for(client.read_event(), 30))
    return out


@pytest.mark.mosquitto
async def test_agents_answer_the_wyoming_client_leader_and_follower(mosquitto_broker) -> None:
    async with wyoming_home(mosquitto_broker) as agents:
        leader = await wait_for_placement(agents)
        follower = next(a for a in agents if a is not leader)
        text = "turn on the lights in the kitchen"
        expected = to_assist(await leader.recognize(text))  # what the home's (tiny) model makes of it
        assert expected is not None
        context = {"conversation_id": "c1"}
        for agent in (leader, follower):  # Home Assistant may point at any device
            info, intent, recognised = await exchange(server_of(agent), Describe().event(),
                                                      Transcript(text, context=context, language="en").event(),
                                                      Recognize(text).event())
            assert Info.is_type(info.type) and Info.from_event(info).intent[0].name == INTENT_PROGRAM
            got = Intent.from_event(intent)
            assert (got.name, {e.name: e.value for e in got.entities}) == (expected.intent, expected.slots)
            assert got.text == expected.reply and got.context == context
            assert Intent.from_event(recognised).name == expected.intent

        # the handle program speaks the reply instead
        handled, = await exchange(server_of(follower), SelectProgram(HANDLE_PROGRAM).event(), Transcript(text).event())
        assert Handled.is_type(handled.type) and Handled.from_event(handled).text == expected.reply

        # nothing recognised: not-recognized (intent program) / not-handled (handle program)
        real = leader.recognize

        async def nothing(text, client_id=None, allowed=None):
            await real(text, client_id, allowed)
            return IntentResult(None, 0.2)

        leader.recognize = nothing
        nr, = await exchange(server_of(leader), Transcript("sing me the alphabet backwards").event())
        nh, = await exchange(server_of(leader), SelectProgram(HANDLE_PROGRAM).event(), Transcript("hum").event())
        leader.recognize = real
        assert NotRecognized.is_type(nr.type) and NotRecognized.from_event(nr).text
        assert NotHandled.is_type(nh.type)

        # a home that cannot answer says so, and the connection stays usable
        leader.tasks._max_waiting = 0
        busy, info = await exchange(server_of(follower), Transcript(text).event(), Describe().event())
        leader.tasks._max_waiting = 36
        assert NotRecognized.is_type(busy.type) and "Try again" in NotRecognized.from_event(busy).text
        assert Info.is_type(info.type)


async def test_wyoming_is_announced_over_mdns_and_withdrawn(loopback_multicast: None) -> None:  # noqa: F811
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

    from detransformer_edge.cluster.discovery import ServiceAnnouncement, _make_zeroconf

    name = f"detransformer-t{uuid.uuid4().hex[:6]}-dev0"
    seen: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()
    browser_zc = _make_zeroconf(LO)
    browser = AsyncServiceBrowser(browser_zc.zeroconf, [SERVICE_TYPE],
                                  handlers=[lambda zeroconf, service_type, name, state_change: seen.put_nowait((name, state_change))])
    try:
        async with ServiceAnnouncement(SERVICE_TYPE, name, 10600, {"id": "dev0"}, interfaces=LO):
            async with asyncio.timeout(15):
                while (await seen.get())[0] != f"{name}.{SERVICE_TYPE}":
                    pass
            info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}")
            assert await info.async_request(browser_zc.zeroconf, 3000)
            assert info.port == 10600 and "127.0.0.1" in info.parsed_addresses()
            assert info.properties[b"id"] == b"dev0"
        async with asyncio.timeout(15):
            while (await seen.get()) != (f"{name}.{SERVICE_TYPE}", ServiceStateChange.Removed):
                pass
    finally:
        await browser.async_cancel()
        await browser_zc.async_close()


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_the_real_intent_model_over_wyoming(mosquitto_broker) -> None:
    """The done-when of the tracker: HassTurnOn with area kitchen; an out-of-domain sentence is
    not recognised; the timer examples answer over Wyoming and Hermes (the shipped intent model,
    one device)."""
    from detransformer_edge.service.catalog import CATALOGS

    async with wyoming_home(mosquitto_broker, n=1, catalog=lambda: CATALOGS["pretrained"]().subset(["intent"])) as agents:
        leader = await wait_for_placement(agents, timeout=120)
        intent, not_recognised, timer = await exchange(
            server_of(leader), Transcript("turn on the lights in the kitchen").event(),
            Transcript("who wrote the odyssey").event(), Transcript("set a 3 minute timer for the eggs").event())
        got = Intent.from_event(intent)
        assert got.name == "HassTurnOn"
        assert {e.name: e.value for e in got.entities} == {"area": "kitchen", "domain": "light"}
        assert NotRecognized.is_type(not_recognised.type)
        t = Intent.from_event(timer)
        assert (t.name, {e.name: e.value for e in t.entities}) == ("HassStartTimer", {"minutes": 3})
        cancel, = await exchange(server_of(leader), Transcript("remove the kitchen timer").event())
        assert (Intent.from_event(cancel).name, Intent.from_event(cancel).entities) == ("HassCancelTimer", [])

        # the tracker's Hermes examples: the right intent, stray slots gone, one answer each
        from detransformer_edge.protocol.client import HomeClient

        async with HomeClient(*mosquitto_broker, cluster=leader.config.cluster) as client:
            eggs = await client.hermes_query("set a 3 minute timer for the eggs", site_id="slow-test")
            kitchen = await client.hermes_query("remove the kitchen timer", site_id="slow-test")
        assert eggs.intent == "SetTimer" and [s["slotName"] for s in eggs.payload["slots"]] == ["duration"]
        assert eggs.payload["slots"][0]["value"]["minutes"] == 3
        assert kitchen.intent == "CancelTimer" and kitchen.payload["slots"] == []
