"""Every number of the intent model's report (docs/ACCURACY.md section 2), on the independent sets.

    python -m detransformer_edge.nlu.evaluate                       # the shipped (decoupled) model
    python -m detransformer_edge.nlu.evaluate --model original=/tmp/dte/original \\
        --model decoupled=detransformer_edge/nlu/weights

The sets in ``nlu/eval/*.jsonl`` were written by hand, apart from the training templates and
before the current ones, in household phrasing; ``tests/test_nlu_eval.py`` checks that no line
could have been produced by filling any template. One JSON object per line::

    {"text": "set a timer for half a minute", "intent": "SetTimer", "slots": {"duration": 30}}
    {"text": "return the vacuum cleaner to base", "intent": null, "ood": "near", "slots": {}}

``intent`` null is out of domain, ``ood`` says how near ("near": a domain next to ours, "far");
``slots`` holds the expected normalised values (a list when a slot occurs twice). Every line is
parsed by ``IntentParser.parse``, the service's own path, thresholds and lock rule included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detransformer_edge.nlu.evalsets import (
    EVAL_SETS,
    INDEPENDENT,
    SCORED_SLOTS,
    EvalLine,
    EvalSetError,
    load_eval_set,
)
from detransformer_edge.nlu.vocabulary import INTENTS


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), abs_tol=1e-6)
    return a == b


def _same_values(expected: Sequence[Any], got: Sequence[Any]) -> bool:
    return len(expected) == len(got) and all(any(_same(e, g) for g in got) for e in expected)


@dataclass
class SetReport:
    """Counts on one set for one model; ``summary()`` turns them into rates."""

    n_in: int = 0
    correct: int = 0
    rejected_in: int = 0
    per_intent: Counter[str] = field(default_factory=Counter)
    per_intent_correct: Counter[str] = field(default_factory=Counter)
    slot_seen: Counter[str] = field(default_factory=Counter)
    slot_exact: Counter[str] = field(default_factory=Counter)
    f1_tp: int = 0
    f1_fp: int = 0
    f1_fn: int = 0
    ood: Counter[str] = field(default_factory=Counter)
    ood_rejected: Counter[str] = field(default_factory=Counter)
    false_unlocks: int = 0  # out-of-domain or other-intent lines answered UnlockDoor
    false_locks: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, line: EvalLine, intent: str | None, slots: Mapping[str, list[Any]]) -> None:
        if intent == "UnlockDoor" and line.intent != "UnlockDoor":
            self.false_unlocks += 1
        if intent == "LockDoor" and line.intent != "LockDoor":
            self.false_locks += 1
        if line.intent is None:
            assert line.ood is not None
            self.ood[line.ood] += 1
            if intent is None:
                self.ood_rejected[line.ood] += 1
            else:
                self.errors.append(f"{line.text!r} ({line.ood}) -> {intent}")
            return
        self.n_in += 1
        self.per_intent[line.intent] += 1
        ok = intent == line.intent
        self.correct += ok
        self.per_intent_correct[line.intent] += ok
        self.rejected_in += intent is None
        got = slots if ok else {}
        for name in SCORED_SLOTS:
            exp, pred = line.slots.get(name, ()), got.get(name, [])
            if exp or pred:
                self.slot_seen[name] += 1
                self.slot_exact[name] += _same_values(exp, pred)
        gold = [(k, v) for k, vs in line.slots.items() for v in vs]
        pred_pairs = [(k, v) for k, vs in (slots if intent is not None else {}).items() for v in vs]
        tp = sum(1 for k, v in gold if any(k == k2 and _same(v, v2) for k2, v2 in pred_pairs))
        self.f1_tp += tp
        self.f1_fn += len(gold) - tp
        self.f1_fp += len(pred_pairs) - tp
        if not ok or any(not _same_values(line.slots.get(n, ()), got.get(n, [])) for n in SCORED_SLOTS):
            self.errors.append(f"{line.text!r} -> {intent} {dict(got) if ok else ''} (expected {line.intent} "
                               f"{dict(line.slots) if line.slots else ''})")

    def summary(self) -> dict[str, Any]:
        p = self.f1_tp / max(1, self.f1_tp + self.f1_fp)
        r = self.f1_tp / max(1, self.f1_tp + self.f1_fn)
        n_ood = sum(self.ood.values())
        return {
            "n_in_domain": self.n_in,
            "intent_accuracy": self.correct / self.n_in if self.n_in else None,
            "false_rejection": self.rejected_in / self.n_in if self.n_in else None,
            "slot_value_f1": 2 * p * r / (p + r) if p + r else (None if not self.n_in else 0.0),
            "slot_exact": {k: (self.slot_exact[k] / self.slot_seen[k], self.slot_seen[k])
                           for k in SCORED_SLOTS if self.slot_seen[k]},
            "per_intent": {i: (self.per_intent_correct[i] / self.per_intent[i], self.per_intent[i])
                           for i in INTENTS if self.per_intent[i]},
            "n_near": self.ood["near"], "n_far": self.ood["far"],
            "near_rejection": self.ood_rejected["near"] / self.ood["near"] if self.ood["near"] else None,
            "far_rejection": self.ood_rejected["far"] / self.ood["far"] if self.ood["far"] else None,
            "ood_rejection": sum(self.ood_rejected.values()) / n_ood if n_ood else None,
            "false_unlocks": self.false_unlocks, "false_locks": self.false_locks,
        }


Answer = tuple[EvalLine, str | None, dict[str, list[Any]]]


def parse_lines(parser: Any, lines: Sequence[EvalLine]) -> list[Answer]:
    """Each line with the parser's intent (None: not recognised) and slot values by name."""
    out: list[Answer] = []
    for line in lines:
        parsed = parser.parse(line.text)
        slots: dict[str, list[Any]] = {}
        for s in parsed.slots:
            slots.setdefault(s.slot_name, []).append(s.value)
        out.append((line, parsed.intent_name, slots))
    return out


def score(answers: Sequence[Answer]) -> SetReport:
    report = SetReport()
    for line, intent, slots in answers:
        report.add(line, intent, slots)
    return report


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def format_report(results: Mapping[str, Mapping[str, dict[str, Any]]]) -> str:
    """Markdown tables: one row per (model, set), then per-slot and per-intent tables."""
    out = ["| model | set | in-domain | intent acc. | false rej. | slot-value F1 | near OOD rej. | far OOD rej. "
           "| false unlocks | false locks |", "| --- " * 10 + "|"]
    for model, sets in results.items():
        for name, s in sets.items():
            out.append(f"| {model} | {name} | {s['n_in_domain']} | {_pct(s['intent_accuracy'])} | "
                       f"{_pct(s['false_rejection'])} | {_pct(s['slot_value_f1'])} | "
                       f"{_pct(s['near_rejection'])} ({s['n_near']}) | {_pct(s['far_rejection'])} ({s['n_far']}) | "
                       f"{s['false_unlocks']} | {s['false_locks']} |")
    out += ["", "exact slot values (lines where the slot was expected or produced):", "",
            "| model | set | " + " | ".join(SCORED_SLOTS) + " |", "| --- " * (2 + len(SCORED_SLOTS)) + "|"]
    for model, sets in results.items():
        for name, s in sets.items():
            cells = [f"{_pct(s['slot_exact'][k][0])} ({s['slot_exact'][k][1]})" if k in s["slot_exact"] else "—"
                     for k in SCORED_SLOTS]
            out.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    models = list(results)
    out += ["", "intent accuracy per intent (independent sets, in-domain lines):", "",
            "| intent | lines | " + " | ".join(models) + " |", "| --- " * (2 + len(models)) + "|"]
    for intent in INTENTS:
        cells, n = [], 0
        for m in models:
            acc, n = results[m]["independent"]["per_intent"].get(intent, (None, 0))
            cells.append(_pct(acc))
        out.append(f"| {intent} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def run_evaluation(models: Mapping[str, Path], sets: Sequence[str] = EVAL_SETS,
                   show_errors: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    from detransformer_edge.nlu.dataset import could_be_generated
    from detransformer_edge.nlu.parser import IntentParser

    loaded = {name: load_eval_set(name) for name in sets}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for label, weights in models.items():
        parser = IntentParser.load(weights)
        answers = {name: parse_lines(parser, lines) for name, lines in loaded.items()}
        reports = {name: score(a) for name, a in answers.items()}
        independent = [a for name in INDEPENDENT if name in answers for a in answers[name]]
        reports["independent"] = score(independent)
        # the same lines less those whose phrasing some training template could render
        reports["independent, phrasing in no template"] = score(
            [a for a in independent if could_be_generated(a[0].text) is None])
        results[label] = {name: r.summary() for name, r in reports.items()}
        if show_errors:
            for name, r in reports.items():
                for e in r.errors if name != "independent" else ():
                    print(f"[{label} {name}] {e}", file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from detransformer_edge.nlu.parser import default_weights_dir

    ap = argparse.ArgumentParser(prog="python -m detransformer_edge.nlu.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                    help="a trained intent model to evaluate (repeatable; default: decoupled=<shipped weights>)")
    ap.add_argument("--set", action="append", default=[], choices=EVAL_SETS, help="only these sets (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    ap.add_argument("--errors", action="store_true", help="print every wrong answer to stderr")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    models: dict[str, Path] = {}
    for spec in args.model or [f"decoupled={default_weights_dir()}"]:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise EvalSetError(f"--model wants LABEL=DIR, got {spec!r}")
        models[label] = Path(path)
    results = run_evaluation(models, tuple(args.set) or EVAL_SETS, args.errors)
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
