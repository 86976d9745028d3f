"""Static placement: memory budgets, spares, speed-proportional sub-blocks, typed shortfall."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.planner.cost import CostModel, PlanningError, Request
from detransformer_edge.planner.profile import DeviceProfile, bundled_profiles_dir, load_profiles
from detransformer_edge.planner.runtime import RuntimePlanner
from detransformer_edge.planner.static import (
    InfeasiblePlacementError,
    MixEntry,
    default_mix,
    plan_placement,
    plan_static,
)

HOME = ["raspberry-pi-4b", "raspberry-pi-5", "intel-n100-minipc", "laptop-i5-8250u", "smart-speaker-a53", "jetson-orin-nano"]


def home_profiles() -> list[DeviceProfile]:
    return load_profiles([bundled_profiles_dir() / f"{n}.toml" for n in HOME])


def dev(name: str, gflops: float, ram_mb: int, link_mbit: float = 940.0) -> DeviceProfile:
    return DeviceProfile(name, gflops=gflops, mem_bw_gbs=10.0, ram_mb=ram_mb, link_mbit=link_mbit, rtt_ms=0.3)


@pytest.mark.parametrize(
    "cfg",
    [get_config("bert-base", nd=4, nb=4), get_config("smollm2-135m", nd=3, nb=3), get_config("bert-base"), get_config("minilm-l6", nd=4, nb=2)],
    ids=lambda c: f"{c.name}-nd{c.nd}-nb{c.nb}",
)
def test_home_placement_fits_and_covers(cfg: object) -> None:
    profiles = home_profiles()
    sp = plan_static(profiles, cfg)
    cost = CostModel(cfg, profiles)
    mix = default_mix(cfg)
    for p in profiles:
        held = sp.placement.holdings[p.name]
        if held == DeviceWeights():
            continue
        worst = max(cost.memory_bytes(held, e.request.workload) for e in mix)
        assert worst <= p.ram_bytes, (p.name, worst // 2**20, p.ram_mb)
        assert sp.memory_bytes[p.name] <= p.ram_bytes
    # the coordinator (capability leader) holds the embeddings
    coords = [d for d, h in sp.placement.holdings.items() if h.embeddings]
    assert coords
    # every request of the mix has a runnable plan on this placement
    for _request, bd in sp.choices:
        assert sp.placement.can_run(bd.plan, cfg.layer_kinds)  # type: ignore[attr-defined]
    assert sp.expected_s > 0
    # the speaker (200 MB) cannot hold anything beyond the runtime
    assert sp.placement.holdings["speaker"] == DeviceWeights()


def test_spares_when_memory_allows() -> None:
    cfg = get_config("bert-base", nd=4, nb=4)
    profiles = [dev(f"d{i}", 40.0, 4000) for i in range(4)]
    placement = plan_placement(profiles, cfg)
    for j in range(cfg.nd):
        copies = sum(1 for h in placement.holdings.values() if j in h.sub_blocks)
        assert copies >= 2, f"sub-block {j} has {copies} copy"
    # the coordinator can fall back to running the whole model alone
    coord = next(d for d, h in placement.holdings.items() if h.embeddings)
    assert set(placement.holdings[coord].whole_layers) == set(range(cfg.n_layers))
    # and a second device holds the embeddings for failover
    assert sum(1 for h in placement.holdings.values() if h.embeddings) >= 2
    # failover: losing the coordinator still leaves a runnable plan
    others = [p.name for p in profiles if p.name != coord]
    RuntimePlanner(placement, profiles, cfg, available=others).choose(Request("encode", 64))


def test_no_spares_when_asked() -> None:
    cfg = get_config("bert-base", nd=4, nb=4)
    profiles = [dev(f"d{i}", 40.0, 4000, link_mbit=300.0) for i in range(4)]
    sp = plan_static(profiles, cfg, spares=False)
    copies = [sum(1 for h in sp.placement.holdings.values() if j in h.sub_blocks) for j in range(cfg.nd)]
    assert copies == [1] * cfg.nd


def test_faster_device_gets_more_sub_blocks() -> None:
    cfg = get_config("bert-base", nd=6, nb=4)
    profiles = [dev("fast", 80.0, 4000), dev("slow", 40.0, 4000)]
    # a mix of long requests on a fast network: both devices are worth using
    mix = [MixEntry(Request("encode", 128))]
    sp = plan_static(profiles, cfg, mix, spares=False, coordinator="fast")
    held = sp.placement.holdings
    assert (len(held["fast"].sub_blocks), len(held["slow"].sub_blocks)) == (4, 2)


def test_memory_caps_the_share() -> None:
    """A fast device with little memory holds what fits; the rest goes elsewhere."""
    cfg = get_config("bert-base", nd=4, nb=4)
    profiles = [dev("big", 40.0, 4000), dev("fast-small", 200.0, 260)]
    sp = plan_static(profiles, cfg, [MixEntry(Request("encode", 128))], coordinator="big", spares=False)
    cost = CostModel(cfg, profiles)
    small = sp.placement.holdings.get("fast-small", DeviceWeights())
    assert cost.memory_bytes(small, Request("encode", 128).workload) <= 260 * 2**20
    assert len(sp.placement.holdings["big"].sub_blocks) >= 3


def test_infeasible_budget_names_the_shortfall() -> None:
    cfg = get_config("bert-base", nd=4, nb=4)  # ~436 MB of FP32 weights
    profiles = [dev("pi4", 20.0, 300), dev("speaker", 8.0, 200)]
    with pytest.raises(InfeasiblePlacementError) as info:
        plan_static(profiles, cfg)
    msg = str(info.value)
    assert re.match(r"need \d+ MB more: device \S+ holds .+ = \d+ MB, budget \d+ MB", msg), msg
    assert "pi4" in msg and "speaker" in msg
    short = int(re.match(r"need (\d+) MB", msg).group(1))  # type: ignore[union-attr]
    # weights ~436 MB + 2 x 150 MB runtime vs 500 MB of budget: a few hundred MB short
    assert 150 <= short <= 500
    assert isinstance(info.value, PlanningError)


def test_standard_model_placement() -> None:
    cfg = get_config("bert-base")
    profiles = [dev("a", 40.0, 300), dev("b", 40.0, 300), dev("c", 40.0, 300)]  # nobody holds it all
    sp = plan_static(profiles, cfg, [MixEntry(Request("encode", 128))])
    layers = sorted(i for h in sp.placement.holdings.values() for i in h.whole_layers)
    shards = [s for h in sp.placement.holdings.values() for s in h.tp_shards]
    assert set(layers) == set(range(12)) or shards
    plan = sp.choices[0][1].plan
    assert plan.mode in ("pipeline", "tp")


def test_coordinator_argument() -> None:
    cfg = get_config("minilm-l6", nd=4, nb=2)
    profiles = [dev("a", 40.0, 2000), dev("b", 10.0, 2000)]
    placement = plan_placement(profiles, cfg, coordinator="b", spares=False)
    assert placement.holdings["b"].embeddings and not placement.holdings["a"].embeddings
    with pytest.raises(PlanningError, match="coordinator 'zz' has no profile"):
        plan_placement(profiles, cfg, coordinator="zz")
    with pytest.raises(PlanningError, match="at least one device"):
        plan_placement([], cfg)


def test_decoder_mix_weighs_decode_steps() -> None:
    mix = default_mix(get_config("smollm2-135m"))
    decode = sum(e.weight for e in mix if e.request.mode == "decode")
    prefill = sum(e.weight for e in mix if e.request.mode == "prefill")
    assert decode > 10 * prefill
    assert {e.request.mode for e in default_mix(get_config("bert-base"))} == {"encode"}


def test_version_is_kept() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    placement = plan_placement([replace(dev("a", 10.0, 1000))], cfg, version=7)
    assert placement.version == 7
