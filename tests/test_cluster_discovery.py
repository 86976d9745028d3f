"""mDNS discovery on loopback with two real AsyncZeroconf instances."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from detransformer_edge.cluster.config import AgentConfig, BrokerConfig
from detransformer_edge.cluster.discovery import (
    MQTT_SERVICE_TYPE,
    BrokerNotFoundError,
    ClusterDiscovery,
    find_broker,
    resolve_broker,
)

pytestmark = pytest.mark.timeout(60)
LO = ["127.0.0.1"]


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def loopback_multicast() -> None:
    """mDNS needs multicast on 127.0.0.1; say exactly why if this machine lacks it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
            mreq = socket.inet_aton("224.0.0.251") + socket.inet_aton("127.0.0.1")
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    except OSError as exc:
        pytest.skip(f"cannot join the mDNS group 224.0.0.251 on 127.0.0.1 here: {exc}")


async def test_two_agents_find_each_other_and_ignore_other_clusters(loopback_multicast: None) -> None:
    cl = f"t{uuid.uuid4().hex[:8]}"
    seen: list[dict[str, object]] = []
    async with ClusterDiscovery("a", cl, "0.1.0", 8080, interfaces=LO, on_change=seen.append) as a:
        async with ClusterDiscovery("b", cl, "0.1.0", 8081, interfaces=LO) as b:
            async with ClusterDiscovery("x", f"{cl}other", "0.1.0", 8082, interfaces=LO):
                await until(lambda: {p.id for p in a.peers.values()} == {"b"}, 10, "a sees b")
                await until(lambda: {p.id for p in b.peers.values()} == {"a"}, 10, "b sees a")
                peer = next(iter(a.peers.values()))
                assert (peer.cluster, peer.version, peer.port) == (cl, "0.1.0", 8081)
                assert "127.0.0.1" in peer.addresses
                await asyncio.sleep(0.5)
                assert {p.id for p in a.peers.values()} == {"b"}  # x is another cluster
        # b unregistered on exit: a hears the goodbye
        await until(lambda: not a.peers, 10, "a notices b left")
    assert seen and seen[-1] == {}


async def test_find_broker_over_mdns(loopback_multicast: None) -> None:
    port = 18830 + uuid.uuid4().int % 1000
    name = f"mosquitto-{uuid.uuid4().hex[:6]}.{MQTT_SERVICE_TYPE}"
    azc = AsyncZeroconf(interfaces=LO)
    info = AsyncServiceInfo(MQTT_SERVICE_TYPE, name, addresses=[socket.inet_aton("127.0.0.1")],
                            port=port, server="broker.local.")
    await azc.async_register_service(info)
    try:
        assert await find_broker(timeout=5, interfaces=LO) == ("127.0.0.1", port)
        cfg = AgentConfig(id="a", discovery=True)
        assert await resolve_broker(cfg, timeout=5, interfaces=LO) == ("127.0.0.1", port)
    finally:
        await (await azc.async_unregister_service(info))
        await azc.async_close()


async def test_no_broker_is_a_typed_error(loopback_multicast: None) -> None:
    with pytest.raises(BrokerNotFoundError, match="broker.url"):
        await find_broker(timeout=0.5, interfaces=LO)


async def test_configured_url_skips_mdns() -> None:
    cfg = AgentConfig(id="a", broker=BrokerConfig(url="mqtt://10.0.0.2:1884"))
    assert await resolve_broker(cfg) == ("10.0.0.2", 1884)
