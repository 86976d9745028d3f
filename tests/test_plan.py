"""Plans as data: validation, serialisation round trips, required weights."""

import json

import pytest

from detransformer_edge.parallel.plan import (
    DeviceWeights,
    Placement,
    Plan,
    PlanError,
    Stage,
    required_weights,
)

PLANS = [
    Plan("single", ("a",)),
    Plan("pipeline", ("a", "b", "c"), "float16", stages=(Stage("a", 0, 2), Stage("b", 2, 3), Stage("c", 3, 4))),
    Plan("tp", ("a", "b"), "int8"),
    Plan("block", ("a", "b", "c"), sub_block_owner=("a", "a", "a", "a", "b", "b", "c", "c")),
    Plan("block", ("a", "b"), "float16", sub_block_owner=("a", "b", "b", "a"), coupled="gather", coupled_devices=("b",)),
    Plan("block", ("a", "b", "c"), sub_block_owner=("a", "b", "c", "a"), coupled="tp", coupled_devices=("a", "b")),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.describe())
def test_round_trips(plan):
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert hash(plan) == hash(again)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="warp", devices=("a",)), "unknown plan mode"),
        (dict(mode="single", devices=("a", "b")), "exactly one"),
        (dict(mode="single", devices=()), "at least one"),
        (dict(mode="tp", devices=("a", "a")), "duplicate"),
        (dict(mode="tp", devices=("a",), wire="bf16"), "wire dtype"),
        (dict(mode="pipeline", devices=("a", "b"), stages=(Stage("a", 0, 2), Stage("b", 3, 4))), "contiguous"),
        (dict(mode="pipeline", devices=("a", "b"), stages=(Stage("b", 0, 2), Stage("a", 2, 4))), "in order"),
        (dict(mode="block", devices=("a", "b")), "owns each sub-block"),
        (dict(mode="block", devices=("a", "b"), sub_block_owner=("b", "b")), "coordinator"),
        (dict(mode="block", devices=("a",), sub_block_owner=("a", "z")), "not in the plan"),
        (dict(mode="block", devices=("a", "b"), sub_block_owner=("a", "a")), "nothing to do"),
        (dict(mode="block", devices=("a",), sub_block_owner=("a",), coupled="gather"), "exactly one"),
        (dict(mode="tp", devices=("a",), sub_block_owner=("a",)), "only meaningful"),
    ],
)
def test_invalid_plans_raise(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Plan(**kwargs)


def test_model_checks():
    PLANS[3].check(n_layers=12, nd=8, decoupled=True)
    with pytest.raises(PlanError, match="nd=4"):
        PLANS[3].check(n_layers=12, nd=4, decoupled=True)
    with pytest.raises(PlanError, match="decoupled model"):
        PLANS[3].check(n_layers=12, nd=8, decoupled=False)
    with pytest.raises(PlanError, match="cover layers"):
        PLANS[1].check(n_layers=12, nd=1, decoupled=False)
    Plan("tp", ("a", "b", "c")).check(n_layers=4, nd=1, decoupled=False, n_heads=4)  # uneven heads are fine
    with pytest.raises(PlanError, match="at least 3 heads"):
        Plan("tp", ("a", "b", "c")).check(n_layers=4, nd=1, decoupled=False, n_heads=2)


@pytest.mark.parametrize("bad", ['{"mode": "single"}', "[1,2]", '{"mode":"single","devices":"a"}',
                                 '{"mode":"single","devices":["a"],"evil":1}',
                                 '{"mode":"pipeline","devices":["a"],"stages":[{"device":"a","start":"0","end":1}]}'])
def test_bad_serialised_plans(bad):
    with pytest.raises(PlanError):
        Plan.from_dict(json.loads(bad))


def test_required_weights_and_placement():
    kinds = ("decoupled", "coupled", "decoupled", "coupled")
    plan = PLANS[5]
    assert required_weights(plan, kinds, "a") == DeviceWeights(True, (0, 3), (), ((0, 2),))
    assert required_weights(plan, kinds, "c") == DeviceWeights(False, (2,), ())
    gather = PLANS[4]
    assert required_weights(gather, kinds, "b").whole_layers == (1, 3)
    assert required_weights(gather, kinds, "a").whole_layers == ()
    placement = Placement(1, {d: required_weights(plan, kinds, d) for d in plan.devices})
    assert placement.can_run(plan, kinds)
    assert not placement.can_run(PLANS[4], kinds)


def test_full_replicas_hold_a_tp_shard_only_among_several_devices() -> None:
    """A shard of one is the whole model a second time: a leader alone (the heterogeneous bench
    home starts its strongest device first) was OOM-killed holding three models twice."""
    from detransformer_edge.parallel.plan import full_replica_weights

    kinds = ("decoupled", "coupled")
    alone = full_replica_weights(("dev0",), kinds, 2)
    assert alone["dev0"].tp_shards == () and alone["dev0"].whole_layers == (0, 1) and alone["dev0"].embeddings
    three = full_replica_weights(("dev0", "dev1", "dev2"), kinds, 2)
    assert [three[d].tp_shards for d in ("dev0", "dev1", "dev2")] == [((0, 3),), ((1, 3),), ((2, 3),)]
