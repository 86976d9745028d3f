"""Benchmark: SmolLM2-135M decode speed and memory in float32 / int8 / int4 (ours) and in
llama.cpp (``llama-cpp-python``) on the same GGUF file, one core, one run.

    taskset -c 1 .venv/bin/python bench/quant.py                 # 64 tokens x 5 rounds
    taskset -c 1 .venv/bin/python bench/quant.py --quick         # 32 tokens x 3 rounds, no parity
    .venv/bin/pip install -e '.[bench]'                          # llama-cpp-python (builds from source)

Method: every variant is loaded first; then each round runs every variant once, in turn, so a
change of machine load hits all of them alike. One warm-up generation per variant precedes the
rounds. A measurement is one greedy generation of ``--tokens`` tokens after the same chat prompt
(the same token ids for llama.cpp, whose vocabulary is the file's); decode tokens/s counts the
tokens after the first over the time they took (prefill excluded), as ``generate`` reports it.
The median over the rounds is reported. torch and llama.cpp both use one thread
(``torch.set_num_threads(1)``, ``n_threads=1``); pin the process to one core with ``taskset``.

Memory: the bytes of each variant's weights (``module_nbytes``: parameters and quantized
buffers; llama.cpp's ``llama_model_size``), and the weights each device of a 4-device home holds
(``DeviceShard.nbytes``) for the pretrained model's pipeline and tensor-parallel plans and for
the block-parallel layout (N_d = 4, N_b = 6, random weights of the same shapes: pretrained
decoupled weights come from distillation). Parity (unless ``--quick``): greedy continuations of
the 10 prompts of ``training/quant_parity.py`` against float32 and held-out perplexity.

Writes ``bench/results/quant.json`` and ``bench/results/quant.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from detransformer_edge.model.generation import SamplingConfig, generate_ids  # noqa: E402
from detransformer_edge.parallel.shards import quantize_shard  # noqa: E402
from detransformer_edge.training import quant_parity as P  # noqa: E402
from detransformer_edge.weights.loaders import load_model  # noqa: E402
from detransformer_edge.weights.quant import SCHEMES  # noqa: E402
from detransformer_edge.weights.quant.linear import module_nbytes, quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Give me three tips for saving energy at home."
MB = 1e6


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def our_decode(model: Any, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of one greedy generation (EOS does not stop it) and its ids."""
    timings: list[float] = []
    ids = list(generate_ids(model, prompt_ids, SamplingConfig(max_new_tokens=tokens), timings=timings))
    return (len(timings) - 1) / sum(timings[1:]), ids


class LlamaCpp:
    """llama.cpp through llama-cpp-python on one thread, greedy (top_k = 1)."""

    def __init__(self, path: Path, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=1, n_threads_batch=1, n_ctx=context, n_batch=512,
                         verbose=False, use_mmap=True, seed=0)

    def decode(self, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
        stamps: list[float] = []
        ids: list[int] = []
        self.llm.reset()
        for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            ids.append(int(token))
            if len(ids) == tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), ids

    def weight_bytes(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_model_size(self.llm.model))

    @staticmethod
    def version() -> str:
        import llama_cpp

        return str(llama_cpp.__version__)


def home_memory(float_model: Any) -> dict[str, dict[str, dict[str, float]]]:
    """MB of weights per device of a 4-device home, per plan and weight format."""
    from detransformer_edge.model.config import get_config
    from detransformer_edge.parallel.plan import baseline_plan, required_weights
    from detransformer_edge.parallel.shards import build_shard
    from detransformer_edge.service.weights import materialise, parameter_shapes, random_tensors

    devices = ("d0", "d1", "d2", "d3")
    cfg = float_model.cfg
    bp_cfg = get_config("smollm2-135m", nd=4, nb=6)
    bp_model = materialise(bp_cfg, random_tensors(bp_cfg, 0, parameter_shapes(bp_cfg)))
    cases = {
        "pipeline (pretrained)": (float_model, baseline_plan("pipeline", devices, cfg.n_layers, cfg.nd)),
        "tp (pretrained)": (float_model, baseline_plan("tp", devices, cfg.n_layers, cfg.nd)),
        "block N_d=4 N_b=6 (same shapes)": (bp_model, baseline_plan("bp-fixed", devices, bp_cfg.n_layers, bp_cfg.nd)),
    }
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, (model, plan) in cases.items():
        out[label] = {}
        for scheme in SCHEMES:
            copy_ = copy.deepcopy(model)
            row = {}
            for d in plan.devices:
                shard = build_shard(copy_, required_weights(plan, model.cfg.layer_kinds, d))
                quantize_shard(shard, scheme)
                row[d] = round(shard.nbytes() / MB, 1)
            out[label][scheme] = row
            del copy_
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32 tokens x 3 rounds, no parity")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", default="quant")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 32, 3
    torch.set_num_threads(1)
    started = time.time()
    load_before = load_average()
    say = print

    fl = load_model("smollm2-135m", progress=lambda m: None)
    variants: dict[str, Any] = {"float32": fl.model}
    loads: dict[str, float] = {"float32": fl.load_seconds}
    t = time.perf_counter()
    int8 = copy.deepcopy(fl.model)
    quantize_model(int8, "int8")
    variants["int8"] = int8
    loads["int8"] = fl.load_seconds + time.perf_counter() - t
    i4 = load_model("smollm2-135m", quant="int4", progress=lambda m: None)
    variants["int4"] = i4.model
    loads["int4"] = i4.load_seconds
    prompt_ids = P.prompt_ids(fl, PROMPT)
    memory = {k: round(module_nbytes(m) / MB, 1) for k, m in variants.items()}
    llama = None
    llama_error = None
    if not args.no_llama_cpp:
        try:
            t = time.perf_counter()
            llama = LlamaCpp(fl.weights_path, context=len(prompt_ids) + args.tokens + 16)
            loads["llama.cpp"] = time.perf_counter() - t
            memory["llama.cpp"] = round(llama.weight_bytes() / MB, 1)
        except ImportError as exc:
            llama_error = f"llama-cpp-python is not installed ({exc}); pip install -e '.[bench]'"
            say(llama_error)

    runners: dict[str, Any] = {k: (lambda m=m: our_decode(m, prompt_ids, args.tokens)) for k, m in variants.items()}
    if llama is not None:
        runners["llama.cpp"] = lambda: llama.decode(prompt_ids, args.tokens)
    ids: dict[str, list[int]] = {}
    for name, run in runners.items():  # warm-up
        _, ids[name] = run()
    speeds: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            tps, _ = run()
            speeds[name].append(tps)
        say(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()))
    median = {k: round(statistics.median(v), 2) for k, v in speeds.items()}
    agree = {k: next((i for i, (a, b) in enumerate(zip(ids["float32"], v)) if a != b), len(v))
             for k, v in ids.items()}

    parity: dict[str, Any] = {}
    if not args.quick:
        prompts = [P.prompt_ids(fl, p) for p in P.PARITY_PROMPTS]
        conts = {k: [P.greedy_continuation(m, x, 32) for x in prompts] for k, m in variants.items()}
        seqs = P.held_out_sequences(fl.tokenizer, tokens=8192, seq_len=256)
        ppl = {k: P.perplexity(m, seqs) for k, m in variants.items()}
        for k in variants:
            div = P.compare_continuations(conts["float32"], conts[k])
            parity[k] = {"identical_continuations": sum(d.identical for d in div),
                         "first_differences": [d.first_difference for d in div],
                         "perplexity": round(ppl[k], 4),
                         "perplexity_change": round(ppl[k] / ppl["float32"] - 1, 5)}
        parity["held_out_tokens"] = int(seqs.numel())
    home = home_memory(fl.model)
    result = {
        "command": "taskset -c 1 .venv/bin/python bench/quant.py" + (" --quick" if args.quick else ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "activations": str(variants["int8"].lm_head.activation_dtype),
                    "llama_cpp": LlamaCpp.version() if llama is not None else llama_error,
                    "load_before": load_before, "load_after": load_average()},
        "tokens": args.tokens, "rounds": args.rounds, "prompt_tokens": len(prompt_ids),
        "decode_tokens_per_s": {"median": median, "all": {k: [round(x, 2) for x in v] for k, v in speeds.items()}},
        "ratio_to_llama_cpp": {k: round(median[k] / median["llama.cpp"], 3) for k in median} if llama else None,
        "greedy_tokens_equal_to_float32": agree,
        "weights_mb": memory, "load_seconds": {k: round(v, 2) for k, v in loads.items()},
        "parity": parity, "home_weights_mb_per_device": home,
        "wall_seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    med, mem = r["decode_tokens_per_s"]["median"], r["weights_mb"]
    ratio = r["ratio_to_llama_cpp"] or {}
    lines = [
        f"# SmolLM2-135M weight formats: `{r['command']}`", "",
        f"One core, one thread, same run; {r['tokens']} tokens after a {r['prompt_tokens']}-token prompt, "
        f"median of {r['rounds']} rounds. Load average before/after: "
        f"{', '.join(f'{x:.2f}' for x in r['machine']['load_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in r['machine']['load_after'])}. torch {r['machine']['torch']}, "
        f"quantized activations {r['machine']['activations']}, llama-cpp-python {r['machine']['llama_cpp']}.", "",
        "| weights | decode tokens/s | vs llama.cpp | weights MB | greedy tokens = float32 | held-out ppl (change) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in med:
        p = r["parity"].get(k)
        ppl = f"{p['perplexity']:.3f} ({100 * p['perplexity_change']:+.2f} %)" if p else "—"
        lines.append(f"| {k} | {med[k]:.1f} | {ratio.get(k, float('nan')):.2f}x | {mem.get(k, float('nan')):.1f} | "
                     f"{r['greedy_tokens_equal_to_float32'].get(k, 0)}/{r['tokens']} | {ppl} |")
    if r["parity"]:
        lines += ["", "Greedy continuations of the 10 parity prompts (32 tokens) identical to float32: "
                  + ", ".join(f"{k} {r['parity'][k]['identical_continuations']}/10" for k in med if k in r["parity"])
                  + f"; perplexity over {r['parity']['held_out_tokens']} held-out tokens."]
    lines += ["", "Weights per device of a 4-device home (MB; d0 is the coordinator with embeddings and head):", "",
              "| plan | format | d0 | d1 | d2 | d3 |", "| --- | --- | --- | --- | --- | --- |"]
    for plan, rows in r["home_weights_mb_per_device"].items():
        for scheme, row in rows.items():
            lines.append(f"| {plan} | {scheme} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
