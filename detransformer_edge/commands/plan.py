"""`detransformer-edge plan`: place a model on a set of device profiles and show the plan the
runtime planner would choose for one request, with its predicted cost breakdown."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detransformer_edge.planner.cost import Breakdown

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
    parser.add_argument("--explain", action="store_true",
                        help="also say why the placement looks as it does, which variants were considered (and why "
                             "some were not), and list the 5 best alternatives and why they lost")
    parser.add_argument("--catalog", choices=("pretrained", "shapes"), default=None,
                        help="plan a served model of this catalog and every variant of its family the catalog holds "
                             "(the leader's choice: task budgets, quality, margin); --model names the model")
    parser.add_argument("--variants", default=None,
                        help="with --catalog: only these models of the family (comma-separated; default: all)")
    parser.add_argument("--max-ppl-ratio", type=float, default=None,
                        help="decoders' quality budget: held-out perplexity at most this multiple of the teacher's "
                             "(default 1.10)")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="encoders' quality budget: embedding cosine to the teacher (default 0.95)")
    parser.add_argument("--margin", type=float, default=None,
                        help="a multi-device plan must be predicted this much faster than one device (default 0.10)")


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
    if args.catalog is not None:
        return run_family(args, profiles)
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
    if args.explain:
        print(f"           {static.why}")
    print(f"plan       {best.plan.describe()}")
    show_breakdown(best)
    if args.explain:
        show_alternatives(ranked, best)
    return 0


def show_breakdown(best: Breakdown) -> None:
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


def show_alternatives(ranked: list[Breakdown], best: Breakdown) -> None:
    print("\nalternatives:")
    for alt in [r for r in ranked if r.plan != best.plan][:5]:
        print(f"  {alt.total_s * 1e3:9.2f} ms (+{(alt.total_s - best.total_s) * 1e3:.2f})  "
              f"{alt.plan.describe()}: {why_lost(alt, best)}")


def run_family(args: argparse.Namespace, profiles: list) -> int:  # list[DeviceProfile]
    """Plan a catalog model the way the leader does: a static placement per variant of its
    family, then the variant planner's choice for the request."""
    from detransformer_edge.errors import ConfigError
    from detransformer_edge.planner.cost import Broker, Request
    from detransformer_edge.planner.runtime import holdings_summary
    from detransformer_edge.planner.static import plan_static
    from detransformer_edge.planner.variants import (
        DEFAULT_MARGIN,
        TaskBudget,
        Variant,
        VariantPlanner,
        variants_summary,
    )
    from detransformer_edge.service.catalog import CATALOGS

    catalog = CATALOGS[args.catalog]()
    served = catalog.get(args.model)
    names = catalog.variants(args.model)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in names]
        if unknown:
            raise ConfigError(f"--variants {', '.join(unknown)}: not in {args.model}'s family ({', '.join(names)})")
        names = tuple(n for n in names if n in wanted or n == args.model)
    overrides = {k: v for k, v in (("max_ppl_ratio", args.max_ppl_ratio), ("min_cosine", args.min_cosine))
                 if v is not None}
    budget = TaskBudget.for_task(served.task, unvalidated=not catalog.quality_required, **overrides)
    if args.accuracy is not None:
        from detransformer_edge.planner.runtime import WIRE_DTYPES_BY_ACCURACY

        budget = dataclasses.replace(budget, wires=WIRE_DTYPES_BY_ACCURACY[args.accuracy])
    broker = Broker(args.broker_mbit, args.per_message_ms)
    first = catalog.get(names[0]).config()
    mode = args.mode or ("prefill" if first.family == "decoder" else "encode")
    request = Request(mode, args.seq, args.batch)
    variants, statics = [], {}
    for name in names:
        cfg = catalog.get(name).config()
        statics[name] = plan_static(profiles, cfg, broker=broker, coordinator=args.coordinator)
        variants.append(Variant(name, cfg, statics[name].placement, catalog.get(name).quality))
    vp = VariantPlanner(variants, profiles, budget, broker=broker, coordinator=args.coordinator,
                        margin=DEFAULT_MARGIN if args.margin is None else args.margin)
    choice = vp.choose(request)
    best = choice.breakdown
    print(f"model      {args.model} ({served.task}; family {catalog.family_of(args.model)}: {', '.join(names)}); "
          f"request {mode} seq {args.seq} batch {args.batch}")
    print(f"budget     wire {'/'.join(budget.wires)}; decoders <= {budget.max_ppl_ratio:.2f}x the teacher's perplexity, "
          f"encoders >= {budget.min_cosine:.3f} cosine{'; unvalidated variants allowed' if budget.unvalidated else ''}")
    for name in names:
        print(f"placement  {name}: {statics[name].label}: {holdings_summary(statics[name].placement.holdings)}")
        if args.explain:
            print(f"           {statics[name].why}")
    print(f"variant    {choice.variant}: {choice.reason}")
    if args.explain:
        for line in variants_summary(choice):
            print(f"           {line}")
    print(f"plan       {best.plan.describe()}")
    show_breakdown(best)
    if args.explain:
        show_alternatives(vp.planners[choice.variant].ranked(request, 6), best)
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
