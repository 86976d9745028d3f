"""Per-intent rejection thresholds, chosen on the validation split for a false-acceptance target.

The target (``CalibrationTarget``): at most ``max_false_acceptance`` of the validation split's
out-of-domain utterances may be accepted as any intent, and none as ``UnlockDoor``; the lock
intents' thresholds are also at least ``lock_floor``.

For each intent and a candidate threshold t the validation split gives three counts: its
correct answers lost (in-domain utterances of that intent, predicted it, below t), its wrong
answers kept (utterances of another intent predicted as it, at or above t) and its false
acceptances (out-of-domain utterances predicted as it, at or above t). Each intent minimises
``lost + wrong + lam * false_acceptances`` of its own rows plus ``pooled_weight`` times the same
cost of all intents' rows divided by the number of intents (one average intent's worth of pooled
evidence); ``lam`` grows (1, 1.5, 2, 3, ...) until the total false acceptance meets the target.
Among equally good thresholds the middle one is kept: the margin on both sides is what carries
over to utterances unlike the validation ones. Lock utterances that the deterministic rule
refuses (``locks.lock_allowed``) are rejected whatever the threshold, so they count neither way.

Why the pooled term: an intent has 30-60 validation rows from a handful of templates. Where no
out-of-domain row lands on it, its own cost is flat from 0 up to its weakest command, and the
middle of that range is a threshold near 0 (SetTemperature 0.01 in the first shipped model),
which then accepts any far-away utterance whose argmax happens to be that intent. One threshold
for all intents is no answer either: false acceptances gather on a few intents (TurnOnLight
near light colours, SetTimer near timer status), and raising everyone's threshold for them
rejects commands everywhere. The pooled term pulls an intent without evidence of its own to
the shared optimum and leaves one with evidence where its rows put it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.nlu.decision import Thresholds, best_intent
from detransformer_edge.nlu.locks import lock_allowed
from detransformer_edge.nlu.vocabulary import INTENTS, LOCK_INTENTS

GRID: tuple[float, ...] = tuple(round(x / 100, 2) for x in range(100)) + (0.995, 0.999)
_LAMBDAS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 1e6)
# Weight of the pooled cost (in average intents). On the first shipped model's validation and
# template-test splits, 1 moved test false rejection 14.2 % -> 13.2 % and raised the lowest
# threshold 0.01 -> 0.56; 0 is the old per-intent rule, a large value one shared threshold.
POOLED_WEIGHT = 1.0


@dataclass(frozen=True)
class CalibrationTarget:
    max_false_acceptance: float = 0.01  # share of validation out-of-domain utterances accepted
    lock_floor: float = 0.9  # a lock intent needs at least this confidence

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_false_acceptance < 1.0 or not 0.0 <= self.lock_floor <= 1.0:
            raise ConfigError(f"calibration target out of range: {self}")


_REFUSED = ""  # the label of a row the lock rule refuses: no threshold can accept it


@dataclass(frozen=True)
class _Scored:
    gold: str | None
    label: str  # the most probable intent, or _REFUSED
    conf: float


def _scored(probs: Sequence[torch.Tensor], texts: Sequence[str], gold: Sequence[str | None]) -> list[_Scored]:
    out = []
    for p, text, g in zip(probs, texts, gold, strict=True):
        label, conf = best_intent(p)
        if label in LOCK_INTENTS and not lock_allowed(text, label):
            label = _REFUSED
        out.append(_Scored(g, label, conf))
    return out


def _counts(rows: Sequence[_Scored], intent: str, t: float) -> tuple[int, int, int]:
    lost = sum(1 for r in rows if r.label == intent and r.gold == intent and r.conf < t)
    wrong = sum(1 for r in rows if r.label == intent and r.gold is not None and r.gold != intent and r.conf >= t)
    fa = sum(1 for r in rows if r.label == intent and r.gold is None and r.conf >= t)
    return lost, wrong, fa


def _pooled(rows: Sequence[_Scored]) -> dict[float, tuple[int, int, int]]:
    """Per threshold: (lost, wrong, false acceptances) summed over every intent."""
    return {t: tuple(sum(c) for c in zip(*(_counts(rows, i, t) for i in INTENTS))) for t in GRID}  # type: ignore[misc]


def _best(rows: Sequence[_Scored], intent: str, lam: float, target: CalibrationTarget,
          pooled: dict[float, tuple[int, int, int]], pooled_weight: float) -> float:
    lock = intent in LOCK_INTENTS
    scored = []
    for t in GRID:
        lost, wrong, fa = _counts(rows, intent, t)
        if (lock and t < target.lock_floor) or (intent == "UnlockDoor" and fa > 0):
            continue
        p_lost, p_wrong, p_fa = pooled[t]
        shared = pooled_weight * (p_lost + p_wrong + lam * p_fa) / len(INTENTS)
        scored.append((lost + wrong + lam * fa + shared, t))
    if not scored:  # false unlocks survive every threshold: never unlock
        return 1.0
    best = min(c for c, _ in scored)
    ties = [t for c, t in scored if abs(c - best) < 1e-9]
    middle = (ties[0] + ties[-1]) / 2
    return min(ties, key=lambda t: abs(t - middle))  # the optimal threshold nearest the middle


def choose_thresholds(probs: Sequence[torch.Tensor], texts: Sequence[str], gold: Sequence[str | None],
                      target: CalibrationTarget = CalibrationTarget(),
                      pooled_weight: float = POOLED_WEIGHT) -> tuple[Thresholds, dict[str, object]]:
    """Thresholds for ``target`` from validation predictions; also a summary of what they do there."""
    rows = _scored(probs, texts, gold)
    n_ood = sum(1 for r in rows if r.gold is None)
    pooled = _pooled(rows)
    chosen: dict[str, float] = {}
    lam = _LAMBDAS[0]
    for lam in _LAMBDAS:
        chosen = {i: _best(rows, i, lam, target, pooled, pooled_weight) for i in INTENTS}
        fa_total = sum(_counts(rows, i, chosen[i])[2] for i in INTENTS)
        if fa_total <= target.max_false_acceptance * n_ood:
            break
    fa_total = sum(_counts(rows, i, chosen[i])[2] for i in INTENTS)
    lost_total = sum(_counts(rows, i, chosen[i])[0] for i in INTENTS)
    n_in = sum(1 for r in rows if r.gold is not None)
    summary = {
        "target": asdict(target), "lambda": lam, "pooled_weight": pooled_weight,
        "validation_false_acceptance": fa_total / max(1, n_ood),
        "validation_correct_answers_lost_to_thresholds": lost_total / max(1, n_in),
        "met": fa_total <= target.max_false_acceptance * n_ood,
    }
    return Thresholds(chosen), summary
