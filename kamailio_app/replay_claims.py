"""A cluster's replay check that two nodes cannot both pass: a claim in the shared
PostgreSQL.

Each node keeps its replay records in its htable (``replay_htable``), and DMQ carries
them to the other nodes a moment later.  A copy of a signed request sent to two nodes
at once reached each before the other's record did, and both relayed it (review 37).
So a node that found no record of its own also claims the record's name in the
``replay_claims`` table (archive schema 4): an insert only the first node wins, an
expired claim taken over in the same statement.  A node that loses refuses the
message as a replay.

While the database cannot be asked (away, too slow), the check is the node's own
table, as before; each worker then leaves the database alone for ``retry_after``
seconds, so an outage costs one timeout per worker, not one per message.  That is
counted (``e2m_replay_claims_unavailable``) and logged once per outage per worker.
Expired claims are deleted by the replay timer (``sweep``).  A claim holds the
record's name (a digest of the signed context) and its expiry, nothing of the message.
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
           "replay_claims"]

CLAIMS_COUNTER = "e2m_replay_claims_unavailable"   # declared in the cfg template

_CLAIM = ("INSERT INTO replay_claims (name, expires) VALUES (%s, %s) "
          "ON CONFLICT (name) DO UPDATE SET expires = EXCLUDED.expires "
          "WHERE replay_claims.expires < %s RETURNING 1")
_SWEEP = ("DELETE FROM replay_claims WHERE name IN (SELECT name FROM replay_claims "
          "WHERE expires < %s LIMIT %s)")


class ClaimsUnavailable(Exception):
    """The database could not be asked; the node's own table decides."""


class ReplayClaims(Protocol):
    def claim(self, name: str, ttl: int) -> bool: ...


class PgReplayClaims:
    """Claims in ``[cluster] db_url``'s ``replay_claims``; safe across ``fork``."""

    def __init__(self, url: PgUrl, *, connect_timeout: int = 2, statement_timeout_ms: int = 2000,
                 clock: Callable[[], float] = time.time) -> None:
        import psycopg
        self._db = ProcessConnection(url, connect_timeout=connect_timeout,
                                     statement_timeout_ms=statement_timeout_ms)
        self._errors = (psycopg.Error,)
        self._clock = clock

    def claim(self, name: str, ttl: int) -> bool:
        """True when this node now holds ``name`` for ``ttl`` seconds; False when another
        claim of it is still live.  ``ClaimsUnavailable`` when the database cannot say."""
        now = self._clock()
        try:
            row = self._db.get().execute(_CLAIM, (name, now + ttl, now)).fetchone()
        except self._errors as exc:
            self._db.drop()
            raise ClaimsUnavailable(f"{type(exc).__name__}") from None
        return row is not None

    def sweep(self, limit: int = 10000) -> int:
        """Delete up to ``limit`` expired claims; how many went."""
        try:
            return self._db.get().execute(_SWEEP, (self._clock(), limit)).rowcount
        except self._errors as exc:
            self._db.drop()
            raise ClaimsUnavailable(f"{type(exc).__name__}") from None


class ClaimedReplayCache:
    """The node's ``HtableReplayCache`` first (a replay it knows is refused at once, with
    no database round trip), then the cluster's claim on what it does not know."""

    def __init__(self, local: HtableReplayCache, claims: ReplayClaims, *,
                 retry_after: float = 1.0, events: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.local = local
        self.claims = claims
        self.retry_after = retry_after
        self.events = events
        self._clock = clock
        self._rest_until = 0.0
        self._away = False

    @property
    def window(self) -> float:
        return self.local.window

    def check_and_record(self, context: SipContext, branch: str | None, *,
                         retransmissions: bool, to_tag: str | None = None) -> None:
        self.local.check_and_record(context, branch, retransmissions=retransmissions,
                                    to_tag=to_tag)
        now = self._clock()
        if now < self._rest_until:
            self._unavailable(None)
            return
        name, ttl = self.local.entry(context, to_tag, time.time())
        try:
            claimed = self.claims.claim(name, ttl)
        except ClaimsUnavailable as exc:
            self._rest_until = now + self.retry_after
            self._unavailable(str(exc))
            return
        if self._away:
            self._away = False
            self._log("info", "e2m: replay claims in the shared database work again")
        if not claimed:
            raise ReplayError("the body of this message was seen at another node")

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True) -> int | None:
        return self.local.admit_fork(early, tag, limit, made=made, claim=claim)

    def _unavailable(self, why: str | None) -> None:
        if self.events is not None:
            self.events.count(CLAIMS_COUNTER)
        if why is not None and not self._away:
            self._away = True
            self._log("warn", f"e2m: replay claims unavailable ({why}): this node's own "
                              "replay table decides until the shared database answers")

    def _log(self, level: str, line: str) -> None:
        if self.events is not None:
            self.events.log(level, line)


def replay_claims(cluster: Any) -> PgReplayClaims:
    """The claims of ``[cluster]``'s database, with its bounds on every wait."""
    return PgReplayClaims(cluster.db, connect_timeout=cluster.connect_timeout,
                          statement_timeout_ms=cluster.statement_timeout_ms)
