"""The core's ``KeyCache`` on a Kamailio ``htable``: one CEK store for every worker.

Kamailio runs one Python interpreter per worker process, so a CEK kept while one
worker handled the INVITE must be found by whichever worker handles the 200 OK or
the re-INVITE.  The htable lives in shared memory and is visible to all of them.

Two layers, so the logic can be tested without Kamailio:

* ``KsrHtable``: the few KSR calls (set with a per-item expiry, get, remove,
  iterate, slot lock).  Nothing else touches KSR.
* ``HtableKeyCache``: the ``KeyCache`` protocol on any such backend, using the
  core's ``scope_key`` / ``encode_scope_keys`` / ``decode_scope_keys``.

One record per scope: every key kept for a dialog (or a transaction) lives in one
htable item named ``scope_key(scope)``, sealed as a whole.  A BYE removes its
dialog's records by name (no index to read, no scan of the table), a put is one
read and one write under the record's slot lock, and a lookup one read.  A record
holds at most ``max_per_scope`` keys (``keycache.scope_victim`` says which goes).
No lock is ever held across two names, which rules out two workers each holding
one slot and waiting for the other's.

A kept key is never replaced (the core's rule, see ``e2m_plugins.keycache``): ``put``
reads the record under its slot lock and keeps a live key that is there.

Bounds: every record has its own expiry (its latest key's: the htable drops it even if
nobody asks), capped at ``max_ttl`` and by the table's ``autoexpire``; uses are clamped
to ``MAX_DECRYPTS_CAP``; and a sweep every ``sweep_every`` puts removes expired and
corrupt keys and records and, over ``max_entries`` keys, the oldest ones (short-lived
ones first: ``keycache.short_lived``).  Values contain CEKs: they are never logged,
and the htable is never dumped by this code.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from e2m_plugins.errors import LimitExceededError, MalformedError
from e2m_plugins.keycache import (DIALOG_TTL, MAX_DECRYPTS_CAP, MAX_TTL, TRANSACTION_TTL,
                                  CacheLimits, CachedKey, DialogScope, Scope,
                                  decode_scope_keys, encode_scope_keys, over_quota, scope_key,
                                  scope_victim, short_lived_key)

from .htable_items import put_expiring

__all__ = ["HtableBackend", "KsrHtable", "HtableKeyCache"]

_UNREAD = object()     # KsrHtable: no value read under the lock yet
Kept = list[tuple[CachedKey, str]]    # one record's keys, each with the node that kept it
_OPENED_RECORDS = 4    # a dialog's scope and its early ones, and one more


class HtableBackend(Protocol):
    """The htable operations the cache needs; ``KsrHtable`` is the real one."""

    def set(self, key: str, value: str, ttl: int) -> None: ...
    def get(self, key: str) -> str | None: ...
    def remove(self, key: str) -> None: ...
    def items(self) -> list[tuple[str, str]]: ...
    def lock(self, key: str) -> None: ...
    def unlock(self, key: str) -> None: ...


class KsrHtable:
    """``HtableBackend`` over ``KSR.htable`` for table ``table`` (declared in the cfg)."""

    _ITERATOR = "e2mkc"

    def __init__(self, ksr: Any, table: str) -> None:
        self._ksr = ksr
        self.table = table
        # names whose slot lock we hold -> what sht_get last gave for them under it
        # (``_UNREAD``: nothing yet): a write needs the value it writes over, and the
        # cache always read it under the lock just before (one KSR call saved a write)
        self._held: dict[str, Any] = {}

    def set(self, key: str, value: str, ttl: int) -> None:
        # the item gets its own expiry, shorter than the table's autoexpire; written
        # under the record's lock, so the value read first is the one written over
        previous = self._held.get(key, _UNREAD)
        if previous is _UNREAD:
            previous = self._ksr.htable.sht_get(self.table, key)
        if put_expiring(self._ksr, self.table, key, value, int(ttl), previous) < 0:
            raise LimitExceededError("key cache: htable write failed (shared memory full?)")
        if key in self._held:
            self._held[key] = value

    def get(self, key: str) -> str | None:
        value = self._ksr.htable.sht_get(self.table, key)
        if key in self._held:
            self._held[key] = value
        return value if isinstance(value, str) else None

    def remove(self, key: str) -> None:
        self._ksr.htable.sht_rm(self.table, key)
        if key in self._held:
            self._held[key] = None

    def items(self) -> list[tuple[str, str]]:
        # The iterator holds a slot lock: collect first, act after it ends.
        out: list[tuple[str, str]] = []
        htable, pv = self._ksr.htable, self._ksr.pv
        if htable.sht_iterator_start(self._ITERATOR, self.table) < 0:
            return out
        try:
            while htable.sht_iterator_next(self._ITERATOR) > 0:
                key = pv.get(f"$shtitkey({self._ITERATOR})")
                value = pv.get(f"$shtitval({self._ITERATOR})")
                if isinstance(key, str) and isinstance(value, str):
                    out.append((key, value))
        finally:
            htable.sht_iterator_end(self._ITERATOR)
        return out

    def lock(self, key: str) -> None:
        self._ksr.htable.sht_lock(self.table, key)
        self._held[key] = _UNREAD

    def unlock(self, key: str) -> None:
        self._held.pop(key, None)
        self._ksr.htable.sht_unlock(self.table, key)


class HtableKeyCache:
    """A ``KeyCache`` whose keys live in a shared htable, one sealed record per scope.

    ``clock`` must be wall-clock epoch seconds (the default): records are read by
    other processes, which have no common monotonic clock.
    """

    def __init__(self, backend: HtableBackend, *, max_entries: int = 10_000,
                 default_ttl: float = DIALOG_TTL, transaction_ttl: float = TRANSACTION_TTL,
                 max_ttl: float = MAX_TTL, max_decrypts_cap: int | None = MAX_DECRYPTS_CAP,
                 max_per_keeper: int | None = None, sweep_every: int | None = None,
                 clock: Callable[[], float] = time.time,
                 seal_key: bytes | None = None, origin: str = "",
                 count: Callable[[str, int], None] | None = None,
                 refused: Callable[[str], None] | None = None,
                 gone: Callable[[Scope], None] | None = None) -> None:
        self._limits = CacheLimits(max_entries, default_ttl, transaction_ttl, max_ttl,
                                   max_decrypts_cap, max_per_keeper)
        self._backend = backend
        # A sweep reads every record through KSR: run it every tenth of the bound
        # (per worker), so its cost per put stays about ten reads however large the
        # table is, and the bound is soft by at most that many keys per worker.
        self._sweep_every = max(1, sweep_every if sweep_every is not None
                                else max(64, max_entries // 10))
        self._clock = clock
        self._puts = 0
        # Records are sealed with a key made here, before Kamailio forks: every
        # worker has it, and nothing outside this process tree does.  Kamailio
        # logs KSR call arguments at debug level; a sealed record shows no CEK.
        # A cluster passes ``seal_key``, the same on every node (records replicated
        # by DMQ open on each of them, and on nothing else); ``origin`` names this
        # node beside each key it keeps, so a key kept by another one counts as such.
        self._seal_key = AESGCM(seal_key if seal_key is not None
                                else AESGCM.generate_key(bit_length=128))
        self._origin = origin
        self._count = count or (lambda _name, _n: None)
        self._refused = refused or (lambda _key: None)
        # told of each scope whose record went (what a dialog kept beside its keys
        # goes with them: kamailio_app/dialog_targets.py); it may be called with this
        # table's slot lock held, so it must not lock anything in this table
        self._gone = gone or (lambda _scope: None)
        # The records opened last (name -> value, keys): a lookup and the use counted
        # after it read the same value, which then opens once, and a message's many
        # kekri looked up in its scope and the early ones open each record once.  The
        # value is the whole sealed text, so an equal one opens to the same keys.
        self._opened: OrderedDict[str, tuple[str, Kept]] = OrderedDict()

    def __repr__(self) -> str:
        return f"HtableKeyCache(max_entries={self._limits.max_entries})"

    # -- KeyCache ----------------------------------------------------------------
    def put(self, scope: Scope, reference: bytes, cek: bytes, *, ttl: float | None = None,
            max_decrypts: int | None = None, cipher: str | None = None,
            keeper: str | None = None) -> CachedKey:
        now = self._clock()
        entry = self._limits.new_entry(scope, reference, cek, now, ttl=ttl,
                                       max_decrypts=max_decrypts, cipher=cipher, keeper=keeper)
        name = scope_key(scope)
        # Read-check-write under the slot lock: two workers keeping keys of one scope
        # at once must not both write.
        self._backend.lock(name)
        try:
            kept = self._live_keys(name, scope, now)
            for held, _ in kept:
                if held.reference == entry.reference:
                    return held              # never overwritten, never refreshed
            if len(kept) >= self._limits.max_per_scope:
                victim = scope_victim([held for held, _ in kept], entry.keeper)
                if victim is None:
                    return entry    # every holder has one key: the newcomer's is not kept
                kept = [row for row in kept if row[0] is not victim]
            self._write(name, kept + [(entry, self._origin)], now)
        finally:
            self._backend.unlock(name)
        self._count("e2m_ceks_kept", 1)
        self._puts += 1
        if self._puts % self._sweep_every == 0:
            self.sweep()
        return entry

    def _live_keys(self, name: str, scope: Scope, now: float) -> Kept:
        """The live keys of the record ``name`` (lock held); none if it does not open
        (refused: a put then writes over it, what was there could not be used anyway)."""
        raw = self._backend.get(name)
        if raw is None:
            return []
        try:
            kept = self._unseal(name, raw, scope)
        except MalformedError:
            self._refused(name)
            return []
        live = [row for row in kept if now < row[0].expires]
        if len(live) != len(kept):
            self._count("e2m_ceks_expired", len(kept) - len(live))
        return live

    def _write(self, name: str, kept: Kept, now: float, scope: Scope | None = None) -> None:
        """Store ``kept`` as the record ``name`` (lock held), living as long as its
        latest key; no key left: the record of ``scope`` goes (``gone``)."""
        if not kept:
            self._backend.remove(name)
            if scope is not None:
                self._gone(scope)
            return
        life = max(entry.expires for entry, _ in kept) - now
        self._backend.set(name, self._seal(name, kept), max(1, math.ceil(life)))

    def get(self, scope: Scope, reference: bytes, *, count: bool = True) -> CachedKey | None:
        name = scope_key(scope)
        reference = bytes(reference)
        if not count:
            raw = self._backend.get(name)
            if raw is None:
                return None   # nothing kept: a miss needs no lock (the kekri answer tries two scopes)
            # Only a look (the proxy spends the use once the message passed its checks):
            # one read and no lock, nothing written.
            try:
                kept = self._unseal(name, raw, scope)
            except MalformedError:
                self._refuse_if_unchanged(name, raw)
                return None
            now = self._clock()
            return next((entry for entry, _ in kept
                         if entry.reference == reference and now < entry.expires), None)
        # Counting a use is read-modify-write: another worker may be doing the same.
        # (The proxy counts a key its lookup just found: no unlocked look first.)
        self._backend.lock(name)
        try:
            raw = self._backend.get(name)
            if raw is None:
                return None
            try:
                kept = self._unseal(name, raw, scope)
            except MalformedError:
                self._refused(name)        # never used, and gone (_refuse_if_unchanged)
                self._backend.remove(name)
                return None
            now = self._clock()
            live = [row for row in kept if now < row[0].expires]
            expired = len(kept) - len(live)
            if expired:
                self._count("e2m_ceks_expired", expired)
            found = next((row for row in live if row[0].reference == reference), None)
            if found is None:
                if expired:
                    self._write(name, live, now, scope)
                return None
            entry, origin = found
            if origin != self._origin:
                self._count("e2m_ceks_replicated", 1)
            if entry.max_decrypts is None:
                if expired:
                    self._write(name, live, now, scope)
                return entry
            spent = replace(entry, max_decrypts=entry.max_decrypts - 1)
            rest = [row for row in live if row is not found]
            if spent.max_decrypts > 0:      # else this is the last permitted use
                rest.append((spent, origin))                     # still the keeper's
            self._write(name, rest, now, scope)
            return spent
        finally:
            self._backend.unlock(name)

    def _refuse_if_unchanged(self, name: str, raw: str) -> bool:
        """A record that does not open (forged, corrupt, or sealed by someone without
        our key, such as a rogue DMQ peer) is never used, and goes: under the lock, and
        only if it is still the one read (a put may have just written a good one)."""
        self._backend.lock(name)
        try:
            if self._backend.get(name) != raw:
                return False
            self._refused(name)
            self._backend.remove(name)
            return True
        finally:
            self._backend.unlock(name)

    def drop(self, scope: Scope, reference: bytes) -> None:
        self._drop_references(scope, [bytes(reference)])

    def expire_within(self, scope: Scope, reference: bytes, seconds: float) -> None:
        name = scope_key(scope)
        reference = bytes(reference)
        if self._backend.get(name) is None:
            return
        self._backend.lock(name)
        try:
            now = self._clock()
            kept = self._live_keys(name, scope, now)
            limit = now + max(0.0, seconds)
            cut = [(replace(entry, expires=min(entry.expires, limit))
                    if entry.reference == reference else entry, origin)
                   for entry, origin in kept]
            if cut != kept:
                self._write(name, cut, now, scope)
        finally:
            self._backend.unlock(name)

    def _drop_references(self, scope: Scope, references: list[bytes]) -> None:
        name = scope_key(scope)
        self._backend.lock(name)
        try:
            now = self._clock()
            kept = self._live_keys(name, scope, now)
            rest = [row for row in kept if row[0].reference not in references]
            if len(rest) != len(kept) or not kept:
                self._write(name, rest, now, scope)
        finally:
            self._backend.unlock(name)

    def holds_scope(self, scope: Scope) -> bool:
        """Whether ``scope``'s record is there (it lives as long as its latest key:
        ``_write``); not unsealed, so cheap in a reply route."""
        return self._backend.get(scope_key(scope)) is not None

    def scope_life(self, scope: Scope) -> float | None:
        """Seconds until the last live key of ``scope``'s record expires (when the table
        itself takes the record, telling no ``gone``); None when none is kept.  What is
        kept beside a dialog's keys lives no longer (dialog_targets.py, review 104)."""
        name = scope_key(scope)
        raw = self._backend.get(name)
        if raw is None:
            return None
        try:
            kept = self._unseal(name, raw, scope)
        except MalformedError:
            return None
        now = self._clock()
        latest = max((entry.expires for entry, _ in kept if now < entry.expires), default=None)
        return None if latest is None else latest - now

    def drop_scope(self, scope: Scope) -> None:
        """Every key of ``scope``, its record removed by name under its slot lock (a put
        in another worker that read the record first would otherwise write it all
        back); then, of a dialog's early scopes, only the names its record held
        (``KeyCache.drop_scope``).  A record that is not there needs no lock: a put
        racing that keeps only its own key, as it would have a moment later."""
        name = scope_key(scope)
        if self._backend.get(name) is None:
            return
        self._backend.lock(name)
        try:
            held = [row[0].reference for row in self._live_keys(name, scope, self._clock())]
            self._backend.remove(name)
        finally:
            self._backend.unlock(name)
        self._gone(scope)
        for early in (scope.early_scopes() if isinstance(scope, DialogScope) else ()):
            if held and self._backend.get(scope_key(early)) is not None:
                self._drop_references(early, held)

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _ in self._live(now))

    # -- sealing -----------------------------------------------------------------
    def _seal(self, name: str, kept: Kept) -> str:
        nonce = os.urandom(12)
        plain = encode_scope_keys(kept[0][0].scope, kept).encode()
        sealed = self._seal_key.encrypt(nonce, plain, name.encode())
        value = base64.b64encode(nonce + sealed).decode("ascii")
        self._remember(name, value, kept)
        return value

    def _remember(self, name: str, raw: str, kept: Kept) -> None:
        self._opened[name] = (raw, kept)
        self._opened.move_to_end(name)
        while len(self._opened) > _OPENED_RECORDS:
            self._opened.popitem(last=False)

    def _unseal(self, name: str, raw: str, scope: Scope | None = None) -> Kept:
        """The keys sealed under ``name`` (the name is bound in: a record copied to
        another name does not open), each with the node that kept it; ``scope``, when
        given, must be the one the record says."""
        opened = self._opened.get(name)
        if opened is not None and opened[0] == raw:
            kept = opened[1]
        else:
            try:
                data = base64.b64decode(raw, validate=True)
                plain = self._seal_key.decrypt(data[:12], data[12:], name.encode()).decode()
            except (ValueError, binascii.Error, InvalidTag):     # UnicodeDecodeError: ValueError
                raise MalformedError("key cache record does not open") from None
            own, kept = decode_scope_keys(plain)
            if scope_key(own) != name:
                raise MalformedError("key cache record names another scope")
            self._remember(name, raw, kept)
        if scope is not None and kept and kept[0][0].scope != scope:
            raise MalformedError("key cache record names another scope")
        return kept

    # -- housekeeping ------------------------------------------------------------
    def _records(self, now: float) -> Iterator[tuple[str, str, Kept | None]]:
        """Every item of the table: (name, value, its keys), keys None for an item that
        is not one of our records or does not open."""
        for name, raw in self._backend.items():
            try:
                yield name, raw, self._unseal(name, raw)
            except MalformedError:
                yield name, raw, None

    def _live(self, now: float) -> Iterator[tuple[str, CachedKey]]:
        for name, _, kept in self._records(now):
            for entry, _ in kept or ():
                if now < entry.expires:
                    yield name, entry

    def sweep(self) -> int:
        """Drop expired keys, records that do not open, each keeper's keys past its
        quota and (over ``max_entries``) the oldest; returns how many keys and
        unreadable items went."""
        now = self._clock()
        live: list[tuple[bool, float, str]] = []   # (kept long, created, record + key)
        keepers: list[tuple[str | None, bool, float, str]] = []
        gone: dict[str, set[str]] = {}          # record -> its keys to drop (b64 refs)
        scopes: dict[str, Scope] = {}           # record -> the scope it said it held
        dead = 0
        for name, raw, kept in self._records(now):
            if kept is None:                 # not ours, an old format, or forged
                dead += self._refuse_if_unchanged(name, raw)
                continue
            long_lived = not short_lived_key(name)
            if kept:
                scopes[name] = kept[0][0].scope
            for entry, _ in kept:
                label = name + entry.reference.hex()
                if now >= entry.expires:
                    gone.setdefault(name, set()).add(label)
                    self._count("e2m_ceks_expired", 1)
                else:
                    live.append((long_lived, entry.created, label))
                    keepers.append((entry.keeper, *live[-1]))
        # One keeper's keys past its quota go first: its own, not anyone else's.
        excess = set(over_quota(keepers, self._limits.keeper_quota))
        if excess:
            live = [row for row in live if row[2] not in excess]
        if len(live) > self._limits.max_entries:
            # short-lived keys (transactions, early dialogs) go first, then the oldest:
            # one user's new requests cannot push out the keys of calls under way
            live.sort()
            excess.update(label for _, _, label in live[:len(live) - self._limits.max_entries])
        for label in excess:
            gone.setdefault(label[:label.rindex("/") + 1], set()).add(label)
        for name, labels in gone.items():
            dead += self._drop_labels(name, labels, now, scopes.get(name))
        return dead

    def _drop_labels(self, name: str, labels: set[str], now: float,
                     scope: Scope | None) -> int:
        """Remove the keys ``labels`` names from record ``name`` (of ``scope``, as the
        sweep read it), re-read under its lock (a worker may have changed it since the
        sweep read it; the table's own expiry may have taken it: ``gone`` all the same)."""
        self._backend.lock(name)
        try:
            raw = self._backend.get(name)
            if raw is None:
                if scope is not None:
                    self._gone(scope)
                return 0
            try:
                kept = self._unseal(name, raw)
            except MalformedError:
                return 0
            rest = [row for row in kept if name + row[0].reference.hex() not in labels
                    and now < row[0].expires]
            self._write(name, rest, now, kept[0][0].scope if kept else None)
            return len(kept) - len(rest)
        finally:
            self._backend.unlock(name)

