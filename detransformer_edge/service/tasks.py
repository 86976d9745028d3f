"""What the home can be asked: embeddings, intents and generations, over one run coordinator.

Each task turns its input into token ids on the leader, runs the model across the chosen
devices (``service/runs.py``) and turns the result back: mean-pooled vectors, an intent with its
slots, or text streamed piece by piece through the one decode loop (``model/generation.py``).

* **Backpressure.** At most ``max_inflight`` requests run at once and at most ``max_queue`` wait;
  beyond that a request gets a ``busy`` error at once instead of growing memory.
* **The request log.** Every request is one ``LogEntry`` (dashboard, ``P/log``, Home Assistant),
  finished exactly once with its result or its error.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from detransformer_edge.cluster.config import AnswerConfig
from detransformer_edge.errors import DetransformerError
from detransformer_edge.model.generation import DecodeLoop, SamplingConfig, build_prompt
from detransformer_edge.model.tokenizer import IncrementalDecoder
from detransformer_edge.parallel.trace import Span, summary
from detransformer_edge.protocol.messages import LogEntry
from detransformer_edge.service.answers import SYSTEM_PROMPT, as_written, has_full_sentence, spoken
from detransformer_edge.service.catalog import Catalog
from detransformer_edge.service.placement import ServiceError
from detransformer_edge.service.runs import RunCoordinator, plan_label

log = logging.getLogger(__name__)

_req_ids = itertools.count()
Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class RequestRecord:
    """One line of the request log, filled in as the request runs."""

    id: str
    kind: str
    text: str
    started: float
    plan: str = ""
    latency_ms: float | None = None
    result: str = ""
    error: str | None = None
    client_id: str | None = None  # the caller's id (Hermes query id, request id)
    spans: list[Span] | None = None  # a traced request's timeline, every device's spans
    breakdown: dict[str, Any] | None = None  # a finished traced request's ``trace.summary`` (ms)

    def entry(self) -> LogEntry:
        return LogEntry(self.id, self.kind, self.text, self.started, self.plan, self.latency_ms, self.result,
                        self.error, self.client_id)

    def trace(self) -> list[list[Any]] | None:
        return None if self.spans is None else [s.to_list() for s in self.spans]

    def to_dict(self) -> dict[str, Any]:
        d = self.entry().to_dict()
        if self.spans is not None:
            d["trace"] = self.trace()
        if self.breakdown is not None:
            d["breakdown"] = self.breakdown
        return d


class Tasks:
    def __init__(self, catalog: Catalog, runs: RunCoordinator, *, max_inflight: int = 4, max_queue: int = 32,
                 log_size: int = 200) -> None:
        self.catalog = catalog
        self.runs = runs
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_waiting = max_inflight + max_queue
        self._waiting = 0
        self.log: collections.deque[RequestRecord] = collections.deque(maxlen=log_size)
        self.listeners: list[Listener] = []  # dashboard, P/log, Home Assistant sensors

    # --- bookkeeping ------------------------------------------------------------------------------

    async def _admit(self) -> None:
        if self._waiting >= self._max_waiting:
            raise ServiceError("busy", f"{self._waiting} requests in flight or queued; try again shortly")
        self._waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._waiting -= 1
            raise

    async def _admit_logged(self, rec: RequestRecord, t0: float) -> None:
        """``_admit``; a request refused as ``busy`` is finished in the log as that error."""
        try:
            await self._admit()
        except ServiceError as exc:
            self.finish(rec, t0, error=str(exc))
            raise

    def _leave(self) -> None:
        self._slots.release()
        self._waiting -= 1

    def resolve(self, task: str, model: str | None) -> str:
        try:
            return self.catalog.resolve(task, model)
        except DetransformerError as exc:
            raise ServiceError("bad_request", str(exc)) from None

    def record(self, kind: str, text: str, client_id: str | None = None, trace: bool = False) -> RequestRecord:
        rec = RequestRecord(f"{kind[0]}{next(_req_ids)}-{uuid.uuid4().hex[:6]}", kind, text, time.time(),
                            client_id=client_id, spans=[] if trace else None)
        self.log.append(rec)
        return rec

    def finish(self, rec: RequestRecord, t0: float, result: str = "", error: str | None = None) -> None:
        rec.latency_ms = round((time.perf_counter() - t0) * 1e3, 2)
        rec.result, rec.error = result, error
        if rec.spans:  # a traced request that ran (one refused at once has no spans to sum)
            rec.breakdown = summary(rec.latency_ms / 1e3, rec.spans, self.slowest_link(rec.spans), first=self.runs.me)
        self.emit("request", rec.to_dict())

    def slowest_link(self, spans: list[Span]) -> float:
        """The slowest link (Mbit/s) among the devices of a traced run: the rate its wire time is
        counted at (0, no wire time, when no device's profile is known)."""
        profiles = self.runs.placements.state.profiles
        return min((profiles[d].link_mbit for d in {s.device for s in spans} if d in profiles), default=0.0)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, data)
            except Exception:  # a broken dashboard client must not break serving
                log.exception("listener failed")

    async def _encode(self, model: str, ids: torch.Tensor, mask: torch.Tensor, rec: RequestRecord,
                      strategy: str = "adaptive") -> torch.Tensor:
        return await self.runs.encode(model, ids, mask, rec.id, strategy,
                                      on_plan=lambda run, plan: setattr(rec, "plan", plan_label(model, run, plan)),
                                      spans=rec.spans)

    # --- the tasks --------------------------------------------------------------------------------

    async def embed(self, texts: list[str], model: str | None = None, strategy: str = "adaptive",
                    client_id: str | None = None, trace: bool = False) -> tuple[list[list[float]], RequestRecord]:
        from detransformer_edge.model.encoder import mean_pool

        model = self.resolve("embed", model)
        served = self.catalog.get(model)
        tools = self.catalog.tools(model)
        rec = self.record("embed", " | ".join(texts), client_id, trace)
        t0 = time.perf_counter()
        await self._admit_logged(rec, t0)
        try:
            rows = [tools.tokenizer.encode(t) for t in texts]
            too_long = max(len(r) for r in rows)
            if too_long > served.max_tokens:
                raise ServiceError("bad_request", f"input is {too_long} tokens; the embedding model reads at most {served.max_tokens}")
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            hidden = await self._encode(model, ids, mask, rec, strategy)
            vectors = mean_pool(hidden, mask).tolist()
            self.finish(rec, t0, f"{len(vectors)} x {len(vectors[0])}")
            return vectors, rec
        except DetransformerError as exc:
            self.finish(rec, t0, error=str(exc))
            raise
        finally:
            self._leave()

    async def intent(self, text: str, model: str | None = None, client_id: str | None = None,
                     trace: bool = False, allowed: frozenset[str] | None = None) -> tuple[Any, RequestRecord]:
        model = self.resolve("intent", model)
        head = self.catalog.tools(model).intent_head
        rec = self.record("intent", text, client_id, trace)
        t0 = time.perf_counter()
        await self._admit_logged(rec, t0)
        try:
            served = self.catalog.get(model)
            prepared = head.prepare(text)
            if prepared.input_ids.shape[1] > served.max_tokens:
                raise ServiceError("bad_request", f"utterance is {prepared.input_ids.shape[1]} tokens; at most {served.max_tokens}")
            hidden = await self._encode(model, prepared.input_ids, prepared.attention_mask, rec)
            result = head.decode(text, hidden, prepared, allowed)
            self.finish(rec, t0, f"{result.intent or 'not recognised'} ({result.confidence:.2f})")
            return result, rec
        except DetransformerError as exc:
            self.finish(rec, t0, error=str(exc))
            raise
        finally:
            self._leave()

    async def answer(self, question: str, bounds: AnswerConfig,
                     on_text: Callable[[str], Awaitable[None]] | None = None,
                     client_id: str | None = None) -> tuple[str, RequestRecord, dict[str, Any]]:
        """A short spoken answer to ``question`` from the language model (``service/answers.py``):
        one sentence, within ``bounds`` (tokens and seconds); logged as kind "answer"."""
        model = self.resolve("generate", bounds.model)
        return await self.generate(as_written(question), bounds.max_tokens, on_text, True, model, "adaptive", client_id,
                                   kind="answer", system=SYSTEM_PROMPT, deadline_s=bounds.timeout_s,
                                   until=has_full_sentence, final=spoken)

    async def generate(
        self, prompt: str, max_new_tokens: int = 32, on_text: Callable[[str], Awaitable[None]] | None = None,
        chat: bool = True, model: str | None = None, strategy: str = "adaptive", client_id: str | None = None,
        trace: bool = False, *, kind: str = "generate", system: str | None = None, deadline_s: float | None = None,
        until: Callable[[str], bool] | None = None, final: Callable[[str], str] | None = None,
    ) -> tuple[str, RequestRecord, dict[str, Any]]:
        """Greedy generation; ``on_text`` receives decoded pieces as they arrive. It ends at the end
        of text or ``max_new_tokens``, and earlier when ``deadline_s`` seconds have passed (stop
        "deadline") or ``until(text so far)`` says so (stop "sentence"). ``kind`` names it in the
        request log; ``system`` is the chat template's system prompt; ``final`` turns the text
        into the result the caller gets and the log shows."""
        model = self.resolve("generate", model)
        served = self.catalog.get(model)
        tools = self.catalog.tools(model)
        tok = tools.tokenizer
        if not 1 <= max_new_tokens <= 512:
            raise ServiceError("bad_request", "max_new_tokens must be between 1 and 512")
        rec = self.record(kind, prompt, client_id, trace)
        t0 = time.perf_counter()
        await self._admit_logged(rec, t0)
        try:
            ids = build_prompt(tok, prompt, tools.chat_template if chat else None, system=system)
            if len(ids) + max_new_tokens > served.max_tokens:
                raise ServiceError("bad_request", f"prompt is {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds {served.max_tokens}")
            eos = [tok.eos_id] if getattr(tok, "eos_id", None) is not None else []
            loop = DecodeLoop(ids, SamplingConfig(max_new_tokens=max_new_tokens), eos)
            decoder = IncrementalDecoder(tok)
            pieces: list[str] = []
            first_token_s = None

            async def out(piece: str) -> None:
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        await on_text(piece)

            async with self.runs.generation(
                    model, rec.id, strategy, loop, spans=rec.spans,
                    on_plan=lambda variant, plan: setattr(rec, "plan", plan_label(model, variant, plan))) as run:
                while not loop.done:
                    token = loop.push(await run.step())
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - t0
                    if token is not None:
                        await out(decoder.push(token))
                    if until is not None and not loop.done and until("".join(pieces)):
                        loop.stop("sentence")
                    if deadline_s is not None and not loop.done and time.perf_counter() - t0 >= deadline_s:
                        loop.stop("deadline")
            await out(decoder.flush())
            text_out = "".join(pieces) if final is None else final("".join(pieces))
            total = time.perf_counter() - t0
            n = len(loop.tokens)
            stats = {"tokens": n, "seconds": round(total, 3),
                     "ttft_ms": round((first_token_s or total) * 1e3, 1),
                     "tokens_per_s": round(n / total, 2) if total > 0 else 0.0, "stop": loop.stop_reason}
            self.finish(rec, t0, text_out)
            return text_out, rec, stats
        except DetransformerError as exc:
            self.finish(rec, t0, error=str(exc))
            raise
        finally:
            self._leave()
