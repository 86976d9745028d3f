"""End to end in an emulated home: 2 devices on 100 Mbit links, the real Mosquitto in the
broker's namespace, two real `detransformer-edge agent` processes (tiny catalog, mDNS on) in
the devices' namespaces; one embedding request from the broker's namespace is answered across
both devices and equals the single-device reference.

Needs root (network namespaces, tc, cgroups); skipped with the reason where they cannot be made.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detransformer_edge.bench.runner import BenchHome, HostRates, device_profiles, find_mosquitto
from detransformer_edge.bench.spec import Scenario, Workload
from detransformer_edge.errors import DetransformerError
from detransformer_edge.model.encoder import mean_pool
from detransformer_edge.service.catalog import tiny_catalog

pytestmark = [pytest.mark.testbed, pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(120)]

TEXT = "turn on the kitchen light"


@pytest.fixture(scope="module")
def host_ok() -> None:
    from detransformer_edge.testbed import TestbedUnavailable, check_host

    try:
        check_host()
    except TestbedUnavailable as exc:
        pytest.skip(str(exc))
    try:
        find_mosquitto()
    except DetransformerError as exc:
        pytest.skip(str(exc))


def reference(model: str) -> torch.Tensor:
    m = tiny_catalog().load(model)
    ids = torch.tensor([m.tokenizer.encode(TEXT)])
    with torch.inference_mode():
        return mean_pool(m.model(ids, torch.ones_like(ids)), torch.ones_like(ids))


def test_two_device_home_answers_an_embedding(host_ok: None, tmp_path: Path) -> None:
    workload = Workload("tiny", "embed", len(TEXT) + 2)
    scenario = Scenario("homo", (0.5, 0.5), 100, None, (workload,), ("tp",))
    profiles = device_profiles(scenario, HostRates(gflops=20.0, attn_gflops=10.0, mem_bw_gbs=5.0), ram_mb=1500)
    workdir = tmp_path  # agent, broker and client logs stay here for a failing run
    workdir.chmod(0o755)  # mosquitto may drop root and must read its config
    with BenchHome(scenario, profiles, workdir, catalog="tiny",
                   models=("tiny-encoder", "tiny-encoder-bp")) as bh:
        leader = bh.wait_ready(workload, quiet_s=60, cap_s=600, model="tiny-encoder")
        assert leader in ("dev0", "dev1")
        # fixed block parallelism: both devices compute sub-blocks, float32 activations on the wire
        model = "tiny-encoder-bp"
        ans = bh.request("embed", TEXT, {"model": model, "plan": "bp-fixed"}, timeout_s=30, want_embeddings=True)
        assert ans["ok"], (ans, [p.read_text()[-2000:] for p in workdir.glob("dev*.log")])
        assert ans["result"]["plan"].startswith("block dev"), ans["result"]["plan"]
        assert "dev0" in ans["result"]["plan"] and "dev1" in ans["result"]["plan"]
        got = torch.tensor(ans["embeddings"])
        assert got.shape == (1, tiny_catalog().get(model).config().d_model)
        cos = torch.nn.functional.cosine_similarity(got, reference(model)).item()
        assert cos > 0.9999, cos
