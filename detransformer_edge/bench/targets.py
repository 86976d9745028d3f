"""Issue 6's targets checked against benchmark results, and the cost model's predictions
next to the measurements (pure; `python -m detransformer_edge.bench.targets results.json`
prints both as markdown for docs/BENCHMARKS.md and docs/PLANNER.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detransformer_edge.bench.results import Result, load_report

# adaptive / single, encoder seq 128, 4 homogeneous devices (lower is better)
RATIO_LIMITS = {1000: 0.45, 100: 0.55, 50: 0.8, 20: 1.0}
NEVER_WORSE = 1.05  # at any bandwidth, adaptive at most 5 % slower than one device
TP_SPEEDUP_AT_100 = 4.0
HETERO_SPEEDUP_OVER_BP = 1.5


@dataclass(frozen=True)
class TargetCheck:
    target: str
    required: str
    measured: str
    met: bool
    margin: str  # how far inside (+) or outside (-) the target, in words


def _homo4(results: Sequence[Result], workload: str = "enc128", period: float | None = None) -> dict[tuple[str, int], Result]:
    return {(r.plan, r.bandwidth_mbit): r for r in results
            if r.workload == workload and r.home == "homo" and r.devices == 4 and r.cfs_period_ms == period}


def check_targets(results: Sequence[Result], cfs_period_ms: float | None = None) -> list[TargetCheck]:
    """The targets on the results of the default testbed (or of a ``--cfs-period-ms`` experiment)."""
    out: list[TargetCheck] = []
    h = _homo4(results, period=cfs_period_ms)
    bws = sorted({b for (_, b) in h})
    for bw in bws:
        a, s = h.get(("adaptive", bw)), h.get(("single", bw))
        if a is None or s is None:
            continue
        ratio = a.latency.median / s.latency.median
        limit = min(RATIO_LIMITS.get(bw, NEVER_WORSE), NEVER_WORSE)
        out.append(TargetCheck(f"enc128, 4 × 0.4 CPU, {bw} Mbit: adaptive / one device", f"≤ {limit:.2f}×",
                               f"{ratio:.2f}× ({a.latency.median * 1e3:.0f} / {s.latency.median * 1e3:.0f} ms)",
                               ratio <= limit, f"{(limit - ratio) / limit * 100:+.0f} %"))
    a, t = h.get(("adaptive", 100)), h.get(("tp", 100))
    if a and t:
        sp = t.latency.median / a.latency.median
        out.append(TargetCheck("enc128, 100 Mbit: adaptive faster than Megatron TP", f"≥ {TP_SPEEDUP_AT_100:.1f}×",
                               f"{sp:.2f}×", sp >= TP_SPEEDUP_AT_100, f"{(sp - TP_SPEEDUP_AT_100) / TP_SPEEDUP_AT_100 * 100:+.0f} %"))
    for bw in bws:
        a, b = h.get(("adaptive", bw)), h.get(("bp-fixed", bw))
        if a and b:
            r = a.latency.median / b.latency.median
            out.append(TargetCheck(f"enc128, {bw} Mbit: adaptive never slower than fixed BP", "≤ 1.00×",
                                   f"{r:.2f}×", r <= 1.0, f"{(1.0 - r) * 100:+.0f} %"))
    hetero = {r.plan: r for r in results if r.workload == "enc128" and r.home == "hetero" and r.devices == 4
              and r.bandwidth_mbit == 100 and r.cfs_period_ms == cfs_period_ms}
    if "adaptive" in hetero and "bp-fixed" in hetero:
        sp = hetero["bp-fixed"].latency.median / hetero["adaptive"].latency.median
        out.append(TargetCheck("enc128, hetero 0.8/0.4/0.2/0.2, 100 Mbit: adaptive faster than fixed equal-split BP",
                               f"≥ {HETERO_SPEEDUP_OVER_BP:.1f}×", f"{sp:.2f}×", sp >= HETERO_SPEEDUP_OVER_BP,
                               f"{(sp - HETERO_SPEEDUP_OVER_BP) / HETERO_SPEEDUP_OVER_BP * 100:+.0f} %"))
    d = _homo4(results, "dec", cfs_period_ms)
    for bw in sorted({b for (_, b) in d}):
        a = d.get(("adaptive", bw))
        if a is None or a.ms_per_token is None:
            continue
        for base in ("tp", "single"):
            o = d.get((base, bw))
            if o is None or o.ms_per_token is None:
                continue
            r = a.ms_per_token.median / o.ms_per_token.median
            out.append(TargetCheck(f"decoder, {bw} Mbit: adaptive ms/token ≤ {base}", "≤ 1.00×",
                                   f"{r:.2f}× ({a.ms_per_token.median:.0f} / {o.ms_per_token.median:.0f} ms)",
                                   r <= 1.0, f"{(1.0 - r) * 100:+.0f} %"))
    return out


def targets_markdown(checks: Sequence[TargetCheck]) -> str:
    lines = ["| target | required | measured | met | margin |", "| --- | ---: | ---: | :---: | ---: |"]
    lines += [f"| {c.target} | {c.required} | {c.measured} | {'yes' if c.met else '**no**'} | {c.margin} |" for c in checks]
    return "\n".join(lines)


@dataclass(frozen=True)
class PredictionRow:
    config: str
    plan: str
    metric: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def prediction_rows(results: Sequence[Result]) -> list[PredictionRow]:
    rows = []
    for r in results:
        cfg = f"{r.workload}, {r.home} {r.devices}×({'/'.join(f'{c:g}' for c in r.cpu)}), {r.bandwidth_mbit} Mbit"
        if r.cfs_period_ms is not None:
            cfg += f", quota period {r.cfs_period_ms:g} ms"
        if r.ms_per_token is not None and r.predicted_ms_per_token is not None:
            rows.append(PredictionRow(cfg, r.plan, "ms/token", r.predicted_ms_per_token, r.ms_per_token.median))
            if r.ttft is not None and r.predicted_ttft_s is not None:
                rows.append(PredictionRow(cfg, r.plan, "TTFT ms", r.predicted_ttft_s * 1e3, r.ttft.median * 1e3))
        elif r.predicted_s is not None and r.ttft is None:
            rows.append(PredictionRow(cfg, r.plan, "latency ms", r.predicted_s * 1e3, r.latency.median * 1e3))
    return rows


def within(rows: Sequence[PredictionRow], tolerance: float = 0.25) -> float:
    return sum(abs(r.error) <= tolerance for r in rows) / len(rows) if rows else float("nan")


def ranking_agreement(results: Sequence[Result]) -> tuple[int, int]:
    """Scenarios (workload, home, devices, bandwidth) where the plan the cost model ranks fastest
    is also the fastest measured, over all scenarios with at least two predicted plans."""
    groups: dict[tuple[object, ...], list[Result]] = {}
    for r in results:
        if r.predicted_s is not None:
            groups.setdefault((r.workload, r.home, r.devices, r.bandwidth_mbit, r.cfs_period_ms), []).append(r)
    agree = total = 0
    for rs in groups.values():
        if len(rs) < 2:
            continue
        def measured(r: Result) -> float:
            return r.ms_per_token.median if r.ms_per_token else r.latency.median

        def predicted(r: Result) -> float:
            return r.predicted_ms_per_token if r.predicted_ms_per_token is not None else r.predicted_s  # type: ignore[return-value]
        total += 1
        agree += min(rs, key=predicted).plan == min(rs, key=measured).plan
    return agree, total


def error_summary(results: Sequence[Result]) -> str:
    """Per plan (and metric): how many predictions, the median error, the share within ±25 %."""
    import statistics

    by: dict[tuple[str, str], list[PredictionRow]] = {}
    for r in prediction_rows(results):
        by.setdefault((r.plan, r.metric), []).append(r)
    order = {p: i for i, p in enumerate(("single", "pipeline", "tp", "bp-fixed", "adaptive"))}
    lines = ["| plan | metric | configurations | median error | within ±25 % |", "| --- | --- | ---: | ---: | ---: |"]
    for (plan, metric), rows in sorted(by.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        lines.append(f"| {plan} | {metric} | {len(rows)} | {statistics.median(r.error for r in rows) * 100:+.0f} % "
                     f"| {within(rows) * 100:.0f} % |")
    return "\n".join(lines)


def predictions_markdown(results: Sequence[Result], workloads: Sequence[str] | None = None) -> str:
    if workloads is not None:
        results = [r for r in results if r.workload in workloads]
    rows = prediction_rows(results)
    lines = ["| configuration | plan | metric | predicted | measured | error |", "| --- | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r.config} | {r.plan} | {r.metric} | {r.predicted:.0f} | {r.measured:.0f} | {r.error * 100:+.0f} % |"
              for r in rows]
    agree, total = ranking_agreement(results)
    lines += ["", f"Within ±25 %: {sum(abs(r.error) <= 0.25 for r in rows)} of {len(rows)} "
              f"({within(rows) * 100:.0f} %). Fastest plan predicted = fastest measured in {agree} of {total} scenarios."]
    return "\n".join(lines)


def ratio_table(results: Sequence[Result], home: str = "homo", devices: int = 4,
                cfs_period_ms: float | None = None) -> str:
    """Per workload and link rate: one device's median, and every plan as a multiple of it
    (decoders: ms per token)."""
    plans = ("pipeline", "tp", "bp-fixed", "adaptive")
    rows: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        if r.home == home and r.devices == devices and r.cfs_period_ms == cfs_period_ms:
            rows.setdefault((r.workload, r.bandwidth_mbit), {})[r.plan] = r
    order = {w: i for i, w in enumerate(("enc16", "enc64", "enc128", "dec"))}
    lines = ["| workload | Mbit/s | one device | " + " | ".join(plans) + " | adaptive chose |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in plans) + " | --- |"]
    for (w, bw), by in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        single = by.get("single")
        if single is None:
            continue
        dec = single.ms_per_token is not None
        base = single.ms_per_token.median if dec and single.ms_per_token else single.latency.median

        def cell(p: str, by: dict[str, Result] = by, dec: bool = dec, base: float = base) -> str:
            r = by.get(p)
            if r is None:
                return ""
            v = r.ms_per_token.median if dec and r.ms_per_token else r.latency.median
            return f"{v / base:.2f}×"
        one = f"{base:.0f} ms/token" if dec else f"{base * 1e3:.0f} ms"
        chose = by["adaptive"].plan_desc if "adaptive" in by else ""
        lines.append(f"| {w} | {bw} | {one} | " + " | ".join(cell(p) for p in plans) + f" | {chose} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "bench/results/results.json")
    results, link, _ = load_report(json.loads(path.read_text()))
    for home, n in sorted({(r.home, r.devices) for r in results}):
        print(f"## {home}, {n} devices: multiple of one device (lower is better)\n")
        print(ratio_table(results, home, n) + "\n")
    print("## Targets\n")
    print(targets_markdown(check_targets(results)))
    print("\n## Predicted vs measured\n")
    print(error_summary(results) + "\n")
    print(predictions_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
