"""Home Assistant discovery payloads: topics, fields, availability, templates render."""

from __future__ import annotations

import json

import jinja2
import pytest

from detransformer_edge.integrations.homeassistant import (
    BIRTH_TOPIC,
    SENSORS,
    discovery_messages,
    node_id,
    removal_messages,
    should_resend,
)
from detransformer_edge.protocol.messages import DeviceStatus, ProfileRecord
from detransformer_edge.protocol.topics import ClusterTopics

T = ClusterTopics("home")
PROFILE = ProfileRecord("kitchen.pi", "Kitchen Pi", "rpi4", 13.5, 3000.0, 90.0, 12.0)


def render(template: str, status: DeviceStatus) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(value_json=json.loads(status.to_json()))


def test_discovery_topics_and_fields() -> None:
    msgs = discovery_messages(T, PROFILE, "0.1.0")
    assert len(msgs) == len(SENSORS) == 6
    node = node_id("home", "kitchen.pi")
    assert node == "detransformer_home_kitchen_pi"
    for (topic, payload), spec in zip(msgs, SENSORS, strict=True):
        assert topic == f"homeassistant/sensor/{node}/{spec.object_id}/config"
        p = json.loads(payload)
        assert p["state_topic"] == "detransformer/home/devices/kitchen.pi/status"
        assert p["unique_id"] == f"{node}_{spec.object_id}"
        assert p["availability"] == [
            {
                "topic": "detransformer/home/devices/kitchen.pi/presence",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
        assert p["device"] == {
            "identifiers": [node],
            "name": "Kitchen Pi",
            "model": "rpi4",
            "manufacturer": "DeTransformer Edge",
            "sw_version": "0.1.0",
        }
        assert p["origin"] == {"name": "DeTransformer Edge", "sw_version": "0.1.0"}
        assert "availability_topic" not in p  # never together with `availability`
    units = {json.loads(p)["name"]: json.loads(p).get("unit_of_measurement") for _, p in msgs}
    assert units["CPU load"] == "%" and units["Memory"] == "MiB" and units["Last request latency"] == "ms"
    memory = json.loads(next(p for t, p in msgs if t.endswith("/memory/config")))
    assert memory["device_class"] == "data_size"  # HA accepts MiB for data_size


def test_configuration_url_is_the_dashboard_when_the_lan_can_open_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import detransformer_edge.cluster.discovery as discovery
    from detransformer_edge.cluster.config import AgentConfig
    from detransformer_edge.integrations import plugins_for
    from detransformer_edge.integrations.homeassistant import HomeAssistantDiscovery, dashboard_url

    monkeypatch.setattr(discovery, "primary_ipv4", lambda: "192.168.1.20")
    assert dashboard_url("0.0.0.0", 8080) == "http://192.168.1.20:8080/"
    assert dashboard_url("10.0.0.5", 8081) == "http://10.0.0.5:8081/"
    assert dashboard_url("127.0.0.1", 8080) is None and dashboard_url("0.0.0.0", 0) is None
    msgs = discovery_messages(T, PROFILE, "0.1.0", configuration_url="http://192.168.1.20:8080/")
    assert all(json.loads(p)["device"]["configuration_url"] == "http://192.168.1.20:8080/" for _, p in msgs)
    assert "configuration_url" not in json.loads(discovery_messages(T, PROFILE, "0.1.0")[0][1])["device"]
    (ha,) = [p for p in plugins_for(AgentConfig(id="a", dashboard_host="0.0.0.0", dashboard_port=8123))
             if isinstance(p, HomeAssistantDiscovery)]
    assert ha.configuration_url == "http://192.168.1.20:8123/"


@pytest.mark.parametrize(
    "status, expected",
    [
        (
            DeviceStatus("a", True, "leader", 0.4234, 812.26, 3, ((0, 1), (2, 3)), 123.4),
            ["ready", "leader", "0.1 2.3", "42.3", "812.3", "123.4"],
        ),
        (DeviceStatus("a", False, "starting", 0.0, 0.0, 0), ["loading", "starting", "none", "0.0", "0.0", "None"]),
    ],
)
def test_value_templates_render_the_status(status: DeviceStatus, expected: list[str]) -> None:
    assert [render(s.value_template, status) for s in SENSORS] == expected


def test_birth_message_and_removal() -> None:
    assert should_resend(BIRTH_TOPIC, b"online")
    assert not should_resend(BIRTH_TOPIC, b"offline")
    assert not should_resend("homeassistant/other", b"online")
    rm = removal_messages(T, "kitchen.pi")
    assert [t for t, _ in rm] == [t for t, _ in discovery_messages(T, PROFILE, "x")]
    assert all(p == "" for _, p in rm)
