"""Home-network testbed: emulate a home's devices, links and broker on one Linux host.

Network namespaces + veth + a bridge for the home network, `tc tbf` for link rates,
cgroup CPU quotas and memory limits for device speed. Needs root. See docs/TESTBED.md.
"""

from .errors import TestbedError, TestbedUnavailable
from .home import Home, NodeLink
from .host import HostCapabilities, check_host
from .registry import cleanup_stale
from .spec import BROKER, STANDARD_RATES_MBIT, BrokerSpec, DeviceSpec, HomeSpec, TbfParams

__all__ = [
    "BROKER",
    "STANDARD_RATES_MBIT",
    "BrokerSpec",
    "DeviceSpec",
    "Home",
    "HomeSpec",
    "HostCapabilities",
    "NodeLink",
    "TbfParams",
    "TestbedError",
    "TestbedUnavailable",
    "check_host",
    "cleanup_stale",
]
