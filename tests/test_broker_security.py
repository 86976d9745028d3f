"""The broker as deploy/ sets it up: deploy/mosquitto.conf with deploy/acl, a password file from
deploy/make-passwords.sh and certificates from deploy/make-certs.sh, on a real Mosquitto.

Anonymous and wrong-password clients are refused; an agent cannot write another device's topics;
a voice client cannot write assignments; TLS works with the home CA and not without it; an agent
configured with TLS and credentials reaches `online`. Mosquitto silently drops a publish the ACL
denies (MQTT 3.1.1 has no negative PUBACK), so each denial is checked by publishing an allowed
marker after it and seeing that a privileged subscriber gets the marker and nothing before it.
"""

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError

from detransformer_edge.cluster.agent import ClusterAgent
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.integrations.homeassistant import HomeAssistantDiscovery
from detransformer_edge.protocol.messages import ProfileRecord

pytestmark = pytest.mark.mosquitto
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
V311 = aiomqtt.ProtocolVersion.V311


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists() or not shutil.which("mosquitto_passwd") or not shutil.which("openssl"):
        pytest.skip("needs mosquitto, mosquitto_passwd and openssl (scripts/setup.sh installs them)")
    d = tmp_path_factory.mktemp("secure-broker")
    certs, secrets = d / "certs", d / "secrets"
    subprocess.run(["sh", str(DEPLOY / "make-certs.sh"), "--dir", str(certs), "--client", "kitchen-pi"],
                   check=True, capture_output=True)
    subprocess.run(["sh", str(DEPLOY / "make-certs.sh"), "--dir", str(certs)], check=True,
                   capture_output=True)  # idempotent: keeps what exists
    subprocess.run(["sh", str(DEPLOY / "make-passwords.sh"), "--out", str(secrets), "--passwords",
                    str(d / "passwords"), "kitchen-pi", "living-room-minipc", "--voice", "voice",
                    "--voice", "admin", "--homeassistant", "--rhasspy"], check=True, capture_output=True)
    # the real ACL, plus a privileged observer for the tests
    (d / "acl").write_text((DEPLOY / "acl").read_text() + "\nuser admin\ntopic readwrite #\n")
    port, tls_port = _free_port(), _free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in (("/mosquitto/config/passwords", str(d / "passwords")),
                     ("/mosquitto/config/acl", str(d / "acl")),
                     ("/mosquitto/certs/", f"{certs}/"),
                     ("persistence true", "persistence false"),
                     ("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"),
                     ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n")):
        assert old in conf, f"deploy/mosquitto.conf changed: {old!r} not found"
        conf = conf.replace(old, new)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        conf += "user root\n"  # as root, mosquitto would drop to a user that cannot read tmp files
    (d / "mosquitto.conf").write_text(conf)
    log = (d / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(d / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        if not (_wait_for_port(port) and _wait_for_port(tls_port)):
            proc.kill()
            raise RuntimeError(f"mosquitto did not start: {(d / 'mosquitto.log').read_text()[-2000:]}")
        passwords = {u: (secrets / f"{u}.password").read_text() for u in
                     ("kitchen-pi", "living-room-minipc", "voice", "admin", "homeassistant", "rhasspy")}
        yield {"port": port, "tls_port": tls_port, "certs": certs, "secrets": secrets, "pw": passwords}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def client(b, user=None, password=None, **kw):
    if user is not None and password is None:
        password = b["pw"][user]
    return aiomqtt.Client("127.0.0.1", b["port"], username=user, password=password, protocol=V311,
                          timeout=5, **kw)


async def only_marker_arrives(b, publisher, forbidden, marker, watch="#"):
    """Publish ``forbidden`` (topic, payload) then ``marker``; the observer must see the marker
    and not the forbidden message."""
    async with client(b, "admin") as admin, client(b, publisher) as pub:
        await admin.subscribe(watch, qos=1)
        await pub.publish(*forbidden, qos=1)
        await pub.publish(*marker, qos=1)
        seen = []
        async with asyncio.timeout(5):
            async for m in admin.messages:
                seen.append((m.topic.value, bytes(m.payload)))
                if seen[-1] == (marker[0], marker[1]):
                    break
        assert (forbidden[0], forbidden[1]) not in seen, seen


async def test_anonymous_and_wrong_password_are_refused(secure_broker):
    with pytest.raises(MqttConnectError):
        async with client(secure_broker):
            pass
    with pytest.raises(MqttConnectError):
        async with client(secure_broker, "kitchen-pi", "not-the-password"):
            pass
    with pytest.raises(MqttConnectError):
        async with client(secure_broker, "mallory", "whatever"):
            pass
    async with client(secure_broker, "kitchen-pi"):
        pass


async def test_agent_cannot_write_another_devices_topics(secure_broker):
    p = "detransformer/home"
    await only_marker_arrives(secure_broker, "kitchen-pi",
                              (f"{p}/devices/living-room-minipc/presence", b"offline"),
                              (f"{p}/devices/kitchen-pi/status", b"marker-1"))
    await only_marker_arrives(secure_broker, "kitchen-pi",
                              (f"{p}/devices/living-room-minipc/profile", b"{}"),
                              (f"{p}/run/r1/ctl", b"marker-2"))
    # but it may write what a (future) leader writes
    await only_marker_arrives(secure_broker, "kitchen-pi", ("hermes/nlu/query", b"agents do not ask"),
                              (f"{p}/assign/living-room-minipc", b"marker-3"))


async def test_voice_client_cannot_write_assignments_or_device_topics(secure_broker):
    p = "detransformer/home"
    await only_marker_arrives(secure_broker, "voice", (f"{p}/assign/kitchen-pi", b'{"forged": 1}'),
                              ("hermes/nlu/query", b"marker-4"))
    await only_marker_arrives(secure_broker, "voice", (f"{p}/leader", b'{"id": "voice"}'),
                              (f"{p}/request", b"marker-5"))
    await only_marker_arrives(secure_broker, "voice", (f"{p}/devices/voice/presence", b"online"),
                              (f"{p}/request", b"marker-6"))


async def only_allowed_reads_arrive(b, reader, filters, forbidden, marker):
    """``reader`` subscribes to ``filters``; the admin publishes ``forbidden`` then ``marker``
    (topic, payload); the reader must get the marker and not the forbidden message."""
    async with client(b, "admin") as admin, client(b, reader) as r:
        for f in filters:
            await r.subscribe(f, qos=1)
        await admin.publish(*forbidden, qos=1)
        await admin.publish(*marker, qos=1)
        seen = []
        async with asyncio.timeout(5):
            async for m in r.messages:
                seen.append((m.topic.value, bytes(m.payload)))
                if seen[-1] == marker:
                    break
        assert forbidden not in seen, seen


async def test_home_assistant_reads_discovery_and_device_state_and_nothing_else(secure_broker):
    b, p = secure_broker, "detransformer/home"
    # what HA needs: the discovery configs, the devices' status and presence; its birth message
    await only_allowed_reads_arrive(b, "homeassistant", ["homeassistant/#", f"{p}/#"],
                                    (f"{p}/log", b'{"text": "what the household said"}'),
                                    ("homeassistant/sensor/detransformer_home_kitchen-pi/memory/config", b"{}"))
    await only_allowed_reads_arrive(b, "homeassistant", [f"{p}/#"], (f"{p}/replies/voice", b"private"),
                                    (f"{p}/devices/kitchen-pi/status", b'{"ready": true}'))
    await only_allowed_reads_arrive(b, "homeassistant", [f"{p}/devices/+/presence"],
                                    (f"{p}/devices/kitchen-pi/profile", b"{}"),
                                    (f"{p}/devices/kitchen-pi/presence", b"online"))
    await only_marker_arrives(b, "homeassistant", (f"{p}/request", b'{"op": "generate"}'),
                              ("homeassistant/status", b"online"))
    await only_marker_arrives(b, "homeassistant", (f"{p}/devices/kitchen-pi/presence", b"offline"),
                              ("homeassistant/status", b"online"))


async def test_rhasspy_speaks_hermes_and_cannot_command_the_devices(secure_broker):
    b, p = secure_broker, "detransformer/home"
    # its own services and the query to the home go through; the home's topics stay closed
    await only_marker_arrives(b, "rhasspy", (f"{p}/assign/kitchen-pi", b'{"forged": 1}'),
                              ("hermes/nlu/query", b'{"input": "what time is it"}'))
    await only_marker_arrives(b, "rhasspy", (f"{p}/leader", b'{"id": "rhasspy"}'),
                              ("rhasspy/asr/default/default/audioCaptured", b"wav"))
    await only_allowed_reads_arrive(b, "rhasspy", ["hermes/#", f"{p}/#"], (f"{p}/log", b"{}"),
                                    ("hermes/nlu/intentParsed", b"{}"))
    # the agent answers Rhasspy's way: intentParsed first
    await only_marker_arrives(b, "kitchen-pi", ("hermes/asr/startListening", b"agents do not listen"),
                              ("hermes/nlu/intentParsed", b"marker-7"))


async def test_voice_client_reads_only_its_own_replies(secure_broker):
    p = "detransformer/home"
    async with client(secure_broker, "voice") as voice, client(secure_broker, "kitchen-pi") as agent:
        await voice.subscribe(f"{p}/replies/#", qos=1)
        await agent.publish(f"{p}/replies/someone-else", b"private", qos=1)
        await agent.publish(f"{p}/replies/voice", b"yours", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(voice.messages))
        assert (message.topic.value, bytes(message.payload)) == (f"{p}/replies/voice", b"yours")


async def test_tls_needs_the_home_ca(secure_broker):
    b = secure_broker
    ctx = ssl.create_default_context(cafile=str(b["certs"] / "ca.crt"))
    async with aiomqtt.Client("localhost", b["tls_port"], username="voice", password=b["pw"]["voice"],
                              protocol=V311, tls_context=ctx, timeout=5) as c:
        await c.publish("hermes/nlu/query", b"{}", qos=1)
    with pytest.raises(aiomqtt.MqttError):  # the system trust store does not know the home CA
        async with aiomqtt.Client("localhost", b["tls_port"], username="voice", password=b["pw"]["voice"],
                                  protocol=V311, tls_context=ssl.create_default_context(), timeout=5):
            pass
    with pytest.raises(MqttConnectError):  # TLS does not replace the password
        async with aiomqtt.Client("127.0.0.1", b["tls_port"], protocol=V311, tls_context=ctx, timeout=5):
            pass


@pytest.mark.parametrize("client_cert", [False, True], ids=["password", "password+client-cert"])
async def test_agent_with_tls_and_credentials_goes_online(secure_broker, tmp_path, client_cert):
    b = secure_broker
    certs = b["certs"]
    tls = f'ca_file = "{certs / "ca.crt"}"\n'
    if client_cert:
        tls += f'cert_file = "{certs / "kitchen-pi.crt"}"\nkey_file = "{certs / "kitchen-pi.key"}"\n'
    cfg = AgentConfig.loads(
        'id = "kitchen-pi"\ncluster = "home"\ndiscovery = false\ndashboard_port = 0\n'
        'status_interval_s = 0.5\ncluster_key = "a long enough cluster key"\n'
        f'[broker]\nurl = "mqtts://localhost:{b["tls_port"]}"\nusername = "kitchen-pi"\n'
        f'password_file = "{b["secrets"] / "kitchen-pi.password"}"\nprotocol = "3.1.1"\n'
        f"[broker.tls]\n{tls}[election]\nlease_s = 2.0\nsettle_s = 0.2\n")
    profile = ProfileRecord("kitchen-pi", "Kitchen Pi", "raspberry-pi-4b", 9.0, 3000.0, 100.0, 1.0)
    async with client(b, "admin") as admin:
        await admin.subscribe("detransformer/home/devices/kitchen-pi/presence", qos=1)
        await admin.subscribe("homeassistant/sensor/detransformer_home_kitchen-pi/#", qos=1)
        agent = ClusterAgent(cfg, profile)
        await HomeAssistantDiscovery().start(SimpleNamespace(session=agent.session, cluster=agent))
        async with agent:
            await agent.wait_connected(10)
            seen = set()
            async with asyncio.timeout(10):
                async for m in admin.messages:
                    if m.topic.value.endswith("/presence") and m.payload == b"online":
                        seen.add("online")
                    elif m.topic.value.startswith("homeassistant/"):
                        seen.add("discovery")
                    if seen == {"online", "discovery"}:
                        break
            async with asyncio.timeout(10):
                while not agent.is_leader:
                    await asyncio.sleep(0.1)  # it could publish the lease: the ACL allows it
    assert "a long enough cluster key" not in repr(cfg)


@pytest.mark.slow
async def test_two_home_agents_serve_over_tls_with_acl_and_cluster_key(secure_broker, tmp_path):
    """The whole deploy: two devices over TLS with their own passwords and a shared cluster key
    place the model, run a two-device pipeline through the ACL, and answer the voice user."""
    import json

    from detransformer_edge.integrations import plugins_for
    from detransformer_edge.planner.profile import load_profile
    from detransformer_edge.service.agent import HomeAgent
    from detransformer_edge.service.catalog import tiny_catalog

    b = secure_broker
    key_file = tmp_path / "cluster.key"
    key_file.write_text("a shared secret for the whole home\n")
    root = DEPLOY.parent
    async with contextlib.AsyncExitStack() as stack:
        agents = []
        for dev, prof in (("kitchen-pi", "intel-n100-minipc"), ("living-room-minipc", "raspberry-pi-5")):
            cfg = AgentConfig.loads(
                f'id = "{dev}"\ncluster = "home"\ndiscovery = false\ndashboard_port = 0\nhomeassistant = false\n'
                f'status_interval_s = 0.5\ncluster_key_file = "{key_file}"\n'
                f'[broker]\nurl = "mqtts://localhost:{b["tls_port"]}"\nusername = "{dev}"\n'
                f'password_file = "{b["secrets"] / (dev + ".password")}"\nprotocol = "3.1.1"\n'
                f'keepalive_s = 2\n[broker.tls]\nca_file = "{b["certs"] / "ca.crt"}"\n'
                "[election]\nlease_s = 3.0\nsettle_s = 0.3\n")
            agent = HomeAgent(cfg, load_profile(root / "firmware_profiles" / f"{prof}.toml"), tiny_catalog(),
                              plugins=plugins_for(cfg), broker=("localhost", b["tls_port"]), replan_delay_s=0.2, replicate_all=True)
            agents.append(await stack.enter_async_context(agent))
        async with asyncio.timeout(30):
            while not any(a.cluster.is_leader and a.placements.state.placement_ready() for a in agents):
                await asyncio.sleep(0.1)
        reply_to = "detransformer/home/replies/voice"
        async with client(b, "voice") as voice:
            await voice.subscribe(reply_to, qos=1)
            await voice.publish("detransformer/home/request", json.dumps(
                {"id": "tls1", "reply_to": reply_to, "op": "embed", "input": "hello",
                 "params": {"model": "tiny-encoder", "plan": "pipeline"}}), qos=1)
            async with asyncio.timeout(30):
                reply = json.loads((await anext(aiter(voice.messages))).payload)
        assert reply["id"] == "tls1" and "result" in reply, reply
        assert reply["result"]["plan"].startswith("pipeline") and "living-room-minipc" in reply["result"]["plan"]


def test_the_acl_is_generated_from_the_device_list(tmp_path):
    """deploy/acl is make-acl.sh's output for the example home (so it cannot drift by hand), and
    the Home Assistant node it grants is the one the agent publishes under."""
    from detransformer_edge.integrations.homeassistant import node_id

    def make(*args: str) -> str:
        done = subprocess.run(["sh", str(DEPLOY / "make-acl.sh"), *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    example = make("kitchen-pi", "living-room-minipc", "--voice", "voice", "--rhasspy", "--homeassistant")
    assert example == (DEPLOY / "acl").read_text()
    flat = make("--cluster", "flat", "pi.kitchen", "pi-2")
    assert "user pi.kitchen\ntopic write detransformer/flat/devices/pi.kitchen/#\n" in flat
    assert f"topic write homeassistant/sensor/{node_id('flat', 'pi.kitchen')}/#" in flat
    assert "user rhasspy" not in flat and "user homeassistant" not in flat
    bad = subprocess.run(["sh", str(DEPLOY / "make-acl.sh"), "a/b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a valid id" in bad.stderr
