"""Start an agent from its config file: find the broker, load or measure the profile, pick the
catalog, announce over mDNS, run until SIGINT/SIGTERM, and leave cleanly (presence ``offline``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from detransformer_edge import __version__
from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.errors import ConfigError
from detransformer_edge.planner.profile import DeviceProfile, load_profile
from detransformer_edge.service.plugins import Plugin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    config_path: str | Path
    catalog: str = "pretrained"  # pretrained | tiny | shapes (see service.catalog.CATALOGS)
    models: tuple[str, ...] = ()  # a subset of the catalog's models; empty: all of them
    replicate_all: bool = False
    threads: int | None = None
    intent_threshold: float = 0.0


def device_profile(config: AgentConfig, broker: tuple[str, int] | None) -> DeviceProfile:
    """The configured profile, else a quick measurement of this device (and say so)."""
    if config.profile is not None:
        return load_profile(config.profile)
    from detransformer_edge.model.config import get_config
    from detransformer_edge.planner.measure import measure_device

    log.warning("no profile configured for %s: measuring this device (about 10 s)", config.id)
    return measure_device(config.id, get_config("minilm-l6"), broker=broker, budget_s=8.0, quiet=True).profile


PluginFactory = Callable[[AgentConfig], Sequence[Plugin]]

# Set by a program that starts agents as its children (the demo, the fleet): the agent leaves
# cleanly when that program is gone, even when it was killed without a chance to stop them.
PARENT_PID_ENV = "DETRANSFORMER_PARENT_PID"


def parent_watch_env() -> dict[str, str]:
    """The environment entry that ties a child agent's life to this process."""
    return {PARENT_PID_ENV: str(os.getpid())}


async def leave_with_parent(stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Set ``stop`` once the process named by ``DETRANSFORMER_PARENT_PID`` is no longer our parent
    (it exited: we were re-parented). Without the variable, wait for nothing."""
    raw = os.environ.get(PARENT_PID_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("the program that started this agent (pid %d) is gone: stopping", parent)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()


async def find_broker(config: AgentConfig, stop: asyncio.Event, attempt_s: float = 15.0) -> tuple[str, int] | None:
    """The broker's address: ``broker.url``, or mDNS, asked again with backoff (a log line per
    attempt) until a broker answers or ``stop`` is set (then None). An agent started before its
    broker waits for it; it never gives up on its own."""
    from detransformer_edge.cluster import discovery
    from detransformer_edge.transport.session import backoff_delay

    attempt = 0
    while not stop.is_set():
        try:
            return await discovery.resolve_broker(config, timeout=attempt_s)
        except discovery.BrokerNotFoundError as exc:
            delay = backoff_delay(attempt, config.broker.reconnect_min_s, config.broker.reconnect_max_s)
            attempt += 1
            log.warning("agent %s: no broker found (%s); looking again in %.1f s (attempt %d)", config.id, exc,
                        delay, attempt)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
    return None


async def run_agent(opts: AgentOptions, stop: asyncio.Event | None = None,
                    plugins_for: PluginFactory = lambda config: ()) -> int:
    config = AgentConfig.load(opts.config_path)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a clean leave: presence offline, plug-ins stopped
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(leave_with_parent(stop))
    try:
        return await _run(opts, config, stop, plugins_for)
    finally:
        orphan_watch.cancel()


async def _run(opts: AgentOptions, config: AgentConfig, stop: asyncio.Event, plugins_for: PluginFactory) -> int:
    import torch

    from detransformer_edge.cluster import discovery
    from detransformer_edge.service.agent import HomeAgent
    from detransformer_edge.service.catalog import CATALOGS

    broker = await find_broker(config, stop)
    if broker is None:
        return 0
    profile = await asyncio.to_thread(device_profile, config, broker)
    torch.set_num_threads(max(1, opts.threads or int(os.environ.get("DETRANSFORMER_THREADS", 0)) or profile.cores))
    if opts.catalog not in CATALOGS:
        raise ConfigError(f"unknown catalog {opts.catalog!r}; known: {', '.join(CATALOGS)}")
    catalog = CATALOGS[opts.catalog]()
    if opts.models:
        catalog = catalog.subset(opts.models)
    has_models = await asyncio.to_thread(catalog.installed_locally)
    async with HomeAgent(config, profile, catalog, broker=broker, intent_threshold=opts.intent_threshold,
                         replicate_all=opts.replicate_all, plugins=plugins_for(config), has_models=has_models) as agent:
        async with contextlib.AsyncExitStack() as stack:
            if config.discovery:
                try:  # mDNS is a convenience for finding each other; MQTT is the contract
                    await stack.enter_async_context(discovery.ClusterDiscovery(
                        config.id, config.cluster, __version__, config.dashboard_port or 0))
                except Exception as exc:
                    log.warning("mDNS announcement unavailable (%s); continuing over MQTT only", exc)
            log.warning("agent %s running (broker %s:%d, profile %s); Ctrl-C to stop", config.id, *broker, profile.name)
            await stop.wait()
            log.warning("agent %s stopping", agent.id)
    return 0
