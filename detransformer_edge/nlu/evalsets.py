"""The independent evaluation sets (``nlu/eval/*.jsonl``): written apart from the training
templates; loading and validating them (the evaluation itself is ``nlu/evaluate.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from detransformer_edge.errors import DetransformerError
from detransformer_edge.nlu.vocabulary import INTENT_SLOTS, INTENTS, SLOTS

EVAL_SETS: tuple[str, ...] = ("household", "slot_values", "out_of_domain", "paraphrase")
INDEPENDENT: tuple[str, ...] = ("household", "slot_values", "out_of_domain")  # the "independent test sets"
SCORED_SLOTS: tuple[str, ...] = ("room", "level", "duration", "item", "media")


class EvalSetError(DetransformerError, ValueError):
    """An evaluation line is malformed; the message names the file and line."""


@dataclass(frozen=True)
class EvalLine:
    text: str
    intent: str | None  # None: out of domain
    slots: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    ood: str | None = None  # "near" or "far" when out of domain

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("empty text")
        if self.intent is None:
            if self.ood not in ("near", "far") or self.slots:
                raise ValueError("an out-of-domain line needs ood 'near' or 'far' and no slots")
        else:
            if self.intent not in INTENTS:
                raise ValueError(f"unknown intent {self.intent!r}")
            wrong = set(self.slots) - set(INTENT_SLOTS[self.intent])
            if wrong:
                raise ValueError(f"{self.intent} takes slots {INTENT_SLOTS[self.intent]}, not {sorted(wrong)}")


def eval_dir() -> Path:
    return Path(str(resources.files("detransformer_edge.nlu") / "eval"))


def load_eval_set(name: str, directory: Path | None = None) -> list[EvalLine]:
    """The lines of ``<name>.jsonl``; EvalSetError names the first bad line."""
    path = (directory or eval_dir()) / f"{name}.jsonl"
    if not path.is_file():
        raise EvalSetError(f"no evaluation set {path}; known sets: {', '.join(EVAL_SETS)}")
    lines: list[EvalLine] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            slots = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in d.get("slots", {}).items()}
            for k in slots:
                if k not in SLOTS:
                    raise ValueError(f"unknown slot {k!r}")
            lines.append(EvalLine(d["text"], d["intent"], slots, d.get("ood")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EvalSetError(f"{path}:{number}: {exc}; expected "
                               '{"text": ..., "intent": NAME or null, "slots": {...}, "ood": "near"|"far"}') from None
    return lines
