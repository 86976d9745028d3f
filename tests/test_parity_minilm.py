"""all-MiniLM-L6-v2: our loader + Encoder against transformers' BertModel loaded from the same
safetensors directory, with sentence-transformers' pooling (mean over the mask, L2 normalise)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="test dependency: pip install -e '.[test]'")

from detransformer_edge.weights.loaders import load_model  # noqa: E402
from detransformer_edge.weights.sources import weights_path  # noqa: E402

pytestmark = pytest.mark.slow

SENTENCES = [
    "Turn on the kitchen lights.",
    "What's the weather like tomorrow in Berlin?",
    "Set a timer for ten minutes",
    "play some jazz in the living room",
    "Is the front door locked?",
    "Remind me to call mum at 6 pm.",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "How many tablespoons are in a cup?",
    "Dim the bedroom lamp to 30 percent and close the blinds, please.",
    "Wie spät ist es?",
    "¿Dónde está la estación de tren?",
    "naïve café résumé — accents and dashes",
    "東京の天気は？",
    "I ❤️ my smart home 🏠",
    "   leading and trailing whitespace   ",
    "Numbers: 3.14159, 42, 1e-12 and 2024-11-26",
    "Temperature in the greenhouse dropped below 5°C overnight; turn the heater on.",
    "Transformers split a layer into sub-blocks so devices compute them in parallel "
    "without communication, synchronising only at the coupled layer of each block.",
    "ok",
]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ours():
    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def reference():
    model_dir = weights_path("minilm-l6").parent
    model = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def reference_embeddings(reference, sentences: list[str]) -> torch.Tensor:
    model, tokenizer = reference
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (B, T, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def test_tokenizer_matches_reference(ours, reference) -> None:
    _, tokenizer = reference
    for sentence in SENTENCES:
        assert ours.tokenizer.encode(sentence) == tokenizer(sentence)["input_ids"], sentence


def test_long_text_is_truncated_like_sentence_transformers(ours, reference) -> None:
    """all-MiniLM-L6-v2 reads at most 256 tokens (sentence_bert_config.json max_seq_length)."""
    text = "the lights in the kitchen " * 100
    ids = ours.tokenizer.encode(text)
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102
    assert ids == reference[1](text, truncation=True, max_length=256)["input_ids"]


def test_weights_match_reference(ours, reference) -> None:
    hf = reference[0].state_dict()
    sd = ours.model.state_dict()
    assert torch.equal(sd["embeddings.word.weight"], hf["embeddings.word_embeddings.weight"])
    assert torch.equal(sd["layers.5.ffn.down.bias"], hf["encoder.layer.5.output.dense.bias"])
    assert torch.equal(sd["layers.3.attn_norm.weight"], hf["encoder.layer.3.attention.output.LayerNorm.weight"])


def test_sentence_embeddings_match_reference(ours, reference) -> None:
    batch = ours.tokenizer.encode_batch(SENTENCES)
    with torch.inference_mode():
        emb = ours.model.sentence_embedding(
            torch.tensor(batch.input_ids), torch.tensor(batch.attention_mask)
        )  # (20, 384), padded batch
    expected = reference_embeddings(reference, SENTENCES)
    cosine = (emb * expected).sum(dim=1)
    assert emb.shape == (len(SENTENCES), 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert cosine.min() >= 0.9999, f"lowest cosine {cosine.min():.6f} for {SENTENCES[int(cosine.argmin())]!r}"


def test_padding_does_not_change_embeddings(ours) -> None:
    """A sentence embedded alone equals the same sentence inside a padded batch."""
    alone = ours.tokenizer.encode_batch(["ok"])
    batch = ours.tokenizer.encode_batch(["ok", SENTENCES[-2]])
    with torch.inference_mode():
        a = ours.model.sentence_embedding(torch.tensor(alone.input_ids), torch.tensor(alone.attention_mask))
        b = ours.model.sentence_embedding(torch.tensor(batch.input_ids), torch.tensor(batch.attention_mask))
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_semantics_sanity(ours) -> None:
    """Paraphrases are closer than unrelated sentences (the model is really the trained one)."""
    texts = ["Turn on the kitchen lights.", "Switch the lights in the kitchen on.", "What is the capital of France?"]
    batch = ours.tokenizer.encode_batch(texts)
    with torch.inference_mode():
        e = ours.model.sentence_embedding(torch.tensor(batch.input_ids), torch.tensor(batch.attention_mask))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
