"""The core's ``KeyCache`` on a Kamailio ``htable``: one CEK store for every worker.

Kamailio runs one Python interpreter per worker process, so a CEK kept while one
worker handled the INVITE must be found by whichever worker handles the 200 OK or
the re-INVITE.  The htable lives in shared memory and is visible to all of them.

Two layers, so the logic can be tested without Kamailio:

* ``KsrHtable``: the few KSR calls (set with a per-item expiry, get, remove,
  remove by name prefix, iterate, slot lock).  Nothing else touches KSR.
* ``HtableKeyCache``: the ``KeyCache`` protocol on any such backend, using the
  core's ``cache_key`` / ``scope_key`` / ``encode_entry`` / ``decode_entry``.

Bounds: every entry has its own expiry (the htable drops it even if nobody asks),
capped at ``max_ttl`` and by the table's ``autoexpire``; uses are clamped to
``MAX_DECRYPTS_CAP``; and a sweep every ``sweep_every`` puts removes expired and
corrupt entries and, over ``max_entries``, the oldest ones.  Values contain the
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
                                  CachedKey,
                                  DialogScope, Scope, TransactionScope, cache_key, decode_entry,
                                  check_material, encode_entry, scope_key)

__all__ = ["HtableBackend", "KsrHtable", "HtableKeyCache"]


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
                 sweep_every: int | None = None, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0 < default_ttl <= max_ttl or not 0 < transaction_ttl <= max_ttl:
            raise ValueError("TTLs must be positive and at most max_ttl")
        self._backend = backend
        self._max_entries = max_entries
        self._default_ttl = default_ttl
        self._transaction_ttl = transaction_ttl
        self._max_ttl = max_ttl
        self._cap = max_decrypts_cap
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
        self._seal_key = AESGCM(AESGCM.generate_key(bit_length=128))

    def __repr__(self) -> str:
        return f"HtableKeyCache(max_entries={self._max_entries})"

    # -- KeyCache ----------------------------------------------------------------
    def put(self, scope: Scope, reference: bytes, cek: bytes, *, ttl: float | None = None,
            max_decrypts: int | None = None, cipher: str | None = None) -> CachedKey:
        check_material(reference, cek)  # the same bounds as the in-memory cache
        if ttl is None:
            ttl = self._transaction_ttl if isinstance(scope, TransactionScope) else self._default_ttl
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_decrypts is not None and max_decrypts < 1:
            raise ValueError("max_decrypts must be at least 1")
        uses = max_decrypts
        if self._cap is not None:
            uses = self._cap if max_decrypts is None else min(max_decrypts, self._cap)
        now = self._clock()
        life = min(ttl, self._max_ttl)
        entry = CachedKey(cek=bytes(cek), reference=bytes(reference), scope=scope, created=now,
                          expires=now + life, max_decrypts=uses, cipher=cipher)
        key = cache_key(scope, entry.reference)
        self._backend.set(key, self._seal(key, entry), max(1, math.ceil(life)))
        self._puts += 1
        if self._puts % self._sweep_every == 0:
            self.sweep()
        return entry

    def get(self, scope: Scope, reference: bytes) -> CachedKey | None:
        key = cache_key(scope, bytes(reference))
        # Counting a use is read-modify-write: another worker may be doing the same.
        self._backend.lock(key)
        try:
            raw = self._backend.get(key)
            if raw is None:
                return None
            try:
                entry = self._unseal(key, raw)
            except MalformedError:
                self._backend.remove(key)
                return None
            now = self._clock()
            if now >= entry.expires or entry.scope != scope or entry.reference != reference:
                self._backend.remove(key)
                return None
            if entry.max_decrypts is None:
                return entry
            left = entry.max_decrypts - 1
            if left <= 0:
                self._backend.remove(key)      # this is the last permitted use
            else:
                kept = replace(entry, max_decrypts=left)
                self._backend.set(key, self._seal(key, kept), max(1, math.ceil(entry.expires - now)))
            return replace(entry, max_decrypts=left)
        finally:
            self._backend.unlock(key)

    def drop(self, scope: Scope, reference: bytes) -> None:
        self._backend.remove(cache_key(scope, bytes(reference)))

    def drop_scope(self, scope: Scope) -> None:
        """Every key of ``scope``; for a confirmed dialog also those of its early scopes."""
        scopes = [scope, *(scope.early_scopes() if isinstance(scope, DialogScope) else ())]
        for item in scopes:
            self._backend.remove_prefix(scope_key(item))

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _, entry in self._live(now))

    # -- sealing -----------------------------------------------------------------
    def _seal(self, key: str, entry: CachedKey) -> str:
        nonce = os.urandom(12)
        sealed = self._seal_key.encrypt(nonce, encode_entry(entry).encode(), key.encode())
        return base64.b64encode(nonce + sealed).decode("ascii")

    def _unseal(self, key: str, raw: str) -> CachedKey:
        try:
            data = base64.b64decode(raw, validate=True)
            plain = self._seal_key.decrypt(data[:12], data[12:], key.encode())
        except (ValueError, binascii.Error, InvalidTag, UnicodeDecodeError):
            raise MalformedError("key cache entry does not open") from None
        return decode_entry(plain.decode())

    # -- housekeeping ------------------------------------------------------------
    def _live(self, now: float) -> Iterator[tuple[str, CachedKey]]:
        for key, raw in self._backend.items():
            try:
                entry = self._unseal(key, raw)
            except MalformedError:
                continue
            if now < entry.expires:
                yield key, entry

    def sweep(self) -> int:
        """Drop expired, corrupt and (over ``max_entries``) oldest entries; returns how many."""
        now = self._clock()
        live: list[tuple[float, str]] = []
        dead: list[str] = []
        for key, raw in self._backend.items():
            try:
                entry = self._unseal(key, raw)
            except MalformedError:
                dead.append(key)
                continue
            if now >= entry.expires:
                dead.append(key)
            else:
                live.append((entry.created, key))
        if len(live) > self._max_entries:
            live.sort()
            dead.extend(key for _, key in live[:len(live) - self._max_entries])
        for key in dead:
            self._backend.remove(key)
        return len(dead)
