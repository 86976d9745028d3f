"""Drive one benchmark: per scenario build an emulated home (``testbed.Home``), start the real
Mosquitto in the broker's namespace and one real agent per device (``detransformer-edge agent``,
mDNS on, shape catalog, full replicas so every baseline can run), wait for the election and the
placement, then time every plan of every workload through the timing client
(``bench.client``, in the broker's namespace) and tear it all down.

Progress goes to stderr; the caller gets ``Samples`` to aggregate (``bench.results``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from detransformer_edge.bench.results import Samples
from detransformer_edge.bench.spec import DEVICE_MEM_MB, BenchConfig, Scenario, Workload
from detransformer_edge.errors import DetransformerError
from detransformer_edge.service.readiness import StartupWatch

log = logging.getLogger(__name__)
CLUSTER = "bench"
MQTT_PORT = 1883
LEAD_START_S = 12.0  # heterogeneous homes: head start of the strongest device's agent
_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BenchError(DetransformerError):
    """The benchmark home could not be brought up or stopped answering."""


Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def find_mosquitto() -> str:
    for path in _MOSQUITTO_CANDIDATES:
        if Path(path).is_file():
            return path
    found = shutil.which("mosquitto")
    if found is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto; scripts/setup.sh does it)")
    return found


def mosquitto_conf(port: int = MQTT_PORT) -> str:
    return (
        f"listener {port} 0.0.0.0\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"  # without it small fan-out copies wait ~40 ms (Nagle)
        "max_queued_messages 100000\n"  # QoS 0 activation bursts must not be dropped
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def agent_toml(device: str, profile_path: Path, broker_host: str, port: int = MQTT_PORT,
               cluster: str = CLUSTER) -> str:
    return (
        f'id = "{device}"\n'
        f'cluster = "{cluster}"\n'
        f'profile = "{profile_path}"\n'
        "dashboard_port = 0\n"
        "discovery = true\n"  # announce over mDNS, as a real home does
        "homeassistant = false\n"
        "status_interval_s = 1.0\n"
        "[broker]\n"
        f'url = "mqtt://{broker_host}:{port}"\n'
        "[election]\n"
        "lease_s = 10.0\n"  # the default: a device busy loading models must not lose its lease
    )


# --- device profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRates:
    """One core of this host at BERT-base shapes, unconstrained (``planner.measure``); a device
    with CPU quota q is profiled as q times these."""

    gflops: float
    attn_gflops: float
    mem_bw_gbs: float

    def to_dict(self) -> dict[str, float]:
        return {"gflops": round(self.gflops, 2), "attn_gflops": round(self.attn_gflops, 2),
                "mem_bw_gbs": round(self.mem_bw_gbs, 2)}


def measure_host_rates(budget_s: float = 2.0) -> HostRates:
    import torch

    from detransformer_edge.model.config import get_config
    from detransformer_edge.planner.measure import (
        measure_attention_gflops,
        measure_matmul_gflops,
        measure_memory_bandwidth_gbs,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = get_config("bert-base")
        return HostRates(measure_matmul_gflops(cfg, 128, budget_s), measure_attention_gflops(cfg, 128, budget_s),
                         measure_memory_bandwidth_gbs(64, budget_s / 2))
    finally:
        torch.set_num_threads(threads)


TESTBED_HOST = "testbed"  # the one machine every emulated device runs on


def host_cores(cpu: Sequence[float], shares: Sequence[float], host_cpus: float) -> float:
    """What the host gives its devices together: its cores when every device got its quota with
    all busy, else what they measured together (other jobs took the rest)."""
    if shares and min(s / c for s, c in zip(shares, cpu)) < 0.95:
        return round(float(sum(shares)), 3)
    return host_cpus


def device_profiles(scenario: Scenario, rates: HostRates, ram_mb: int, period_ms: float | None = None,
                    cores: float | None = None):  # -> list[DeviceProfile]
    """One profile per device: the host's per-core rates times its quota, its shaped link, and
    the quota and shared host the cost model needs (``planner/compute.py``)."""
    import os

    from detransformer_edge.planner.profile import DeviceProfile

    out = []
    for name, cpu in zip(scenario.device_names(), scenario.cpu):
        out.append(DeviceProfile(
            name=name, gflops=round(rates.gflops * cpu, 3), attn_gflops=round(rates.attn_gflops * cpu, 3),
            mem_bw_gbs=round(rates.mem_bw_gbs * cpu, 3), ram_mb=ram_mb, link_mbit=float(scenario.bandwidth_mbit),
            link="ethernet", cores=1, cpu_quota=cpu, quota_period_ms=period_ms or 100.0,
            host=TESTBED_HOST, host_cores=cores if cores is not None else float(os.cpu_count() or 1),
            description=f"testbed device, cpu quota {cpu:g}, tbf {scenario.bandwidth_mbit} Mbit/s",
        ))
    return out


# --- cost model predictions -------------------------------------------------------------------------


def predict(scenario: Scenario, workload: Workload, plan: str, leader: str, profiles: Sequence[Any]) -> dict[str, Any]:
    """The cost model's view of ``plan`` as the leader runs it: {desc, model, total_s, ttft_s,
    ms_per_token}. ``adaptive``: the leader's own choice among the variants of the workload's
    family the scenario loads (``Placements.choose``: full replicas, the task's budget, the
    margin). Decoders: prefill then ``new_tokens - 1`` decode steps on the same plan."""
    from detransformer_edge.parallel.plan import Placement, baseline_plan, full_replica_weights
    from detransformer_edge.planner.cost import Broker, CostModel, Request
    from detransformer_edge.planner.variants import TaskBudget, Variant, VariantPlanner
    from detransformer_edge.service.catalog import shape_catalog, shape_config

    model = workload.model_for(plan)
    order = (leader, *sorted(d for d in scenario.device_names() if d != leader))
    broker = Broker(link_mbit=scenario.broker_mbit)
    first = Request("prefill" if workload.family == "decoder" else "encode", workload.seq)
    if plan == "adaptive":
        catalog = shape_catalog().subset(scenario.models)
        variants = []
        for name in catalog.variants(model):
            vcfg = shape_config(name)
            variants.append(Variant(name, vcfg, Placement(1, full_replica_weights(order, vcfg.layer_kinds, vcfg.nd))))
        budget = TaskBudget.for_task(catalog.get(model).task, unvalidated=not catalog.quality_required)
        choice = VariantPlanner(variants, list(profiles), budget, broker=broker, available=order,
                                coordinator=leader).choose(first)
        model, chosen = choice.variant, choice.breakdown.plan
    else:
        cfg = shape_config(model)
        chosen = baseline_plan(plan, order, cfg.n_layers, cfg.nd)
    cost = CostModel(shape_config(model), list(profiles), broker)
    desc = chosen.describe() if model == workload.model_for(plan) else f"{model}: {chosen.describe()}"
    out: dict[str, Any] = {"desc": desc, "model": model, "total_s": cost.latency(chosen, first)}
    if workload.family == "decoder":
        steps = [cost.latency(chosen, Request("decode", workload.seq + k)) for k in range(workload.new_tokens - 1)]
        out["ttft_s"] = out["total_s"]
        out["ms_per_token"] = 1e3 * sum(steps) / max(1, len(steps))
        out["total_s"] += sum(steps)
    return out


# --- one home ---------------------------------------------------------------------------------------


class BenchHome:
    """A running home: testbed namespaces, Mosquitto, agents and the timing client."""

    def __init__(self, scenario: Scenario, profiles: Sequence[Any] | None, workdir: Path,
                 progress: Progress = stderr_progress, threads: int = 1, catalog: str = "shapes",
                 models: Sequence[str] | None = None, ram_mb: int = DEVICE_MEM_MB,
                 cfs_period_ms: float | None = None) -> None:
        """``profiles``: the devices' planner profiles; None calibrates them in the home
        (``bench.calibrate`` in the first device's namespace and quota, scaled by quota).
        ``cfs_period_ms``: an experiment: the CPU quota's period (the testbed uses 100 ms), same share."""
        self.cfs_period_ms = cfs_period_ms
        self.scenario = scenario
        self.ram_mb = ram_mb
        self.calibration: dict[str, float] = {}
        self.cpu_share_concurrent: tuple[float, ...] = ()
        self.catalog = catalog
        self.models = tuple(models) if models is not None else scenario.models
        self.profiles = list(profiles) if profiles is not None else []
        self.workdir = workdir
        self.progress = progress
        self.threads = threads
        self.leader: str | None = None
        self._stack = ExitStack()
        self._client: subprocess.Popen[str] | None = None
        self._agents: dict[str, subprocess.Popen[Any]] = {}  # device -> its agent process
        self.home: Any = None

    def __enter__(self) -> BenchHome:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _log(self, name: str) -> IO[bytes]:
        return self._stack.enter_context((self.workdir / f"{name}.log").open("wb"))

    def _open(self) -> None:
        from detransformer_edge.planner.profile import dump_profile
        from detransformer_edge.testbed import Home

        sc = self.scenario
        self.home = self._stack.enter_context(Home(sc.home_spec()))
        if self.cfs_period_ms is not None:
            self._set_cfs_period(self.cfs_period_ms)
        broker_ip = self.home.address("broker")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(mosquitto_conf())
        self.home.spawn("broker", [find_mosquitto(), "-c", str(conf)], stdout=self._log("mosquitto"),
                        stderr=subprocess.STDOUT)
        self._wait_port(broker_ip)
        if not self.profiles:
            self.profiles = self._calibrate()
        for name, prof in zip(sc.device_names(), self.profiles):
            ppath = self.workdir / f"{name}.profile.toml"
            dump_profile(prof, ppath)
            cpath = self.workdir / f"{name}.agent.toml"
            cpath.write_text(agent_toml(name, ppath, broker_ip))
            self._agents[name] = self.home.spawn(name, [sys.executable, "-m", "detransformer_edge.cli", "agent", "--config", str(cpath),
                                   "--catalog", self.catalog, "--replicate-all", "--models", ",".join(self.models),
                                   "--threads", str(self.threads)],
                            stdout=self._log(name), stderr=subprocess.STDOUT)
            if name == sc.device_names()[0] and len(set(sc.cpu)) > 1 and sc.cpu[0] == max(sc.cpu):
                # a live lease is never preempted: let the strongest device (the home's always-on
                # mini PC) start first, or a weak one that happens to connect first leads for good
                self.progress(f"{name} (cpu {sc.cpu[0]:g}, the strongest) starts {LEAD_START_S:g} s before the others")
                time.sleep(LEAD_START_S)
        self._client = self.home.spawn(
            "broker", [sys.executable, "-m", "detransformer_edge.bench.client", "--host", broker_ip,
                       "--port", str(MQTT_PORT), "--cluster", CLUSTER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log("client"), text=True)
        hello = self._client.stdout.readline() if self._client.stdout else ""
        if not hello:
            raise BenchError(f"the timing client did not start; see {self.workdir / 'client.log'}")

    def _set_cfs_period(self, period_ms: float) -> None:
        """Same CPU share, shorter (or longer) quota period: a device is throttled for at most
        (1 - share) x period at a time, so synchronisation points wait less for a throttled peer."""
        period_us = int(period_ms * 1000)
        for link in self.home.links:
            if link.cpu is None:
                continue
            for group in map(Path, link.cgroups):
                if (group / "cpu.cfs_period_us").exists():
                    (group / "cpu.cfs_quota_us").write_text("-1")  # lift first: period < quota is refused
                    (group / "cpu.cfs_period_us").write_text(str(period_us))
                    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(link.cpu * period_us))))
        self.progress(f"CPU quota period set to {period_ms:g} ms (shares unchanged)")

    def _calibrate(self) -> list[Any]:
        """One calibration per distinct quota (in the first device that has it): on a busy host a
        0.8 quota may deliver what 0.4 does, so scaling one measurement by quota would misstate
        the others."""
        from detransformer_edge.planner.profile import DeviceProfile

        sc = self.scenario
        by_quota: dict[float, dict[str, float]] = {}
        for name, cpu in zip(sc.device_names(), sc.cpu):
            if cpu in by_quota:
                continue
            done = self.home.run(name, [sys.executable, "-m", "detransformer_edge.bench.calibrate"], timeout=300)
            by_quota[cpu] = json.loads(done.stdout.strip().splitlines()[-1])
            self.progress(f"calibrated {name} (cpu {cpu:g}): BERT-base seq 128 forward "
                          f"{by_quota[cpu]['forward_s'] * 1e3:.0f} ms = {by_quota[cpu]['gflops']:.1f} GFLOPS")
        self.calibration = {f"cpu {c:g}": v["gflops"] for c, v in by_quota.items()}
        from detransformer_edge.testbed.measure import measure_cpu_shares

        # what the host gives when every device computes at once (a quota is only a ceiling)
        shares = measure_cpu_shares(self.home, list(sc.device_names()), seconds=2.0, concurrent=True)
        self.cpu_share_concurrent = tuple(shares[n] for n in sc.device_names())
        cores = host_cores(sc.cpu, self.cpu_share_concurrent, float(os.cpu_count() or 1))
        profiles = []
        for prof, cpu in zip(device_profiles(sc, HostRates(1.0, 1.0, 1.0), self.ram_mb, self.cfs_period_ms, cores),
                             sc.cpu):
            cal = by_quota[cpu]
            profiles.append(DeviceProfile(**{**prof.__dict__, "gflops": round(cal["gflops"], 3),
                                             "attn_gflops": round(cal["gflops"], 3),
                                             "mem_bw_gbs": round(cal["mem_bw_gbs"] * cpu, 3)}))
        self.progress("CPU share with every device busy at once: " + ", ".join(
            f"{n} {v:.2f}/{c:g}" for (n, v), c in zip(shares.items(), sc.cpu)))
        if min(v / c for v, c in zip(self.cpu_share_concurrent, sc.cpu)) < 0.85:
            self.progress("WARNING: this host cannot give every device its CPU quota at once (other jobs?): "
                          "plans that compute on several devices will look slower than they are")
        return profiles

    def _wait_port(self, ip: str, timeout_s: float = 15.0) -> None:
        script = ("import socket,sys,time\n"
                  f"end=time.time()+{timeout_s}\n"
                  "while time.time()<end:\n"
                  f"  try: socket.create_connection(('{ip}',{MQTT_PORT}),0.3).close(); sys.exit(0)\n"
                  "  except OSError: time.sleep(0.1)\n"
                  "sys.exit(1)\n")
        done = self.home.run("broker", [sys.executable, "-c", script], timeout=timeout_s + 5, check=False)
        if done.returncode != 0:
            raise BenchError(f"mosquitto did not listen on {ip}:{MQTT_PORT}; see {self.workdir / 'mosquitto.log'}")

    def request(self, op: str, text: str, params: dict[str, Any], timeout_s: float,
                want_embeddings: bool = False) -> dict[str, Any]:
        """One request through the client: {"ok", "latency_s", "result" | "error"}."""
        assert self._client is not None and self._client.stdin and self._client.stdout
        job = {"op": op, "input": text, "params": params, "timeout_s": timeout_s, "want_embeddings": want_embeddings}
        self._client.stdin.write(json.dumps(job) + "\n")
        self._client.stdin.flush()
        line = self._client.stdout.readline()
        if not line:
            raise BenchError(f"the timing client exited; see {self.workdir / 'client.log'}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _check_agents_alive(self) -> None:
        """An agent that exited never becomes ready: say which one and how, at once, instead of
        waiting out the readiness timeout (a device over its memory limit is killed by the kernel
        without a word in its own log)."""
        for name, proc in self._agents.items():
            code = proc.poll()
            if code is None:
                continue
            how = (f"was killed by signal {-code}" + (" (SIGKILL: out of memory in its "
                   f"{self.ram_mb} MB limit? see dmesg)" if code == -9 else "")) if code < 0 else f"exited with {code}"
            raise BenchError(f"{name}'s agent {how} before the home was ready; its log: {self.workdir / (name + '.log')}")

    def wait_ready(self, workload: Workload, quiet_s: float = 300.0, cap_s: float = 3600.0,
                   model: str | None = None) -> str:
        """Wait until the leader plans TP over every device (all agents joined and loaded);
        returns the leader's id (the coordinator of baseline plans). Bounded by silence, not by
        the clock (``service.readiness``): a slower host is waited for while its agents progress."""
        names = self.scenario.device_names()
        watch = StartupWatch({n: self.workdir / f"{n}.log" for n in names}, quiet_s, cap_s)
        params: dict[str, Any] = {"model": model or workload.model_for("tp"), "plan": "tp"}
        if workload.op == "generate":
            params.update(max_new_tokens=1, chat=False)
        wait = 3.0  # a probe sent before a leader exists is never answered: re-ask, patiently more
        while (why := watch.why_stop()) is None:
            self._check_agents_alive()
            ans = self.request(workload.op, "ready?", params, timeout_s=max(1.0, min(wait, watch.remaining())))
            wait = min(2 * wait, 30.0)
            if ans.get("ok"):
                desc = str(ans["result"].get("plan", ""))
                if desc.startswith("tp over ") and all(n in desc for n in names):
                    self.leader = desc[len("tp over "):].split(",")[0].split(" ")[0]
                    return self.leader
                watch.saw(desc)
            elif isinstance(ans.get("error"), dict):  # the leader's answer; a probe timing out says nothing new
                watch.saw(ans["error"])
            time.sleep(1.0)
        raise BenchError(f"{why}; agent logs in {self.workdir}")


# --- the matrix -------------------------------------------------------------------------------------


def run_plan_once(bh: BenchHome, workload: Workload, plan: str, timeout_s: float,
                  trace: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"model": workload.model_for(plan), "plan": plan}
    if trace:
        params["trace"] = True
    if workload.op == "generate":
        params.update(max_new_tokens=workload.new_tokens, chat=False)
    return bh.request(workload.op, workload.text(), params, timeout_s)


def run_scenario(scenario: Scenario, cfg: BenchConfig, rates: HostRates | None, progress: Progress,
                 workdir: Path, mem_mb: int) -> list[Samples]:
    from detransformer_edge.planner.profile import profile_to_dict

    profiles = device_profiles(scenario, rates, mem_mb, cfg.cfs_period_ms) if rates is not None else None
    out: list[Samples] = []
    t_start = time.monotonic()
    with BenchHome(scenario, profiles, workdir, progress, ram_mb=mem_mb, cfs_period_ms=cfg.cfs_period_ms) as bh:
        profiles = bh.profiles
        progress(f"{scenario.label()}: home up ({time.monotonic() - t_start:.1f} s), waiting for agents")
        leader = bh.wait_ready(scenario.workloads[0], quiet_s=max(300.0, cfg.request_timeout_s))
        progress(f"ready after {time.monotonic() - t_start:.1f} s; leader {leader}")
        for workload in scenario.workloads:
            samples = {p: Samples(p, workload.name, scenario.home, scenario.cpu, scenario.bandwidth_mbit,
                                  scenario.broker_mbit, workload.model_for(p),
                                  device_gflops=tuple(pr.gflops for pr in profiles),
                                  cpu_share_concurrent=bh.cpu_share_concurrent,
                                  device_profiles=tuple(profile_to_dict(pr) for pr in profiles),
                                  cfs_period_ms=cfg.cfs_period_ms) for p in scenario.plans}
            for p, s in samples.items():
                try:
                    pred = predict(scenario, workload, p, leader, profiles)
                    s.predicted_s = pred["total_s"]
                    s.predicted = pred
                except DetransformerError as exc:
                    log.warning("no prediction for %s: %s", p, exc)
            failed: set[str] = set()
            for _ in range(cfg.warmup):
                for p in scenario.plans:
                    ans = run_plan_once(bh, workload, p, cfg.request_timeout_s)
                    if not ans.get("ok"):
                        samples[p].errors.append(str(ans.get("error")))
                        progress(f"{workload.name} {p}: warm-up failed: {ans.get('error')}")
                        if len(samples[p].errors) >= 2:
                            failed.add(p)
            for k in range(cfg.runs):
                shown = []
                for p in scenario.plans:  # interleaved: host noise hits every plan alike
                    if p in failed:
                        continue
                    ans = run_plan_once(bh, workload, p, cfg.request_timeout_s, cfg.trace)
                    if ans.get("ok"):
                        samples[p].add_reply(float(ans["latency_s"]), ans["result"])
                        shown.append(f"{p} {ans['latency_s'] * 1e3:.0f}")
                    else:
                        samples[p].errors.append(str(ans.get("error")))
                        shown.append(f"{p} FAILED")
                        if len(samples[p].errors) >= 3:
                            failed.add(p)
                progress(f"{scenario.home} {scenario.devices}dev {scenario.bandwidth_mbit}Mbit {workload.name} "
                         f"run {k + 1}/{cfg.runs}: " + ", ".join(shown) + " ms")
            out += list(samples.values())
    progress(f"{scenario.label()}: done in {time.monotonic() - t_start:.0f} s")
    return out


def run_bench(cfg: BenchConfig, progress: Progress = stderr_progress, rates: HostRates | None = None,
              mem_mb: int | None = None, keep_logs: Path | None = None,
              on_scenario: Callable[[list[Samples]], None] | None = None) -> list[Samples]:
    """Run every scenario of ``cfg`` (``rates``: fixed per-core rates for the device profiles;
    None calibrates them in each home, see ``BenchHome``); ``on_scenario`` sees the samples so far after each
    (the command saves partial results, so a long run interrupted keeps what it measured)."""
    from detransformer_edge.testbed import check_host

    check_host()
    scenarios = cfg.scenarios()
    all_samples: list[Samples] = []
    for i, sc in enumerate(scenarios):
        progress(f"scenario {i + 1}/{len(scenarios)}: {sc.label()}")
        base = keep_logs if keep_logs is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{sc.home}{sc.devices}-{sc.bandwidth_mbit}-{sc.family}-", dir=base))
        workdir.chmod(0o755)  # mosquitto may drop root and must read its config
        all_samples += run_scenario(sc, cfg, rates, progress, workdir, mem_mb or DEVICE_MEM_MB)
        if on_scenario is not None:
            on_scenario(all_samples)
    return all_samples
