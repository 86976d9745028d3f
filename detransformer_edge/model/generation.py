"""Autoregressive text generation with a decoder's KV cache: greedy or top-p sampling, streaming.

The prompt runs once (prefill) filling the per-layer caches; every further step feeds only the
newest token at ``start_pos = len(ids) - 1``. Text streams as it becomes complete characters
(``IncrementalDecoder``) and generation stops at an end-of-sequence id or ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from detransformer_edge.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from detransformer_edge.model.chat import ChatTemplate
    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.tokenizer import TextTokenizer

# eos / max_new_tokens / max_position: the loop's own rules; "deadline" and "sentence": its driver
# ended it (``DecodeLoop.stop``), e.g. a spoken answer's time bound or its first full sentence
StopReason = Literal["eos", "max_new_tokens", "max_position", "deadline", "sentence"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0  # nucleus: sample among the smallest set of tokens holding top_p of the mass
    seed: int | None = None  # None: nondeterministic sampling
    stop_ids: tuple[int, ...] = ()  # in addition to the tokenizer's end-of-sequence id

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only (the stop token excluded)
    prompt_tokens: int
    stop_reason: StopReason
    prefill_seconds: float
    decode_seconds: float  # steps after the first generated token
    timings: list[float] = field(default_factory=list, repr=False)  # seconds per generated token

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time they took (prefill excluded)."""
        steps = max(len(self.timings) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def select_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Next id from the last position's logits (V,): argmax, or top-p sampling at a temperature."""
    import torch

    if cfg.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.to(torch.float32) / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p (the most likely one always stays).
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < cfg.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


class DecodeLoop:
    """One generation as a state machine, driven by whoever computes the logits: a local model
    (``generate_ids``) or the devices of a distributed plan (the leader). It is the only decode
    loop of the project, so stop rules, sampling and the context limit are the same everywhere::

        loop = DecodeLoop(prompt_ids, cfg, eos_ids, max_position)
        while not loop.done:
            kind, ids = loop.next_input()      # ("prefill", prompt) first, then ("decode", [token])
            token = loop.push(logits_of(kind, ids))   # None when this token ended the generation

    After a failed distributed step, ``restart()`` makes the next input a prefill of the prompt
    and every token so far (a new plan has no caches)."""

    def __init__(self, prompt_ids: Sequence[int], cfg: SamplingConfig, eos_ids: Sequence[int] = (),
                 max_position: int | None = None) -> None:
        import torch

        if not prompt_ids:
            raise ConfigError("generation needs a non-empty prompt")
        if max_position is not None and len(prompt_ids) > max_position:
            raise ConfigError(f"prompt is {len(prompt_ids)} tokens; the model's context is {max_position}")
        self.prompt = list(prompt_ids)
        self.cfg = cfg
        self.max_position = max_position
        self.tokens: list[int] = []
        self.stop_reason: StopReason | None = None if cfg.max_new_tokens > 0 else "max_new_tokens"
        self._stop = set(eos_ids) | set(cfg.stop_ids)
        self._generator = torch.Generator().manual_seed(cfg.seed) if not cfg.greedy and cfg.seed is not None else None
        self._prefill = True

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def position(self) -> int:
        """Prompt and generated tokens so far (the newest one not yet read by the model)."""
        return len(self.prompt) + len(self.tokens)

    def next_input(self) -> tuple[Literal["prefill", "decode"], list[int]]:
        if self._prefill:
            return "prefill", self.prompt + self.tokens
        return "decode", [self.tokens[-1]]

    def restart(self) -> None:
        self._prefill = True

    def stop(self, reason: StopReason) -> None:
        """End the generation now (the driver's own rule); a loop already done keeps its reason."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def push(self, logits: torch.Tensor) -> int | None:
        """The logits of the last position (V,) or (..., V): choose the next token."""
        token = select_next(logits.reshape(-1, logits.shape[-1])[-1], self.cfg, self._generator)
        self._prefill = False
        if token in self._stop:
            self.stop_reason = "eos"
            return None
        self.tokens.append(token)
        if len(self.tokens) >= self.cfg.max_new_tokens:
            self.stop_reason = "max_new_tokens"
        elif self.max_position is not None and self.position - 1 >= self.max_position:
            self.stop_reason = "max_position"  # no position left to read this token at
        return token


def generate_ids(
    model: Decoder,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    eos_ids: Sequence[int] = (),
    timings: list[float] | None = None,
) -> Iterator[int]:
    """Yield generated ids one by one (prefill, then one cached step per token) on a local model.

    Stops before yielding an id in ``eos_ids`` or ``cfg.stop_ids``, after ``cfg.max_new_tokens``
    ids, or at the model's ``max_position``. ``timings`` (if given) receives seconds per id.
    """
    import torch

    loop = DecodeLoop(prompt_ids, cfg, eos_ids, model.cfg.max_position)
    caches = model.new_caches()
    pos = 0
    while not loop.done:
        started = time.perf_counter()
        _, ids = loop.next_input()
        # inference_mode only around the step: a `with` spanning the yield would leak into the caller.
        with torch.inference_mode():
            logits = model(torch.tensor([ids], dtype=torch.long), start_pos=pos, caches=caches)  # (1, T, V)
            token = loop.push(logits[0, -1])
        pos += len(ids)
        if timings is not None:
            timings.append(time.perf_counter() - started)
        if token is not None:
            yield token


def stream_text(
    model: Decoder, tokenizer: TextTokenizer, prompt_ids: Sequence[int], cfg: SamplingConfig
) -> Iterator[str]:
    """Generated text as complete-character pieces, as soon as each is known."""
    from detransformer_edge.model.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(tokenizer)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for token in generate_ids(model, prompt_ids, cfg, eos):
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def build_prompt(
    tokenizer: TextTokenizer, prompt: str, chat_template: ChatTemplate | None, system: str | None = None
) -> list[int]:
    """Prompt ids: through the chat template when given (instruct use), else the raw text."""
    if chat_template is not None:
        return tokenizer.encode(chat_template.user_prompt(prompt, system=system), add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


def generate(
    model: Decoder,
    tokenizer: TextTokenizer,
    prompt_ids: Sequence[int],
    cfg: SamplingConfig,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Run generation to the end, calling ``on_text`` with each text piece as it completes."""
    from detransformer_edge.model.tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(tokenizer)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    timings: list[float] = []
    ids: list[int] = []
    pieces: list[str] = []
    for token in generate_ids(model, prompt_ids, cfg, eos, timings=timings):
        ids.append(token)
        piece = decoder.push(token)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    tail = decoder.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    if len(timings) > len(ids):
        reason: StopReason = "eos"
    elif len(prompt_ids) + len(ids) >= model.cfg.max_position and len(ids) < cfg.max_new_tokens:
        reason = "max_position"
    else:
        reason = "max_new_tokens"
    return GenerationResult(
        text="".join(pieces),
        token_ids=ids,
        prompt_tokens=len(prompt_ids),
        stop_reason=reason,
        prefill_seconds=timings[0] if timings else 0.0,
        decode_seconds=sum(timings[1:]),
        timings=timings,
    )
