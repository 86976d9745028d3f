"""How far a quantized model is from its float32 self: greedy continuations of fixed prompts,
held-out perplexity and sentence-embedding cosine. Used by the slow tests and ``bench/quant.py``
so both report the same measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Ten fixed instruct prompts of the kind a home assistant gets (chat template applied).
PARITY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for saving energy at home.",
    "Explain what a thermostat does in one sentence.",
    "Write a short poem about rain.",
    "How many legs does a spider have?",
    "What should I cook for dinner tonight?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Remind me how to boil an egg.",
    "What is 12 times 7?",
)


@dataclass(frozen=True)
class Divergence:
    """Where a continuation first differs from the reference (-1: identical)."""

    prompt: str
    first_difference: int
    reference: tuple[int, ...]
    candidate: tuple[int, ...]

    @property
    def identical(self) -> bool:
        return self.first_difference < 0


def greedy_continuation(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy ids after ``prompt_ids``, ``max_new_tokens`` of them (EOS does not stop it, so every
    continuation has the same length to compare)."""
    from detransformer_edge.model.generation import SamplingConfig, generate_ids

    return list(generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=max_new_tokens)))


def prompt_ids(loaded: Any, prompt: str) -> list[int]:
    from detransformer_edge.model.generation import build_prompt

    return build_prompt(loaded.tokenizer, prompt, loaded.chat_template)


def compare_continuations(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]],
                          prompts: Sequence[str] = PARITY_PROMPTS) -> list[Divergence]:
    out = []
    for p, a, b in zip(prompts, reference, candidate, strict=True):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1 if len(a) == len(b) else min(len(a), len(b)))
        out.append(Divergence(p, diff, tuple(a), tuple(b)))
    return out


def held_out_sequences(tokenizer: Any, tokens: int = 8192, seq_len: int = 256) -> torch.Tensor:
    """(N, seq_len) ids of the held-out corpus (``training/corpus.py``, split by sentence hash),
    shuffled with a fixed seed."""
    from detransformer_edge.training.corpus import load_corpus
    from detransformer_edge.training.distil_decoder import pack_sentences

    return pack_sentences(load_corpus().held_out, tokenizer, seq_len, seed=0, max_tokens=tokens)


def perplexity(model: Any, sequences: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of ``sequences`` under ``model`` (inference mode)."""
    from detransformer_edge.training.distil_decoder import perplexity as ppl

    with torch.inference_mode():
        return ppl(model, sequences, batch_size=batch_size)


def embedding_cosines(a: Any, b: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Per-text cosine between two encoders' sentence embeddings (one padded batch)."""
    batch = tokenizer.encode_batch(list(texts))
    ids, mask = torch.tensor(batch.input_ids), torch.tensor(batch.attention_mask)
    with torch.inference_mode():
        return torch.nn.functional.cosine_similarity(a.sentence_embedding(ids, mask), b.sentence_embedding(ids, mask))
