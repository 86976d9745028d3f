"""Conversion of a standard encoder into a decoupled student, and distillation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detransformer_edge.model.config import get_config
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.training.convert import (
    DistilSettings,
    distil,
    init_student,
    load_student,
    save_student,
)
from detransformer_edge.training.corpus import is_sentence, split_sentences

torch.set_num_threads(1)


def _teacher() -> Encoder:
    torch.manual_seed(0)
    return Encoder(get_config("tiny-encoder")).eval()


def _ids(seed: int = 1, B: int = 3, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 7:] = 0
    return ids, mask


def test_nd1_student_is_the_teacher() -> None:
    teacher = _teacher()
    cfg = get_config("tiny-encoder", nd=1, nb=2, sub_ffn=teacher.cfg.d_ff)
    student = init_student(teacher, cfg)
    ids, mask = _ids()
    torch.testing.assert_close(student(ids, mask), teacher(ids, mask), atol=1e-5, rtol=1e-5)


def test_sub_blocks_take_their_slices_and_coupled_layers_are_copied() -> None:
    teacher = _teacher()
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    student = init_student(teacher, cfg)
    T, S = teacher.state_dict(), student.state_dict()
    assert torch.equal(S["embeddings.word.weight"], T["embeddings.word.weight"])
    coupled = [i for i, k in enumerate(cfg.layer_kinds) if k == "coupled"]
    for i in coupled:
        assert torch.equal(S[f"layers.{i}.ffn.up.weight"], T[f"layers.{i}.ffn.up.weight"])
    i = cfg.layer_kinds.index("decoupled")
    s1 = cfg.sub_slice(1)
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.q_proj.weight"], T[f"layers.{i}.attn.q_proj.weight"][:, s1])
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.o_proj.weight"], T[f"layers.{i}.attn.o_proj.weight"][s1])
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.ffn_norm.bias"], T[f"layers.{i}.ffn_norm.bias"][s1])
    # sub-block 1's FFN starts with the teacher's second group of intermediate units
    group = teacher.cfg.d_ff // 2
    up = S[f"layers.{i}.sub_blocks.1.ffn.up.weight"]
    assert torch.equal(up[0], T[f"layers.{i}.ffn.up.weight"][group, s1])
    # the student's first layer sees exactly the teacher's embeddings: its first sub-block on a
    # one-hot-sliced input agrees with the teacher when the other slice is zero
    ids, mask = _ids()
    assert student(ids, mask).shape == teacher(ids, mask).shape


def _fake_tokenize(texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[101] + [hash(w) % 900 + 50 for w in t.split()][: max_len - 2] + [102] for t in texts]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


SENTENCES = [f"the quick brown fox number {i} jumps over {i % 7} lazy dogs today" for i in range(64)]


def test_distillation_reduces_the_loss_and_resumes(tmp_path) -> None:
    teacher = _teacher()
    student = init_student(teacher, get_config("tiny-encoder", nd=2, nb=2))
    settings = DistilSettings(steps=30, batch_size=8, max_len=16, lr=2e-3, warmup=3, checkpoint_every=10)
    losses = distil(student, teacher, SENTENCES, _fake_tokenize, settings, tmp_path, progress=False)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (tmp_path / "checkpoint.pt").exists()
    # a longer run in the same directory resumes at step 30
    more = distil(student, teacher, SENTENCES, _fake_tokenize, dataclasses.replace(settings, steps=33), tmp_path,
                  progress=False)
    assert len(more) == 3
    save_student(student, tmp_path)
    again = load_student(tmp_path)
    ids, mask = _ids()
    torch.testing.assert_close(again(ids, mask), student(ids, mask))


def _block_diagonal_attention(layer: torch.nn.Module, cfg) -> None:
    """Zero every Q/K/V/O entry linking one sub-block's heads to another sub-block's slice, so
    the teacher's attention is exactly what sliced sub-blocks can compute."""
    keep_q = torch.zeros(cfg.n_heads * cfg.head_dim, cfg.d_model, dtype=torch.bool)
    n_kv = getattr(cfg, "n_kv_heads", cfg.n_heads)
    keep_kv = torch.zeros(n_kv * cfg.head_dim, cfg.d_model, dtype=torch.bool)
    for j in range(cfg.nd):
        keep_q[cfg.sub_head_rows(j), cfg.sub_slice(j)] = True
        keep_kv[cfg.sub_kv_rows(j), cfg.sub_slice(j)] = True
    with torch.no_grad():
        layer.attn.q_proj.weight.mul_(keep_q)
        layer.attn.k_proj.weight.mul_(keep_kv)
        layer.attn.v_proj.weight.mul_(keep_kv)
        layer.attn.o_proj.weight.mul_(keep_q.T)


@pytest.mark.parametrize("nd", [2, 4])
def test_sliced_sub_blocks_take_their_own_heads(nd: int) -> None:
    teacher = _teacher()
    cfg = get_config("tiny-encoder", nd=nd, nb=2, sub_attn="slice")
    i = cfg.layer_kinds.index("decoupled")
    _block_diagonal_attention(teacher.layers[i], cfg)
    student = init_student(teacher, cfg)
    T, S = teacher.state_dict(), student.state_dict()
    r1, s1 = cfg.sub_head_rows(1), cfg.sub_slice(1)
    assert r1 != s1 or cfg.sub_heads * cfg.head_dim == cfg.d_sub
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.q_proj.weight"], T[f"layers.{i}.attn.q_proj.weight"][r1, s1])
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.k_proj.bias"], T[f"layers.{i}.attn.k_proj.bias"][r1])
    assert torch.equal(S[f"layers.{i}.sub_blocks.1.attn.o_proj.weight"], T[f"layers.{i}.attn.o_proj.weight"][s1, r1])
    # all teacher FFN units kept (I' > d_ff when sliced), the extra ones silent
    assert cfg.d_ff_sub > teacher.cfg.d_ff
    assert not S[f"layers.{i}.sub_blocks.1.ffn.down.weight"][:, teacher.cfg.d_ff:].any()
    # with block-diagonal attention, each sub-block's attention is exactly the teacher's on its slice
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    with torch.no_grad():
        ref = teacher.layers[i].attn(x, mask)
        for j, block in enumerate(student.layers[i].sub_blocks):
            torch.testing.assert_close(block.attn(x[..., cfg.sub_slice(j)], mask), ref[..., cfg.sub_slice(j)],
                                       rtol=1e-5, atol=1e-6)


def test_sliced_nd1_student_is_the_teacher() -> None:
    teacher = _teacher()
    cfg = get_config("tiny-encoder", nd=1, nb=2, sub_attn="slice")
    assert cfg.d_ff_sub == teacher.cfg.d_ff  # I' = I + 2d(1 - 1/nd) = I
    ids, mask = _ids()
    torch.testing.assert_close(init_student(teacher, cfg)(ids, mask), teacher(ids, mask), atol=1e-5, rtol=1e-5)


def test_resuming_another_layout_is_a_config_error(tmp_path) -> None:
    from detransformer_edge.errors import ConfigError

    teacher = _teacher()
    settings = DistilSettings(steps=2, batch_size=8, max_len=16, warmup=1, checkpoint_every=1)
    full = init_student(teacher, get_config("tiny-encoder", nd=2, nb=2))
    distil(full, teacher, SENTENCES, _fake_tokenize, settings, tmp_path, progress=False)
    sliced = init_student(teacher, get_config("tiny-encoder", nd=2, nb=2, sub_attn="slice"))
    with pytest.raises(ConfigError, match="sub_attn.*use another --out"):
        distil(sliced, teacher, SENTENCES, _fake_tokenize, dataclasses.replace(settings, steps=4), tmp_path,
               progress=False)
    # a checkpoint without the layout record (written before it existed) still fails typed
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["layout"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        distil(sliced, teacher, SENTENCES, _fake_tokenize, dataclasses.replace(settings, steps=4), tmp_path,
               progress=False)


def test_init_rejects_a_mismatched_student() -> None:
    from detransformer_edge.errors import ConfigError

    with pytest.raises(ConfigError):
        init_student(_teacher(), get_config("minilm-l6", nd=4, nb=2))


def test_corpus_keeps_prose_only() -> None:
    text = "This is a real sentence about files. It has two parts, both short!\n\n>>> print(x)\nfoo_bar(1, 2)\n"
    assert split_sentences(text) == ["This is a real sentence about files.", "It has two parts, both short!"]
    assert not is_sentence("a = b + c * d / e")


def test_every_recipe_option_trains_and_nd1_loss_is_zero() -> None:
    """Each hidden-state loss / target / block-local choice lowers the loss; an exact student
    (nd = 1 copy of the teacher) has zero loss under every choice."""
    from detransformer_edge.training.convert import distillation_loss, teacher_states

    teacher = _teacher()
    ids, mask = _ids()
    with torch.no_grad():
        states = teacher_states(teacher, ids, mask)
    exact = init_student(teacher, get_config("tiny-encoder", nd=1, nb=2, sub_ffn=teacher.cfg.d_ff))
    exact.requires_grad_(False)
    for targets in ("blocks", "layers"):
        for hidden in ("mse", "cos"):
            s = DistilSettings(targets=targets, hidden_loss=hidden)
            for local in (False, True):
                assert float(distillation_loss(exact, states, ids, mask, s, local=local)) < 1e-5
    for kw in ({"targets": "layers", "hidden_loss": "cos"}, {"targets": "blocks", "hidden_loss": "mse"},
               {"targets": "layers", "hidden_loss": "cos", "local_frac": 0.5}):
        student = init_student(teacher, get_config("tiny-encoder", nd=2, nb=2))
        settings = DistilSettings(steps=30, batch_size=8, max_len=16, lr=2e-3, warmup=3, **kw)
        losses = distil(student, teacher, SENTENCES, _fake_tokenize, settings, None, progress=False)
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, kw


def test_block_local_loss_starts_each_block_from_the_teacher() -> None:
    """With local=True a student whose first block is wrong still matches in its second block
    when that block equals the teacher's; end-to-end, the first block's error carries over."""
    from detransformer_edge.training.convert import distillation_loss, teacher_states

    teacher = _teacher()
    cfg = get_config("tiny-encoder", nd=1, nb=2, sub_ffn=teacher.cfg.d_ff)
    student = init_student(teacher, cfg)
    with torch.no_grad():  # spoil block 0 (layers 0 and 1) only
        for p in student.layers[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    ids, mask = _ids()
    with torch.no_grad():
        states = teacher_states(teacher, ids, mask)
    s = DistilSettings(targets="blocks", hidden_loss="mse", cos_weight=0.0)
    with torch.no_grad():
        e2e = float(distillation_loss(student, states, ids, mask, s, local=False))
        local = float(distillation_loss(student, states, ids, mask, s, local=True))
    assert local < e2e
    assert local > 0  # block 0 is still wrong


@pytest.mark.parametrize("bad", [{"targets": "all"}, {"hidden_loss": "l1"}, {"local_frac": 1.5}, {"batch_size": 0}])
def test_bad_distil_settings_raise(bad: dict) -> None:
    from detransformer_edge.errors import ConfigError

    with pytest.raises(ConfigError):
        DistilSettings(**bad)


def test_corpus_file_round_trip_and_override(tmp_path, monkeypatch) -> None:
    import gzip

    from detransformer_edge.errors import ConfigError
    from detransformer_edge.training.corpus import (
        CORPUS_FILE_ENV,
        Corpus,
        export_corpus,
        load_corpus,
        read_corpus_file,
    )

    corpus = Corpus(("One train sentence here.", "Another train sentence."), ("A held-out sentence.",))
    path = export_corpus(corpus, tmp_path / "c.json.gz")
    again = read_corpus_file(path)
    assert again == corpus and again.fingerprint == corpus.fingerprint
    monkeypatch.setenv(CORPUS_FILE_ENV, str(path))
    assert load_corpus() == corpus
    assert load_corpus(max_sentences=1).train == corpus.train[:1]
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ConfigError):
        read_corpus_file(bad)
    with gzip.open(bad, "wt") as fh:  # damaged: the text no longer matches its fingerprint
        fh.write('{"train": ["x"], "held_out": [], "fingerprint": "0000"}')
    with pytest.raises(ConfigError, match="fingerprint"):
        read_corpus_file(bad)


def test_convert_command_passes_the_sub_block_layout(monkeypatch, tmp_path) -> None:
    import argparse

    from detransformer_edge.commands import convert as cmd
    from detransformer_edge.training import convert as enc
    from detransformer_edge.training import convert_decoder as dec

    seen: dict[str, object] = {}

    def fake(source, nd, nb, out, settings, device="cpu", sub_attn="full", **_):
        seen.update(source=source, nd=nd, nb=nb, sub_attn=sub_attn)
        return {"cosine_after": 0.5, "cosine_init": 0.3, "seconds": 1.0, "ppl_after": 2.0, "ppl_teacher": 1.0,
                "ppl_init": 9.0, "ppl_ratio": 2.0, "agreement_after": 0.5, "steps": 1, "stopped_by": "steps"}

    monkeypatch.setattr(enc, "convert_and_distil", fake)
    monkeypatch.setattr(dec, "convert_decoder_and_distil", fake)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert cmd.run(p.parse_args(["--out", str(tmp_path), "--sub-attn", "slice", "--device", "cpu"])) == 0
    assert seen == {"source": "minilm-l6", "nd": 4, "nb": 2, "sub_attn": "slice"}
    args = p.parse_args(["--from", "smollm2-135m", "--nd", "3", "--nb", "5", "--sub-attn", "slice", "--out",
                         str(tmp_path), "--device", "cpu"])
    assert cmd.run(args) == 0 and seen == {"source": "smollm2-135m", "nd": 3, "nb": 5, "sub_attn": "slice"}
    assert p.parse_args(["--out", str(tmp_path)]).sub_attn == "full"
