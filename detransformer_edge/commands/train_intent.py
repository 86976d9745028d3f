"""`detransformer-edge train-intent`: train the smart-home intent + slot model and ship its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the intent + slot model on the decoupled MiniLM (the shipped one) or the original MiniLM"

DEFAULT_CONVERTED = Path.home() / ".cache" / "detransformer_edge" / "converted" / "minilm-l6-nd4-nb2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the weights (default: detransformer_edge/nlu/weights, the shipped ones)")
    parser.add_argument("--converted", type=Path, default=DEFAULT_CONVERTED,
                        help="decoupled model from `convert --nd 4 --nb 2` (made first if missing)")
    parser.add_argument("--base", choices=("decoupled", "original"), default="decoupled",
                        help="encoder to fine-tune: the converted decoupled MiniLM (default, shipped) or the "
                             "original MiniLM, trained the same way for comparison (needs --out)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import torch

    from detransformer_edge.errors import ConfigError
    from detransformer_edge.nlu.dataset import build_dataset
    from detransformer_edge.nlu.parser import default_weights_dir
    from detransformer_edge.training.convert import (
        DistilSettings,
        convert_and_distil,
        load_pretrained,
        load_student,
    )
    from detransformer_edge.training.intent import (
        TrainSettings,
        save_intent_model,
        train_and_evaluate,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_weights_dir()
    settings = TrainSettings(seed=args.seed)
    if args.epochs is not None:
        settings = dataclasses.replace(settings, epochs=args.epochs)
    if args.base == "original" and args.out is None:
        raise ConfigError("--base original needs --out: the shipped weights are the decoupled model's")
    dataset = build_dataset(seed=args.seed)
    original, tokenizer = load_pretrained("minilm-l6")
    if args.base == "decoupled":
        if not (args.converted / "model.safetensors").exists():
            convert_and_distil("minilm-l6", 4, 2, args.converted, DistilSettings())
        encoder, base = load_student(args.converted), "minilm-l6 decoupled nd=4 nb=2"
    else:
        encoder, base = original, "minilm-l6 original"
    model, thresholds, report = train_and_evaluate(encoder, tokenizer, dataset, settings, args.base)
    results = {args.base: report}
    save_intent_model(model, out, thresholds,
                      {"base": base, "converted_from": str(args.converted) if args.base == "decoupled" else None,
                       "tokenizer_from": "minilm-l6", "dataset_seed": args.seed})
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results.items():
        t = r["test"]
        c = r["calibration"]
        print(f"{name}: template test split: intent accuracy {t['intent_accuracy']:.4f} (closed set "
              f"{t['intent_accuracy_closed_set']:.4f}), slot F1 {t['slot_f1']:.4f}, out-of-domain rejection "
              f"{t['ood_rejection']:.4f}, false rejection {t['false_rejection']:.4f}; thresholds chosen on validation "
              f"for <= {c['target']['max_false_acceptance']:.0%} false acceptance (there: "
              f"{c['validation_false_acceptance']:.4f}); trained in {r['train_seconds']:.0f} s")
    print(f"wrote {out}; independent sets: python -m detransformer_edge.nlu.evaluate --model {args.base}={out}")
    return 0
