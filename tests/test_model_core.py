"""Model architecture: configs, decoupled layers, KV cache. Independent of pretrained weights."""

import pytest
import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import DecoderConfig, EncoderConfig, get_config
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.model.layers import DecoupledLayer


def _build(cfg):
    torch.manual_seed(0)
    return (Encoder if cfg.family == "encoder" else Decoder)(cfg).eval()


@pytest.mark.parametrize(
    "name,nd,nb",
    [("bert-base", 4, 4), ("bert-base", 2, 2), ("minilm-l6", 4, 2), ("minilm-l6", 2, 3),
     ("smollm2-135m", 4, 6), ("smollm2-135m", 2, 5), ("tiny-encoder", 4, 2), ("tiny-decoder", 2, 2)],
)
def test_decoupled_parameter_count_matches_standard(name, nd, nb):
    with torch.device("meta"):
        std = _build(get_config(name))
        dec = _build(get_config(name, nd=nd, nb=nb))
    ratio = dec.num_params() / std.num_params()
    assert abs(ratio - 1) < 0.01, ratio
    assert dec.cfg.is_decoupled and not std.cfg.is_decoupled


def test_paper_ffn_width_for_sliced_attention():
    # The paper's decoupled BERT-base (N_d = 4, sliced) uses I' = 4224: weight-matrix parity,
    # I' = I + 2d(1 - 1/N_d). The whole-parameter count would give 4216 (the FFN up bias).
    for nb in (2, 4):
        assert get_config("bert-base", nd=4, nb=nb, sub_attn="slice").d_ff_sub == 4224
    assert get_config("minilm-l6", nd=4, nb=2, sub_attn="slice").d_ff_sub == 1536 + 2 * 384 * 3 // 4
    assert get_config("minilm-l6", nd=2, nb=2, sub_attn="slice").d_ff_sub == 1536 + 384
    # decoder: I' = I + 2/3 (d + d_kv)(1 - 1/N_d); SmolLM2 nd = 3: 1536 + 341.33
    assert get_config("smollm2-135m", nd=3, nb=6, sub_attn="slice").d_ff_sub == 1877
    # full-width sub-blocks keep the all-parameter derivation of the shipped checkpoints
    assert get_config("minilm-l6", nd=4, nb=2).d_ff_sub == 1526


@pytest.mark.parametrize(
    "name,nd,nb",
    [("bert-base", 4, 2), ("bert-base", 4, 4), ("bert-base", 2, 2), ("minilm-l6", 4, 2), ("minilm-l6", 2, 3),
     ("smollm2-135m", 3, 6), ("smollm2-135m", 3, 5), ("tiny-encoder", 4, 2), ("tiny-decoder", 2, 2)],
)
def test_sliced_layout_weight_parity_and_head_ownership(name, nd, nb):
    cfg = get_config(name, nd=nd, nb=nb, sub_attn="slice")
    with torch.device("meta"):
        std, dec = _build(get_config(name)), _build(cfg)
    # the FFN up bias is the one unmatched vector (nd * I' entries for I): 0.13 % for BERT-base,
    # 0.9 % for the 64-wide tiny encoder
    assert abs(dec.num_params() / std.num_params() - 1) < (0.01 if name.startswith("tiny") else 0.002)
    # weight matrices match to the rounding of I' (one FFN unit per sub-block and decoupled layer)
    def matrices(m):
        return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "emb" not in n)
    unit = (3 if cfg.family == "decoder" else 2) * cfg.d_sub
    n_dec = cfg.layer_kinds.count("decoupled")
    assert abs(matrices(dec) - matrices(std)) <= n_dec * cfg.nd * unit / 2
    # a sub-block is an ordinary layer of width d/nd: its heads tile its slice exactly
    assert cfg.sub_heads * cfg.head_dim == cfg.d_sub
    block = dec.layers[cfg.layer_kinds.index("decoupled")].sub_blocks[0]
    assert block.attn.q_proj.weight.shape == (cfg.d_sub, cfg.d_sub)
    assert block.attn.k_proj.weight.shape == (cfg.sub_kv_heads * cfg.head_dim, cfg.d_sub)
    rows = [cfg.sub_head_rows(j) for j in range(nd)]
    assert [(r.start, r.stop) for r in rows] == [(cfg.sub_slice(j).start, cfg.sub_slice(j).stop) for j in range(nd)]
    kv = [cfg.sub_kv_rows(j) for j in range(nd)]
    assert kv[-1].stop == getattr(cfg, "n_kv_heads", cfg.n_heads) * cfg.head_dim and kv[0].start == 0


def test_sliced_gqa_keeps_the_teachers_head_groups():
    # SmolLM2: query head h uses K/V head h // 3. Sliced nd = 3: sub-block j owns query heads
    # 3j..3j+2 and K/V head j, which is exactly their shared K/V head.
    cfg = get_config("smollm2-135m", nd=3, nb=6, sub_attn="slice")
    group = cfg.n_heads // cfg.n_kv_heads
    for j in range(3):
        heads = range(cfg.sub_head_rows(j).start // cfg.head_dim, cfg.sub_head_rows(j).stop // cfg.head_dim)
        kv_heads = range(cfg.sub_kv_rows(j).start // cfg.head_dim, cfg.sub_kv_rows(j).stop // cfg.head_dim)
        assert {h // group for h in heads} == set(kv_heads)


@pytest.mark.parametrize("nd,expected", [(2, r"nd in \[1, 3\]"), (4, r"nd in \[1, 3\]"), (9, "n_kv_heads=3")])
def test_sliced_smollm2_needs_nd_dividing_both_head_counts(nd, expected):
    with pytest.raises(ConfigError, match=expected):
        get_config("smollm2-135m", nd=nd, nb=6, sub_attn="slice")
    with pytest.raises(ConfigError, match="sub_attn='full'"):
        get_config("smollm2-135m", nd=nd, nb=6, sub_attn="slice")
    with pytest.raises(ConfigError, match="sub_attn must be"):
        get_config("bert-base", nd=4, nb=2, sub_attn="sliced")


def test_layout_blocks_end_in_coupled_layers():
    cfg = get_config("bert-base", nd=4, nb=4)
    assert cfg.layer_kinds == ("decoupled", "decoupled", "coupled") * 4
    assert cfg.blocks == ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11))
    assert get_config("bert-base").layer_kinds == ("coupled",) * 12


@pytest.mark.parametrize(
    "kwargs,match",
    [({"nd": 5}, "divide d_model"), ({"nd": 4, "nb": 5}, "divisor of n_layers"), ({"nd": 0}, "positive"),
     ({"sub_attn": "slice", "nd": 4}, "n_heads")],
)
def test_bad_configs_raise_typed_errors(kwargs, match):
    name = "smollm2-135m" if kwargs.get("sub_attn") else "bert-base"
    if name == "smollm2-135m":
        kwargs = {**kwargs, "nb": 6}
    with pytest.raises(ConfigError, match=match):
        get_config(name, **kwargs)
    with pytest.raises(ConfigError, match="unknown model"):
        get_config("gpt-17")
    with pytest.raises(ConfigError, match="not a"):
        EncoderConfig.from_name("smollm2-135m")


def _copy_nd1_into_standard(dec, std):
    """Map a decoupled-with-nd=1 state dict onto the standard model's names."""
    sd = {k.replace(".sub_blocks.0.", "."): v for k, v in dec.state_dict().items()}
    std.load_state_dict(sd)


@pytest.mark.parametrize("family", ["tiny-encoder", "tiny-decoder"])
def test_nd1_decoupled_layer_equals_ordinary_layer(family):
    dec = _build(get_config(family, nd=1, nb=2))
    std = _build(get_config(family))
    assert any(isinstance(layer, DecoupledLayer) for layer in dec.layers)
    _copy_nd1_into_standard(dec, std)
    ids = torch.randint(0, dec.cfg.vocab_size, (2, 11))
    torch.testing.assert_close(dec(ids), std(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,nd,sub_attn", [("tiny-encoder", 4, "full"), ("tiny-decoder", 4, "full"),
                                                 ("tiny-encoder", 4, "slice"), ("tiny-decoder", 2, "slice")])
def test_sub_blocks_are_independent_and_concatenate_to_the_layer(family, nd, sub_attn):
    model = _build(get_config(family, nd=nd, nb=2, sub_attn=sub_attn))
    cfg = model.cfg
    layer = model.layers[0]
    assert isinstance(layer, DecoupledLayer)
    h = torch.randn(2, 7, cfg.d_model)
    extra = (None,) if family == "tiny-encoder" else (model.rope(0, 7),)
    whole = layer(h, *extra)
    parts = []
    for j, block in enumerate(layer.sub_blocks):
        x_j = h[..., cfg.sub_slice(j)].clone()
        out_j = block(x_j, *extra)
        # Changing every other slice leaves sub-block j's output unchanged: no cross-talk.
        h2 = h.clone()
        others = torch.ones(cfg.d_model, dtype=torch.bool)
        others[cfg.sub_slice(j)] = False
        h2[..., others] = torch.randn_like(h2[..., others])
        torch.testing.assert_close(layer(h2, *extra)[..., cfg.sub_slice(j)], out_j, rtol=0, atol=1e-6)
        parts.append(out_j)
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nd,nb,sub_attn", [(1, None, "full"), (4, 2, "full"), (2, 4, "full"), (2, 2, "slice")])
def test_kv_cache_decoding_equals_full_recomputation(nd, nb, sub_attn):
    model = _build(get_config("tiny-decoder", nd=nd, nb=nb, sub_attn=sub_attn))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13))
    full = model(ids)
    caches = model.new_caches()
    pieces = [model(ids[:, :5], 0, caches)]  # prefill 5 tokens
    pieces.append(model(ids[:, 5:8], 5, caches))  # a chunk of 3 with a non-empty cache
    for t in range(8, 13):  # then one token at a time
        pieces.append(model(ids[:, t : t + 1], t, caches))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal():
    model = _build(get_config("tiny-decoder", nd=2, nb=2))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 9))
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % model.cfg.vocab_size
    torch.testing.assert_close(model(ids)[:, :6], model(ids2)[:, :6], rtol=0, atol=1e-6)


def test_encoder_padding_does_not_change_real_tokens():
    model = _build(get_config("tiny-encoder", nd=2, nb=2))
    ids = torch.randint(1, 1000, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    a = model.sentence_embedding(ids)
    b = model.sentence_embedding(padded, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(1))


def test_tied_embeddings_survive_construction():
    model = _build(DecoderConfig.from_name("tiny-decoder"))
    assert model.lm_head.weight is model.tok_emb.weight
