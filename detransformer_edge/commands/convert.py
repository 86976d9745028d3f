"""`detransformer-edge convert`: build a decoupled student from a pretrained encoder and distil it."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a pretrained encoder into a decoupled (block-parallel) model and distil it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default="minilm-l6", help="pretrained preset (default minilm-l6)")
    parser.add_argument("--nd", type=int, default=4, help="sub-blocks per decoupled layer (default 4)")
    parser.add_argument("--nb", type=int, default=2, help="blocks (default 2)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes if it has a checkpoint)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default from DistilSettings)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from detransformer_edge.model.convert import DistilSettings, convert_and_distil

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = DistilSettings(seed=args.seed)
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.batch_size is not None:
        settings = dataclasses.replace(settings, batch_size=args.batch_size)
    quality = convert_and_distil(args.source, args.nd, args.nb, args.out, settings, device=device)
    print(f"wrote {args.out}/model.safetensors; held-out embedding cosine {quality['cosine_after']:.4f} "
          f"(initialised: {quality['cosine_init']:.4f}) in {quality['seconds']:.0f} s")
    return 0
