"""Offline English text for distillation: sentences from the Python standard library's
docstrings, ``pydoc_data.topics`` and the text files under ``/usr/share/doc``.

Everything is read from this machine (no download), parsed without importing modules (``ast``),
deduplicated, filtered to sentence-like lines and split deterministically into train and held-out
sentences by a hash of the sentence text, so the split does not depend on file order.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from detransformer_edge.errors import ConfigError

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_DOC_NAMES = re.compile(r"(readme|news|changes|faq|copyright|\.txt|\.md)", re.IGNORECASE)
MAX_DOC_FILE_BYTES = 200_000  # a few large changelogs would otherwise dominate the corpus


@dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    held_out: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over both splits: records which text a distillation run saw."""
        h = hashlib.sha256()
        for s in self.train + ("\0",) + self.held_out:
            h.update(s.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


def is_sentence(text: str, min_words: int = 5, max_words: int = 60) -> bool:
    """Keep prose; drop code, tables, paths and lists of symbols."""
    words = _WORD.findall(text)
    if not min_words <= len(words) <= max_words:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85 and not text.lstrip().startswith((">>>", "...", "$", "#"))


def split_sentences(block: str) -> list[str]:
    """Paragraphs are joined lines; sentences end at ., ! or ? followed by a capital."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", block):
        text = " ".join(line.strip() for line in para.splitlines()).strip()
        if not text:
            continue
        for sent in _SENTENCE_END.split(text):
            sent = sent.strip()
            if is_sentence(sent):
                out.append(sent)
    return out


def _stdlib_docstrings(stdlib: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [topics[k] for k in sorted(topics)]


def _usr_share_doc(root: Path) -> list[str]:
    texts: list[str] = []
    if not root.is_dir():
        return texts
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _DOC_NAMES.search(path.name) or "changelog" in path.name.lower():
            continue
        try:
            with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as fh:
                raw = fh.read(MAX_DOC_FILE_BYTES)
        except (OSError, EOFError):
            continue
        texts.append(raw.decode("utf-8", errors="replace"))
    return texts


CORPUS_FILE_ENV = "DTE_CORPUS_FILE"


def export_corpus(corpus: Corpus, path: str | Path) -> Path:
    """Write ``corpus`` as gzipped JSON ({"train": [...], "held_out": [...]}), e.g. to train on
    another machine (a GPU box with a different Python) on exactly this machine's text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as fh:
        json.dump({"train": list(corpus.train), "held_out": list(corpus.held_out),
                   "fingerprint": corpus.fingerprint}, fh)
    return path


def read_corpus_file(path: str | Path) -> Corpus:
    """A corpus written by ``export_corpus`` (its fingerprint is checked)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        corpus = Corpus(tuple(data["train"]), tuple(data["held_out"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a corpus file written by export_corpus: {exc}") from exc
    if data.get("fingerprint") not in (None, corpus.fingerprint):
        raise ConfigError(f"{path}: corpus fingerprint mismatch (file damaged?)")
    return corpus


def load_corpus(held_out_fraction: float = 0.05, doc_root: str | Path = "/usr/share/doc",
                max_sentences: int | None = None) -> Corpus:
    """All offline sentences, deduplicated, split by sentence hash into train / held-out.

    With the environment variable ``DTE_CORPUS_FILE`` set, the corpus is read from that file
    (written by ``export_corpus``) instead, so another machine trains on the same text.
    """
    override = os.environ.get(CORPUS_FILE_ENV)
    if override:
        corpus = read_corpus_file(override)
        if max_sentences is not None:
            corpus = Corpus(corpus.train[:max_sentences], corpus.held_out)
        log.info("corpus from %s: %d train, %d held-out sentences", override, len(corpus.train),
                 len(corpus.held_out))
        return corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    blocks = _pydoc_topics() + _stdlib_docstrings(stdlib) + _usr_share_doc(Path(doc_root))
    seen: set[str] = set()
    train: list[str] = []
    held: list[str] = []
    for block in blocks:
        for sent in split_sentences(block):
            if sent in seen:
                continue
            seen.add(sent)
            bucket = int.from_bytes(hashlib.sha256(sent.encode()).digest()[:4], "big") / 2**32
            (held if bucket < held_out_fraction else train).append(sent)
    if max_sentences is not None:
        train = train[:max_sentences]
    log.info("corpus: %d train, %d held-out sentences", len(train), len(held))
    return Corpus(tuple(train), tuple(held))
