"""One-device compute of the decoupled layouts against the standard model.

What does a forward pass cost on one core when the model is block-parallel, before any
network is involved? For BERT-base, MiniLM and SmolLM2-135M (random weights: the time does not
depend on the values) this times the standard model, the full-width decoupled layouts shipped
today and the paper's sliced layout, with the sub-blocks run one by one (what a device holding
one sub-block would with nn.Linear's weight layout), per device (each sub-block in a group of its
own, as ``parallel/shards.py`` builds it for a device holding one sub-block) and fused
(``Decoder/Encoder.fuse_sub_blocks``: a device holding a whole decoupled layer runs its
sub-blocks as one batched computation).

Protocol: one thread (``torch.set_num_threads(1)``), every variant in the same process, warm-up
passes first, then ``--reps`` rounds in which every variant runs once, in an order rotated each
round so host noise hits every variant alike; per variant the median over rounds, and the ratio
to the standard model both as a ratio of medians and as the median of the per-round ratios.
Encoders: one forward of batch 1 at each sequence length. Decoders: a prefill of
``--prompt`` tokens, then ``--decode-steps`` single-token steps on the KV cache (per round the
median step). Each time is taken twice: wall clock and the thread's CPU time
(``time.thread_time``; with one torch thread all the compute runs on the calling thread). On
a shared host the wall clock also counts the time the thread waited for a core; the CPU time
does not (it still feels cache and memory-bandwidth contention). The load average is recorded
before and after: compare ratios from one run only.

    python bench/sliced.py                          # all families, writes bench/results/sliced.{json,md}
    python bench/sliced.py --families bert --reps 5 --out /tmp/quick   # a quick look
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824 \
        python bench/sliced.py --name sliced-malloc   # freed memory kept for reuse (no page faults)

The second form matters on this project's machine: every large activation freshly mapped from the
kernel is paid again in page faults (counted in the CPU time), and layouts with larger
intermediates (a fused group's FFN is n times a sub-block's) pay more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from detransformer_edge.model.config import get_config
from detransformer_edge.model.decoder import Decoder
from detransformer_edge.model.encoder import Encoder
from detransformer_edge.model.layers import DecoupledLayer, SubBlockGroup


@dataclass(frozen=True)
class Variant:
    label: str
    preset: str
    nd: int = 1
    nb: int | None = None
    sub_attn: str = "full"
    run: str = "one by one"  # "one by one" (nn.Linear layouts), "per device" (groups of one), "fused"

    def describe(self) -> str:
        if self.nb is None:
            return "standard"
        return f"nd {self.nd} nb {self.nb} {self.sub_attn}, {self.run}"


FAMILIES: dict[str, tuple[Variant, ...]] = {
    "bert": (
        Variant("standard", "bert-base"),
        Variant("full nd4 nb4 (bert-base-bp)", "bert-base", 4, 4, "full"),
        Variant("full nd4 nb2", "bert-base", 4, 2, "full"),
        Variant("full nd4 nb2 fused", "bert-base", 4, 2, "full", "fused"),
        Variant("slice nd4 nb2", "bert-base", 4, 2, "slice"),
        Variant("slice nd4 nb2 per device", "bert-base", 4, 2, "slice", "per device"),
        Variant("slice nd4 nb2 fused (bert-base-bp2)", "bert-base", 4, 2, "slice", "fused"),
        Variant("slice nd4 nb4 fused", "bert-base", 4, 4, "slice", "fused"),
    ),
    "minilm": (
        Variant("standard", "minilm-l6"),
        Variant("full nd4 nb2 (shipped)", "minilm-l6", 4, 2, "full"),
        Variant("slice nd4 nb2", "minilm-l6", 4, 2, "slice"),
        Variant("slice nd4 nb2 per device", "minilm-l6", 4, 2, "slice", "per device"),
        Variant("slice nd4 nb2 fused (minilm-bp2)", "minilm-l6", 4, 2, "slice", "fused"),
    ),
    "smollm2": (
        Variant("standard", "smollm2-135m"),
        Variant("full nd2 nb5 (converted)", "smollm2-135m", 2, 5, "full"),
        Variant("full nd4 nb6 (smollm2-bp)", "smollm2-135m", 4, 6, "full"),
        Variant("slice nd3 nb5", "smollm2-135m", 3, 5, "slice"),
        Variant("slice nd3 nb5 per device", "smollm2-135m", 3, 5, "slice", "per device"),
        Variant("slice nd3 nb5 fused", "smollm2-135m", 3, 5, "slice", "fused"),
    ),
}


def build(v: Variant, seed: int = 0) -> torch.nn.Module:
    """``run``: "one by one" leaves the sub-blocks as built; "per device" gives each sub-block a
    group of its own (what a device holding one sub-block runs: only the FFN layout changes)
    and runs them one by one; "fused" runs each layer's sub-blocks as one group."""
    cfg = get_config(v.preset, nd=v.nd, nb=v.nb, sub_attn=v.sub_attn)
    torch.manual_seed(seed)
    model = (Encoder if cfg.family == "encoder" else Decoder)(cfg).eval()
    if v.run == "fused":
        model.fuse_sub_blocks()
    elif v.run == "per device":
        for layer in model.layers:
            if isinstance(layer, DecoupledLayer):
                for block in layer.sub_blocks:
                    SubBlockGroup([block])  # re-lays its weights out; the views keep the storage
    return model


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rounds(fns: dict[str, Callable[[], dict[str, float]]], reps: int, warmup: int,
           progress: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    """``fns[label]()`` -> {metric: seconds}; every label once per round, order rotated."""
    labels = list(fns)
    for _ in range(warmup):
        for label in labels:
            fns[label]()
    out: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    for r in range(reps):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            for metric, sec in fns[label]().items():
                out[label].setdefault(metric, []).append(sec)
        progress(f"  round {r + 1}/{reps}")
    return out


def encoder_fn(model: Encoder, seq: int) -> Callable[[], dict[str, float]]:
    ids = torch.randint(1, model.cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))

    def run() -> dict[str, float]:
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.thread_time()
            model(ids)
            return {"forward": time.perf_counter() - t0, "forward cpu": time.thread_time() - c0}

    return run


def decoder_fn(model: Decoder, prompt: int, steps: int) -> Callable[[], dict[str, float]]:
    g = torch.Generator().manual_seed(prompt)
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt + steps), generator=g)

    def run() -> dict[str, float]:
        with torch.inference_mode():
            caches = model.new_caches()
            t0, c0 = time.perf_counter(), time.thread_time()
            model(ids[:, :prompt], 0, caches)
            prefill, prefill_cpu = time.perf_counter() - t0, time.thread_time() - c0
            per_step, per_step_cpu = [], []
            for t in range(prompt, prompt + steps):
                t0, c0 = time.perf_counter(), time.thread_time()
                model(ids[:, t : t + 1], t, caches)
                per_step.append(time.perf_counter() - t0)
                per_step_cpu.append(time.thread_time() - c0)
        return {"prefill": prefill, "prefill cpu": prefill_cpu, "decode": statistics.median(per_step),
                "decode cpu": statistics.median(per_step_cpu)}

    return run


def summarise(samples: dict[str, dict[str, list[float]]], base: str) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, metrics in samples.items():
        out[label] = {}
        for metric, xs in metrics.items():
            ref = samples[base][metric]
            out[label][metric] = {
                "median_s": statistics.median(xs),
                "ratio_of_medians": statistics.median(xs) / statistics.median(ref),
                "median_paired_ratio": statistics.median(a / b for a, b in zip(xs, ref)),
                "min_s": min(xs), "max_s": max(xs), "n": len(xs),
            }
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(1)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else (lambda m: None)
    report: dict[str, object] = {
        "command": " ".join(["python", "bench/sliced.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": load_average(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpu": _cpu_name(), "reps": args.reps, "warmup": args.warmup,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "results": [],
    }
    results: list[dict[str, object]] = report["results"]  # type: ignore[assignment]
    for family in args.families:
        variants = FAMILIES[family]
        say(f"{family}: building {len(variants)} models")
        models = {v.label: build(v) for v in variants}
        info = {v.label: _layout(v, models[v.label]) for v in variants}
        if family == "smollm2":
            fns = {label: decoder_fn(m, args.prompt, args.decode_steps) for label, m in models.items()}  # type: ignore[arg-type]
            say(f"{family}: prefill {args.prompt} + {args.decode_steps} decode steps")
            load = load_average()
            summary = summarise(rounds(fns, args.reps, args.warmup, say), variants[0].label)
            results.append({"family": family, "workload": f"prefill {args.prompt} + decode", "load_before": load,
                            "load_after": load_average(), "variants": info, "timing": summary})
        else:
            for seq in args.seqs:
                fns = {label: encoder_fn(m, seq) for label, m in models.items()}  # type: ignore[arg-type]
                say(f"{family}: seq {seq}")
                load = load_average()
                summary = summarise(rounds(fns, args.reps, args.warmup, say), variants[0].label)
                results.append({"family": family, "workload": f"encode seq {seq}", "load_before": load,
                                "load_after": load_average(), "variants": info, "timing": summary})
        del models
    report["load_after"] = load_average()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return report


def _layout(v: Variant, model: torch.nn.Module) -> dict[str, object]:
    cfg = model.cfg  # type: ignore[attr-defined]
    return {"describe": v.describe(), "params": model.num_params(),  # type: ignore[operator]
            "d_sub": cfg.d_sub if v.nb else None, "sub_heads": cfg.sub_heads if v.nb else None,
            "d_ff_sub": cfg.d_ff_sub if v.nb else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(report: dict[str, object]) -> str:
    lines = [
        "# One-device compute of the decoupled layouts (`bench/sliced.py`)",
        "",
        f"`{report['command']}` — {report['started']} to {report['finished']}; {report['cpu']}, torch "
        f"{report['torch']}, {report['threads']} thread; {report['reps']} interleaved rounds after "
        f"{report['warmup']} warm-up; load average (1/5/15 min) {report['load_before']} before, "
        f"{report['load_after']} after; GLIBC_TUNABLES={report['glibc_tunables'] or '(unset: glibc defaults)'}. "
        "Ratios are to the standard model in the same rounds: ratio of medians / median of per-round ratios.",
        "",
    ]
    for res in report["results"]:  # type: ignore[union-attr]
        lines += [f"## {res['family']}, {res['workload']} (load {res['load_before']} -> {res['load_after']})", ""]
        metrics = list(next(iter(res["timing"].values())))
        head = "| variant | params | sub-block width / heads / I' |"
        rule = "| --- | ---: | --- |"
        for m in metrics:
            head += f" {m} median | {m} vs standard |"
            rule += " ---: | ---: |"
        lines += [head, rule]
        for label, t in res["timing"].items():
            lay = res["variants"][label]
            shape = "–" if lay["d_sub"] is None else f"{lay['d_sub']} / {lay['sub_heads']} / {lay['d_ff_sub']}"
            row = f"| {label} | {lay['params'] / 1e6:.2f} M | {shape} |"
            for m in metrics:
                row += (f" {t[m]['median_s'] * 1e3:.1f} ms | {t[m]['ratio_of_medians']:.3f} / "
                        f"{t[m]['median_paired_ratio']:.3f} |")
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="bert,minilm,smollm2", help="bert, minilm, smollm2")
    p.add_argument("--seqs", default="16,64,128", help="encoder sequence lengths")
    p.add_argument("--prompt", type=int, default=128, help="decoder prompt tokens (prefill)")
    p.add_argument("--decode-steps", type=int, default=16, help="decoder single-token steps per round")
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="bench/results", help="folder for <name>.json and <name>.md")
    p.add_argument("--name", default="sliced")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; use {', '.join(FAMILIES)}")
    args.seqs = [int(s) for s in args.seqs.split(",") if s]
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
