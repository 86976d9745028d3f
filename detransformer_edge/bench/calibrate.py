"""Calibrate a testbed device's planner profile where it runs: inside the device's namespace
and CPU quota, time whole BERT-base forwards at seq 128 (the benchmark's own shape) and report
the effective rate. A quota is a duty cycle (e.g. 40 ms per 100 ms), so only a measurement over
many periods sees it; short GEMM micro-benchmarks mostly run between throttles at full speed.

``python -m detransformer_edge.bench.calibrate`` prints one JSON line:
{"gflops": effective FP32 rate, "mem_bw_gbs": copy bandwidth, "forward_s": median forward}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def calibrate(reps: int = 3, seq: int = 128) -> dict[str, float]:
    import torch

    from detransformer_edge.model.config import get_config
    from detransformer_edge.model.encoder import Encoder
    from detransformer_edge.planner.analysis import Workload, model_flops
    from detransformer_edge.planner.measure import measure_memory_bandwidth_gbs

    torch.set_num_threads(1)
    cfg = get_config("bert-base")
    with torch.device("meta"):
        model = Encoder(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    ids = torch.randint(3, cfg.vocab_size, (1, seq))
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        model(ids, mask)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, mask)
            times.append(time.perf_counter() - t0)
    forward = statistics.median(times)
    flops = model_flops(cfg, Workload.for_request("encode", seq))
    # copy bandwidth of short copies (full speed between throttles; profiles scale it by quota)
    t0 = time.perf_counter()
    bw = []
    while time.perf_counter() - t0 < 1.0:
        bw.append(measure_memory_bandwidth_gbs(64, 0.2))
    return {"gflops": flops / forward / 1e9, "mem_bw_gbs": statistics.median(bw), "forward_s": forward}


if __name__ == "__main__":
    print(json.dumps(calibrate()))
    sys.exit(0)
