"""`detransformer-edge plan`: place a model on a set of device profiles and show the plan the
runtime planner would choose for one request, with its predicted cost breakdown."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

HELP = "choose a parallel plan for a request on given device profiles and explain its predicted cost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", nargs="+", required=True, metavar="FILE[*N]",
                        help="device profile TOML files (see firmware_profiles/); FILE*N adds N copies "
                             "named <name>-1..<name>-N")
    parser.add_argument("--model", default="bert-base",
                        help="model preset (default bert-base) with --nd/--nb/--sub-attn, or a benchmark shape "
                             "of the shapes catalog, which fixes them (bert-base-bp, bert-base-bp2, "
                             "bert-base-bp-slice, minilm-bp2, smollm2-bp, ...)")
    parser.add_argument("--nd", type=int, default=None, help="sub-blocks per decoupled layer (default 4)")
    parser.add_argument("--nb", type=int, default=None, help="blocks; 0 = the standard model (default 2)")
    parser.add_argument("--sub-attn", choices=("full", "slice"), default=None,
                        help="sub-block heads: full (all heads, default) or slice (the paper's: n_heads/nd each)")
    parser.add_argument("--seq", type=int, required=True, help="sequence length (decode: context length)")
    parser.add_argument("--mode", choices=("encode", "prefill", "decode"), default=None,
                        help="request kind (default: encode for encoders, prefill for decoders)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mbit", type=float, default=None, help="what-if: give every device this link rate")
    parser.add_argument("--broker-mbit", type=float, default=None,
                        help="the broker host's own link (default: not a bottleneck)")
    parser.add_argument("--per-message-ms", type=float, default=0.3, help="broker cost per publish (default 0.3)")
    parser.add_argument("--accuracy", default=None, help="wire accuracy budget: exact, fp16 (default) or int8")
    parser.add_argument("--coordinator", default=None, help="device that embeds and answers (default: best score)")
    parser.add_argument("--explain", action="store_true", help="also list the 5 best alternatives and why they lost")


def expand_profiles(specs: list[str]) -> list:  # list[DeviceProfile]
    """Load ``FILE`` or ``FILE*N`` specs; copies get ``-1``..``-N`` suffixes."""
    from detransformer_edge.planner.profile import ProfileError, load_profile, load_profiles

    paths: list[Path] = []
    copies: list[int] = []
    for spec in specs:
        path, star, count = spec.rpartition("*")
        if not star:
            path, count = spec, "1"
        try:
            n = int(count)
        except ValueError:
            raise ProfileError(f"--profiles entry {spec!r}: expected FILE or FILE*N") from None
        if n < 1:
            raise ProfileError(f"--profiles entry {spec!r}: N must be at least 1")
        paths.append(Path(path))
        copies.append(n)
    if all(n == 1 for n in copies):
        return load_profiles(paths)
    out = []
    for path, n in zip(paths, copies):
        prof = load_profile(path)
        out += [prof] if n == 1 else [dataclasses.replace(prof, name=f"{prof.name}-{i + 1}") for i in range(n)]
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ProfileError(f"device names repeat across profiles: {', '.join(sorted(dup))}")
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def run(args: argparse.Namespace) -> int:
    from detransformer_edge.planner.cost import Broker, Request
    from detransformer_edge.planner.runtime import (
        DEFAULT_ACCURACY,
        RuntimePlanner,
        holdings_summary,
    )
    from detransformer_edge.planner.static import plan_static

    profiles = expand_profiles(args.profiles)
    if args.mbit is not None:
        profiles = [dataclasses.replace(p, link_mbit=args.mbit) for p in profiles]
    cfg = model_config(args)
    mode = args.mode or ("prefill" if getattr(cfg, "family") == "decoder" else "encode")
    request = Request(mode, args.seq, args.batch)
    broker = Broker(args.broker_mbit, args.per_message_ms)
    accuracy = args.accuracy or DEFAULT_ACCURACY

    static = plan_static(profiles, cfg, broker=broker, coordinator=args.coordinator, accuracy=accuracy)
    planner = RuntimePlanner(static.placement, profiles, cfg, broker, accuracy, coordinator=args.coordinator)
    ranked = planner.ranked(request, 6)
    best = ranked[0]

    if cfg.nb:
        heads = f"{cfg.sub_heads} heads" + (" (sliced)" if cfg.sub_attn == "slice" else " (full-width)")
        model_desc = f"{args.model}: {cfg.name} (nd={cfg.nd}, nb={cfg.nb}, sub-blocks {cfg.d_sub} wide, {heads}, I'={cfg.d_ff_sub})"
    else:
        model_desc = f"{args.model}: {cfg.name} (standard)"
    print(f"model      {model_desc}; request {mode} seq {args.seq} batch {args.batch}")
    print(f"placement  {holdings_summary(static.placement.holdings)}")
    print(f"plan       {best.plan.describe()}")
    print(f"predicted  {best.total_s * 1e3:.2f} ms = compute {best.compute_s * 1e3:.2f} ms + communication "
          f"{best.comm_s * 1e3:.2f} ms ({best.messages()} messages)")
    print("\nsteps (critical path):")
    for s in best.steps:
        times = f" x{s.count}" if s.count > 1 else ""
        extra = f"  {s.messages} msg, {s.bytes / 1024:.1f} KB up" if s.kind == "comm" else ""
        print(f"  {s.kind:7s} {_ms(s.total_s)}  {s.name}{times}{extra}")
    print("\nper device:")
    print(f"  {'device':12s} {'compute':>12s} {'upload':>10s} {'download':>10s} {'memory':>9s} {'budget':>9s}")
    for d in best.devices:
        print(f"  {d.device:12s} {_ms(d.compute_s)} {d.upload_bytes / 1024:8.1f}KB {d.download_bytes / 1024:8.1f}KB "
              f"{d.memory_bytes / 2**20:7.0f}MB {d.budget_bytes / 2**20:7.0f}MB")
    if args.explain:
        print("\nalternatives:")
        for alt in ranked[1:6]:
            print(f"  {alt.total_s * 1e3:9.2f} ms (+{(alt.total_s - best.total_s) * 1e3:.2f})  "
                  f"{alt.plan.describe()}: {why_lost(alt, best)}")
    return 0


def model_config(args: argparse.Namespace):  # -> ModelConfig
    """A preset with the DeTransformer knobs, or a shapes-catalog name (which fixes them)."""
    from detransformer_edge.errors import ConfigError
    from detransformer_edge.model.config import PRESETS, get_config
    from detransformer_edge.service.catalog import SHAPES, shape_config

    if args.model in SHAPES and args.model not in PRESETS:
        given = [f"--{n.replace('_', '-')}" for n in ("nd", "nb", "sub_attn") if getattr(args, n) is not None]
        if given:
            preset = SHAPES[args.model][0]
            raise ConfigError(f"--model {args.model} fixes the layout; drop {', '.join(given)} "
                              f"or use --model {preset} with them")
        return shape_config(args.model)
    nb = 2 if args.nb is None else args.nb
    if not nb:
        return get_config(args.model)
    return get_config(args.model, nd=4 if args.nd is None else args.nd, nb=nb, sub_attn=args.sub_attn or "full")


def why_lost(alt: object, best: object) -> str:
    """One phrase: which component made ``alt`` slower than ``best``."""
    d_comm = alt.comm_s - best.comm_s  # type: ignore[attr-defined]
    d_comp = alt.compute_s - best.compute_s  # type: ignore[attr-defined]
    if abs(d_comm) < 1e-9 and abs(d_comp) < 1e-9:
        coord = alt.plan.coordinator  # type: ignore[attr-defined]
        if coord != best.plan.coordinator:  # type: ignore[attr-defined]
            return f"same predicted time with {coord} (a spare holder of the embeddings) coordinating"
        return "same predicted time; ranked after on fewer devices, then wire precision"
    if d_comm >= d_comp:
        msgs = alt.messages() - best.messages()  # type: ignore[attr-defined]
        return (f"more communication (+{d_comm * 1e3:.2f} ms, {msgs:+d} messages)"
                + (f", though compute {d_comp * 1e3:+.2f} ms" if d_comp < 0 else ""))
    return (f"slower compute on its critical path (+{d_comp * 1e3:.2f} ms)"
            + (f", though communication {d_comm * 1e3:+.2f} ms" if d_comm < 0 else ""))
