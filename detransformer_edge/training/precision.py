"""Wire precision of activations: what rounding hidden states for the network costs in accuracy.

Activations cross the network at every synchronisation point of a decoupled model: the input of
each coupled layer (sub-block outputs all-gathered) and the final hidden states (sent to the
leader). ``wire_rounding(encoder, dtype)`` simulates a wire dtype at exactly those points, with
forward hooks, so the model code stays untouched; the rounding is the wire's own
(``transport.wire.round_trip``: the quantiser the collectives use), and the dtype names are the
one vocabulary of ``transport.wire.WireDtype`` (``float32``, ``float16``, ``int8`` with per-row
float32 scales). What the measurements allow each task is read by the planner from
``planner/accuracy.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from detransformer_edge.errors import ConfigError
from detransformer_edge.model.encoder import Encoder

WIRE_DTYPES = ("float32", "float16", "int8")  # transport.wire.WireDtype, cheapest last


def round_trip(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """What arrives after sending ``x`` as ``dtype`` (returned in x's dtype and shape)."""
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"unknown wire dtype {dtype!r}; known: {', '.join(WIRE_DTYPES)}")
    if dtype == "float32":
        return x
    # imported here: the paired experiment also runs where only torch is installed (bench/gpu)
    from detransformer_edge.transport.wire import round_trip as wire_round_trip

    out = torch.from_numpy(wire_round_trip(x.detach(), dtype))  # type: ignore[arg-type]
    return out.to(device=x.device, dtype=x.dtype)


def wire_points(encoder: Encoder) -> list[int]:
    """Layers whose input crosses the wire (the coupled layers of a decoupled model, or the block
    boundaries a standard model would have with the same nb), plus -1 for the final output."""
    if encoder.cfg.is_decoupled:
        return [i for i, k in enumerate(encoder.cfg.layer_kinds) if k == "coupled"] + [-1]
    return [-1]


@contextmanager
def wire_rounding(encoder: Encoder, dtype: str, layers: list[int] | None = None) -> Iterator[None]:
    """Round hidden states to ``dtype`` at the inputs of ``layers`` (default ``wire_points``;
    -1 = the encoder's final output) while the context is open."""
    points = wire_points(encoder) if layers is None else layers
    handles = []
    for i in points:
        if i == -1:
            handles.append(encoder.layers[-1].register_forward_hook(lambda m, a, out: round_trip(out, dtype)))
        else:
            handles.append(encoder.layers[i].register_forward_pre_hook(
                lambda m, args: (round_trip(args[0], dtype), *args[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def measure(weights_dir: str | None = None, converted_dir: str | None = None, sentences: int = 1000) -> dict:
    """Intent accuracy / slot F1 of the shipped intent model and sentence-embedding cosine (vs the
    same model in float32) of the converted decoupled MiniLM and the original, per wire dtype."""
    from detransformer_edge.nlu.dataset import build_dataset
    from detransformer_edge.nlu.parser import IntentParser
    from detransformer_edge.training.convert import (
        embedding_cosine_between,
        load_pretrained,
        load_student,
        make_tokenize,
    )
    from detransformer_edge.training.corpus import load_corpus
    from detransformer_edge.training.intent import evaluate, predict

    parser = IntentParser.load(weights_dir) if weights_dir else IntentParser.load_default()
    ds = build_dataset(seed=0)
    report: dict = {"intent": {}, "embedding": {}}
    enc = parser.model.encoder
    for dt in WIRE_DTYPES:
        with wire_rounding(enc, dt):
            preds = predict(parser.model, parser.tokenizer, ds.test)
        report["intent"][dt] = evaluate(preds, ds.test, parser.thresholds)
    original, tokenizer = load_pretrained("minilm-l6")
    tokenize = make_tokenize(tokenizer)
    held = list(load_corpus().held_out[:sentences])
    models = {"original": (original, [i for i, k in enumerate(enc.cfg.layer_kinds) if k == "coupled"] + [-1])}
    if converted_dir:
        student = load_student(converted_dir)
        models["decoupled"] = (student, wire_points(student))
    for name, (model, points) in models.items():
        report["embedding"][name] = {"wire_points": points}
        for dt in WIRE_DTYPES:
            with torch.no_grad(), wire_rounding(model, dt, points):
                rounded = embeddings(model, held, tokenize)
            reference = embeddings(model, held, tokenize)
            report["embedding"][name][dt] = embedding_cosine_between(rounded, reference)
    report["sentences"] = len(held)
    return report


@torch.no_grad()
def embeddings(model: Encoder, sentences: list[str], tokenize, batch_size: int = 64) -> torch.Tensor:
    out = []
    for k in range(0, len(sentences), batch_size):
        ids, mask = tokenize(sentences[k : k + batch_size], 64)
        out.append(model.sentence_embedding(ids, mask))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m detransformer_edge.training.precision [--weights DIR] [--converted DIR] [--out FILE]``."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--weights", default=None)
    p.add_argument("--converted", default=None)
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = measure(args.weights, args.converted, args.sentences)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
