"""Compute on devices that share a machine: CPU quotas and a host's cores.

A device under a CFS CPU quota ``q`` (``cpu_quota``) may use ``q x period`` CPU-seconds per
quota period. Its profile's ``gflops`` is the sustained rate under the quota (what a long run
measures), but after idling it computes at full core speed until that budget is spent — modelled
as a token bucket of CPU time that fills at ``q`` cores while the device idles. A pipeline stage, whose device
idled while the earlier stages ran, therefore starts with a burst; devices that compute at once
on one machine share its ``host_cores`` (water-filling: each gets what it wants up to an equal
share), so four devices bursting on two cores get half a core each, and four devices whose
quotas add up to more than a loaded host gives are slowed below their quota.

``CpuShares.run`` turns one compute step (sustained seconds per device) into wall seconds per
device by simulating those rates event by event (a device finishes; a bucket runs dry).
Devices with neither a quota nor a shared host keep their sustained time: the fast path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from detransformer_edge.planner.profile import DeviceProfile

_EPS = 1e-12


class CpuShares:
    def __init__(self, profiles: Mapping[str, DeviceProfile]) -> None:
        self.quota = {n: p.cpu_quota for n, p in profiles.items() if p.cpu_quota is not None}
        self.capacity = {n: float(p.cores) for n, p in profiles.items()}  # cores when bursting
        # CFS hands out q x period each period; a long burst after idling gains (1 - q) x period
        # on average over start phases (a continuous bucket of q(1 - q/cores) x period drained at
        # cores - q gives exactly that, and short bursts run at full speed as under CFS)
        self.bucket_size = {n: q * (1 - q / self.capacity[n]) * profiles[n].quota_period_ms / 1e3
                            for n, q in self.quota.items()}
        self.host = {n: p.host for n, p in profiles.items() if p.host is not None}
        self.host_cores = {p.host: float(p.host_cores) for p in profiles.values()
                           if p.host is not None and p.host_cores is not None}

    def involved(self, devices: Iterable[str]) -> bool:
        """Whether any of ``devices`` needs the simulation (a quota or a shared host)."""
        return any(d in self.quota or d in self.host for d in devices)

    def full_buckets(self, devices: Iterable[str]) -> dict[str, float]:
        """Bucket levels at the start of a request: every device idled before it."""
        return {d: self.bucket_size[d] for d in devices if d in self.quota}

    def idle(self, buckets: dict[str, float], seconds: float, busy: Mapping[str, float] | None = None) -> None:
        """Refill every bucket for ``seconds`` of idling (minus the time a device was busy)."""
        for d, level in buckets.items():
            rest = seconds - (busy or {}).get(d, 0.0)
            if rest > 0:
                buckets[d] = min(self.bucket_size[d], level + self.quota[d] * rest)

    def sustained(self, device: str) -> float:
        """Cores a device gets over a long run alone: its quota, else all its cores."""
        return self.quota.get(device, self.capacity[device])

    def run(self, buckets: dict[str, float], per_device: Mapping[str, float]) -> dict[str, float]:
        """Wall seconds of each device's compute when they start together; ``per_device`` holds
        sustained seconds (profile rate). Updates ``buckets`` to the step's end, idle time
        included (the step lasts as long as its slowest device)."""
        work = {d: t * self.sustained(d) for d, t in per_device.items() if t > 0}  # core-seconds
        wall = {d: 0.0 for d in per_device}
        now = 0.0
        while work:
            rate = self._rates(buckets, work)
            # next event: a device finishes, or a bucket it drains runs dry
            dt = min(w / rate[d] for d, w in work.items())
            for d in work:
                drain = rate[d] - self.quota.get(d, rate[d])
                if drain > _EPS and buckets.get(d, 0.0) > _EPS:
                    dt = min(dt, buckets[d] / drain)
            now += dt
            for d in list(work):
                work[d] -= rate[d] * dt
                if d in buckets:
                    buckets[d] = min(self.bucket_size[d], max(0.0, buckets[d] + (self.quota[d] - rate[d]) * dt))
                if work[d] <= _EPS * max(1.0, rate[d]):
                    del work[d]
                    wall[d] = now
        self.idle(buckets, now, wall)
        return wall

    def _rates(self, buckets: Mapping[str, float], work: Mapping[str, float]) -> dict[str, float]:
        want = {}
        for d in work:
            q = self.quota.get(d)
            want[d] = self.capacity[d] if q is None or buckets.get(d, 0.0) > _EPS else q
        rate = dict(want)
        by_host: dict[str, list[str]] = {}
        for d in work:
            if d in self.host:
                by_host.setdefault(self.host[d], []).append(d)
        for host, members in by_host.items():
            rate.update(_water_fill({d: want[d] for d in members}, self.host_cores[host]))
        return rate


def _water_fill(want: Mapping[str, float], capacity: float) -> dict[str, float]:
    """Share ``capacity`` among ``want``: each gets what it wants up to an equal share of what
    the others leave."""
    out: dict[str, float] = {}
    left = capacity
    pending = sorted(want, key=lambda d: want[d])
    while pending:
        share = left / len(pending)
        d = pending[0]
        if want[d] <= share:
            out[d] = want[d]
            left -= want[d]
            pending.pop(0)
        else:
            for d in pending:
                out[d] = share
            break
    return out
