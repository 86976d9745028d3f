"""Home-network testbed: specs (pure) and real homes in network namespaces (root).

The `testbed` tests build homes on this host; they skip with check_host()'s exact reason
where namespaces cannot be made. All their traffic goes between addresses of homes they
built, i.e. between namespaces they created.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from detransformer_edge.errors import ConfigError, DetransformerError
from detransformer_edge.testbed import (
    BROKER,
    STANDARD_RATES_MBIT,
    BrokerSpec,
    DeviceSpec,
    Home,
    HomeSpec,
    TbfParams,
    TestbedUnavailable,
    check_host,
    cleanup_stale,
)
from detransformer_edge.testbed import host as host_mod
from detransformer_edge.testbed.measure import measure_cpu_shares, measure_throughput, ping
from detransformer_edge.testbed.registry import STATE_DIR, list_netns

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ pure: specs


def test_spec_addresses_and_names() -> None:
    spec = HomeSpec(devices=[DeviceSpec("pi", cpu=0.4), DeviceSpec("laptop")], prefix="t1")
    assert spec.address("router") == "10.77.0.1"
    assert spec.address(BROKER) == "10.77.0.2"
    assert [spec.address(d) for d in ("pi", "laptop")] == ["10.77.0.10", "10.77.0.11"]
    assert spec.netns("pi") == "t1-pi" and spec.cgroup("broker") == "t1-broker"
    assert [n.name for n in spec.nodes] == ["pi", "laptop", BROKER]
    assert HomeSpec(devices=[DeviceSpec("a")]).prefix != HomeSpec(devices=[DeviceSpec("a")]).prefix


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeviceSpec("Bad Name"),
        lambda: DeviceSpec("broker"),
        lambda: DeviceSpec("a", cpu=0),
        lambda: DeviceSpec("a", mbit=0),
        lambda: DeviceSpec("a", mem_mb=1),
        lambda: HomeSpec(devices=[]),
        lambda: HomeSpec(devices=[DeviceSpec("a"), DeviceSpec("a")]),
        lambda: HomeSpec(devices=[DeviceSpec("a")], prefix="has-dash"),
        lambda: HomeSpec(devices=[DeviceSpec("a")], subnet="8.8.8.0/24"),
        lambda: HomeSpec(devices=[DeviceSpec("a")], subnet="10.0.0.0/16"),
    ],
)
def test_spec_rejects_invalid(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        make()


def test_tbf_params_per_rate() -> None:
    for mbit in STANDARD_RATES_MBIT:
        t = TbfParams.for_rate(mbit)
        assert t.burst_bytes >= 32 * 1024 and t.limit_bytes >= 256 * 1024
        assert t.limit_bytes > t.burst_bytes
        assert t.max_queue_ms <= 110  # a full queue adds at most ~0.1 s
    assert TbfParams.for_rate(20).tc_args() == [
        "tbf", "rate", "20mbit", "burst", "32768", "limit", "262144"
    ]  # fmt: skip


def test_unavailable_lists_everything_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_mod.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(host_mod, "find_controller", lambda name: None)
    with pytest.raises(TestbedUnavailable) as info:
        check_host()
    msg = str(info.value)
    assert isinstance(info.value, DetransformerError)
    assert "must run as root (euid 0), this process has euid 1000" in msg
    assert "`ip` not found" in msg and "`tc` not found" in msg
    assert "no cgroup cpu controller" in msg and "no cgroup memory controller" in msg
    # a spec without limits needs no cgroup controller
    with pytest.raises(TestbedUnavailable) as info:
        check_host(HomeSpec(devices=[DeviceSpec("a")]))
    assert "cgroup" not in str(info.value)


@pytest.mark.parametrize("version", [1, 2])
def test_write_limits_v1_and_v2(tmp_path: Path, version: int) -> None:
    files = {
        1: ["cpu.cfs_period_us", "cpu.cfs_quota_us", "memory.limit_in_bytes"],
        2: ["cpu.max", "memory.max", "memory.swap.max"],
    }[version]
    for f in files:
        (tmp_path / f).write_text("")
    for name in ("cpu", "memory"):
        ctrl = host_mod.CgroupController(name, tmp_path.parent, version)
        host_mod.write_limits(ctrl, tmp_path, cpu=0.4, mem_mb=64)
    got = {f: (tmp_path / f).read_text() for f in files}
    if version == 1:
        assert got == {
            "cpu.cfs_period_us": "100000",
            "cpu.cfs_quota_us": "40000",
            "memory.limit_in_bytes": str(64 * 2**20),
        }
    else:
        assert got == {
            "cpu.max": "40000 100000",
            "memory.max": str(64 * 2**20),
            "memory.swap.max": "0",
        }


def test_find_controller_prefers_v1_then_v2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = tmp_path / "cpu", tmp_path / "unified"
    v1.mkdir()
    v2.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1")
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts = [(str(v1), "cgroup", {"rw", "cpu", "cpuacct"}), (str(v2), "cgroup2", {"rw"})]
    monkeypatch.setattr(host_mod, "_mounts", lambda: mounts)
    assert host_mod.find_controller("cpu") == host_mod.CgroupController("cpu", v1, 1)
    assert host_mod.find_controller("memory") == host_mod.CgroupController("memory", v2, 2)
    monkeypatch.setattr(host_mod, "_mounts", lambda: mounts[1:])
    assert host_mod.find_controller("cpu") == host_mod.CgroupController("cpu", v2, 2)
    monkeypatch.setattr(host_mod, "_mounts", list)
    assert host_mod.find_controller("cpu") is None


# ------------------------------------------------------------------ real homes (root)


@pytest.fixture(scope="module")
def host() -> None:
    try:
        check_host()
    except TestbedUnavailable as exc:
        pytest.skip(str(exc))


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout


def _root_addrs() -> str:
    return subprocess.run(["ip", "-o", "addr"], check=True, capture_output=True, text=True).stdout


def _assert_gone(spec: HomeSpec, cgroups: list[str]) -> None:
    assert not [ns for ns in list_netns() if ns.startswith(spec.prefix + "-")]
    assert cgroups and not [g for g in cgroups if Path(g).exists()]
    assert not (STATE_DIR / f"{spec.prefix}.json").exists()


@pytest.mark.testbed
def test_connectivity_and_isolation(host: None) -> None:
    links_before, addrs_before = _root_links(), _root_addrs()
    spec = HomeSpec(
        devices=[DeviceSpec("pi", cpu=0.5), DeviceSpec("laptop"), DeviceSpec("speaker", mbit=20)]
    )
    with Home(spec) as home:
        nodes = ["pi", "laptop", "speaker", BROKER]
        for src in nodes:
            for dst in nodes:
                if src != dst:
                    p = ping(home, src, dst, count=2)
                    assert p.received == 2, f"{src} -> {dst}: {p}"
        for src, dst in (("pi", "laptop"), ("speaker", BROKER), (BROKER, "pi")):
            t = measure_throughput(home, src, dst, nbytes=100_000)
            assert t.bytes == 100_000
        # nothing of the home reaches the root namespace
        assert _root_links() == links_before
        assert _root_addrs() == addrs_before
        assert "10.77.0." not in _root_addrs()
        # a device has only lo and its own link, no route out of the home
        routes = home.run("pi", ["ip", "-4", "route"]).stdout
        assert routes.strip() == "10.77.0.0/24 dev eth0 proto kernel scope link src 10.77.0.10"
        assert "wired hub" in home.report()


@pytest.mark.testbed
def test_link_rates_within_20_percent(host: None) -> None:
    spec = HomeSpec(
        devices=[DeviceSpec("fast1", mbit=100), DeviceSpec("fast2", mbit=100),
                 DeviceSpec("slow", mbit=20)],
        broker=BrokerSpec(mbit=20),
    )  # fmt: skip
    with Home(spec) as home:
        cases = [
            ("fast1", "fast2", 100),  # 100 up, 100 down
            ("fast2", "fast1", 100),
            ("fast1", "slow", 20),  # slow's download shaping (bridge side)
            ("slow", "fast1", 20),  # slow's upload shaping (device side)
            ("fast1", BROKER, 20),  # a shaped broker link
        ]
        for src, dst, mbit in cases:
            nbytes = int(mbit * 1e6 / 8 * 1.2)  # ~1.2 s: 3 MB at 20, 15 MB at 100 Mbit/s
            t = measure_throughput(home, src, dst, nbytes)
            assert 0.8 * mbit <= t.mbit <= 1.2 * mbit, f"{src} -> {dst}: {t}"


@pytest.mark.testbed
def test_unshaped_broker_is_not_the_bottleneck(host: None) -> None:
    spec = HomeSpec(devices=[DeviceSpec("a", mbit=100)], broker=BrokerSpec(mbit=None))
    with Home(spec) as home:
        t = measure_throughput(home, "a", BROKER, 15_000_000)
        assert 80 <= t.mbit <= 120


@pytest.mark.testbed
def test_cpu_quota_share(host: None) -> None:
    spec = HomeSpec(
        devices=[DeviceSpec("slow", cpu=0.2), DeviceSpec("fast", cpu=0.8), DeviceSpec("free")]
    )
    with Home(spec) as home:
        shares = measure_cpu_shares(home, ["slow", "fast", "free"], seconds=2.0)
    # A quota is a ceiling; what a loop reaches is min(quota, what the shared host leaves),
    # which the unlimited "free" device shows.
    free = shares["free"]
    if free < 0.3:
        pytest.fail(f"host too busy to measure CPU quotas: an unlimited loop got {free:.2f}")
    assert 0.14 <= shares["slow"] <= 0.26, shares
    assert 0.6 * min(0.8, free) <= shares["fast"] <= 0.88, shares  # a ceiling, not a guarantee on a busy host
    assert shares["fast"] > 1.4 * shares["slow"], shares


@pytest.mark.testbed
def test_memory_limit(host: None) -> None:
    with Home(HomeSpec(devices=[DeviceSpec("pi", mem_mb=64)])) as home:
        hog = home.run(
            "pi", [sys.executable, "-c", "b = bytearray(256 * 2**20); b[::4096] = b'x' * 65536"],
            check=False,
        )  # fmt: skip
        assert hog.returncode == -signal.SIGKILL  # the cgroup's OOM killer, not MemoryError
        assert home.run("pi", [sys.executable, "-c", "b = bytearray(8 * 2**20)"]).returncode == 0


@pytest.mark.testbed
def test_everything_gone_after_exit(host: None) -> None:
    links_before = _root_links()
    spec = HomeSpec(devices=[DeviceSpec("a", cpu=0.3, mem_mb=128), DeviceSpec("b")])
    with Home(spec) as home:
        cgroups = [g for link in home.links for g in link.cgroups]
        sleeper = home.spawn("a", ["sleep", "1000"])
        env = home.run(
            "a", ["sh", "-c", "echo $DETRANSFORMER_TESTBED_CPU $DETRANSFORMER_TESTBED_MBIT"]
        )
        assert env.stdout.split() == ["0.3", "100"]
        assert len(list_netns()) >= 4 and all(Path(g).is_dir() for g in cgroups)
    assert sleeper.poll() is not None
    _assert_gone(spec, cgroups)
    assert _root_links() == links_before


@pytest.mark.testbed
def test_failure_inside_with_still_tears_down(host: None) -> None:
    spec = HomeSpec(devices=[DeviceSpec("a", cpu=0.5)])
    with pytest.raises(RuntimeError), Home(spec) as home:
        cgroups = [g for link in home.links for g in link.cgroups]
        raise RuntimeError("boom")
    _assert_gone(spec, cgroups)


@pytest.mark.testbed
def test_abandoned_home_then_cleanup_stale(host: None) -> None:
    prefix = _unique("crash")
    spec = HomeSpec(devices=[DeviceSpec("a", cpu=0.5), DeviceSpec("b")], prefix=prefix)
    crashed = Home(spec)
    crashed.open()  # never closed: a crash as far as the host is concerned
    cgroups = [g for link in crashed.links for g in link.cgroups]
    crashed.spawn("a", ["sleep", "1000"])
    assert cleanup_stale(prefix) == [prefix]
    _assert_gone(spec, cgroups)
    with Home(spec) as second:
        assert ping(second, "a", "b").received == 3
    crashed.close()  # finds its record gone and leaves the second run's names alone
    _assert_gone(spec, cgroups)


_CRASHING_RUN = textwrap.dedent(
    """
    import sys, time
    from detransformer_edge.testbed import Home, HomeSpec, DeviceSpec
    home = Home(HomeSpec(devices=[DeviceSpec("a", cpu=0.5), DeviceSpec("b")],
                         prefix=sys.argv[1]))
    home.open()
    home.spawn("a", ["sleep", "1000"])
    print("READY", flush=True)
    time.sleep(1000)
    """
)


def _unique(what: str) -> str:
    """A prefix of its own, so concurrent runs of these tests never touch each other."""
    return f"dtbt{what}{secrets.token_hex(3)}"


def _start_owner(prefix: str) -> subprocess.Popen[str]:
    owner = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_RUN, prefix], cwd=REPO, text=True,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert owner.stdout is not None and owner.stdout.readline().strip() == "READY"
    return owner


@pytest.mark.testbed
def test_killed_owner_then_second_run(host: None) -> None:
    prefix = _unique("kill")
    owner = _start_owner(prefix)
    owner.kill()  # SIGKILL: no atexit, no teardown
    owner.wait()
    assert f"{prefix}-a" in list_netns()  # the crash left the home behind
    # the same prefix again: the new home clears the dead owner's leftovers itself
    spec = HomeSpec(devices=[DeviceSpec("a"), DeviceSpec("b")], prefix=prefix)
    with Home(spec) as home:
        cgroups = [g for link in home.links for g in link.cgroups]
        assert ping(home, "a", "b").received == 3
    _assert_gone(spec, cgroups)

    owner = _start_owner(prefix)
    owner.kill()
    owner.wait()
    assert prefix in cleanup_stale()  # no prefix named: finds homes of dead owners
    _assert_gone(spec, cgroups)


@pytest.mark.testbed
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)]
)
def test_signal_tears_down(host: None, sig: signal.Signals, code: int) -> None:
    prefix = _unique("sig")
    owner = _start_owner(prefix)
    assert f"{prefix}-a" in list_netns()
    owner.send_signal(sig)  # SIGINT: KeyboardInterrupt, as Ctrl-C
    assert owner.wait(timeout=20) == code
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    assert not (STATE_DIR / f"{prefix}.json").exists()


@pytest.mark.testbed
def test_live_prefix_is_refused(host: None) -> None:
    spec = HomeSpec(devices=[DeviceSpec("a")])
    with Home(spec), pytest.raises(DetransformerError, match="in use by live process"):
        Home(spec).open()
