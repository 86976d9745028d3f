"""Answers in the voice path (``answer_questions``): which utterances the language model may answer,
the spoken form of its text, the bounds (first sentence, tokens, seconds), Hermes ``hermes/tts/say``
read by the reference library (rhasspy-hermes), the Wyoming handle reply, the request API's op
``answer`` with streamed tokens, and the real SmolLM2 answering a question over Hermes (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rhasspyhermes.nlu import NluIntentNotRecognized
from rhasspyhermes.tts import TtsSay
from wyoming.asr import Transcript
from wyoming.handle import Handled, NotHandled
from wyoming.info import SelectProgram
from wyoming.intent import NotRecognized

from detransformer_edge.cluster.config import AgentConfig, AnswerConfig
from detransformer_edge.errors import ConfigError
from detransformer_edge.integrations import plugins_for
from detransformer_edge.integrations.hermes import HermesNlu, should_answer
from detransformer_edge.integrations.wyoming import HANDLE_PROGRAM, AssistConnection
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.protocol import hermes, hermes_tts
from detransformer_edge.protocol.client import HomeClient
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.answers import (
    as_written,
    asks_a_question,
    has_full_sentence,
    spoken,
)
from detransformer_edge.service.intents import IntentResult
from detransformer_edge.service.placement import ServiceError
from tests.test_service import PROFILES, agent_config, wait_for_placement

ROOT = Path(__file__).resolve().parents[1]


# --- what may be answered, and how it is said ------------------------------------------------------

@pytest.mark.parametrize("text", [
    "who wrote the odyssey", "how far is the moon", "tell me a joke", "hey, what is the capital of peru",
    "explain photosynthesis", "Why is the sky blue?",
])
def test_questions_of_knowledge_are_answered(text: str) -> None:
    assert asks_a_question(text)


@pytest.mark.parametrize("text", [
    "vacuum the stairs", "order a pizza", "unlock my phone",  # commands: a reply would sound done
    "is the front door locked", "is the oven on?", "who is in the kitchen",  # the home's own state
    "is it going to rain?", "what time is it", "who won the match today",  # here and now
    "",
])
def test_commands_the_homes_state_and_the_here_and_now_are_not(text: str) -> None:
    assert not asks_a_question(text)


def test_the_spoken_form_keeps_whole_sentences_without_markdown() -> None:
    assert spoken("**Homer** wrote the *Odyssey*.") == "Homer wrote the Odyssey."
    assert spoken("Homer wrote it. It was written around") == "Homer wrote it."  # the cut sentence goes
    assert spoken("Dr. Smith lives 3.5 km away. Then") == "Dr. Smith lives 3.5 km away."
    assert spoken("It is about 384,400 km away, give or take") == "It is about 384,400 km away, give or take…"
    assert spoken("  ") == ""
    assert has_full_sentence("Homer wrote the Odyssey.") and not has_full_sentence("Yes.")
    assert not has_full_sentence("Dr.") and not has_full_sentence("It is 3.5")
    assert as_written(" who wrote  the odyssey ") == "Who wrote the odyssey?"
    assert as_written("tell me a joke") == "Tell me a joke."


def test_the_answers_config_is_read_and_checked() -> None:
    cfg = AgentConfig.loads('id = "a"\nanswer_questions = true\n[answers]\nmax_tokens = 20\ntimeout_s = 5\n'
                            'model = "smollm2-135m"\n')
    assert cfg.answer_questions and cfg.answers == AnswerConfig(20, 5.0, "smollm2-135m")
    assert AgentConfig.loads('id = "a"\n').answer_questions is False  # off unless asked for
    for bad in ("max_tokens = 0", "max_tokens = 1000", "timeout_s = 0", "timeout_s = 1e9", "speed = 2"):
        with pytest.raises(ConfigError, match="answers"):
            AgentConfig.loads(f'id = "a"\n[answers]\n{bad}\n')


# --- the plug-ins, against a fake home ----------------------------------------------------------------

class FakeHome:
    """What HermesNlu and the Wyoming connection see of an agent: recognise says "not recognised"."""

    def __init__(self, answer_questions: bool = True, answer: str | Exception = "Homer wrote it.") -> None:
        self.config = AgentConfig(id="dev0", answer_questions=answer_questions)
        self.id = "dev0"
        self.cluster = SimpleNamespace(is_leader=True, holds_lease=True, superseded=False, lease=None)
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.asked: list[str] = []
        self._answer = answer
        self.session = SimpleNamespace(publish=self._publish, subscribe=lambda *a, **k: None)

    async def _publish(self, topic: str, payload: str | bytes, qos: int = 0, **kw: Any) -> None:
        self.published.append((topic, json.loads(payload)))

    async def recognize(self, text: str, client_id: str | None = None, allowed: Any = None) -> IntentResult:
        return IntentResult(None, 0.1)

    async def answer(self, question: str, client_id: str | None = None) -> str:
        self.asked.append(question)
        if isinstance(self._answer, Exception):
            raise self._answer
        return self._answer

    def answer_failed(self, client_id: str, error: str) -> None:
        raise AssertionError(f"answer failed: {error}")


def query(text: str, **kw: Any) -> bytes:
    body = {"input": text, "siteId": "kitchen", "id": "q1", "sessionId": "s1", "lang": "en", **kw}
    return json.dumps(body).encode()


async def test_an_out_of_domain_question_is_not_recognised_then_spoken_on_tts_say() -> None:
    home = FakeHome()
    await HermesNlu()._answer(home, query("who wrote the odyssey"))  # type: ignore[arg-type]
    topics = [t for t, _ in home.published]
    assert topics == [hermes.TOPIC_NOT_RECOGNIZED, hermes_tts.TOPIC_TTS_SAY]  # Rhasspy's answer first
    NluIntentNotRecognized.from_dict(home.published[0][1])
    say = TtsSay.from_dict(home.published[1][1])  # the reference library reads it
    assert (say.text, say.site_id, say.session_id, say.id, say.lang) == ("Homer wrote it.", "kitchen", "s1", "q1", "en")
    assert home.asked == ["who wrote the odyssey"]


@pytest.mark.parametrize("case", ["off", "command", "filter", "home_state", "fails", "nothing_said"])
async def test_no_spoken_answer_unless_asked_for_a_question_and_one_was_made(case: str) -> None:
    home = FakeHome(answer_questions=case != "off",
                    answer=ServiceError("busy", "loading") if case == "fails" else ("" if case == "nothing_said" else "x y z."))
    text = {"command": "vacuum the stairs", "home_state": "is the back door locked"}.get(case, "who wrote the odyssey")
    extra = {"intentFilter": ["SetTimer"]} if case == "filter" else {}
    await HermesNlu()._answer(home, query(text, **extra))  # type: ignore[arg-type]
    assert [t for t, _ in home.published] == [hermes.TOPIC_NOT_RECOGNIZED]  # the answer Rhasspy waits for, always
    assert bool(home.asked) == (case in ("fails", "nothing_said"))


def test_only_a_rejection_by_the_model_is_a_question_for_the_language_model() -> None:
    home = FakeHome()
    q = hermes.parse_nlu_query(query("who wrote the odyssey"))
    assert should_answer(home, q, IntentResult(None, 0.1))  # type: ignore[arg-type]
    assert not should_answer(home, q, None)  # type: ignore[arg-type]  # the home could not run it
    assert not should_answer(home, q, IntentResult("GetTime", 0.9))  # type: ignore[arg-type]


async def assist(home: FakeHome, *events: Any) -> list[Any]:
    conn = AssistConnection(home, asyncio.StreamReader(), SimpleNamespace())  # type: ignore[arg-type]
    out: list[Any] = []

    async def write_event(event: Any) -> None:
        out.append(event)

    conn.write_event = write_event  # type: ignore[method-assign]
    for event in events:
        await conn.handle_event(event)
    return out


async def test_wyoming_handles_a_question_with_the_spoken_answer() -> None:
    home = FakeHome(answer="Homer wrote the Odyssey.")
    handled, = await assist(home, SelectProgram(HANDLE_PROGRAM).event(), Transcript("who wrote the odyssey").event())
    assert Handled.is_type(handled.type) and Handled.from_event(handled).text == "Homer wrote the Odyssey."
    # the intent program keeps its contract: not recognised (Home Assistant runs its own fallback)
    nr, = await assist(home, Transcript("who wrote the odyssey").event())
    assert NotRecognized.is_type(nr.type)
    # a command it does not know, or a home that cannot answer: not handled
    nh, = await assist(home, SelectProgram(HANDLE_PROGRAM).event(), Transcript("vacuum the stairs").event())
    failing = FakeHome(answer=ServiceError("busy", "loading"))
    nh2, = await assist(failing, SelectProgram(HANDLE_PROGRAM).event(), Transcript("who wrote the odyssey").event())
    assert NotHandled.is_type(nh.type) and NotHandled.is_type(nh2.type)


# --- running agents -------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def answering_home(broker: tuple[str, int], catalog: Any = None, answers: AnswerConfig | None = None):
    from detransformer_edge.service.catalog import tiny_catalog

    host, port = broker
    cluster = f"a{uuid.uuid4().hex[:8]}"
    config = dataclasses.replace(agent_config("dev0", cluster, host, port), answer_questions=True,
                                 answers=answers or AnswerConfig())
    prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[0]}.toml")
    async with HomeAgent(config, prof, catalog() if catalog else tiny_catalog(), broker=broker,
                         plugins=plugins_for(config), replan_delay_s=0.2) as agent:
        await wait_for_placement([agent], timeout=120)
        async with HomeClient(host, port, cluster=cluster) as client:
            yield agent, client


def no_end_of_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generations end only by their bounds (the end-of-text token is not a stop)."""
    from detransformer_edge.model.generation import DecodeLoop
    from detransformer_edge.service import tasks

    class BoundsOnly(DecodeLoop):
        def __init__(self, prompt_ids: Any, cfg: Any, eos_ids: Any = (), max_position: Any = None) -> None:
            super().__init__(prompt_ids, cfg, (), max_position)

    monkeypatch.setattr(tasks, "DecodeLoop", BoundsOnly)


@pytest.mark.mosquitto
async def test_the_request_api_answers_with_streamed_tokens_within_its_bounds(mosquitto_broker, monkeypatch) -> None:
    async with answering_home(mosquitto_broker, answers=AnswerConfig(max_tokens=6, timeout_s=60)) as (agent, client):
        no_end_of_text(monkeypatch)  # the tiny decoder's random weights may say it at once
        pieces: list[str] = []
        reply = await client.request("answer", "who wrote the odyssey", timeout=60, on_token=pieces.append)
        assert reply.error is None, reply.error
        r = reply.result or {}
        assert r["tokens"] == 6 and r["stop"] == "max_new_tokens", r  # random weights: no sentence ends
        assert r["text"] == spoken("".join(pieces))  # the streamed tokens, in their spoken form
        log = [rec for rec in agent.tasks.log if rec.kind == "answer"]
        assert log and log[-1].result == r["text"]  # the request log (and dashboard) show it

    async with answering_home(mosquitto_broker, answers=AnswerConfig(max_tokens=100, timeout_s=0.01)) as (agent, client):
        no_end_of_text(monkeypatch)
        reply = await client.request("answer", "who wrote the odyssey", timeout=60)
        assert reply.error is None and reply.result["stop"] == "deadline" and reply.result["tokens"] < 100


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_the_home_language_model_answers_a_voice_question(mosquitto_broker) -> None:
    """Done-when of the issue: a question out of the intent domain gets a spoken answer (the
    shipped intent model and SmolLM2, one device, over Hermes as Rhasspy asks)."""
    from detransformer_edge.service.catalog import CATALOGS

    catalog = lambda: CATALOGS["pretrained"]().subset(["intent", "smollm2-135m"])  # noqa: E731
    async with answering_home(mosquitto_broker, catalog) as (agent, client):
        qid = uuid.uuid4().hex
        client.listen_for_speech(qid)
        answer = await client.hermes_query("who wrote the odyssey", site_id="kitchen", query_id=qid, timeout=60)
        assert answer.topic == hermes.TOPIC_NOT_RECOGNIZED
        said = await client.speech(qid, timeout=60)
        assert said is not None and "Homer" in said, said
        assert said == spoken(said) and said.endswith((".", "!", "?", "…"))
        # the same question on the request API: its tokens stream, the reply is the spoken answer
        pieces: list[str] = []
        reply = await client.request("answer", "who wrote the odyssey", timeout=60, on_token=pieces.append)
        assert reply.error is None and reply.result is not None
        assert reply.result["text"] == said == spoken("".join(pieces))
        assert reply.result["stop"] in ("sentence", "eos")  # one sentence, well within the bounds
        # and from a shell: `detransformer-edge ask` prints the spoken answer
        from detransformer_edge.commands import ask
        from tests.test_ask import args

        out = io.StringIO()
        host, port = mosquitto_broker
        code = await ask.ask_hermes(args("who wrote the odyssey", broker=f"{host}:{port}",
                                         cluster=agent.config.cluster), out)
        assert code == ask.ANSWERED and f"answer   {said!r} (hermes/tts/say)" in out.getvalue(), out.getvalue()
