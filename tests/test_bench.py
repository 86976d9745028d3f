"""Pure parts of `detransformer-edge bench`: workloads, homes, the matrix, aggregation and
ratios, the JSON and markdown forms, agent/broker configs and cost-model predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from detransformer_edge.bench.results import (
    Samples,
    Stats,
    aggregate,
    find,
    load_report,
    markdown_table,
    merge,
    report,
)
from detransformer_edge.bench.runner import (
    HostRates,
    agent_toml,
    device_profiles,
    mosquitto_conf,
    predict,
)
from detransformer_edge.bench.spec import (
    HETERO_CPU,
    WORKLOADS,
    BenchConfig,
    Scenario,
    Workload,
    broker_link,
    cpu_quotas,
    parse_int_list,
    parse_name_list,
)
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.errors import ConfigError
from detransformer_edge.model.tokenizer import ByteTokenizer


def test_workload_text_is_exactly_seq_tokens_and_models_match_plans():
    tok = ByteTokenizer(30522)
    for w in WORKLOADS.values():
        assert len(tok.encode(w.text())) == w.seq
    enc, dec = WORKLOADS["enc128"], WORKLOADS["dec"]
    assert (enc.model_for("tp"), enc.model_for("single"), enc.model_for("pipeline")) == ("bert-base",) * 3
    assert enc.model_for("bp-fixed") == enc.model_for("adaptive") == "bert-base-bp"
    assert dec.model_for("tp") == "smollm2-shape" and dec.model_for("adaptive") == "smollm2-bp"
    assert (dec.seq, dec.new_tokens, dec.family) == (128, 32, "decoder")
    with pytest.raises(ConfigError):
        Workload("x", "generate", 16)  # a decoder workload needs new tokens
    with pytest.raises(ConfigError):
        Workload("x", "dance", 16)


def test_n_b_2_variants_run_their_own_models_and_scenarios_load_every_model_once():
    from detransformer_edge.service.catalog import shape_catalog, shape_config

    w = WORKLOADS["enc128-bp2"]
    assert (w.model_for("single"), w.model_for("tp"), w.model_for("adaptive")) == ("bert-base", "bert-base", "bert-base-bp2")
    bp2 = shape_config("bert-base-bp2")
    assert (bp2.nd, bp2.nb, bp2.sub_attn, bp2.d_ff_sub, bp2.sub_heads) == (4, 2, "slice", 4224, 3)
    mini = WORKLOADS["mini128-bp2"]
    assert mini.model_for("single") == "minilm-shape" and shape_config(mini.model_for("bp-fixed")).d_model == 384
    sc = Scenario("homo", (0.4,) * 4, 100, None, (WORKLOADS["enc128"], w, WORKLOADS["enc64-bp2"], mini), ("single",))
    assert sc.models == ("bert-base", "bert-base-bp", "bert-base-bp2", "minilm-shape", "minilm-bp2")
    catalog = shape_catalog()
    assert set(sc.models) <= set(catalog.names)
    # defaults unchanged: the first decoupled model of each task, and the issue-6 matrix
    assert catalog.default_for("embed") == "bert-base-bp" and catalog.default_for("generate") == "smollm2-bp"
    assert BenchConfig().workloads == ("enc16", "enc64", "enc128", "dec")
    with pytest.raises(ConfigError, match="unknown benchmark shape"):
        Workload("x", "embed", 16, models=("bert-base", "bert-base-bp3"))
    with pytest.raises(ConfigError, match="standard, decoupled"):
        Workload("x", "embed", 16, models=("bert-base-bp2", "bert-base"))
    with pytest.raises(ConfigError, match="not both"):
        Workload("x", "embed", 16, models=("bert-base", "smollm2-bp"))


def test_predictions_for_the_sliced_variant():
    sc = Scenario("homo", (0.4,) * 4, 100, None, (WORKLOADS["enc128-bp2"],), ())
    profs = device_profiles(sc, HostRates(50.0, 40.0, 10.0), ram_mb=2500)
    bp2 = predict(sc, WORKLOADS["enc128-bp2"], "bp-fixed", "dev0", profs)
    bp4 = predict(sc, WORKLOADS["enc128"], "bp-fixed", "dev0", profs)
    single = predict(sc, WORKLOADS["enc128-bp2"], "single", "dev0", profs)
    assert bp2["desc"].startswith("block dev0:1, dev1:1, dev2:1, dev3:1")
    # half the synchronisations and a quarter of the full-width sub-blocks' attention FLOPs
    assert bp2["total_s"] < bp4["total_s"] < single["total_s"]


def test_homes_and_their_specs():
    assert cpu_quotas("homo", 3) == (0.4, 0.4, 0.4)
    assert cpu_quotas("hetero", 4) == HETERO_CPU == (0.8, 0.4, 0.2, 0.2)
    with pytest.raises(ConfigError):
        cpu_quotas("hetero", 5)
    with pytest.raises(ConfigError):
        cpu_quotas("castle", 2)
    sc = Scenario("hetero", cpu_quotas("hetero", 3), 50, None, (WORKLOADS["enc128"],), ("single",))
    spec = sc.home_spec(prefix="dtbtest")
    assert [d.name for d in spec.devices] == ["dev0", "dev1", "dev2"]
    assert [d.cpu for d in spec.devices] == [0.8, 0.4, 0.2] and {d.mbit for d in spec.devices} == {50}
    assert spec.broker.mbit is None and spec.address("broker") == "10.77.0.2" and spec.address("dev1") == "10.77.0.11"
    assert Scenario("homo", (0.4,) * 2, 20, 30, (WORKLOADS["dec"],), ("tp",)).home_spec().broker.mbit == 30
    assert "unshaped" in broker_link(None) and "20 Mbit" in broker_link(20)


def test_matrix_groups_families_and_skips_impossible_homes():
    cfg = BenchConfig(bandwidths=(20, 100), devices=(2, 5), homes=("homo", "hetero"), workloads=("enc16", "enc128", "dec"))
    scs = cfg.scenarios()
    # homo: 2 counts x 2 rates x 2 families; hetero: only 2 devices (5 > 4) x 2 x 2
    assert len(scs) == 8 + 4
    enc = [s for s in scs if s.family == "encoder"]
    assert all([w.name for w in s.workloads] == ["enc16", "enc128"] for s in enc)
    # the encoder homes also load the N_b = 2 variant, which adaptive may choose
    assert {s.models for s in scs} == {("bert-base", "bert-base-bp", "bert-base-bp2"), ("smollm2-shape", "smollm2-bp")}
    q = BenchConfig.quick()
    (only,) = q.scenarios()
    assert (only.devices, only.bandwidth_mbit, only.cpu, q.runs) == (4, 100, (0.4,) * 4, 5)
    assert only.plans == ("single", "tp", "bp-fixed", "adaptive") and only.workloads == (WORKLOADS["enc128"],)
    for bad in (dict(workloads=("enc7",)), dict(plans=("magic",)), dict(runs=0), dict(bandwidths=(0,)), dict(homes=())):
        with pytest.raises(ConfigError):
            BenchConfig(**bad)  # type: ignore[arg-type]
    assert parse_int_list("20, 50,100", "bandwidths") == (20, 50, 100)
    with pytest.raises(ConfigError):
        parse_int_list("20,fast", "bandwidths")
    with pytest.raises(ConfigError):
        parse_name_list("homo,villa", "homes", ("homo", "hetero"))


def test_command_arguments_build_the_config():
    from detransformer_edge.commands import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    quick = bench.config_from_args(p.parse_args(["--quick", "--broker-mbit", "100"]))
    assert quick.runs == 5 and quick.broker_mbit == 100 and quick.bandwidths == (100,)
    full = bench.config_from_args(p.parse_args(["--bandwidths", "20,1000", "--devices", "4", "--homes", "homo",
                                                "--workloads", "dec", "--runs", "12"]))
    assert (full.bandwidths, full.devices, full.homes, full.workloads, full.runs) == ((20, 1000), (4,), ("homo",), ("dec",), 12)
    assert full.plans == ("single", "pipeline", "tp", "bp-fixed", "adaptive")


def _samples(plan, latencies, workload="enc128", mbit=100, cpu=(0.4,) * 4):
    s = Samples(plan, workload, "homo", cpu, mbit, None, "bert-base")
    for v in latencies:
        s.add_reply(v, {"plan": f"{plan} plan", "latency_ms": v * 1e3 - 1})
    return s


def test_aggregate_medians_min_max_and_ratios_to_single_of_the_same_scenario():
    results = aggregate([
        _samples("single", [0.5, 0.4, 0.6]),
        _samples("adaptive", [0.3, 0.2, 0.25, 0.9]),
        _samples("single", [1.0], mbit=20),
        _samples("tp", [], mbit=20),  # never answered: left out
        _samples("tp", [3.0, 2.0], mbit=20),
    ])
    assert len(results) == 4
    a = find(results, plan="adaptive")
    assert a is not None and a.latency == Stats(0.275, 0.2, 0.9, 4) and a.vs_single == pytest.approx(0.55)
    tp = find(results, plan="tp", bandwidth_mbit=20)
    assert tp is not None and tp.vs_single == pytest.approx(2.5) and tp.plan_desc == "tp plan"
    lone = aggregate([_samples("adaptive", [0.3])])[0]
    assert lone.vs_single is None  # no single-device run in that scenario: no ratio
    with pytest.raises(ConfigError):
        Stats.of([])


def test_decoder_samples_give_ttft_and_ms_per_token():
    s = Samples("adaptive", "dec", "homo", (0.4,) * 4, 100, None, "smollm2-bp")
    # leader: 3.1 s in all, first token after 1.0 s, 22 tokens -> 100 ms/token; client saw 0.05 s more
    s.add_reply(3.15, {"plan": "block", "latency_ms": 3100.0, "ttft_ms": 1000.0, "tokens": 22})
    single = Samples("single", "dec", "homo", (0.4,) * 4, 100, None, "smollm2-shape")
    single.add_reply(5.0, {"plan": "single", "latency_ms": 5000.0, "ttft_ms": 900.0, "tokens": 42})
    s.predicted = {"desc": "block", "total_s": 3.0, "ttft_s": 0.9, "ms_per_token": 95.0}
    r = find(aggregate([s, single]), plan="adaptive")
    assert r is not None and r.ttft is not None and r.ms_per_token is not None
    assert r.ttft.median == pytest.approx(1.05) and r.ms_per_token.median == pytest.approx(100.0)
    assert r.ms_per_token_vs_single == pytest.approx(1.0) and r.tokens == 22
    assert r.predicted_ms_per_token == 95.0 and r.predicted_plan == "block"
    table = markdown_table([r], "unshaped")
    assert "| dec |" in table and "100.0 (100.0–100.0)" in table and "TTFT" in table


def test_report_round_trips_and_merge_replaces_the_same_configuration():
    results = aggregate([_samples("single", [0.5]), _samples("adaptive", [0.25]), _samples("single", [0.9], mbit=20)])
    data = report(results, broker_link(None), {"command": "detransformer-edge bench"})
    text = json.dumps(data)
    back, link, meta = load_report(json.loads(text))
    assert back == results and link == broker_link(None) and meta["command"] == "detransformer-edge bench"
    row = data["results"][0]
    for key in ("plan", "workload", "bandwidth_mbit", "devices", "cpu", "median_s", "min_s", "max_s", "runs"):
        assert key in row
    newer = aggregate([_samples("single", [0.7]), _samples("adaptive", [0.35])])
    merged = merge(back, newer)
    assert len(merged) == 3
    assert find(merged, plan="single", bandwidth_mbit=100).latency.median == 0.7  # type: ignore[union-attr]
    assert find(merged, plan="single", bandwidth_mbit=20).latency.median == 0.9  # type: ignore[union-attr]
    assert [r.bandwidth_mbit for r in merged] == [20, 100, 100]
    table = markdown_table(merged, "unshaped")
    assert table.count("| homo | enc128 |") == 3 and "0.50×" in table
    with pytest.raises(ConfigError):
        load_report({"rows": []})


def test_agent_and_broker_configs(tmp_path):
    (tmp_path / "dev2.toml").write_text((Path(__file__).resolve().parents[1] / "firmware_profiles" / "raspberry-pi-5.toml").read_text())
    cfg = AgentConfig.loads(agent_toml("dev2", tmp_path / "dev2.toml", "10.77.0.2"))
    assert cfg.id == "dev2" and cfg.broker.endpoint() == ("10.77.0.2", 1883, False)
    assert cfg.discovery and cfg.dashboard_port == 0 and cfg.profile == tmp_path / "dev2.toml"
    assert "set_tcp_nodelay true" in mosquitto_conf() and "listener 1883 0.0.0.0" in mosquitto_conf()


def test_profiles_scale_with_quota_and_predictions_cover_every_plan():
    sc = Scenario("hetero", (0.8, 0.4, 0.2, 0.2), 100, None, (WORKLOADS["enc128"],), ())
    profs = device_profiles(sc, HostRates(50.0, 40.0, 10.0), ram_mb=2500)
    assert [p.gflops for p in profs] == [40.0, 20.0, 10.0, 10.0] and {p.link_mbit for p in profs} == {100.0}
    preds = {p: predict(sc, WORKLOADS["enc128"], p, "dev0", profs) for p in ("single", "tp", "bp-fixed", "adaptive")}
    assert preds["single"]["desc"].startswith("single on dev0")
    assert preds["tp"]["desc"].startswith("tp over dev0,dev1,dev2,dev3")
    assert preds["bp-fixed"]["desc"].startswith("block dev0:1, dev1:1, dev2:1, dev3:1")
    # the planner searches the decoupled model's plans, fixed block parallelism among them
    assert preds["adaptive"]["total_s"] <= preds["bp-fixed"]["total_s"] * 1.0001
    dec = predict(sc, WORKLOADS["dec"], "single", "dev0", profs)
    assert dec["ms_per_token"] > 0 and dec["total_s"] > dec["ttft_s"]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")
    from detransformer_edge.bench.plots import write_plots

    samples = [_samples(p, [v * f], mbit=m) for m, f in ((20, 2.0), (100, 1.0))
               for p, v in (("single", 0.5), ("tp", 1.2), ("bp-fixed", 0.4), ("adaptive", 0.3))]
    paths = write_plots(aggregate(samples), tmp_path, broker_link(None))
    assert sorted(p.name for p in paths) == ["latency_enc128_homo4.png", "speedup_enc128_homo4.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_targets_and_prediction_tables():
    from detransformer_edge.bench.targets import (
        check_targets,
        prediction_rows,
        predictions_markdown,
        ratio_table,
        targets_markdown,
        within,
    )

    samples = []
    for mbit, single, tp, bp, adaptive in ((1000, 0.5, 0.3, 0.24, 0.2), (100, 0.5, 1.3, 0.3, 0.3), (20, 0.5, 6.0, 0.6, 0.55)):
        for plan, v in (("single", single), ("tp", tp), ("bp-fixed", bp), ("adaptive", adaptive)):
            s = _samples(plan, [v], mbit=mbit)
            s.predicted_s = v * 1.1 if plan != "tp" else v * 2
            samples.append(s)
    hetero = [Samples(p, "enc128", "hetero", HETERO_CPU, 100, None, "bert-base-bp") for p in ("bp-fixed", "adaptive")]
    hetero[0].add_reply(0.9, {"plan": "block"})
    hetero[1].add_reply(0.5, {"plan": "block"})
    results = aggregate(samples + hetero)
    checks = {c.target: c for c in check_targets(results)}
    assert checks["enc128, 4 × 0.4 CPU, 1000 Mbit: adaptive / one device"].met  # 0.40 <= 0.45
    assert not checks["enc128, 4 × 0.4 CPU, 100 Mbit: adaptive / one device"].met  # 0.60 > 0.55
    miss = checks["enc128, 4 × 0.4 CPU, 20 Mbit: adaptive / one device"]
    assert not miss.met and miss.measured.startswith("1.10×") and miss.margin == "-10 %"  # limit 1.0
    assert checks["enc128, 100 Mbit: adaptive faster than Megatron TP"].met  # 1.3 / 0.3 = 4.33
    assert checks["enc128, 100 Mbit: adaptive faster than Megatron TP"].measured == "4.33×"
    assert checks["enc128, 100 Mbit: adaptive never slower than fixed BP"].met
    assert checks["enc128, hetero 0.8/0.4/0.2/0.2, 100 Mbit: adaptive faster than fixed equal-split BP"].met
    assert "| **no** |" in targets_markdown(list(checks.values()))
    rows = prediction_rows(results)
    assert len(rows) == 12 and within(rows) == pytest.approx(9 / 12)  # tp predicted at 2x: +100 %
    assert "Within ±25 %: 9 of 12" in predictions_markdown(results)
    table = ratio_table(results)
    assert "| enc128 | 100 | 500 ms |  | 2.60× | 0.60× | 0.60× | adaptive plan |" in table


def test_traced_runs_say_where_the_time_goes():
    from detransformer_edge.bench.results import Samples, where_table, where_time_went

    # two devices: 0.30 s and 0.20 s of compute; dev0 publishes 125 kB to one device, dev1 the same
    trace = [["dev0", "plan", "block", 0.0, 0.001, 0, 0], ["dev0", "compute", "L0-5", 0.0, 0.30, 0, 0],
             ["dev1", "compute", "L0-5", 0.0, 0.20, 0, 0],
             ["dev0", "encode", "ag", 0.30, 0.31, 0, 0], ["dev0", "publish", "ag", 0.31, 0.32, 125_000, 1],
             ["dev1", "publish", "ag", 0.2, 0.21, 125_000, 1], ["dev1", "decode", "ag", 0.33, 0.35, 0, 0]]
    w = where_time_went(0.45, trace, link_mbit=100)
    assert w["compute_s"] == pytest.approx(0.30)
    assert w["wire_s"] == pytest.approx(125_000 * 8 / 100e6)  # 10 ms: the busiest device's bytes
    assert w["codec_s"] == pytest.approx(0.02)  # dev1's decode beats dev0's encode
    assert w["residual_s"] == pytest.approx(0.45 - 0.30 - 0.01)
    s = Samples("bp-fixed", "enc128", "homo", (0.4, 0.4), 100, None, "bert-base-bp")
    s.add_reply(0.45, {"latency_ms": 440.0, "plan": "block", "trace": trace})
    table = where_table([s])
    assert "| enc128 | 100 | bp-fixed | 450 | 300 | 10 |" in table and table.rstrip().endswith("| 140 |")
    assert where_table([Samples("single", "enc128", "homo", (0.4,), 100, None, "bert-base")]) == ""


def test_an_agent_killed_before_readiness_is_named_at_once(tmp_path: Path) -> None:
    """The heterogeneous home waited its whole 300 s while its leader lay OOM-killed: the wait now
    fails at once, naming the device and the signal."""
    import subprocess
    import sys

    from detransformer_edge.bench.runner import BenchError, BenchHome

    sc = Scenario("hetero", (0.8, 0.4, 0.2, 0.2), 100, None, (WORKLOADS["enc128"],), ())
    bh = BenchHome(sc, None, tmp_path, progress=lambda _m: None, ram_mb=2500)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    killed.wait()
    try:
        bh._agents = {"dev1": alive}
        bh._check_agents_alive()  # all alive: nothing to say
        bh._agents["dev0"] = killed
        with pytest.raises(BenchError, match=r"dev0's agent was killed by signal 9 \(SIGKILL: out of memory in its 2500 MB"):
            bh._check_agents_alive()
    finally:
        alive.kill()
        alive.wait()


def test_readiness_waits_while_agents_progress_and_stops_on_silence(tmp_path: Path) -> None:
    """A slower host takes longer to load the same models: the wait is bounded by silence (no agent
    log line, no new answer from the leader), not by a deadline a faster host happens to meet."""
    from detransformer_edge.service.readiness import StartupWatch

    now = [0.0]
    logs = {"dev0": tmp_path / "dev0.log", "dev1": tmp_path / "dev1.log"}
    logs["dev0"].write_text("agent dev0 starting\n")
    watch = StartupWatch(logs, quiet_s=300, cap_s=3600, clock=lambda: now[0])
    # 20 minutes of start-up, a line every 250 s (one model loaded on a slow device): still waiting
    for minute in range(1, 6):
        now[0] = minute * 250.0
        with logs["dev1"].open("a") as f:
            f.write(f"dev1: loading placement v1: {minute}/5 models\r\n")
        assert watch.why_stop() is None, minute
    # a new answer from the leader is progress too, a repeated one is not
    now[0] = 1500.0
    watch.saw({"code": "not_ready", "message": "dev1 is loading"})
    now[0] = 1790.0
    watch.saw({"code": "not_ready", "message": "dev1 is loading"})
    assert watch.why_stop() is None and watch.remaining() == pytest.approx(10.0)
    # then silence: it gives up 300 s after the last news, naming where each agent stopped
    now[0] = 1800.0
    why = watch.why_stop()
    assert why is not None and "nothing new for 300 s" in why
    assert "dev0: agent dev0 starting" in why and "dev1: dev1: loading placement v1: 5/5 models" in why
    assert watch.remaining() == 0.0


def test_readiness_counts_busy_agents_as_progress_and_idle_ones_not(tmp_path: Path) -> None:
    """Agents that log only warnings are silent while they import torch or load a model: their CPU
    time is the progress there, but only while they use a tenth of a core or more together."""
    from detransformer_edge.service.readiness import StartupWatch

    now, cpu = [0.0], [0.0]
    watch = StartupWatch({"dev0": tmp_path / "dev0.log"}, quiet_s=60, cap_s=600, clock=lambda: now[0],
                         cpu=lambda: cpu[0])
    for t in range(1, 301):  # 5 minutes of silent start-up on a slow host: 0.15 of a core in all
        now[0], cpu[0] = float(t), cpu[0] + 0.15
        assert watch.why_stop() is None, t
    for t in range(301, 400):  # then idle: a status message now and then, 0.02 of a core
        now[0], cpu[0] = float(t), cpu[0] + 0.02
        if watch.why_stop() is not None:
            break
    assert now[0] == 360.0, "gave up too early or too late"
    why = watch.why_stop()
    assert why is not None and "nothing new for 60 s" in why and "none was busy" in why


def test_readiness_gives_up_at_its_cap_even_while_agents_keep_logging(tmp_path: Path) -> None:
    from detransformer_edge.service.readiness import StartupWatch, last_line

    now = [0.0]
    log = tmp_path / "dev0.log"
    watch = StartupWatch({"dev0": log, "dev1": tmp_path / "missing.log"}, quiet_s=60, cap_s=600, clock=lambda: now[0])
    for t in range(30, 631, 30):
        now[0] = float(t)
        with log.open("a") as f:
            f.write("WARNING cannot reach the broker, retrying\n")
        why = watch.why_stop()
        if t < 600:
            assert why is None, t
    assert why is not None and "not ready after 600 s in all" in why and "dev1: (empty)" in why
    assert last_line(tmp_path / "missing.log") == "" and last_line(log) == "WARNING cannot reach the broker, retrying"
    with pytest.raises(ValueError, match="quiet_s"):
        StartupWatch({}, quiet_s=600, cap_s=60)
