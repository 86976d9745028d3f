"""Who is in the home: presence and profile records as the agent last saw them.

Pure bookkeeping over the retained ``P/devices/<id>/{presence,profile,status}`` messages; the
agent feeds it decoded messages and asks it for a ``MembershipView`` (an immutable snapshot).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detransformer_edge.protocol.messages import DeviceStatus, LeaderLease, ProfileRecord


@dataclass(frozen=True)
class Member:
    id: str
    online: bool
    profile: ProfileRecord | None = None
    status: DeviceStatus | None = None


@dataclass(frozen=True)
class MembershipView:
    """The agent's picture of the cluster at one instant."""

    members: Mapping[str, Member]
    lease: LeaderLease | None  # the lease record this agent follows (may be expired)

    @property
    def online(self) -> tuple[str, ...]:
        """Online devices whose profile is known, sorted by id."""
        return tuple(sorted(m.id for m in self.members.values() if m.online and m.profile))

    def profiles(self) -> dict[str, ProfileRecord]:
        return {i: p for i in self.online if (p := self.members[i].profile) is not None}

    def scores(self) -> dict[str, float]:
        return {i: p.score for i, p in self.profiles().items()}


@dataclass(frozen=True)
class WorkState:
    """What the model side reports about this device (published in its status)."""

    ready: bool = False
    placement_version: int = 0
    sub_blocks: tuple[tuple[int, int], ...] = ()
    last_latency_ms: float | None = None
    weights_percent: float | None = None  # percent of the streamed weights received (None: not streaming)
    loading: bool = False  # reading or receiving model weights right now


class Membership:
    """The presence, profile and status records seen so far."""

    def __init__(self) -> None:
        self.presence: dict[str, bool] = {}
        self.profiles: dict[str, ProfileRecord] = {}
        self.status: dict[str, DeviceStatus] = {}
        self._last_key: tuple[object, ...] = ()

    def view(self, lease: LeaderLease | None) -> MembershipView:
        ids = set(self.presence) | set(self.profiles)
        members = {i: Member(i, self.presence.get(i, False), self.profiles.get(i), self.status.get(i)) for i in ids}
        return MembershipView(members, lease)

    def changed(self) -> bool:
        """Whether the online set or an online profile changed since the last call."""
        key = tuple(sorted((i, self.profiles[i]) for i, on in self.presence.items() if on and i in self.profiles))
        if key == self._last_key:
            return False
        self._last_key = key
        return True

    def scores(self) -> dict[str, float]:
        """Online devices with a profile -> their election score."""
        return {i: p.score for i, p in self.profiles.items() if self.presence.get(i)}

    def offline(self) -> frozenset[str]:
        return frozenset(i for i, on in self.presence.items() if not on)

    def loading(self) -> frozenset[str]:
        """Devices whose last status says they are loading model weights."""
        return frozenset(i for i, st in self.status.items() if st.loading and self.presence.get(i))
