"""Agent configuration, loaded from TOML (see deploy/agent.example.toml).

Unknown keys are errors (a typo must not silently fall back to a default); every error is a
`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from detransformer_edge.errors import ConfigError
from detransformer_edge.protocol.codec import ProtocolError, check_name

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "3.1.1", "5")
MAX_CONFIG_CHARS = 1 << 20  # an agent config is a few hundred bytes
_SCHEMES = {"mqtt": (1883, False), "tcp": (1883, False), "mqtts": (8883, True), "ssl": (8883, True)}


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    insecure: bool = False  # skip hostname verification (self-signed home brokers)


@dataclass(frozen=True)
class BrokerConfig:
    url: str | None = None  # mqtt://host:1883 or mqtts://host:8883; None: find it over mDNS
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    protocol: str = "auto"  # "auto" tries MQTT 5 and falls back to 3.1.1
    keepalive_s: int = 10  # the broker fires our LWT after 1.5 x keepalive of silence
    tls: TlsConfig | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"broker.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not (isinstance(self.keepalive_s, int) and 1 <= self.keepalive_s <= 65535):
            raise ConfigError(f"broker.keepalive_s must be an integer 1..65535, got {self.keepalive_s!r}")
        if not (0 < self.reconnect_min_s <= self.reconnect_max_s):
            raise ConfigError("broker: need 0 < reconnect_min_s <= reconnect_max_s")
        if self.url is not None:
            self.endpoint()  # validate now, not at connect time

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) from `url`; ConfigError if it is not an mqtt(s) URL."""
        if self.url is None:
            raise ConfigError("broker.url is not set (use discovery or set broker.url)")
        try:
            parts = urlsplit(self.url)
            hostname = parts.hostname
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise ConfigError(f"broker.url {self.url!r} is not a URL: {exc}") from None
        if parts.scheme not in _SCHEMES or not hostname:
            raise ConfigError(
                f"broker.url {self.url!r} must look like mqtt://host:1883 or mqtts://host:8883"
            )
        default_port, tls = _SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ConfigError(f"broker.url {self.url!r}: bad port ({exc})") from None
        return hostname, port, tls or self.tls is not None

    def credentials(self) -> tuple[str | None, str | None]:
        """Username/password: the explicit keys win over ones embedded in the URL."""
        parts = urlsplit(self.url or "")
        user = self.username or (unquote(parts.username) if parts.username else None)
        pw = self.password or (unquote(parts.password) if parts.password else None)
        return user, pw


@dataclass(frozen=True)
class ElectionConfig:
    lease_s: float = 10.0  # failover time is at most one lease after the leader vanishes
    stagger_s: float | None = None  # per-rank claim delay; None: lease_s / 2
    settle_s: float | None = None  # wait after (re)connect for retained state; None: lease_s / 4

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ConfigError(f"election.lease_s must be > 0, got {self.lease_s!r}")

    @property
    def stagger(self) -> float:
        return self.stagger_s if self.stagger_s is not None else self.lease_s / 2

    @property
    def settle(self) -> float:
        return self.settle_s if self.settle_s is not None else self.lease_s / 4


@dataclass(frozen=True)
class AnswerConfig:
    """How the home answers a question its intent model does not know (``answer_questions``)."""

    max_tokens: int = 40  # the spoken answer's bound in tokens (it also ends at its first sentence)
    timeout_s: float = 8.0  # ... and in seconds: what is said by then is the answer
    model: str | None = None  # the language model; None: the catalog's first

    def __post_init__(self) -> None:
        if not (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= 256):
            raise ConfigError(f"answers.max_tokens must be 1..256, got {self.max_tokens!r}")
        if not 0 < self.timeout_s <= 120:
            raise ConfigError(f"answers.timeout_s must be within 0..120 s, got {self.timeout_s!r}")


@dataclass(frozen=True)
class AgentConfig:
    id: str
    cluster: str = "home"
    name: str = ""  # human-readable; defaults to the id
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    discovery: bool = True  # announce over mDNS; find the broker over mDNS when url is unset
    # planner capability profile: a device-class name ("raspberry-pi-5", one of firmware_profiles/)
    # or a profile file (relative paths are relative to the config file)
    profile: Path | None = None
    dashboard_port: int = 8080  # 0 disables the dashboard
    dashboard_host: str = "127.0.0.1"  # bind address: "0.0.0.0" shows the dashboard to the whole LAN
    # Wyoming (Home Assistant Assist): None serves none; 0 binds a free port (tests, the demo)
    wyoming_port: int | None = None
    wyoming_host: str = "0.0.0.0"  # Home Assistant runs on another machine; it only recognises text
    cluster_key: str | None = field(default=None, repr=False)  # signs leader commands; never logged
    status_interval_s: float = 5.0
    homeassistant: bool = True  # publish Home Assistant discovery
    homeassistant_prefix: str = "homeassistant"
    election: ElectionConfig = field(default_factory=ElectionConfig)
    # where assigned weights come from: "auto" (local model files, else streamed from the
    # leader), "local" (files only) or "stream" (always from the leader; docs/WEIGHTS.md)
    weights: str = "auto"
    weights_cache: Path | None = None  # streamed chunks kept here (default: the model cache dir)
    weights_cache_mb: float = 2048.0  # the cache's bound: least recently used shards beyond it are deleted
    # a voice question the intent model rejects as out of its domain is answered by the home's
    # language model in one short spoken sentence (Hermes hermes/tts/say, the Wyoming handle reply)
    answer_questions: bool = False
    answers: AnswerConfig = field(default_factory=AnswerConfig)

    def __post_init__(self) -> None:
        try:
            check_name(self.id, "id")
            check_name(self.cluster, "cluster")
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from None
        if not (isinstance(self.dashboard_port, int) and 0 <= self.dashboard_port <= 65535):
            raise ConfigError(f"dashboard_port must be 0..65535, got {self.dashboard_port!r}")
        if self.wyoming_port is not None and not (
                isinstance(self.wyoming_port, int) and 0 <= self.wyoming_port <= 65535):
            raise ConfigError(f"wyoming_port must be 0..65535 (0: a free port), got {self.wyoming_port!r}")
        if not self.wyoming_host.strip():
            raise ConfigError('wyoming_host is empty: use "0.0.0.0" (the LAN) or "127.0.0.1" (this device only)')
        if not self.dashboard_host.strip():
            raise ConfigError('dashboard_host is empty: use "127.0.0.1" (this device only) or "0.0.0.0" (the LAN)')
        if self.cluster_key is not None and not self.cluster_key.strip():
            raise ConfigError("cluster_key is empty: set a long random secret (or remove it to run unsigned)")
        if not self.status_interval_s > 0:
            raise ConfigError("status_interval_s must be > 0")
        if not self.weights_cache_mb >= 0:
            raise ConfigError(f"weights_cache_mb must be >= 0 (0 keeps only the shards in use), got {self.weights_cache_mb!r}")
        if self.weights not in ("auto", "local", "stream"):
            raise ConfigError(f'weights must be "auto", "local" or "stream", got {self.weights!r}')
        if self.broker.url is None and not self.discovery:
            raise ConfigError("set broker.url or enable discovery: the agent cannot find a broker")

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        path = Path(path)
        if path.is_dir():  # what Docker leaves when a bind-mounted file did not exist on the host
            raise ConfigError(
                f"agent config {path} is a directory, not a file: Docker creates an empty directory when "
                "the file it should mount is missing; create deploy/agent.toml (cp deploy/agent.example.toml "
                "deploy/agent.toml), remove the directory and start again")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc.strerror or exc}") from None
        return cls.loads(text, source=str(path), base_dir=path.parent)

    @classmethod
    def loads(cls, text: str, source: str = "<string>", base_dir: Path | None = None) -> AgentConfig:
        if len(text) > MAX_CONFIG_CHARS:
            raise ConfigError(f"{source}: config of {len(text)} characters is too large")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except (RecursionError, ValueError) as exc:  # nesting, a number with thousands of digits
            raise ConfigError(f"{source}: not valid TOML: {type(exc).__name__}") from None
        try:
            return cls.from_dict(data, base_dir or Path("."))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
        top = _Section(data, "")
        b = top.table("broker")
        tls_t = b.table("tls", optional=True)
        tls = None
        if tls_t is not None:
            tls = TlsConfig(
                ca_file=tls_t.path("ca_file", base_dir),
                cert_file=tls_t.path("cert_file", base_dir),
                key_file=tls_t.path("key_file", base_dir),
                insecure=tls_t.get("insecure", bool, False),
            )
            tls_t.done()
        password = b.secret("password", base_dir)
        broker = BrokerConfig(
            url=b.get("url", str, None),
            username=b.get("username", str, None),
            password=password,
            protocol=b.get("protocol", str, "auto"),
            keepalive_s=b.get("keepalive_s", int, 10),
            tls=tls,
            reconnect_min_s=b.get("reconnect_min_s", float, 0.5),
            reconnect_max_s=b.get("reconnect_max_s", float, 30.0),
        )
        b.done()
        e = top.table("election")
        election = ElectionConfig(
            lease_s=e.get("lease_s", float, 10.0),
            stagger_s=e.get("stagger_s", float, None),
            settle_s=e.get("settle_s", float, None),
        )
        e.done()
        a = top.table("answers")
        answers = AnswerConfig(
            max_tokens=a.get("max_tokens", int, 40),
            timeout_s=a.get("timeout_s", float, 8.0),
            model=a.get("model", str, None),
        )
        a.done()
        if "model" in data:  # read by nothing since the catalog serves every model it has
            top.get("model", str, None)
            log.warning("agent config: the key 'model' is ignored (the home serves every model of its "
                        "catalog); remove it")
        key = top.secret("cluster_key", base_dir)
        cfg = cls(
            id=top.get("id", str, _REQUIRED),
            cluster=top.get("cluster", str, "home"),
            name=top.get("name", str, ""),
            broker=broker,
            discovery=top.get("discovery", bool, True),
            profile=_profile(top, base_dir),
            dashboard_port=top.get("dashboard_port", int, 8080),
            dashboard_host=top.get("dashboard_host", str, "127.0.0.1"),
            wyoming_port=top.get("wyoming_port", int, None),
            wyoming_host=top.get("wyoming_host", str, "0.0.0.0"),
            cluster_key=key,
            status_interval_s=top.get("status_interval_s", float, 5.0),
            homeassistant=top.get("homeassistant", bool, True),
            homeassistant_prefix=top.get("homeassistant_prefix", str, "homeassistant"),
            election=election,
            weights=top.get("weights", str, "auto"),
            weights_cache=top.path("weights_cache", base_dir),
            weights_cache_mb=top.get("weights_cache_mb", float, 2048.0),
            answer_questions=top.get("answer_questions", bool, False),
            answers=answers,
        )
        top.done()
        return cfg


_REQUIRED = object()


def _profile(top: _Section, base_dir: Path) -> Path | None:
    """``profile``: a device-class name resolves to the shipped profile, anything else is a path
    (relative to the config file) that must exist."""
    from detransformer_edge.planner.profile import ProfileError, bundled_profile, is_profile_name

    value = top.get("profile", str, None)
    if value is None:
        return None
    if is_profile_name(value):
        try:
            return bundled_profile(value)
        except ProfileError as exc:
            raise ConfigError(f"profile: {exc}") from None
    path = top.path("profile", base_dir)
    assert path is not None
    if not path.is_file():
        raise ConfigError(f"profile: {value!r} resolves to {path}, which is not a file; use a device-class "
                          "name such as \"raspberry-pi-5\" (the shipped profiles) or an absolute path")
    return path


class _Section:
    """Typed reads from one TOML table; `done()` rejects keys nobody read."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, typ: type, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"missing required key {self._key(key)!r}")
            return default
        v = self.data[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"{self._key(key)} must be {typ.__name__}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{self._key(key)} must be a finite number, got {v!r}")
        return v

    def secret(self, key: str, base_dir: Path) -> str | None:
        """``key`` given inline, or read from the file named by ``<key>_file`` (not both)."""
        value = self.get(key, str, None)
        path = self.path(f"{key}_file", base_dir)
        if value is not None and path is not None:
            raise ConfigError(f"set {self._key(key)} or {self._key(key + '_file')}, not both")
        return _read_secret(path, self._key(key + "_file")) if path is not None else value

    def path(self, key: str, base_dir: Path) -> Path | None:
        v = self.get(key, str, None)
        if v is None:
            return None
        try:
            p = Path(v).expanduser()
        except RuntimeError as exc:  # ~user that does not exist
            raise ConfigError(f"{self._key(key)}: cannot expand {v!r}: {exc}") from None
        if "\x00" in v:
            raise ConfigError(f"{self._key(key)} must not contain a NUL character")
        return p if p.is_absolute() else base_dir / p

    def table(self, key: str, optional: bool = False) -> Any:
        self.seen.add(key)
        v = self.data.get(key)
        if v is None:
            return None if optional else _Section({}, self._key(key))
        if not isinstance(v, dict):
            raise ConfigError(f"{self._key(key)} must be a table ([{self._key(key)}])")
        return _Section(v, self._key(key))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(self._key(k) for k in unknown)}")


def _read_secret(path: Path, what: str) -> str:
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a directory, not a file (Docker creates one when a bind-mounted "
                          "file is missing on the host: put the file there and remove the directory)")
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
