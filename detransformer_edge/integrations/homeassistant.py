"""Home Assistant MQTT discovery for a DeTransformer agent.

Each agent announces one HA *device* with six sensors. All sensors read the agent's retained
JSON status topic through a `value_template`, and all are bound to the agent's presence topic
for availability, so HA greys them out when the agent's LWT fires. Config payloads go retained
to `homeassistant/sensor/<node_id>/<object_id>/config`; they are sent again whenever HA
publishes `online` on its birth topic `homeassistant/status` (HA restarted).

Field names checked against the HA docs (integrations/sensor.mqtt, MQTT discovery): name,
unique_id, state_topic, value_template, unit_of_measurement, device_class,
state_class, entity_category, icon, availability[{topic, payload_available,
payload_not_available}], device{identifiers, name, model, manufacturer, sw_version,
configuration_url}, origin{name, sw_version} (which program sent the config; HA logs it). A value
template that renders `None` (null in JSON) leaves the sensor `unknown`. `configuration_url` is the
agent's dashboard when it listens on the LAN (HA shows it as "Visit").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from detransformer_edge.protocol.messages import PRESENCE_OFFLINE, PRESENCE_ONLINE, ProfileRecord
from detransformer_edge.protocol.topics import ClusterTopics

DISCOVERY_PREFIX = "homeassistant"
BIRTH_TOPIC = f"{DISCOVERY_PREFIX}/status"
BIRTH_ONLINE = "online"
MANUFACTURER = "DeTransformer Edge"


@dataclass(frozen=True)
class SensorSpec:
    object_id: str
    name: str
    value_template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    icon: str | None = None
    entity_category: str | None = None


SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("status", "Status", "{{ 'ready' if value_json.ready else 'loading' }}",
               icon="mdi:check-network-outline"),
    SensorSpec("role", "Role", "{{ value_json.role }}", icon="mdi:crown-outline"),
    SensorSpec(
        "sub_blocks",
        "Assigned sub-blocks",
        # [[0, 1], [1, 1]] -> "0.1 1.1"; "none" before the first placement
        "{{ value_json.sub_blocks | map('join', '.') | join(' ') or 'none' }}",
        icon="mdi:view-grid-outline",
    ),
    SensorSpec("cpu_load", "CPU load", "{{ (value_json.load * 100) | round(1) }}", unit="%",
               state_class="measurement", icon="mdi:cpu-64-bit", entity_category="diagnostic"),
    # rss_mb is in units of 2**20 bytes (cluster/agent.py reads pages * page size / 2**20)
    SensorSpec("memory", "Memory", "{{ value_json.rss_mb | round(1) }}", unit="MiB",
               device_class="data_size", state_class="measurement", entity_category="diagnostic"),
    SensorSpec("latency", "Last request latency", "{{ value_json.last_latency_ms }}", unit="ms",
               device_class="duration", state_class="measurement", icon="mdi:timer-outline"),
)

_SAFE = re.compile(r"[^a-zA-Z0-9_-]")


def node_id(cluster: str, device_id: str) -> str:
    """HA node id: only [a-zA-Z0-9_-] are allowed in discovery topic levels."""
    return _SAFE.sub("_", f"detransformer_{cluster}_{device_id}")


def device_block(profile: ProfileRecord, cluster: str, sw_version: str,
                 configuration_url: str | None = None) -> dict[str, Any]:
    block = {
        "identifiers": [node_id(cluster, profile.id)],
        "name": profile.name,
        "model": profile.device_class,
        "manufacturer": MANUFACTURER,
        "sw_version": sw_version,
    }
    if configuration_url:
        block["configuration_url"] = configuration_url
    return block


def dashboard_url(host: str, port: int) -> str | None:
    """The dashboard as another machine (Home Assistant) reaches it; None when there is none or it
    listens on this device's loopback only."""
    if not port or host.startswith("127.") or host in ("localhost", "::1"):
        return None
    if host in ("0.0.0.0", "", "::"):
        from detransformer_edge.cluster.discovery import primary_ipv4

        host = primary_ipv4()
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def discovery_messages(
    topics: ClusterTopics, profile: ProfileRecord, sw_version: str, prefix: str = DISCOVERY_PREFIX,
    configuration_url: str | None = None,
) -> list[tuple[str, str]]:
    """(topic, JSON payload) for every sensor of this agent; publish retained, QoS 1."""
    node = node_id(topics.cluster, profile.id)
    device = device_block(profile, topics.cluster, sw_version, configuration_url)
    origin = {"name": MANUFACTURER, "sw_version": sw_version}
    availability = [
        {
            "topic": topics.presence.format(profile.id),
            "payload_available": PRESENCE_ONLINE,
            "payload_not_available": PRESENCE_OFFLINE,
        }
    ]
    out: list[tuple[str, str]] = []
    for spec in SENSORS:
        payload: dict[str, Any] = {
            "name": spec.name,
            "unique_id": f"{node}_{spec.object_id}",
            "state_topic": topics.status.format(profile.id),
            "value_template": spec.value_template,
            "availability": availability,
            "device": device,
            "origin": origin,
        }
        for key, value in (
            ("unit_of_measurement", spec.unit),
            ("device_class", spec.device_class),
            ("state_class", spec.state_class),
            ("icon", spec.icon),
            ("entity_category", spec.entity_category),
        ):
            if value is not None:
                payload[key] = value
        topic = f"{prefix}/sensor/{node}/{spec.object_id}/config"
        out.append((topic, json.dumps(payload, separators=(",", ":"), sort_keys=True)))
    return out


def removal_messages(
    topics: ClusterTopics, device_id: str, prefix: str = DISCOVERY_PREFIX
) -> list[tuple[str, str]]:
    """Empty retained configs that remove this agent's sensors from HA (decommissioning)."""
    node = node_id(topics.cluster, device_id)
    return [(f"{prefix}/sensor/{node}/{s.object_id}/config", "") for s in SENSORS]


def should_resend(topic: str, payload: bytes | str, prefix: str = DISCOVERY_PREFIX) -> bool:
    """True when HA announced (re)start on its birth topic: send discovery again."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    return topic == f"{prefix}/status" and text.strip() == BIRTH_ONLINE


class HomeAssistantDiscovery:
    """The plug-in: publish this agent's discovery configs (retained) after every connect, and
    again whenever Home Assistant announces its (re)start on its birth topic."""

    name = "homeassistant"

    def __init__(self, prefix: str = DISCOVERY_PREFIX, configuration_url: str | None = None) -> None:
        self.prefix = prefix
        self.configuration_url = configuration_url
        self.home: Any = None

    async def start(self, home: Any) -> None:
        self.home = home
        home.session.subscribe(f"{self.prefix}/status", self._on_birth, 1)
        home.session.on_connect(self.announce)

    async def stop(self) -> None:
        self.home = None

    async def announce(self) -> None:
        home = self.home
        if home is None:
            return
        cluster = home.cluster
        for topic, payload in discovery_messages(cluster.topics, cluster.profile, cluster.sw_version, self.prefix,
                                                 self.configuration_url):
            await home.session.publish(topic, payload, qos=1, retain=True)

    async def _on_birth(self, topic: str, payload: bytes, _props: object) -> None:
        if should_resend(topic, payload, self.prefix):
            await self.announce()

