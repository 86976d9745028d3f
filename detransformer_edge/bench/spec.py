"""What a benchmark run measures: workloads, homes and the matrix of scenarios (pure data).

One *scenario* is one home build (device count, CPU quotas, link rate, broker link) serving
the workloads of one model family; every plan of every workload is timed in it, interleaved,
so the ratios to the single-device plan come from the same minutes of the same host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from detransformer_edge.errors import ConfigError

PLANS: tuple[str, ...] = ("single", "pipeline", "tp", "bp-fixed", "adaptive")
QUICK_PLANS: tuple[str, ...] = ("single", "tp", "bp-fixed", "adaptive")
BANDWIDTHS: tuple[int, ...] = (20, 50, 100, 300, 1000)
DEVICE_COUNTS: tuple[int, ...] = (2, 3, 4)
HOMES: tuple[str, ...] = ("homo", "hetero")
HOMO_CPU = 0.4  # issue 6: each device 0.4 of one core
HETERO_CPU: tuple[float, ...] = (0.8, 0.4, 0.2, 0.2)  # issue 6: a mini PC, a Pi 5, two weak boards
DEVICE_MEM_MB = 2500  # every model of the family (three BERT-base-sized encoders: 1.3 GB) and a TP shard of each, + torch


@dataclass(frozen=True)
class Workload:
    """One request shape. ``op`` is the client API op; ``seq`` the input tokens (encoder) or
    the prompt tokens (decoder prefill); ``new_tokens`` the greedy decode steps (decoder);
    ``models`` the (standard, decoupled) pair of the shapes catalog it runs (None: the
    family's pair, ``FAMILY_MODELS``); ``variants`` more decoupled shapes of the family the home
    also loads, so that ``adaptive`` (the leader's choice across the family) may use them."""

    name: str
    op: str  # "embed" | "generate"
    seq: int
    new_tokens: int = 0
    models: tuple[str, str] | None = None
    variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in ("embed", "generate"):
            raise ConfigError(f"workload {self.name}: op must be embed or generate, got {self.op!r}")
        if self.seq < 3:
            raise ConfigError(f"workload {self.name}: seq must be at least 3 (BOS + text + EOS)")
        if (self.op == "generate") != (self.new_tokens > 0):
            raise ConfigError(f"workload {self.name}: new_tokens > 0 exactly for generate")
        if self.models is not None:
            from detransformer_edge.service.catalog import shape_config

            std, bp = (shape_config(m) for m in self.models)  # ConfigError for an unknown name
            if std.family != self.family or bp.family != self.family:
                raise ConfigError(f"workload {self.name}: models {self.models} are not both {self.family}s")
            if std.is_decoupled or not bp.is_decoupled:
                raise ConfigError(f"workload {self.name}: models must be (standard, decoupled), got {self.models}")
        for v in self.variants:
            from detransformer_edge.service.catalog import SHAPES, shape_config

            if v not in SHAPES or SHAPES[v][0] != SHAPES[self.model_pair[0]][0] or not shape_config(v).is_decoupled:
                raise ConfigError(f"workload {self.name}: variant {v!r} is not a decoupled shape of "
                                  f"{self.model_pair[0]}'s family")

    @property
    def family(self) -> str:
        return "decoder" if self.op == "generate" else "encoder"

    @property
    def model_pair(self) -> tuple[str, str]:
        return self.models if self.models is not None else FAMILY_MODELS[self.family]

    def model_for(self, plan: str) -> str:
        """Block plans run the decoupled model, the others the standard one (shape catalog)."""
        std, bp = self.model_pair
        return bp if plan in ("bp-fixed", "adaptive") else std

    def text(self) -> str:
        """Input whose byte tokenization (BOS + bytes + EOS) is exactly ``seq`` tokens."""
        base = "turn on the kitchen light and set the living room to warm white please "
        return (base * (self.seq // len(base) + 1))[: self.seq - 2]


FAMILY_MODELS: dict[str, tuple[str, str]] = {
    "encoder": ("bert-base", "bert-base-bp"),
    "decoder": ("smollm2-shape", "smollm2-bp"),
}
WORKLOADS: dict[str, Workload] = {
    # adaptive may also run the N_b = 2 sliced variant (the paper's heads and I'; the planner's
    # choice across the family: docs/PLANNER.md, "Variants")
    "enc16": Workload("enc16", "embed", 16, variants=("bert-base-bp2",)),
    "enc64": Workload("enc64", "embed", 64, variants=("bert-base-bp2",)),
    "enc128": Workload("enc128", "embed", 128, variants=("bert-base-bp2",)),
    "dec": Workload("dec", "generate", 128, 32),
    # the N_b = 2 variants (sliced sub-blocks, the paper's heads and I'): block plans run them
    "enc16-bp2": Workload("enc16-bp2", "embed", 16, models=("bert-base", "bert-base-bp2")),
    "enc64-bp2": Workload("enc64-bp2", "embed", 64, models=("bert-base", "bert-base-bp2")),
    "enc128-bp2": Workload("enc128-bp2", "embed", 128, models=("bert-base", "bert-base-bp2")),
    "enc128-bp-slice": Workload("enc128-bp-slice", "embed", 128, models=("bert-base", "bert-base-bp-slice")),
    "mini128-bp2": Workload("mini128-bp2", "embed", 128, models=("minilm-shape", "minilm-bp2")),
}
DEFAULT_WORKLOADS: tuple[str, ...] = ("enc16", "enc64", "enc128", "dec")  # the issue-6 matrix


def cpu_quotas(home: str, devices: int) -> tuple[float, ...]:
    if home == "homo":
        return (HOMO_CPU,) * devices
    if home == "hetero":
        if not 2 <= devices <= len(HETERO_CPU):
            raise ConfigError(f"the heterogeneous home has 2..{len(HETERO_CPU)} devices, not {devices}")
        return HETERO_CPU[:devices]
    raise ConfigError(f"unknown home {home!r}; use one of {', '.join(HOMES)}")


def broker_link(broker_mbit: int | None) -> str:
    """The broker link as every result reports it."""
    if broker_mbit is None:
        return "unshaped (wired hub: the broker's link is never the bottleneck)"
    return f"shaped {broker_mbit} Mbit/s (broker on a device-like link)"


@dataclass(frozen=True)
class Scenario:
    home: str  # homo | hetero
    cpu: tuple[float, ...]
    bandwidth_mbit: int
    broker_mbit: int | None
    workloads: tuple[Workload, ...]  # one family
    plans: tuple[str, ...]

    @property
    def devices(self) -> int:
        return len(self.cpu)

    @property
    def family(self) -> str:
        return self.workloads[0].family

    @property
    def models(self) -> tuple[str, ...]:
        """Every shapes-catalog model the scenario's workloads run, each once, in order."""
        return tuple(dict.fromkeys(m for w in self.workloads for m in (*w.model_pair, *w.variants)))

    def device_names(self) -> tuple[str, ...]:
        return tuple(f"dev{i}" for i in range(self.devices))

    def label(self) -> str:
        cpu = "/".join(f"{c:g}" for c in self.cpu)
        return (f"{self.home} {self.devices} dev (cpu {cpu}) @ {self.bandwidth_mbit} Mbit, "
                f"{self.family}: {', '.join(w.name for w in self.workloads)}")

    def home_spec(self, prefix: str | None = None, mem_mb: int = DEVICE_MEM_MB):  # -> HomeSpec
        from detransformer_edge.testbed import BrokerSpec, DeviceSpec, HomeSpec

        devices = [DeviceSpec(n, cpu=c, mem_mb=mem_mb, mbit=self.bandwidth_mbit)
                   for n, c in zip(self.device_names(), self.cpu)]
        broker = BrokerSpec(mbit=self.broker_mbit)
        return HomeSpec(devices, broker) if prefix is None else HomeSpec(devices, broker, prefix=prefix)


@dataclass(frozen=True)
class BenchConfig:
    bandwidths: tuple[int, ...] = BANDWIDTHS
    devices: tuple[int, ...] = DEVICE_COUNTS
    homes: tuple[str, ...] = HOMES
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    plans: tuple[str, ...] = PLANS
    runs: int = 10
    warmup: int = 2
    broker_mbit: int | None = None
    request_timeout_s: float = 180.0
    cfs_period_ms: float | None = None  # experiment: CPU quota period (testbed default 100 ms)
    trace: bool = False  # timed runs carry a timeline: where the time goes, per plan

    def __post_init__(self) -> None:
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ConfigError(f"unknown workload {w!r}; use {', '.join(WORKLOADS)}")
        for p in self.plans:
            if p not in PLANS:
                raise ConfigError(f"unknown plan {p!r}; use {', '.join(PLANS)}")
        for h in self.homes:
            cpu_quotas(h, 2)  # validates the name
        if self.runs < 1 or self.warmup < 0:
            raise ConfigError("runs must be >= 1 and warmup >= 0")
        for b in (*self.bandwidths, *([self.broker_mbit] if self.broker_mbit else [])):
            if not 1 <= b <= 10000:
                raise ConfigError(f"link rate {b} Mbit/s is outside 1..10000")
        if not self.bandwidths or not self.devices or not self.homes or not self.workloads or not self.plans:
            raise ConfigError("bandwidths, devices, homes, workloads and plans must not be empty")

    @classmethod
    def quick(cls) -> BenchConfig:
        """Issue 6's smoke run: encoder seq 128, 100 Mbit, 4 homogeneous devices, 5 runs."""
        return cls(bandwidths=(100,), devices=(4,), homes=("homo",), workloads=("enc128",),
                   plans=QUICK_PLANS, runs=5, warmup=1)

    def scenarios(self) -> list[Scenario]:
        """Home builds in run order: per home kind, device count and bandwidth, one build per
        model family. Heterogeneous homes need 2..4 devices; other counts are skipped."""
        families: dict[str, list[Workload]] = {}
        for name in self.workloads:
            w = WORKLOADS[name]
            families.setdefault(w.family, []).append(w)
        out: list[Scenario] = []
        for home in self.homes:
            for n in self.devices:
                if home == "hetero" and not 2 <= n <= len(HETERO_CPU):
                    continue
                cpu = cpu_quotas(home, n)
                for mbit in self.bandwidths:
                    for fam in ("encoder", "decoder"):
                        if fam in families:
                            out.append(Scenario(home, cpu, mbit, self.broker_mbit, tuple(families[fam]), self.plans))
        return out


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"--{what}: empty list")
    return values


def parse_name_list(text: str, what: str, known: Sequence[str]) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in known]
    if bad or not values:
        raise ConfigError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; use {', '.join(known)}")
    return values

