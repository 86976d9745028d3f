"""Leader commands carry an HMAC (protocol/signing.py): forged, unsigned and replayed assignments
and run plans are ignored; correctly signed ones are applied."""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest

from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.integrations import plugins_for
from detransformer_edge.planner.profile import load_profile
from detransformer_edge.protocol.signing import (
    CommandSigner,
    CommandVerifier,
    SignatureError,
    Stamp,
    canonical,
)
from detransformer_edge.service.agent import HomeAgent
from detransformer_edge.service.catalog import tiny_catalog
from tests.test_service import PROFILES, agent_config, ask, wait_for_placement

KEY = "correct horse battery staple 42"
ROOT = Path(__file__).resolve().parents[1]


def signed(topic="P/assign/dev1", term=3, body=None, signer=None):
    signer = signer or CommandSigner(KEY, "dev0")
    return signer.sign(topic, term, json.dumps(body or {"leader": "dev0", "term": term, "x": [1, 2.5]}))


# ------------------------------------------------------------------------------- pure


def test_round_trip_and_stamp():
    v = CommandVerifier(KEY)
    stamp = v.verify("P/assign/dev1", signed(), "assign")
    assert stamp.leader == "dev0" and stamp.term == 3 and stamp.seq > 0


def test_forged_edited_moved_and_wrong_key_are_refused():
    v = CommandVerifier(KEY)
    msg = json.loads(signed())
    msg["x"] = [1, 2.6]
    with pytest.raises(SignatureError, match="bad signature"):
        v.verify("P/assign/dev1", json.dumps(msg), "assign")
    with pytest.raises(SignatureError, match="bad signature"):  # moved to another device
        v.verify("P/assign/dev2", signed(), "assign")
    with pytest.raises(SignatureError, match="bad signature"):
        v.verify("P/assign/dev1", signed(signer=CommandSigner("another key entirely!", "dev0")), "assign")
    restamped = json.loads(signed())
    restamped["sig"]["term"] = 4  # claim a newer term with the old MAC
    with pytest.raises(SignatureError, match="bad signature"):
        v.verify("P/assign/dev1", json.dumps(restamped), "assign")
    with pytest.raises(SignatureError, match="unsigned"):
        v.verify("P/assign/dev1", json.dumps({"leader": "dev0", "term": 3}), "assign")
    for bad_sig in ([], {"leader": "dev0", "term": "3", "seq": 1, "mac": "00"},
                    {"leader": "dev0", "term": 3, "seq": 2**70, "mac": "00"},
                    {"leader": "dev0", "term": 3, "seq": 5, "mac": 7},
                    {"leader": "dev0", "term": 3, "seq": 5, "mac": "é"}):
        with pytest.raises(SignatureError):
            v.verify("t", json.dumps({"sig": bad_sig}), "assign")


def test_replays_and_older_terms_are_refused():
    signer, v = CommandSigner(KEY, "dev0"), CommandVerifier(KEY)
    first, second = signed(signer=signer), signed(signer=signer)
    v.verify("P/assign/dev1", first, "assign")
    with pytest.raises(SignatureError, match="replayed"):
        v.verify("P/assign/dev1", first, "assign")
    v.verify("P/assign/dev1", second, "assign")
    with pytest.raises(SignatureError, match="replayed"):
        v.verify("P/assign/dev1", first, "assign")  # older sequence in the same term
    # channels are independent: the same sequence numbers on the run channel are fine once
    v.verify("P/assign/dev1", signed(signer=signer, term=5), "assign")
    with pytest.raises(SignatureError, match="older"):
        v.verify("P/assign/dev1", signed(signer=signer, term=4), "assign")


def test_sequence_is_strictly_increasing_even_with_a_stuck_clock():
    signer = CommandSigner(KEY, "dev0", clock_us=lambda: 1000)
    assert [signer.next_seq() for _ in range(3)] == [1000, 1001, 1002]


def test_canonical_encoding_is_unambiguous():
    a = canonical("a/b", Stamp("dev0", 1, 12), {"k": 1})
    b = canonical("a/bdev0", Stamp("", 1, 12), {"k": 1})
    assert a != b


def test_key_never_in_reprs(tmp_path):
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    cfg = AgentConfig.loads('id = "dev0"\ndiscovery = false\ncluster_key_file = "cluster.key"\n'
                            '[broker]\nurl = "mqtt://h"\npassword = "hunter2-secret"\n', base_dir=tmp_path)
    assert cfg.cluster_key == KEY
    text = repr(cfg) + repr(CommandSigner(KEY, "dev0")) + repr(CommandVerifier(KEY))
    assert KEY not in text and "hunter2-secret" not in text
    with pytest.raises(Exception, match="empty"):
        AgentConfig.loads('id = "dev0"\ndiscovery = false\ncluster_key = " "\n[broker]\nurl = "mqtt://h"\n')


# ------------------------------------------------------------------------------- on a broker


@contextlib.asynccontextmanager
async def signed_home(broker, cluster):
    host, port = broker
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for i in range(3):
            prof = load_profile(ROOT / "firmware_profiles" / f"{PROFILES[i]}.toml")
            cfg = replace(agent_config(f"dev{i}", cluster, host, port), cluster_key=KEY)
            agent = HomeAgent(cfg, prof, tiny_catalog(), plugins=plugins_for(cfg), broker=broker, intent_threshold=0.0,
                              replan_delay_s=0.2, replicate_all=True)
            agents.append(await stack.enter_async_context(agent))
        yield agents


async def settle(cond, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


@pytest.mark.mosquitto
async def test_forged_and_replayed_commands_are_ignored_signed_ones_applied(mosquitto_broker, caplog):
    caplog.set_level(logging.DEBUG, logger="detransformer_edge")
    host, port = mosquitto_broker
    cluster = f"s{uuid.uuid4().hex[:8]}"
    prefix = f"detransformer/{cluster}"
    captured: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as spy:
        await spy.subscribe([(f"{prefix}/assign/#", 1), (f"{prefix}/run/+/ctl", 1)])

        async def pump():
            async for m in spy.messages:
                captured.append((m.topic.value, bytes(m.payload)))

        pump_task = asyncio.create_task(pump())
        try:
            async with signed_home(mosquitto_broker, cluster) as agents:
                leader = await wait_for_placement(agents)
                term = leader.cluster.lease.term
                dev1 = agents[1]
                assign_topic = f"{prefix}/assign/dev1"
                await settle(lambda: any(t == assign_topic for t, _ in captured))
                _, real = [(t, p) for t, p in captured if t == assign_topic][-1]
                assert "sig" in json.loads(real)

                applied = []
                original = dev1.cluster.on_assignment

                async def record(msg):
                    applied.append(msg)
                    await original(msg)

                dev1.cluster.on_assignment = record
                forged = json.loads(real)
                forged["placement_version"] += 1
                unsigned = {k: v for k, v in json.loads(real).items() if k != "sig"}
                wrong_key = CommandSigner("not the cluster key!!", leader.id).sign(assign_topic, term, json.dumps(unsigned))
                for payload in (real, json.dumps(forged), json.dumps(unsigned), wrong_key):
                    await spy.publish(assign_topic, payload, qos=1)
                await asyncio.sleep(1.0)
                assert applied == []
                warnings = " ".join(r.getMessage() for r in caplog.records)
                assert "replayed" in warnings and "bad signature" in warnings and "unsigned" in warnings

                good = CommandSigner(KEY, leader.id).sign(assign_topic, term, json.dumps(unsigned))
                await spy.publish(assign_topic, good, qos=1)
                await settle(lambda: len(applied) == 1)
                assert applied[0].placement_version == unsigned["placement_version"]

                # run plans: a real multi-device request is signed and served
                started = []
                real_start = dev1.host.start_worker

                def record_start(ctl):
                    started.append(ctl.req)
                    real_start(ctl)

                dev1.host.start_worker = record_start
                reply_to = f"{prefix}/replies/sig"
                (_, r), = await ask(mosquitto_broker, f"{prefix}/request",
                                    {"id": "e1", "reply_to": reply_to, "op": "embed", "input": "hello",
                                     "params": {"model": "tiny-encoder", "plan": "pipeline"}}, [reply_to])
                assert "result" in r, r
                assert len(started) == 1
                ctl_topic, ctl = [(t, p) for t, p in captured if t.endswith("/ctl")][-1]
                assert "sig" in json.loads(ctl)

                forged_ctl = json.loads(ctl)
                forged_ctl["timeout_s"] = 99.0
                unsigned_ctl = {k: v for k, v in json.loads(ctl).items() if k != "sig"}
                for payload in (ctl, json.dumps(forged_ctl), json.dumps(unsigned_ctl)):
                    await spy.publish(ctl_topic, payload, qos=1)
                await asyncio.sleep(1.0)
                assert len(started) == 1

                fresh_topic = f"{prefix}/run/sigok/ctl"
                fresh = dict(unsigned_ctl, req="sigok", timeout_s=1.0)
                await spy.publish(fresh_topic, CommandSigner(KEY, leader.id).sign(fresh_topic, term, json.dumps(fresh)), qos=1)
                await settle(lambda: started == [unsigned_ctl["req"], "sigok"])
                await spy.publish(f"{prefix}/run/sigok/end", b"", qos=1)

                (_, r), = await ask(mosquitto_broker, f"{prefix}/request",
                                    {"id": "e2", "reply_to": reply_to, "op": "embed", "input": "still fine",
                                     "params": {"model": "tiny-encoder", "plan": "pipeline"}}, [reply_to])
                assert "result" in r, r
                assert KEY not in caplog.text  # the key never reaches a log line
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump_task


@pytest.mark.mosquitto
async def test_forged_and_replayed_leases_and_run_ends_are_ignored(mosquitto_broker, caplog):
    caplog.set_level(logging.DEBUG, logger="detransformer_edge")
    host, port = mosquitto_broker
    cluster = f"s{uuid.uuid4().hex[:8]}"
    prefix = f"detransformer/{cluster}"
    leases: list[bytes] = []
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as spy:
        await spy.subscribe(f"{prefix}/leader", qos=1)

        async def pump():
            async for m in spy.messages:
                leases.append(bytes(m.payload))

        pump_task = asyncio.create_task(pump())
        try:
            async with signed_home(mosquitto_broker, cluster) as agents:
                leader = await wait_for_placement(agents)
                lease = leader.cluster.lease
                await settle(lambda: len(leases) >= 2)  # a claim and a renewal, both signed
                assert all("sig" in json.loads(p) for p in leases)
                first = leases[0]

                # a usurper's record: a higher term, unsigned / signed with another key / replayed
                usurper = {"id": "dev2", "term": lease.term + 1, "expires_at": time.time() + 60,
                           "lease_s": 60.0, "session": "x"}
                topic = f"{prefix}/leader"
                bad_key = CommandSigner("not the cluster key!!", "dev2").sign(topic, lease.term + 1, json.dumps(usurper))
                by_other = CommandSigner(KEY, "dev1").sign(topic, lease.term + 1, json.dumps(usurper))  # signer != holder
                for payload in (json.dumps(usurper), bad_key, by_other, first):
                    await spy.publish(topic, payload, qos=1)
                await asyncio.sleep(1.5)
                assert all(a.cluster.lease is not None and a.cluster.lease.id == leader.id
                           and a.cluster.lease.term == lease.term for a in agents)
                assert leader.cluster.is_leader
                warnings = " ".join(r.getMessage() for r in caplog.records)
                assert "unsigned" in warnings and "bad signature" in warnings and "replayed" in warnings

                # run ends: only the leader's signed end frees a run on a device
                dev1 = next(a for a in agents if a is not leader)
                ended: list[str] = []
                real_end = dev1.host.end
                dev1.host.end = lambda req: (ended.append(req), real_end(req))
                end_topic = f"{prefix}/run/r9/end"
                body = json.dumps({"req": "r9", "term": lease.term})
                for payload in (body, CommandSigner("not the cluster key!!", leader.id).sign(end_topic, lease.term, body)):
                    await spy.publish(end_topic, payload, qos=1)
                await asyncio.sleep(1.0)
                assert ended == []
                await spy.publish(end_topic, CommandSigner(KEY, leader.id).sign(end_topic, lease.term, body), qos=1)
                await settle(lambda: ended == ["r9"])
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump_task
