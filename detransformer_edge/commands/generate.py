"""`detransformer-edge generate`: stream an answer from a pretrained decoder on this device."""

from __future__ import annotations

import argparse
import sys

from detransformer_edge.weights.quant import SCHEMES

HELP = "generate text with a pretrained decoder (SmolLM2), streaming it as it is produced"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the question or text to continue")
    parser.add_argument("--model", default="smollm2-135m", help="pretrained decoder preset (default smollm2-135m)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 = greedy, deterministic (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0 (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    parser.add_argument("--no-chat", action="store_true",
                        help="feed the prompt as raw text instead of through the model's chat template")
    parser.add_argument("--system", default=None, help="system message for the chat template (default: the model's)")
    parser.add_argument("--quant", choices=SCHEMES, default="float32",
                        help="weight format: float32, int8 (per-channel) or int4 (groups of 32); default float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the dequantised-weight cache")
    parser.add_argument("--quiet", action="store_true", help="no loading status or speed line on stderr")


def run(args: argparse.Namespace) -> int:
    import torch

    from detransformer_edge.commands._status import StatusLine
    from detransformer_edge.errors import ConfigError
    from detransformer_edge.model.generation import SamplingConfig, build_prompt, generate
    from detransformer_edge.weights.loaders import load_model
    from detransformer_edge.weights.sources import pretrained_kind

    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    if pretrained_kind(args.model) != "decoder":
        raise ConfigError(f"model {args.model!r} is an encoder; `generate` needs a decoder (try `embed`)")
    status = StatusLine(quiet=args.quiet)
    loaded = load_model(args.model, progress=status, cache=not args.no_cache, quant=args.quant)
    status.done()
    template = None if args.no_chat else loaded.chat_template
    if args.system is not None and template is None:
        raise ConfigError("--system needs the chat template (drop --no-chat)")
    prompt_ids = build_prompt(loaded.tokenizer, args.prompt, template, system=args.system)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(loaded.model, loaded.tokenizer, prompt_ids, sampling, on_text=emit)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        n = len(result.token_ids)
        print(
            f"{n} tokens, {result.tokens_per_second:.1f} tokens/s decode; prompt {result.prompt_tokens} tokens "
            f"in {result.prefill_seconds:.2f} s; stop: {result.stop_reason}",
            file=sys.stderr,
        )
    return 0
