"""A model no single device can hold (the home's language model, item 2): four smart speakers
whose budgets are each below SmolLM2-135M's size. Static placement splits it and says why; the
split runs with the real weights, no device holds the whole model, and the answer equals one
device's."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import DeviceWeights
from detransformer_edge.planner import analysis
from detransformer_edge.planner.cost import CostModel, Request
from detransformer_edge.planner.profile import DeviceProfile, bundled_profile, load_profile
from detransformer_edge.planner.static import InfeasiblePlacementError, plan_static
from detransformer_edge.planner.variants import TaskBudget, Variant, VariantPlanner

SPEAKERS = ("kitchen-speaker", "living-speaker", "bedroom-speaker", "hall-speaker")


def speakers() -> list[DeviceProfile]:
    base = load_profile(bundled_profile("smart-speaker-1gb"))
    return [dataclasses.replace(base, name=n) for n in SPEAKERS]


def test_no_speaker_can_hold_smollm2_so_the_placement_splits_it_and_says_why() -> None:
    cfg = get_config("smollm2-135m")
    profiles = speakers()
    model_bytes = analysis.model_params(cfg) * analysis.WEIGHT_BYTES
    assert all(p.ram_bytes < model_bytes for p in profiles)  # each budget is below the weights alone
    sp = plan_static(profiles, cfg, coordinator=SPEAKERS[0])
    whole = set(range(cfg.n_layers))
    for d, held in sp.placement.holdings.items():
        assert not (held.embeddings and whole <= set(held.whole_layers)), f"{d} holds the whole model"
    assert all(sp.memory_bytes[d] <= p.ram_bytes for p in profiles for d in [p.name] if d in sp.memory_bytes)
    assert sp.label.startswith("split: ") and "no device can hold the whole model" in sp.why
    assert "400 MB" in sp.why
    # every layer is held somewhere, and the runtime planner finds a plan for a question
    assert set().union(*(h.whole_layers for h in sp.placement.holdings.values())) == whole
    vp = VariantPlanner([Variant("smollm2-135m", cfg, sp.placement)], profiles, TaskBudget.for_task("generate"),
                        coordinator=SPEAKERS[0])
    choice = vp.choose(Request("prefill", 40))
    assert len(choice.breakdown.plan.devices) > 1 and "no single device" in choice.reason
    assert choice.breakdown.fits
    # one speaker alone is refused with the shortfall named
    with pytest.raises(InfeasiblePlacementError, match="need .* MB more"):
        plan_static(profiles[:1], cfg)


@pytest.mark.slow
async def test_smollm2_split_over_the_speakers_answers_like_one_device() -> None:
    from detransformer_edge.model.generation import build_prompt
    from detransformer_edge.parallel.local import LocalCluster
    from detransformer_edge.parallel.plan import Plan
    from detransformer_edge.parallel.shards import build_shard
    from detransformer_edge.transport.memory import MemoryHub
    from detransformer_edge.weights.loaders import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model.float().eval()
    cfg = model.cfg
    profiles = speakers()
    sp = plan_static(profiles, cfg, coordinator=SPEAKERS[0])
    vp = VariantPlanner([Variant("smollm2-135m", cfg, sp.placement)], profiles, TaskBudget(("float32",)),
                        coordinator=SPEAKERS[0])
    ids = build_prompt(loaded.tokenizer, "What is the capital of France?", loaded.chat_template)
    plan = vp.choose(Request("prefill", len(ids))).breakdown.plan
    assert len(plan.devices) > 1 and plan.wire == "float32"

    held = {d: w for d, w in sp.placement.holdings.items() if w != DeviceWeights()}
    shards = {d: build_shard(model, w) for d, w in held.items()}
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once
    cost = CostModel(cfg, profiles)
    for d, shard in shards.items():
        assert shard.nbytes() < 0.6 * total, f"{d} holds {shard.nbytes() / 2**20:.0f} of {total / 2**20:.0f} MB"
        assert cost.weights_bytes(held[d]) <= next(p for p in profiles if p.name == d).ram_bytes
    print("\nbytes per speaker:", {d: round(s.nbytes() / 2**20) for d, s in shards.items()}, "of", round(total / 2**20))

    prompt = torch.tensor([ids])
    hub = MemoryHub()
    async with contextlib.AsyncExitStack() as stack:
        transports = {d: await stack.enter_async_context(hub.transport(d)) for d in shards}
        with LocalCluster(transports, shards) as cluster:
            split, _ = await cluster.generate(plan, prompt, 8, eos_id=loaded.tokenizer.eos_id, timeout=120.0)
    one = {"solo": build_shard(model, DeviceWeights(True, (), tuple(range(cfg.n_layers))))}
    async with contextlib.AsyncExitStack() as stack:
        transports = {d: await stack.enter_async_context(hub.transport(d)) for d in one}
        with LocalCluster(transports, one) as cluster:
            alone, _ = await cluster.generate(Plan("single", ("solo",)), prompt, 8, eos_id=loaded.tokenizer.eos_id,
                                              timeout=120.0)
    assert torch.equal(split, alone)
    text = loaded.tokenizer.decode(split[0].tolist())
    print("answer:", text)
    assert "Paris" in text


def test_demo_home_speakers_starts_four_speakers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from detransformer_edge.commands import demo as demo_command
    from detransformer_edge.planner.profile import load_profile
    from detransformer_edge.service.demo import DEVICES, HOMES, Demo, DemoOptions, write_configs

    parser = argparse.ArgumentParser()
    demo_command.add_arguments(parser)
    assert parser.parse_args([]).home == "default"  # the default demo is unchanged
    args = parser.parse_args(["--home", "speakers"])
    assert Demo(DemoOptions(home=args.home)).devices == HOMES["speakers"]
    assert Demo(DemoOptions()).devices == DEVICES

    class Broker:
        url = "mqtt://127.0.0.1:1"

    configs = write_configs(tmp_path, Broker(), "demo", 4, HOMES["speakers"])  # type: ignore[arg-type]
    import tomllib

    cfg = get_config("smollm2-135m")
    for c in configs:
        profile = load_profile(tomllib.loads(c.config.read_text())["profile"])
        assert profile.ram_bytes < analysis.model_params(cfg) * analysis.WEIGHT_BYTES
    assert [c.id for c in configs] == list(SPEAKERS)
