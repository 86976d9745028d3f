"""Cost model on hand-computed cases: FLOP counts, broker phases, whole plans, memory."""

from __future__ import annotations

import pytest

from detransformer_edge.model.config import get_config
from detransformer_edge.parallel.plan import DeviceWeights, Plan
from detransformer_edge.planner import analysis
from detransformer_edge.planner.analysis import Workload
from detransformer_edge.planner.cost import (
    ENVELOPE_BYTES,
    PROCESS_OVERHEAD_MB,
    Broker,
    CostModel,
    PlanningError,
    Request,
)
from detransformer_edge.planner.profile import DeviceProfile
from detransformer_edge.planner.terms import CostTerms


def bare(cfg: object, profiles: list[DeviceProfile], broker: Broker | None = None) -> CostModel:
    """The cost model without the fitted overheads (request path, per-message device CPU), so
    every figure below is FLOPs, bytes and the broker by hand; those terms are tested apart."""
    return CostModel(cfg, profiles, broker, CostTerms())  # type: ignore[arg-type]


HUGE_BW = 1e6  # GB/s: makes every roofline compute-bound so FLOPs alone set the time


def dev(name: str, gflops: float = 1.0, link_mbit: float = 80.0, rtt_ms: float = 0.0, **kw: object) -> DeviceProfile:
    return DeviceProfile(
        name, gflops=gflops, mem_bw_gbs=kw.pop("mem_bw_gbs", HUGE_BW), ram_mb=kw.pop("ram_mb", 4096),  # type: ignore[arg-type]
        link_mbit=link_mbit, rtt_ms=rtt_ms, **kw,  # type: ignore[arg-type]
    )


# -- analysis -----------------------------------------------------------------------------------


def test_layer_flops_by_hand() -> None:
    cfg = get_config("tiny-encoder")  # d=64, 4 heads of 16, d_ff=256, 4 layers
    c = analysis.coupled_layer_cost(cfg, Workload(16, 16))
    # QKV 2*16*64*192 + O 2*16*64*64 + FFN 2*2*16*64*256
    assert c.gemm_flops == 2 * 16 * (64 * 192 + 64 * 64 + 2 * 64 * 256) == 1_572_864
    assert c.attn_flops == 4 * 16 * 16 * 64 == 65_536
    half = analysis.coupled_layer_cost(cfg, Workload(16, 16), shard=2)
    assert half.gemm_flops == c.gemm_flops / 2 and half.attn_flops == c.attn_flops / 2
    # 4 heads over 3 devices: ranges 2/1/1, the slowest shard does half the layer
    third = analysis.coupled_layer_cost(cfg, Workload(16, 16), shard=3)
    assert third.gemm_flops == half.gemm_flops and third.attn_flops == half.attn_flops
    with pytest.raises(Exception, match="at least 5 heads"):
        analysis.coupled_layer_cost(cfg, Workload(16, 16), shard=5)


def test_subblock_flops_and_params_match_config() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    ip = cfg.d_ff_sub
    c = analysis.subblock_cost(cfg, Workload(16, 16))
    # sub-block: Q/K/V 32 -> 64 each (all heads), O 64 -> 32, FFN 32 -> I' -> 32
    assert c.gemm_flops == 2 * 16 * (32 * 192 + 64 * 32 + 2 * 32 * ip)
    assert c.attn_flops == 4 * 16 * 16 * 64  # every sub-block attends with all heads
    assert analysis.subblock_params(cfg) == cfg.layer_params(32, 4, ip)
    assert analysis.layer_counts(cfg) == (2, 2)
    # the decoupled model keeps the standard model's size (I' is chosen for that)
    std = analysis.model_params(get_config("tiny-encoder"))
    assert abs(analysis.model_params(cfg) - std) / std < 0.01


def _counted(module, *args):
    """FLOPs torch itself counts for one forward (math SDPA, so attention is counted too)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(*args)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    attn = counts.pop("aten.bmm", 0)
    return sum(counts.values()), attn


@pytest.mark.parametrize("name,nd,nb,sub_attn", [
    ("tiny-encoder", 4, 2, "slice"), ("tiny-encoder", 4, 2, "full"), ("tiny-decoder", 2, 2, "slice"),
    ("tiny-decoder", 2, 2, "full"), ("minilm-l6", 4, 2, "slice"), ("smollm2-135m", 3, 6, "slice"),
])
def test_analysis_matches_torch_for_sub_blocks_and_coupled_layers(name, nd, nb, sub_attn) -> None:
    """FLOPs, parameters and KV bytes of a sub-block and a coupled layer against the real modules:
    torch's FLOP counter, numel() and the bytes a KV cache holds after a prefill."""
    import torch

    from detransformer_edge.model.decoder import Decoder
    from detransformer_edge.model.encoder import Encoder

    cfg = get_config(name, nd=nd, nb=nb, sub_attn=sub_attn)
    decoder = cfg.family == "decoder"
    torch.manual_seed(0)
    model = (Decoder if decoder else Encoder)(cfg).eval()
    T = 24
    work = Workload.for_request("prefill" if decoder else "encode", T)
    i_dec, i_cpl = cfg.layer_kinds.index("decoupled"), cfg.layer_kinds.index("coupled")
    block, layer = model.layers[i_dec].sub_blocks[1], model.layers[i_cpl]
    extra = (model.rope(0, T),) if decoder else (None,)
    for module, width, cost, params in (
        (block, cfg.d_sub, analysis.subblock_cost(cfg, work), analysis.subblock_params(cfg)),
        (layer, cfg.d_model, analysis.coupled_layer_cost(cfg, work), analysis.coupled_layer_params(cfg)),
    ):
        gemm, attn = _counted(module, torch.randn(1, T, width), *extra)
        assert cost.gemm_flops == gemm
        # the math kernel also multiplies the masked upper triangle: the analysis counts the
        # causal half (mean context (T + 1) / 2), torch all T keys
        assert cost.attn_flops == pytest.approx(attn * work.mean_context / work.context)
        assert params == sum(p.numel() for p in module.parameters())
    assert analysis.model_params(cfg) == model.num_params()
    if decoder:
        caches = model.new_caches()
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, T)), 0, caches)
        sub_cache = caches[i_dec][1]
        used = 2 * sub_cache.k[:, :, :T].numel() * 4
        assert analysis.subblock_kv_bytes(cfg, T) == used
        assert sub_cache.k.shape[1] == cfg.sub_kv_heads
        assert analysis.coupled_kv_bytes(cfg, T) == 2 * caches[i_cpl].k[:, :, :T].numel() * 4


def test_sliced_sub_blocks_cost_a_quarter_of_full_width_attention() -> None:
    """BERT-base nd 4: a sliced decoupled layer does the standard layer's GEMM FLOPs (parity of
    I') and its attention FLOPs; full-width sub-blocks do 4x the attention."""
    w = Workload(128, 128)
    std = analysis.coupled_layer_cost(get_config("bert-base"), w)
    sliced = analysis.subblock_cost(get_config("bert-base", nd=4, nb=2, sub_attn="slice"), w) * 4
    full = analysis.subblock_cost(get_config("bert-base", nd=4, nb=2), w) * 4
    assert sliced.gemm_flops == pytest.approx(std.gemm_flops, rel=1e-9)
    assert sliced.attn_flops == std.attn_flops and full.attn_flops == 4 * std.attn_flops


def test_bert_base_flops_anchor() -> None:
    """The testbed profile derives 48 GFLOPS from 'BERT-base seq 128 takes 0.46 s': 22.3 GFLOP."""
    flops = analysis.model_flops(get_config("bert-base"), Workload(128, 128))
    assert flops == pytest.approx(22.35e9, rel=0.01)
    assert analysis.model_params(get_config("bert-base")) == pytest.approx(109e6, rel=0.01)


def test_decoder_workloads_and_kv() -> None:
    cfg = get_config("smollm2-135m")
    w = Request("decode", 100).workload
    assert (w.tokens, w.context, w.causal) == (1, 101, True)
    assert Request("prefill", 64).workload.mean_context == pytest.approx(32.5)
    # K and V of 3 KV heads x 64 dims, fp32, per layer
    assert analysis.coupled_kv_bytes(cfg, 100) == 2 * 100 * 192 * 4
    assert analysis.coupled_kv_bytes(get_config("bert-base"), 100) == 0
    assert analysis.model_params(cfg) == pytest.approx(134.5e6, rel=0.01)


def test_request_validation() -> None:
    with pytest.raises(PlanningError, match="mode must be one of"):
        Request("train", 10)  # type: ignore[arg-type]
    with pytest.raises(PlanningError, match="seq_len > 0"):
        Request("encode", 0)


# -- broker phases ----------------------------------------------------------------------------


def test_one_message_store_and_forward() -> None:
    m = bare(get_config("tiny-encoder"), [dev("a"), dev("b")], Broker(per_message_ms=1.0))
    seconds, up, down, pubs = m.phase_time([("a", 1_000_000, ("b",))])
    # 1 MB up at 10 MB/s + 1 ms broker + 1 MB down at 10 MB/s
    assert seconds == pytest.approx(0.1 + 0.001 + 0.1)
    assert (up, down, pubs) == ({"a": 1e6}, {"b": 1e6}, 1)


def test_allgather_design_anchor() -> None:
    """DESIGN.md: 4-way all-gather of 98 KB chunks at 100 Mbit ~ 31.9 ms measured."""
    devs = [dev(f"d{i}", link_mbit=100.0) for i in range(4)]
    m = bare(get_config("tiny-encoder"), devs, Broker(per_message_ms=0.0))
    chunk = 98_304
    names = [d.name for d in devs]
    seconds, _, down, pubs = m.phase_time([(n, chunk, tuple(o for o in names if o != n)) for n in names])
    assert seconds == pytest.approx((chunk + 3 * chunk) / 12.5e6)  # 31.46 ms
    assert down == {n: 3 * chunk for n in names} and pubs == 4


def test_broker_link_bottleneck_and_latency() -> None:
    devs = [dev(f"d{i}", link_mbit=1000.0, rtt_ms=2.0 * (i + 1)) for i in range(4)]
    m = bare(get_config("tiny-encoder"), devs, Broker(link_mbit=100.0, per_message_ms=0.5))
    names = [d.name for d in devs]
    chunk = 125_000
    seconds, *_ = m.phase_time([(n, chunk, tuple(o for o in names if o != n)) for n in names])
    broker_in = 4 * chunk / 12.5e6  # 40 ms: the broker's link takes every upload
    broker_out = 12 * chunk / 12.5e6  # 120 ms: and sends every copy
    latency = 0.5 * (8e-3 + 8e-3)  # half the slowest sender's + receiver's round trip
    # the broker forwards each message once it has it whole: its link sends every copy
    # (120 ms) after taking in the first upload (10 ms), not after all four (40 ms)
    assert broker_in == pytest.approx(0.04)
    assert seconds == pytest.approx(chunk / 12.5e6 + broker_out + 4 * 0.5e-3 + latency)


def test_default_rtt_by_link_kind() -> None:
    a = dev("a", rtt_ms=None, link="wifi5")  # type: ignore[arg-type]
    b = dev("b", rtt_ms=None, link="ethernet")  # type: ignore[arg-type]
    m = bare(get_config("tiny-encoder"), [a, b], Broker(per_message_ms=0.0))
    seconds, *_ = m.phase_time([("a", 0, ("b",))])
    assert seconds == pytest.approx(0.5 * (3.0e-3 + 0.5e-3))


def test_wire_bytes() -> None:
    m = bare(get_config("tiny-encoder"), [dev("a")])
    assert m.wire_bytes(16, 32, "float32") == 16 * 32 * 4 + ENVELOPE_BYTES
    assert m.wire_bytes(16, 32, "float16") == 16 * 32 * 2 + ENVELOPE_BYTES
    assert m.wire_bytes(16, 32, "int8") == 16 * 32 + 16 * 4 + ENVELOPE_BYTES


# -- whole plans ------------------------------------------------------------------------------


def test_single_plan_by_hand() -> None:
    cfg = get_config("tiny-encoder")
    m = bare(cfg, [dev("a", gflops=1.0)])
    bd = m.predict(Plan("single", ("a",)), Request("encode", 16))
    per_layer = 1_572_864 / 1e9 + 65_536 / 0.5e9  # attention runs at half rate when unmeasured
    head = 16 * 64 / 1e9  # mean pooling
    assert bd.total_s == pytest.approx(4 * per_layer + head, rel=1e-6)
    assert bd.comm_s == 0 and bd.messages() == 0
    assert bd.device("a").compute_s == pytest.approx(bd.total_s, rel=1e-6)


def test_two_device_block_plan_by_hand() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)  # 2 blocks: 1 decoupled + 1 coupled layer each
    a, b = dev("a", gflops=1.0), dev("b", gflops=1.0)
    m = bare(cfg, [a, b], Broker(per_message_ms=1.0))
    plan = Plan("block", ("a", "b"), wire="float32", sub_block_owner=("a", "b"), coupled="allgather")
    bd = m.predict(plan, Request("encode", 16))

    ip = cfg.d_ff_sub
    t_sub = 2 * 16 * (32 * 192 + 64 * 32 + 2 * 32 * ip) / 1e9 + 65_536 / 0.5e9
    t_layer = 1_572_864 / 1e9 + 65_536 / 0.5e9
    slice_bytes = 16 * 32 * 4 + ENVELOPE_BYTES  # one sub-block's slice, fp32
    scatter = slice_bytes / 1e7 + 1e-3 + slice_bytes / 1e7  # a -> b
    allgather = slice_bytes / 1e7 + 2 * 1e-3 + slice_bytes / 1e7  # each sends one, receives one
    control = CostTerms().control_bytes
    start = control / 1e7 + 1e-3 + control / 1e7  # the run-control message a -> b
    head = 16 * 64 / 1e9
    expected = start + scatter + 2 * (t_sub + allgather + t_layer) + head
    assert bd.total_s == pytest.approx(expected, rel=1e-6)
    assert bd.comm_s == pytest.approx(start + scatter + 2 * allgather)
    assert bd.messages() == 1 + 1 + 2 * 2
    assert bd.device("b").download_bytes == control + slice_bytes * 3  # control, scatter, two all-gathers
    assert bd.device("a").upload_bytes == control + slice_bytes * 3


def test_gather_to_non_coordinator_sends_output_back() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    m = bare(cfg, [dev("a"), dev("b"), dev("c", gflops=10.0)], Broker(per_message_ms=0.0))
    plan = Plan("block", ("a", "b", "c"), sub_block_owner=("a", "b"), coupled="gather", coupled_devices=("c",))
    bd = m.predict(plan, Request("encode", 16))
    names = [s.name for s in bd.steps]
    assert "send output c->a" in names
    gather = next(s for s in bd.steps if s.name.startswith("coupled: gather"))
    scatter = next(s for s in bd.steps if s.name.startswith("coupled: scatter"))
    assert (gather.count, gather.messages, scatter.count, scatter.messages) == (2, 2, 1, 2)


def test_tp_message_counts() -> None:
    cfg = get_config("tiny-encoder")  # 4 layers, 2 all-reduces each
    m = bare(cfg, [dev("a"), dev("b")])
    bd = m.predict(Plan("tp", ("a", "b")), Request("encode", 16))
    # run control + input broadcast + per all-reduce: reduce-scatter 2 + all-gather 2
    assert bd.messages() == 2 + 8 * (2 + 2)
    one_way = 16 * 32 * 4 + ENVELOPE_BYTES
    control = CostTerms().control_bytes
    assert bd.device("b").download_bytes == control + (16 * 64 * 4 + ENVELOPE_BYTES) + 8 * 2 * one_way


def test_pipeline_steps() -> None:
    cfg = get_config("tiny-encoder")
    m = bare(cfg, [dev("a"), dev("b")], Broker(per_message_ms=0.0))
    plan = Plan("pipeline", ("a", "b"), stages=({"device": "a", "start": 0, "end": 1}, {"device": "b", "start": 1, "end": 4}))
    bd = m.predict(plan, Request("encode", 16))
    full = 16 * 64 * 4 + ENVELOPE_BYTES
    control = 2 * CostTerms().control_bytes / 1e7  # the run-control message a->b
    assert bd.comm_s == pytest.approx(control + 2 * (2 * full / 1e7))  # a->b, then the output b->a
    assert bd.device("b").compute_s == pytest.approx(3 * bd.device("a").compute_s, rel=0.01)


def test_memory_accounting() -> None:
    cfg = get_config("tiny-encoder", nd=2, nb=2)
    m = bare(cfg, [dev("a", ram_mb=160), dev("b")])
    held = DeviceWeights(True, (0, 1), (1, 3))
    expect = (
        analysis.embedding_params(cfg) + 2 * 2 * analysis.subblock_params(cfg) + 2 * analysis.coupled_layer_params(cfg)
    ) * 4
    assert m.weights_bytes(held) == expect
    assert m.weights_bytes(DeviceWeights(tp_shards=((0, 2),))) == 2 * analysis.coupled_layer_params(cfg) // 2 * 4
    bd = m.predict(Plan("single", ("a",)), Request("encode", 16))
    mem = bd.device("a").memory_bytes
    assert mem > PROCESS_OVERHEAD_MB * 1024 * 1024
    assert bd.fits is (mem <= 160 * 1024 * 1024)


def test_unknown_device() -> None:
    m = bare(get_config("tiny-encoder"), [dev("a")])
    with pytest.raises(PlanningError, match="no profile for device 'zz'"):
        m.predict(Plan("single", ("zz",)), Request("encode", 8))


# -- the fitted terms and shared machines (planner/terms.py, planner/compute.py) ------------------


def test_the_broker_forwards_while_senders_upload() -> None:
    """A reduce-scatter over 3 devices: each uploads 2 chunks and downloads 2. The broker
    forwards the first chunk while the second is uploaded: 3 chunk times, not 4."""
    devs = [dev(n, link_mbit=80.0) for n in "abc"]
    m = bare(get_config("tiny-encoder"), devs, Broker(per_message_ms=0.0))
    chunk = 100_000  # 10 ms at 80 Mbit
    seconds, *_ = m.phase_time([(a, chunk, (b,)) for a in "abc" for b in "abc" if a != b])
    assert seconds == pytest.approx(3 * chunk / 1e7)


def test_per_message_device_cpu_scales_with_the_core() -> None:
    terms = CostTerms(msg_cpu_ms=2.0, msg_cpu_ms_per_mb=10.0)
    fast, slow = dev("a", gflops=20.0), dev("b", gflops=5.0)  # one core each
    m = CostModel(get_config("tiny-encoder"), [fast, slow], Broker(per_message_ms=0.0), terms)
    nbytes = 500_000
    seconds, *_ = m.phase_time([("a", nbytes, ("b",))])
    wire = 2 * nbytes / 1e7
    ms = 2.0 + 10.0 * 0.5  # per message + per MB, on the 10-GFLOPS reference core
    assert seconds == pytest.approx(wire + ms / 1e3 * (10 / 20) + ms / 1e3 * (10 / 5))
    # cores: message handling is single-threaded, a 4-core device runs it on one core
    quad = DeviceProfile("q", gflops=20.0, mem_bw_gbs=HUGE_BW, ram_mb=4096, link_mbit=80.0, rtt_ms=0.0, cores=4)
    assert quad.core_gflops == 5.0


def test_request_overhead_once_per_request_not_per_decode_step() -> None:
    cfg = get_config("tiny-decoder")
    plain = bare(cfg, [dev("a")])
    with_req = CostModel(cfg, [dev("a")], Broker(), CostTerms(request_cpu_ms=50.0))  # 1 GFLOPS: 10x slower
    single = Plan("single", ("a",))
    for mode in ("prefill", "encode"):
        extra = with_req.latency(single, Request(mode, 16)) - plain.latency(single, Request(mode, 16))  # type: ignore[arg-type]
        assert extra == pytest.approx(0.5)
    assert with_req.latency(single, Request("decode", 16)) == pytest.approx(plain.latency(single, Request("decode", 16)))


def _quota(name: str, q: float, **kw: object) -> DeviceProfile:
    return dev(name, gflops=1.0, cpu_quota=q, **kw)


def test_a_quota_device_bursts_after_idling() -> None:
    """Sustained work t at quota q: after idling the device runs at full core speed until its
    bucket is dry, which saves (1 - q) x period on a long burst (CFS's mean over start phases)
    and runs a short one entirely at full speed."""
    from detransformer_edge.planner.compute import CpuShares

    shares = CpuShares({"a": _quota("a", 0.4)})
    buckets = shares.full_buckets(["a"])
    assert shares.run(buckets, {"a": 0.5})["a"] == pytest.approx(0.5 - 0.6 * 0.1)
    assert shares.run(shares.full_buckets(["a"]), {"a": 0.05})["a"] == pytest.approx(0.05 * 0.4)
    # right after a long burst the bucket is dry: the next step runs at the quota
    dry = {"a": 0.0}
    assert shares.run(dry, {"a": 0.5})["a"] == pytest.approx(0.5)
    # idling refills it at q cores
    shares.idle(dry, 0.03)
    assert dry["a"] == pytest.approx(0.4 * 0.03)


def test_devices_sharing_a_host_slow_down_beyond_its_cores() -> None:
    from detransformer_edge.planner.compute import CpuShares

    devs = {n: _quota(n, 0.4, host="vm", host_cores=1.2) for n in "abcd"}
    shares = CpuShares(devs)
    wall = shares.run(shares.full_buckets("abcd"), dict.fromkeys("abcd", 1.0))
    # 4 x 0.4 cores wanted, 1.2 given: 0.3 each; the buckets never drain (0.3 < 0.4)
    assert all(w == pytest.approx(0.4 / 0.3) for w in wall.values())
    # one device alone on that host gets its quota and its burst
    alone = shares.run(shares.full_buckets("a"), {"a": 1.0})
    assert alone["a"] == pytest.approx(1.0 - 0.6 * 0.1)


def test_quota_plans_walk_every_repetition() -> None:
    """A pipeline stage starts with a burst (its device idled while the earlier stages ran);
    the same plan on unthrottled devices is the sustained sum."""
    cfg = get_config("tiny-encoder")
    plan = Plan("pipeline", ("a", "b"), stages=({"device": "a", "start": 0, "end": 2}, {"device": "b", "start": 2, "end": 4}))
    throttled = bare(cfg, [_quota("a", 0.4, ram_mb=4096), _quota("b", 0.4)], Broker(per_message_ms=0.0))
    free = bare(cfg, [dev("a", gflops=1.0), dev("b", gflops=1.0)], Broker(per_message_ms=0.0))
    t_free = free.predict(plan, Request("encode", 16)).compute_s
    t_throttled = throttled.predict(plan, Request("encode", 16)).compute_s
    assert t_throttled < t_free  # short stages: every stage bursts
    assert throttled.latency(plan, Request("encode", 16)) == pytest.approx(
        throttled.predict(plan, Request("encode", 16)).total_s)


def test_profile_host_fields_are_checked() -> None:
    from detransformer_edge.planner.profile import ProfileError

    with pytest.raises(ProfileError, match="host and host_cores go together"):
        dev("a", host="vm")
    with pytest.raises(ProfileError, match="cpu_quota 2.0 exceeds its 1 cores"):
        dev("a", cpu_quota=2.0)
