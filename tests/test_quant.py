"""Quantized weights (weights/quant): the layers against their own dequantised weights, the pass
on every model shape, GGUF blocks against gguf's own dequantiser, quantized shards in the
distributed executor, the catalog / profile / host choice, and (slow) parity of the real models.
"""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import get_config
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.parallel.local import LocalCluster, shards_for_plans
from detransformer_edge.parallel.plan import DeviceWeights, Plan
from detransformer_edge.parallel.shards import build_shard, quantize_shard, shard_modules
from detransformer_edge.weights.quant import SCHEMES, check_scheme, resolve_scheme
from detransformer_edge.weights.quant.gguf import dequantize_q8_0, int4_from_q4_1, q4_1_codes
from detransformer_edge.weights.quant.linear import (
    Int4Linear,
    Int8Linear,
    default_activation_dtype,
    module_nbytes,
    quantize_model,
    weight_formats,
)

DTYPES = [torch.float32, torch.bfloat16]


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g) * 0.1


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the layers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_codes_scales_and_forward(dtype):
    w, b = _weight(96, 160)
    w[3] = 0.0  # an all-zero row must not divide by zero
    layer = Int8Linear.from_weight(w, b, dtype)
    q, s = layer.weight_int8.to(torch.int32), layer.scales.to(torch.float32)
    assert layer.weight_int8.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(s, s.to(torch.bfloat16).to(torch.float32)), "scales must be bfloat16 values"
    amax = w.abs().amax(dim=1)
    assert torch.all(s[amax > 0] >= amax[amax > 0] / 127) and torch.all(s[amax > 0] <= amax[amax > 0] / 127 * (1 + 2**-7))
    # per element: half a step of its row
    assert torch.all((layer.dequantized() - w).abs() <= s[:, None] / 2 + 1e-7)
    x = _x(2, 5, 160)
    with torch.no_grad():
        y = layer(x)
    ref = F.linear(x, layer.dequantized(), b)
    rel = float((y - ref).abs().max() / ref.abs().max())
    # float32 activations: the kernel's own sums; bfloat16: input and output rounded to 8 bits
    assert rel <= (1e-5 if dtype == torch.float32 else 1.5e-2), rel
    assert y.dtype == torch.float32 and y.shape == (2, 5, 96)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_groups_and_forward(dtype):
    w, b = _weight(48, 128)
    layer = Int4Linear.from_weight(w, b, 32, dtype)
    sz = layer.scales_and_zeros.to(torch.float32)  # (K/G, N, 2)
    assert sz.shape == (4, 48, 2)
    deq = layer.dequantized()
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)  # (N, K)
    # min-max groups: every weight within half a step (plus the scale/zero rounding in bfloat16)
    slack = 0.5 if dtype == torch.float32 else 0.5 + 16 * 2**-8
    assert torch.all((deq - w).abs() <= scale * slack + 1e-6)
    x = _x(7, 128)
    ref = F.linear(x, deq, b)
    with torch.no_grad():
        rel = float((layer(x) - ref).abs().max() / ref.abs().max())
    assert rel <= (1e-5 if dtype == torch.float32 else 1.5e-2), rel


def test_int4_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(ConfigError, match="divisible by 16"):
        Int4Linear(64, 24)
    with pytest.raises(ConfigError, match="group size 32"):
        Int4Linear(48, 32)


def test_check_scheme_names_the_allowed_values():
    assert [check_scheme(s) for s in SCHEMES] == list(SCHEMES)
    with pytest.raises(ConfigError, match="float32, int8, int4.*'fp8'"):
        check_scheme("fp8")
    assert resolve_scheme("int8", "auto") == "int8" and resolve_scheme("int8", "int4") == "int4"
    with pytest.raises(ConfigError, match="auto, float32, int8, int4"):
        resolve_scheme("int8", "q4")


# --- the pass on the model families -------------------------------------------------------------------


def _model(name, nd=1, nb=None, seed=1):
    torch.manual_seed(seed)
    cfg = get_config(name, nd=nd, nb=nb)
    return (Encoder if cfg.family == "encoder" else Decoder)(cfg).eval()


def _run(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.cfg.vocab_size, (2, 11), generator=g)
    with torch.inference_mode():
        return model(ids)


# max |q - f| / max |f| of the final output, tiny random models (4 layers): int8 ~1e-2, int4 ~1e-1
BOUNDS = {"int8": 0.03, "int4": 0.25}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name,nd,nb", [("tiny-encoder", 1, None), ("tiny-encoder", 2, 2),
                                         ("tiny-decoder", 1, None), ("tiny-decoder", 2, 2)])
def test_quantized_model_stays_close_to_float32(name, nd, nb, scheme):
    model = _model(name, nd, nb)
    ref = _run(model)
    float_bytes = module_nbytes(model)
    n_linear = weight_formats(model)["float32"]
    done = quantize_model(model, scheme)
    assert len(done) == n_linear and weight_formats(model)["float32"] == 0
    out = _run(model)
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"{name} nd={nd} nb={nb} {scheme}: max rel err {err:.4f}")
    assert err <= BOUNDS[scheme]
    assert module_nbytes(model) < float_bytes
    assert quantize_model(model, scheme) == {}, "a second pass finds nothing left to quantize"


def test_int4_falls_back_to_int8_where_the_kernel_cannot_and_for_the_head():
    model = _model("tiny-encoder", 2, 2)  # decoupled FFN width 253: neither a multiple of 16 nor of 32
    done = quantize_model(model, "int4")
    assert done["layers.0.sub_blocks.0.ffn.up"] == "int8" and done["layers.0.sub_blocks.0.ffn.down"] == "int8"
    assert done["layers.0.sub_blocks.0.attn.q_proj"] == "int4"
    dec = _model("tiny-decoder")
    done = quantize_model(dec, "int4")
    assert done["lm_head"] == "int8" and done["layers.0.ffn.up"] == "int4"


def test_tied_head_gets_its_own_int8_copy_and_the_embedding_stays_float():
    dec = _model("tiny-decoder")
    assert dec.lm_head.weight is dec.tok_emb.weight
    emb = dec.tok_emb.weight.detach().clone()
    quantize_model(dec, "int8")
    assert isinstance(dec.lm_head, Int8Linear) and dec.tok_emb.weight.dtype == torch.float32
    assert torch.equal(dec.tok_emb.weight, emb)
    assert torch.all((dec.lm_head.dequantized() - emb).abs() <= dec.lm_head.scales.float()[:, None] / 2 + 1e-7)


def test_float32_scheme_changes_nothing_and_unknown_scheme_is_refused():
    model = _model("tiny-decoder")
    assert quantize_model(model, "float32") == {}
    assert weight_formats(model)["int8"] == 0
    with pytest.raises(ConfigError, match="got 'int2'"):
        quantize_model(model, "int2")


def test_nbytes_counts_quantized_buffers_exactly():
    layer = Int8Linear.from_weight(*_weight(64, 96), activation_dtype=torch.bfloat16)
    assert module_nbytes(layer) == 64 * 96 + 64 * 2 + 64 * 4  # int8 codes, bf16 scales, f32 bias
    layer4 = Int4Linear.from_weight(*_weight(64, 96), group_size=32, activation_dtype=torch.float32)
    assert module_nbytes(layer4) == 64 * 96 // 2 + (96 // 32) * 64 * 2 * 4 + 64 * 4
    dec = _model("tiny-decoder")
    shard = build_shard(dec, DeviceWeights(True, (), (0, 1, 2, 3)))
    before = shard.nbytes()
    quantize_shard(shard, "int8")
    cfg = dec.cfg
    held = [m for top in shard_modules(shard) for m in top.modules()]
    lin = sum(m.in_features * m.out_features for m in held if isinstance(m, Int8Linear))
    scales = sum(m.out_features for m in held if isinstance(m, Int8Linear))
    floats = sum(p.numel() for p in {id(p): p for top in shard_modules(shard) for p in top.parameters()}.values())
    assert shard.nbytes() == lin + 2 * scales + 4 * floats
    assert floats == cfg.vocab_size * cfg.d_model + (2 * cfg.n_layers + 1) * cfg.d_model
    assert shard.nbytes() < before


# --- GGUF blocks ----------------------------------------------------------------------------------------


def _q4_1_bytes(n, k, seed=0):
    """A random Q4_1 matrix in ggml's byte layout, and its codes/parameters."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    codes = rng.integers(0, 16, size=(n, nb, 32), dtype=np.uint8)
    d = (rng.random((n, nb)) * 0.01 + 1e-4).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.08).astype(np.float16)
    blocks = np.empty((n, nb, 20), dtype=np.uint8)
    blocks[..., 0:2] = d[..., None].view(np.uint8)
    blocks[..., 2:4] = m[..., None].view(np.uint8)
    blocks[..., 4:] = codes[..., :16] | (codes[..., 16:] << 4)
    return blocks.reshape(n, nb * 20), codes.reshape(n, k), d, m


def test_q4_1_blocks_decode_like_gguf_and_map_exactly_to_int4():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw, codes, d, m = _q4_1_bytes(48, 128)
    q = q4_1_codes(raw, (48, 128))
    assert torch.equal(q.codes, torch.from_numpy(codes.astype(np.int32)))
    ref = torch.from_numpy(np.asarray(dequantize(raw, GGMLQuantizationType.Q4_1), dtype=np.float32).reshape(48, 128))
    assert torch.equal(q.dequantized(), ref), "d * q + m must be gguf's own values, bit for bit"
    scale, zero = q.int4_scale_zero()
    exact = torch.from_numpy(m.astype(np.float64) + 8 * d.astype(np.float64))
    assert torch.equal(zero.to(torch.float64), exact), "m + 8d must be exact in float32"
    layer = int4_from_q4_1(q, torch.float32)
    assert torch.equal(layer.scales_and_zeros[..., 0].t(), scale)
    # the kernel's (q - 8) * scale + zero gives the same weights up to float32 rounding
    assert float((layer.dequantized() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    x = _x(3, 128)
    assert torch.allclose(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    # bfloat16 mode rounds scale and zero: the error stays far below one quantization step
    bf = int4_from_q4_1(q, torch.bfloat16)
    step = float(torch.from_numpy(d.astype(np.float32)).max())
    assert float((bf.dequantized() - ref).abs().max()) <= step / 8


def test_q4_1_and_q8_0_sizes_are_checked():
    raw, *_ = _q4_1_bytes(16, 64)
    with pytest.raises(ConfigError, match="Q4_1"):
        q4_1_codes(raw, (16, 96))
    with pytest.raises(ConfigError, match="Q8_0"):
        dequantize_q8_0(np.zeros(10, dtype=np.uint8), (1, 32))


def test_q8_0_matches_gguf():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(2)
    n, k = 8, 64
    d = (rng.random((n, k // 32)) * 0.01).astype(np.float16)
    q = rng.integers(-127, 128, size=(n, k // 32, 32), dtype=np.int8)
    blocks = np.empty((n, k // 32, 34), dtype=np.uint8)
    blocks[..., :2] = d[..., None].view(np.uint8)
    blocks[..., 2:] = q.view(np.uint8)
    raw = blocks.reshape(n, -1)
    ref = np.asarray(dequantize(raw, GGMLQuantizationType.Q8_0), dtype=np.float32).reshape(n, k)
    assert torch.equal(dequantize_q8_0(raw, (n, k)), torch.from_numpy(ref))


# --- quantized shards in the distributed executor -------------------------------------------------------


@contextlib.asynccontextmanager
async def _cluster(model, plans, scheme):
    from detransformer_edge.transport.memory import MemoryHub

    shards = shards_for_plans(model, plans)
    for shard in shards.values():
        quantize_shard(shard, scheme)
    hub = MemoryHub()
    async with contextlib.AsyncExitStack() as stack:
        transports = {d: await stack.enter_async_context(hub.transport(d)) for d in shards}
        yield LocalCluster(transports, shards)


BLOCK = Plan("block", ("d0", "d1"), sub_block_owner=("d0", "d1"))
GATHER = Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0", "d1"), coupled="gather", coupled_devices=("d2",))
BLOCK_TP = Plan("block", ("d0", "d1"), sub_block_owner=("d0", "d1"), coupled="tp", coupled_devices=("d0", "d1"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("plan", [BLOCK, GATHER], ids=lambda p: p.describe())
async def test_quantized_block_parallel_decoder_equals_quantized_single_device(plan, scheme):
    model = _model("tiny-decoder", 2, 2)
    single = copy.deepcopy(model)
    quantize_model(single, scheme)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    ids, ref_logits = prompt, []
    with torch.inference_mode():
        for _ in range(5):
            logits = single(ids)[:, -1, :]
            ref_logits.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    async with _cluster(model, [plan], scheme) as cluster:
        gen, steps = await cluster.generate(plan, prompt, 5)
    # the devices run the very layers of the single-device quantized model (same codes, same scales)
    assert torch.equal(gen, ids[:, prompt.shape[1]:])
    for a, b in zip(steps, ref_logits):
        assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())


async def test_quantized_tensor_parallel_shards_stay_close_to_float32():
    """TP shards are sliced from float weights and then quantized (row-parallel slices get their
    own per-channel scales), so they are compared with the float32 model."""
    model = _model("tiny-encoder", 2, 2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.cfg.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ref = model(ids, mask)
    async with _cluster(model, [BLOCK_TP], "int8") as cluster:
        res = await cluster.encode(BLOCK_TP, ids, mask)
        tp = [m for ex in cluster.executors.values() for m in ex.shard.tp.values()]
        assert tp and all(weight_formats(m)["int8"] == 6 for m in tp)
    assert res.ok, res.error
    assert float((res.output - ref).abs().max() / ref.abs().max()) <= BOUNDS["int8"]


def test_a_quantized_model_cannot_be_cut_into_tp_shards():
    from detransformer_edge.parallel.plan import PlanError

    model = _model("tiny-decoder")
    quantize_model(model, "int8")
    with pytest.raises(PlanError, match="quantize the shard after build_shard"):
        build_shard(model, DeviceWeights(False, (), (), ((0, 2),)))


# --- choosing the format: catalog, profile, host ------------------------------------------------------


def test_profile_quant_field_defaults_to_auto_and_is_validated():
    from detransformer_edge.planner.profile import ProfileError, dumps_profile, loads_profile

    base = 'name = "pi4"\ngflops = 19.0\nmem_bw_gbs = 4.0\nram_mb = 2800\nlink_mbit = 100.0\n'
    assert loads_profile(base).quant == "auto"
    prof = loads_profile(base + 'quant = "int4"\n')
    assert prof.quant == "int4" and loads_profile(dumps_profile(prof)) == prof
    with pytest.raises(ProfileError, match="quant must be one of auto, float32, int8, int4, got 'q4_1'"):
        loads_profile(base + 'quant = "q4_1"\n')


def test_catalog_quant_is_validated():
    import dataclasses

    from detransformer_edge.service.catalog import tiny_catalog

    served = tiny_catalog().get("tiny-decoder")
    assert served.quant == "float32"
    assert dataclasses.replace(served, quant="int4").quant == "int4"
    with pytest.raises(ConfigError, match="catalog's quant"):
        dataclasses.replace(served, quant="int3")


@pytest.mark.parametrize("device,expected", [("auto", "int8"), ("int4", "int4"), ("float32", "float32")])
async def test_host_quantizes_the_shards_it_builds(device, expected):
    import dataclasses

    from detransformer_edge.service.catalog import Catalog, tiny_catalog
    from detransformer_edge.service.host import ModelHost
    from detransformer_edge.transport.memory import MemoryHub

    served = dataclasses.replace(tiny_catalog().get("tiny-decoder"), quant="int8")
    cat = Catalog({"tiny-decoder": served})
    w = DeviceWeights(True, (), (0, 1, 2, 3))
    async with MemoryHub().transport("d0") as t:
        host = ModelHost(t, cat, weights="local", quant=device)
        await host.assign(1, {"tiny-decoder": w})
        shard = host.held["tiny-decoder"].shard
    assert host.scheme("tiny-decoder") == expected
    counts = {s: sum(weight_formats(m)[s] for m in shard.coupled.values()) for s in SCHEMES}
    assert counts[expected] > 0 and sum(counts.values()) == counts[expected]
    float_shard = build_shard(served.loader().model, w)
    ratio = host.weight_bytes()["tiny-decoder"] / float_shard.nbytes()
    assert ratio < 1 if expected != "float32" else ratio == 1


async def test_host_refuses_an_unknown_quant():
    from detransformer_edge.service.catalog import tiny_catalog
    from detransformer_edge.service.host import ModelHost
    from detransformer_edge.transport.memory import MemoryHub

    async with MemoryHub().transport("d0") as t:
        with pytest.raises(ConfigError, match="quant must be one of auto"):
            ModelHost(t, tiny_catalog(), quant="int16")


def test_default_activation_dtype_is_a_kernel_dtype():
    assert default_activation_dtype() in (torch.float32, torch.bfloat16)


# --- the real models (slow) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_variants():
    from detransformer_edge.weights.loaders import load_model

    torch.set_num_threads(2)
    fl = load_model("smollm2-135m")
    int8 = copy.deepcopy(fl.model)
    quantize_model(int8, "int8")
    int4 = load_model("smollm2-135m", quant="int4").model
    return fl, {"float32": fl.model, "int8": int8, "int4": int4}


@pytest.mark.slow
def test_smollm2_int8_and_int4_against_float32(smollm2_variants):
    """Held-out perplexity (1024 tokens here; 8192 in bench/quant.py, where the claim is measured:
    +0.22 % int8, -0.07 % int4) within 2 % for both, and the documented first answer in every
    format. Greedy continuations are NOT all identical to float32 (bench/quant.py reports 2/10
    int8, 3/10 int4; int8 weights with exact float32 arithmetic also diverge): not asserted."""
    from detransformer_edge.training import quant_parity as P

    fl, variants = smollm2_variants
    first = P.prompt_ids(fl, P.PARITY_PROMPTS[0])
    seqs = P.held_out_sequences(fl.tokenizer, tokens=1024, seq_len=256)
    ppl = {k: P.perplexity(m, seqs) for k, m in variants.items()}
    change = {k: ppl[k] / ppl["float32"] - 1 for k in ("int8", "int4")}
    print(f"perplexity {ppl}; change {change}")
    assert abs(change["int8"]) <= 0.02
    assert abs(change["int4"]) <= 0.02
    for model in variants.values():  # the first answer is the documented one in every format
        assert fl.tokenizer.decode(P.greedy_continuation(model, first, 12)).startswith("The capital of France is Paris.")


@pytest.mark.slow
def test_smollm2_int4_is_read_from_the_q4_1_blocks(smollm2_variants):
    """The int4 model's layers hold the file's Q4_1 codes: its weights differ from the
    (exactly dequantised) float32 model only by the bfloat16 rounding of d and m + 8d."""
    fl, variants = smollm2_variants
    layer = variants["int4"].layers[7].attn.k_proj
    assert isinstance(layer, Int4Linear)
    ref = fl.model.layers[7].attn.k_proj.weight.detach()
    err = float((layer.dequantized() - ref).abs().max())
    step = float(ref.abs().max()) / 7  # about one Q4_1 step at the widest block
    if layer.activation_dtype == torch.float32:
        assert err <= 1e-6 * float(ref.abs().max())
    else:
        assert err <= step / 8, err
    assert weight_formats(variants["int4"]) == {"float32": 0, "int8": 1, "int4": 210}
    assert module_nbytes(variants["int4"]) < module_nbytes(variants["int8"]) < module_nbytes(fl.model) / 2


@pytest.mark.slow
def test_minilm_int8_and_int4_embeddings_stay_close():
    from detransformer_edge.training.quant_parity import embedding_cosines
    from detransformer_edge.weights.loaders import load_model

    texts = ["Turn on the kitchen lights", "What's the weather like tomorrow in Paris?",
             "Set a timer for ten minutes", "Play some jazz in the living room", "Is the front door locked?",
             "Remind me to call mum at six", "How far is the moon from the earth?", "Dim the bedroom lamp to 30 percent"]
    fl = load_model("minilm-l6")
    cos = {}
    for scheme in ("int8", "int4"):
        q = copy.deepcopy(fl.model)
        quantize_model(q, scheme)
        cos[scheme] = float(embedding_cosines(fl.model, q, fl.tokenizer, texts).min())
    print(f"MiniLM min cosine to float32: {cos}")
    assert cos["int8"] >= 0.999  # measured 0.99948
    assert cos["int4"] >= 0.95  # measured 0.974


@pytest.mark.slow
async def test_the_served_smollm2_answers_the_demo_question():
    """The home's own path (a selectively loaded shard, quantized as the catalog says) answers
    the demo's question right: int4 did not (a near-tied first token, see docs/MODELS.md)."""
    from detransformer_edge.model.generation import build_prompt
    from detransformer_edge.parallel.local import LocalCluster
    from detransformer_edge.parallel.plan import Plan, full_replica_weights
    from detransformer_edge.service.catalog import default_catalog
    from detransformer_edge.service.weights import load_selective_shard
    from detransformer_edge.transport.memory import MemoryHub

    cat = default_catalog().subset(["smollm2-135m"])
    served, tools = cat.get("smollm2-135m"), cat.tools("smollm2-135m")
    cfg = served.config()
    ids = build_prompt(tools.tokenizer, "What is the capital of France?", tools.chat_template)
    shard = load_selective_shard(cfg, full_replica_weights(("d0",), cfg.layer_kinds, cfg.nd)["d0"], served.tensors)
    quantize_shard(shard, served.quant)
    async with MemoryHub().transport("d0") as t:
        with LocalCluster({"d0": t}, {"d0": shard}) as cluster:
            out, _ = await cluster.generate(Plan("single", ("d0",)), torch.tensor([ids]), 10,
                                            eos_id=tools.tokenizer.eos_id)
    assert served.quant == "int8"
    assert tools.tokenizer.decode(out[0].tolist()).startswith("The capital of France is Paris")
