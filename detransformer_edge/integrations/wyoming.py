"""Wyoming, as a plug-in: Home Assistant Assist (and any Wyoming client) asks the home over TCP.

Every agent with ``wyoming_port`` set serves the Wyoming protocol (the ``wyoming`` package's
events) and announces itself as ``_wyoming._tcp.local.`` over mDNS, which is how Home Assistant's
Wyoming integration finds it. One connection, any number of events:

* ``describe`` -> ``info``: an intent program (recognition) and a handle program (spoken replies),
  English, listing the Home Assistant intents it can produce.
* ``transcript`` (what Home Assistant sends) or ``recognize`` -> ``intent`` with Home Assistant's
  built-in intent name and slot names (``HassTurnOn`` with ``area``, ``HassStartTimer`` with
  ``minutes`` ...) and a short reply in ``text``, or ``not-recognized``. Home Assistant then runs
  the intent on its own entities.
* after ``select-program`` naming the handle program, ``transcript`` -> ``handled`` with a short
  spoken reply, or ``not-handled``. The home recognises; it does not act. With
  ``answer_questions``, a question out of the intent domain is ``handled`` with the home language
  model's one-sentence answer (``service/answers.py``).

A device that does not lead asks the leader over MQTT (``Home.recognize`` forwards), so Home
Assistant may point at any device. ``ASSIST_INTENTS`` is the one table from our intents and slots
to Home Assistant's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wyoming.asr import Transcript
from wyoming.event import Event
from wyoming.handle import Handled, NotHandled
from wyoming.info import (
    Attribution,
    Describe,
    HandleModel,
    HandleProgram,
    Info,
    IntentModel,
    IntentProgram,
    SelectProgram,
)
from wyoming.intent import Entity, Intent, NotRecognized, Recognize
from wyoming.server import AsyncEventHandler

from detransformer_edge import __version__
from detransformer_edge.errors import DetransformerError
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS
from detransformer_edge.service.answers import asks_a_question
from detransformer_edge.service.intents import IntentResult
from detransformer_edge.service.plugins import Home

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
INTENT_PROGRAM = "detransformer-edge"
HANDLE_PROGRAM = "detransformer-edge-replies"
LANGUAGES = ["en"]
ATTRIBUTION = Attribution(name="DeTransformer Edge", url="")  # no public home page to name

NOT_UNDERSTOOD = "Sorry, I did not understand that."
NOT_NOW = "Sorry, the home cannot answer right now. Try again shortly."


# --- our intents as Home Assistant's ------------------------------------------------------------------

def _number(value: Any) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else round(number, 1)


def _text(slot: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {slot: str(value)}


def _percent(slot: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {slot: max(0, min(100, round(float(value))))}


def _door(value: Any) -> dict[str, Any]:
    name = str(value).strip()
    return {"name": name if name.endswith("door") else f"{name} door"}


def _duration(value: Any) -> dict[str, Any]:
    """Seconds as HassStartTimer's hours, minutes and seconds (only the ones that are not 0)."""
    hours, rest = divmod(max(0, round(float(value))), 3600)
    minutes, seconds = divmod(rest, 60)
    return {k: v for k, v in (("hours", hours), ("minutes", minutes), ("seconds", seconds)) if v}


@dataclass(frozen=True)
class AssistIntent:
    """How one of our intents reads as a Home Assistant built-in intent."""

    name: str  # Home Assistant's intent
    slots: Mapping[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)  # ours -> HA slots
    fixed: Mapping[str, Any] = field(default_factory=dict)  # HA slots every answer carries
    reply: str = ""  # spoken reply; {in_area}, {name}, {brightness}, ... from the HA slots
    # a more specific Home Assistant intent when one of its HA slots is filled: slot -> (intent, reply)
    specific: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def names(self) -> set[str]:
        return {self.name, *(intent for intent, _ in self.specific.values())}


ASSIST_INTENTS: Mapping[str, AssistIntent] = {
    "TurnOnLight": AssistIntent("HassTurnOn", {"room": _text("area")}, {"domain": "light"},
                                "Turning on the lights{in_area}."),
    "TurnOffLight": AssistIntent("HassTurnOff", {"room": _text("area")}, {"domain": "light"},
                                 "Turning off the lights{in_area}."),
    "SetBrightness": AssistIntent("HassLightSet", {"room": _text("area"), "level": _percent("brightness")}, {},
                                  "Setting the lights{in_area} to {brightness} percent."),
    "SetTemperature": AssistIntent("HassClimateSetTemperature",
                                   {"room": _text("area"), "level": lambda v: {"temperature": _number(v)}}, {},
                                   "Setting the temperature{in_area} to {temperature} degrees."),
    "GetTemperature": AssistIntent("HassClimateGetTemperature", {"room": _text("area")}, {},
                                   "Checking the temperature{in_area}."),
    "SetTimer": AssistIntent("HassStartTimer", {"duration": _duration}, {}, "Timer set for {duration}."),
    "CancelTimer": AssistIntent("HassCancelTimer", {}, {}, "Timer cancelled."),
    "GetTime": AssistIntent("HassGetCurrentTime", {}, {}, "Checking the time."),
    "GetWeather": AssistIntent("HassGetWeather", {}, {}, "Checking the weather."),
    # "play music" resumes the player (HassMediaUnpause); "play some jazz" searches and plays it
    "PlayMusic": AssistIntent("HassMediaUnpause", {"room": _text("area"), "media": _text("search_query")}, {},
                              "Playing music{in_area}.",
                              {"search_query": ("HassMediaSearchAndPlay", "Playing {search_query}{in_area}.")}),
    "StopMusic": AssistIntent("HassMediaPause", {"room": _text("area")}, {}, "Pausing the music{in_area}."),
    "SetVolume": AssistIntent("HassSetVolume", {"room": _text("area"), "level": _percent("volume_level")}, {},
                              "Setting the volume{in_area} to {volume_level} percent."),
    # Home Assistant locks with HassTurnOn / unlocks with HassTurnOff on the lock domain
    "LockDoor": AssistIntent("HassTurnOn", {"room": _door}, {"domain": "lock"}, "Locking the {name}."),
    "UnlockDoor": AssistIntent("HassTurnOff", {"room": _door}, {"domain": "lock"}, "Unlocking the {name}."),
    "AddToShoppingList": AssistIntent("HassShoppingListAddItem", {"item": _text("item")}, {},
                                      "Adding {item} to your shopping list."),
}


def _spoken_duration(slots: Mapping[str, Any]) -> str:
    parts = [f"{slots[k]} {k[:-1] if slots[k] == 1 else k}" for k in ("hours", "minutes", "seconds") if k in slots]
    return " and ".join(parts) or "no time"


@dataclass(frozen=True)
class AssistAnswer:
    """One recognised utterance as Home Assistant's intent: name, slots, spoken reply."""

    intent: str
    slots: dict[str, Any]
    reply: str

    def event(self, context: dict[str, Any] | None = None) -> Event:
        return Intent(name=self.intent, entities=[Entity(name=k, value=v) for k, v in self.slots.items()],
                      text=self.reply, context=context).event()


def to_assist(result: IntentResult) -> AssistAnswer | None:
    """Our intent as Home Assistant's (None: not recognised). Slots the intent does not take, and
    values that do not convert, are left out: a stray slot never costs an answer."""
    if result.intent is None or result.intent not in ASSIST_INTENTS:
        return None
    spec = ASSIST_INTENTS[result.intent]
    slots: dict[str, Any] = dict(spec.fixed)
    for s in result.slots:
        convert = spec.slots.get(s.slot_name)
        if convert is None or s.slot_name not in INTENT_SLOTS[result.intent]:
            log.info("wyoming: %s takes no slot %s (%r); left out", result.intent, s.slot_name, s.raw_value)
            continue
        try:
            slots.update(convert(s.value))
        except (TypeError, ValueError) as exc:
            log.info("wyoming: slot %s=%r left out: %s", s.slot_name, s.value, exc)
    words = {"in_area": f" in the {slots['area']}" if "area" in slots else "",
             "duration": _spoken_duration(slots), "name": "door", **slots}
    name, reply = next(((n, r) for slot, (n, r) in spec.specific.items() if slot in slots), (spec.name, spec.reply))
    return AssistAnswer(name, slots, reply.format_map(_Blank(words)))


class _Blank(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "the requested value"


def describe() -> Info:
    """What the server offers: the intent program, and the handle program speaking replies."""
    intents = sorted(set().union(*(spec.names() for spec in ASSIST_INTENTS.values())))
    what = "Home Assistant intents: " + ", ".join(intents)
    return Info(
        intent=[IntentProgram(
            name=INTENT_PROGRAM, attribution=ATTRIBUTION, installed=True, version=__version__,
            description="The home's intent model, run across its devices (DeTransformer Edge)",
            models=[IntentModel(name="home-intents", attribution=ATTRIBUTION, installed=True, version=__version__,
                                description=what, languages=list(LANGUAGES))],
        )],
        handle=[HandleProgram(
            name=HANDLE_PROGRAM, attribution=ATTRIBUTION, installed=True, version=__version__,
            description="A short spoken reply to each recognised command (the home does not act on it)",
            models=[HandleModel(name="home-replies", attribution=ATTRIBUTION, installed=True, version=__version__,
                                description=what, languages=list(LANGUAGES))],
            supports_handled_streaming=False, supports_home_control=False,
        )],
    )


# --- the server -------------------------------------------------------------------------------------

class AssistConnection(AsyncEventHandler):
    """One Wyoming client connection (Home Assistant opens one per utterance)."""

    def __init__(self, home: Home, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.home = home
        self.program = INTENT_PROGRAM

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(describe().event())
        elif SelectProgram.is_type(event.type):
            self.program = SelectProgram.from_event(event).name
        elif Transcript.is_type(event.type):
            t = Transcript.from_event(event)
            await self._answer(t.text, t.context, handle=self.program == HANDLE_PROGRAM)
        elif Recognize.is_type(event.type):
            r = Recognize.from_event(event)
            await self._answer(r.text, r.context, handle=False)
        else:
            log.debug("wyoming: ignoring event %s", event.type)
        return True

    async def _answer(self, text: str, context: dict[str, Any] | None, handle: bool) -> None:
        client_id = f"wyoming-{uuid.uuid4().hex[:8]}"
        try:
            result = await self.home.recognize(text, client_id=client_id)
        except DetransformerError as exc:  # busy, loading, no leader: say so, do not hang up
            log.warning("wyoming: %r not answered: %s", text, exc)
            event = (NotHandled if handle else NotRecognized)(text=NOT_NOW, context=context).event()
        else:
            answer = to_assist(result)
            spoken = await self._spoken_answer(text, client_id) if answer is None and handle else ""
            if spoken:
                event = Handled(text=spoken, context=context).event()
            elif answer is None:
                event = (NotHandled if handle else NotRecognized)(text=NOT_UNDERSTOOD, context=context).event()
            elif handle:
                event = Handled(text=answer.reply, context=context).event()
            else:
                event = answer.event(context)
        try:
            await self.write_event(event)
        except (ConnectionError, OSError) as exc:
            self.home.answer_failed(client_id, f"wyoming answer lost: {exc}")


    async def _spoken_answer(self, text: str, client_id: str) -> str:
        """With ``answer_questions``, a question out of the intent domain is handled by the
        language model's short answer (the handle program's reply); "" when there is none."""
        if not (self.home.config.answer_questions and asks_a_question(text)):
            return ""
        try:
            return await self.home.answer(text, client_id=f"{client_id}-answer")
        except DetransformerError as exc:
            log.warning("wyoming: no spoken answer to %r: %s", text, exc)
            return ""


class WyomingServer:
    """The plug-in: a Wyoming TCP server on ``host:port`` (0: a free port; the bound one is
    ``self.port`` and is logged), announced over mDNS unless ``announce`` is false."""

    name = "wyoming"

    def __init__(self, host: str = "0.0.0.0", port: int = 0, *, announce: bool = True,
                 interfaces: list[str] | None = None) -> None:
        self.host = host
        self.port = port
        self.announce = announce
        self.interfaces = interfaces
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stack = contextlib.AsyncExitStack()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"tcp://{host}:{self.port}"

    async def start(self, home: Home) -> None:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(AssistConnection(home, reader, writer).run(), name="wyoming connection")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        try:
            self._server = await asyncio.start_server(accept, self.host, self.port)
        except OSError as exc:
            raise DetransformerError(
                f"wyoming cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(set wyoming_port to a free port, or remove it to serve no Wyoming)") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.warning("wyoming: Home Assistant Assist can connect to %s (agent %s)", self.url, home.id)
        if self.announce:
            from detransformer_edge.cluster.discovery import ServiceAnnouncement

            cluster = home.config.cluster
            try:
                await self._stack.enter_async_context(ServiceAnnouncement(
                    SERVICE_TYPE, f"detransformer-{cluster}-{home.id}", self.port,
                    {"cluster": cluster, "id": home.id, "version": __version__}, interfaces=self.interfaces))
            except Exception as exc:  # mDNS is a convenience: Home Assistant can be given host:port
                log.warning("wyoming: mDNS announcement unavailable (%s); add it in Home Assistant by host "
                            "and port", exc)

    async def stop(self) -> None:
        await self._stack.aclose()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
