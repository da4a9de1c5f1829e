"""The core's ``KeyCache`` on a Kamailio ``htable``: one CEK store for every worker.

Kamailio runs one Python interpreter per worker process, so a CEK kept while one
worker handled the INVITE must be found by whichever worker handles the 200 OK or
the re-INVITE.  The htable lives in shared memory and is visible to all of them.

Two layers, so the logic can be tested without Kamailio:

* ``KsrHtable``: the few KSR calls (set with a per-item expiry, get, remove,
  remove by name prefix, iterate, slot lock).  Nothing else touches KSR.
* ``HtableKeyCache``: the ``KeyCache`` protocol on any such backend, using the
  core's ``cache_key`` / ``scope_key`` / ``encode_entry`` / ``decode_entry``.

Dropping a dialog: the htable can only remove names by prefix with a scan of every
bucket (2**keycache_size of them, each locked in turn), which made a BYE cost
milliseconds on a large table.  So each scope with a kept key (a dialog, or a
transaction whose keys the failure route drops) has an index entry ("@" plus the
scope's prefix) listing the references kept under it, and a BYE removes those
names one by one.  An index that grows past ``INDEX_MAX_NAMES`` (or does not read)
falls back to the prefix scan.  No lock is held across two names: the index is
read-modified-written under its own slot lock only, which rules out two workers
each holding one slot and waiting for the other's.

A kept key is never replaced (the core's rule, see ``e2m_plugins.keycache``): ``put``
reads the name under its slot lock and keeps a live entry that is there.

Bounds: every entry has its own expiry (the htable drops it even if nobody asks),
capped at ``max_ttl`` and by the table's ``autoexpire``; uses are clamped to
``MAX_DECRYPTS_CAP``; and a sweep every ``sweep_every`` puts removes expired and
corrupt entries and, over ``max_entries``, the oldest ones (short-lived ones first:
``keycache.short_lived``).  Values contain the
CEK: they are never logged, and the htable is never dumped by this code.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from e2m_plugins.errors import LimitExceededError, MalformedError
from e2m_plugins.keycache import (DIALOG_TTL, MAX_DECRYPTS_CAP, MAX_TTL, TRANSACTION_TTL,
                                  CacheLimits, CachedKey, DialogScope, Scope, cache_key,
                                  decode_entry, encode_entry, over_quota, scope_key,
                                  short_lived)

__all__ = ["HtableBackend", "KsrHtable", "HtableKeyCache", "INDEX_MAX_NAMES"]

INDEX_MAX_NAMES = 32   # references listed per dialog; beyond, a BYE scans instead
_INDEX = "@"           # index names; cache keys start with a scope letter, never "@"
_SCAN = "*"            # an index that gave up listing: drop by prefix scan


def _index_key(scope: Scope) -> str:
    return _INDEX + scope_key(scope)


def _read_index(raw: str | None) -> tuple[float, list[str] | None]:
    """(expiry, listed names); names None when the index asks for a scan."""
    if raw is None:
        return 0.0, []
    head, _, rest = raw.partition(" ")
    try:
        expires = float(head)
    except ValueError:
        return 0.0, None          # unreadable: scanning is always right
    names = rest.split()
    return expires, (None if _SCAN in names else names)


def _write_index(expires: float, names: list[str] | None) -> str:
    return f"{expires:.0f} " + (_SCAN if names is None else " ".join(names))


class HtableBackend(Protocol):
    """The htable operations the cache needs; ``KsrHtable`` is the real one."""

    def set(self, key: str, value: str, ttl: int) -> None: ...
    def get(self, key: str) -> str | None: ...
    def remove(self, key: str) -> None: ...
    def remove_prefix(self, prefix: str) -> None: ...
    def items(self) -> list[tuple[str, str]]: ...
    def lock(self, key: str) -> None: ...
    def unlock(self, key: str) -> None: ...


class KsrHtable:
    """``HtableBackend`` over ``KSR.htable`` for table ``table`` (declared in the cfg)."""

    _ITERATOR = "e2mkc"

    def __init__(self, ksr: Any, table: str) -> None:
        self._ksr = ksr
        self.table = table

    def set(self, key: str, value: str, ttl: int) -> None:
        # sht_setxs: the item gets its own expiry, shorter than the table's autoexpire.
        if self._ksr.htable.sht_setxs(self.table, key, value, int(ttl)) < 0:
            raise LimitExceededError("key cache: htable write failed (shared memory full?)")

    def get(self, key: str) -> str | None:
        value = self._ksr.htable.sht_get(self.table, key)
        return value if isinstance(value, str) else None

    def remove(self, key: str) -> None:
        self._ksr.htable.sht_rm(self.table, key)

    def remove_prefix(self, prefix: str) -> None:
        # "sw": names that start with prefix; no regexp, so no escaping to get wrong.
        self._ksr.htable.sht_rm_name(self.table, "sw", prefix)

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

    def unlock(self, key: str) -> None:
        self._ksr.htable.sht_unlock(self.table, key)


class HtableKeyCache:
    """A ``KeyCache`` whose entries live in a shared htable.

    ``clock`` must be wall-clock epoch seconds (the default): entries are read by
    other processes, which have no common monotonic clock.
    """

    def __init__(self, backend: HtableBackend, *, max_entries: int = 10_000,
                 default_ttl: float = DIALOG_TTL, transaction_ttl: float = TRANSACTION_TTL,
                 max_ttl: float = MAX_TTL, max_decrypts_cap: int | None = MAX_DECRYPTS_CAP,
                 max_per_keeper: int | None = None, sweep_every: int | None = None, clock: Callable[[], float] = time.time,
                 seal_key: bytes | None = None, origin: str = "",
                 count: Callable[[str, int], None] | None = None,
                 refused: Callable[[str], None] | None = None) -> None:
        self._limits = CacheLimits(max_entries, default_ttl, transaction_ttl, max_ttl,
                                   max_decrypts_cap, max_per_keeper)
        self._backend = backend
        # A sweep reads every entry through KSR: run it every tenth of the bound
        # (per worker), so its cost per put stays about ten reads however large the
        # table is, and the bound is soft by at most that many entries per worker.
        self._sweep_every = max(1, sweep_every if sweep_every is not None
                                else max(64, max_entries // 10))
        self._clock = clock
        self._puts = 0
        # Entries are sealed with a key made here, before Kamailio forks: every
        # worker has it, and nothing outside this process tree does.  Kamailio
        # logs KSR call arguments at debug level; a sealed entry shows no CEK.
        # A cluster passes ``seal_key``, the same on every node (entries replicated
        # by DMQ open on each of them, and on nothing else); ``origin`` names this
        # node inside the seal, so a key kept by another one is counted as such.
        self._seal_key = AESGCM(seal_key if seal_key is not None
                                else AESGCM.generate_key(bit_length=128))
        self._origin = origin
        self._count = count or (lambda _name, _n: None)
        self._refused = refused or (lambda _key: None)

    def __repr__(self) -> str:
        return f"HtableKeyCache(max_entries={self._limits.max_entries})"

    # -- KeyCache ----------------------------------------------------------------
    def put(self, scope: Scope, reference: bytes, cek: bytes, *, ttl: float | None = None,
            max_decrypts: int | None = None, cipher: str | None = None,
            keeper: str | None = None) -> CachedKey:
        now = self._clock()
        entry = self._limits.new_entry(scope, reference, cek, now, ttl=ttl,
                                       max_decrypts=max_decrypts, cipher=cipher, keeper=keeper)
        life = entry.expires - now
        key = cache_key(scope, entry.reference)
        # Read-check-write under the slot lock: two workers keeping the same
        # reference at once must not both write.
        self._backend.lock(key)
        try:
            kept = self._kept(key, scope, entry.reference, now)
            if kept is not None:
                return kept              # never overwritten, never refreshed
            self._backend.set(key, self._seal(key, entry), max(1, math.ceil(life)))
        finally:
            self._backend.unlock(key)
        self._count("e2m_ceks_kept", 1)
        # indexed, so that ending the scope removes its names without a scan
        self._list_in_index(scope, key[len(scope_key(scope)):], entry.expires, now)
        self._puts += 1
        if self._puts % self._sweep_every == 0:
            self.sweep()
        return entry

    def _kept(self, key: str, scope: Scope, reference: bytes, now: float) -> CachedKey | None:
        """The live entry stored under ``key`` for (scope, reference), if any (lock held)."""
        raw = self._backend.get(key)
        if raw is None:
            return None
        try:
            entry = self._unseal(key, raw)
        except MalformedError:
            return None
        if now >= entry.expires or entry.scope != scope or entry.reference != reference:
            return None
        return entry

    def get(self, scope: Scope, reference: bytes, *, count: bool = True) -> CachedKey | None:
        key = cache_key(scope, bytes(reference))
        raw = self._backend.get(key)
        if raw is None:
            return None   # nothing kept: a miss needs no lock (the kekri answer tries two scopes)
        if not count:
            # Only a look (the proxy spends the use once the message passed its checks):
            # one read and no lock while the entry is good, nothing written.
            try:
                entry, _ = self._unseal_from(key, raw)
            except MalformedError:
                self._refuse_if_unchanged(key, raw)
                return None
            return entry if self._fits(entry, scope, reference, self._clock()) else None
        # Counting a use is read-modify-write: another worker may be doing the same.
        self._backend.lock(key)
        try:
            raw = self._backend.get(key)
            if raw is None:
                return None
            try:
                entry, origin = self._unseal_from(key, raw)
            except MalformedError:
                self._refused(key)         # never used, and gone (_refuse_if_unchanged)
                self._backend.remove(key)
                return None
            now = self._clock()
            if not self._fits(entry, scope, reference, now):
                if now >= entry.expires:
                    self._count("e2m_ceks_expired", 1)
                self._backend.remove(key)
                return None
            if origin != self._origin:
                self._count("e2m_ceks_replicated", 1)
            if entry.max_decrypts is None:
                return entry
            left = entry.max_decrypts - 1
            if left <= 0:
                self._backend.remove(key)      # this is the last permitted use
            else:
                kept = replace(entry, max_decrypts=left)     # still the keeper's entry
                self._backend.set(key, self._seal(key, kept, origin),
                                  max(1, math.ceil(entry.expires - now)))
            return replace(entry, max_decrypts=left)
        finally:
            self._backend.unlock(key)

    def _refuse_if_unchanged(self, key: str, raw: str) -> None:
        """An entry that does not open (forged, corrupt, or sealed by someone without
        our key, such as a rogue DMQ peer) is never used, and goes: under the lock, and
        only if it is still the one read (a put may have just written a good one)."""
        self._backend.lock(key)
        try:
            if self._backend.get(key) == raw:
                self._refused(key)
                self._backend.remove(key)
        finally:
            self._backend.unlock(key)

    @staticmethod
    def _fits(entry: CachedKey, scope: Scope, reference: bytes, now: float) -> bool:
        """Live, and the entry its name says (the name is bound into the seal as well)."""
        return now < entry.expires and entry.scope == scope and entry.reference == reference

    def drop(self, scope: Scope, reference: bytes) -> None:
        self._backend.remove(cache_key(scope, bytes(reference)))

    def drop_scope(self, scope: Scope) -> None:
        """Every key of ``scope``; for a confirmed dialog also those of its early scopes."""
        early = scope.early_scopes() if isinstance(scope, DialogScope) else ()
        for item in (scope, *early):
            prefix = scope_key(item)
            _, names = self._take_index(item)
            if names is None:
                self._backend.remove_prefix(prefix)
            for name in names or ():
                self._backend.remove(prefix + name)

    # -- the per-scope index ----------------------------------------------------------
    def _list_in_index(self, scope: Scope, name: str, expires: float, now: float) -> None:
        index = _index_key(scope)
        self._backend.lock(index)
        try:
            until, names = _read_index(self._backend.get(index))
            if names is not None and name not in names:
                names = names + [name] if len(names) < INDEX_MAX_NAMES else None
            until = max(until, expires)        # the index outlives every entry it lists
            self._backend.set(index, _write_index(until, names), max(1, math.ceil(until - now)))
        finally:
            self._backend.unlock(index)

    def _take_index(self, scope: Scope) -> tuple[float, list[str] | None]:
        """Read and remove the index of ``scope`` (no index: nothing is kept there)."""
        index = _index_key(scope)
        if self._backend.get(index) is None:
            return _read_index(None)   # no index (every BYE asks for four): no lock
        self._backend.lock(index)
        try:
            raw = self._backend.get(index)
            if raw is not None:
                self._backend.remove(index)
        finally:
            self._backend.unlock(index)
        return _read_index(raw)

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _, entry in self._live(now))

    # -- sealing -----------------------------------------------------------------
    def _seal(self, key: str, entry: CachedKey, origin: str | None = None) -> str:
        nonce = os.urandom(12)
        origin = self._origin if origin is None else origin
        plain = f"{origin}\n{encode_entry(entry)}".encode()
        sealed = self._seal_key.encrypt(nonce, plain, key.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def _unseal(self, key: str, raw: str) -> CachedKey:
        return self._unseal_from(key, raw)[0]

    def _unseal_from(self, key: str, raw: str) -> tuple[CachedKey, str]:
        """The entry sealed under ``key`` (the name is bound in: an entry copied to
        another name does not open) and the node that sealed it."""
        try:
            data = base64.b64decode(raw, validate=True)
            plain = self._seal_key.decrypt(data[:12], data[12:], key.encode()).decode()
        except (ValueError, binascii.Error, InvalidTag, UnicodeDecodeError):
            raise MalformedError("key cache entry does not open") from None
        origin, sep, text = plain.partition("\n")
        if not sep:
            raise MalformedError("key cache entry does not open")
        return decode_entry(text), origin

    # -- housekeeping ------------------------------------------------------------
    def _live(self, now: float) -> Iterator[tuple[str, CachedKey]]:
        for key, raw in self._backend.items():
            if key.startswith(_INDEX):
                continue
            try:
                entry = self._unseal(key, raw)
            except MalformedError:
                continue
            if now < entry.expires:
                yield key, entry

    def sweep(self) -> int:
        """Drop expired and corrupt entries, each keeper's past its quota, (over
        ``max_entries``) the oldest, and the indexes that list none of those left;
        returns how many names went."""
        now = self._clock()
        live: list[tuple[bool, float, str]] = []   # (kept long, created, name)
        keepers: list[tuple[str | None, bool, float, str]] = []
        dead: list[str] = []
        indexes: list[tuple[str, str]] = []
        for key, raw in self._backend.items():
            if key.startswith(_INDEX):
                indexes.append((key, raw))
                continue
            try:
                entry = self._unseal(key, raw)
            except MalformedError:
                dead.append(key)
                continue
            if now >= entry.expires:
                dead.append(key)
                self._count("e2m_ceks_expired", 1)
            else:
                live.append((not short_lived(entry.scope), entry.created, key))
                keepers.append((entry.keeper, *live[-1]))
        # One keeper's keys past its quota go first: its own, not anyone else's.
        excess = set(over_quota(keepers, self._limits.keeper_quota))
        if excess:
            dead.extend(excess)
            live = [row for row in live if row[2] not in excess]
        if len(live) > self._limits.max_entries:
            # short-lived keys (transactions, early dialogs) go first, then the oldest:
            # one user's new requests cannot push out the keys of calls under way
            live.sort()
            dead.extend(key for _, _, key in live[:len(live) - self._limits.max_entries])
            live = live[len(live) - self._limits.max_entries:]
        # An index goes with the last entry it lists (so indexes stay within the bound
        # too) or when it expires.  A put racing this sweep may lose its index: that
        # dialog's keys then live until their own expiry instead of the BYE.
        listed = {key[:key.rfind("/") + 1] for _, _, key in live}
        dead.extend(key for key, raw in indexes
                    if now >= _read_index(raw)[0] or key[len(_INDEX):] not in listed)
        for key in dead:
            self._backend.remove(key)
        return len(dead)
