"""`detransformer-edge ask "turn on the kitchen light"`: ask the home from a shell, as a voice
assistant would, and print the intent, its slots, the plan the leader chose and the latency.

    detransformer-edge ask --broker 127.0.0.1:1883 "set a 3 minute timer"        # Rhasspy Hermes
    detransformer-edge ask --config deploy/agent.toml --username voice --password-file voice.password "..."
    detransformer-edge ask --wyoming kitchen-pi.local:10600 "turn on the lights in the kitchen"

A question the intent model does not know is answered by the home's language model when the
agents have ``answer_questions = true``: ``ask`` prints that spoken answer too.

``--trace`` sends the utterance as a traced intent request instead (``P/request``, op ``intent``,
``params.trace``): the leader's request log keeps every device's timeline of it, and the
leader's dashboard draws it when the request is clicked (docs/DASHBOARD.md).

Exit code: 0 recognised (or answered), 1 not recognised, 2 the home could not be asked (no broker,
no answer, an error).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from detransformer_edge.protocol.client import HomeClient
    from detransformer_edge.protocol.messages import LogEntry, Reply

HELP = "ask the home something from a shell (Hermes over MQTT, or Wyoming with --wyoming)"

RECOGNISED, NOT_RECOGNISED, FAILED = 0, 1, 2
ANSWERED = RECOGNISED
SPEECH_WAIT_S = 12.0  # a spoken answer comes within the agents' [answers] timeout_s (8 s by default)
LOG_WAIT_S = 3.0  # the leader's request-log line follows its answer


class AskError(Exception):
    """The home could not be asked; the message says what to fix."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="what to ask, e.g. \"turn on the kitchen light\"")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--broker", metavar="HOST:PORT", help="the home's MQTT broker (default port 1883)")
    where.add_argument("--config", metavar="AGENT.TOML", help="take the broker, cluster and TLS from an agent config")
    where.add_argument("--wyoming", metavar="HOST:PORT", help="ask an agent's Wyoming server instead (Home Assistant's way)")
    p.add_argument("--cluster", default=None, help="cluster name (default: the config's, else 'home')")
    p.add_argument("--username", default=None, help="MQTT username (default: the config's)")
    p.add_argument("--password-file", default=None, help="file with the MQTT password")
    p.add_argument("--site-id", default="shell", help="Hermes siteId (default: %(default)s)")
    p.add_argument("--intent-filter", default=None,
                   help="only these intents, comma-separated (Hermes intentFilter)")
    p.add_argument("--no-answer", action="store_true",
                   help="do not wait for a spoken answer to a question the intent model does not know")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default: %(default)s)")
    p.add_argument("--trace", action="store_true",
                   help="send it as a traced intent request (P/request) instead of a Hermes query: the leader's "
                        "dashboard then draws its timeline, one lane per device (no spoken answer)")


def _host_port(value: str, default_port: int, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise AskError(f"{what} {value!r} must look like HOST:PORT") from None


def run(args: argparse.Namespace) -> int:
    try:
        if args.wyoming and args.trace:
            raise AskError("--trace asks over MQTT (P/request); drop --wyoming and give --broker or --config")
        if args.wyoming:
            return asyncio.run(ask_wyoming(args.text, *_host_port(args.wyoming, 10600, "--wyoming"), args.timeout))
        return asyncio.run(ask_hermes(args))
    except AskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAILED


# --- Hermes -------------------------------------------------------------------------------------------

def _client_settings(args: argparse.Namespace) -> dict[str, Any]:
    from detransformer_edge.errors import ConfigError

    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AskError(f"cannot read --password-file {args.password_file}: {exc.strerror or exc}") from None
    if args.config:
        from detransformer_edge.cluster.agent import tls_context
        from detransformer_edge.cluster.config import AgentConfig

        try:
            config = AgentConfig.load(args.config)
            host, port, _ = config.broker.endpoint()
            user, config_password = config.broker.credentials()
            tls = tls_context(config)
        except ConfigError as exc:
            raise AskError(str(exc)) from None
        return {"host": host, "port": port, "cluster": args.cluster or config.cluster,
                "username": args.username or user, "password": password or config_password, "tls_context": tls}
    host, port = _host_port(args.broker or "127.0.0.1:1883", 1883, "--broker")
    return {"host": host, "port": port, "cluster": args.cluster or "home", "username": args.username,
            "password": password, "tls_context": None}


async def ask_hermes(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from detransformer_edge.protocol.client import HomeClient
    from detransformer_edge.service.answers import asks_a_question

    out = out or sys.stdout
    settings = _client_settings(args)
    flt = None if args.intent_filter is None else [n.strip() for n in args.intent_filter.split(",") if n.strip()]
    entries: dict[str, LogEntry] = {}
    logged = asyncio.Event()
    try:
        async with HomeClient(settings.pop("host"), settings.pop("port"), **settings,
                              connect_timeout_s=min(10.0, args.timeout)) as home:
            def on_log(entry: LogEntry) -> None:
                if entry.client_id:
                    entries[entry.client_id] = entry
                    logged.set()

            home.follow_log(on_log)
            t0 = time.perf_counter()
            said = None
            if args.trace:
                reply = await traced_intent(home, args.text, flt, args.timeout)
                qid, ms = str(reply.id), (time.perf_counter() - t0) * 1e3
            else:
                qid = uuid.uuid4().hex
                home.listen_for_speech(qid)
                try:
                    answer = await home.hermes_query(args.text, site_id=args.site_id, intent_filter=flt,
                                                     timeout=args.timeout, query_id=qid)
                except TimeoutError:
                    raise AskError(f"no answer within {args.timeout:g} s: is an agent of cluster "
                                   f"'{home.topics.cluster}' running on this broker, and may this account "
                                   "write hermes/nlu/query and read hermes/intent/#?") from None
                ms = (time.perf_counter() - t0) * 1e3
                if (answer.topic == "hermes/nlu/intentNotRecognized" and flt is None and not args.no_answer
                        and asks_a_question(args.text)):  # with answer_questions the home speaks an answer
                    said = await home.speech(qid, timeout=min(args.timeout, SPEECH_WAIT_S))
                else:
                    home.forget_speech(qid)
            deadline = time.monotonic() + LOG_WAIT_S
            while qid not in entries and time.monotonic() < deadline:
                logged.clear()
                try:
                    await asyncio.wait_for(logged.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
    except ConnectionError as exc:
        raise AskError(str(exc)) from None
    if args.trace:
        return print_traced(reply, entries.get(qid), ms, out)
    code = print_hermes(answer, entries.get(qid), ms, out)
    if said is not None:
        print(f"answer   {said!r} (hermes/tts/say)", file=out)
        return ANSWERED
    return code


async def traced_intent(home: HomeClient, text: str, flt: list[str] | None, timeout: float) -> Reply:
    """The utterance as a traced ``intent`` request to the leader; its reply."""
    params: dict[str, Any] = {"trace": True}
    if flt is not None:
        params["intent_filter"] = ",".join(flt)
    try:
        reply = await home.request("intent", text, params, timeout=timeout)
    except TimeoutError:
        raise AskError(f"no reply within {timeout:g} s: is an agent of cluster '{home.topics.cluster}' running "
                       "on this broker, and may this account write the cluster's request topic and read its "
                       "replies topic?") from None
    if reply.error is not None:
        raise AskError(f"the home answered {reply.error.code}: {reply.error.message}")
    return reply


def print_traced(reply: Reply, entry: LogEntry | None, ms: float, out: TextIO) -> int:
    from detransformer_edge.service.intents import intent_from_dict

    result = intent_from_dict(reply.result or {})
    if result.intent is not None:
        print(f"intent   {result.intent} (confidence {result.confidence:.2f})", file=out)
        for k, s in enumerate(result.slots):
            print(f"{'slots' if k == 0 else '':8} {s.slot_name} = {s.value!r}  (heard {s.raw_value!r})", file=out)
        if not result.slots:
            print("slots    -", file=out)
    else:
        print(f"not recognised (confidence {result.confidence:.2f})", file=out)
    if entry is not None:
        print(f"plan     {entry.plan or '-'}", file=out)
        print(f"latency  {ms:.0f} ms end to end (leader {entry.latency_ms} ms)", file=out)
        print(f"trace    request {entry.id}: click it in the Requests list of the leader's dashboard", file=out)
    else:
        print(f"latency  {ms:.0f} ms end to end", file=out)
        print(f"trace    request {reply.id} (client id): click it in the Requests list of the leader's dashboard",
              file=out)
    return RECOGNISED if result.intent is not None else NOT_RECOGNISED


def _typed(value: dict[str, Any]) -> str:
    v = value.get("value")
    kind = value.get("kind", "Custom")
    if kind == "Duration":
        parts = [f"{value[k]} {k}" for k in ("days", "hours", "minutes", "seconds") if value.get(k)]
        return f"{v} s ({', '.join(parts) or '0 seconds'}) [Duration]"
    return f"{v!r} [{kind}]"


def print_hermes(answer: Any, entry: Any, ms: float, out: TextIO) -> int:
    p = answer.payload
    if answer.topic == "hermes/error/nlu":
        print(f"error: the home could not read the query: {p.get('error')}", file=out)
        return FAILED
    if answer.recognized:
        print(f"intent   {answer.intent} (confidence {p['intent']['confidenceScore']:.2f})", file=out)
        slots = p.get("slots") or []
        for k, s in enumerate(slots):
            print(f"{'slots' if k == 0 else '':8} {s['slotName']} = {_typed(s['value'])}  "
                  f"(heard {s.get('rawValue')!r})", file=out)
        if not slots:
            print("slots    -", file=out)
    else:
        print(f"not recognised: {p.get('input')!r}", file=out)
    if entry is not None:
        if entry.error:
            print(f"note     the home's log: {entry.error}", file=out)
        print(f"plan     {entry.plan or '-'}", file=out)
        print(f"latency  {ms:.0f} ms end to end (leader {entry.latency_ms} ms)", file=out)
    else:
        print(f"latency  {ms:.0f} ms end to end (no request-log line within {LOG_WAIT_S:g} s: this account "
              "may not read the cluster's log topic)", file=out)
    return RECOGNISED if answer.recognized else NOT_RECOGNISED


# --- Wyoming ------------------------------------------------------------------------------------------

async def ask_wyoming(text: str, host: str, port: int, timeout: float, out: TextIO | None = None) -> int:
    from wyoming.asr import Transcript
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.intent import Intent, NotRecognized

    out = out or sys.stdout
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), AsyncTcpClient(host, port) as client:
            await client.write_event(Transcript(text, language="en").event())
            event = await client.read_event()
    except TimeoutError:
        raise AskError(f"no Wyoming answer from {host}:{port} within {timeout:g} s") from None
    except OSError as exc:
        raise AskError(f"cannot reach a Wyoming server at {host}:{port}: {exc.strerror or exc} "
                       "(is wyoming_port set in the agent's config?)") from None
    ms = (time.perf_counter() - t0) * 1e3
    if event is None:
        raise AskError(f"{host}:{port} closed the connection without an answer")
    if Intent.is_type(event.type):
        intent = Intent.from_event(event)
        print(f"intent   {intent.name}", file=out)
        for k, e in enumerate(intent.entities):
            print(f"{'slots' if k == 0 else '':8} {e.name} = {e.value!r}", file=out)
        if not intent.entities:
            print("slots    -", file=out)
        print(f"reply    {intent.text!r}", file=out)
        print(f"latency  {ms:.0f} ms end to end", file=out)
        return RECOGNISED
    if NotRecognized.is_type(event.type):
        print(f"not recognised: {text!r} ({NotRecognized.from_event(event).text})", file=out)
        print(f"latency  {ms:.0f} ms end to end", file=out)
        return NOT_RECOGNISED
    if Error.is_type(event.type):
        raise AskError(f"the Wyoming server answered an error: {Error.from_event(event).text}")
    raise AskError(f"unexpected Wyoming event {event.type!r}")
