"""The proxy policies a UA knows: which proxies must read which of its bodies.

Each entry says, for one proxy host, the bodies it must be able to read
(``view`` rules) and the bodies it wants signed (``verify`` rules), as
``METHOD:type/subtype`` rules (``headers.Rule``).  Entries come from three
sources (docs/protocol.md §6):

* the UA's configuration (``[[proxies]]``): never expire, and win over
  anything the wire says about the same host;
* ``Proxy-Body-Policy`` headers (``learn_header``): kept until their
  ``expires`` (default ``DEFAULT_POLICY_EXPIRES``); ``expires=0`` withdraws;
* 496 answers (``learn_496``): the content types the proxy could not read
  become ``view`` rules, merged into what the host already had.

The table only keeps rules.  Whether a host is one we accept at all, and
whether its certificate passed our checks, is the UA engine's decision.

Where a source or scope per entry would go: every entry is made by one of
the ``learn_*``/``configure`` methods and stored by ``_put`` under
``_key(host)``, and every lookup goes through ``_current``.  Recording where
an entry came from (say "answer to our own request") or what it is scoped
to (a dialog) means a field on ``LearnedPolicy``, a keyword on those
methods, a richer ``_key`` and a filter in ``_current`` -- callers of
``in_force`` and ``wanting`` keep their shape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import headers as hdr
from .uri import host_key
from .config import DEFAULT_POLICY_EXPIRES

__all__ = ["LearnedPolicy", "LearnedPolicies", "MAX_POLICIES"]

MAX_POLICIES = 256               # bound on hosts learnt from policy headers


@dataclass
class LearnedPolicy:
    """What one proxy host needs to read (``view``) or have signed (``verify``)."""

    host: str
    view: tuple[hdr.Rule, ...]
    verify: tuple[hdr.Rule, ...]
    expires_at: float | None                 # None: configured, never expires
    fingerprint: bytes | None = None         # SHA-256 of the certificate it announced
    url: str | None = None                   # where to fetch that certificate

    def wants(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in (*self.view, *self.verify))

    def wants_signature(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in self.verify)


def _merged(*rules: Iterable[hdr.Rule]) -> tuple[hdr.Rule, ...]:
    """The rules in order, each once."""
    return tuple(dict.fromkeys(r for group in rules for r in group))


class LearnedPolicies:
    """The proxy policies one UA holds: one ``LearnedPolicy`` per proxy host.

    Bounds: one entry per host (``uri.host_key``).  Policy headers add a
    new host only while fewer than ``max_entries`` (256) entries are kept
    (configured ones count; an expired entry counts until it is swept);
    learnt entries expire after their ``expires`` (at most 2**32-1 s, the
    header's range; default ``default_expires``, 3600 s).  Expired entries
    are swept whenever the policies in force are asked for (``in_force``,
    ``wanting``).  Entries from a 496 (``learn_496``) are not held to
    ``max_entries``: each needs a 496 whose certificate the engine checked.

    ``clock`` returns seconds (``time.time`` by default).  Thread-safe: one
    lock around every read and change.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_POLICIES,
                 default_expires: float = DEFAULT_POLICY_EXPIRES) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._default_expires = default_expires
        self._lock = threading.Lock()
        self._entries: dict[str, LearnedPolicy] = {}

    def __repr__(self) -> str:
        return f"LearnedPolicies({len(self)} of {self._max_entries} hosts)"

    def __len__(self) -> int:
        """Entries kept, expired ones not yet swept included."""
        with self._lock:
            return len(self._entries)

    # -- changes ---------------------------------------------------------------------

    def configure(self, host: str, view: tuple[hdr.Rule, ...],
                  verify: tuple[hdr.Rule, ...]) -> LearnedPolicy:
        """A configured proxy: never expires, and the wire cannot change it."""
        with self._lock:
            return self._put(LearnedPolicy(host, view, verify, None))

    def learn_header(self, announced: hdr.PolicyHeader) -> LearnedPolicy | None:
        """One ``Proxy-Body-Policy`` value (from a host the engine accepts).

        Returns the entry now kept, or None when nothing was learnt: the host
        is configured, the header withdrew its policy (``expires=0``), or the
        table is full and the host is new.  A learnt entry is replaced as a
        whole (rules, expiry, fingerprint, URL).
        """
        with self._lock:
            existing = self._entries.get(self._key(announced.host))
            if existing is not None and existing.expires_at is None:
                return None  # configured policy wins over what the wire says
            if announced.expires == 0:
                self._withdraw(announced.host)
                return None
            if len(self._entries) >= self._max_entries and existing is None:
                return None
            expires = self._clock() + (announced.expires if announced.expires is not None
                                       else self._default_expires)
            return self._put(LearnedPolicy(announced.host, announced.view, announced.verify,
                                           expires, announced.cert_fingerprint,
                                           announced.cert_url))

    def learn_496(self, host: str, needed: tuple[hdr.Rule, ...],
                  announced: hdr.PolicyHeader | None) -> LearnedPolicy:
        """A 496 from ``host`` (its certificate already checked by the engine).

        ``needed`` are the view rules the 496 names (from its Warning), and
        ``announced`` its own ``Proxy-Body-Policy`` if it carried one.  Both
        are added to the rules ``host`` already had (an expired entry not
        yet swept included); a configured entry stays configured.  The
        expiry, fingerprint and URL become the 496's (expiry ``expires`` of
        its policy, or ``default_expires`` when absent or 0).
        """
        with self._lock:
            old = self._entries.get(self._key(host))
            expires = self._clock() + (announced.expires if announced and announced.expires
                                       else self._default_expires)
            return self._put(LearnedPolicy(
                host,
                _merged(old.view if old else (), announced.view if announced else (), needed),
                _merged(old.verify if old else (), announced.verify if announced else ()),
                None if old and old.expires_at is None else expires,
                announced.cert_fingerprint if announced else None,
                announced.cert_url if announced else None))

    def withdraw(self, host: str) -> bool:
        """Forget what was learnt about ``host``; a configured entry stays.
        True when an entry went."""
        with self._lock:
            existing = self._entries.get(self._key(host))
            if existing is None or existing.expires_at is None:
                return False
            return self._withdraw(host)

    # -- lookups ---------------------------------------------------------------------

    def in_force(self) -> list[LearnedPolicy]:
        """The policies in force now (expired ones are forgotten)."""
        with self._lock:
            return self._current()

    def wanting(self, method: str, content_type: str) -> list[LearnedPolicy]:
        """Policies in force that must read (view) or want signed (verify) a
        ``method`` body of ``content_type``, in the order they were kept."""
        with self._lock:
            return [p for p in self._current() if p.wants(method, content_type)]

    def fingerprint(self, host: str) -> bytes | None:
        """The certificate fingerprint ``host`` announced, while its entry is kept
        (an expired entry counts until it is swept)."""
        with self._lock:
            entry = self._entries.get(self._key(host))
            return entry.fingerprint if entry is not None else None

    # -- with the lock held ----------------------------------------------------------

    @staticmethod
    def _key(host: str) -> str:
        return host_key(host)

    def _put(self, entry: LearnedPolicy) -> LearnedPolicy:
        self._entries[self._key(entry.host)] = entry
        return entry

    def _withdraw(self, host: str) -> bool:
        return self._entries.pop(self._key(host), None) is not None

    def _current(self) -> list[LearnedPolicy]:
        now = self._clock()
        for key in [k for k, p in self._entries.items()
                    if p.expires_at is not None and p.expires_at <= now]:
            del self._entries[key]
        return list(self._entries.values())
