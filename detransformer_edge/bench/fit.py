"""Fit the cost model's constants (``planner/terms.py``) to benchmark results, and report how
well the model predicts them (pure; ``python -m detransformer_edge.bench.fit FILE...``).

Every result row is predicted again with the cost model of *this* tree for the plan the leader
ran (``plan_desc``), on the device profiles of its home: the profiles recorded with the result
(``device_profiles``), or for older files rebuilt from what they recorded (``device_gflops``,
the link rate, the CPU quotas, ``cpu_share_concurrent``; memory bandwidth solved from the
single-device prediction the bench recorded). Rows from a *quiet* host (every device got at
least 85 % of its quota with all devices busy) are fitted; the others are reported apart.

    python -m detransformer_edge.bench.fit bench/results/results-quiet.json \\
        bench/results/control-period100.json bench/results/results.json          # fit + report
    python -m detransformer_edge.bench.fit --check FILE...   # the shipped constants: >= 90 % of
                                                            # the enc128 matrix within +-20 %?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detransformer_edge.bench.results import Result, load_report
from detransformer_edge.bench.runner import TESTBED_HOST, host_cores
from detransformer_edge.bench.spec import WORKLOADS
from detransformer_edge.errors import ConfigError
from detransformer_edge.model.config import ModelConfig
from detransformer_edge.parallel.plan import Plan, PlanError, Stage
from detransformer_edge.planner.cost import Broker, CostModel, Request
from detransformer_edge.planner.profile import DeviceProfile, profile_from_dict
from detransformer_edge.planner.terms import FITTED, CostTerms
from detransformer_edge.service.catalog import shape_config

TOLERANCE = 0.20  # a prediction within +-20 % of the measured median counts as right
TARGET_WITHIN = 0.90  # of the enc128 matrix (quiet host, 4 x 0.4 CPU)
QUIET_SHARE = 0.85  # every device got at least this fraction of its quota with all busy


def plan_from_description(desc: str) -> Plan:
    """The plan ``Plan.describe()`` printed (sub-block indices dealt in order: only counts are
    printed, and the cost model needs only them)."""
    m = re.fullmatch(r"(?:[\w.-]+: )?(.*) \((float32|float16|int8)\)", desc.strip())
    if m is None:
        raise ConfigError(f"not a plan description: {desc!r}")
    body, wire = m.group(1), m.group(2)
    try:
        if body.startswith("single on "):
            return Plan("single", (body[len("single on "):],), wire)  # type: ignore[arg-type]
        if body.startswith("tp over "):
            return Plan("tp", tuple(body[len("tp over "):].split(",")), wire)  # type: ignore[arg-type]
        if body.startswith("pipeline "):
            stages = tuple(Stage(d, int(a), int(b)) for d, a, b in re.findall(r"([^\s,\[]+)\[(\d+):(\d+)\]", body))
            return Plan("pipeline", tuple(s.device for s in stages), wire, stages)  # type: ignore[arg-type]
        b = re.fullmatch(r"block (.*) coupled=(\w+)(?:@(\S+))?", body)
        if b is not None:
            counts = [(d, int(c)) for d, c in re.findall(r"([^\s,:]+):(\d+)", b.group(1))]
            owners = tuple(d for d, _ in counts)
            cdevs = tuple(b.group(3).split(",")) if b.group(3) else ()
            return Plan("block", owners + tuple(d for d in cdevs if d not in owners), wire,  # type: ignore[arg-type]
                        sub_block_owner=tuple(d for d, c in counts for _ in range(c)),
                        coupled=b.group(2), coupled_devices=cdevs)  # type: ignore[arg-type]
    except PlanError as exc:
        raise ConfigError(f"bad plan description {desc!r}: {exc}") from None
    raise ConfigError(f"not a plan description: {desc!r}")


@dataclass(frozen=True)
class Case:
    """One result row, ready to predict: the model, the plan it ran, its home's profiles."""

    result: Result
    cfg: ModelConfig
    plan: Plan
    profiles: tuple[DeviceProfile, ...]
    quiet: bool
    source: str

    @property
    def kind(self) -> str:
        return self.result.plan

    @property
    def enc128_matrix(self) -> bool:
        r = self.result
        return r.workload == "enc128" and r.home == "homo" and r.devices == 4

    def measured(self) -> dict[str, float]:
        r = self.result
        if r.ms_per_token is not None and r.ttft is not None:
            return {"TTFT ms": r.ttft.median * 1e3, "ms/token": r.ms_per_token.median}
        return {"latency ms": r.latency.median * 1e3}

    def predict(self, terms: CostTerms) -> dict[str, float]:
        r = self.result
        cost = CostModel(self.cfg, self.profiles, Broker(r.broker_mbit), terms)
        w = WORKLOADS[r.workload]
        if w.family == "decoder":
            ttft = cost.latency(self.plan, Request("prefill", w.seq))
            steps = [cost.latency(self.plan, Request("decode", w.seq + k)) for k in range(w.new_tokens - 1)]
            return {"TTFT ms": ttft * 1e3, "ms/token": 1e3 * sum(steps) / max(1, len(steps))}
        return {"latency ms": cost.latency(self.plan, Request("encode", w.seq)) * 1e3}


@dataclass(frozen=True)
class Prediction:
    case: Case
    metric: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured

    @property
    def within(self) -> bool:
        return abs(self.error) <= TOLERANCE


def _quiet(r: Result) -> bool:
    shares = r.cpu_share_concurrent
    return bool(shares) and min(s / c for s, c in zip(shares, r.cpu)) >= QUIET_SHARE


def rebuilt_profiles(r: Result, host_cpus: float, mem_bw: float) -> tuple[DeviceProfile, ...]:
    """The profiles ``bench`` gave the agents (``runner.device_profiles`` + ``_calibrate``),
    with the quota and host fields it sets since."""
    names = [f"dev{i}" for i in range(r.devices)]
    cores = host_cores(r.cpu, r.cpu_share_concurrent, host_cpus)
    return tuple(
        DeviceProfile(n, gflops=g, attn_gflops=g, mem_bw_gbs=mem_bw * c, ram_mb=2500, link_mbit=float(r.bandwidth_mbit),
                      link="ethernet", cores=1, cpu_quota=c, quota_period_ms=r.cfs_period_ms or 100.0,
                      host=TESTBED_HOST, host_cores=cores)
        for n, g, c in zip(names, r.device_gflops, r.cpu)
    )


def _solve_mem_bw(single: Result, cfg: ModelConfig) -> float:
    """Per-core copy bandwidth (GB/s) that makes the old single-device prediction come out as
    recorded (it is compute-bound at long sequences: any large value then does)."""
    target = single.predicted_s
    if target is None:
        return 25.0
    w = WORKLOADS[single.workload]
    mode = "prefill" if w.family == "decoder" else "encode"
    plan = plan_from_description(single.predicted_plan or single.plan_desc)

    def predicted(bw: float) -> float:
        profs = [DeviceProfile(f"dev{i}", gflops=g, attn_gflops=g, mem_bw_gbs=bw * c, ram_mb=2500,
                               link_mbit=float(single.bandwidth_mbit), link="ethernet")
                 for i, (g, c) in enumerate(zip(single.device_gflops, single.cpu))]
        t = CostModel(cfg, profs, Broker(single.broker_mbit), CostTerms()).latency(plan, Request(mode, w.seq))
        if w.family == "decoder":  # the bench recorded prefill + every decode step
            cm = CostModel(cfg, profs, Broker(single.broker_mbit), CostTerms())
            t += sum(cm.latency(plan, Request("decode", w.seq + k)) for k in range(w.new_tokens - 1))
        return t

    lo, hi = 0.05, 400.0
    if predicted(hi) >= target:
        return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if predicted(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def load_cases(paths: Sequence[str | Path]) -> list[Case]:
    cases: list[Case] = []
    for path in paths:
        results, _, meta = load_report(json.loads(Path(path).read_text()))
        host_cpus = float(meta.get("host_cpus", 2))
        singles = {(r.workload, r.home, r.devices, r.bandwidth_mbit, r.cfs_period_ms): r
                   for r in results if r.plan == "single"}
        bw_cache: dict[tuple[Any, ...], float] = {}
        for r in results:
            desc = r.plan_desc or r.predicted_plan
            if not desc or r.model == "" or r.workload not in WORKLOADS:
                continue
            variant = re.match(r"([\w.-]+): ", desc)  # the leader ran another variant of the family
            cfg = shape_config(variant.group(1) if variant else r.model)
            if r.device_profiles:
                profiles = tuple(profile_from_dict(dict(p), source=f"{path}") for p in r.device_profiles)
            else:
                key = (r.workload, r.home, r.devices, r.bandwidth_mbit, r.cfs_period_ms)
                if key not in bw_cache:
                    single = singles.get(key)
                    bw_cache[key] = _solve_mem_bw(single, shape_config(single.model)) if single else 25.0
                profiles = rebuilt_profiles(r, host_cpus, bw_cache[key])
            cases.append(Case(r, cfg, plan_from_description(desc), profiles, _quiet(r), Path(path).name))
    return cases


def predictions(cases: Iterable[Case], terms: CostTerms) -> list[Prediction]:
    out = []
    for c in cases:
        measured = c.measured()
        for metric, value in c.predict(terms).items():
            out.append(Prediction(c, metric, value, measured[metric]))
    return out


def within(preds: Sequence[Prediction]) -> float:
    return sum(p.within for p in preds) / len(preds) if preds else float("nan")


def _loss(preds: Sequence[Prediction]) -> tuple[int, float]:
    """Misses first, then the mean squared log error (smooth, symmetric)."""
    return (sum(not p.within for p in preds), statistics.fmean(math.log(p.predicted / p.measured) ** 2 for p in preds))


FIT_FIELDS = ("msg_cpu_ms", "msg_cpu_ms_per_mb", "request_cpu_ms")
GRIDS: dict[str, tuple[float, ...]] = {
    "msg_cpu_ms": (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0),
    "msg_cpu_ms_per_mb": (0.0, 2.0, 5.0, 10.0, 20.0),
    "request_cpu_ms": (0.0, 50.0, 100.0, 125.0, 150.0, 175.0, 200.0, 250.0, 300.0),
}


def fit(cases: Sequence[Case], start: CostTerms = FITTED, rounds: int = 3,
        progress: Callable[[str], None] | None = None) -> CostTerms:
    """Every point of ``GRIDS`` (a few hundred), then ``rounds - 1`` rounds of coordinate
    refinement around the best (deterministic; misses first, then mean squared log error)."""
    import itertools

    best = start
    best_loss = _loss(predictions(cases, best))
    for values in itertools.product(*(GRIDS[name] for name in FIT_FIELDS)):
        cand = dataclasses.replace(start, **dict(zip(FIT_FIELDS, values)))
        loss = _loss(predictions(cases, cand))
        if loss < best_loss:
            best, best_loss = cand, loss
    if progress:
        progress(f"grid: {best} (misses {best_loss[0]}, msle {best_loss[1]:.4f})")
    for r in range(1, rounds):
        for name in FIT_FIELDS:
            cur = getattr(best, name)
            step = max(abs(cur), 0.5) * 0.5 ** r
            for k in (-2, -1, 1, 2):
                v = max(0.0, cur + k * step / 2)
                cand = dataclasses.replace(best, **{name: round(v, 3)})
                loss = _loss(predictions(cases, cand))
                if loss < best_loss:
                    best, best_loss = cand, loss
        if progress:
            progress(f"round {r + 1}: {best} (misses {best_loss[0]}, msle {best_loss[1]:.4f})")
    return best


def summary_table(preds: Sequence[Prediction]) -> str:
    by: dict[tuple[str, str], list[Prediction]] = {}
    for p in preds:
        by.setdefault((p.case.kind, p.metric), []).append(p)
    order = {k: i for i, k in enumerate(("single", "pipeline", "tp", "bp-fixed", "adaptive"))}
    lines = ["| plan | metric | predictions | median error | within ±20 % |", "| --- | --- | ---: | ---: | ---: |"]
    for (kind, metric), rows in sorted(by.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9))):
        lines.append(f"| {kind} | {metric} | {len(rows)} | {statistics.median(p.error for p in rows) * 100:+.0f} % "
                     f"| {within(rows) * 100:.0f} % |")
    lines.append(f"| **all** | | {len(preds)} | {statistics.median(p.error for p in preds) * 100:+.0f} % "
                 f"| **{within(preds) * 100:.0f} %** |")
    return "\n".join(lines)


def rows_table(preds: Sequence[Prediction]) -> str:
    lines = ["| file | configuration | plan | metric | predicted | measured | error |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for p in preds:
        r = p.case.result
        cfg = f"{r.workload}, {r.home} {'/'.join(f'{c:g}' for c in r.cpu)}, {r.bandwidth_mbit} Mbit"
        if r.cfs_period_ms is not None:
            cfg += f", period {r.cfs_period_ms:g} ms"
        lines.append(f"| {p.case.source} | {cfg} | {p.case.kind} | {p.metric} | {p.predicted:.0f} | {p.measured:.0f} "
                     f"| {p.error * 100:+.0f} %{'' if p.within else ' ✗'} |")
    return "\n".join(lines)


def report(cases: Sequence[Case], terms: CostTerms) -> str:
    preds = predictions(cases, terms)
    quiet = [p for p in preds if p.case.quiet]
    matrix = [p for p in quiet if p.case.enc128_matrix]
    loaded = [p for p in preds if not p.case.quiet]
    out = [f"terms: {terms}", "",
           f"enc128 matrix, quiet host (4 x 0.4 CPU): {sum(p.within for p in matrix)} of {len(matrix)} within ±20 % "
           f"({within(matrix) * 100:.0f} %)", "", summary_table(matrix), "",
           f"every quiet-host row: {sum(p.within for p in quiet)} of {len(quiet)} ({within(quiet) * 100:.0f} %)", "",
           summary_table(quiet), ""]
    if loaded:
        out += [f"loaded host (not fitted): {sum(p.within for p in loaded)} of {len(loaded)} "
                f"({within(loaded) * 100:.0f} %)", "", summary_table(loaded), ""]
    out += ["every row:", "", rows_table(preds)]
    return "\n".join(out)


def check(cases: Sequence[Case], terms: CostTerms = FITTED) -> tuple[bool, float]:
    matrix = [p for p in predictions(cases, terms) if p.case.quiet and p.case.enc128_matrix]
    share = within(matrix)
    return share >= TARGET_WITHIN, share


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m detransformer_edge.bench.fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=["bench/results/results-quiet.json", "bench/results/control-period100.json",
                                                 "bench/results/results.json"])
    ap.add_argument("--check", action="store_true", help="only check the shipped constants (exit 1 below 90 %%)")
    ap.add_argument("--terms", default=None, help="JSON of CostTerms fields to report instead of fitting")
    args = ap.parse_args(argv)
    cases = load_cases(args.files)
    if args.check:
        ok, share = check(cases)
        print(f"enc128 matrix, quiet host: {share * 100:.0f} % of predictions within ±20 % with {FITTED} "
              f"(target ≥ {TARGET_WITHIN * 100:.0f} %): {'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    if args.terms is not None:
        terms = dataclasses.replace(CostTerms(), **json.loads(args.terms))
    else:
        quiet = [c for c in cases if c.quiet]
        terms = fit(quiet, CostTerms(), progress=lambda line: print(line, file=sys.stderr))
    print(report(cases, terms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
