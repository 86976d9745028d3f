"""Runtime planning: agreement with exhaustive search, speed-proportional mapping, the DESIGN.md
anchor trends, accuracy budgets and availability."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import DeviceWeights, Placement, Plan
from detransformer_edge.planner.cost import Broker, CostModel, PlanningError, Request
from detransformer_edge.planner.profile import DeviceProfile, bundled_profiles_dir, load_profile
from detransformer_edge.planner.runtime import NoFeasiblePlanError, RuntimePlanner, choose_plan
from detransformer_edge.planner.terms import CostTerms


def dev(name: str, gflops: float, link_mbit: float, mem_bw_gbs: float = 10.0, rtt_ms: float = 1.0) -> DeviceProfile:
    return DeviceProfile(name, gflops=gflops, mem_bw_gbs=mem_bw_gbs, ram_mb=8000, link_mbit=link_mbit, rtt_ms=rtt_ms)


def everything_everywhere(cfg: object, names: list[str], tp: bool = True) -> Placement:
    """Every device holds every weight (largest search space), TP shards in list order."""
    n_layers = len(cfg.layer_kinds)  # type: ignore[attr-defined]
    k = len(names)
    shards = k > 1 and tp and cfg.n_heads % k == 0  # type: ignore[attr-defined]
    return Placement(1, {
        d: DeviceWeights(
            True, tuple(range(cfg.nd)), tuple(range(n_layers)),  # type: ignore[attr-defined]
            ((r, k),) if shards else (),
        )
        for r, d in enumerate(names)
    })


CLUSTERS = {
    "equal-fast": [dev("a", 40, 1000), dev("b", 40, 1000), dev("c", 40, 1000)],
    "equal-slow-link": [dev("a", 40, 20), dev("b", 40, 20), dev("c", 40, 20)],
    "mixed": [dev("a", 20, 100), dev("b", 80, 300), dev("c", 10, 40, mem_bw_gbs=2.0, rtt_ms=5.0)],
    "two-hetero": [dev("a", 30, 200), dev("b", 90, 100)],
    "wired-and-wifi": [dev("a", 50, 940, rtt_ms=0.3), dev("b", 50, 940, rtt_ms=0.3), dev("c", 25, 60, rtt_ms=4.0)],
    # slow compute on fast links: distribution pays, so the mapping and strategy matter
    "slow-hetero-wired": [dev("a", 5, 940, rtt_ms=0.2), dev("b", 10, 940, rtt_ms=0.2), dev("c", 7, 300, rtt_ms=0.5)],
    "slow-hetero-mixed": [dev("a", 3, 300, rtt_ms=0.5), dev("b", 8, 100, rtt_ms=2.0), dev("c", 5, 940, rtt_ms=0.2)],
    "slow-pair": [dev("a", 4, 940, mem_bw_gbs=3.0, rtt_ms=0.2), dev("b", 6, 500, mem_bw_gbs=4.0, rtt_ms=0.4)],
}
MODELS = {
    "tiny-enc nd4": get_config("tiny-encoder", nd=4, nb=2),
    "minilm nd4": get_config("minilm-l6", nd=4, nb=2),
    "bert nd2": get_config("bert-base", nd=2, nb=4),
    "tiny-dec nd2": get_config("tiny-decoder", nd=2, nb=2),
    "bert std": get_config("bert-base"),
    "tiny-enc std": get_config("tiny-encoder"),
}
REQUESTS = {
    "encoder": [Request("encode", 16), Request("encode", 128), Request("encode", 64, batch=4)],
    "decoder": [Request("prefill", 32), Request("prefill", 256), Request("decode", 64), Request("decode", 512, batch=8)],
}


@pytest.mark.parametrize("cluster", list(CLUSTERS))
@pytest.mark.parametrize("model", list(MODELS))
def test_agrees_with_exhaustive_search(cluster: str, model: str) -> None:
    profiles = CLUSTERS[cluster]
    cfg = MODELS[model]
    if model == "bert std" and len(profiles) == 3:
        profiles = profiles[:2]  # keep the pipeline enumeration small
    placement = everything_everywhere(cfg, [p.name for p in profiles])
    planner = RuntimePlanner(placement, profiles, cfg, Broker(per_message_ms=0.3))
    for request in REQUESTS[cfg.family]:  # type: ignore[attr-defined]
        chosen = planner.choose(request)
        best = planner.exhaustive(request)[0]
        assert chosen.total_s <= best.total_s * 1.02, (
            f"{request}: planner {chosen.plan.describe()} {chosen.total_s:.4f}s vs "
            f"exhaustive {best.plan.describe()} {best.total_s:.4f}s"
        )
        assert placement.can_run(chosen.plan, cfg.layer_kinds)  # type: ignore[attr-defined]
        chosen.plan.check(len(cfg.layer_kinds), cfg.nd, cfg.is_decoupled, cfg.n_heads)  # type: ignore[attr-defined]


def test_exhaustive_agreement_with_static_placements() -> None:
    """Same check on placements made by the static planner (primary copies + spares)."""
    from detransformer_edge.planner.static import plan_static

    for cluster in ("mixed", "wired-and-wifi"):
        profiles = CLUSTERS[cluster]
        for cfg in (MODELS["minilm nd4"], MODELS["tiny-dec nd2"]):
            placement = plan_static(profiles, cfg).placement
            planner = RuntimePlanner(placement, profiles, cfg)
            for request in REQUESTS[cfg.family]:
                chosen = planner.choose(request)
                best = planner.exhaustive(request)[0]
                assert chosen.total_s <= best.total_s * 1.02


def test_twice_as_fast_device_gets_twice_the_sub_blocks() -> None:
    cfg = get_config("bert-base", nd=6, nb=4)
    profiles = [dev("slow", 40, 1000, rtt_ms=0.2), dev("fast", 80, 1000, rtt_ms=0.2)]
    placement = everything_everywhere(cfg, ["slow", "fast"], tp=False)
    for coordinator in ("slow", "fast"):
        held = dict(placement.holdings)
        other = "fast" if coordinator == "slow" else "slow"
        held[other] = replace(held[other], embeddings=False)
        planner = RuntimePlanner(Placement(1, held), profiles, cfg, Broker(per_message_ms=0.1))
        bd = planner.choose(Request("encode", 128))
        assert bd.plan.mode == "block", bd.plan.describe()
        fast, slow = len(bd.plan.sub_blocks_of("fast")), len(bd.plan.sub_blocks_of("slow"))
        assert (fast, slow) == (4, 2), bd.plan.describe()


def _testbed(mbit: float) -> list[DeviceProfile]:
    base = load_profile(bundled_profiles_dir() / "testbed-0.45cpu.toml")
    return [replace(base, name=f"d{i}", link_mbit=mbit, rtt_ms=0.0) for i in range(4)]


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_design_anchor_trends(wire: str) -> None:
    """DESIGN.md, 4 devices at 0.45 CPU, BERT-base seq 128: TP is worst at 20-100 Mbit, block
    parallelism beats one device at 100 Mbit, one device wins at 20 Mbit."""
    request = Request("encode", 128)
    names = [f"d{i}" for i in range(4)]
    results = {}
    for mbit in (20.0, 100.0, 1000.0):
        profiles = _testbed(mbit)
        # the anchors are the research artifact's own timers over gloo: no request path and no
        # per-message device work of our service (CostTerms() leaves those out)
        std = CostModel(get_config("bert-base"), profiles, terms=CostTerms())
        bp = CostModel(get_config("bert-base", nd=4, nb=4), profiles, terms=CostTerms())
        results[mbit] = {
            "single": std.predict(Plan("single", ("d0",)), request).total_s,
            "tp": std.predict(Plan("tp", tuple(names), wire=wire), request).total_s,  # type: ignore[arg-type]
            "bp": bp.predict(Plan("block", tuple(names), wire=wire, sub_block_owner=tuple(names)), request).total_s,  # type: ignore[arg-type]
        }
    for mbit in (20.0, 100.0):
        r = results[mbit]
        assert r["tp"] > max(r["single"], r["bp"]), (mbit, r)
    assert results[100.0]["bp"] < results[100.0]["single"]
    assert results[20.0]["single"] < results[20.0]["bp"]
    assert results[1000.0]["bp"] < results[100.0]["bp"] < results[20.0]["bp"]
    # absolute scale: the single-device anchor is 0.46 s
    assert results[100.0]["single"] == pytest.approx(0.46, rel=0.1)


def test_runtime_choice_follows_the_network() -> None:
    cfg = get_config("bert-base", nd=4, nb=4)
    names = [f"d{i}" for i in range(4)]
    request = Request("encode", 128)
    for mbit, expect in ((20.0, "single"), (100.0, "block")):
        profiles = _testbed(mbit)
        plan, bd = choose_plan(everything_everywhere(cfg, names), profiles, cfg, request, accuracy="exact")
        assert plan.mode == expect, (mbit, plan.describe())
    # decode steps of a decoder: tiny messages, so per-message costs decide
    dec = get_config("smollm2-135m", nd=3, nb=3)
    slow = [replace(p, rtt_ms=20.0) for p in _testbed(20.0)][:3]
    plan, _ = choose_plan(everything_everywhere(dec, names[:3]), slow, dec, Request("decode", 128))
    assert plan.mode == "single"


@pytest.mark.parametrize("accuracy, wire", [("exact", "float32"), ("fp16", "float16"), ("int8", "int8")])
def test_accuracy_budget_sets_wire_dtype(accuracy: str, wire: str) -> None:
    cfg = get_config("bert-base", nd=4, nb=4)
    names = [f"d{i}" for i in range(4)]
    plan, bd = choose_plan(everything_everywhere(cfg, names), _testbed(100.0), cfg, Request("encode", 128), accuracy=accuracy)
    assert plan.mode == "block" and plan.wire == wire


def test_unknown_accuracy_budget() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    with pytest.raises(PlanningError, match="accuracy budget must be one of"):
        RuntimePlanner(everything_everywhere(cfg, ["a"]), [dev("a", 10, 100)], cfg, accuracy="yolo")


def test_availability_and_failover() -> None:
    cfg = get_config("minilm-l6", nd=4, nb=2)
    profiles = CLUSTERS["equal-fast"]
    placement = everything_everywhere(cfg, ["a", "b", "c"])
    planner = RuntimePlanner(placement, profiles, cfg, available=["b", "c"])
    bd = planner.choose(Request("encode", 64))
    assert "a" not in bd.plan.devices
    # the leader can insist on coordinating
    forced = RuntimePlanner(placement, profiles, cfg, coordinator="c").choose(Request("encode", 64))
    assert forced.plan.coordinator == "c"
    # nobody available holds the embeddings
    held = {d: replace(w, embeddings=(d == "a")) for d, w in placement.holdings.items()}
    with pytest.raises(NoFeasiblePlanError, match="holds the embeddings"):
        RuntimePlanner(Placement(2, held), profiles, cfg, available=["b", "c"]).choose(Request("encode", 64))


def test_memory_limits_rule_out_plans() -> None:
    cfg = get_config("smollm2-135m", nd=3, nb=3)
    names = ["a", "b", "c"]
    profiles = [replace(dev(n, 40, 1000), ram_mb=900) for n in names]
    planner = RuntimePlanner(everything_everywhere(cfg, names), profiles, cfg)
    # 900 MB holds the weights (every device holds everything: ~540 MB + runtime) but not the
    # activations of a long prefill
    planner.choose(Request("prefill", 32))
    with pytest.raises(NoFeasiblePlanError, match="lack memory"):
        planner.choose(Request("prefill", 8192, batch=4))


def test_ranked_alternatives_are_distinct_and_sorted() -> None:
    cfg = get_config("minilm-l6", nd=4, nb=2)
    planner = RuntimePlanner(everything_everywhere(cfg, ["a", "b", "c"]), CLUSTERS["mixed"], cfg)
    ranked = planner.ranked(Request("encode", 64), 6)
    assert len(ranked) == 6
    assert len({bd.plan for bd in ranked}) == 6
    totals = [bd.total_s for bd in ranked]
    assert totals == sorted(totals)


def test_standard_model_modes() -> None:
    cfg = get_config("bert-base")
    names = ["a", "b"]
    fast_net = [dev("a", 40, 10000, rtt_ms=0.05), dev("b", 40, 10000, rtt_ms=0.05)]
    planner = RuntimePlanner(everything_everywhere(cfg, names), fast_net, cfg, Broker(per_message_ms=0.01))
    modes = {bd.plan.mode for bd in planner.ranked(Request("encode", 128), 50)}
    assert {"single", "pipeline", "tp"} <= modes
    assert planner.choose(Request("encode", 128)).plan.mode == "tp"  # 10 Gbit: TP halves compute
    slow_net = [dev("a", 40, 20), dev("b", 40, 20)]
    planner = RuntimePlanner(everything_everywhere(cfg, names), slow_net, cfg)
    assert planner.choose(Request("encode", 128)).plan.mode == "single"


def test_decision_time_is_printed_not_asserted(capsys: pytest.CaptureFixture[str]) -> None:
    """Timing lives in bench/planner.py; this only shows 8 devices plan without error."""
    import time

    cfg = get_config("bert-base", nd=8, nb=4)
    profiles = [dev(f"d{i}", 20 + 10 * i, [20, 100, 300, 940][i % 4]) for i in range(8)]
    planner = RuntimePlanner(everything_everywhere(cfg, [p.name for p in profiles]), profiles, cfg)
    start = time.perf_counter()
    for seq in itertools.islice(itertools.count(16, 16), 8):
        planner.choose(Request("encode", seq))
    per = (time.perf_counter() - start) / 8
    print(f"runtime plan for 8 devices: {per * 1e3:.2f} ms per request")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_random_clusters_agree_with_exhaustive_search(seed: int) -> None:
    """Random 2-4 device homes (compute 2-80 GFLOPS, 20-940 Mbit, 0.2-8 ms round trips),
    placements either everything-everywhere or from the static planner."""
    import random

    from detransformer_edge.planner.static import plan_static

    rng = random.Random(seed)
    cfgs = [get_config("minilm-l6", nd=4, nb=2), get_config("tiny-decoder", nd=4, nb=2), get_config("bert-base", nd=2, nb=2)]
    for _ in range(15):
        n = rng.choice([2, 3, 4])
        profiles = [
            DeviceProfile(f"d{i}", gflops=rng.choice([2, 4, 8, 16, 40, 80]), mem_bw_gbs=rng.choice([2, 5, 10, 20]),
                          ram_mb=8000, link_mbit=rng.choice([20, 50, 100, 300, 940]), rtt_ms=rng.choice([0.2, 1, 3, 8]))
            for i in range(n)
        ]
        cfg = rng.choice(cfgs)
        if rng.random() < 0.4:
            placement = plan_static(profiles, cfg).placement
        else:
            placement = everything_everywhere(cfg, [p.name for p in profiles])
        planner = RuntimePlanner(placement, profiles, cfg, Broker(per_message_ms=rng.choice([0.1, 0.3, 1.0])))
        for mode in (["encode"] if cfg.family == "encoder" else ["prefill", "decode"]):
            request = Request(mode, rng.choice([16, 64, 128, 256]), rng.choice([1, 1, 4]))  # type: ignore[arg-type]
            chosen = planner.choose(request)
            best = planner.exhaustive(request)[0]
            assert chosen.total_s <= best.total_s * 1.02, (
                f"{request}: {chosen.plan.describe()} {chosen.total_s:.4f}s vs {best.plan.describe()} {best.total_s:.4f}s"
            )
