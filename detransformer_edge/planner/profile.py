"""Device capability profiles: what the planner knows about each device.

A profile is a small TOML file (see ``firmware_profiles/``): written by
``detransformer-edge profile`` on the device itself, or shipped as a starting point for a known
board. The planner reads only the fields below; comments in the file carry the sources.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from detransformer_edge.errors import ConfigError
from detransformer_edge.weights.quant import AUTO, DEVICE_CHOICES

SCHEMA_VERSION = 1
LINK_KINDS = ("ethernet", "wifi6", "wifi5", "wifi4", "loopback", "other")


class ProfileError(ConfigError):
    """A device profile is missing, unreadable or has an invalid field."""


@dataclass(frozen=True)
class DeviceProfile:
    """Measured or documented capability of one device.

    ``gflops`` is sustained FP32 matmul throughput at transformer shapes; ``attn_gflops`` the same
    for attention (batched small GEMMs + softmax, usually well below GEMM); ``mem_bw_gbs`` a large
    tensor copy; ``ram_mb`` what this service may use; ``link_mbit`` the device's own link to the
    broker (one direction); ``rtt_ms`` a measured MQTT publish->receive round trip through the
    broker, when known. ``quant`` is the weight format this device runs every model in
    (``float32``, ``int8``, ``int4``), or ``auto`` for each model's own format in the catalog
    (``weights/quant``).

    Devices that share a machine (containers, the testbed's emulated devices): ``cpu_quota`` is
    the cores a CFS quota gives the device (``gflops`` is its sustained rate *under* the quota;
    after idling it runs at full core speed until the quota's ``quota_period_ms`` budget is
    spent), ``host`` names the machine and ``host_cores`` what that machine gives all its
    devices together (its cores, or a measured share when other work loads it). The cost model
    slows devices of one host that compute at once beyond ``host_cores`` (``planner/compute.py``).
    """

    name: str
    gflops: float
    mem_bw_gbs: float
    ram_mb: int
    link_mbit: float
    attn_gflops: float | None = None
    link: str = "other"
    cores: int = 1
    rtt_ms: float | None = None
    description: str = ""
    quant: str = AUTO
    cpu_quota: float | None = None
    quota_period_ms: float = 100.0
    host: str | None = None
    host_cores: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/#+ \t"):
            raise ProfileError(
                f"profile name {self.name!r} must be a non-empty id without spaces or MQTT wildcards"
            )
        for key in ("gflops", "mem_bw_gbs", "link_mbit"):
            _check_positive_number(self.name, key, getattr(self, key))
        if self.attn_gflops is not None:
            _check_positive_number(self.name, "attn_gflops", self.attn_gflops)
        if self.rtt_ms is not None and (not _is_number(self.rtt_ms) or self.rtt_ms < 0):
            raise ProfileError(f"profile {self.name}: rtt_ms must be >= 0, got {self.rtt_ms!r}")
        if not isinstance(self.ram_mb, int) or isinstance(self.ram_mb, bool) or self.ram_mb <= 0:
            raise ProfileError(f"profile {self.name}: ram_mb must be a positive integer, got {self.ram_mb!r}")
        if not isinstance(self.cores, int) or isinstance(self.cores, bool) or self.cores <= 0:
            raise ProfileError(f"profile {self.name}: cores must be a positive integer, got {self.cores!r}")
        if self.link not in LINK_KINDS:
            raise ProfileError(f"profile {self.name}: link must be one of {', '.join(LINK_KINDS)}, got {self.link!r}")
        for key in ("cpu_quota", "host_cores"):
            if getattr(self, key) is not None:
                _check_positive_number(self.name, key, getattr(self, key))
        _check_positive_number(self.name, "quota_period_ms", self.quota_period_ms)
        if self.cpu_quota is not None and self.cpu_quota > self.cores:
            raise ProfileError(f"profile {self.name}: cpu_quota {self.cpu_quota} exceeds its {self.cores} cores")
        if (self.host is None) != (self.host_cores is None):
            raise ProfileError(f"profile {self.name}: host and host_cores go together (the machine the device "
                               "shares, and the cores it gives all its devices)")
        if self.host is not None and (not isinstance(self.host, str) or not self.host):
            raise ProfileError(f"profile {self.name}: host must be a non-empty name, got {self.host!r}")
        if self.quant not in DEVICE_CHOICES:
            raise ProfileError(
                f"profile {self.name}: quant must be one of {', '.join(DEVICE_CHOICES)}, got {self.quant!r}"
            )

    # -- derived quantities the cost model uses ------------------------------------------------
    @property
    def flops_per_s(self) -> float:
        return self.gflops * 1e9

    @property
    def attn_flops_per_s(self) -> float:
        # Without a measurement, attention is assumed to run at half the GEMM rate.
        return (self.attn_gflops if self.attn_gflops is not None else 0.5 * self.gflops) * 1e9

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_bw_gbs * 1e9

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_mbit * 1e6 / 8

    @property
    def core_gflops(self) -> float:
        """One core's sustained rate: what single-threaded work (message handling) runs at."""
        return self.gflops if self.cpu_quota is not None else self.gflops / self.cores

    @property
    def ram_bytes(self) -> int:
        return self.ram_mb * 1024 * 1024

    @property
    def capability_score(self) -> float:
        """One number for leader election: higher is a better leader.

        The leader plans, tokenises and usually coordinates (embeddings + output), so compute
        counts most, then its link (every request starts and ends there), then memory headroom.
        Each factor saturates so that one huge figure cannot dominate: link at 1 Gbit, memory at
        4 GB. Ties are broken by the election code (e.g. by device id).
        """
        link = math.sqrt(min(self.link_mbit, 1000.0) / 1000.0)
        memory = math.sqrt(min(self.ram_mb, 4096) / 4096)
        return round(self.gflops * link * memory, 6)

    def scaled(self, cpu_share: float) -> DeviceProfile:
        """The same device limited to ``cpu_share`` of its compute (e.g. a cgroup CPU quota)."""
        attn = None if self.attn_gflops is None else self.attn_gflops * cpu_share
        return replace(self, gflops=self.gflops * cpu_share, attn_gflops=attn)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_number(name: str, key: str, value: object) -> None:
    if not _is_number(value) or value <= 0:  # type: ignore[operator]
        raise ProfileError(f"profile {name}: {key} must be a positive number, got {value!r}")


_FIELD_NAMES = {f.name for f in fields(DeviceProfile)}
_REQUIRED = ("name", "gflops", "mem_bw_gbs", "ram_mb", "link_mbit")


def profile_from_dict(data: dict[str, Any], source: str = "<dict>") -> DeviceProfile:
    """Validate a parsed TOML/JSON mapping into a profile; errors name ``source`` and the field."""
    schema = data.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ProfileError(f"{source}: profile schema {schema!r} is not supported (expected {SCHEMA_VERSION})")
    unknown = sorted(set(data) - _FIELD_NAMES - {"schema"})
    if unknown:
        raise ProfileError(f"{source}: unknown profile field(s) {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"{source}: missing profile field(s) {', '.join(missing)}")
    values = {k: v for k, v in data.items() if k != "schema"}
    for key in ("gflops", "mem_bw_gbs", "link_mbit", "attn_gflops", "rtt_ms", "cpu_quota", "quota_period_ms",
                "host_cores"):
        if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
            values[key] = float(values[key])
    try:
        return DeviceProfile(**values)
    except ProfileError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ProfileError(f"{source}: {exc}") from None


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": SCHEMA_VERSION}
    out.update({k: v for k, v in asdict(profile).items() if v is not None and v != ""})
    if profile.cpu_quota is None and profile.quota_period_ms == 100.0:
        del out["quota_period_ms"]  # only meaningful with a quota
    return out


def loads_profile(text: str, source: str = "<string>") -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML: {exc}") from None
    return profile_from_dict(data, source)


def load_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    return loads_profile(text, str(path))


def load_profiles(paths: list[str | Path]) -> list[DeviceProfile]:
    """Load several profiles; device names must be unique (they are the devices' ids)."""
    profiles = [load_profile(p) for p in paths]
    seen: dict[str, int] = {}
    for i, prof in enumerate(profiles):
        if prof.name in seen:
            raise ProfileError(
                f"profiles {paths[seen[prof.name]]} and {paths[i]} both name device {prof.name!r}; "
                "give each device its own name"
            )
        seen[prof.name] = i
    return profiles


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise ProfileError(f"cannot write {value!r} to TOML")


def dumps_profile(profile: DeviceProfile, comments: dict[str, str] | None = None) -> str:
    """TOML text for ``profile``; ``comments`` maps a field to a note written above it."""
    lines: list[str] = []
    for key, value in profile_to_dict(profile).items():
        note = (comments or {}).get(key)
        if note:
            lines.extend(f"# {line}" for line in note.splitlines())
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def dump_profile(profile: DeviceProfile, path: str | Path, comments: dict[str, str] | None = None) -> None:
    Path(path).write_text(dumps_profile(profile, comments), encoding="utf-8")


PROFILES_ENV = "DETRANSFORMER_PROFILES"  # the image sets it: /opt/detransformer-edge/firmware_profiles


def bundled_profiles_dir() -> Path:
    """The shipped profiles: ``$DETRANSFORMER_PROFILES`` when set (the container image), else
    ``firmware_profiles/`` of the source checkout."""
    env = os.environ.get(PROFILES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "firmware_profiles"


def bundled_profile_names() -> list[str]:
    return sorted(p.stem for p in bundled_profiles_dir().glob("*.toml"))


def is_profile_name(value: str) -> bool:
    """A device-class name (``raspberry-pi-5``) rather than a path: no directory, no suffix."""
    return bool(value) and "/" not in value and "\\" not in value and not value.endswith(".toml")


def bundled_profile(name: str) -> Path:
    """The shipped profile of a device class; ProfileError naming the known ones otherwise."""
    path = bundled_profiles_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(bundled_profile_names()) or f"none found in {bundled_profiles_dir()}"
        raise ProfileError(f"no bundled profile for device class {name!r} (known: {known}); "
                           "give a device-class name or the path of a profile file")
    return path
