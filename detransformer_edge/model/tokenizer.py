"""Text <-> token ids for the pretrained presets, on the `tokenizers` library.

* MiniLM ships a ``tokenizer.json`` (BERT WordPiece); we load it as is.
* A GGUF file has no ``tokenizer.json``: it stores the vocabulary, merges, token types and
  special ids as metadata (``tokenizer.ggml.*``). ``from_gguf_metadata`` rebuilds the byte-level
  BPE from them. The pre-tokenizer follows ``tokenizer.ggml.pre``: for ``smollm`` llama.cpp
  first isolates every digit (``\\p{N}``) and then applies the GPT-2 split, exactly what SmolLM2's
  own ``tokenizer.json`` does with ``Digits(individual_digits=True)`` + ``ByteLevel``.

``IncrementalDecoder`` turns a growing list of ids into text pieces for streaming; a character
split over several byte tokens is held back until it is complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detransformer_edge.errors import ConfigError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# GGUF pre-tokenizer names whose split is "GPT-2 regex, optionally digits first".
_DIGITS_FIRST_PRE = {"smollm"}
_GPT2_PRE = {"gpt2", "default", "smollm"}


@dataclass(frozen=True)
class BatchEncoding:
    """Padded ids and the 1/0 attention mask of a batch (lists, so this module needs no torch)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]


class TextTokenizer:
    """One tokenizer object for both presets: encode, decode, batch with padding, special ids."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int = 0,
        max_length: int | None = None,
        truncate: bool = False,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.add_bos = add_bos  # GGUF flag: prepend BOS when encoding with special tokens
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_length = max_length
        self.truncate = truncate
        # Never let a tokenizer.json's fixed padding (MiniLM's pads every text to 128) leak into
        # encode(); batches are padded to their longest text here.
        backend.no_padding()
        if truncate and max_length is not None:
            backend.enable_truncation(max_length)  # keeps [CLS] ... [SEP] around the cut text
        else:
            backend.no_truncation()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Path, max_length: int | None = None, truncate: bool = False) -> TextTokenizer:
        """A ``tokenizer.json`` (MiniLM's: BERT uncased WordPiece with [CLS] ... [SEP]).

        ``truncate``: cut texts to ``max_length`` ids as sentence-transformers does
        (``max_seq_length``); otherwise a longer text is a ConfigError.
        """
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
        pad = backend.token_to_id("[PAD]")
        return cls(backend, pad_id=0 if pad is None else pad, max_length=max_length, truncate=truncate)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> TextTokenizer:
        """Byte-level BPE from ``tokenizer.ggml.*`` metadata (``model == "gpt2"``)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ConfigError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)")
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in _GPT2_PRE:
            raise ConfigError(
                f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(_GPT2_PRE))}"
            )
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens)))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_FIRST_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, <|endoftext|>) stay whole in text and are skipped when
        # decoding with skip_special_tokens; user-defined ones stay whole but are ordinary text.
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ConfigError("GGUF tokenizer: added tokens changed the vocabulary size")

        def _id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        eos = _id("eos_token_id")
        pad = _id("padding_token_id")
        return cls(
            backend,
            bos_id=_id("bos_token_id"),
            eos_id=eos,
            pad_id=pad if pad is not None else (eos or 0),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )

    # -- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with special tokens: BERT's [CLS]/[SEP], or BOS where the GGUF asks."""
        ids = list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if self.max_length is not None and len(ids) > self.max_length:
            raise ConfigError(f"text is {len(ids)} tokens long; this model reads at most {self.max_length}")
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> BatchEncoding:
        """Right-padded ids and attention mask for a batch of texts."""
        if not texts:
            raise ConfigError("encode_batch needs at least one text")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        return BatchEncoding(
            input_ids=[r + [self.pad_id] * (width - len(r)) for r in rows],
            attention_mask=[[1] * len(r) + [0] * (width - len(r)) for r in rows],
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        value = self.backend.token_to_id(token)
        return None if value is None else int(value)


class IncrementalDecoder:
    """Text pieces of a growing id sequence, never splitting a multi-byte character.

    Decoding token by token breaks characters whose UTF-8 bytes span tokens (emoji, CJK) and
    loses the spaces some decoders add between tokens. Instead decode a short window of recent
    ids and emit only the new suffix, holding back while it ends in U+FFFD (an incomplete
    character).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = 0  # window start: ids before it are fully emitted
        self._read_start = 0  # ids[_prefix_start:_read_start] decode to text already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_start : self._read_start], self.skip_special_tokens)
        full = decode(self.ids[self._prefix_start :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self._prefix_start = self._read_start
            self._read_start = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_start : self._read_start], self.skip_special_tokens)
        full = decode(self.ids[self._prefix_start :], self.skip_special_tokens)
        self._prefix_start = self._read_start = len(self.ids)
        return full[len(prefix) :]


class ByteTokenizer:
    """Bytes as tokens (ids 3..), 1 = BOS/CLS, 2 = EOS/SEP, 0 = pad: enough for random models."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (b % (self.vocab - 3)) for b in text.encode("utf-8")]
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")
