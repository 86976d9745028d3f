"""The cost model's fit to the committed benchmark results (bench/fit.py): plans read back
from their descriptions, profiles rebuilt, and the shipped constants' accuracy on the quiet-host
enc128 matrix (>= 90 % of predictions within +-20 %)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detransformer_edge.bench import fit
from detransformer_edge.parallel.plan import Plan, Stage
from detransformer_edge.planner.terms import FITTED, CostTerms

ROOT = Path(__file__).resolve().parents[1]
RESULTS = [ROOT / "bench/results" / n for n in ("results-quiet.json", "control-period100.json", "results.json")]
DEVICES = ("dev0", "dev1", "dev2", "dev3")


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    wire = draw(st.sampled_from(("float32", "float16", "int8")))
    n = draw(st.integers(1, 4))
    devs = DEVICES[:n]
    mode = draw(st.sampled_from(("single", "pipeline", "tp", "block")))
    if mode == "single" or n == 1:
        return Plan("single", devs[:1], wire)
    if mode == "tp":
        return Plan("tp", devs, wire)
    if mode == "pipeline":
        cuts = sorted(draw(st.lists(st.integers(1, 11), min_size=n - 1, max_size=n - 1, unique=True)))
        bounds = (0, *cuts, 12)
        return Plan("pipeline", devs, wire, tuple(Stage(d, bounds[i], bounds[i + 1]) for i, d in enumerate(devs)))
    counts = [1] + [draw(st.integers(1, 2)) for _ in devs[1:]]
    owner = tuple(d for d, c in zip(devs, counts) for _ in range(c))
    coupled = draw(st.sampled_from(("allgather", "gather", "tp")))
    cdevs = () if coupled == "allgather" else (devs[-1],) if coupled == "gather" else devs
    return Plan("block", devs, wire, sub_block_owner=owner, coupled=coupled, coupled_devices=cdevs)


@settings(max_examples=200, deadline=None)
@given(plans())
def test_plans_read_back_from_their_description(plan: Plan) -> None:
    back = fit.plan_from_description(plan.describe())
    assert back.describe() == plan.describe()
    assert sorted(back.sub_block_owner) == sorted(plan.sub_block_owner)


def test_a_variant_prefix_is_read_too() -> None:
    assert fit.plan_from_description("bert-base: single on dev0 (float32)") == Plan("single", ("dev0",))
    with pytest.raises(Exception, match="not a plan description"):
        fit.plan_from_description("tp over everything")


@pytest.fixture(scope="module")
def cases() -> list[fit.Case]:
    return fit.load_cases(RESULTS)


def test_committed_results_rebuild_the_recorded_predictions(cases: list[fit.Case]) -> None:
    """With no fitted terms and no quota or host, the rebuilt profiles give back what the bench
    recorded for the one-device plan (memory bandwidth is solved from it; FLOPs are exact)."""
    import dataclasses

    for c in cases:
        r = c.result
        if r.plan != "single" or r.predicted_s is None or r.workload == "dec":
            continue
        plain = dataclasses.replace(c, profiles=tuple(dataclasses.replace(p, cpu_quota=None, host=None, host_cores=None)
                                                      for p in c.profiles))
        assert plain.predict(CostTerms())["latency ms"] == pytest.approx(r.predicted_s * 1e3, rel=0.02), r


def test_the_shipped_constants_predict_the_quiet_enc128_matrix(cases: list[fit.Case]) -> None:
    ok, share = fit.check(cases, FITTED)
    assert ok, f"only {share:.0%} of the quiet-host enc128 predictions within ±20 %"
    matrix = [c for c in cases if c.quiet and c.enc128_matrix]
    assert len(matrix) == 56 and {c.kind for c in matrix} == {"single", "pipeline", "tp", "bp-fixed", "adaptive"}


def test_the_fit_is_deterministic_and_no_worse_than_its_start(cases: list[fit.Case]) -> None:
    quiet = [c for c in cases if c.quiet and c.enc128_matrix][:20]
    a = fit.fit(quiet, CostTerms(), rounds=1)
    b = fit.fit(quiet, CostTerms(), rounds=1)
    assert a == b
    assert fit._loss(fit.predictions(quiet, a)) <= fit._loss(fit.predictions(quiet, CostTerms()))
