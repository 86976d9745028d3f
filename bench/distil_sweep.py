"""Compare distillation recipes for `convert` (MiniLM -> decoupled student) at a fixed step budget.

Each recipe is a set of ``DistilSettings`` overrides. Every recipe starts from the same sliced
initialisation and sees the same batches; the result is the held-out embedding cosine to the
teacher. Runs recipes in parallel processes (useful on a GPU box, where one small model leaves
the card mostly idle), writes JSON and prints a table.

    python bench/distil_sweep.py --steps 1200 --device cuda --parallel 6 --out sweep.json
    python bench/distil_sweep.py --steps 100 --recipes base,layers-cos --threads 2   # a CPU smoke run

On another machine, point ``DTE_CORPUS_FILE`` at a corpus written by
``detransformer_edge.training.corpus.export_corpus`` so both machines train on the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES: dict[str, dict[str, object]] = {
    "base": {"targets": "blocks", "hidden_loss": "mse", "lr": 2e-4},  # the first session's recipe
    "lr1e-3": {"targets": "blocks", "hidden_loss": "mse", "lr": 1e-3},
    "layers-cos-5e-4": {"targets": "layers", "hidden_loss": "cos", "lr": 5e-4},  # convert's default
    "layers-mse-5e-4": {"targets": "layers", "hidden_loss": "mse", "lr": 5e-4},
    "layers-mse-1e-3": {"targets": "layers", "hidden_loss": "mse", "lr": 1e-3},
    "layers-cos-1e-3": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3},
    "layers-cos-2e-3": {"targets": "layers", "hidden_loss": "cos", "lr": 2e-3},
    "layers-mse-1e-3-local": {"targets": "layers", "hidden_loss": "mse", "lr": 1e-3, "local_frac": 0.5},
    "layers-cos-1e-3-local": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3, "local_frac": 0.5},
    "blocks-cos-1e-3-local": {"targets": "blocks", "hidden_loss": "cos", "lr": 1e-3, "local_frac": 0.5},
    "layers-cos-1e-3-b32": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3, "batch_size": 32},
    "layers-cos-1e-3-cw3": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3, "cos_weight": 3.0},
    "layers-cos-2e-3-local": {"targets": "layers", "hidden_loss": "cos", "lr": 2e-3, "local_frac": 0.5},
    "layers-cos-1e-3-local25": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3, "local_frac": 0.25},
    "layers-cos-1e-3-b64": {"targets": "layers", "hidden_loss": "cos", "lr": 1e-3, "batch_size": 64},
    "layers-cos-2e-3-b64-local": {"targets": "layers", "hidden_loss": "cos", "lr": 2e-3, "batch_size": 64,
                                  "local_frac": 0.5},
}


def run_one(name: str, steps: int, device: str, eval_n: int, threads: int | None,
            eval_every: int = 0) -> dict[str, object]:
    import torch

    from detransformer_edge.model.config import get_config
    from detransformer_edge.training.convert import (
        DistilSettings,
        dataclasses_replace,
        distil,
        embedding_cosine,
        init_student,
        load_pretrained,
        make_tokenize,
    )
    from detransformer_edge.training.corpus import load_corpus

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    overrides = dict(RECIPES[name])
    settings = DistilSettings(steps=steps, **overrides)  # type: ignore[arg-type]
    if "batch_size" in overrides:  # same number of sentences seen: fewer, larger steps
        settings = dataclasses.replace(settings, steps=steps * 16 // settings.batch_size)
    teacher, tokenizer = load_pretrained("minilm-l6")
    cfg = dataclasses_replace(get_config("minilm-l6", nd=4, nb=2), norm_eps=teacher.cfg.norm_eps)
    student = init_student(teacher, cfg, seed=settings.seed)
    corpus = load_corpus()
    tokenize = make_tokenize(tokenizer)
    t0 = time.monotonic()
    c0 = time.process_time()
    curve: list[tuple[int, float]] = []

    def on_step(step: int) -> None:  # learning curve on a quarter of the evaluation sentences
        if eval_every and step % eval_every == 0 and step < settings.steps:
            c = embedding_cosine(student, teacher, corpus.held_out[: max(1, eval_n // 4)], tokenize,
                                 settings.max_len, device=device)
            curve.append((step, c))
            print(json.dumps({"recipe": name, "step": step, "cosine_quarter": c}), file=sys.stderr, flush=True)

    losses = distil(student, teacher.to(device), corpus.train, tokenize, settings, None, device, progress=False,
                    on_step=on_step)
    train_s, train_cpu = time.monotonic() - t0, time.process_time() - c0
    cos = embedding_cosine(student, teacher, corpus.held_out[:eval_n], tokenize, settings.max_len, device=device)
    return {"recipe": name, "overrides": overrides, "steps": settings.steps, "cosine": cos,
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "train_seconds": train_s,
            "train_cpu_seconds": train_cpu, "device": device, "threads": torch.get_num_threads(),
            "settings": dataclasses.asdict(settings), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200, help="steps at batch 16 (larger batches: fewer steps)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval", type=int, default=1000, help="held-out sentences for the cosine")
    ap.add_argument("--parallel", type=int, default=1, help="recipes run at once (separate processes)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--eval-every", type=int, default=0, help="learning-curve point every N steps (0: none)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.device, args.eval, args.threads, args.eval_every)))
        return 0
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    base = [sys.executable, __file__, "--steps", str(args.steps), "--device", args.device, "--eval", str(args.eval),
            "--eval-every", str(args.eval_every)]
    if args.threads:
        base += ["--threads", str(args.threads)]
    pending, running, results = list(names), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            running.append((name, subprocess.Popen([*base, "--one", name], stdout=subprocess.PIPE, text=True,
                                                   env=os.environ.copy())))
        time.sleep(1.0)
        for item in list(running):
            name, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode != 0 or not out.strip():
                results.append({"recipe": name, "error": f"exit {proc.returncode}"})
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{name:28s} " + (f"cos {r['cosine']:.4f} loss {r['final_loss']:.4f} {r['train_seconds']:.0f}s"
                                    if "cosine" in r else r["error"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| recipe | steps | held-out cosine | train s |\n| --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: -float(r.get("cosine", 0))):  # type: ignore[arg-type]
        if "cosine" in r:
            print(f"| {r['recipe']} | {r['steps']} | {r['cosine']:.4f} | {r['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
