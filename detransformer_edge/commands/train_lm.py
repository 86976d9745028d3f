"""`detransformer-edge train-lm`: the paired experiment -- a standard and decoupled decoders trained
from scratch with identical data, steps and hyper-parameters; validation perplexity compared.

The same arguments work for ``python -m detransformer_edge.training.paired`` (a bare GPU machine)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("train a standard and decoupled (nd, nb) decoders from scratch on the offline corpus and "
        "compare validation perplexity (writes DIR/paired.json and DIR/paired.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (one sub-directory per model)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: training/lm.py's DEFAULT_STEPS)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation curve interval (default steps/5)")
    parser.add_argument("--only", default=None,
                        help="comma-separated models to train: std, nd2nb2, nd2nb4, nd4nb2, nd4nb4 "
                             "(default: all five); results already in --out are merged")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer JSON to use as is (default: trained on the corpus and cached under "
                             "~/.cache/detransformer_edge/paired/)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="corpus file written by --export-corpus (same as DTE_CORPUS_FILE)")
    parser.add_argument("--export-corpus", type=Path, default=None,
                        help="only write the corpus (gzipped JSON) to this file and the tokenizer JSON next "
                             "to it (tokenizer.json), then exit: what another machine needs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-weights", action="store_true", help="do not write DIR/<model>/model.safetensors")
    parser.add_argument("--report-only", action="store_true",
                        help="only merge DIR/*/result.json into DIR/paired.json and DIR/paired.md")


def run(args: argparse.Namespace) -> int:
    import shutil

    from detransformer_edge.errors import ConfigError
    from detransformer_edge.training import paired
    from detransformer_edge.training.corpus import export_corpus, load_corpus, read_corpus_file
    from detransformer_edge.training.lm import LMSettings
    from detransformer_edge.training.token_data import get_tokenizer, sha256_file

    if args.report_only:
        if not args.out.is_dir():
            raise ConfigError(f"--out {args.out}: no such directory")
        report = paired.write_report(args.out)
        print(paired.markdown_table(report))
        return 0
    corpus = read_corpus_file(args.corpus) if args.corpus else None
    if args.export_corpus is not None:
        corpus = corpus or load_corpus()
        path = export_corpus(corpus, args.export_corpus)
        _, tok_path = get_tokenizer(corpus, args.tokenizer)
        dest = path.parent / "tokenizer.json"
        if tok_path.resolve() != dest.resolve():
            shutil.copyfile(tok_path, dest)
        print(f"wrote {path} (corpus {corpus.fingerprint}: {len(corpus.train)} train, "
              f"{len(corpus.held_out)} held-out sentences) and {dest} (sha256 {sha256_file(dest)})")
        return 0
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                   ("seq_len", args.seq_len), ("lr", args.lr), ("eval_every", args.eval_every))
                 if v is not None}
    settings = LMSettings(seed=args.seed, **overrides)
    report = paired.run_paired(args.out, args.only, settings, device=args.device, threads=args.threads,
                               tokenizer=args.tokenizer, corpus=corpus, save_weights=not args.no_weights)
    print(paired.markdown_table(report))
    print(f"wrote {args.out / 'paired.json'} and {args.out / 'paired.md'}")
    return 0
