"""Conversion of a standard decoder into a decoupled student, distillation and perplexity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import get_config
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.training.convert_decoder import (
    calibrate_norms,
    init_decoder_student,
    load_decoder_student,
    save_decoder_student,
    student_config,
)
from detransformer_edge.training.distil_decoder import (
    DecoderDistilSettings,
    distil_decoder,
    evaluate,
    lr_factor,
    pack_sentences,
    perplexity,
)

torch.set_num_threads(1)


def _teacher() -> Decoder:
    torch.manual_seed(0)
    return Decoder(get_config("tiny-decoder")).eval()


def _ids(seed: int = 1, B: int = 3, T: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (B, T), generator=g)


def test_nd1_student_is_the_teacher() -> None:
    teacher = _teacher()
    cfg = student_config(teacher.cfg, nd=1, nb=2, sub_ffn=teacher.cfg.d_ff)
    assert "decoupled" in cfg.layer_kinds
    student = init_decoder_student(teacher, cfg)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(ids), teacher(ids))


def test_nd2_slices_shapes_and_parameter_parity() -> None:
    teacher = _teacher()
    cfg = student_config(teacher.cfg, nd=2, nb=2)
    student = init_decoder_student(teacher, cfg)
    assert abs(student.num_params() - teacher.num_params()) / teacher.num_params() < 0.01
    T, S = teacher.state_dict(), student.state_dict()
    assert torch.equal(S["tok_emb.weight"], T["tok_emb.weight"])
    assert student.lm_head.weight is student.tok_emb.weight
    assert torch.equal(S["norm.weight"], T["norm.weight"])
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "coupled":
            assert torch.equal(S[f"layers.{i}.ffn.gate.weight"], T[f"layers.{i}.ffn.gate.weight"])
    i = cfg.layer_kinds.index("decoupled")
    s1 = cfg.sub_slice(1)
    pre = f"layers.{i}.sub_blocks.1."
    assert S[pre + "attn.k_proj.weight"].shape == (cfg.n_kv_heads * cfg.head_dim, cfg.d_sub)
    assert torch.equal(S[pre + "attn.q_proj.weight"], T[f"layers.{i}.attn.q_proj.weight"][:, s1])
    assert torch.equal(S[pre + "attn.v_proj.weight"], T[f"layers.{i}.attn.v_proj.weight"][:, s1])
    assert torch.equal(S[pre + "attn.o_proj.weight"], T[f"layers.{i}.attn.o_proj.weight"][s1])
    assert torch.equal(S[pre + "attn_norm.weight"], T[f"layers.{i}.attn_norm.weight"][s1])
    assert S[pre + "ffn.gate.weight"].shape == (cfg.d_ff_sub, cfg.d_sub)
    group = teacher.cfg.d_ff // 2  # sub-block 1 starts with the teacher's second group of units
    n = min(cfg.d_ff_sub, teacher.cfg.d_ff)
    assert torch.equal(S[pre + "ffn.gate.weight"][0], T[f"layers.{i}.ffn.gate.weight"][group, s1])
    assert torch.equal(S[pre + "ffn.up.weight"][0], T[f"layers.{i}.ffn.up.weight"][group, s1])
    assert torch.equal(S[pre + "ffn.down.weight"][:, 0], T[f"layers.{i}.ffn.down.weight"][s1, group])
    if cfg.d_ff_sub > n:  # padded units start silent
        assert not S[pre + "ffn.down.weight"][:, n:].any()
    assert student(_ids()).shape == teacher(_ids()).shape


def test_sliced_gqa_sub_blocks_take_their_heads_and_kv_group() -> None:
    """tiny-decoder: 4 query heads over 2 K/V heads (query h uses K/V h // 2). Sliced nd = 2:
    sub-block j owns query heads 2j, 2j+1 and K/V head j. With the teacher's attention made
    block-diagonal, each sub-block's attention (RoPE, causal mask, GQA) equals the teacher's on
    its slice, which fails if a sub-block took another group's K/V rows."""
    from tests.test_convert import _block_diagonal_attention

    teacher = _teacher()
    cfg = student_config(teacher.cfg, nd=2, nb=2, sub_attn="slice")
    assert (cfg.sub_heads, cfg.sub_kv_heads) == (2, 1)
    i = cfg.layer_kinds.index("decoupled")
    _block_diagonal_attention(teacher.layers[i], cfg)
    student = init_decoder_student(teacher, cfg)
    S, T = student.state_dict(), teacher.state_dict()
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.k_proj.weight"],
                       T[f"layers.{i}.attn.k_proj.weight"][cfg.head_dim : 2 * cfg.head_dim, cfg.sub_slice(1)])
    x = torch.randn(2, 10, cfg.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for start in (0, 5):  # RoPE at later positions too
            rope = teacher.rope(start, 10)
            ref = teacher.layers[i].attn(x, rope=rope)
            for j, block in enumerate(student.layers[i].sub_blocks):
                torch.testing.assert_close(block.attn(x[..., cfg.sub_slice(j)], rope=rope),
                                           ref[..., cfg.sub_slice(j)], rtol=1e-5, atol=1e-6)
    assert abs(student.num_params() - teacher.num_params()) / teacher.num_params() < 0.01


def test_sliced_nd1_decoder_student_is_the_teacher() -> None:
    teacher = _teacher()
    student = init_decoder_student(teacher, student_config(teacher.cfg, nd=1, nb=2, sub_attn="slice"))
    with torch.no_grad():
        assert torch.equal(student(_ids()), teacher(_ids()))


def test_bad_inputs_raise_config_error() -> None:
    teacher = _teacher()
    with pytest.raises(ConfigError):
        init_decoder_student(teacher, get_config("smollm2-135m", nd=2, nb=5))  # other shape
    with pytest.raises(ConfigError):
        init_decoder_student(Encoder(get_config("tiny-encoder")), student_config(teacher.cfg, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        init_decoder_student(teacher, get_config("tiny-encoder", nd=2, nb=2))  # type: ignore[arg-type]
    decoupled = init_decoder_student(teacher, student_config(teacher.cfg, 2, 2))
    with pytest.raises(ConfigError):
        init_decoder_student(decoupled, student_config(teacher.cfg, 2, 2))
    with pytest.raises(ConfigError):
        student_config(teacher.cfg, nd=3, nb=2)  # 3 does not divide 64
    with pytest.raises(ConfigError):
        student_config(get_config("tiny-encoder"), nd=2, nb=2)  # type: ignore[arg-type]


def test_perplexity_is_exp_mean_nll() -> None:
    teacher = _teacher()
    seqs = _ids(seed=5, B=5, T=9)
    with torch.no_grad():
        logits = teacher(seqs)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, 512), seqs[:, 1:].reshape(-1))
    assert perplexity(teacher, seqs, batch_size=2) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    r = evaluate(teacher, seqs, batch_size=3, reference_top1=logits.argmax(-1))
    assert r["agreement"] == 1.0
    assert r["tokens"] == 5 * 8


class _Tok:
    """Word-hash tokenizer with the backend interface pack_sentences uses."""

    eos_id = 2

    class _Enc:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    class backend:
        @staticmethod
        def encode_batch(texts: list[str], add_special_tokens: bool = False) -> list:
            return [_Tok._Enc([sum(map(ord, w)) % 500 + 10 for w in t.split()]) for t in texts]


SENTENCES = [f"the quick brown fox number {i} jumps over {i % 7} lazy dogs today" for i in range(80)]


def test_pack_sentences() -> None:
    seqs = pack_sentences(SENTENCES, _Tok, seq_len=16, seed=None)
    assert seqs.shape[1] == 16
    flat = seqs.flatten().tolist()
    assert flat[12] == 2 and flat[:12].count(2) == 0  # the first sentence has 12 words, then EOS
    assert pack_sentences(SENTENCES, _Tok, 16, seed=3, max_tokens=40).shape == (2, 16)
    with pytest.raises(ConfigError):
        pack_sentences(SENTENCES[:1], _Tok, seq_len=64)


def test_lr_schedule() -> None:
    s = DecoderDistilSettings(steps=100, warmup=10)
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(100, s) == pytest.approx(s.min_lr_fraction)
    assert lr_factor(20, s, time_fraction=1.0) == pytest.approx(s.min_lr_fraction)


def _settings(**kw: object) -> DecoderDistilSettings:
    base = DecoderDistilSettings(steps=24, batch_size=4, seq_len=16, lr=2e-3, warmup=3, checkpoint_every=8)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_distillation_reduces_the_loss_and_saves(tmp_path) -> None:
    teacher = _teacher()
    seqs = pack_sentences(SENTENCES, _Tok, seq_len=16)
    student = init_decoder_student(teacher, student_config(teacher.cfg, 2, 2))
    result = distil_decoder(student, teacher, seqs, _settings(), progress=False)
    assert len(result.losses) == 24 and result.stopped_by == "steps"
    assert sum(result.losses[-4:]) < sum(result.losses[:4])
    save_decoder_student(student, tmp_path)
    again = load_decoder_student(tmp_path)
    ids = seqs[:2]
    with torch.no_grad():
        torch.testing.assert_close(again(ids), student(ids))


def test_resume_equals_uninterrupted(tmp_path) -> None:
    teacher = _teacher()
    seqs = pack_sentences(SENTENCES, _Tok, seq_len=16)
    cfg = student_config(teacher.cfg, 2, 2)
    straight = init_decoder_student(teacher, cfg)
    distil_decoder(straight, teacher, seqs, _settings(), progress=False)
    resumed = init_decoder_student(teacher, cfg)
    distil_decoder(resumed, teacher, seqs, _settings(), tmp_path, progress=False, stop_at=13)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = init_decoder_student(teacher, cfg)  # a fresh process: starts from the checkpoint
    r = distil_decoder(resumed, teacher, seqs, _settings(), tmp_path, progress=False)
    assert r.step == 24 and r.steps_this_call == 11
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_deadline_stops_at_a_step_boundary(tmp_path) -> None:
    import time

    teacher = _teacher()
    seqs = pack_sentences(SENTENCES, _Tok, seq_len=16)
    student = init_decoder_student(teacher, student_config(teacher.cfg, 2, 2))
    r = distil_decoder(student, teacher, seqs, _settings(steps=10_000), tmp_path, progress=False,
                       deadline=time.monotonic() + 1.0)
    assert r.stopped_by == "time" and 0 < r.step < 10_000
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == r.step


@pytest.mark.slow
def test_smollm2_nd2_student_builds_and_trains() -> None:
    from detransformer_edge.weights.loaders import load_model

    try:
        loaded = load_model("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 - weights not installed on this machine
        pytest.skip(f"SmolLM2 weights unavailable: {exc}")
    teacher = loaded.model.float().eval()
    cfg = student_config(teacher.cfg, nd=2, nb=5)
    student = init_decoder_student(teacher, cfg)
    assert abs(student.num_params() - teacher.num_params()) / teacher.num_params() < 0.01
    seqs = pack_sentences(SENTENCES * 2, loaded.tokenizer, seq_len=32)
    settings = DecoderDistilSettings(steps=2, batch_size=2, seq_len=32, lr=1e-4, warmup=1)
    r = distil_decoder(student, teacher, seqs, settings, progress=False)
    assert r.step == 2 and all(math.isfinite(x) for x in r.losses)


def test_norm_calibration() -> None:
    teacher = _teacher()
    ids = _ids(B=4, T=16)
    one = init_decoder_student(teacher, student_config(teacher.cfg, nd=1, nb=2, sub_ffn=teacher.cfg.d_ff))
    factors = calibrate_norms(one, teacher, ids)
    assert factors and all(f == pytest.approx(1.0) for f in factors.values())
    cfg = student_config(teacher.cfg, nd=2, nb=2)
    student = init_decoder_student(teacher, cfg)
    i = cfg.layer_kinds.index("decoupled")
    before = student.layers[i].sub_blocks[1].ffn_norm.weight.clone()
    factors = calibrate_norms(student, teacher, ids)
    f = factors[f"layers.{i}.sub_blocks.1.ffn_norm"]
    torch.testing.assert_close(student.layers[i].sub_blocks[1].ffn_norm.weight, before * f)
    assert len(factors) == 2 * 2 * cfg.layer_kinds.count("decoupled")
