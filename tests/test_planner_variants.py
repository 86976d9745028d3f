"""Choosing across a family's variants (planner/variants.py): task budgets (wire dtypes and
validated quality), the margin a multi-device plan must win by, and the leader's seam
(Placements.choose -> the run coordinator runs the chosen variant's weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import Placement, full_replica_weights
from detransformer_edge.planner.cost import Broker, Request
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.runtime import RuntimePlanner
from detransformer_edge.planner.variants import (
    Quality,
    TaskBudget,
    Variant,
    VariantPlanner,
    variants_summary,
)


def dev(name: str, gflops: float, link_mbit: float, rtt_ms: float = 1.0) -> DeviceProfile:
    return DeviceProfile(name, gflops=gflops, mem_bw_gbs=10.0, ram_mb=8000, link_mbit=link_mbit, rtt_ms=rtt_ms)


def replicated(name: str, cfg: object, devices: tuple[str, ...], quality: Quality | None = None) -> Variant:
    placement = Placement(1, full_replica_weights(devices, cfg.layer_kinds, cfg.nd))  # type: ignore[attr-defined]
    return Variant(name, cfg, placement, quality)  # type: ignore[arg-type]


SLOW_FAST_LINKS = [dev("a", 5.0, 940.0, 0.2), dev("b", 5.0, 940.0, 0.2), dev("c", 5.0, 940.0, 0.2)]
NAMES = ("a", "b", "c")


def family(ratio: float | None, std: bool = True) -> list[Variant]:
    """SmolLM2's shape: the standard model and a decoupled variant of the given quality."""
    out = [replicated("smollm2-shape", get_config("smollm2-135m"), NAMES)] if std else []
    q = None if ratio is None else Quality("ppl_ratio", ratio, "quality.json")
    out.append(replicated("smollm2-bp", get_config("smollm2-135m", nd=3, nb=5, sub_attn="slice"), NAMES, q))
    return out


def test_a_decoupled_decoder_outside_the_quality_budget_is_not_used() -> None:
    budget = TaskBudget.for_task("generate")  # <= 1.10x the teacher's perplexity
    vp = VariantPlanner(family(2.74), SLOW_FAST_LINKS, budget, coordinator="a")
    choice = vp.choose(Request("prefill", 128))
    assert choice.variant == "smollm2-shape"
    excluded = {c.variant: c.excluded for c in choice.considered}
    assert "2.74x the teacher's" in str(excluded["smollm2-bp"]) and "1.10x" in str(excluded["smollm2-bp"])
    lines = variants_summary(choice)
    assert any(line.startswith("smollm2-bp") and "not considered" in line for line in lines)
    assert any("<- chosen" in line and line.startswith("smollm2-shape") for line in lines)


def test_within_the_budget_the_faster_decoupled_decoder_serves() -> None:
    vp = VariantPlanner(family(1.05), SLOW_FAST_LINKS, TaskBudget.for_task("generate"), coordinator="a")
    choice = vp.choose(Request("prefill", 256))
    assert choice.variant == "smollm2-bp" and len(choice.breakdown.plan.devices) > 1, variants_summary(choice)
    # the budget is configurable: 1.02x leaves it out again
    strict = VariantPlanner(family(1.05), SLOW_FAST_LINKS, TaskBudget.for_task("generate", max_ppl_ratio=1.02),
                            coordinator="a")
    assert strict.choose(Request("prefill", 256)).variant == "smollm2-shape"


def test_unvalidated_variants_need_the_budget_to_allow_them() -> None:
    strict = VariantPlanner(family(None), SLOW_FAST_LINKS, TaskBudget.for_task("generate"), coordinator="a")
    assert strict.choose(Request("prefill", 256)).variant == "smollm2-shape"
    assert "no validated quality figure" in str(strict.excluded["smollm2-bp"])
    loose = VariantPlanner(family(None), SLOW_FAST_LINKS, TaskBudget.for_task("generate", unvalidated=True),
                           coordinator="a")
    assert loose.choose(Request("prefill", 256)).variant == "smollm2-bp"


def test_a_family_without_its_standard_model_uses_what_it_has() -> None:
    vp = VariantPlanner(family(2.74, std=False), SLOW_FAST_LINKS, TaskBudget.for_task("generate"), coordinator="a")
    assert vp.choose(Request("prefill", 64)).variant == "smollm2-bp" and not vp.excluded


def test_the_task_budget_sets_the_wire_dtypes() -> None:
    exact = TaskBudget(("float32",), unvalidated=True)
    vp = VariantPlanner(family(None), SLOW_FAST_LINKS, exact, coordinator="a", margin=0.0)
    bd = vp.choose(Request("prefill", 256)).breakdown
    assert bd.plan.wire == "float32"
    compact = VariantPlanner(family(None), SLOW_FAST_LINKS, TaskBudget.for_task("generate", unvalidated=True),
                             coordinator="a", margin=0.0)
    chosen = compact.choose(Request("prefill", 256)).breakdown.plan
    assert len(chosen.devices) == 1 or chosen.wire == "int8"  # accuracy.py: int8 measured harmless


@st.composite
def homes(draw: st.DrawFn) -> list[DeviceProfile]:
    n = draw(st.integers(2, 4))
    return [dev(f"d{i}", draw(st.sampled_from((4.0, 10.0, 30.0, 80.0))), draw(st.sampled_from((20.0, 100.0, 940.0))),
                draw(st.sampled_from((0.3, 2.0, 5.0)))) for i in range(n)]


@settings(max_examples=25, deadline=None)
@given(homes(), st.sampled_from((16, 64, 128)), st.sampled_from((0.0, 0.1, 0.3)))
def test_a_multi_device_plan_wins_by_the_margin_or_one_device_serves(profiles: list[DeviceProfile], seq: int,
                                                                     margin: float) -> None:
    names = tuple(p.name for p in profiles)
    variants = [replicated("bert-base", get_config("bert-base"), names),
                replicated("bert-base-bp2", get_config("bert-base", nd=4, nb=2, sub_attn="slice"), names)]
    budget = TaskBudget.for_task("embed", unvalidated=True)
    choice = VariantPlanner(variants, profiles, budget, coordinator="d0", margin=margin).choose(Request("encode", seq))
    singles = [c.single.total_s for c in choice.considered if c.single is not None]
    multis = [c.multi.total_s for c in choice.considered if c.multi is not None]
    best_single = min(singles)
    if len(choice.breakdown.plan.devices) > 1:
        assert choice.breakdown.total_s < best_single * (1 - margin)
    else:
        assert choice.breakdown.total_s == best_single
        assert not multis or min(multis) >= best_single * (1 - margin)
    # each variant's best plans are its planner's own best of that kind
    for c in choice.considered:
        planner = RuntimePlanner(next(v.placement for v in variants if v.name == c.variant), profiles,
                                 next(v.cfg for v in variants if v.name == c.variant), Broker(), budget.wires,
                                 coordinator="d0")
        best = planner.choose(Request("encode", seq))
        assert min(x.total_s for x in (c.single, c.multi) if x is not None) == pytest.approx(best.total_s)


def test_quality_is_read_from_what_conversion_wrote(tmp_path: Path) -> None:
    from detransformer_edge.service.catalog import quality_of

    (tmp_path / "quality.json").write_text(json.dumps({"ppl_teacher": 124.6, "ppl_after": 341.7}))
    q = quality_of(tmp_path)
    assert q is not None and q.metric == "ppl_ratio" and q.value == pytest.approx(341.7 / 124.6)
    (tmp_path / "quality.json").write_text(json.dumps({"ppl_ratio": 1.04, "ppl_after": 1.0, "ppl_teacher": 2.0}))
    assert quality_of(tmp_path) == Quality("ppl_ratio", 1.04, str(tmp_path / "quality.json"))
    (tmp_path / "quality.json").write_text(json.dumps({"cosine_init": 0.28, "cosine_after": 0.902}))
    assert quality_of(tmp_path) == Quality("cosine", 0.902, str(tmp_path / "quality.json"))
    (tmp_path / "quality.json").write_text(json.dumps({"ppl_teacher": 124.6, "ppl_init": 1e6}))  # unfinished
    assert quality_of(tmp_path) is None
    assert quality_of(tmp_path / "missing") is None


def test_catalog_families() -> None:
    from detransformer_edge.service.catalog import shape_catalog, tiny_catalog

    shapes = shape_catalog()
    assert shapes.variants("bert-base-bp") == ("bert-base-bp", "bert-base", "bert-base-bp-slice", "bert-base-bp2")
    assert shapes.variants("smollm2-shape") == ("smollm2-bp", "smollm2-shape")
    assert shapes.subset(["bert-base", "bert-base-bp2"]).variants("bert-base") == ("bert-base", "bert-base-bp2")
    assert not shapes.quality_required and not tiny_catalog().quality_required
    assert tiny_catalog().variants("intent") == ("intent",)


# -- the leader's seam: Placements.choose and the run coordinator --------------------------------------


class RecordingHost:
    def __init__(self) -> None:
        self.models: list[str] = []

    async def run_coordinator(self, model, job):  # type: ignore[no-untyped-def]
        from detransformer_edge.parallel.executor import JobResult

        self.models.append(model)
        return JobResult(job.req, "dev0", torch.zeros(*job.input_ids.shape, 8))

    async def collect_trace(self, req, devices, n):  # type: ignore[no-untyped-def]
        return []

    def end(self, req: str) -> None:
        pass

    def cancel(self, req: str, reason: str) -> None:
        pass


async def test_the_run_coordinator_runs_the_variant_the_planner_chose() -> None:
    from detransformer_edge.protocol.topics import RunTopics
    from detransformer_edge.service.catalog import tiny_catalog
    from detransformer_edge.service.placement import ClusterState, ModelPlacement, Placements
    from detransformer_edge.service.runs import RunCoordinator

    cat = tiny_catalog()
    devs = ("dev0", "dev1", "dev2")
    # slow links: the standard model on the leader alone beats any split of the decoupled one
    profiles = {d: dev(d, 5.0, 2.0, 5.0) for d in devs}
    models = {}
    for name in ("tiny-encoder", "tiny-encoder-bp"):
        cfg = cat.get(name).config()
        models[name] = ModelPlacement(Placement(1, full_replica_weights(devs, cfg.layer_kinds, cfg.nd)), 0.0, "test")
    placements = Placements("dev0", cat)
    placements.state = ClusterState(1, profiles, models, {d: 1 for d in devs})
    chosen = placements.choose("tiny-encoder-bp", "encode", 8)
    assert chosen.model == "tiny-encoder" and chosen.plan.devices == ("dev0",) and chosen.predicted_s > 0
    assert "one device" in chosen.reason or "margin" in chosen.reason
    # a baseline runs exactly the model asked for
    assert placements.choose("tiny-encoder-bp", "encode", 8, "bp-fixed").model == "tiny-encoder-bp"

    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        published.append((topic, payload))

    host = RecordingHost()
    runs = RunCoordinator("dev0", host, placements, publish, RunTopics("p"))  # type: ignore[arg-type]
    seen: list[tuple[str, str]] = []
    ids = torch.ones(1, 8, dtype=torch.long)
    await runs.encode("tiny-encoder-bp", ids, torch.ones_like(ids), "e1", on_plan=lambda m, p: seen.append((m, p.describe())))
    assert host.models == ["tiny-encoder"] and seen == [("tiny-encoder", "single on dev0 (float32)")]
    from detransformer_edge.service.runs import plan_label

    assert plan_label("tiny-encoder-bp", *seen[0][:1], chosen.plan) == "tiny-encoder: single on dev0 (float32)"


def _fake_converted_decoder(home: Path, ratio: float) -> None:
    """What `convert --from smollm2-135m --nd 2 --nb 5` leaves (weights not needed to plan)."""
    import dataclasses as dc

    cfg = get_config("smollm2-135m", nd=2, nb=5)
    out = home / ".cache" / "detransformer_edge" / "converted" / "smollm2-135m-nd2-nb5"
    out.mkdir(parents=True)
    fields = {f.name: getattr(cfg, f.name) for f in dc.fields(cfg) if f.init}
    (out / "config.json").write_text(json.dumps({"decoder": fields, "source": "smollm2-135m", "quality": "quality.json"}))
    (out / "model.safetensors").write_bytes(b"")
    (out / "quality.json").write_text(json.dumps({"ppl_teacher": 124.6, "ppl_after": 124.6 * ratio,
                                                  "ppl_ratio": ratio}))


def _plan_explain(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    import argparse

    from detransformer_edge.commands import plan as plan_command

    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    assert plan_command.run(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_plan_explain_shows_why_a_decoupled_decoder_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _fake_converted_decoder(tmp_path, 2.74)
    root = Path(__file__).resolve().parents[1]
    argv = ["--profiles", f"{root}/firmware_profiles/raspberry-pi-5.toml*2", "--catalog", "pretrained",
            "--model", "smollm2-135m", "--seq", "64", "--explain"]
    out = _plan_explain(argv, capsys)
    assert "family smollm2-135m: smollm2-135m, smollm2-bp" in out
    assert "smollm2-bp (decoupled N_d=2 N_b=5, full-width): not considered: held-out perplexity 2.74x" in out
    assert "variant    smollm2-135m:" in out
    # a looser budget lets it compete (the figure is what conversion wrote)
    out = _plan_explain([*argv, "--max-ppl-ratio", "3"], capsys)
    assert "not considered" not in out and "smollm2-bp (decoupled N_d=2 N_b=5, full-width): one device" in out
