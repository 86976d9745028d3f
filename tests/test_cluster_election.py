"""Election: unit tests of the pure rules and property tests over simulated homes.

The simulation models what the election relies on from MQTT and nothing more: one retained
`P/leader` record, per-subscriber FIFO delivery in broker order (each agent drains its inbox
at its own pace, so claims race), retained messages replayed on (re)connect, and LWT
`offline` when a connection dies without a clean exit (fired at an arbitrary later step).
With ``prevote`` the simulated agents also publish their status when they see a vacancy and
claim only once the broker has echoed one back (``hears_itself_since_vacancy``).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detransformer_edge.cluster.election import (
    FRESH_ECHO_FRACTION,
    ElectionSnapshot,
    Hold,
    ObservedLease,
    PublishLease,
    accepts_command,
    decide,
    is_leader,
    next_vacant_since,
    observe_lease,
    ranked_candidates,
    vacant_by_silence,
)
from detransformer_edge.protocol.messages import LeaderLease

LEASE = 2.0


def snap(**kw: Any) -> ElectionSnapshot:
    base: dict[str, Any] = dict(
        self_id="a",
        session="s1",
        now=100.0,
        lease=None,
        members={"a": 1.0},
        offline=frozenset(),
        vacant_since=100.0,
        conflict=False,
        last_publish_at=None,
        lease_s=LEASE,
        stagger_s=LEASE / 2,
    )
    base.update(kw)
    return ElectionSnapshot(**base)


def lease(id_: str = "a", term: int = 5, expires: float = 102.0, session: str = "s1") -> ObservedLease:
    return ObservedLease(LeaderLease(id_, term, expires, LEASE, session), expires)


# ---------------------------------------------------------------------------- unit rules


def test_best_candidate_claims_vacant_lease_with_growing_term() -> None:
    a = decide(snap(members={"a": 5.0, "b": 1.0}))
    assert isinstance(a, PublishLease) and a.reason == "claim"
    assert a.record.id == "a" and a.record.term >= 1 and a.record.expires_at == 100.0 + LEASE
    old = lease("b", term=10**15, expires=99.0, session="x")
    b = decide(snap(lease=old, members={"a": 5.0, "b": 1.0}))
    assert isinstance(b, PublishLease) and b.record.term == 10**15 + 1


def test_prevote_claims_only_after_hearing_itself_since_the_vacancy() -> None:
    members = {"a": 5.0, "b": 1.0}
    silent = lease("b", expires=99.0, session="x")  # b's lease ran out here: its renewals stopped arriving
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=None)), PublishLease)  # not tracked
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=float("-inf"))), Hold)  # never heard
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=99.0)), Hold)  # heard before it
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=99.9995)), PublishLease)  # ms rounding
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=100.4, now=100.5)), PublishLease)
    assert isinstance(decide(snap(lease=silent, members=members, heard_self_at=100.4, vacant_since=None)), Hold)
    # vacancies the broker told us of are not silence: no record at all, an offline holder, our old session
    never = float("-inf")
    assert isinstance(decide(snap(members=members, heard_self_at=never)), PublishLease)
    assert isinstance(decide(snap(lease=lease("b", session="x"), offline=frozenset({"b"}), members=members,
                                  heard_self_at=never)), PublishLease)
    assert isinstance(decide(snap(lease=lease("a", session="old"), members=members, heard_self_at=never)),
                      PublishLease)


def test_lower_ranked_candidate_waits_its_stagger() -> None:
    s = snap(members={"a": 1.0, "b": 5.0}, vacant_since=100.0)
    assert decide(s) == Hold()
    later = snap(members={"a": 1.0, "b": 5.0}, vacant_since=100.0, now=100.0 + LEASE / 2)
    assert isinstance(decide(later), PublishLease)


def test_ties_broken_by_smaller_id() -> None:
    assert ranked_candidates({"b": 3.0, "a": 3.0, "c": 9.0}) == ["c", "a", "b"]
    assert ranked_candidates({"b": 3.0, "a": 3.0}, frozenset({"a"})) == ["b"]


def test_devices_holding_the_model_files_rank_first() -> None:
    """A device that holds the model files leads before a faster one that would fetch them."""
    assert ranked_candidates({"fast": 9.0, "files": 1.0, "mid": 5.0}, preferred=frozenset({"files"})) == [
        "files", "fast", "mid"]
    s = snap(self_id="fast", members={"fast": 9.0, "files": 1.0}, preferred=frozenset({"files"}))
    assert decide(s) == Hold()  # ranked second: waits its stagger
    assert isinstance(decide(snap(self_id="files", members={"fast": 9.0, "files": 1.0},
                                  preferred=frozenset({"files"}))), PublishLease)


def test_a_loading_device_does_not_claim_but_a_loading_leader_renews() -> None:
    assert decide(snap(loading=True)) == Hold()  # vacant, best ranked, but busy loading
    assert isinstance(decide(snap(loading=False)), PublishLease)
    mine = lease("a", term=5, expires=100.0 + LEASE * 0.4)  # past the renewal point
    renew = decide(snap(lease=mine, vacant_since=None, loading=True))
    assert isinstance(renew, PublishLease) and renew.reason == "renew" and renew.record.term == 5


def test_live_lease_is_not_preempted_by_higher_score() -> None:
    s = snap(self_id="big", members={"big": 100.0, "a": 1.0}, lease=lease("a", session="sa"))
    assert decide(s) == Hold()


def test_leader_renews_after_a_third_and_steps_down_without_broker() -> None:
    mine = lease("a", expires=100.0 + LEASE)
    assert is_leader(snap(lease=mine))
    assert decide(snap(lease=mine)) == Hold()
    r = decide(snap(lease=mine, now=100.0 + LEASE / 3 + 0.01))
    assert isinstance(r, PublishLease) and r.reason == "renew" and r.record.term == 5
    assert not is_leader(snap(lease=mine, session=None))
    assert decide(snap(lease=mine, session=None)) == Hold()


def test_own_record_from_old_session_is_vacant_and_reclaimed() -> None:
    old = lease("a", expires=101.5, session="old")
    s = snap(lease=old, session="new")
    assert not is_leader(s)
    a = decide(s)
    assert isinstance(a, PublishLease) and a.record.session == "new" and a.record.term > 5


def test_conflicting_claim_of_my_term_bumps() -> None:
    a = decide(snap(lease=lease("a"), conflict=True))
    assert isinstance(a, PublishLease) and a.reason == "bump" and a.record.term == 6


def test_holder_offline_vacates() -> None:
    s = snap(lease=lease("b", session="sb"), members={"a": 1.0}, offline=frozenset({"b"}))
    assert isinstance(decide(s), PublishLease)
    assert next_vacant_since(snap(lease=lease("b", session="sb"), vacant_since=None)) is None


def test_observe_rules() -> None:
    a5 = LeaderLease("a", 5, 110.0, LEASE, "sa")
    b5 = LeaderLease("b", 5, 110.0, LEASE, "sb")
    b4 = LeaderLease("b", 4, 110.0, LEASE, "sb")
    b6 = LeaderLease("b", 6, 110.0, LEASE, "sb")
    first = observe_lease(None, a5, 100.0)
    assert first.accepted and first.lease is not None and first.lease.deadline == 100.0 + LEASE
    assert observe_lease(first.lease, b4, 100.0).lease == first.lease
    c = observe_lease(first.lease, b5, 100.0)
    assert c.conflict and c.lease == first.lease
    assert observe_lease(first.lease, b6, 100.0).lease.record == b6  # type: ignore[union-attr]
    # a retained record stale by more than a lease is void on arrival; a live one runs lease_s
    # from receipt whatever the holder's clock says (skew tolerance); our own uses our clock
    assert observe_lease(None, LeaderLease("b", 5, 90.0, LEASE, "sb"), 100.0).lease.deadline == 92.0  # type: ignore[union-attr]
    assert observe_lease(None, LeaderLease("b", 5, 99.5, LEASE, "sb"), 100.0).lease.deadline == 101.5  # type: ignore[union-attr]
    assert observe_lease(None, LeaderLease("b", 5, 130.0, LEASE, "sb"), 100.0).lease.deadline == 102.0  # type: ignore[union-attr]
    assert observe_lease(None, LeaderLease("a", 5, 101.0, LEASE, "sa"), 100.0, "a").lease.deadline == 101.0  # type: ignore[union-attr]


def test_accepts_command_fences_old_terms() -> None:
    cur = lease("a", term=5, session="sa")
    assert accepts_command(cur, "a", 5)
    assert not accepts_command(cur, "b", 5)
    assert not accepts_command(cur, "a", 4)
    assert accepts_command(cur, "b", 6)
    assert accepts_command(None, "b", 1)


# ---------------------------------------------------------------------------- simulation

_sessions = itertools.count()


@dataclass
class SimAgent:
    id: str
    score: float
    alive: bool = True
    skew: float = 0.0  # this device's clock minus true time
    session: str | None = None  # what the agent believes
    lease: ObservedLease | None = None
    presence: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    vacant_since: float | None = None
    conflict: bool = False
    last_publish_at: float | None = None
    inbox: deque[tuple[str, str, Any]] = field(default_factory=deque)
    prevote: bool = False
    heard_self_at: float = float("-inf")  # own clock time of the newest own status echoed back
    probe_at: float | None = None

    def snapshot(self, true_now: float) -> ElectionSnapshot:
        now = true_now + self.skew
        members = {i: s for i, s in self.scores.items() if self.presence.get(i)}
        offline = frozenset(i for i, on in self.presence.items() if not on)
        return ElectionSnapshot(
            self_id=self.id,
            session=self.session,
            now=now,
            lease=self.lease,
            members=members,
            offline=offline,
            vacant_since=self.vacant_since,
            conflict=self.conflict,
            last_publish_at=self.last_publish_at,
            lease_s=LEASE,
            stagger_s=LEASE / 2,
            heard_self_at=self.heard_self_at if self.prevote else None,
        )


class SimHome:
    def __init__(self, scores: list[float], skews: list[float] | None = None, prevote: bool = False) -> None:
        self.now = 1_000.0
        self.prevote = prevote
        skews = skews or [0.0] * len(scores)
        self.agents = [SimAgent(f"d{i}", s, alive=False, skew=k, prevote=prevote)
                       for i, (s, k) in enumerate(zip(scores, skews))]
        self.retained_at: float = 0.0
        self.connected: set[int] = set()  # connections the broker holds
        self.pending_lwt: set[int] = set()
        self.retained: dict[tuple[str, str], Any] = {}
        self.leaders_by_term: dict[int, set[str]] = {}
        self.published: list[tuple[str, str, Any]] = []

    # broker
    def publish(self, kind: str, key: str, value: Any) -> None:
        self.retained[(kind, key)] = value
        self.published.append((kind, key, value))
        if kind == "leader":
            self.retained_at = self.now
        for j in self.connected:
            self.agents[j].inbox.append((kind, key, value))

    def fire_lwt(self, i: int) -> None:
        if i in self.pending_lwt:
            self.pending_lwt.discard(i)
            self.publish("presence", self.agents[i].id, False)

    # agent life cycle
    def join(self, i: int) -> None:
        a = self.agents[i]
        if a.alive and i in self.connected:
            return
        self.fire_lwt(i)  # the broker drops the old connection before a takeover
        if not a.alive:
            self.agents[i] = a = SimAgent(a.id, a.score, skew=a.skew, prevote=a.prevote)  # remembers nothing
        a.session = f"s{next(_sessions)}"
        a.conflict = False
        a.inbox.clear()
        self.connected.add(i)
        for (kind, key), value in self.retained.items():
            a.inbox.append((kind, key, value))
        self.publish("profile", a.id, a.score)
        self.publish("presence", a.id, True)

    def leave(self, i: int) -> None:
        a = self.agents[i]
        if a.alive and i in self.connected:
            self.publish("presence", a.id, False)
            self.connected.discard(i)
        a.alive = False
        a.session = None

    def crash(self, i: int) -> None:
        a = self.agents[i]
        if a.alive and i in self.connected:
            self.connected.discard(i)
            self.pending_lwt.add(i)
        a.alive = False
        a.session = None

    def partition(self, i: int) -> None:
        """The broker loses the connection; the agent has not noticed yet."""
        if self.agents[i].alive and i in self.connected:
            self.connected.discard(i)
            self.agents[i].inbox.clear()
            self.pending_lwt.add(i)

    def notice(self, i: int) -> None:
        a = self.agents[i]
        if a.alive and i not in self.connected:
            a.session = None

    def deliver(self, i: int, n: int) -> None:
        a = self.agents[i]
        if not a.alive:
            return
        for _ in range(min(n, len(a.inbox))):
            kind, key, value = a.inbox.popleft()
            if kind == "presence":
                a.presence[key] = value
            elif kind == "profile":
                a.scores[key] = value
            elif kind == "status":
                if key == a.id and self.now + a.skew - value <= LEASE * FRESH_ECHO_FRACTION:
                    a.heard_self_at = max(a.heard_self_at, value)  # only a fresh echo counts
            else:
                obs = observe_lease(a.lease, value, self.now + a.skew, a.id)
                if obs.conflict and a.lease is not None and a.lease.record.session == a.session:
                    a.conflict = True
                if obs.accepted and (a.lease is None or obs.lease.record.term != a.lease.record.term):  # type: ignore[union-attr]
                    a.conflict = False
                a.lease = obs.lease
                self.check_safety()  # an agent may act on its role between any two messages

    def tick(self, i: int) -> None:
        a = self.agents[i]
        if not a.alive or a.session is None:
            return
        s = a.snapshot(self.now)
        a.vacant_since = next_vacant_since(s)
        action = decide(s)
        since = a.vacant_since
        if a.prevote and since is not None and vacant_by_silence(s) and a.heard_self_at < since and (
                a.probe_at is None or a.probe_at < since or s.now - a.probe_at >= LEASE / 6):
            a.probe_at = s.now  # the shell's status probe: its echo lets the claim go ahead
            if i in self.connected:
                self.publish("status", a.id, s.now)
        if isinstance(action, PublishLease):
            a.last_publish_at = s.now
            if i in self.connected:
                self.publish("leader", "", action.record)

    def check_safety(self) -> None:
        for a in self.agents:
            if a.alive and is_leader(a.snapshot(self.now)):
                assert a.lease is not None
                holders = self.leaders_by_term.setdefault(a.lease.record.term, set())
                holders.add(a.id)
                assert len(holders) == 1, f"two leaders in term {a.lease.record.term}: {holders}"

    def step(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "advance":
            self.now += ev[1]
            rec = self.retained.get(("leader", ""))
            if rec is not None and self.retained_at + rec.lease_s <= self.now:  # v5 message expiry
                del self.retained[("leader", "")]
        elif kind == "lwt":
            for i in sorted(self.pending_lwt):
                self.fire_lwt(i)
        elif kind == "deliver":
            self.deliver(ev[1], ev[2])
        elif kind == "tick_all":  # every agent decides at the same instant: claims race
            for i in range(len(self.agents)):
                self.tick(i)
                self.check_safety()
        else:
            getattr(self, kind)(ev[1])
        self.check_safety()

    def settle(self) -> list[str]:
        self.step(("lwt",))
        for i, a in enumerate(self.agents):
            if a.alive and i not in self.connected:
                self.step(("notice", i))
                self.step(("join", i))
        for _ in range(40):
            for i in range(len(self.agents)):
                self.step(("deliver", i, 10_000))
            for i in range(len(self.agents)):
                self.step(("tick", i))
            self.step(("advance", LEASE / 4))
        for i in range(len(self.agents)):
            self.step(("deliver", i, 10_000))
        live = [a for a in self.agents if a.alive]
        return [a.id for a in live if is_leader(a.snapshot(self.now))]


def events(n: int) -> st.SearchStrategy[tuple[Any, ...]]:
    idx = st.integers(0, n - 1)
    return st.one_of(
        st.tuples(st.sampled_from(["join", "tick", "tick", "tick"]), idx),
        st.tuples(st.sampled_from(["leave", "crash", "partition", "notice"]), idx),
        st.tuples(st.just("deliver"), idx, st.integers(1, 4)),
        st.tuples(st.just("deliver"), idx, st.integers(1, 4)),
        st.tuples(st.just("advance"), st.sampled_from([0.05, LEASE / 6, LEASE / 3, LEASE, 3 * LEASE])),
        st.tuples(st.just("lwt")),
        st.tuples(st.just("tick_all")),
    )


@st.composite
def homes(draw: st.DrawFn, skewed: bool = False) -> tuple[list[float], list[float], list[tuple[Any, ...]]]:
    n = draw(st.integers(1, 5))
    scores = draw(st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=n, max_size=n))
    # device clocks may disagree by up to half a lease (NTP-less boards)
    skews = [0.0] * n  # equal clocks make same-term claim races likely
    if skewed:
        skews = draw(st.lists(st.sampled_from([0.0, -LEASE / 2, LEASE / 3, 0.01]), min_size=n, max_size=n))
    joins = [("join", i) for i in draw(st.permutations(range(n)))]
    evs = draw(st.lists(events(n), max_size=80))
    # interleave the first joins with the rest so early agents race on partial views
    for j in joins:
        evs.insert(draw(st.integers(0, len(evs))), j)
    return scores, skews, evs


def test_racing_claims_of_one_term_resolve_to_the_first() -> None:
    sim = SimHome([1.0, 5.0])
    sim.step(("join", 0))
    sim.step(("deliver", 0, 10))  # d0 knows only itself
    sim.step(("join", 1))
    sim.step(("deliver", 1, 10))  # d1 knows both and outranks d0
    sim.step(("tick", 0))
    sim.step(("tick", 1))  # same instant, same known term: two claims of one term
    terms = [v.term for (k, _), v in sim.retained.items() if k == "leader"]
    assert len(terms) == 1
    sim.step(("deliver", 1, 10))
    sim.step(("deliver", 0, 10))
    assert [a.id for a in sim.agents if is_leader(a.snapshot(sim.now))] == ["d0"]
    assert sim.settle() == ["d0"]  # stability: the first claim keeps the lease, bumped


def _run_random_home(home: tuple[list[float], list[float], list[tuple[Any, ...]]], prevote: bool = False) -> None:
    scores, skews, evs = home
    sim = SimHome(scores, skews, prevote)
    for ev in evs:
        sim.step(ev)
    leaders = sim.settle()
    live = [a for a in sim.agents if a.alive]
    if not live:
        assert leaders == []
        return
    assert len(leaders) == 1, f"leaders after settling: {leaders}"
    for a in live:
        assert a.lease is not None and a.lease.record.id == leaders[0], "agents disagree on leader"


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(homes())
def test_random_homes_never_share_a_term_and_settle_to_one_leader(
    home: tuple[list[float], list[float], list[tuple[Any, ...]]],
) -> None:
    _run_random_home(home)


@settings(max_examples=200, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(homes(skewed=True))
def test_random_homes_with_clock_skew(
    home: tuple[list[float], list[float], list[tuple[Any, ...]]],
) -> None:
    """Device clocks off by up to half a lease: same guarantees."""
    _run_random_home(home)


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(homes(skewed=True))
def test_random_homes_with_prevote_keep_every_guarantee(
    home: tuple[list[float], list[float], list[tuple[Any, ...]]],
) -> None:
    """The pre-vote (claim only after hearing itself) keeps safety and still settles to one leader."""
    _run_random_home(home, prevote=True)


def _deaf_follower_home(prevote: bool) -> SimHome:
    """d1 leads; d0's link delivers nothing for two leases while d1 renews as usual."""
    sim = SimHome([1.0, 5.0], prevote=prevote)
    sim.step(("join", 0))
    sim.step(("join", 1))
    assert sim.settle() == ["d1"]
    for _ in range(24):  # 3 leases: d1 hears everything and renews, d0 hears nothing
        sim.step(("advance", LEASE / 8))
        sim.step(("deliver", 1, 10_000))
        sim.step(("tick", 1))
        sim.step(("tick", 0))
    return sim


def test_prevote_a_deaf_follower_does_not_depose_a_renewing_leader() -> None:
    """The chaos soak's degraded link: a device that stops hearing the leader's renewals must
    not claim the lease (its claim still gets through and the healthy leader steps down)."""
    before = _deaf_follower_home(prevote=False)  # without the pre-vote: the deaf device claims
    assert before.retained[("leader", "")].id == "d0"
    sim = _deaf_follower_home(prevote=True)
    assert sim.retained[("leader", "")].id == "d1", "the deaf follower claimed"
    assert sim.agents[0].probe_at is not None  # it asked, and is waiting for its own echo
    # its link recovers: the backlog (old renewals that look expired, old echoes of its probes)
    # arrives first — an old echo must not let it claim — then the fresh renewals
    while sim.agents[0].inbox:
        sim.step(("deliver", 0, 1))
        sim.step(("tick", 0))
        sim.step(("deliver", 1, 10_000))
        sim.step(("tick", 1))
    assert [v.id for k, _, v in sim.published if k == "leader"][-1] == "d1"
    assert not [v for k, _, v in sim.published if k == "leader" and v.id == "d0"]
    assert sim.settle() == ["d1"]


def test_prevote_costs_a_silently_dead_leader_one_round_trip() -> None:
    """A leader that stops renewing before the broker notices (no LWT yet): the followers' leases
    run out by silence, and the best of them claims one round trip (its own status) later."""
    sim = SimHome([1.0, 5.0, 3.0], prevote=True)
    for i in range(3):
        sim.step(("join", i))
    assert sim.settle() == ["d1"]
    sim.step(("crash", 1))
    sim.step(("advance", LEASE))
    for i in (0, 2):
        sim.step(("deliver", i, 100))
    claims_by = lambda who: [v for k, _, v in sim.published if k == "leader" and v.id == who]  # noqa: E731
    sim.step(("tick", 2))  # d2 sees the vacancy: no claim yet, a status probe instead
    assert claims_by("d2") == [] and sim.published[-1] == ("status", "d2", sim.now)
    sim.step(("advance", LEASE / 2))  # the dead d1 is still online (no LWT yet) and ranks first: one stagger
    sim.step(("tick", 2))
    assert claims_by("d2") == []  # its stagger is over, but it has not heard itself yet
    sim.step(("deliver", 2, 100))  # its own status comes back
    sim.step(("tick", 2))
    assert [c.id for c in claims_by("d2")] == ["d2"]
    assert sim.settle() == ["d2"]


@settings(max_examples=100, database=None, deadline=None)
@given(st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=1, max_size=5))
def test_quiet_start_elects_the_best_device(scores: list[float]) -> None:
    sim = SimHome(scores)
    for i in range(len(scores)):
        sim.step(("join", i))
    leaders = sim.settle()
    best = ranked_candidates({a.id: a.score for a in sim.agents})[0]
    assert leaders == [best]


def test_killing_the_leader_moves_leadership_within_a_lease() -> None:
    sim = SimHome([1.0, 5.0, 3.0])
    for i in range(3):
        sim.step(("join", i))
    assert sim.settle() == ["d1"]
    sim.step(("crash", 1))
    sim.step(("lwt",))
    t0 = sim.now
    while sim.now - t0 <= LEASE:
        for i in range(3):
            sim.step(("deliver", i, 100))
            sim.step(("tick", i))
        leaders = [a.id for a in sim.agents if a.alive and is_leader(a.snapshot(sim.now))]
        if leaders:
            break
        sim.step(("advance", 0.05))
    assert leaders == ["d2"]
    # the favourite rejoins: no preemption of a live lease
    sim.step(("join", 1))
    assert sim.settle() == ["d2"]


def test_restarted_agent_after_record_expiry_claims_a_new_term() -> None:
    sim = SimHome([5.0])
    sim.step(("join", 0))
    assert sim.settle() == ["d0"]
    old_term = sim.agents[0].lease.record.term  # type: ignore[union-attr]
    sim.step(("crash", 0))
    sim.step(("advance", 3 * LEASE))  # the retained record expires (v5); nobody remembers it
    assert ("leader", "") not in sim.retained
    sim.step(("join", 0))
    assert sim.settle() == ["d0"]
    assert sim.agents[0].lease.record.term > old_term  # type: ignore[union-attr]
