"""Selective weight loading: a device materialises only what its placement needs, reading only
those tensors, and the devices together still compute exactly the single-device model."""

import contextlib

import pytest
import torch

from detransformer_edge.parallel.local import LocalCluster
from detransformer_edge.parallel.plan import DeviceWeights, Plan, required_weights
from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.weights import (
    load_selective_shard,
    materialise,
    needed_parameters,
    parameter_shapes,
    random_tensors,
    shard_units,
    unit_bytes,
    unit_parameters,
    unit_tensors,
)
from detransformer_edge.transport.memory import MemoryHub

DEVS = ("d0", "d1", "d2", "d3")


class CountingSource:
    """A LocalWeightSource that records which tensors were read."""

    def __init__(self, served):
        self.served, self.read = served, set()

    def __call__(self, names):
        self.read |= set(names)
        return self.served.tensors(names)


def numel(shapes, names):
    return sum(torch.Size(shapes[n]).numel() for n in names)


def test_units_and_needed_names():
    cfg = tiny_catalog().get("tiny-encoder-bp").config()  # layers: decoupled, coupled, decoupled, coupled
    w = DeviceWeights(True, (1,), (), ((0, 2),))
    assert shard_units(cfg, w) == ("embeddings", "sub_block.1", "layer.1", "layer.3")
    need = needed_parameters(cfg, w)
    assert {n for n in need if not n.startswith("layers.")} == set(unit_parameters(cfg, "embeddings"))
    assert any(n.startswith("layers.2.sub_blocks.1.") for n in need)
    assert not any(".sub_blocks.0." in n for n in need)
    assert {n for n in need if n.startswith("layers.3.")} == set(unit_parameters(cfg, "layer.3"))
    assert shard_units(cfg, DeviceWeights(False, (), (0,))) == ("layer.0",)
    with pytest.raises(ValueError):
        unit_parameters(cfg, "sub_block.9")
    # a tied decoder stores its head once, under the embedding
    dec = tiny_catalog().get("tiny-decoder").config()
    assert "lm_head.weight" not in parameter_shapes(dec) and "tok_emb.weight" in unit_parameters(dec, "embeddings")


def test_one_of_four_sub_blocks_materialises_a_quarter():
    served = tiny_catalog().get("tiny-encoder-bp")
    cfg = served.config()
    shapes = parameter_shapes(cfg)
    decoupled = [n for n in shapes if ".sub_blocks." in n]
    source = CountingSource(served)
    shard = load_selective_shard(cfg, DeviceWeights(False, (2,)), source)
    assert source.read and all(".sub_blocks.2." in n for n in source.read)  # nothing else was read
    ratio = numel(shapes, source.read) / numel(shapes, decoupled)
    assert 0.24 < ratio < 0.26, ratio
    assert shard.nbytes() == numel(shapes, source.read) * 4
    assert set(shard.sub_blocks) == {(0, 2), (2, 2)} and not shard.coupled and shard.embed is None
    # nothing outside the held modules was materialised
    for m in shard.sub_blocks.values():
        assert all(p.device.type == "cpu" for p in m.parameters())


def test_random_tensors_are_the_full_models_tensors():
    cat = tiny_catalog()
    served = cat.get("tiny-decoder")
    cfg = served.config()
    full = cat.load("tiny-decoder").model.state_dict()
    some = random_tensors(cfg, 0, ["layers.2.attn.q_proj.weight", "norm.weight"])
    assert torch.equal(some["layers.2.attn.q_proj.weight"], full["layers.2.attn.q_proj.weight"])
    assert torch.equal(some["norm.weight"], full["norm.weight"])
    assert full["lm_head.weight"].data_ptr() == full["tok_emb.weight"].data_ptr()


def test_unit_bytes_round_trip():
    served = tiny_catalog().get("tiny-encoder-bp")
    cfg = served.config()
    blob = unit_bytes(cfg, "sub_block.3", served.tensors)
    assert blob == unit_bytes(cfg, "sub_block.3", served.tensors)  # deterministic: resumable across leaders
    got = unit_tensors(cfg, "sub_block.3", blob)
    ref = served.tensors(unit_parameters(cfg, "sub_block.3"))
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
    with pytest.raises(Exception, match="shard sub_block.2"):
        unit_tensors(cfg, "sub_block.2", blob)


@contextlib.asynccontextmanager
async def selective_cluster(served, holdings):
    cfg = served.config()
    hub = MemoryHub()
    shards = {d: load_selective_shard(cfg, w, served.tensors) for d, w in holdings.items()}
    async with contextlib.AsyncExitStack() as stack:
        transports = {d: await stack.enter_async_context(hub.transport(d)) for d in shards}
        with LocalCluster(transports, shards) as cluster:
            yield cluster


@pytest.mark.parametrize("coupled", ["allgather", "gather", "tp"])
async def test_selectively_loaded_devices_match_one_device(coupled):
    cat = tiny_catalog()
    served = cat.get("tiny-encoder-bp")
    cfg = served.config()
    ref_model = cat.load("tiny-encoder-bp").model
    extra = {"allgather": {}, "gather": {"coupled_devices": ("d3",)}, "tp": {"coupled_devices": ("d0", "d1")}}[coupled]
    plan = Plan("block", DEVS, sub_block_owner=DEVS, coupled=coupled, **extra)
    holdings = {d: required_weights(plan, cfg.layer_kinds, d) for d in DEVS}
    ids = torch.tensor([[1, 7, 9, 33, 12, 2]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ref = ref_model(ids, mask)
    async with selective_cluster(served, holdings) as cluster:
        res = await cluster.encode(plan, ids, mask)
    assert res.ok, res.error
    torch.testing.assert_close(res.output, ref, atol=1e-5, rtol=1e-5)
    # the devices together hold each sub-block once: about a quarter of those weights each
    shapes = parameter_shapes(cfg)
    per_dev = {d: numel(shapes, needed_parameters(cfg, w)) for d, w in holdings.items()}
    assert max(per_dev.values()) < numel(shapes, shapes)


async def test_decoder_generation_on_selective_shards():
    cat = tiny_catalog()
    served = cat.get("tiny-decoder")
    cfg = served.config()
    ref_model = cat.load("tiny-decoder").model
    plan = Plan("tp", ("d0", "d1"))
    holdings = {d: required_weights(plan, cfg.layer_kinds, d) for d in plan.devices}
    prompt = torch.tensor([[1, 40, 41, 42]])
    ids, out = prompt, []
    with torch.inference_mode():
        for _ in range(4):
            nxt = int(ref_model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    async with selective_cluster(served, holdings) as cluster:
        got, _ = await cluster.generate(plan, prompt, 4)
    assert got[0].tolist() == out


def test_materialise_rejects_wrong_shapes():
    cfg = tiny_catalog().get("tiny-encoder").config()
    with pytest.raises(Exception, match="shape"):
        materialise(cfg, {"embeddings.norm.weight": torch.ones(3)})


# --- pretrained sources: the same tensors as the full loaders, read one by one -----------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,sample", [
    ("minilm-l6", ["embeddings.word.weight", "layers.3.attn.q_proj.bias", "layers.5.ffn_norm.weight"]),
    ("smollm2-135m", ["tok_emb.weight", "layers.7.attn.k_proj.weight", "layers.29.ffn.down.weight", "norm.weight"]),
])
def test_pretrained_sources_match_the_full_loader(name, sample):
    import dataclasses

    from detransformer_edge.service.catalog import default_catalog
    from detransformer_edge.weights.loaders import load_model

    torch.set_num_threads(1)
    cat = default_catalog()
    served = cat.get(name)
    cfg = served.config()
    full = load_model(name)
    # the catalog's config is the file's (the GGUF stores eps as float32: 1e-5 -> 9.99999975e-06)
    assert full.config.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert repr(dataclasses.replace(full.config, norm_eps=cfg.norm_eps)) == repr(cfg)
    sd = full.model.state_dict()
    got = served.tensors(sample)
    for n in sample:
        torch.testing.assert_close(got[n], sd[n], rtol=0, atol=0)
    # a device holding layer 1 only: that layer's parameters and nothing else
    shard = load_selective_shard(cfg, DeviceWeights(False, (), (1,)), served.tensors)
    assert shard.nbytes() == sum(p.numel() * 4 for p in full.model.layers[1].parameters())
    # the leader's tools need no weights and tokenise as the full loader does
    tools = cat.tools(name)
    text = "turn on the kitchen light"
    assert tools.tokenizer.encode(text) == full.tokenizer.encode(text)
    assert (tools.chat_template is None) == (full.chat_template is None)


def test_intent_parser_heads_only(tmp_path):
    """The leader's intent parser reads the heads, not the encoder (which the devices hold)."""
    from detransformer_edge.model.config import get_config
    from detransformer_edge.model.encoder import Encoder
    from detransformer_edge.nlu.dataset import BIO_TAGS
    from detransformer_edge.nlu.model import IntentSlotModel
    from detransformer_edge.nlu.parser import IntentParser
    from detransformer_edge.service.weights import intent_source
    from detransformer_edge.training.intent import INTENT_LABELS, save_intent_model

    torch.manual_seed(0)
    cfg = get_config("tiny-encoder", nd=4, nb=2, vocab_size=30522)
    model = IntentSlotModel(Encoder(cfg), len(INTENT_LABELS), len(BIO_TAGS)).eval()
    save_intent_model(model, tmp_path, 0.0, {})
    full = IntentParser.load(tmp_path)
    light = IntentParser.load(tmp_path, encoder=False)
    assert all(p.device.type == "meta" for p in light.encoder.parameters())
    assert all(p.device.type == "cpu" for p in light.heads.parameters())
    text = "dim the kitchen lights to 40 percent"
    with torch.no_grad():
        hidden = full.encoder(torch.tensor([full.encode(text).ids]))
    assert light.parse_from_hidden(text, hidden) == full.parse_from_hidden(text, hidden)
    # devices read the encoder's tensors (under our names) from the same file
    source = intent_source(tmp_path)
    w = DeviceWeights(True, (1,), (1, 3))
    shard = load_selective_shard(cfg, w, source)
    assert set(source(["layers.1.attn.q_proj.weight"])) == {"layers.1.attn.q_proj.weight"}
    torch.testing.assert_close(shard.coupled[1].attn.q_proj.weight, full.encoder.layers[1].attn.q_proj.weight)


@pytest.mark.parametrize("mode", ["auto", "local", "stream"])
async def test_host_streams_when_local_files_are_missing_or_corrupted(mode):
    import dataclasses

    from detransformer_edge.errors import ModelNotInstalledError
    from detransformer_edge.service.catalog import Catalog
    from detransformer_edge.service.host import ModelHost
    from detransformer_edge.weights.manifest import WeightIntegrityError

    served = tiny_catalog().get("tiny-encoder-bp")
    cfg = served.config()
    for failure in (WeightIntegrityError("corrupted"), ModelNotInstalledError("pip install ...")):
        def broken(names, failure=failure):
            raise failure

        class FakeFetcher:
            def __init__(self):
                self.asked = []

            async def fetch(self, model, version, units):
                self.asked.append((model, version, tuple(units)))
                return served.tensors({n for u in units for n in unit_parameters(cfg, u)})

            def progress(self):
                return {}

        cat = Catalog({"tiny-encoder-bp": dataclasses.replace(served, tensors=broken)})
        fetcher = FakeFetcher()
        w = DeviceWeights(True, (0,), (1, 3))
        async with MemoryHub().transport("d0") as t:
            host = ModelHost(t, cat, fetcher, mode)
            if mode == "local":
                with pytest.raises(type(failure)):
                    await host.assign(1, {"tiny-encoder-bp": w})
                continue
            await host.assign(4, {"tiny-encoder-bp": w})
        assert fetcher.asked == [("tiny-encoder-bp", 4, ("embeddings", "sub_block.0", "layer.1", "layer.3"))]
        assert host.ready and host.weight_bytes()["tiny-encoder-bp"] > 0


def test_materialise_accepts_inference_tensors():
    served = tiny_catalog().get("tiny-encoder-bp")
    cfg = served.config()
    with torch.inference_mode():
        tensors = served.tensors(unit_parameters(cfg, "layer.1"))
    model = materialise(cfg, tensors)
    assert not model.layers[1].attn.q_proj.weight.is_inference()
