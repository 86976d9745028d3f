"""Leader election as pure functions over a snapshot: `decide(snapshot) -> action`.

The agent's MQTT shell (cluster/agent.py) gathers the snapshot — its clock, its connection session,
the lease it follows, the membership view — and carries out the action (publish a lease record
on the retained `P/leader` topic). Nothing here does I/O, so the property tests in
tests/test_cluster_election.py run thousands of simulated homes in seconds.

Rules (docs/API.md repeats them for implementers of other agents):

* The lease record `{id, term, expires_at, lease_s, session}` is retained on `P/leader`
  (with MQTT v5 message expiry = lease_s where the broker offers v5).
* Accepting records (`observe_lease`): a record with an older term is ignored; within one term
  the *first* record an agent sees wins and later claims of the same term by another holder are
  ignored (the broker delivers one topic's messages in the same order to every subscriber, so
  all subscribed agents agree who was first). A higher term always wins.
* Deadlines: the holder's own lease ends at its `expires_at` (its clock); followers void it
  `lease_s` after they received it (so clock skew cannot cut a live lease short), or at
  `expires_at + lease_s` for stale retained records. The holder therefore always steps down
  before any follower considers the lease vacant.
* An agent is leader only while the lease it follows is its own record *from its current
  connection session*, echoed back by the broker, and unexpired by its clock. So a leader that
  loses the broker steps down at once, and one that reconnects must claim a new term.
* The holder renews when a third of the lease has passed. If it sees a competing claim of its
  own term it re-claims at term + 1 at once, so every agent converges on one record.
* The lease is vacant when there is no record, it expired (followers bound expiry by both
  `expires_at` and receive time + lease_s), or its holder's presence is `offline` (LWT).
* Claimed terms are max(known term + 1, unix time in ms), so terms keep growing even for an
  agent that restarted or found the retained record gone (v5 message expiry).
* On a vacancy the candidates are the online members ranked first by whether they hold the
  model files themselves (a leader without them would have to stream every weight), then by
  capability score, highest first, ties broken by the smaller id. A device that is loading
  model weights does not claim (it could not serve yet); a leader that is loading keeps renewing. The candidate ranked k claims after the lease has been
  vacant for k × stagger_s (so a dead-but-not-yet-offline favourite cannot block the election).
* Stability: a live lease is never preempted, not even by a higher-score device that joins.
  Leadership moves only when the lease becomes vacant.
* Pre-vote (hearing itself): a lease that ran out because its renewals stopped arriving may be
  this device's own deafness — a degraded link that delivers nothing for a lease while the
  leader renews as usual. So after such a vacancy (not an `offline` holder, not our own old
  session: those are news the broker sent, not silence) a candidate claims only once the broker
  has echoed back one of its own status messages published at or after the vacancy began, and
  echoed it fresh (within `FRESH_ECHO_FRACTION` of a lease; `heard_self_at >= vacant_since`): the
  broker sends one connection's messages in order, so a device that hears its own message fresh
  has heard every renewal the leader sent before it — a late echo in a recovering link's backlog
  proves nothing, the renewals before it arrive late too and look expired. The shell publishes a
  status at once when it sees such a vacancy: a real one costs a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detransformer_edge.protocol.messages import LeaderLease

RENEW_FRACTION = 1.0 / 3.0  # renew after a third of the lease: two renewals may be lost
RETRY_FRACTION = 1.0 / 6.0  # re-publish an unanswered claim/renewal after this part of a lease


@dataclass(frozen=True)
class ObservedLease:
    """The lease record an agent follows, with its local deadline."""

    record: LeaderLease
    deadline: float  # local time after which the lease is void


@dataclass(frozen=True)
class LeaseObservation:
    lease: ObservedLease | None  # the lease to follow after this record
    accepted: bool  # the record replaced or renewed the followed lease
    conflict: bool  # a different holder claimed the followed lease's term (ignored)


def observe_lease(
    current: ObservedLease | None, record: LeaderLease, received_at: float, self_id: str = ""
) -> LeaseObservation:
    """Fold one received lease record into the followed lease (see module rules).

    Deadlines: our own record ends at its `expires_at` (our clock). Another holder's record ends
    `lease_s` after we received it, so clock skew between devices cannot shorten a live lease;
    `expires_at` only voids records stale by more than one extra lease (a retained record of a
    holder that died long ago), which tolerates up to `lease_s` of skew."""
    if record.id == self_id:
        deadline = record.expires_at
    else:
        deadline = min(received_at + record.lease_s, record.expires_at + record.lease_s)
    new = ObservedLease(record, deadline)
    if current is None or record.term > current.record.term:
        return LeaseObservation(new, True, False)
    if record.term < current.record.term:
        return LeaseObservation(current, False, False)
    same_holder = record.id == current.record.id and record.session == current.record.session
    if same_holder:
        return LeaseObservation(new, True, False)
    return LeaseObservation(current, False, True)


def accepts_command(lease: ObservedLease | None, leader_id: str, term: int) -> bool:
    """Should a follower act on a leader command (assignment, plan) stamped (leader_id, term)?

    Older terms are fenced off; the current term only from the holder; a newer term is accepted
    (its lease record may simply not have arrived yet)."""
    if lease is None:
        return True
    if term != lease.record.term:
        return term > lease.record.term
    return leader_id == lease.record.id


@dataclass(frozen=True)
class ElectionSnapshot:
    """Everything `decide` needs, gathered by the shell at one instant."""

    self_id: str
    session: str | None  # current MQTT connection session; None while disconnected
    now: float  # unix time
    lease: ObservedLease | None
    members: Mapping[str, float]  # online device id -> capability score (self included)
    offline: frozenset[str]  # ids whose presence is explicitly `offline`
    vacant_since: float | None  # when this agent first saw the current vacancy
    conflict: bool  # a competing claim of our own term was seen while we held the lease
    last_publish_at: float | None  # when this agent last published a lease record
    lease_s: float
    stagger_s: float  # delay per rank before a lower-ranked candidate claims
    preferred: frozenset[str] = frozenset()  # members holding the model files: ranked first
    loading: bool = False  # this agent is loading model weights: it does not claim a vacant lease
    # pre-vote: this agent's clock time in its newest own status the broker echoed back; None =
    # not tracked (no pre-vote, as in the pure simulations)
    heard_self_at: float | None = None


@dataclass(frozen=True)
class Hold:
    """Nothing to publish."""


@dataclass(frozen=True)
class PublishLease:
    """Publish this record retained on `P/leader` (a claim, renewal or term bump)."""

    record: LeaderLease
    reason: str  # "claim" | "renew" | "bump"


Action = Hold | PublishLease


def is_leader(s: ElectionSnapshot) -> bool:
    """Leader = following our own record of this session, unexpired, while connected."""
    if s.session is None or s.lease is None:
        return False
    r = s.lease.record
    return r.id == s.self_id and r.session == s.session and s.now < s.lease.deadline


def is_vacant(s: ElectionSnapshot) -> bool:
    if s.lease is None or s.now >= s.lease.deadline:
        return True
    r = s.lease.record
    if r.id in s.offline:
        return True
    # our own record from an earlier connection: that session is dead, whatever others think
    return r.id == s.self_id and r.session != s.session


def ranked_candidates(members: Mapping[str, float], offline: frozenset[str] = frozenset(),
                      preferred: frozenset[str] = frozenset()) -> list[str]:
    """Online members, best first: holders of the model files, then the highest score, ties by the
    smaller id."""
    return sorted((m for m in members if m not in offline), key=lambda m: (m not in preferred, -members[m], m))


def next_vacant_since(s: ElectionSnapshot) -> float | None:
    """The shell's bookkeeping: start of the current vacancy, None while a lease is live."""
    if not is_vacant(s):
        return None
    return s.vacant_since if s.vacant_since is not None else s.now


HEARD_SELF_SLACK_S = 0.002  # status timestamps are rounded to the millisecond
FRESH_ECHO_FRACTION = 1.0 / 4.0  # an own message back within this part of a lease is fresh


def vacant_by_silence(s: ElectionSnapshot) -> bool:
    """The followed lease is vacant only because no renewal arrived here in time."""
    if s.lease is None or s.now < s.lease.deadline:
        return False
    holder = s.lease.record.id
    return holder != s.self_id and holder not in s.offline


def hears_itself_since_vacancy(s: ElectionSnapshot) -> bool:
    """Pre-vote: after a vacancy by silence, the broker has echoed one of our own messages sent
    at or after the vacancy began (always true for other vacancies, or when not tracked)."""
    if s.heard_self_at is None or not vacant_by_silence(s):
        return True
    return s.vacant_since is not None and s.heard_self_at + HEARD_SELF_SLACK_S >= s.vacant_since


def _retry_due(s: ElectionSnapshot) -> bool:
    return s.last_publish_at is None or s.now - s.last_publish_at >= s.lease_s * RETRY_FRACTION


def decide(s: ElectionSnapshot) -> Action:
    """What this agent should publish now. Pure; see the module docstring for the rules."""
    if s.session is None:
        return Hold()
    if is_leader(s):
        assert s.lease is not None
        r = s.lease.record
        if s.conflict:
            return PublishLease(_record(s, r.term + 1), "bump")
        renew_at = r.expires_at - r.lease_s * (1.0 - RENEW_FRACTION)
        if s.now >= renew_at and _retry_due(s):
            return PublishLease(_record(s, r.term), "renew")
        return Hold()
    if not is_vacant(s) or not _retry_due(s) or s.loading:
        return Hold()
    ranked = ranked_candidates(s.members, s.offline, s.preferred)
    if s.self_id not in ranked:
        return Hold()
    vacant_for = s.now - (s.vacant_since if s.vacant_since is not None else s.now)
    if vacant_for < ranked.index(s.self_id) * s.stagger_s:
        return Hold()
    if not hears_itself_since_vacancy(s):
        return Hold()
    known = s.lease.record.term if s.lease is not None else 0
    # terms are a hybrid clock (>= unix ms): an agent that restarted, or found the retained
    # record already expired (v5 message expiry), still claims a term above any earlier one
    return PublishLease(_record(s, max(known + 1, int(s.now * 1000))), "claim")


def _record(s: ElectionSnapshot, term: int) -> LeaderLease:
    assert s.session is not None
    return LeaderLease(
        id=s.self_id, term=term, expires_at=s.now + s.lease_s, lease_s=s.lease_s, session=s.session
    )
