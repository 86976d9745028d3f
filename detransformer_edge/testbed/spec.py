"""Pure data describing an emulated home: which devices, how fast their links and CPUs are.

Nothing here touches the host, so specs can be built, validated and compared in any test.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from detransformer_edge.errors import ConfigError

BROKER = "broker"
"""Node name of the broker; it has its own namespace and link like a device."""

ROUTER = "router"
"""Namespace name suffix of the bridge ("home router"); not a node processes run in."""

STANDARD_RATES_MBIT: tuple[int, ...] = (20, 50, 100, 300, 1000)
"""Link rates the design discusses (WiFi 20-300 Mbit/s, wired 1 Gbit/s); measured in docs."""

CFS_PERIOD_US = 100_000
"""CFS period for CPU quotas: the kernel default, 100 ms; quota = cpu share * period."""

_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_PREFIX = re.compile(r"^[a-z0-9]{1,20}$")


def new_prefix() -> str:
    """A fresh unique prefix so concurrent homes on one host never share a name."""
    return "dtb" + secrets.token_hex(4)


@dataclass(frozen=True)
class TbfParams:
    """Token-bucket filter settings for one link direction.

    burst_bytes: bucket size. It must hold several full-size frames, or the shaper starves
    between timer ticks and undershoots the rate; too big and a flow runs at line speed for
    a while. 4 ms worth of the rate, at least 32 KiB, keeps the overshoot under a few
    percent of a one-second transfer at every rate.
    limit_bytes: queue length, 25 ms worth of the rate plus the burst (a home router's
    buffer without gross bufferbloat), but at least 256 KiB: veth hands tbf TCP
    super-packets of up to 64 KiB, which it splits into frames, and the shorter queue at
    20 Mbit/s (95 KB) dropped 3269 frames against 8560 sent in slow start, costing some
    transfers a quarter of their rate; 256 KiB dropped 113 (docs/TESTBED.md).
    """

    mbit: int
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def for_rate(cls, mbit: int) -> TbfParams:
        rate_bytes_per_s = mbit * 1_000_000 // 8
        burst = max(32 * 1024, rate_bytes_per_s * 4 // 1000)
        limit = max(256 * 1024, rate_bytes_per_s * 25 // 1000 + burst)
        return cls(mbit=mbit, burst_bytes=burst, limit_bytes=limit)

    @property
    def max_queue_ms(self) -> float:
        """Longest wait in a full queue: the latency a bulk transfer adds to other traffic."""
        return self.limit_bytes / (self.mbit * 1_000_000 / 8) * 1000

    def tc_args(self) -> list[str]:
        """Arguments after `tc qdisc replace dev X root`."""
        return [
            "tbf",
            "rate", f"{self.mbit}mbit",
            "burst", str(self.burst_bytes),
            "limit", str(self.limit_bytes),
        ]  # fmt: skip


def _check_node(name: str, mbit: int | None, cpu: float | None, mem_mb: int | None) -> None:
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r} must be 1-32 chars of a-z, 0-9, '_' or '-', starting "
            "with a letter or digit"
        )
    if mbit is not None and not 1 <= mbit <= 10_000:
        raise ConfigError(f"{name}: mbit={mbit} must be between 1 and 10000 (or None)")
    if cpu is not None and not 0.01 <= cpu <= 64:
        raise ConfigError(f"{name}: cpu={cpu} must be a share of cores between 0.01 and 64")
    if mem_mb is not None and mem_mb < 16:
        raise ConfigError(f"{name}: mem_mb={mem_mb} must be at least 16 MiB (or None)")


@dataclass(frozen=True)
class DeviceSpec:
    """One device of the home.

    cpu: share of one core (0.4 = 40 ms of CPU per 100 ms period), None = unlimited.
    mem_mb: memory limit, None = unlimited.
    mbit: link rate in both directions, None = unshaped (veth speed).
    """

    name: str
    cpu: float | None = None
    mem_mb: int | None = None
    mbit: int | None = 100

    def __post_init__(self) -> None:
        if self.name in (BROKER, ROUTER):
            raise ConfigError(f"device name {self.name!r} is reserved")
        _check_node(self.name, self.mbit, self.cpu, self.mem_mb)


@dataclass(frozen=True)
class BrokerSpec:
    """The broker's own namespace and link.

    mbit=None is a "wired hub": the broker's link is not shaped, so only the devices'
    links limit traffic. An int shapes it like a device (a broker on a WiFi device).
    """

    mbit: int | None = None
    cpu: float | None = None
    mem_mb: int | None = None

    def __post_init__(self) -> None:
        _check_node(BROKER, self.mbit, self.cpu, self.mem_mb)

    @property
    def name(self) -> str:
        return BROKER


NodeSpec = DeviceSpec | BrokerSpec


@dataclass(frozen=True)
class HomeSpec:
    """A whole home: devices, broker, the private /24 and the unique name prefix.

    The subnet exists only inside the home's namespaces (each home has its own bridge
    namespace), so it never collides with the host's addresses or another home's.
    Addresses: .1 the bridge, .2 the broker, .10 onwards the devices in order.
    """

    devices: Sequence[DeviceSpec]
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    prefix: str = field(default_factory=new_prefix)
    subnet: str = "10.77.0.0/24"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))  # hashable, immutable
        if not self.devices:
            raise ConfigError("a home needs at least one device")
        if len(self.devices) > 200:
            raise ConfigError(f"{len(self.devices)} devices do not fit one /24")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ConfigError(f"device names must be unique: {names}")
        if not _PREFIX.match(self.prefix):
            raise ConfigError(
                f"prefix {self.prefix!r} must be 1-20 chars of a-z and 0-9 (no '-': it "
                "separates the prefix from node names)"
            )
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise ConfigError(f"subnet {self.subnet!r}: {exc}") from exc
        if net.prefixlen != 24 or not net.is_private:
            raise ConfigError(f"subnet {self.subnet} must be a private /24")

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """Every node processes can run in: the devices, then the broker."""
        return (*self.devices, self.broker)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"no node {name!r} in this home; nodes: {[n.name for n in self.nodes]}")

    def address(self, name: str) -> str:
        """IPv4 address of a node (or of the bridge for "router")."""
        net = ipaddress.IPv4Network(self.subnet)
        if name == ROUTER:
            host = 1
        elif name == BROKER:
            host = 2
        else:
            host = 10 + [d.name for d in self.devices].index(self.node(name).name)
        return str(net.network_address + host)

    def netns(self, name: str) -> str:
        """Network namespace of a node or of the router."""
        return f"{self.prefix}-{name}"

    def cgroup(self, name: str) -> str:
        """Cgroup directory name of a node (same in every controller hierarchy)."""
        return f"{self.prefix}-{name}"
