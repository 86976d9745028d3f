"""Device profiles: the bundled firmware profiles load, round-trip, and bad input fails typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from detransformer_edge.errors import ConfigError
from detransformer_edge.planner.profile import (
    DeviceProfile,
    ProfileError,
    bundled_profiles_dir,
    dump_profile,
    dumps_profile,
    load_profile,
    load_profiles,
    loads_profile,
)

BUNDLED = sorted(bundled_profiles_dir().glob("*.toml"))


def test_bundled_profiles_exist() -> None:
    names = {p.stem for p in BUNDLED}
    for expected in (
        "raspberry-pi-4b", "raspberry-pi-5", "jetson-orin-nano", "intel-n100-minipc",
        "laptop-i5-8250u", "smart-speaker-a53",
    ):
        assert expected in names


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_profile_loads_and_cites_sources(path: Path) -> None:
    prof = load_profile(path)
    assert prof.gflops > 0 and prof.mem_bw_gbs > 0 and prof.ram_mb > 0 and prof.link_mbit > 0
    text = path.read_text()
    # every figure carries its source or derivation in a comment
    assert "#" in text and ("http" in text or "Estimate" in text or "Derived" in text)


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_round_trip(path: Path, tmp_path: Path) -> None:
    prof = load_profile(path)
    assert loads_profile(dumps_profile(prof)) == prof
    out = tmp_path / "p.toml"
    dump_profile(prof, out, comments={"gflops": "measured by test\nsecond line"})
    assert load_profile(out) == prof
    assert "# measured by test" in out.read_text()


def test_bundled_relative_speeds_make_sense() -> None:
    by = {load_profile(p).name: load_profile(p) for p in BUNDLED}
    assert by["speaker"].gflops < by["pi4"].gflops < by["pi5"].gflops < by["n100"].gflops
    assert by["pi4"].capability_score < by["pi5"].capability_score
    assert max(by.values(), key=lambda p: p.capability_score).name in {"n100", "orin-nano", "laptop"}


def _base(**kw: object) -> str:
    fields = {"name": '"dev"', "gflops": "10.0", "mem_bw_gbs": "5.0", "ram_mb": "1000", "link_mbit": "100.0"}
    fields.update({k: str(v) for k, v in kw.items()})
    return "\n".join(f"{k} = {v}" for k, v in fields.items() if v != "DROP") + "\n"


def test_integers_accepted_for_floats() -> None:
    prof = loads_profile(_base(gflops=12))
    assert prof.gflops == 12.0 and isinstance(prof.gflops, float)


@pytest.mark.parametrize(
    "text, fragment",
    [
        (_base(gflops=-1), "gflops must be a positive number"),
        (_base(gflops='"fast"'), "gflops must be a positive number"),
        (_base(ram_mb=1.5), "ram_mb must be a positive integer"),
        (_base(link_mbit="DROP"), "missing profile field(s) link_mbit"),
        (_base(colour='"red"'), "unknown profile field(s) colour"),
        (_base(link='"carrier-pigeon"'), "link must be one of"),
        (_base(name='"a/b"'), "without spaces or MQTT wildcards"),
        (_base(schema=2), "schema 2 is not supported"),
        (_base(rtt_ms=-3), "rtt_ms must be >= 0"),
        ("gflops = = 3", "not valid TOML"),
    ],
)
def test_invalid_profiles_raise_typed_errors(text: str, fragment: str) -> None:
    with pytest.raises(ProfileError, match=None) as info:
        loads_profile(text, "x.toml")
    assert fragment in str(info.value)
    assert "x.toml" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "nope.toml")


def test_duplicate_device_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(_base())
    b.write_text(_base())
    with pytest.raises(ProfileError, match="both name device 'dev'"):
        load_profiles([a, b])


def test_derived_rates_and_scaling() -> None:
    p = DeviceProfile("d", gflops=10.0, mem_bw_gbs=2.0, ram_mb=512, link_mbit=80.0)
    assert p.flops_per_s == 1e10
    assert p.attn_flops_per_s == 5e9  # unmeasured attention: half the GEMM rate
    assert p.link_bytes_per_s == 1e7
    assert p.ram_bytes == 512 * 1024 * 1024
    half = p.scaled(0.5)
    assert half.gflops == 5.0 and half.mem_bw_gbs == 2.0


def test_capability_score_saturates() -> None:
    slow_link = DeviceProfile("a", gflops=50.0, mem_bw_gbs=5.0, ram_mb=4096, link_mbit=10.0)
    fast_link = DeviceProfile("b", gflops=50.0, mem_bw_gbs=5.0, ram_mb=4096, link_mbit=1000.0)
    faster_link = DeviceProfile("c", gflops=50.0, mem_bw_gbs=5.0, ram_mb=65536, link_mbit=10000.0)
    assert slow_link.capability_score < fast_link.capability_score == faster_link.capability_score == 50.0
