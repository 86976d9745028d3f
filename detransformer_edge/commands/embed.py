"""`detransformer-edge embed`: sentence embeddings from a pretrained encoder on this device."""

from __future__ import annotations

import argparse
import json
import sys

from detransformer_edge.weights.quant import SCHEMES

HELP = "embed text with a pretrained sentence encoder (all-MiniLM-L6-v2) and summarise the vector"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts (embedded as one padded batch)")
    parser.add_argument("--model", default="minilm-l6", help="pretrained encoder preset (default minilm-l6)")
    parser.add_argument("--first", type=int, default=6, help="how many leading values to print (default 6)")
    parser.add_argument("--json", action="store_true", help="print each full vector as a JSON list instead")
    parser.add_argument("--quant", choices=SCHEMES, default="float32",
                        help="weight format: float32, int8 (per-channel) or int4 (groups of 32); default float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no loading status on stderr")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from detransformer_edge.commands._status import StatusLine
    from detransformer_edge.errors import ConfigError
    from detransformer_edge.weights.loaders import load_model
    from detransformer_edge.weights.sources import pretrained_kind

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first < 0:
        raise ConfigError(f"--first must be >= 0, got {args.first}")
    if pretrained_kind(args.model) != "encoder":
        raise ConfigError(f"model {args.model!r} is a decoder; `embed` needs an encoder (try `generate`)")
    status = StatusLine(quiet=args.quiet)
    loaded = load_model(args.model, progress=status, quant=args.quant)
    status.done()
    started = time.perf_counter()
    batch = loaded.tokenizer.encode_batch(args.texts)
    with torch.inference_mode():
        vectors = loaded.model.sentence_embedding(
            torch.tensor(batch.input_ids), torch.tensor(batch.attention_mask)
        )  # (B, d)
    seconds = time.perf_counter() - started
    for text, vector, mask in zip(args.texts, vectors, batch.attention_mask):
        if args.json:
            print(json.dumps([round(float(x), 7) for x in vector]))
            continue
        head = ", ".join(f"{float(x):+.4f}" for x in vector[: args.first])
        print(f"{text!r}: {sum(mask)} tokens, dim {vector.shape[0]}, norm {float(vector.norm()):.6f}, "
              f"first [{head}{', ...' if args.first < vector.shape[0] else ''}]")
    tokens = sum(sum(m) for m in batch.attention_mask)
    print(f"embedded {len(args.texts)} text(s), {tokens} tokens, in {seconds * 1000:.1f} ms", file=sys.stderr)
    return 0
