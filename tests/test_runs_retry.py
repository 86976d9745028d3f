"""The leader's failure handling without a broker: a failed distributed run is re-planned without
the device to blame and retried once; the leader alone is the fallback only when its weights hold
the whole model, else the caller gets an explicit ``busy`` error; a device that goes offline
cancels the runs that need it at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detransformer_edge.parallel.executor import Failure, JobResult
from detransformer_edge.parallel.plan import DeviceWeights, Placement, full_replica_weights
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.service.catalog import tiny_catalog
from detransformer_edge.service.placement import (
    ClusterState,
    ModelPlacement,
    Placements,
    ServiceError,
)
from detransformer_edge.service.runs import RunCoordinator

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-encoder"


WENT_OFFLINE = Failure("cancelled", None, "device dev1 went offline")


class FakeHost:
    """Fails the first ``fail`` coordinator runs with ``failure``, then answers zeros."""

    def __init__(self, fail: int = 0, failure: Failure = WENT_OFFLINE, during=None) -> None:
        self.fail, self.failure, self.during = fail, failure, during
        self.jobs: list = []
        self.ended: list[str] = []
        self.cancelled: list[tuple[str, str]] = []

    async def run_coordinator(self, model, job):
        self.jobs.append(job)
        if self.during is not None and len(self.jobs) == 1:
            self.during()  # e.g. the membership hook firing while the run is in flight
        if len(self.jobs) <= self.fail:
            return JobResult(job.req, "dev0", None, self.failure)
        return JobResult(job.req, "dev0", torch.zeros(*job.input_ids.shape, 8))

    def cancel(self, req: str, reason: str) -> None:
        self.cancelled.append((req, reason))

    def end(self, req: str) -> None:
        self.ended.append(req)


def make_runs(host: FakeHost, leader_holds_all: bool = True) -> RunCoordinator:
    published: list[tuple[str, object]] = []

    async def publish(topic, payload, qos, wait_ack=True):
        published.append((topic, payload))

    cat = tiny_catalog()
    placements = Placements("dev0", cat)
    cfg = cat.get(MODEL).config()
    devs = ("dev0", "dev1", "dev2")
    holdings = full_replica_weights(devs, cfg.layer_kinds, cfg.nd)
    if not leader_holds_all:
        holdings["dev0"] = DeviceWeights(embeddings=True)
    names = ("intel-n100-minipc", "raspberry-pi-5", "raspberry-pi-4b")
    profiles = {d: load_profile(ROOT / "firmware_profiles" / f"{n}.toml") for d, n in zip(devs, names)}
    placements.state = ClusterState(1, profiles, {MODEL: ModelPlacement(Placement(1, holdings), 0.0, "test")},
                                    {d: 1 for d in devs})
    runs = RunCoordinator("dev0", host, placements, publish, RunTopics("p"))
    runs.published = published  # type: ignore[attr-defined]
    return runs


async def test_failed_run_is_retried_once_without_the_device_that_left():
    host = FakeHost(fail=1)
    runs = make_runs(host)
    host.during = lambda: runs.mark_gone("dev1")  # presence offline while the run is in flight
    rec = "e1-abc"
    ids = torch.ones(1, 5, dtype=torch.long)
    out = await runs.encode(MODEL, ids, torch.ones_like(ids), rec, strategy="pipeline")
    assert out.shape == (1, 5, 8)
    first, second = host.jobs
    assert host.cancelled[0][0] == rec  # cancelled at once, not after the timeout
    assert "dev1" in first.plan.devices and second.req == f"{rec}-r"
    assert "dev1" not in second.plan.devices and len(second.plan.devices) == 2  # re-planned on dev0 + dev2
    assert runs.retries == 1 and "dev1" not in runs.placements.state.ready
    assert not runs._runs and not runs._gone  # nothing left behind


async def test_timeout_names_the_silent_device_and_it_leaves_the_ready_set():
    host = FakeHost(fail=1, failure=Failure("timeout", "dev2", "no message ('r1', '3') from 'dev2' within 30.0 s"))
    runs = make_runs(host)
    ids = torch.ones(1, 4, dtype=torch.long)
    await runs.encode(MODEL, ids, torch.ones_like(ids), "e2-abc", strategy="pipeline")
    assert "dev2" not in runs.placements.state.ready
    assert "dev2" not in host.jobs[1].plan.devices and "dev2" in host.jobs[0].plan.devices


async def test_a_second_failure_is_an_explicit_error_not_a_third_try():
    host = FakeHost(fail=5)
    runs = make_runs(host)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ServiceError, match="distributed run failed"):
        await runs.encode(MODEL, ids, torch.ones_like(ids), "e2-abc", strategy="pipeline")
    assert len(host.jobs) == 2


async def test_no_fallback_when_the_leader_does_not_hold_the_whole_model():
    from detransformer_edge.parallel.plan import baseline_plan

    runs = make_runs(FakeHost(), leader_holds_all=False)
    cfg = tiny_catalog().get(MODEL).config()
    failed = baseline_plan("pipeline", ("dev0", "dev1", "dev2"), cfg.n_layers, cfg.nd)
    for d in ("dev1", "dev2"):
        runs.placements.state.ready.pop(d)
    with pytest.raises(ServiceError) as err:
        runs.placements.retry_plan(MODEL, "encode", 4, "pipeline", failed, {"dev1", "dev2"})
    assert err.value.code == "busy" and "cannot run" in str(err.value)
    # with the whole model on the leader, the leader alone is the fallback
    runs = make_runs(FakeHost())
    for d in ("dev1", "dev2"):
        runs.placements.state.ready.pop(d)
    chosen = runs.placements.retry_plan(MODEL, "encode", 4, "pipeline", failed, {"dev1", "dev2"})
    assert chosen.plan.devices == ("dev0",) and chosen.model == MODEL


def test_going_offline_cancels_the_runs_that_need_the_device():
    host = FakeHost()
    runs = make_runs(host)
    runs._runs.update({"a": ("dev1",), "b": ("dev2",), "c": ("dev1", "dev2")})
    runs.mark_gone("dev1")
    assert sorted(r for r, _ in host.cancelled) == ["a", "c"]
    assert runs._gone == {"a": {"dev1"}, "c": {"dev1"}} and "dev1" not in runs.placements.state.ready
    assert runs.run_devices() == {"dev1", "dev2"}
