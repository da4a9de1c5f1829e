"""The content-encryption-key cache behind RFC 3185 CEK reuse.

After a UA or proxy opens an envelope that carries a CEKReference, it may keep
(reference, CEK) and later open a ``KEKRecipientInfo`` that names the reference.
This module holds those keys: scoped to one dialog or one transaction, bounded
in number, age and uses, and never shown in a repr or log.

Lifetime rules (draft-ietf-sip-e2m-key-reuse-01 and RFC 3185 §6):

* ``DIALOG_TTL`` (12 h): a key kept for a dialog lives until BYE
  (``drop_scope``) but never longer than this, so a dialog whose BYE is lost
  cannot pin a key forever.
* ``TRANSACTION_TTL`` (32 s = 64*T1): a key kept for a message outside any
  dialog (MESSAGE) lives as long as the non-INVITE transaction can.
* ``MAX_TTL`` (12 h): the cap on any TTL a caller asks for.
* ``MAX_DECRYPTS_CAP`` (256): the most uses a key is kept for.  RFC 3185 says
  recipients SHOULD drop keys with too large a CEKMaxDecrypts; a larger request
  (or none at all) is clamped to the cap.

A kept key is never replaced: ``put`` for a (scope, reference) that already
holds a live key keeps that key, with its lifetime and uses, and returns it.
Otherwise a later message naming the same reference (a hop replaying the offer
with its own envelope, or an insider) would swap the CEK under the peers' feet,
or give a key its uses back.  A retransmission carries the same CEK, so it loses
nothing; a different CEK under a reference already kept is ignored rather than
refused, so the message that carried it is still answered as any other.

``MemoryKeyCache`` is the in-process implementation (pjsua2, tests).  The
Kamailio app supplies a shared-memory one with the same ``KeyCache`` interface
and reuses ``scope_key``, ``encode_scope_keys`` and ``decode_scope_keys``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import islice
from typing import Protocol, Union, runtime_checkable
from urllib.parse import quote, unquote

from .errors import LimitExceededError, MalformedError

__all__ = [
    "DialogScope",
    "TransactionScope",
    "Scope",
    "CachedKey",
    "CacheLimits",
    "KeyCache",
    "MemoryKeyCache",
    "scope_key",
    "short_lived_key",
    "encode_scope_keys",
    "decode_scope_keys",
    "check_material",
    "short_lived",
    "over_quota",
    "answer_keeper",
    "keeper_groups",
    "DIALOG_TTL",
    "TRANSACTION_TTL",
    "MAX_TTL",
    "MAX_DECRYPTS_CAP",
    "MAX_REFERENCE_BYTES",
    "MAX_CEK_BYTES",
    "KEEPER_SHARE",
    "MAX_KEYS_PER_SCOPE",
    "MAX_KEEPER_OCTETS",
    "scope_victim",
    "key_signer",
    "bounded_keeper",
]

T1 = 0.5                        # RFC 3261 default RTT estimate, seconds
TRANSACTION_TTL = 64 * T1       # Timer F/B: the longest a transaction lives
DIALOG_TTL = 12 * 3600.0        # a dialog key lives until BYE, at most this
MAX_TTL = 12 * 3600.0           # no caller may ask for longer
MAX_DECRYPTS_CAP = 256          # RFC 3185 §6: refuse to honour huge CEKMaxDecrypts
MAX_REFERENCE_BYTES = 256       # a CEKReference is an identifier; bound what we key on
MAX_CEK_BYTES = 64              # AES-256 / ChaCha20 keys are 32 bytes; leave room
KEEPER_SHARE = 8                # one keeper (the AoR whose message offered the key)
                                # holds at most 1/8 of a cache unless told otherwise
MAX_KEYS_PER_SCOPE = 32         # keys one dialog or transaction holds at once (a shared
                                # cache keeps a scope's keys in one record)
MAX_KEEPER_OCTETS = 64          # longer keeper names are kept hashed (bounded_keeper)


# --------------------------------------------------------------------------
# Scopes


@dataclass(frozen=True)
class DialogScope:
    """A dialog: Call-ID plus its tags, in an order that does not depend on direction.

    The UAC sees (local=From tag, remote=To tag), the UAS the reverse; both
    build the same scope.  Before the To tag exists (the INVITE itself) the
    scope has one tag: that is the *early* scope of the dialog.  Ending the
    confirmed dialog (``drop_scope``) takes from it only the keys the dialog
    holds too; the rest wait for their short expiry.

    Call-IDs compare byte for byte (RFC 3261 §8.1.1.4); tags are tokens and so
    compare case-insensitively (RFC 3261 §7.3.1), hence they are lower-cased.
    """

    call_id: str
    tags: tuple[str, ...]

    def __init__(self, call_id: str, tag: str, other_tag: str | None = None) -> None:
        if not call_id:
            raise ValueError("a dialog scope needs a Call-ID")
        if not tag:
            raise ValueError("a dialog scope needs at least one tag")
        tags = [tag.lower()] + ([other_tag.lower()] if other_tag else [])
        object.__setattr__(self, "call_id", call_id)
        object.__setattr__(self, "tags", tuple(sorted(tags)))

    @property
    def early(self) -> bool:
        """True while only one tag is known (the dialog-creating request)."""
        return len(self.tags) == 1

    def early_scopes(self) -> tuple[DialogScope, ...]:
        """The one-tag scopes a confirmed dialog may have grown from."""
        if self.early:
            return ()
        return tuple(DialogScope(self.call_id, t) for t in self.tags)

    def parts(self) -> tuple[str, ...]:
        return ("d", self.call_id, *self.tags)


@dataclass(frozen=True)
class TransactionScope:
    """One transaction outside any dialog (e.g. MESSAGE): Call-ID, CSeq number, branch.

    The branch is the top Via branch of the request as the keeper received
    it, which the response carries back unchanged.
    """

    call_id: str
    cseq: int
    branch: str

    def __post_init__(self) -> None:
        if not self.call_id or not self.branch:
            raise ValueError("a transaction scope needs a Call-ID and a branch")
        if not 0 <= self.cseq < 2**31:  # RFC 3261 §8.1.1.5
            raise ValueError("CSeq number out of range")
        object.__setattr__(self, "branch", self.branch.lower())

    def parts(self) -> tuple[str, ...]:
        return ("t", self.call_id, str(self.cseq), self.branch)


Scope = Union[DialogScope, TransactionScope]


def short_lived(scope: Scope) -> bool:
    """A transaction's or an early dialog's key: it lives seconds to minutes by nature.
    When a cache is full these go before a confirmed dialog's keys, so that one user's
    new requests (each keeping a key) cannot push out the keys of calls under way."""
    return isinstance(scope, TransactionScope) or scope.early


def default_ttl_for(scope: Scope) -> float:
    """The lifetime a key gets when the caller names none."""
    return TRANSACTION_TTL if isinstance(scope, TransactionScope) else DIALOG_TTL


# --------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class CachedKey:
    """A kept CEK.  ``created`` and ``expires`` are in the cache's clock.

    ``max_decrypts`` is the number of uses left (None: limited by time only).
    ``keeper`` is the AoR whose message offered the key (None: nobody's quota).
    """

    cek: bytes = field(repr=False)
    reference: bytes
    scope: Scope
    created: float
    expires: float
    max_decrypts: int | None = None
    cipher: str | None = None
    keeper: str | None = None

    def __repr__(self) -> str:  # the CEK never reaches a log
        return (f"CachedKey(ref={self.reference.hex()[:16]}, scope={self.scope!r}, "
                f"cek={len(self.cek)} bytes, expires={self.expires:.0f}, "
                f"max_decrypts={self.max_decrypts}, cipher={self.cipher}, keeper={self.keeper})")


@runtime_checkable
class KeyCache(Protocol):
    """What a key cache offers; in-process and shared-memory caches both follow it."""

    def put(self, scope: Scope, reference: bytes, cek: bytes, *, ttl: float | None = None,
            max_decrypts: int | None = None, cipher: str | None = None,
            keeper: str | None = None) -> CachedKey:
        """Keep ``cek`` under ``reference`` within ``scope``; a live key already kept
        there stays as it is (CEK, lifetime, uses) and is what is returned.  Past its
        ``keeper``'s quota, that keeper's own key goes (short-lived first, then the
        oldest), never anyone else's.  A scope already holding ``max_per_scope`` keys
        lets one go by ``scope_victim``; when that names none (every holder has one),
        the new key is not kept, and the entry returned is not in the cache."""
        ...

    def get(self, scope: Scope, reference: bytes, *, count: bool = True) -> CachedKey | None:
        """The key, counting one use (``count``); None if absent, expired or used up.
        ``count=False`` only looks: a proxy counts the use once the message that
        needed the key passed its checks, so replayed copies spend nothing."""
        ...

    def drop(self, scope: Scope, reference: bytes) -> None:
        """Forget one key."""
        ...

    def expire_within(self, scope: Scope, reference: bytes, seconds: float) -> None:
        """Let one key live at most ``seconds`` more (never longer than it would have);
        its uses and keeper stay.  A key that may still be needed for a short while
        (a late 2xx after its INVITE failed) but no longer for its full life."""
        ...

    def drop_scope(self, scope: Scope) -> None:
        """Forget every key of one scope (a BYE ends the dialog) and, of a confirmed
        dialog's early scopes, only the keys under the names it holds itself (the early
        copies of keys moved into it).  A kept name binds the dialog's two AoRs, so a
        dialog that never was (a BYE with a made-up To tag) takes no party's key."""
        ...

    def __len__(self) -> int:
        ...


@dataclass(frozen=True)
class CacheLimits:
    """The bounds every ``KeyCache`` applies (in memory or in Kamailio's htable):
    entry count, entries per keeper, lifetimes and uses; ``new_entry`` applies them
    to one key."""

    max_entries: int = 10_000
    default_ttl: float = DIALOG_TTL
    transaction_ttl: float = TRANSACTION_TTL
    max_ttl: float = MAX_TTL
    max_decrypts_cap: int | None = MAX_DECRYPTS_CAP
    max_per_keeper: int | None = None      # None: max_entries // KEEPER_SHARE
    max_per_scope: int = MAX_KEYS_PER_SCOPE

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_per_scope < 1:
            raise ValueError("max_entries and max_per_scope must be at least 1")
        if self.max_per_keeper is not None and self.max_per_keeper < 1:
            raise ValueError("max_per_keeper must be at least 1 (or None)")
        if not 0 < self.default_ttl <= self.max_ttl or not 0 < self.transaction_ttl <= self.max_ttl:
            raise ValueError("TTLs must be positive and at most max_ttl")
        if self.max_decrypts_cap is not None and self.max_decrypts_cap < 1:
            raise ValueError("max_decrypts_cap must be at least 1 (or None)")

    def new_entry(self, scope: Scope, reference: bytes, cek: bytes, now: float, *,
                  ttl: float | None = None, max_decrypts: int | None = None,
                  cipher: str | None = None, keeper: str | None = None) -> CachedKey:
        """The entry to keep for ``put``: material checked, TTL and uses bounded."""
        check_material(reference, cek)
        if ttl is None:
            ttl = self.transaction_ttl if isinstance(scope, TransactionScope) else self.default_ttl
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_decrypts is not None and max_decrypts < 1:
            raise ValueError("max_decrypts must be at least 1")
        if keeper is not None and not keeper.startswith("answer:"):
            keeper = bounded_keeper(keeper)     # an answer's parts are bounded already
        return CachedKey(cek=bytes(cek), reference=bytes(reference), scope=scope, created=now,
                         expires=now + min(ttl, self.max_ttl),
                         max_decrypts=_clamp(max_decrypts, self.max_decrypts_cap), cipher=cipher,
                         keeper=keeper)

    @property
    def keeper_quota(self) -> int:
        """The most keys one keeper may hold."""
        if self.max_per_keeper is not None:
            return self.max_per_keeper
        return max(1, self.max_entries // KEEPER_SHARE)


def bounded_keeper(name: str) -> str:
    """A keeper name of at most 64 octets: a longer one (an AoR a sender wrote) is kept
    as ``#`` + 32 hex of its SHA-256, so one key's line in a shared record stays small
    whatever From a request carried; quotas only compare names.  ('#' is never in an
    AoR as written by ``uri.identity_of``, and ``quote`` escapes it.)"""
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_KEEPER_OCTETS:
        return name
    return "#" + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]


def answer_keeper(caller: str, responder: str) -> str:
    """The keeper of a key an answer offers: the pair, the caller named first (a caller
    the proxy authenticated for the request, or its one shared unauthenticated group:
    ``ProxyEngine.answer_caller``).  Each part is bounded (``bounded_keeper``) and
    %-quoted, so the space between them cannot occur inside one."""
    return (f"answer:{quote(bounded_keeper(caller), safe='')} "
            f"{quote(bounded_keeper(responder), safe='')}")


def key_signer(keeper: str | None) -> str | None:
    """The identity that signed a kept key's message: an answer's responder
    (``answer:<caller> <responder>``: the caller may be a group, or authenticated by
    digest alone, and never signed the answer), else the keeper itself (``unsigned:``
    is one group)."""
    if keeper is not None and keeper.startswith("answer:"):
        _, _, responder = keeper[len("answer:"):].partition(" ")
        return unquote(responder)
    return keeper


def scope_victim(kept: list[CachedKey], keeper: str | None) -> CachedKey | None:
    """Which key a scope full of keys (``CacheLimits.max_per_scope``) lets go for a new
    key of ``keeper``, keys counted by their signer (``key_signer``: one insider is one
    holder whatever From her calls wrote).  The newcomer's own oldest when its signer
    would then hold as many as anyone; else the oldest of whoever holds the most;
    None (the new key is not kept) when every holder has one and the newcomer none.
    Anyone whose message under a dialog's Call-ID and tags is read can add keys to
    that scope: a flood turns over its own keys, and takes a party's only down to
    as many as the flooder holds (a long call's session refreshes turn over the
    party's own)."""
    counts: dict[str | None, int] = {}
    for entry in kept:
        signer = key_signer(entry.keeper)
        counts[signer] = counts.get(signer, 0) + 1
    mine = key_signer(keeper)
    top = max(counts.values())
    if counts.get(mine, 0) and counts[mine] + 1 >= top:
        holder = mine
    elif top == 1:
        return None
    else:
        holder = next(signer for signer, count in counts.items() if count == top)
    return min((entry for entry in kept if key_signer(entry.keeper) == holder),
               key=lambda entry: entry.created)


# The group of the keys a responder's answers offer (``keeper_groups``); no AoR, hashed
# name or other keeper starts so.
ANSWERED = "answered:"


def keeper_groups(keeper: str, quota: int) -> list[tuple[str, int]]:
    """The quotas a key of ``keeper`` counts against.  An answer's key counts against
    its pair (a small share: a callee's many answers to one call stay within it),
    against its caller's own quota (calling many parties who answer stays within that;
    every unauthenticated caller is one such group, so made-up Froms are no new quota)
    and against its responder's answers, ``answered:<responder>`` (being called by
    many stays within that; apart from the keys her own requests offer, so answering
    never spends what she sends; strangers' calls, one pair, fill 1/64 of it)."""
    if keeper.startswith("answer:"):
        caller, _, responder = keeper[len("answer:"):].partition(" ")
        return [(keeper, max(1, quota // KEEPER_SHARE)), (unquote(caller), quota),
                (ANSWERED + unquote(responder), quota)]
    return [(keeper, quota)]


def over_quota(entries: list[tuple[str | None, bool, float, str]], quota: int) -> list[str]:
    """Of (keeper, kept long, created, name) rows, the names past a quota they count
    against (``keeper_groups``): each group's short-lived keys first, then its oldest.
    Keys with no keeper are nobody's."""
    groups: dict[str, tuple[int, list[tuple[bool, float, str]]]] = {}
    for keeper, long_lived, created, name in entries:
        if keeper is None:
            continue
        for group, limit in keeper_groups(keeper, quota):
            groups.setdefault(group, (limit, []))[1].append((long_lived, created, name))
    out: set[str] = set()
    # narrowest first, as MemoryKeyCache.put trims: a pair (strangers' calls to one
    # responder) drops its own excess before its responder's or caller's group counts it
    for limit, rows in sorted(groups.values(), key=lambda group: group[0]):
        rows = [row for row in rows if row[2] not in out]
        if len(rows) > limit:
            rows.sort()
            out.update(name for _, _, name in rows[:len(rows) - limit])
    return sorted(out)


# --------------------------------------------------------------------------
# In-memory implementation


class MemoryKeyCache:
    """A bounded, thread-safe, in-process ``KeyCache``.

    Bounded by count (oldest entry evicted first, O(1) with an OrderedDict; the
    oldest ``short_lived`` one while there is any, see there),
    by time (per-entry TTL, capped at ``max_ttl``) and by uses (clamped to
    ``max_decrypts_cap``).  ``clock`` returns seconds; it defaults to
    ``time.monotonic`` so clock steps cannot extend or cut lifetimes.
    """

    def __init__(self, max_entries: int = 10_000, default_ttl: float = DIALOG_TTL,
                 max_ttl: float = MAX_TTL, *, transaction_ttl: float = TRANSACTION_TTL,
                 max_decrypts_cap: int | None = MAX_DECRYPTS_CAP,
                 max_per_keeper: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = CacheLimits(max_entries, default_ttl, transaction_ttl, max_ttl,
                                   max_decrypts_cap, max_per_keeper)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Scope, bytes], CachedKey] = OrderedDict()
        self._short: OrderedDict[tuple[Scope, bytes], None] = OrderedDict()  # evicted first
        self._by_scope: dict[Scope, set[bytes]] = {}
        # quota group (keeper_groups) -> (its short-lived keys, its others), oldest
        # first: trimming a group at its quota is O(1), whatever the quota
        self._by_keeper: dict[str, tuple[OrderedDict[tuple[Scope, bytes], None],
                                         OrderedDict[tuple[Scope, bytes], None]]] = {}

    def __repr__(self) -> str:
        return f"MemoryKeyCache({len(self)} of {self._limits.max_entries} entries)"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def put(self, scope: Scope, reference: bytes, cek: bytes, *, ttl: float | None = None,
            max_decrypts: int | None = None, cipher: str | None = None,
            keeper: str | None = None) -> CachedKey:
        now = self._clock()
        entry = self._limits.new_entry(scope, reference, cek, now, ttl=ttl,
                                       max_decrypts=max_decrypts, cipher=cipher, keeper=keeper)
        key = (scope, entry.reference)
        with self._lock:
            kept = self._entries.get(key)
            if kept is not None and now < kept.expires:
                return kept            # never overwritten, never refreshed
            self._remove(key)          # an expired one goes
            refs = self._by_scope.get(scope, ())
            if len(refs) >= self._limits.max_per_scope:
                victim = scope_victim([self._entries[(scope, r)] for r in refs], entry.keeper)
                if victim is None:
                    return entry       # every holder has one key: the newcomer's is not kept
                self._remove((scope, victim.reference))
            self._entries[key] = entry
            if short_lived(scope):
                self._short[key] = None
            self._by_scope.setdefault(scope, set()).add(entry.reference)
            if entry.keeper is not None:
                groups = keeper_groups(entry.keeper, self._limits.keeper_quota)
                for group, _ in groups:
                    short, long = self._by_keeper.setdefault(group, (OrderedDict(), OrderedDict()))
                    (short if short_lived(scope) else long)[key] = None
                for group, limit in groups:
                    self._trim_keeper(group, limit, key)
            self._trim(now)
        return entry

    def get(self, scope: Scope, reference: bytes, *, count: bool = True) -> CachedKey | None:
        key = (scope, bytes(reference))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._clock() >= entry.expires:
                self._remove(key)
                return None
            if entry.max_decrypts is None or not count:
                return entry
            left = entry.max_decrypts - 1
            if left <= 0:
                self._remove(key)      # this is the last permitted use
            else:
                self._entries[key] = replace(entry, max_decrypts=left)
            return replace(entry, max_decrypts=left)

    def drop(self, scope: Scope, reference: bytes) -> None:
        with self._lock:
            self._remove((scope, bytes(reference)))

    def expire_within(self, scope: Scope, reference: bytes, seconds: float) -> None:
        key = (scope, bytes(reference))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            expires = min(entry.expires, self._clock() + max(0.0, seconds))
            self._entries[key] = replace(entry, expires=expires)

    def drop_scope(self, scope: Scope) -> None:
        """Forget every key of ``scope``, and its names in its early scopes."""
        earlier = scope.early_scopes() if isinstance(scope, DialogScope) else ()
        with self._lock:
            names = list(self._by_scope.get(scope, ()))
            for s in (scope, *earlier):
                held = self._by_scope.get(s, ())
                for ref in [ref for ref in names if ref in held]:
                    self._remove((s, ref))

    def holds_scope(self, scope: Scope) -> bool:
        """Whether a live key is kept in ``scope`` (none counted as used)."""
        return self.scope_life(scope) is not None

    def scope_life(self, scope: Scope) -> float | None:
        """Seconds until the last live key kept in ``scope`` expires; None when none is."""
        now = self._clock()
        with self._lock:
            ends = [self._entries[(scope, ref)].expires for ref in self._by_scope.get(scope, ())
                    if (scope, ref) in self._entries]
        latest = max((end for end in ends if now < end), default=None)
        return None if latest is None else latest - now

    def purge_expired(self) -> int:
        """Drop every expired entry (O(n)); returns how many went."""
        with self._lock:
            now = self._clock()
            stale = [k for k, e in self._entries.items() if now >= e.expires]
            for k in stale:
                self._remove(k)
            return len(stale)

    # Both helpers run with the lock held.
    def _remove(self, key: tuple[Scope, bytes]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._short.pop(key, None)
        if entry.keeper is not None:
            for group, _ in keeper_groups(entry.keeper, self._limits.keeper_quota):
                kept = self._by_keeper.get(group)
                if kept is None:
                    continue
                kept[0].pop(key, None)
                kept[1].pop(key, None)
                if not kept[0] and not kept[1]:
                    del self._by_keeper[group]
        refs = self._by_scope.get(key[0])
        if refs is not None:
            refs.discard(key[1])
            if not refs:
                del self._by_scope[key[0]]

    def _trim_keeper(self, group: str, limit: int, newest: tuple[Scope, bytes]) -> None:
        # A quota group past its limit loses one of its own keys, not anyone else's: a
        # short-lived one if it has any, else its oldest (never the one just kept).
        kept = self._by_keeper.get(group)
        if kept is None:
            return
        short, long = kept
        while len(short) + len(long) > limit:
            victim = next((k for k in islice(short, 2) if k != newest), None)
            if victim is None:
                victim = next(k for k in islice(long, 2) if k != newest)
            self._remove(victim)

    def _trim(self, now: float) -> None:
        # Expired entries at the old end go first (cheap, amortised O(1)), then,
        # while the cache is over its bound, the oldest short-lived one (else the
        # oldest of all).
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now < oldest.expires:
                break
            self._remove(key)
        while len(self._entries) > self._limits.max_entries:
            self._remove(next(iter(self._short)) if self._short else next(iter(self._entries)))


def check_material(reference: bytes, cek: bytes) -> None:
    # Both come from the wire (via an opened envelope): bound them.
    if not reference:
        raise MalformedError("empty CEKReference")
    if len(reference) > MAX_REFERENCE_BYTES:
        raise LimitExceededError(f"CEKReference longer than {MAX_REFERENCE_BYTES} bytes")
    if not cek:
        raise ValueError("empty CEK")
    if len(cek) > MAX_CEK_BYTES:
        raise LimitExceededError(f"CEK longer than {MAX_CEK_BYTES} bytes")


def _clamp(max_decrypts: int | None, cap: int | None) -> int | None:
    if cap is None:
        return max_decrypts
    return cap if max_decrypts is None else min(max_decrypts, cap)


# --------------------------------------------------------------------------
# Serialisation for shared-memory caches (Kamailio htable)

_SAFE_PART = re.compile(r"[A-Za-z0-9._@~+-]{1,48}")
_HASH_CHARS = 32  # 128 bits of SHA-256: collisions are out of reach


def _key_part(text: str) -> str:
    # Short, safe parts stay readable; anything else becomes "#<hash>".  '#'
    # never occurs in a kept part, so the two forms cannot collide.
    if _SAFE_PART.fullmatch(text):
        return text
    return "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]


# A pure function of an immutable scope, asked for several times per message (record,
# early scopes): remembered, bounded.
@lru_cache(maxsize=1024)
def scope_key(scope: Scope) -> str:
    """The name a shared-memory cache keeps ``scope``'s keys under (ends with '/'): no
    spaces, at most about 160 characters, one per scope (tags in either order)."""
    return ":".join(_key_part(p) for p in scope.parts()) + "/"


def short_lived_key(name: str) -> bool:
    """``short_lived`` for the scope a ``scope_key`` names: a transaction (``t:``) or a
    dialog with one tag (parts never hold ':', so three parts are an early dialog)."""
    return name.startswith("t:") or name.count(":") == 2


_RECORD = "r1"    # the format of a scope's keys in a shared-memory cache (below)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@lru_cache(maxsize=1024)   # pure, immutable scope: as scope_key
def _encode_scope(scope: Scope) -> str:
    # JSON: any Call-ID or tag round-trips (lone surrogates too), on one line
    return json.dumps(scope.parts())


@lru_cache(maxsize=1024)   # a record's scope text recurs each time it is read
def _decode_scope(text: str) -> Scope:
    parts = json.loads(text)
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError("unknown scope form")
    if parts[:1] == ["d"] and len(parts) in (3, 4):
        return DialogScope(parts[1], parts[2], parts[3] if len(parts) == 4 else None)
    if parts[:1] == ["t"] and len(parts) == 4 and parts[2].isdigit():
        return TransactionScope(parts[1], int(parts[2]), parts[3])
    raise ValueError("unknown scope form")


def encode_scope_keys(scope: Scope, kept: list[tuple[CachedKey, str]]) -> str:
    """The text form of ``scope``'s kept keys, each with the name of the node that kept
    it (``origin``), for one htable value.  A first line ``r1|<scope>`` (its parts
    as a JSON array of strings), then one line per key, '|'-separated: reference,
    created, expires, uses left ('-' for none), cipher ('-'), CEK, origin, keeper ('-');
    bytes and free text base64url without padding, times in the cache's clock with
    three decimals.  The result contains CEKs: keep it sealed."""
    lines = [f"{_RECORD}|{_encode_scope(scope)}"]
    for entry, origin in kept:
        uses = "-" if entry.max_decrypts is None else str(entry.max_decrypts)
        cipher = "-" if entry.cipher is None else _b64(entry.cipher.encode())
        keeper = "-" if entry.keeper is None else _b64(entry.keeper.encode())
        lines.append(f"{_b64(entry.reference)}|{entry.created:.3f}|{entry.expires:.3f}|{uses}|"
                     f"{cipher}|{_b64(entry.cek)}|{_b64(origin.encode())}|{keeper}")
    return "\n".join(lines)


def decode_scope_keys(text: str) -> tuple[Scope, list[tuple[CachedKey, str]]]:
    """The inverse of ``encode_scope_keys``; raises ``MalformedError`` on anything else
    (a record that does not read is never used)."""
    lines = text.split("\n")
    tag, _, scope_text = lines[0].partition("|")
    if tag != _RECORD:
        raise MalformedError("not a key-cache record")
    try:
        scope = _decode_scope(scope_text)
    except ValueError:
        raise MalformedError("corrupt key-cache record") from None
    out = []
    for line in lines[1:]:
        fields = line.split("|")
        if len(fields) != 8:
            raise MalformedError("corrupt key-cache record")
        ref, created, expires, uses, cipher, cek, origin, keeper = fields
        try:
            entry = CachedKey(cek=_unb64(cek), reference=_unb64(ref), scope=scope,
                              created=float(created), expires=float(expires),
                              max_decrypts=None if uses == "-" else int(uses),
                              cipher=None if cipher == "-" else _unb64(cipher).decode(),
                              keeper=None if keeper == "-" else _unb64(keeper).decode())
            node = _unb64(origin).decode()
        except (ValueError, binascii.Error):     # UnicodeDecodeError is a ValueError
            raise MalformedError("corrupt key-cache record") from None
        if not entry.reference or not entry.cek or (entry.max_decrypts is not None
                                                    and entry.max_decrypts < 1):
            raise MalformedError("corrupt key-cache record")
        out.append((entry, node))
    return scope, out
