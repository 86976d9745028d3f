"""The paired experiment's text as token ids: its tokenizer, the token streams and their batches.

* Tokenizer: byte-level BPE (``tokenizers``), 4096 entries incl. the end-of-sentence token
  ``<|eos|>``, trained on the corpus' train split and saved as one JSON file (cached under
  ``CACHE_DIR``). A given path makes another machine use exactly this file; the token streams'
  sha256 is recorded (``TokenData.describe``) so two machines can check they saw the same ids.
* Streams: sentences tokenised, joined with EOS into one stream and cut into windows of
  ``seq_len + 1`` tokens at stride ``seq_len`` (inputs = first ``seq_len``, targets = last
  ``seq_len``); epoch e visits the training windows in the order
  ``numpy.random.default_rng([seed, e])`` gives (``Batches``). Validation: the held-out split
  packed the same way, in order (``validation_set``).

Only torch, numpy and tokenizers are imported here, so the experiment runs on a bare GPU machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.training.corpus import Corpus

log = logging.getLogger(__name__)

EOS = "<|eos|>"
VOCAB_SIZE = 4096
CACHE_DIR = Path.home() / ".cache" / "detransformer_edge" / "paired"


def train_tokenizer(sentences: Sequence[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on ``sentences``; id 0 is ``<|eos|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(sentences), trainer, length=len(sentences))
    return tok


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_tokenizer_path(corpus: Corpus, vocab_size: int = VOCAB_SIZE) -> Path:
    return CACHE_DIR / f"tokenizer-{corpus.fingerprint}-v{vocab_size}.json"


def get_tokenizer(corpus: Corpus, path: str | Path | None = None, vocab_size: int = VOCAB_SIZE):
    """(tokenizer, path). ``path`` given: load exactly that file (it must exist). Otherwise the
    cached tokenizer for this corpus, trained on its train split and saved first if missing."""
    from tokenizers import Tokenizer

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer {path}: no such file (copy the tokenizer JSON trained on "
                              "the development machine; it is not retrained from a given path)")
    else:
        path = default_tokenizer_path(corpus, vocab_size)
        if not path.is_file():
            log.info("training the byte-level BPE tokenizer (%d entries) on %d sentences", vocab_size,
                     len(corpus.train))
            tok = train_tokenizer(corpus.train, vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            os.replace(tmp, path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise ConfigError(f"{path} is not a tokenizers JSON file: {exc}") from exc
    if tok.token_to_id(EOS) is None:
        raise ConfigError(f"{path} has no {EOS} token; it is not this experiment's tokenizer")
    return tok, path


def encode_stream(tok: Any, sentences: Sequence[str]) -> np.ndarray:
    """Sentences tokenised (encode_batch, all cores) and joined, each followed by EOS (int32)."""
    eos = tok.token_to_id(EOS)
    parts: list[np.ndarray] = []
    chunk = 8192
    for k in range(0, len(sentences), chunk):
        for enc in tok.encode_batch(list(sentences[k : k + chunk]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def sha_ids(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<i4").tobytes()).hexdigest()[:16]


@dataclass
class TokenData:
    train: torch.Tensor  # 1-D int64 token stream
    val: torch.Tensor
    vocab_size: int
    eos_id: int
    tokenizer_path: str
    tokenizer_sha: str
    corpus_fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_path, "tokenizer_sha256": self.tokenizer_sha,
                "vocab_size": self.vocab_size, "corpus_fingerprint": self.corpus_fingerprint,
                "train_tokens": int(self.train.numel()), "held_out_tokens": int(self.val.numel()),
                "train_ids_sha": sha_ids(self.train.numpy()), "held_out_ids_sha": sha_ids(self.val.numpy())}


def load_token_data(corpus: Corpus, tokenizer_path: str | Path | None = None,
                    vocab_size: int = VOCAB_SIZE, cache: bool = True) -> TokenData:
    """Both splits tokenised; cached as .npz keyed by corpus fingerprint + tokenizer sha256."""
    tok, path = get_tokenizer(corpus, tokenizer_path, vocab_size)
    tok_sha = sha256_file(path)
    cache_file = CACHE_DIR / f"tokens-{corpus.fingerprint}-{tok_sha[:16]}.npz"
    arrays = None
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = z["train"], z["val"]
        except (OSError, ValueError, KeyError):
            arrays = None
    if arrays is None:
        t0 = time.monotonic()
        arrays = encode_stream(tok, corpus.train), encode_stream(tok, corpus.held_out)
        log.info("tokenised %d + %d tokens in %.1f s", len(arrays[0]), len(arrays[1]), time.monotonic() - t0)
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + ".tmp.npz")
            np.savez(tmp, train=arrays[0], val=arrays[1])
            os.replace(tmp, cache_file)
    return TokenData(torch.from_numpy(arrays[0].astype(np.int64)), torch.from_numpy(arrays[1].astype(np.int64)),
                     tok.get_vocab_size(), tok.token_to_id(EOS), str(path), tok_sha, corpus.fingerprint)


def windows(stream: torch.Tensor, seq_len: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window i = stream[i*seq_len : i*seq_len + seq_len + 1] -> (inputs, targets), each (n, seq_len)."""
    starts = index.to(torch.int64)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    w = stream[starts]
    return w[:, :-1], w[:, 1:]


def n_windows(stream: torch.Tensor, seq_len: int) -> int:
    return max(0, (stream.numel() - 1) // seq_len)


class Batches:
    """Batch of step k, computed directly (a resumed run needs no skipping): epoch e visits the
    training windows in ``numpy.random.default_rng([seed, e]).permutation`` order."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self.n = n_windows(stream, seq_len)
        if self.n < batch_size:
            raise ConfigError(f"the training stream has {self.n} windows of {seq_len} tokens, fewer than "
                              f"batch size {batch_size}")
        self.per_epoch = self.n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = torch.from_numpy(self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size].copy())
        return windows(self.stream, self.seq_len, idx)


def validation_set(data: TokenData, seq_len: int, val_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``val_tokens // seq_len`` held-out windows (all if fewer), in order."""
    n = min(val_tokens // seq_len, n_windows(data.val, seq_len))
    if n < 1:
        raise ConfigError(f"the held-out split has no window of {seq_len} tokens")
    return windows(data.val, seq_len, torch.arange(n))
