"""mDNS / DNS-SD discovery with python-zeroconf.

* Each agent registers `_detransformer._tcp.local.` with a short TXT record (id, version,
  cluster); `ClusterDiscovery` also browses for peers of the same cluster. The MQTT broker stays
  the source of truth for membership: mDNS is a hint for dashboards and first setup.
* `ServiceAnnouncement` registers one more service of this device (the Wyoming plug-in's
  `_wyoming._tcp.local.`, which Home Assistant browses for).
* When no broker URL is configured, `find_broker` browses `_mqtt._tcp.local.` (what Mosquitto
  with Avahi and Home Assistant's add-on announce) and returns the first broker that resolves.

Lifetimes are `async with`: the service is unregistered and the Zeroconf sockets closed on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from detransformer_edge.cluster.config import AgentConfig
from detransformer_edge.errors import DetransformerError
from detransformer_edge.protocol.codec import ProtocolError, check_name

log = logging.getLogger(__name__)

SERVICE_TYPE = "_detransformer._tcp.local."
MQTT_SERVICE_TYPE = "_mqtt._tcp.local."
RESOLVE_TIMEOUT_MS = 3000

Interfaces = Sequence[str] | None  # None: all interfaces (zeroconf's default)


class DiscoveryError(DetransformerError):
    """mDNS announcement or lookup failed."""


class BrokerNotFoundError(DiscoveryError):
    """No MQTT broker announced itself over mDNS; set broker.url in the agent config."""


@dataclass(frozen=True)
class PeerAnnouncement:
    """One agent as seen over mDNS."""

    id: str
    cluster: str
    version: str
    addresses: tuple[str, ...]
    port: int

    def txt(self) -> dict[str, str]:
        return {"id": self.id, "cluster": self.cluster, "version": self.version}

    @classmethod
    def from_info(cls, info: AsyncServiceInfo) -> PeerAnnouncement:
        props = {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): (
                v.decode("utf-8", "replace") if isinstance(v, bytes) else ""
            )
            for k, v in (info.properties or {}).items()
        }
        try:
            dev = check_name(props.get("id", ""), "mDNS TXT id")
            cluster = check_name(props.get("cluster", ""), "mDNS TXT cluster")
        except ProtocolError as exc:
            raise DiscoveryError(f"service {info.name}: {exc}") from None
        return cls(dev, cluster, props.get("version", ""), tuple(info.parsed_addresses()), info.port or 0)


def _make_zeroconf(interfaces: Interfaces) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf()
    return AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)


class ClusterDiscovery:
    """Announce this agent and track peers of its cluster: `async with ClusterDiscovery(...)`."""

    def __init__(
        self,
        device_id: str,
        cluster: str,
        version: str,
        port: int,
        *,
        addresses: Sequence[str] = (),
        interfaces: Interfaces = None,
        on_change: Callable[[dict[str, PeerAnnouncement]], Any] | None = None,
    ) -> None:
        self.me = PeerAnnouncement(
            check_name(device_id, "device id"), check_name(cluster, "cluster"), version,
            tuple(addresses), port,
        )
        self._interfaces = interfaces
        self._on_change = on_change
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._announcing: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.peers: dict[str, PeerAnnouncement] = {}  # service name -> peer (other agents)

    @property
    def service_name(self) -> str:
        return f"{self.me.cluster}-{self.me.id}.{SERVICE_TYPE}"

    async def __aenter__(self) -> ClusterDiscovery:
        self._azc = _make_zeroconf(self._interfaces)
        addresses = self.me.addresses or tuple(self._interfaces or ()) or (primary_ipv4(),)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            addresses=[socket.inet_aton(a) for a in addresses],
            port=self.me.port,
            properties=self.me.txt(),
            server=f"detransformer-{self.me.cluster}-{self.me.id}.local.",
        )
        try:
            # returns the task that announces the service; keep it and await it on exit
            self._announcing = await self._azc.async_register_service(self._info)
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service_state_change]
            )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            if self._info is not None:
                with contextlib.suppress(Exception):
                    if self._announcing is not None:
                        await self._announcing
                    # the coroutine returns the task that sends the goodbye: wait for it too
                    await (await self._azc.async_unregister_service(self._info))
            await self._azc.async_close()
            self._azc = None

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == self.service_name:
            return
        if state_change is ServiceStateChange.Removed:
            if self.peers.pop(name, None) is not None:
                self._notify()
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._azc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        try:
            peer = PeerAnnouncement.from_info(info)
        except DiscoveryError as exc:
            log.warning("mDNS: ignoring %s", exc)
            return
        if peer.cluster == self.me.cluster and self.peers.get(name) != peer:
            self.peers[name] = peer
            self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(dict(self.peers))
            except Exception:
                log.exception("mDNS on_change hook failed")


class ServiceAnnouncement:
    """One DNS-SD service of this device, registered on enter and unregistered (with the goodbye
    packets sent) on exit: ``async with ServiceAnnouncement("_wyoming._tcp.local.", name, port)``."""

    def __init__(self, service_type: str, name: str, port: int, properties: dict[str, str] | None = None, *,
                 addresses: Sequence[str] = (), interfaces: Interfaces = None) -> None:
        if not service_type.endswith("._tcp.local.") and not service_type.endswith("._udp.local."):
            raise DiscoveryError(f"{service_type!r} is not a DNS-SD service type like _name._tcp.local.")
        self.service_type = service_type
        self.name = f"{name}.{service_type}"
        self.port = port
        self.properties = dict(properties or {})
        self._addresses = tuple(addresses)
        self._interfaces = interfaces
        self._azc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def __aenter__(self) -> ServiceAnnouncement:
        self._azc = _make_zeroconf(self._interfaces)
        addresses = self._addresses or tuple(self._interfaces or ()) or (primary_ipv4(),)
        host = self.name.split(".", 1)[0]
        self._info = AsyncServiceInfo(self.service_type, self.name, addresses=[socket.inet_aton(a) for a in addresses],
                                      port=self.port, properties=self.properties, server=f"{host}.local.")
        try:
            await (await self._azc.async_register_service(self._info))
        except BaseException:
            self._info = None
            await self._azc.async_close()
            self._azc = None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._azc is None:
            return
        if self._info is not None:
            with contextlib.suppress(Exception):
                await (await self._azc.async_unregister_service(self._info))
        await self._azc.async_close()
        self._azc = None


async def find_broker(timeout: float = 3.0, interfaces: Interfaces = None) -> tuple[str, int]:
    """Browse `_mqtt._tcp.local.` and return (host, port) of the first broker that resolves."""
    found: asyncio.Queue[str] = asyncio.Queue()

    def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            found.put_nowait(name)

    azc = _make_zeroconf(interfaces)
    browser = AsyncServiceBrowser(azc.zeroconf, [MQTT_SERVICE_TYPE], handlers=[handler])
    try:
        async with asyncio.timeout(timeout):
            while True:
                name = await found.get()
                info = AsyncServiceInfo(MQTT_SERVICE_TYPE, name)
                if await info.async_request(azc.zeroconf, RESOLVE_TIMEOUT_MS) and info.port:
                    addrs = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
                    if addrs:
                        return addrs[0], info.port
    except TimeoutError:
        raise BrokerNotFoundError(
            f"no MQTT broker announced {MQTT_SERVICE_TYPE} over mDNS within {timeout:g}s; "
            "set broker.url in the agent config"
        ) from None
    finally:
        await browser.async_cancel()
        await azc.async_close()


async def resolve_broker(config: AgentConfig, timeout: float = 3.0,
                         interfaces: Interfaces = None) -> tuple[str, int]:
    """The broker to connect to: `broker.url` when set, else mDNS (`find_broker`)."""
    if config.broker.url is not None:
        host, port, _ = config.broker.endpoint()
        return host, port
    if not config.discovery:
        raise BrokerNotFoundError("broker.url is not set and discovery is disabled")
    return await find_broker(timeout, interfaces)


def primary_ipv4() -> str:
    """The address other devices reach us on (the route to a public address; no traffic sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, only selects the interface
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
