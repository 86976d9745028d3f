"""`detransformer-edge convert`: build a decoupled student from a pretrained model and distil it.

Encoders (``--from minilm-l6``, the default) go through ``training/convert.py``; decoders
(``--from smollm2-135m``) through ``training/convert_decoder.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a pretrained encoder or decoder into a decoupled (block-parallel) model and distil it"

ENCODER_DEFAULTS = {"nd": 4, "nb": 2}
# Decoders: two devices (nd=2) is what a household runs. nb=5 (6-layer blocks, 5 synchronisation
# points per token, 25 of 30 layers decoupled) had the lowest held-out perplexity of the sliced,
# untrained SmolLM2-135M student among the nb values tried (8192 held-out tokens; teacher 124.6):
# nb=3 3.0e6, nb=5 3.5e5, nb=6 1.1e6. All three are far from the teacher before distillation.
DECODER_DEFAULTS = {"nd": 2, "nb": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default="minilm-l6",
                        help="pretrained preset: minilm-l6 (encoder, default) or smollm2-135m (decoder)")
    parser.add_argument("--nd", type=int, default=None,
                        help="sub-blocks per decoupled layer (default 4 for encoders, 2 for decoders)")
    parser.add_argument("--nb", type=int, default=None, help="blocks (default 2 for encoders, 5 for decoders)")
    parser.add_argument("--sub-attn", choices=("full", "slice"), default="full",
                        help="sub-block attention: full (Q/K/V over all heads, default) or slice (the paper's: "
                             "each sub-block owns n_heads/nd heads; nd must divide the head counts)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes if it has a checkpoint)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default from the settings)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=None, help="decoders: tokens per training sequence (128)")
    parser.add_argument("--lr", type=float, default=None, help="decoders: peak learning rate (3e-4)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="decoders: wall budget of the whole command; training stops at a step "
                             "boundary in time to evaluate and save")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="decoders: held-out tokens for perplexity (16384)")


def _is_decoder(source: str) -> bool:
    from detransformer_edge.model.config import PRESETS, DecoderConfig

    return isinstance(PRESETS.get(source), DecoderConfig)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_decoder(args.source):
        return _run_decoder(args, device)
    return _run_encoder(args, device)


def _run_encoder(args: argparse.Namespace, device: str) -> int:
    import dataclasses

    from detransformer_edge.training.convert import DistilSettings, convert_and_distil

    decoder_only = [f"--{n.replace('_', '-')}" for n in ("seq_len", "lr", "max_minutes", "eval_tokens")
                    if getattr(args, n, None) is not None]
    if decoder_only:
        from detransformer_edge.errors import ConfigError

        raise ConfigError(f"{', '.join(decoder_only)} apply to decoder conversion only")
    nd = ENCODER_DEFAULTS["nd"] if args.nd is None else args.nd
    nb = ENCODER_DEFAULTS["nb"] if args.nb is None else args.nb
    settings = DistilSettings(seed=args.seed)
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.batch_size is not None:
        settings = dataclasses.replace(settings, batch_size=args.batch_size)
    quality = convert_and_distil(args.source, nd, nb, args.out, settings, device=device, sub_attn=args.sub_attn)
    print(f"wrote {args.out}/model.safetensors; held-out embedding cosine {quality['cosine_after']:.4f} "
          f"(initialised: {quality['cosine_init']:.4f}) in {quality['seconds']:.0f} s")
    return 0


def _run_decoder(args: argparse.Namespace, device: str) -> int:
    import dataclasses

    from detransformer_edge.training.convert_decoder import (
        DecoderDistilSettings,
        convert_decoder_and_distil,
    )

    nd = DECODER_DEFAULTS["nd"] if args.nd is None else args.nd
    nb = DECODER_DEFAULTS["nb"] if args.nb is None else args.nb
    changes = {"seed": args.seed}
    for arg, field in (("steps", "steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"), ("lr", "lr"),
                       ("max_minutes", "max_minutes"), ("eval_tokens", "eval_tokens")):
        if getattr(args, arg) is not None:
            changes[field] = getattr(args, arg)
    settings = dataclasses.replace(DecoderDistilSettings(), **changes)
    q = convert_decoder_and_distil(args.source, nd, nb, args.out, settings, device=device, sub_attn=args.sub_attn)
    print(f"wrote {args.out}/model.safetensors; held-out perplexity {q['ppl_after']:.2f} = {q['ppl_ratio']:.2f}x "
          f"the teacher's {q['ppl_teacher']:.2f} (sliced init {q['ppl_init']:.2f}); top-1 agreement with the "
          f"teacher {q['agreement_after']:.3f}; {q['steps']} steps ({q['stopped_by']}) in {q['seconds']:.0f} s")
    return 0
