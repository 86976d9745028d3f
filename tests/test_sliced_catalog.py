"""The N_b = 2 and sliced variants as the rest of the product sees them: the plan command on
shapes-catalog names, the converted sliced MiniLM in the pretrained catalog, and the fused
sub-block path of a device holding a whole decoupled layer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import get_config
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.model.layers import DecoupledLayer, KVCache, SubBlockGroup

ROOT = Path(__file__).resolve().parents[1]
PI5 = str(ROOT / "firmware_profiles" / "raspberry-pi-5.toml")


def _plan_args(**kw: object) -> argparse.Namespace:
    from detransformer_edge.commands import plan

    p = argparse.ArgumentParser()
    plan.add_arguments(p)
    argv = ["--profiles", f"{PI5}*4", "--seq", "128"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


@pytest.mark.parametrize("model,nd,nb,sub_attn,d_ff_sub", [
    ("bert-base-bp2", 4, 2, "slice", 4224), ("bert-base-bp-slice", 4, 4, "slice", 4224),
    ("bert-base-bp", 4, 4, "full", 3062), ("minilm-bp2", 4, 2, "slice", 2112),
])
def test_plan_command_takes_shape_names(model, nd, nb, sub_attn, d_ff_sub, capsys) -> None:
    from detransformer_edge.commands import plan

    cfg = plan.model_config(_plan_args(model=model))
    assert (cfg.nd, cfg.nb, cfg.sub_attn, cfg.d_ff_sub) == (nd, nb, sub_attn, d_ff_sub)
    assert plan.run(_plan_args(model=model, explain=True)) == 0
    out = capsys.readouterr().out
    assert f"model      {model}: " in out and f"I'={d_ff_sub}" in out and "alternatives:" in out


def test_plan_command_presets_and_layout_errors() -> None:
    from detransformer_edge.commands import plan

    assert plan.model_config(_plan_args()).nb == 2 and plan.model_config(_plan_args()).sub_attn == "full"
    assert plan.model_config(_plan_args(nb=0)).nb is None
    sliced = plan.model_config(_plan_args(model="smollm2-135m", nd=3, nb=5, sub_attn="slice"))
    assert (sliced.sub_heads, sliced.sub_kv_heads) == (3, 1)
    with pytest.raises(ConfigError, match="fixes the layout; drop --nb, --sub-attn"):
        plan.model_config(_plan_args(model="bert-base-bp2", nb=4, sub_attn="full"))
    with pytest.raises(ConfigError, match=r"nd in \[1, 3\]"):
        plan.model_config(_plan_args(model="smollm2-135m", nd=4, nb=6, sub_attn="slice"))


def test_converted_sliced_minilm_is_served_when_present(tmp_path, monkeypatch) -> None:
    from detransformer_edge.service import catalog as cat
    from detransformer_edge.service.weights import parameter_shapes
    from detransformer_edge.training.convert import save_student

    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    monkeypatch.setenv("DETRANSFORMER_EDGE_CACHE", str(tmp_path / "cache"))
    assert "minilm-bp2" not in cat.default_catalog().names
    cfg = get_config("tiny-encoder", nd=4, nb=2, sub_attn="slice")
    torch.manual_seed(0)
    student = Encoder(cfg).eval()
    save_student(student, cat.converted_dir("minilm-l6-nd4-nb2-slice"))
    served = cat.default_catalog().get("minilm-bp2")
    assert served.task == "embed" and served.config() == cfg
    names = [n for n in parameter_shapes(cfg) if ".sub_blocks.2." in n][:3]
    got = served.tensors(names)
    state = student.state_dict()
    assert names and all(torch.equal(got[n], state[n]) for n in names)


# -- fused sub-blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("name,nd,sub_attn", [("tiny-encoder", 4, "slice"), ("tiny-encoder", 2, "full"),
                                              ("tiny-decoder", 2, "slice"), ("tiny-decoder", 4, "full")])
def test_fused_sub_blocks_equal_one_by_one(name, nd, sub_attn) -> None:
    cfg = get_config(name, nd=nd, nb=2, sub_attn=sub_attn)
    torch.manual_seed(0)
    model = (Encoder if cfg.family == "encoder" else Decoder)(cfg).eval()
    with torch.no_grad():  # larger weights so a wrong head or K/V mapping shows
        for p in model.parameters():
            p.mul_(3.0)
    ids = torch.randint(1, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if cfg.family == "encoder":
            mask = torch.ones_like(ids)
            mask[1, 7:] = 0
            ref = model(ids, mask)
            model.fuse_sub_blocks()
            out = model(ids, mask)
        else:
            ref = model(ids)
            model.fuse_sub_blocks()
            out = model(ids)
            caches = model.new_caches()
            layer = cfg.layer_kinds.index("decoupled")
            assert isinstance(caches[layer], KVCache)  # one cache holds every sub-block's K/V heads
            pieces = [model(ids[:, :5], 0, caches)] + [model(ids[:, t : t + 1], t, caches) for t in range(5, 11)]
            assert caches[layer].k.shape[:2] == (nd * 2, cfg.sub_kv_heads)  # (nd * B, Hkv, S, hd)
            torch.testing.assert_close(torch.cat(pieces, 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the stacks share storage with the sub-blocks: no second copy of the weights
    group = next(layer for layer in model.layers if isinstance(layer, DecoupledLayer)).group
    assert group is not None
    stack = group.stacks["attn.q_proj.weight"]
    assert group.blocks[1].attn.q_proj.weight.data_ptr() == stack[1].data_ptr()
    # a second, overlapping group (another simulated device in this process) keeps a copy and
    # leaves the first group's storage alone
    other = SubBlockGroup(group.blocks[1:])
    assert group.shares_storage and not other.shares_storage
    x = torch.randn(2, 5, cfg.d_sub * (nd - 1))
    extra = (None,) if cfg.family == "encoder" else (model.rope(0, 5),)
    with torch.no_grad():
        torch.testing.assert_close(other(x, *extra), torch.cat(
            [b(x[..., k * cfg.d_sub:(k + 1) * cfg.d_sub], *extra) for k, b in enumerate(group.blocks[1:])], -1),
            rtol=1e-5, atol=1e-5)
    assert group.blocks[1].attn.q_proj.weight.data_ptr() == stack[1].data_ptr()


def test_fused_layer_trains_one_by_one_and_restacks_after_reassignment() -> None:
    cfg = get_config("tiny-encoder", nd=4, nb=2, sub_attn="slice")
    torch.manual_seed(0)
    model = Encoder(cfg)
    model.fuse_sub_blocks()
    ids = torch.randint(1, cfg.vocab_size, (2, 7))
    model(ids).pow(2).mean().backward()  # grad mode: the one-by-one path, gradients reach every sub-block
    block = model.layers[0].sub_blocks[3]
    assert block.ffn.up.weight.grad is not None and block.ffn.up.weight.grad.abs().sum() > 0
    model.eval()
    torch.manual_seed(1)
    other = Encoder(cfg).eval()
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the group must notice
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-sub-block caches"):
        DecoupledLayer(list(Decoder(get_config("tiny-decoder", nd=2, nb=2)).layers[0].sub_blocks))(
            torch.zeros(1, 3, 64), None, cache=KVCache())


@pytest.mark.parametrize("catalog", ["tiny", "shapes"])
def test_a_coordinators_tools_never_build_the_model(catalog) -> None:
    """The tokenizer (and intent head) of every random model come without its weights: a device
    coordinating a BERT-base or SmolLM2 shape must not hold a whole random model beside its shard
    (two SmolLM2 shapes on a 2.5 GB bench device ran out of memory that way before they were ready)."""
    from detransformer_edge.service.catalog import CATALOGS

    cat = CATALOGS[catalog]()
    for name in cat.models:
        tools = cat.tools(name)
        assert tools.model is None and tools.tokenizer is not None, name
        assert name not in cat._cache  # the full model was never loaded
        if cat.get(name).task == "intent":
            assert tools.intent_head is not None
