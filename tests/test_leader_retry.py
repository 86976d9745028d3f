"""The leader's failure handling without a broker: a failed distributed run is re-planned without
the device to blame and retried once; the leader alone is the fallback only when its weights hold
the whole model, else the caller gets an explicit ``busy`` error; a device that goes offline
cancels the runs that need it at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detransformer_edge.parallel.executor import JobResult
from detransformer_edge.parallel.plan import DeviceWeights, Placement, full_replica_weights
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.leader import ClusterState, Leader, ModelPlacement, ServiceError

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-encoder"


class FakeTransport:
    def __init__(self) -> None:
        self.cancelled: list[tuple[str, str]] = []

    def cancel(self, req: str, reason: str = "cancelled") -> int:
        self.cancelled.append((req, reason))
        return 0


class FakeHost:
    """Fails the first ``fail`` coordinator runs with ``error``, then answers zeros."""

    def __init__(self, fail: int = 0, error: str = "RequestCancelled: device dev1 went offline", during=None) -> None:
        self.transport = FakeTransport()
        self.fail, self.error, self.during = fail, error, during
        self.jobs: list = []
        self.ended: list[str] = []

    async def run_coordinator(self, model, job):
        self.jobs.append(job)
        if self.during is not None and len(self.jobs) == 1:
            self.during()  # e.g. the membership hook firing while the run is in flight
        if len(self.jobs) <= self.fail:
            return JobResult(job.req, "dev0", None, self.error)
        return JobResult(job.req, "dev0", torch.zeros(*job.input_ids.shape, 8))

    def end(self, req: str) -> None:
        self.ended.append(req)


def make_leader(host: FakeHost, leader_holds_all: bool = True) -> Leader:
    published: list[tuple[str, object]] = []

    async def publish(topic, payload, qos):
        published.append((topic, payload))

    cat = tiny_catalog()
    leader = Leader("dev0", host, cat, publish, "p/run")  # type: ignore[arg-type]
    cfg = cat.get(MODEL).config()
    devs = ("dev0", "dev1", "dev2")
    holdings = full_replica_weights(devs, cfg.layer_kinds, cfg.nd)
    if not leader_holds_all:
        holdings["dev0"] = DeviceWeights(embeddings=True)
    names = ("intel-n100-minipc", "raspberry-pi-5", "raspberry-pi-4b")
    profiles = {d: load_profile(ROOT / "firmware_profiles" / f"{n}.toml") for d, n in zip(devs, names)}
    leader.state = ClusterState(1, profiles, {MODEL: ModelPlacement(Placement(1, holdings), 0.0, "test")},
                                {d: 1 for d in devs})
    leader.published = published  # type: ignore[attr-defined]
    return leader


def record(leader: Leader):
    return leader._record("embed", "x")


async def test_failed_run_is_retried_once_without_the_device_that_left():
    host = FakeHost(fail=1)
    leader = make_leader(host)
    host.during = lambda: leader.mark_gone("dev1")  # presence offline while the run is in flight
    rec = record(leader)
    ids = torch.ones(1, 5, dtype=torch.long)
    out = await leader.encode(MODEL, ids, torch.ones_like(ids), rec, strategy="pipeline")
    assert out.shape == (1, 5, 8)
    first, second = host.jobs
    assert host.transport.cancelled[0][0] == rec.id  # cancelled at once, not after the timeout
    assert "dev1" in first.plan.devices and second.req == f"{rec.id}-r"
    assert "dev1" not in second.plan.devices and len(second.plan.devices) == 2  # re-planned on dev0 + dev2
    assert leader.retries == 1 and "dev1" not in leader.state.ready
    assert not leader._runs and not leader._blamed  # nothing left behind


async def test_timeout_names_the_silent_device_and_it_leaves_the_ready_set():
    host = FakeHost(fail=1, error="TransportTimeout: no message ('r1', '3') from 'dev2' within 30.0 s")
    leader = make_leader(host)
    ids = torch.ones(1, 4, dtype=torch.long)
    await leader.encode(MODEL, ids, torch.ones_like(ids), record(leader), strategy="pipeline")
    assert "dev2" not in leader.state.ready
    assert "dev2" not in host.jobs[1].plan.devices and "dev2" in host.jobs[0].plan.devices


async def test_a_second_failure_is_an_explicit_error_not_a_third_try():
    host = FakeHost(fail=5)
    leader = make_leader(host)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ServiceError, match="distributed run failed"):
        await leader.encode(MODEL, ids, torch.ones_like(ids), record(leader), strategy="pipeline")
    assert len(host.jobs) == 2


async def test_no_fallback_when_the_leader_does_not_hold_the_whole_model():
    from detransformer_edge.parallel.plan import baseline_plan

    leader = make_leader(FakeHost(), leader_holds_all=False)
    cfg = tiny_catalog().get(MODEL).config()
    failed = baseline_plan("pipeline", ("dev0", "dev1", "dev2"), cfg.n_layers, cfg.nd)
    for d in ("dev1", "dev2"):
        leader.state.ready.pop(d)
    with pytest.raises(ServiceError) as err:
        leader._retry_plan(MODEL, "encode", 4, "pipeline", failed, {"dev1", "dev2"})
    assert err.value.code == "busy" and "cannot run" in str(err.value)
    # with the whole model on the leader, the leader alone is the fallback
    leader = make_leader(FakeHost())
    for d in ("dev1", "dev2"):
        leader.state.ready.pop(d)
    plan = leader._retry_plan(MODEL, "encode", 4, "pipeline", failed, {"dev1", "dev2"})
    assert plan.devices == ("dev0",)


def test_going_offline_cancels_the_runs_that_need_the_device():
    host = FakeHost()
    leader = make_leader(host)
    leader._runs.update({"a": ("dev1",), "b": ("dev2",), "c": ("dev1", "dev2")})
    leader.mark_gone("dev1")
    assert sorted(r for r, _ in host.transport.cancelled) == ["a", "c"]
    assert leader._blamed == {"a": {"dev1"}, "c": {"dev1"}} and "dev1" not in leader.state.ready
    assert leader.run_devices() == {"dev1", "dev2"}
