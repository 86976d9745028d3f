"""Local profiler and the `profile` / `plan` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from detransformer_edge.cli import COMMANDS
from detransformer_edge.model.config import get_config
from detransformer_edge.planner import measure
from detransformer_edge.planner.profile import ProfileError, bundled_profiles_dir, load_profile


def test_parse_meminfo() -> None:
    text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n"
    assert measure.parse_meminfo(text) == 8_000_000 * 1024
    assert measure.parse_meminfo("MemTotal: 1 kB\n") is None


def test_available_memory_takes_the_smaller_limit() -> None:
    meminfo = "MemAvailable: 4194304 kB\n"  # 4 GiB
    assert measure.available_memory_mb(meminfo, cgroup=None) == int(4096 * measure.MEMORY_SAFETY)
    assert measure.available_memory_mb(meminfo, cgroup=1024 * 2**20) == int(1024 * measure.MEMORY_SAFETY)
    with pytest.raises(ProfileError, match="pass --ram-mb"):
        measure.available_memory_mb("", cgroup=None)


def test_cgroup_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("73741824\n")
    assert measure.cgroup_headroom(tmp_path) == 1_000_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert measure.cgroup_headroom(tmp_path) is None
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory.usage_in_bytes").write_text("500\n")
    assert measure.cgroup_headroom(tmp_path) == 1500
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    assert measure.cgroup_headroom(tmp_path) is None


def test_parse_broker() -> None:
    assert measure.parse_broker("pi.local:1884") == ("pi.local", 1884)
    assert measure.parse_broker("pi.local") == ("pi.local", 1883)
    with pytest.raises(ProfileError, match="host:port"):
        measure.parse_broker("pi.local:abc")


def test_progress_ticks_through_the_one_helper(caplog: pytest.LogCaptureFixture) -> None:
    """tqdm is a dependency; off a terminal the bar is log lines (detransformer_edge.progress)."""
    caplog.set_level("WARNING")
    bar = measure.Progress(2)
    bar.step("first")
    bar.step("second")
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "detransformer_edge.progress"]
    assert lines and "2/2" in lines[-1] and lines[-1].startswith("second")


def test_measure_device_without_broker() -> None:
    import torch

    torch.set_num_threads(1)
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    m = measure.measure_device("probe", cfg, seq_len=32, budget_s=1.0, quiet=True)
    p = m.profile
    assert p.name == "probe" and p.gflops > 0 and p.attn_gflops and p.mem_bw_gbs > 0 and p.ram_mb > 0
    assert p.rtt_ms is None and p.link_mbit == measure.DEFAULT_LINK_MBIT
    assert "not measured" in m.notes["link_mbit"]


@pytest.mark.mosquitto
def test_measure_broker_round_trip(mosquitto_broker: tuple[str, int]) -> None:
    import asyncio

    rtt_ms, mbit = asyncio.run(measure.measure_broker(*mosquitto_broker, rounds=5))
    assert 0 < rtt_ms < 100
    assert 0 < mbit <= measure.LINK_MBIT_CAP


def _run(module: object, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return module.run(parser.parse_args(argv))  # type: ignore[attr-defined]


def test_commands_registered() -> None:
    assert ("profile", "profile") in COMMANDS and ("plan", "plan") in COMMANDS


@pytest.mark.mosquitto
def test_profile_command_writes_a_loadable_profile(tmp_path: Path, mosquitto_broker: tuple[str, int]) -> None:
    from detransformer_edge.commands import profile

    out = tmp_path / "me.toml"
    host, port = mosquitto_broker
    rc = _run(profile, ["--model", "tiny-encoder", "--seq", "32", "--budget", "1", "--threads", "1", "--quiet",
                        "--broker", f"{host}:{port}", "--name", "me", "--out", str(out)])
    assert rc == 0
    p = load_profile(out)
    assert p.name == "me" and p.rtt_ms is not None and p.link == "loopback"
    assert "# measured: MQTT publish" in out.read_text()


def test_plan_command_output(capsys: pytest.CaptureFixture[str]) -> None:
    from detransformer_edge.commands import plan

    testbed = str(bundled_profiles_dir() / "testbed-0.45cpu.toml")
    rc = _run(plan, ["--profiles", f"{testbed}*4", "--model", "bert-base", "--nb", "4", "--seq", "128",
                     "--mbit", "100", "--explain"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plan       block" in out and "coupled=allgather" in out
    assert "per device:" in out and "testbed-4" in out
    assert out.count("ms (+") == 5  # five alternatives, each with why it lost
    rc = _run(plan, ["--profiles", f"{testbed}*4", "--model", "bert-base", "--nb", "4", "--seq", "128",
                     "--mbit", "20", "--accuracy", "exact"])
    assert "plan       single on testbed-1" in capsys.readouterr().out


def test_plan_command_decoder_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from detransformer_edge.commands import plan

    d = bundled_profiles_dir()
    files = [str(d / f) for f in ("raspberry-pi-5.toml", "intel-n100-minipc.toml", "laptop-i5-8250u.toml")]
    assert _run(plan, ["--profiles", *files, "--model", "smollm2-135m", "--nd", "3", "--nb", "3",
                       "--seq", "256", "--mode", "decode"]) == 0
    assert "request decode seq 256" in capsys.readouterr().out
    with pytest.raises(ProfileError, match="FILE or FILE"):
        _run(plan, ["--profiles", files[0] + "*x", "--seq", "16"])
    with pytest.raises(ProfileError, match="both name device"):
        _run(plan, ["--profiles", files[0], files[0], "--seq", "16"])
    assert load_profile(files[0]).name == "pi5"
