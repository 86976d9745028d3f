"""The parity subset over a real broker: each device its own MQTT client (Mosquitto; amqtt
for the embedded demo broker). Outputs must equal the single-device reference."""

import asyncio
import contextlib

import pytest
import torch

from detransformer_edge.parallel.local import LocalCluster, shards_for_plans
from detransformer_edge.parallel.plan import Plan, Stage
from detransformer_edge.protocol.topics import RunTopics
from detransformer_edge.transport.mqtt import MqttTransport
from tests.test_executor_parity import _encoder_inputs, _model

pytestmark = pytest.mark.mosquitto


@contextlib.asynccontextmanager
async def mqtt_cluster(model, plans, broker, prefix):
    host, port = broker
    shards = shards_for_plans(model, plans)
    async with contextlib.AsyncExitStack() as stack:
        transports = {
            d: await stack.enter_async_context(MqttTransport.connect(d, host, port, RunTopics(prefix))) for d in shards
        }
        with LocalCluster(transports, shards) as cluster:
            yield cluster


ENCODER_PLANS = [
    ("tiny-encoder", 8, 2, Plan("block", ("d0", "d1", "d2", "d3"), sub_block_owner=("d0", "d1", "d2", "d3") * 2)),
    ("tiny-encoder", 8, 2, Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0",) * 4 + ("d1",) * 2 + ("d2",) * 2,
                                coupled="gather", coupled_devices=("d1",))),
    ("tiny-encoder", 4, 2, Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0", "d1", "d2", "d0"),
                                coupled="tp", coupled_devices=("d1", "d2"))),
    ("tiny-encoder", 1, None, Plan("tp", ("d0", "d1", "d2"))),
    ("tiny-encoder", 1, None, Plan("pipeline", ("d0", "d1"), stages=(Stage("d0", 0, 1), Stage("d1", 1, 4)))),
]


@pytest.mark.parametrize("name,nd,nb,plan", ENCODER_PLANS, ids=lambda x: x.describe() if isinstance(x, Plan) else str(x))
async def test_encoder_over_mosquitto(mosquitto_broker, topic_prefix, name, nd, nb, plan):
    model = _model(name, nd, nb)
    ids, mask = _encoder_inputs(model.cfg)
    with torch.inference_mode():
        ref = model(ids, mask)
    async with mqtt_cluster(model, [plan], mosquitto_broker, topic_prefix) as cluster:
        res = await cluster.encode(plan, ids, mask, timeout=20)
    assert res.ok, res.failure
    assert (res.output - ref).abs().max().item() <= 1e-4


async def test_decoder_block_parallel_float16_over_mosquitto(mosquitto_broker, topic_prefix):
    model = _model("tiny-decoder", 4, 2)
    plan = Plan("block", ("d0", "d1", "d2", "d3"), "float16", sub_block_owner=("d0", "d1", "d2", "d3"))
    f32 = Plan("block", ("d0", "d1", "d2", "d3"), "float32", sub_block_owner=("d0", "d1", "d2", "d3"))
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    async with mqtt_cluster(model, [plan, Plan("single", ("d0",))], mosquitto_broker, topic_prefix) as cluster:
        ref, ref_steps = await cluster.generate(Plan("single", ("d0",)), prompt, 6)
        got32, steps32 = await cluster.generate(f32, prompt, 6)
        got16, _ = await cluster.generate(plan, prompt, 6)
    assert torch.equal(got32, ref) and torch.equal(got16, ref)
    assert max((a - b).abs().max().item() for a, b in zip(steps32, ref_steps)) <= 1e-4


async def test_three_interleaved_requests_over_mosquitto(mosquitto_broker, topic_prefix):
    model = _model("tiny-decoder", 4, 2)
    plans = [
        Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0", "d1", "d2", "d0")),
        Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0", "d1", "d1", "d2"), coupled="gather", coupled_devices=("d2",)),
        Plan("block", ("d0", "d1", "d2"), sub_block_owner=("d0", "d2", "d1", "d2"), coupled="tp", coupled_devices=("d0", "d1")),
    ]
    single = Plan("single", ("d0",))
    prompts = [torch.randint(0, model.cfg.vocab_size, (1, 4 + k), generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    async with mqtt_cluster(model, [*plans, single], mosquitto_broker, topic_prefix) as cluster:
        outs = await asyncio.gather(*(cluster.generate(p, x, 5, req=f"mix{k}") for k, (p, x) in enumerate(zip(plans, prompts))))
        refs = [await cluster.generate(single, x, 5) for x in prompts]
    for (gen, _), (ref, _) in zip(outs, refs):
        assert torch.equal(gen, ref)


async def test_block_parallel_on_embedded_amqtt_broker(amqtt_broker, topic_prefix):
    model = _model("tiny-encoder", 4, 2)
    plan = Plan("block", ("d0", "d1"), sub_block_owner=("d0", "d1", "d0", "d1"))
    ids, mask = _encoder_inputs(model.cfg)
    with torch.inference_mode():
        ref = model(ids, mask)
    async with mqtt_cluster(model, [plan], amqtt_broker, topic_prefix) as cluster:
        res = await cluster.encode(plan, ids, mask, timeout=20)
    assert res.ok, res.failure
    assert (res.output - ref).abs().max().item() <= 1e-4
