"""Plug-ins the agent runs beside its own work: Rhasspy Hermes, Wyoming (Home Assistant
Assist), Home Assistant discovery, the dashboard. The agent never imports them; ``plugins_for`` builds the ones a config asks for and
the command that starts the agent hands them over (``service/plugins.py``)."""

from __future__ import annotations

from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.service.plugins import Plugin


def plugins_for(config: AgentConfig) -> list[Plugin]:
    """The plug-ins of one agent, from its config."""
    from detransformer_edge.integrations.dashboard import DashboardPlugin
    from detransformer_edge.integrations.hermes import HermesNlu
    from detransformer_edge.integrations.homeassistant import HomeAssistantDiscovery, dashboard_url

    plugins: list[Plugin] = [HermesNlu()]
    if config.homeassistant:
        plugins.append(HomeAssistantDiscovery(config.homeassistant_prefix,
                                              dashboard_url(config.dashboard_host, config.dashboard_port)))
    if config.dashboard_port:
        plugins.append(DashboardPlugin(config.dashboard_host, config.dashboard_port))
    if config.wyoming_port is not None:
        from detransformer_edge.integrations.wyoming import WyomingServer

        # announced only where Home Assistant could connect: not when bound to this device's loopback
        lan = not (config.wyoming_host.startswith("127.") or config.wyoming_host in ("localhost", "::1"))
        plugins.append(WyomingServer(config.wyoming_host, config.wyoming_port, announce=config.discovery and lan))
    return plugins
