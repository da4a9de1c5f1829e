"""The certificate service's state in SQL: one publication per AoR, and the
subscriptions that follow them.

Both tables live in one database that every Kamailio worker, the timer process and
``e2m-proxy certs`` open on their own: an SQLite file by default (``[certs] path``,
created 0600 beside PROXY.toml, WAL, a short busy timeout), so the state outlives a
worker and a restart and is the same for all of them.  The SQL is what SQLite and
PostgreSQL both accept (``?`` placeholders become ``%s``; the DER column is ``BLOB``
or ``BYTEA``; ``ON CONFLICT``, ``RETURNING``); a PostgreSQL back end only has to supply
a connection and ``_write`` (a transaction holding a lock on the service's rows).

Subscriptions are rows rather than an htable because the service asks questions of
them that an htable cannot answer without a scan: all followers of an AoR, how many
one source holds, which are due for a NOTIFY or lapsed.  Writes are rare (one per
SUBSCRIBE or PUBLISH); the timer only reads unless something is due.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from e2m_plugins.certservice import Publication
from e2m_plugins.notifier import Peer, Subscription, may_act_in

from .sources import site_of

__all__ = ["CertDatabase", "CertTableError", "PublicationTable", "SubscriptionTable",
           "SubscriptionLimits", "SubscriptionRefused", "SubscriptionTaken", "Claim",
           "CHANGED", "UNCONFIRMED", "HELD", "FETCH", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2   # 2: cert_subscriptions.source_port (review 137 HB2)
_COMPONENT = "certs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cert_publications (
    aor           TEXT PRIMARY KEY,
    der           {blob} NOT NULL,
    fingerprint   TEXT NOT NULL,              -- sha256:<hex> of der
    not_before    DOUBLE PRECISION NOT NULL,  -- epoch seconds
    not_after     DOUBLE PRECISION NOT NULL,
    etag          TEXT NOT NULL,
    expires       DOUBLE PRECISION NOT NULL,  -- when the publication lapses
    published_by  TEXT NOT NULL,              -- the authenticated AoR
    published_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cert_publications_expires ON cert_publications (expires);
CREATE TABLE IF NOT EXISTS cert_subscriptions (
    call_id       TEXT NOT NULL,
    local_tag     TEXT NOT NULL,
    remote_tag    TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    aor           TEXT NOT NULL,
    local_uri     TEXT NOT NULL,
    remote_uri    TEXT NOT NULL,
    remote_target TEXT NOT NULL,
    route_set     TEXT NOT NULL,              -- JSON list of URIs, top first
    next_hop      TEXT NOT NULL,
    source        TEXT NOT NULL,              -- the subscriber's address
    contact       TEXT NOT NULL,
    expires       DOUBLE PRECISION NOT NULL,
    cseq          INTEGER NOT NULL,           -- of the last NOTIFY sent
    last_notify   DOUBLE PRECISION NOT NULL,  -- on probation (pending bit 2): the first
    pending       INTEGER NOT NULL,           -- bits: 1 changed since the last NOTIFY,
                                              -- 2 no NOTIFY of it answered 2xx yet,
                                              -- 4 its certificate held back until then,
                                              -- 8 a fetch kept only to deliver it
    source_port   INTEGER NOT NULL DEFAULT 0, -- of the opening SUBSCRIBE (0: not known)
    PRIMARY KEY (call_id, local_tag, remote_tag, event_id)
);
CREATE INDEX IF NOT EXISTS cert_subscriptions_aor ON cert_subscriptions (aor);
CREATE INDEX IF NOT EXISTS cert_subscriptions_source ON cert_subscriptions (source);
CREATE INDEX IF NOT EXISTS cert_subscriptions_expires ON cert_subscriptions (expires);
CREATE INDEX IF NOT EXISTS cert_subscriptions_pending ON cert_subscriptions (pending);
CREATE TABLE IF NOT EXISTS schema_version (
    component     TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    updated       DOUBLE PRECISION NOT NULL
);
"""

_PUBLICATION_COLUMNS = ("aor", "der", "fingerprint", "not_before", "not_after", "etag",
                        "expires", "published_by", "published_at")
_SUBSCRIPTION_COLUMNS = ("call_id", "local_tag", "remote_tag", "event_id", "aor",
                         "local_uri", "remote_uri", "remote_target", "route_set", "next_hop",
                         "source", "contact", "expires", "source_port")
_KEY = "call_id = ? AND local_tag = ? AND remote_tag = ? AND event_id = ?"
# what each schema version adds to the one before (a file or database made by an older
# e2m-proxy is brought up to date by ``upgrade_schema``)
_UPGRADES = {   # version: (the column it adds, the statement)
    2: ("source_port",
        "ALTER TABLE cert_subscriptions ADD COLUMN source_port INTEGER NOT NULL DEFAULT 0"),
}


class CertTableError(Exception):
    """The certificate database could not be opened, read or written."""


class SubscriptionRefused(Exception):
    """A new subscription would pass one of the bounds (the message says which)."""


class SubscriptionTaken(SubscriptionRefused):
    """A SUBSCRIBE names a subscription (Call-ID and tags) that another source made."""


CHANGED, UNCONFIRMED, HELD, FETCH = 1, 2, 4, 8    # the bits of a subscription's ``pending``
_KEPT = UNCONFIRMED | HELD | FETCH                # all but CHANGED: what a NOTIFY sent keeps
# A subscription lapsed this long ago is removed by any node of a cluster, not only by
# the one it was made at (which may be gone for good).
ORPHAN_GRACE = 600.0
EVICTABLE_AFTER = 1.0             # s: an unanswered NOTIFY this old frees its place


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 (never through a symlink), or check that the file there is
    a regular file of ours closed to others: it lists who follows whom."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        return
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise CertTableError(f"{path} must be a regular file of this user with mode 600")


class CertDatabase:
    """The service's SQLite file.  Each process connects on first use (a connection
    inherited across Kamailio's fork is never used); ``read()`` and ``write()`` give a
    cursor, ``write()`` inside one transaction that holds the write lock (nested calls
    join the outer one)."""

    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 500) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._depth = 0

    def __repr__(self) -> str:
        return f"CertDatabase({str(self.path)!r})"

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgres" else text

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            _private_file(self.path)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn, self._pid, self._depth = conn, os.getpid(), 0
            self.ensure_schema()
        except (OSError, sqlite3.Error) as exc:
            self._conn = None
            raise CertTableError(f"cannot open {self.path}: {exc}") from None
        except CertTableError:
            self._conn = None            # not used until its schema is one we know
            raise
        return conn

    def ensure_schema(self, *, unreachable_ok: bool = False) -> None:
        """The service's tables, brought up to ``SCHEMA_VERSION`` (``unreachable_ok`` is
        a shared database's: a file is always reachable, and an unusable one stops the
        start)."""
        with self.write() as cursor:
            for statement in _SCHEMA.format(blob="BLOB").split(";"):
                if statement.strip():
                    cursor.execute(statement)
            upgrade_schema(cursor, self.sql, self._columns(cursor))

    @staticmethod
    def _columns(cursor: Any) -> set[str]:
        return {row[1] for row in cursor.execute("PRAGMA table_info(cert_subscriptions)")}

    @contextmanager
    def read(self) -> Iterator[Any]:
        try:
            yield self._connect().cursor()
        except sqlite3.Error as exc:
            raise CertTableError(f"{self.path}: read failed: {exc}") from None

    @contextmanager
    def write(self) -> Iterator[Any]:
        conn = self._connect()
        if self._depth:                          # inside write(): one transaction
            self._depth += 1
            try:
                yield conn.cursor()
            finally:
                self._depth -= 1
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise CertTableError(f"{self.path}: busy: {exc}") from None
        self._depth = 1
        try:
            yield conn.cursor()
        except BaseException as exc:
            self._depth = 0
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise CertTableError(f"{self.path}: write failed: {exc}") from None
            raise
        self._depth = 0
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CertTableError(f"{self.path}: write failed: {exc}") from None

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class PublicationTable:
    """``e2m_plugins.certservice.PublicationStore`` on ``cert_publications``.
    ``locked()`` runs a whole decision (read, check the entity-tag, save) as one
    transaction, so two workers cannot both take the same SIP-If-Match."""

    def __init__(self, db: CertDatabase) -> None:
        self.db = db

    def locked(self) -> Any:
        return self.db.write()

    def current(self, aor: str) -> Publication | None:
        with self.db.read() as cursor:
            row = cursor.execute(self.db.sql(
                f"SELECT {', '.join(_PUBLICATION_COLUMNS)} FROM cert_publications "
                "WHERE aor = ?"), (aor,)).fetchone()
        return _publication(row) if row is not None else None

    def save(self, publication: Publication) -> None:
        p = publication
        updates = ", ".join(f"{c} = excluded.{c}" for c in _PUBLICATION_COLUMNS[1:])
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(
                f"INSERT INTO cert_publications ({', '.join(_PUBLICATION_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_PUBLICATION_COLUMNS))}) "
                f"ON CONFLICT (aor) DO UPDATE SET {updates}"),
                (p.aor, p.der, p.fingerprint, p.not_before, p.not_after, p.etag, p.expires,
                 p.published_by, p.published_at))

    def remove(self, aor: str) -> bool:
        with self.db.write() as cursor:
            cursor.execute(self.db.sql("DELETE FROM cert_publications WHERE aor = ?"), (aor,))
            return cursor.rowcount > 0

    def all(self) -> list[Publication]:
        with self.db.read() as cursor:
            rows = cursor.execute(f"SELECT {', '.join(_PUBLICATION_COLUMNS)} FROM "
                                  "cert_publications ORDER BY aor").fetchall()
        return [_publication(row) for row in rows]

    def lapsed(self, now: float, limit: int) -> list[str]:
        """The AoRs of at most ``limit`` publications whose time is up."""
        with self.db.read() as cursor:
            rows = cursor.execute(self.db.sql("SELECT aor FROM cert_publications WHERE "
                                              "expires <= ? ORDER BY expires LIMIT ?"),
                                  (now, int(limit))).fetchall()
        return [row[0] for row in rows]

    def remove_lapsed(self, aor: str, now: float) -> bool:
        """Remove ``aor``'s publication if it is still the lapsed one (a new PUBLISH
        may have come in meanwhile)."""
        with self.db.write() as cursor:
            cursor.execute(self.db.sql("DELETE FROM cert_publications WHERE aor = ? AND "
                                       "expires <= ?"), (aor, now))
            return cursor.rowcount > 0


def _publication(row: Any) -> Publication:
    values = dict(zip(_PUBLICATION_COLUMNS, row))
    values["der"] = bytes(values["der"])
    return Publication(**values)


@dataclass(frozen=True)
class SubscriptionLimits:
    """How many subscriptions there may be: per AoR, per source address, in all."""

    per_aor: int = 100
    per_source: int = 20
    per_site: int = 100        # an IPv6 site's addresses together (SITE_SHARES of them)
    total: int = 10000


def subscription_source(address: str) -> str:
    """What a subscription's source is kept as: an IPv4 address as it is, an IPv6 one
    as ``"<its site> <itself>"`` (``sources.site_of``), counted by both."""
    site = site_of(address)
    return address if site == address else f"{site} {address}"


def source_site(source: str) -> str:
    """The site part of a kept source (``subscription_source``)."""
    return source.split(" ", 1)[0]


class Claim(tuple):
    """``(subscription, cseq)`` of a claimed NOTIFY, and whether a NOTIFY of that
    subscription was ever answered 2xx (``confirmed``)."""

    confirmed: bool

    def __new__(cls, sub: Subscription, cseq: int, pending: int) -> "Claim":
        claim = super().__new__(cls, (sub, cseq))
        claim.confirmed = not pending & UNCONFIRMED
        return claim


def upgrade_schema(cursor: Any, sql: Any, columns: set[str]) -> int:
    """Inside the transaction that made the tables (``CREATE ... IF NOT EXISTS``, so a
    table an older e2m-proxy made is left as it was): the steps of ``_UPGRADES`` its
    ``schema_version`` row has not had, then the row at ``SCHEMA_VERSION``.
    ``columns``: the subscriptions table's now (a freshly made table has every one).
    The version found (0: none, the tables new)."""
    row = cursor.execute(sql("SELECT version FROM schema_version WHERE component = ?"),
                         (_COMPONENT,)).fetchone()
    found = int(row[0]) if row is not None else 0
    if found > SCHEMA_VERSION:
        raise CertTableError(f"certificate tables at schema version {found}, newer than "
                             f"this e2m-proxy knows ({SCHEMA_VERSION}): upgrade e2m-proxy")
    if found == SCHEMA_VERSION:
        return found
    for version, (column, statement) in sorted(_UPGRADES.items()):
        if found < version and column not in columns:
            cursor.execute(statement)
    cursor.execute(sql("DELETE FROM schema_version WHERE component = ?"), (_COMPONENT,))
    cursor.execute(sql("INSERT INTO schema_version (component, version, updated) "
                       "VALUES (?, ?, ?)"), (_COMPONENT, SCHEMA_VERSION, time.time()))
    return found


class SubscriptionTable:
    """The accepted subscriptions.  A row's ``pending`` has these bits: CHANGED, its
    AoR's certificate changed since its last NOTIFY (the timer claims due rows,
    ``claim_due``, by clearing it, so two claimers never send the same NOTIFY); and
    UNCONFIRMED, none of its NOTIFYs was answered 2xx yet.  A subscription made over
    UDP may come from a forged address: until its subscriber answers, it is on
    probation and dropped once its NOTIFY went unanswered (``drop_unanswered``), so
    forged SUBSCRIBEs cannot hold a source's places under the bounds; HELD, its
    certificate went unsent (too large for UDP) until the subscriber answers, and
    FETCH, a fetch kept only for that (``confirm`` releases both).  On probation,
    ``last_notify`` stays the time of the first NOTIFY: a forger's refreshes (it can
    work out tm's To tag) do not prolong it."""

    def __init__(self, db: CertDatabase) -> None:
        self.db = db

    @staticmethod
    def _values(sub: Subscription) -> tuple[Any, ...]:
        return (sub.call_id, sub.local_tag, sub.remote_tag, sub.event_id, sub.aor,
                sub.local_uri, sub.remote_uri, sub.remote_target, json.dumps(sub.route_set),
                sub.next_hop, sub.source, sub.contact, sub.expires, sub.source_port)

    def add(self, sub: Subscription, limits: SubscriptionLimits, now: float,
            flags: int = 0, *, opened_by: Peer | None = None) -> int:
        """Keep ``sub``; the CSeq of the NOTIFY it gets now (its first one counts as
        sent now).  A SUBSCRIBE outside a dialog that names a subscription we have
        (the same Call-ID and tags) renews it and goes on with its CSeqs only when it
        is a copy of the one that made it (the same source address, AoR, URIs, route
        set and next hop: a retransmission whose 200 was lost); anything else is
        ``SubscriptionTaken`` (sl's To tag is a function of the Via and Call-ID: a
        SUBSCRIBE replayed from elsewhere, or written with a Via chosen to collide,
        names the same dialog, and would move its NOTIFYs or swap its AoR; reviews 26,
        142), and so is a new Event id in a dialog made from another source.
        ``SubscriptionRefused`` when it would pass a bound, and then nothing is kept.
        ``flags``: HELD (its first NOTIFY goes without the certificate), FETCH.
        ``opened_by``: where the SUBSCRIBE came from (the host always says): one that
        names a dialog we hold (a copy, or a new Event id in it) is taken only from
        where that dialog's requests may come (``notifier.may_act_in``; review 152 K2,
        K3: a copy set the expiry, and a new Event id's 481 ended the dialog, from
        ports whose unsubscribe was 481).
        The source is kept as what it is counted by (``subscription_source``): an IPv6
        address holds ``per_source`` places, and its site, which one line gets whole,
        ``per_site`` (three addresses of one /64 held 49 of 50 places, review 122;
        counted by the /64 alone, two phones on one LAN shared 20, review 123)."""
        sub = replace(sub, source=subscription_source(sub.source))
        columns = (*_SUBSCRIPTION_COLUMNS, "cseq", "last_notify", "pending")
        # a copy renews what it repeats; never the opening port, which a version 1 row
        # does not know and a copy from another port would then give away (review 151 K2)
        renew = ", ".join(f"{c} = excluded.{c}" for c in _SUBSCRIPTION_COLUMNS[4:]
                          if c != "source_port")
        with self.db.write() as cursor:
            # every subscription of one dialog (any Event id) is from one source: a forger
            # who made a dialog from his own address and answers its NOTIFYs must not add
            # rows to it from someone else's (his answer confirms the whole dialog)
            known = [_subscription(row) for row in cursor.execute(self.db.sql(
                f"SELECT {', '.join(_SUBSCRIPTION_COLUMNS)} FROM cert_subscriptions "
                "WHERE call_id = ? AND local_tag = ? AND remote_tag = ?"),
                _key(sub)[:3]).fetchall()]
            if any(row.source != sub.source for row in known):
                raise SubscriptionTaken("that dialog's subscription was made from another "
                                        "address")
            if opened_by is not None and not all(may_act_in(row, opened_by) for row in known):
                raise SubscriptionTaken("that dialog's requests come from another port or "
                                        "transport")
            same = [row for row in known if row.event_id == sub.event_id]
            if not same:
                self._check_bounds(cursor, sub, limits, now)
            elif self._values(same[0])[4:12] != self._values(sub)[4:12] or \
                    same[0].source_port not in (0, sub.source_port):  # 0: a row from version 1
                # only a copy of the SUBSCRIBE that made it renews it: the To tag is
                # sl's checksum of the Via and Call-ID, which a forger who knows the
                # dialog's ids can make collide with a Via of his own (review 142)
                raise SubscriptionTaken("a first SUBSCRIBE naming a subscription we hold "
                                        "is not a copy of the one that made it")
            row = cursor.execute(self.db.sql(
                f"INSERT INTO cert_subscriptions ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))}) "
                "ON CONFLICT (call_id, local_tag, remote_tag, event_id) DO UPDATE SET "
                f"{renew}, cseq = cert_subscriptions.cseq + 1, last_notify = CASE WHEN "
                f"(cert_subscriptions.pending & {UNCONFIRMED}) = {UNCONFIRMED} THEN "
                "cert_subscriptions.last_notify ELSE excluded.last_notify END, "
                f"pending = (cert_subscriptions.pending & {_KEPT}) | {int(flags)} "
                "RETURNING cseq"),
                (*self._values(sub), 1, now, UNCONFIRMED | flags)).fetchone()
        return int(row[0])

    def _check_bounds(self, cursor: Any, sub: Subscription, limits: SubscriptionLimits,
                      now: float) -> None:
        """At a full bound, the oldest subscription in its scope whose NOTIFY has gone
        unanswered for EVICTABLE_AFTER makes room (forged ones would otherwise hold
        the place until the timer drops them); else ``SubscriptionRefused``."""
        site = source_site(sub.source)
        scopes = [("source address", "source = ?", (sub.source,), limits.per_source),
                  ("AoR", "aor = ?", (sub.aor,), limits.per_aor),
                  ("proxy", None, (), limits.total)]
        if site != sub.source:      # an IPv6 source: its site too (and that site's own rows)
            scopes.insert(1, ("site", "(source = ? OR source LIKE ?)",
                              (site, site + " %"), limits.per_site))
        for name, condition, args, bound in scopes:
            where = f"WHERE {condition}" if condition else ""
            found = cursor.execute(self.db.sql(
                f"SELECT count(*) FROM cert_subscriptions {where}"), args).fetchone()
            if found[0] < bound:
                continue
            scope = f"{condition} AND " if condition else ""
            cursor.execute(self.db.sql(
                "DELETE FROM cert_subscriptions WHERE (call_id, local_tag, remote_tag, "
                "event_id) IN (SELECT call_id, local_tag, remote_tag, event_id FROM "
                f"cert_subscriptions WHERE {scope}(pending & {UNCONFIRMED}) = {UNCONFIRMED} AND "
                "last_notify < ? ORDER BY last_notify LIMIT 1)"),
                (*args, now - EVICTABLE_AFTER))
            if cursor.rowcount < 1 or found[0] > bound:
                raise SubscriptionRefused(f"{bound} subscriptions per {name} at most")

    def get(self, call_id: str, local_tag: str, remote_tag: str,
            event_id: str) -> Subscription | None:
        with self.db.read() as cursor:
            row = cursor.execute(self.db.sql(
                f"SELECT {', '.join(_SUBSCRIPTION_COLUMNS)} FROM cert_subscriptions "
                f"WHERE {_KEY}"), (call_id, local_tag, remote_tag, event_id)).fetchone()
        return _subscription(row) if row is not None else None

    def refreshed(self, sub: Subscription, now: float) -> int | None:
        """Store ``sub``'s new expiry, target and next hop (a refresh over a new
        connection: ``notifier.refresh_dialog``), and claim its next NOTIFY (sent now:
        RFC 6665 wants one after every accepted SUBSCRIBE); its CSeq, or None when the
        subscription is gone.  A refresh confirms nothing: only an answered NOTIFY does
        (whoever forged the SUBSCRIBE can forge its refresh)."""
        with self.db.write() as cursor:
            row = cursor.execute(self.db.sql(
                "UPDATE cert_subscriptions SET expires = ?, remote_target = ?, next_hop = ?, "
                f"cseq = cseq + 1, last_notify = CASE WHEN (pending & {UNCONFIRMED}) = "
                f"{UNCONFIRMED} THEN last_notify ELSE ? END, pending = pending & {_KEPT} "
                f"WHERE {_KEY} RETURNING cseq"),
                (sub.expires, sub.remote_target, sub.next_hop, now, *_key(sub))).fetchone()
        return int(row[0]) if row is not None else None

    def remove(self, sub: Subscription) -> int | None:
        """Forget ``sub``; the CSeq for its last NOTIFY, or None when it was gone."""
        with self.db.write() as cursor:
            row = cursor.execute(self.db.sql(
                f"DELETE FROM cert_subscriptions WHERE {_KEY} RETURNING cseq"),
                _key(sub)).fetchone()
        return int(row[0]) + 1 if row is not None else None

    def confirm(self, call_id: str, local_tag: str, remote_tag: str, now: float = 0.0) -> int:
        """A NOTIFY of this dialog was answered 2xx: its subscriber is where the
        SUBSCRIBE said (read first: most answers find nothing to change).  A held
        certificate is now owed: a subscription's at once (CHANGED, no interval), a
        fetch's in its final NOTIFY (it lapses ``now``)."""
        where = "call_id = ? AND local_tag = ? AND remote_tag = ?"
        args = (call_id, local_tag, remote_tag)
        with self.db.read() as cursor:
            found = cursor.execute(self.db.sql(
                f"SELECT 1 FROM cert_subscriptions WHERE {where} AND (pending & "
                f"{UNCONFIRMED + HELD}) != 0"), args).fetchone()
        if found is None:
            return 0
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(
                "UPDATE cert_subscriptions SET "
                f"pending = (pending & {CHANGED}) | CASE WHEN (pending & {HELD + FETCH}) = "
                f"{HELD} THEN {CHANGED} ELSE 0 END, "
                f"last_notify = CASE WHEN (pending & {HELD}) = {HELD} THEN 0 ELSE last_notify "
                f"END, expires = CASE WHEN (pending & {FETCH}) = {FETCH} THEN ? ELSE expires END "
                f"WHERE {where} AND (pending & {UNCONFIRMED + HELD}) != 0"), (now, *args))
            return cursor.rowcount

    def owe(self, sub: Subscription, *, due_at: float, interval: float) -> None:
        """``sub``'s NOTIFY could not go: owed again (CHANGED), due from ``due_at`` under
        ``claim_due``'s ``interval`` (its place among the others kept by that time).
        Only a confirmed subscription's: one on probation is timed by its first NOTIFY."""
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(
                f"UPDATE cert_subscriptions SET pending = pending | {CHANGED}, "
                f"last_notify = ? WHERE {_KEY} AND (pending & {UNCONFIRMED}) = 0"),
                (due_at - interval, *_key(sub)))

    def hold(self, sub: Subscription) -> None:
        """``sub``'s last NOTIFY went without its certificate (too large for UDP before
        the subscriber answered): send it when the subscriber answers."""
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(f"UPDATE cert_subscriptions SET pending = pending | "
                                       f"{HELD} WHERE {_KEY}"), _key(sub))

    def flags(self, sub: Subscription) -> int | None:
        """``sub``'s pending bits (None: gone)."""
        with self.db.read() as cursor:
            row = cursor.execute(self.db.sql(
                f"SELECT pending FROM cert_subscriptions WHERE {_KEY}"), _key(sub)).fetchone()
        return int(row[0]) if row is not None else None

    def drop_unanswered(self, before: float, limit: int) -> int:
        """Drop up to ``limit`` subscriptions none of whose NOTIFYs was answered 2xx,
        the first one sent before ``before`` (its transaction is over: RFC 6665 §4.2.2,
        a NOTIFY that times out ends the subscription).  No NOTIFY: nobody answered."""
        with self.db.read() as cursor:       # every second: take the write lock only if needed
            if cursor.execute(self.db.sql(
                    "SELECT 1 FROM cert_subscriptions WHERE (pending & "
                    f"{UNCONFIRMED}) = {UNCONFIRMED} AND last_notify < ? LIMIT 1"),
                    (before,)).fetchone() is None:
                return 0
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(
                "DELETE FROM cert_subscriptions WHERE (call_id, local_tag, remote_tag, "
                "event_id) IN (SELECT call_id, local_tag, remote_tag, event_id FROM "
                f"cert_subscriptions WHERE (pending & {UNCONFIRMED}) = {UNCONFIRMED} AND "
                "last_notify < ? "
                "ORDER BY last_notify LIMIT ?)"), (before, int(limit)))
            return cursor.rowcount

    def forget_dialog(self, call_id: str, local_tag: str, remote_tag: str) -> int:
        """Drop the subscriptions of one dialog (its subscriber answered 481)."""
        with self.db.write() as cursor:
            cursor.execute(self.db.sql("DELETE FROM cert_subscriptions WHERE call_id = ? AND "
                                       "local_tag = ? AND remote_tag = ?"),
                           (call_id, local_tag, remote_tag))
            return cursor.rowcount

    def changed(self, aor: str) -> int:
        """``aor``'s certificate changed: every follower is owed a NOTIFY."""
        with self.db.write() as cursor:
            cursor.execute(self.db.sql(f"UPDATE cert_subscriptions SET pending = pending | "
                                       f"{CHANGED} WHERE aor = ?"), (aor,))
            return cursor.rowcount

    def claim_due(self, now: float, interval: float, limit: int,
                  contacts: Collection[str] | None = None) -> list[tuple[Subscription, int]]:
        """Up to ``limit`` subscriptions owed a NOTIFY whose last one is at least
        ``interval`` old, each with the CSeq of the NOTIFY it gets now.  ``contacts``:
        only those made at one of these Contacts (a cluster node's own sockets: a
        subscriber takes NOTIFYs from where it subscribed, review 123 HB4); None: any."""
        mine, mine_args = _made_at(contacts)
        with self.db.read() as cursor:
            keys = cursor.execute(self.db.sql(
                "SELECT call_id, local_tag, remote_tag, event_id FROM cert_subscriptions "
                f"WHERE (pending & {CHANGED}) = {CHANGED} AND last_notify <= ? AND expires > ? "
                f"{mine} "
                "ORDER BY last_notify LIMIT ?"),     # the longest waiting first: fair under a flood
                (now - interval, now, *mine_args, int(limit))).fetchall()
        claimed = []
        for key in keys:
            with self.db.write() as cursor:
                row = cursor.execute(self.db.sql(
                    f"UPDATE cert_subscriptions SET pending = pending & {_KEPT}, "
                    f"last_notify = CASE WHEN (pending & {UNCONFIRMED}) = {UNCONFIRMED} "
                    "THEN last_notify "
                    f"ELSE ? END, cseq = cseq + 1 WHERE {_KEY} AND "
                    f"(pending & {CHANGED}) = {CHANGED} "
                    f"RETURNING cseq, pending, {', '.join(_SUBSCRIPTION_COLUMNS)}"),
                    (now, *key)).fetchone()
            if row is not None:
                claimed.append(Claim(_subscription(row[2:]), int(row[0]), int(row[1])))
        return claimed

    def claim_lapsed(self, now: float, limit: int,
                     contacts: Collection[str] | None = None) -> list[tuple[Subscription, int]]:
        """Remove up to ``limit`` subscriptions whose time is up; each with the CSeq of
        its final NOTIFY.  ``contacts`` as for ``claim_due``, but a subscription lapsed
        ``ORPHAN_GRACE`` ago is anyone's (its node may be gone for good: the row goes,
        and its final NOTIFY from elsewhere tells the subscriber what its clock did)."""
        mine, mine_args = _made_at(contacts)
        if mine:
            mine = f"AND ({mine[4:]} OR expires <= ?)"
            mine_args = (*mine_args, now - ORPHAN_GRACE)
        with self.db.read() as cursor:
            keys = cursor.execute(self.db.sql(
                "SELECT call_id, local_tag, remote_tag, event_id FROM cert_subscriptions "
                f"WHERE expires <= ? {mine} ORDER BY expires LIMIT ?"),
                (now, *mine_args, int(limit))).fetchall()
        claimed = []
        for key in keys:
            with self.db.write() as cursor:
                row = cursor.execute(self.db.sql(
                    f"DELETE FROM cert_subscriptions WHERE {_KEY} AND expires <= ? "
                    f"RETURNING cseq, pending, {', '.join(_SUBSCRIPTION_COLUMNS)}"),
                    (*key, now)).fetchone()
            if row is not None:
                claimed.append(Claim(_subscription(row[2:]), int(row[0]) + 1, int(row[1])))
        return claimed

    def count(self, aor: str | None = None) -> int:
        where, args = ("WHERE aor = ?", (aor,)) if aor else ("", ())
        with self.db.read() as cursor:
            return int(cursor.execute(self.db.sql(
                f"SELECT count(*) FROM cert_subscriptions {where}"), args).fetchone()[0])


def _made_at(contacts: Collection[str] | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause (``AND contact IN (...)``) and its arguments for subscriptions
    made at one of ``contacts``; nothing for None.  No contact at all matches nothing."""
    if contacts is None:
        return "", ()
    chosen = tuple(sorted(contacts))
    if not chosen:
        return "AND 1 = 0", ()
    return f"AND contact IN ({', '.join('?' * len(chosen))})", chosen


def _key(sub: Subscription) -> tuple[str, str, str, str]:
    return (sub.call_id, sub.local_tag, sub.remote_tag, sub.event_id)


def _subscription(row: Any) -> Subscription:
    values = dict(zip(_SUBSCRIPTION_COLUMNS, row))
    values["route_set"] = tuple(json.loads(values["route_set"]))
    return Subscription(**values)
