"""A cluster's replay check that two nodes cannot both pass: a claim in the shared
PostgreSQL.

Each node keeps its replay records in its htable (``replay_htable``), and DMQ carries
them to the other nodes a moment later.  A copy of a signed request sent to two nodes
at once reached each before the other's record did, and both relayed it (review 37).
So a node that found no record of its own also claims the record's name in the
``replay_claims`` table (archive schema 4): an insert only the first node wins, an
expired claim taken over in the same statement.  A node that loses refuses the
message as a replay.

While the database cannot be asked (away, frozen), the check is the node's own
table, as before.  The first worker whose claim fails sets the node's flag (``$shv``,
shared memory: ``KsrAwayFlag``) and logs it; no worker asks the database again until
the timer process (``ClaimedReplayCache.tend``, every 2 s) has probed it and cleared
the flag, so an outage costs at most one timeout per worker, not one per message
(review 38: a per-worker rest of 1 s ended before a 2 s timeout did).  Each request
decided so is counted (``e2m_replay_claims_unavailable``).

An early dialog's fork slots (``admit_fork``) are claimed the same way, each free slot
by its item's name before the node takes it, so answers with new To tags sent to two
nodes at once get ``MAX_FORKS`` dialogs in all, not at each node (review 39).

The same timer deletes expired claims, in batches until none is left.  A claim holds
the record's name (a digest of the signed context) and its expiry, nothing of the
message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from e2m_plugins.errors import ReplayError
from e2m_plugins.sipcontext import SipContext

from .pgconn import PgUrl, ProcessConnection
from .replay_htable import HtableReplayCache

__all__ = ["PgReplayClaims", "ClaimedReplayCache", "ClaimsUnavailable", "CLAIMS_COUNTER",
           "AwayFlag", "KsrAwayFlag", "replay_claims"]

CLAIMS_COUNTER = "e2m_replay_claims_unavailable"   # declared in the cfg template

_CLAIM = ("INSERT INTO replay_claims (name, expires) VALUES (%s, %s) "
          "ON CONFLICT (name) DO UPDATE SET expires = EXCLUDED.expires "
          "WHERE replay_claims.expires < %s RETURNING 1")
_SWEEP = ("DELETE FROM replay_claims WHERE name IN (SELECT name FROM replay_claims "
          "WHERE expires < %s LIMIT %s)")
# a write, as a claim is: a database that reads but cannot write (a standby after a
# failover, a role without INSERT) keeps the flag up rather than make it flap.
# The name is no digest (those are hex), so it never stands for a record.
_PROBE = ("INSERT INTO replay_claims (name, expires) VALUES ('~probe', %s) "
          "ON CONFLICT (name) DO UPDATE SET expires = EXCLUDED.expires")
_SWEEP_BATCH = 10000
_REFUSED_EVERY_S = 60.0
SHARED_FLAG = "e2m_claims_away"        # $shv, declared in the cfg template (shvset)


class ClaimsUnavailable(Exception):
    """The database could not be asked; the node's own table decides.  ``permanent``:
    it answered but refuses the statement (no such table, no privilege), which waiting
    does not mend."""

    def __init__(self, what: str, *, permanent: bool = False) -> None:
        super().__init__(what)
        self.permanent = permanent


class ReplayClaims(Protocol):
    def claim(self, name: str, ttl: int) -> bool: ...
    def probe(self) -> None: ...
    def sweep(self, budget_s: float = 1.0) -> int: ...


class AwayFlag:
    """Whether the node's workers leave the claims' database alone: one process's own
    (tools, tests); ``KsrAwayFlag`` is the node's."""

    def __init__(self) -> None:
        self.away = False

    def is_set(self) -> bool:
        return self.away

    def set(self, away: bool) -> None:
        self.away = away


class KsrAwayFlag(AwayFlag):
    """The flag in Kamailio's shared memory (``$shv``), read by every worker."""

    def __init__(self, ksr: Any, name: str = SHARED_FLAG) -> None:
        super().__init__()
        self._ksr, self._pv = ksr, f"$shv({name})"

    def is_set(self) -> bool:
        return bool(self._ksr.pv.get(self._pv))

    def set(self, away: bool) -> None:
        self._ksr.pv.seti(self._pv, 1 if away else 0)


class PgReplayClaims:
    """Claims in ``[cluster] db_url``'s ``replay_claims``; safe across ``fork``."""

    def __init__(self, url: PgUrl, *, connect_timeout: int = 2, statement_timeout_ms: int = 2000,
                 clock: Callable[[], float] = time.time) -> None:
        import psycopg
        self._db = ProcessConnection(url, connect_timeout=connect_timeout,
                                     statement_timeout_ms=statement_timeout_ms)
        self._errors = (psycopg.Error,)
        # refusals waiting does not mend: no table, no privilege, a read-only standby
        self._refusals = (psycopg.ProgrammingError, psycopg.errors.ReadOnlySqlTransaction)
        self._clock = clock

    def claim(self, name: str, ttl: int) -> bool:
        """True when this node now holds ``name`` for ``ttl`` seconds; False when another
        claim of it is still live.  ``ClaimsUnavailable`` when the database cannot say."""
        now = self._clock()
        try:
            row = self._db.get().execute(_CLAIM, (name, now + ttl, now)).fetchone()
        except self._errors as exc:
            raise self._unavailable(exc) from None
        return row is not None

    def probe(self) -> None:
        """Ask the database something cheap; ``ClaimsUnavailable`` when it cannot say."""
        try:
            self._db.get().execute(_PROBE, (self._clock(),))
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def sweep(self, budget_s: float = 1.0) -> int:
        """Delete the expired claims, in batches (each its own short statement) until
        one comes back short or ``budget_s`` is spent (review 38: one batch of 10,000
        per 30 s fell behind 400 claims a second); how many went."""
        deadline = time.monotonic() + budget_s
        gone = 0
        try:
            while True:
                done = self._db.get().execute(_SWEEP, (self._clock(), _SWEEP_BATCH)).rowcount
                gone += done
                if done < _SWEEP_BATCH or time.monotonic() >= deadline:
                    return gone
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> ClaimsUnavailable:
        self._db.drop()
        return ClaimsUnavailable(type(exc).__name__, permanent=isinstance(exc, self._refusals))


class ClaimedReplayCache:
    """The node's ``HtableReplayCache`` first (a replay it knows is refused at once, with
    no database round trip), then the cluster's claim on what it does not know."""

    def __init__(self, local: HtableReplayCache, claims: ReplayClaims, *,
                 away: AwayFlag | None = None, events: Any = None) -> None:
        self.local = local
        self.claims = claims
        self.away = away if away is not None else AwayFlag()
        self.events = events
        self._refused_logged = float("-inf")     # the timer's last error line (monotonic)

    @property
    def window(self) -> float:
        return self.local.window

    def check_and_record(self, context: SipContext, branch: str | None, *,
                         retransmissions: bool, to_tag: str | None = None) -> None:
        self.local.check_and_record(context, branch, retransmissions=retransmissions,
                                    to_tag=to_tag)
        if self.away.is_set():
            self._count()
            return
        name, ttl = self.local.entry(context, to_tag, time.time())
        try:
            claimed = self.claims.claim(name, ttl)
        except ClaimsUnavailable as exc:
            self._went_away(exc)
            return
        if not claimed:
            raise ReplayError("the body of this message was seen at another node")

    def tend(self) -> None:
        """The timer's turn (a process of its own, every 2 s): while the flag is up,
        probe the database and take the flag down when it answers; else delete the
        expired claims."""
        try:
            if self.away.is_set():
                self.claims.probe()
                self.away.set(False)
                self._log("info", "e2m: replay claims in the shared database work again")
            else:
                self.claims.sweep()
        except ClaimsUnavailable as exc:
            # still away: the workers keep to the node's table.  A database that refuses
            # the claims (a schema without them) is the operator's to mend: said as an
            # error once a minute, not once at the first claim (review 40)
            now = time.monotonic()
            if exc.permanent and now - self._refused_logged >= _REFUSED_EVERY_S:
                self._refused_logged = now
                self._log("error", f"e2m: replay claims refused by the shared database ({exc}): "
                                 "run e2m-proxy db upgrade; until then this node's own replay "
                                 "table decides")

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True, shared: bool = True) -> int | None:
        """The node's slots, each free one claimed in the database before it is taken:
        answers sent to two nodes at once no longer get the fork limit at each (review
        39).  A tag already holding a slot here is found with reads alone.  Not
        ``shared``: the node's own slots alone (review 46: a stranger's unsigned 2xx into
        an early dialog nobody keyed wrote a row per datagram)."""
        return self.local.admit_fork(early, tag, limit, made=made, claim=claim,
                                     take=self._claim_slot if shared else None)

    def _claim_slot(self, name: str, ttl: int) -> bool:
        if self.away.is_set():
            self._count()
            return True
        try:
            return self.claims.claim(name, ttl)
        except ClaimsUnavailable as exc:
            self._went_away(exc)
            return True

    def _went_away(self, exc: ClaimsUnavailable) -> None:
        self.away.set(True)
        self._count()
        self._log("warn", f"e2m: replay claims unavailable ({exc}): this node's own "
                          "replay table decides until the shared database answers")

    def _count(self) -> None:
        if self.events is not None:
            self.events.count(CLAIMS_COUNTER)

    def _log(self, level: str, line: str) -> None:
        if self.events is not None:
            self.events.log(level, line)


def replay_claims(cluster: Any) -> PgReplayClaims:
    """The claims of ``[cluster]``'s database, with its bounds on every wait."""
    return PgReplayClaims(cluster.db, connect_timeout=cluster.connect_timeout,
                          statement_timeout_ms=cluster.statement_timeout_ms)
