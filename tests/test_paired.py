"""The paired (standard vs decoupled) language-model experiment, at toy scale."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from detransformer_edge.errors import ConfigError
from detransformer_edge.training import lm, paired, token_data
from detransformer_edge.training.corpus import Corpus

TINY = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=128, max_position=64)
SETTINGS = lm.LMSettings(steps=8, batch_size=4, seq_len=32, lr=3e-3, val_tokens=1024, curve_tokens=256,
                             eval_batch_size=8, checkpoint_every=100)

_ADJ = "small red quiet bright old warm green heavy".split()
_NOUN = "lamp door window kettle heater garden kitchen sensor".split()
_VERB = "opens closes watches heats lights moves checks follows".split()


def _sentences(n: int, seed: int) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(
        f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_NOUN)} "
        f"near the {rng.choice(_ADJ)} {rng.choice(_NOUN)}."
        for _ in range(n)
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("paired-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(token_data, "CACHE_DIR", cache)
        corpus = Corpus(_sentences(600, 0), _sentences(80, 1))
        data = token_data.load_token_data(corpus, vocab_size=320)
        yield corpus, data


def _cfg(data, name="std"):
    return paired.model_configs([name], data.vocab_size, **TINY)[name]


def test_parameter_parity_of_the_real_preset():
    configs = paired.model_configs(paired.MODEL_NAMES)
    counts = paired.check_parity(configs)
    std = counts["std"]
    assert 10_000_000 <= std <= 20_000_000
    for name in paired.MODEL_NAMES[1:]:
        assert configs[name].is_decoupled
        assert abs(counts[name] - std) / std <= 0.01, name
    assert configs["nd4nb2"].layer_kinds == ("decoupled",) * 3 + ("coupled",) + ("decoupled",) * 3 + ("coupled",)


def test_tokenizer_is_deterministic_and_cached(tiny, tmp_path):
    corpus, data = tiny
    assert data.vocab_size == 320
    a, b = token_data.train_tokenizer(corpus.train, 320), token_data.train_tokenizer(corpus.train, 320)
    a.save(str(tmp_path / "a.json"))
    b.save(str(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.token_to_id(token_data.EOS) == 0
    # an explicit file gives exactly the same ids
    again = token_data.load_token_data(corpus, data.tokenizer_path, cache=False)
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
    assert int((data.train == data.eos_id).sum()) == len(corpus.train)


def test_batches_are_deterministic_and_indexable(tiny):
    _, data = tiny
    a = token_data.Batches(data.train, 32, 4, seed=3)
    b = token_data.Batches(data.train, 32, 4, seed=3)
    for step in (0, 5, a.per_epoch, a.per_epoch + 2, 1):  # includes the next epoch
        xa, ya = a.get(step)
        xb, yb = b.get(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 32) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(a.get(0)[0], token_data.Batches(data.train, 32, 4, seed=4).get(0)[0])


@pytest.mark.slow
def test_training_loss_decreases(tiny):
    _, data = tiny
    settings = dataclasses.replace(SETTINGS, steps=40)
    model = lm.build_model(_cfg(data, "nd2nb2"), 0)
    run = lm.train_lm(model, data, settings, progress=False)
    losses = run["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert [c["step"] for c in run["curve"]] == [8, 16, 24, 32, 40]
    assert run["curve"][-1]["ppl"] < run["curve"][0]["ppl"]


def test_same_seed_same_losses(tiny):
    _, data = tiny
    runs = [lm.train_lm(lm.build_model(_cfg(data, "nd2nb2"), 7), data, SETTINGS, progress=False)
            for _ in range(2)]
    assert runs[0]["losses"] == runs[1]["losses"]


def test_resume_equals_uninterrupted_run(tiny, tmp_path):
    _, data = tiny
    cfg = _cfg(data, "nd4nb2")
    whole = lm.build_model(cfg, 0)
    ref = lm.train_lm(whole, data, SETTINGS, tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    first = lm.train_lm(lm.build_model(cfg, 0), data, SETTINGS, tmp_path / "b", progress=False,
                            stop_after=3)
    assert first["step"] == 3 and (tmp_path / "b" / "checkpoint.pt").exists()
    resumed_model = lm.build_model(cfg, 123)  # different init: everything must come from the checkpoint
    resumed = lm.train_lm(resumed_model, data, SETTINGS, tmp_path / "b", progress=False)
    assert resumed["losses"] == ref["losses"]
    assert resumed["curve"] == ref["curve"]
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_refuses_other_settings(tiny, tmp_path):
    _, data = tiny
    cfg = _cfg(data)
    lm.train_lm(lm.build_model(cfg, 0), data, SETTINGS, tmp_path, progress=False, stop_after=1)
    other = dataclasses.replace(SETTINGS, lr=1e-4)
    with pytest.raises(ConfigError, match="other settings"):
        lm.train_lm(lm.build_model(cfg, 0), data, other, tmp_path, progress=False)


def test_perplexity_is_exp_of_mean_nll(tiny):
    _, data = tiny
    model = lm.build_model(_cfg(data), 0)
    x, y = token_data.validation_set(data, 32, 320)
    assert x.shape == (10, 32)
    got = lm.evaluate(model, x, y, batch_size=3)  # uneven last batch
    with torch.no_grad():
        logp = torch.log_softmax(model(x).double(), dim=-1)
    nll = -logp.gather(-1, y[..., None]).mean().item()
    assert got["tokens"] == 320
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    # an untrained model is close to uniform over the vocabulary
    assert got["ppl"] == pytest.approx(data.vocab_size, rel=0.2)


def test_wire_precision(tiny):
    _, data = tiny
    model = lm.build_model(_cfg(data, "nd2nb2"), 0)
    lm.train_lm(model, data, dataclasses.replace(SETTINGS, steps=20),
                    progress=False)
    assert lm.wire_layers(model) == [1, 3]
    x, y = token_data.validation_set(data, 32, 1024)
    plain = lm.evaluate(model, x, y)["ppl"]
    f4 = lm.evaluate(model, x, y, wire="float32")["ppl"]
    f2 = lm.evaluate(model, x, y, wire="float16")["ppl"]
    i8 = lm.evaluate(model, x, y, wire="int8")["ppl"]
    assert f4 == plain
    assert i8 != plain and abs(i8 / plain - 1) < 0.02
    assert abs(f2 / plain - 1) < 1e-3
    # the hooks are gone afterwards
    assert lm.evaluate(model, x, y)["ppl"] == plain
    with pytest.raises(ConfigError):
        with lm.decoder_wire_rounding(model, "<f8"):
            pass


def test_standard_model_has_no_wire_points(tiny):
    _, data = tiny
    assert lm.wire_layers(lm.build_model(_cfg(data), 0)) == []


def test_bad_arguments_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        paired.parse_only("std,foo")
    with pytest.raises(ConfigError, match="nd=5 must divide d_model=384"):
        paired.model_configs(["nd5nb2"])
    with pytest.raises(ConfigError, match="nb=3"):
        paired.model_configs(["nd2nb3"])
    with pytest.raises(ConfigError):
        paired.parse_only(",")
    with pytest.raises(ConfigError, match="steps"):
        lm.LMSettings(steps=0)
    with pytest.raises(ConfigError, match="no such file"):
        token_data.get_tokenizer(Corpus(("a b c d e.",), ()), tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError):
        token_data.get_tokenizer(Corpus(("a b c d e.",), ()), bad)
    with pytest.raises(ConfigError, match="cuda or|cpu or cuda"):
        paired.run_paired(tmp_path, "std", device="tpu", corpus=Corpus((), ()))


def test_cli_reports_bad_only(tmp_path, capsys):
    from detransformer_edge.cli import main

    assert main(["train-lm", "--out", str(tmp_path), "--only", "nd5nb2"]) == 1
    assert "nd=5 must divide d_model=384" in capsys.readouterr().err
    assert main(["train-lm", "--out", str(tmp_path), "--only", "bogus"]) == 1


@pytest.mark.slow
def test_run_paired_writes_and_merges_reports(tiny, tmp_path, monkeypatch, capsys):
    corpus, data = tiny
    monkeypatch.setattr(token_data, "CACHE_DIR", __import__("pathlib").Path(data.tokenizer_path).parent)
    settings = dataclasses.replace(SETTINGS, steps=4)
    kw = dict(settings=settings, corpus=corpus, vocab_size=320, model_overrides=TINY, progress=False)
    paired.run_paired(tmp_path, "std", **kw)
    report = paired.run_paired(tmp_path, "nd2nb2", save_weights=False, **kw)  # merged with std
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"std", "nd2nb2"}
    assert rows["nd2nb2"]["ppl_ratio"] == pytest.approx(rows["nd2nb2"]["val_ppl"] / rows["std"]["val_ppl"])
    assert set(rows["nd2nb2"]["wire_ppl"]) == {"float32", "float16", "int8"} and rows["std"]["wire_ppl"] == {}
    assert (tmp_path / "std" / "model.safetensors").exists()
    assert not (tmp_path / "nd2nb2" / "model.safetensors").exists()
    assert not (tmp_path / "std" / "checkpoint.pt").exists()
    on_disk = json.loads((tmp_path / "paired.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    md = (tmp_path / "paired.md").read_text()
    assert "| nd2nb2 | 2 | 2 |" in md and "| std | 1 | - |" in md
    capsys.readouterr()
    paired.run_paired(tmp_path, "std", **kw)  # already trained: not again
    assert "already trained" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="other settings"):
        paired.run_paired(tmp_path, "std", **{**kw, "settings": dataclasses.replace(settings, steps=5)})


@pytest.mark.slow
def test_import_pulls_in_no_service_modules():
    code = ("import sys, detransformer_edge.training.paired; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('aiomqtt', 'aiohttp', 'zeroconf', 'paho', "
            "'amqtt', 'msgpack', 'gguf', 'transformers')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home"})
    assert out.stdout.strip() == "[]"


def test_cross_entropy_matches_training_loss_definition(tiny):
    """The training loss is the same per-token NLL the validation perplexity averages."""
    _, data = tiny
    model = lm.build_model(_cfg(data), 0)
    x, y = token_data.Batches(data.train, 32, 4, 0).get(0)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).reshape(-1, data.vocab_size), y.reshape(-1)).item()
    assert lm.evaluate(model, x, y)["nll"] == pytest.approx(loss, rel=1e-5)
