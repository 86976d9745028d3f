"""Benchmark results as data: per-run samples aggregated into medians with min and max, ratios
to the single-device plan of the same scenario, and the JSON / markdown forms (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from detransformer_edge.errors import ConfigError

SCHEMA = 1


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ConfigError("no samples to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Samples:
    """What one plan of one workload produced in one scenario, run by run."""

    plan: str
    workload: str
    home: str
    cpu: tuple[float, ...]
    bandwidth_mbit: int
    broker_mbit: int | None
    model: str
    latency_s: list[float] = field(default_factory=list)  # publish -> final reply, client side
    ttft_s: list[float] = field(default_factory=list)  # decoder: time to first token, client side
    ms_per_token: list[float] = field(default_factory=list)  # decoder: decode steps after the first
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    plan_desc: str = ""  # the plan the leader reported (last run)
    predicted_s: float | None = None  # the cost model's prediction for that plan
    predicted: dict[str, Any] = field(default_factory=dict)  # runner.predict(): desc, ttft_s, ms_per_token
    device_gflops: tuple[float, ...] = ()  # the planner profiles' compute rates in this scenario
    cpu_share_concurrent: tuple[float, ...] = ()  # busy loops in every device at once: what the host gave
    device_profiles: tuple[dict[str, Any], ...] = ()  # the planner profiles the agents had (bench.fit reads them)
    server_s: list[float] = field(default_factory=list)  # the leader's own latency_ms (request in -> reply out)
    cfs_period_ms: float | None = None  # None: the testbed's 100 ms
    where: list[dict[str, float]] = field(default_factory=list)  # traced runs: where the time went

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.home, self.workload, len(self.cpu), self.bandwidth_mbit, self.cfs_period_ms, self.plan)

    def add_reply(self, latency_s: float, result: Mapping[str, Any]) -> None:
        """One successful run: the client-side latency and the leader's result fields."""
        self.latency_s.append(latency_s)
        if "trace" in result:
            self.where.append(where_time_went(latency_s, result["trace"], self.bandwidth_mbit))
        if "latency_ms" in result:
            self.server_s.append(float(result["latency_ms"]) / 1e3)
        self.plan_desc = str(result.get("plan", self.plan_desc))
        if "ttft_ms" in result:
            tokens = int(result.get("tokens", 0))
            server_total_s = float(result.get("latency_ms", latency_s * 1e3)) / 1e3
            server_ttft_s = float(result["ttft_ms"]) / 1e3
            # the client sees the server's first token plus the request's path to the leader
            self.ttft_s.append(server_ttft_s + max(0.0, latency_s - server_total_s))
            self.tokens.append(tokens)
            if tokens > 1:
                self.ms_per_token.append((server_total_s - server_ttft_s) / (tokens - 1) * 1e3)


def where_time_went(latency_s: float, trace: Sequence[Sequence[Any]], link_mbit: float) -> dict[str, float]:
    """One traced run's reply rows (``result.trace``) split as ``parallel/trace.py``
    ``where_time_went`` splits them: compute, wire, codec, publish, planning, residual (s)."""
    from detransformer_edge.parallel import trace as timeline

    return timeline.where_time_went(latency_s, [timeline.Span.from_list(row) for row in trace], link_mbit)


def where_table(samples: Sequence[Samples]) -> str:
    """Medians of the traced runs per plan: what ``bench --trace`` prints."""
    import statistics

    rows = [s for s in samples if s.where]
    if not rows:
        return ""
    keys = ("latency_s", "compute_s", "wire_s", "codec_s", "publish_s", "plan_s", "residual_s")
    lines = ["Where the time goes (medians of the traced runs, ms; compute: the slowest device; wire: its bytes at "
             "the link rate; codec / publish: the busiest device; residual: latency − compute − wire)", "",
             "| workload | Mbit/s | plan | latency | compute | wire | codec | publish | planning | residual |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in rows:
        med = {k: statistics.median(w[k] for w in s.where) * 1e3 for k in keys}
        lines.append(f"| {s.workload} | {s.bandwidth_mbit} | {s.plan} | " + " | ".join(f"{med[k]:.0f}" for k in keys[:-2])
                     + f" | {med['plan_s']:.1f} | {med['residual_s']:.0f} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Result:
    plan: str
    workload: str
    home: str
    devices: int
    cpu: tuple[float, ...]
    bandwidth_mbit: int
    broker_mbit: int | None
    model: str
    latency: Stats
    plan_desc: str
    errors: int
    ttft: Stats | None = None
    ms_per_token: Stats | None = None
    tokens: float | None = None
    predicted_s: float | None = None
    vs_single: float | None = None  # median / the single-device median (lower is better)
    ms_per_token_vs_single: float | None = None
    predicted_ttft_s: float | None = None
    predicted_ms_per_token: float | None = None
    predicted_plan: str = ""  # the plan the cost model predicted for (adaptive: its own choice)
    device_gflops: tuple[float, ...] = ()
    cpu_share_concurrent: tuple[float, ...] = ()
    server_median_s: float | None = None
    device_profiles: tuple[dict[str, Any], ...] = ()
    cfs_period_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "plan": self.plan, "workload": self.workload, "home": self.home,
            "bandwidth_mbit": self.bandwidth_mbit, "devices": self.devices, "cpu": list(self.cpu),
            "broker_mbit": self.broker_mbit, "model": self.model,
            "median_s": round(self.latency.median, 5), "min_s": round(self.latency.min, 5),
            "max_s": round(self.latency.max, 5), "runs": self.latency.n, "errors": self.errors,
            "plan_desc": self.plan_desc,
            "vs_single": _round(self.vs_single, 4),
            "predicted_s": _round(self.predicted_s, 5),
            "predicted_plan": self.predicted_plan,
            "device_gflops": list(self.device_gflops),
        }
        if self.cpu_share_concurrent:
            d["cpu_share_concurrent"] = [round(c, 3) for c in self.cpu_share_concurrent]
        if self.device_profiles:
            d["device_profiles"] = [dict(p) for p in self.device_profiles]
        if self.server_median_s is not None:
            d["server_median_s"] = round(self.server_median_s, 5)
        if self.cfs_period_ms is not None:
            d["cfs_period_ms"] = self.cfs_period_ms
        if self.ttft is not None:
            d["ttft_median_s"] = round(self.ttft.median, 5)
            d["ttft_min_s"] = round(self.ttft.min, 5)
            d["ttft_max_s"] = round(self.ttft.max, 5)
        if self.ms_per_token is not None:
            d["ms_per_token_median"] = round(self.ms_per_token.median, 3)
            d["ms_per_token_min"] = round(self.ms_per_token.min, 3)
            d["ms_per_token_max"] = round(self.ms_per_token.max, 3)
            d["ms_per_token_vs_single"] = _round(self.ms_per_token_vs_single, 4)
            d["tokens"] = self.tokens
        if self.predicted_ttft_s is not None:
            d["predicted_ttft_s"] = round(self.predicted_ttft_s, 5)
        if self.predicted_ms_per_token is not None:
            d["predicted_ms_per_token"] = round(self.predicted_ms_per_token, 3)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        def stats(prefix: str, suffix: str = "") -> Stats | None:
            if f"{prefix}_median{suffix}" not in d:
                return None
            return Stats(d[f"{prefix}_median{suffix}"], d[f"{prefix}_min{suffix}"], d[f"{prefix}_max{suffix}"], d["runs"])

        return cls(
            plan=d["plan"], workload=d["workload"], home=d.get("home", "homo"), devices=d["devices"],
            cpu=tuple(d["cpu"]), bandwidth_mbit=d["bandwidth_mbit"], broker_mbit=d.get("broker_mbit"),
            model=d.get("model", ""), latency=Stats(d["median_s"], d["min_s"], d["max_s"], d["runs"]),
            plan_desc=d.get("plan_desc", ""), errors=d.get("errors", 0),
            ttft=stats("ttft", "_s"), ms_per_token=stats("ms_per_token"), tokens=d.get("tokens"),
            predicted_s=d.get("predicted_s"), vs_single=d.get("vs_single"),
            ms_per_token_vs_single=d.get("ms_per_token_vs_single"),
            predicted_ttft_s=d.get("predicted_ttft_s"), predicted_ms_per_token=d.get("predicted_ms_per_token"),
            predicted_plan=d.get("predicted_plan", ""), device_gflops=tuple(d.get("device_gflops", ())),
            cpu_share_concurrent=tuple(d.get("cpu_share_concurrent", ())), server_median_s=d.get("server_median_s"),
            cfs_period_ms=d.get("cfs_period_ms"),
            device_profiles=tuple(dict(p) for p in d.get("device_profiles", ())),
        )


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def aggregate(samples: Iterable[Samples]) -> list[Result]:
    """Summaries of every plan that produced at least one run, with ratios to the
    single-device plan of the same home, device count, bandwidth and workload."""
    done = [s for s in samples if s.latency_s]
    singles = {s.key[:-1]: s for s in done if s.plan == "single"}
    out = []
    for s in done:
        single = singles.get(s.key[:-1])
        lat = Stats.of(s.latency_s)
        mpt = Stats.of(s.ms_per_token) if s.ms_per_token else None
        single_lat = statistics.median(single.latency_s) if single else None
        single_mpt = statistics.median(single.ms_per_token) if single and single.ms_per_token else None
        out.append(Result(
            plan=s.plan, workload=s.workload, home=s.home, devices=len(s.cpu), cpu=s.cpu,
            bandwidth_mbit=s.bandwidth_mbit, broker_mbit=s.broker_mbit, model=s.model, latency=lat,
            plan_desc=s.plan_desc, errors=len(s.errors),
            ttft=Stats.of(s.ttft_s) if s.ttft_s else None, ms_per_token=mpt,
            tokens=statistics.median(s.tokens) if s.tokens else None, predicted_s=s.predicted_s,
            vs_single=_ratio(lat.median, single_lat),
            ms_per_token_vs_single=_ratio(mpt.median if mpt else None, single_mpt),
            predicted_ttft_s=s.predicted.get("ttft_s"), predicted_ms_per_token=s.predicted.get("ms_per_token"),
            predicted_plan=str(s.predicted.get("desc", "")), device_gflops=s.device_gflops,
            cpu_share_concurrent=s.cpu_share_concurrent,
            server_median_s=statistics.median(s.server_s) if s.server_s else None, cfs_period_ms=s.cfs_period_ms,
            device_profiles=s.device_profiles,
        ))
    return out


def report(results: Sequence[Result], broker_link: str, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object `bench --json` prints (issue 6's schema plus extra fields)."""
    return {"schema": SCHEMA, "results": [r.to_dict() for r in results], "broker_link": broker_link,
            **({"meta": dict(meta)} if meta else {})}


def load_report(data: Mapping[str, Any]) -> tuple[list[Result], str, dict[str, Any]]:
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), list):
        raise ConfigError("not a bench results object: expected {'results': [...], 'broker_link': ...}")
    return [Result.from_dict(r) for r in data["results"]], str(data.get("broker_link", "")), dict(data.get("meta", {}))


def merge(old: Sequence[Result], new: Sequence[Result]) -> list[Result]:
    """Results of a new run replace those of the same configuration in an older file."""
    def key(r: Result) -> tuple[Any, ...]:
        return (r.home, r.workload, r.devices, r.cpu, r.bandwidth_mbit, r.broker_mbit, r.cfs_period_ms, r.plan)

    fresh = {key(r) for r in new}
    return sort_results([r for r in old if key(r) not in fresh] + list(new))


_PLAN_ORDER = {p: i for i, p in enumerate(("single", "pipeline", "tp", "bp-fixed", "adaptive"))}
_WORKLOAD_ORDER = {w: i for i, w in enumerate(("enc16", "enc64", "enc128", "dec"))}


def sort_results(results: Iterable[Result]) -> list[Result]:
    return sorted(results, key=lambda r: (r.cfs_period_ms is not None, r.home != "homo", _WORKLOAD_ORDER.get(r.workload, 99), r.devices,
                                          r.bandwidth_mbit, _PLAN_ORDER.get(r.plan, 99)))


def _home(r: Result) -> str:
    return r.home if r.cfs_period_ms is None else f"{r.home}, quota period {r.cfs_period_ms:g} ms"


def _fmt_s(v: float) -> str:
    return f"{v * 1e3:.0f} ms" if v < 10 else f"{v:.1f} s"


def _fmt_ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


def markdown_table(results: Sequence[Result], broker_link: str) -> str:
    """One table for encoders (latency), one for decoders (TTFT, ms/token), ratios to the
    single device of the same scenario."""
    results = sort_results(results)
    enc = [r for r in results if r.ms_per_token is None and r.ttft is None]
    dec = [r for r in results if r not in enc]
    lines = [f"Broker link: {broker_link}. Medians over the runs (min–max); ×: median / single-device median "
             "in the same run (lower is better).", ""]
    if enc:
        lines += ["| home | workload | devices | cpu | Mbit/s | plan | median | min–max | × single | runs | plan chosen |",
                  "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in enc:
            lines.append(
                f"| {_home(r)} | {r.workload} | {r.devices} | {'/'.join(f'{c:g}' for c in r.cpu)} | {r.bandwidth_mbit} "
                f"| {r.plan} | {_fmt_s(r.latency.median)} | {_fmt_s(r.latency.min)}–{_fmt_s(r.latency.max)} "
                f"| {_fmt_ratio(r.vs_single)} | {r.latency.n}{f' ({r.errors} failed)' if r.errors else ''} "
                f"| {r.plan_desc} |")
        lines.append("")
    if dec:
        lines += ["| home | workload | devices | cpu | Mbit/s | plan | TTFT | ms/token | ms/token × single | whole request | runs | plan chosen |",
                  "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in dec:
            ttft = _fmt_s(r.ttft.median) if r.ttft else ""
            mpt = f"{r.ms_per_token.median:.1f} ({r.ms_per_token.min:.1f}–{r.ms_per_token.max:.1f})" if r.ms_per_token else ""
            lines.append(
                f"| {_home(r)} | {r.workload} | {r.devices} | {'/'.join(f'{c:g}' for c in r.cpu)} | {r.bandwidth_mbit} "
                f"| {r.plan} | {ttft} | {mpt} | {_fmt_ratio(r.ms_per_token_vs_single)} | {_fmt_s(r.latency.median)} "
                f"| {r.latency.n}{f' ({r.errors} failed)' if r.errors else ''} | {r.plan_desc} |")
        lines.append("")
    return "\n".join(lines)


def find(results: Iterable[Result], **where: Any) -> Result | None:
    """The one result matching every given field (None if absent)."""
    for r in results:
        if all(getattr(r, k) == v for k, v in where.items()):
            return r
    return None
