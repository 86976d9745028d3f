"""PNG figures from benchmark results (matplotlib, the ``bench`` extra).

* ``latency_<workload>_<home><n>.png``: median latency (decoder: ms per token) versus link rate,
  one line per plan, min–max as error bars;
* ``speedup_<workload>_<home><n>.png``: the adaptive plan's speedup over Megatron TP and over
  one device versus link rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detransformer_edge.bench.results import Result
from detransformer_edge.errors import ConfigError

PLAN_STYLE = {
    "single": ("one device", "#444444", "o"),
    "pipeline": ("pipeline", "#8c6d31", "v"),
    "tp": ("Megatron TP", "#d62728", "s"),
    "bp-fixed": ("fixed block parallelism", "#1f77b4", "^"),
    "adaptive": ("adaptive (ours)", "#2ca02c", "D"),
}


def _pyplot():  # -> matplotlib.pyplot
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'detransformer-edge[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(r: Result, decoder: bool) -> tuple[float, float, float] | None:
    if decoder:
        if r.ms_per_token is None:
            return None
        return r.ms_per_token.median, r.ms_per_token.min, r.ms_per_token.max
    return r.latency.median * 1e3, r.latency.min * 1e3, r.latency.max * 1e3


def groups(results: Sequence[Result]) -> dict[tuple[str, str, int], list[Result]]:
    """Results by (workload, home, devices) that span at least two link rates."""
    out: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        if r.cfs_period_ms is None:  # experiments with another quota period are not plotted
            out.setdefault((r.workload, r.home, r.devices), []).append(r)
    return {k: v for k, v in out.items() if len({r.bandwidth_mbit for r in v}) >= 2}


def write_plots(results: Sequence[Result], out_dir: Path, broker_link: str = "") -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (workload, home, n), rs in sorted(groups(results).items()):
        decoder = any(r.ms_per_token is not None for r in rs)
        cpu = "/".join(f"{c:g}" for c in rs[0].cpu)
        title = f"{workload}: {n} devices ({home}, cpu {cpu})"
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for plan, (label, color, marker) in PLAN_STYLE.items():
            pts = sorted((r.bandwidth_mbit, _value(r, decoder)) for r in rs if r.plan == plan and _value(r, decoder))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            med = [p[1][0] for p in pts]  # type: ignore[index]
            lo = [p[1][0] - p[1][1] for p in pts]  # type: ignore[index]
            hi = [p[1][2] - p[1][0] for p in pts]  # type: ignore[index]
            ax.errorbar(xs, med, yerr=[lo, hi], label=label, color=color, marker=marker, capsize=3, lw=1.6, ms=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        bws = sorted({r.bandwidth_mbit for r in rs})
        ax.set_xticks(bws, [str(b) for b in bws])
        ax.set_xlabel("device link (Mbit/s)")
        ax.set_ylabel("ms per token (median)" if decoder else "end-to-end latency, ms (median)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if broker_link:
            fig.text(0.01, 0.005, f"broker: {broker_link.split(' (')[0]}", fontsize=7, color="#666666")
        fig.tight_layout()
        path = out_dir / f"latency_{workload}_{home}{n}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

        by = {(r.plan, r.bandwidth_mbit): _value(r, decoder) for r in rs}
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for base, label, color, dy in (("tp", "adaptive vs Megatron TP", "#d62728", 7),
                                       ("single", "adaptive vs one device", "#444444", -12),
                                       ("bp-fixed", "adaptive vs fixed BP", "#1f77b4", 7)):
            pts = [(b, by[(base, b)][0] / by[("adaptive", b)][0]) for b in bws  # type: ignore[index]
                   if by.get((base, b)) and by.get(("adaptive", b))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
                for x, y in pts:
                    ax.annotate(f"{y:.2f}×", (x, y), textcoords="offset points", xytext=(0, dy), ha="center",
                                fontsize=7, color=color)
        ax.axhline(1.0, color="#999999", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}×" if v in (0.5, 2, 3, 5) else ""))
        ax.set_xticks(bws, [str(b) for b in bws])
        ax.set_xlabel("device link (Mbit/s)")
        ax.set_ylabel("speedup of the adaptive plan (×)")
        ax.set_title(f"{title}: speedup" + (" (ms per token)" if decoder else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"speedup_{workload}_{home}{n}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
