"""The proxy policies a UA knows: which proxies must read which of its bodies.

Each entry says, for one proxy host, the bodies it must be able to read
(``view`` rules) and the bodies it wants signed (``verify`` rules), as
``METHOD:type/subtype`` rules (``headers.Rule``).  Entries come from three
sources (docs/protocol.md §6):

* the UA's configuration (``[[proxies]]``): never expire, and win over
  anything the wire says about the same host;
* ``Proxy-Body-Policy`` headers (``learn_header``), and only those the engine
  accepts: on an answer to one of our own requests (a REGISTER or OPTIONS 200;
  the policy then applies to all we send), or on a message of a dialog we are in
  (the policy then applies to that dialog only: ``scope`` is its Call-ID).  Kept
  until their ``expires``, never longer than ``max_expires``; ``expires=0``
  withdraws, but only an entry the same ``source`` set;
* 496 answers to our requests (``learn_496``): the content types the proxy
  could not read become ``view`` rules, merged into what the host already had.

The table only keeps rules.  Whether a host is one we accept at all, and
whether its certificate passed our checks, is the UA engine's decision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import headers as hdr
from .uri import host_key
from .config import DEFAULT_MAX_POLICY_EXPIRES, DEFAULT_POLICY_EXPIRES

__all__ = ["LearnedPolicy", "LearnedPolicies", "MAX_POLICIES", "MAX_DIALOG_POLICIES",
           "MAX_POLICIES_PER_DIALOG",
           "dialog_scope"]

MAX_POLICIES = 256               # bound on entries for everything we send
MAX_DIALOG_POLICIES = 256        # bound on entries scoped to dialogs (all of them)
MAX_POLICIES_PER_DIALOG = 16     # ... and to any one dialog (one message's worth)
# the key beside a configured proxy's entry for what its 496s taught (no dialog's
# scope, a Call-ID and a tag, can be spelt so)
_TAUGHT_BY_496 = "\x00496"


@dataclass
class LearnedPolicy:
    """What one proxy host needs to read (``view``) or have signed (``verify``)."""

    host: str
    view: tuple[hdr.Rule, ...]
    verify: tuple[hdr.Rule, ...]
    expires_at: float | None                 # None: configured, never expires
    fingerprint: bytes | None = None         # SHA-256 of the certificate it announced
    url: str | None = None                   # where to fetch that certificate
    source: str = "config"                   # who set it: only it may withdraw it
    scope: str | None = None                 # None: everything we send; else a dialog's Call-ID

    def wants(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in (*self.view, *self.verify))

    def wants_signature(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in self.verify)


def dialog_scope(call_id: str, peer: str | None) -> str:
    """The scope of a policy learnt in a dialog: its Call-ID and the peer it is with."""
    return f"{call_id} {peer or '-'}"


def _merged(*rules: Iterable[hdr.Rule]) -> tuple[hdr.Rule, ...]:
    """The rules in order, each once."""
    return tuple(dict.fromkeys(r for group in rules for r in group))


class LearnedPolicies:
    """The proxy policies one UA holds: one ``LearnedPolicy`` per proxy host and scope.

    Bounds: at most ``max_entries`` (256) entries for everything we send, configured
    ones included, and ``max_dialog_entries`` (256) scoped to dialogs, at most
    ``max_per_dialog`` (16) to any one: a new learnt entry pushes out the learnt one of
    its own kind that expires first, a dialog's from its own dialog or the one holding
    the most (an expired entry counts until it is swept).  Learnt entries live at most ``max_expires`` seconds
    (default 86400, whatever ``expires`` says; ``default_expires``, 3600 s, when it
    says nothing).  Expired entries are swept whenever the policies in force are
    asked for; a dialog's entries go with it (``end_scope``).

    ``clock`` returns seconds (``time.time`` by default).  Thread-safe: one
    lock around every read and change.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_entries: int = MAX_POLICIES,
                 default_expires: float = DEFAULT_POLICY_EXPIRES,
                 max_expires: float = DEFAULT_MAX_POLICY_EXPIRES,
                 max_dialog_entries: int = MAX_DIALOG_POLICIES,
                 max_per_dialog: int = MAX_POLICIES_PER_DIALOG) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._max_dialog_entries = max_dialog_entries
        self._max_per_dialog = max_per_dialog
        self._default_expires = default_expires
        self._max_expires = max_expires
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str | None], LearnedPolicy] = {}

    def __repr__(self) -> str:
        return f"LearnedPolicies({len(self)} of {self._max_entries} entries)"

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

    def is_configured(self, host: str) -> bool:
        with self._lock:
            entry = self._entries.get((host_key(host), None))
            return entry is not None and entry.expires_at is None

    def learn_header(self, announced: hdr.PolicyHeader, *, source: str,
                     scope: str | None = None) -> LearnedPolicy | None:
        """One ``Proxy-Body-Policy`` value the engine accepted from ``source``.

        Returns the entry now kept, or None when nothing was learnt: the host is
        configured, or the header withdrew its policy (``expires=0``; it counts only
        against an entry ``source`` set).  A learnt entry is replaced as a whole.
        """
        with self._lock:
            if self._configured(announced.host):
                return None  # configured policy wins over what the wire says
            key = (host_key(announced.host), scope)
            existing = self._entries.get(key)
            if announced.expires == 0:
                if existing is not None and existing.source == source:
                    del self._entries[key]
                return None
            return self._put(LearnedPolicy(announced.host, announced.view, announced.verify,
                                           self._expiry(announced.expires),
                                           announced.cert_fingerprint, announced.cert_url,
                                           source, scope))

    def learn_496(self, host: str, needed: tuple[hdr.Rule, ...],
                  announced: hdr.PolicyHeader | None) -> LearnedPolicy:
        """A 496 from ``host`` to our request (its certificate already checked by the
        engine).  ``needed`` are the view rules the 496 names (from its Warning), and
        ``announced`` its own ``Proxy-Body-Policy`` if it carried one.  Both are added
        to the rules ``host`` learnt before, for the usual time.  A configured entry is
        left as configured (it wins over the wire, and never lapses): what the 496
        teaches about that proxy is an entry of its own beside it, which lapses (review
        63: merged into the configured entry, a forged 496 widened it for good)."""
        with self._lock:
            configured = self._entries.get((host_key(host), None)) \
                if self._configured(host) else None
            key = (host_key(host), None if configured is None else _TAUGHT_BY_496)
            old = self._entries.get(key)
            if old is not None and old.expires_at is not None and old.expires_at <= self._clock():
                old = None   # an expired entry brings nothing back
            pinned = configured or announced
            return self._put(LearnedPolicy(
                host,
                _merged(old.view if old else (), announced.view if announced else (), needed),
                _merged(old.verify if old else (), announced.verify if announced else ()),
                self._expiry(announced.expires if announced else None),
                (configured.fingerprint if configured else announced.cert_fingerprint)
                if pinned else None,
                (configured.url if configured else announced.cert_url) if pinned else None,
                "496"), key=key)

    def withdraw(self, host: str) -> bool:
        """Forget everything learnt about ``host`` (every scope); a configured entry
        stays.  True when an entry went."""
        with self._lock:
            keys = [k for k, p in self._entries.items()
                    if k[0] == host_key(host) and p.expires_at is not None]
            for key in keys:
                del self._entries[key]
            return bool(keys)

    def end_scope(self, scope: str) -> None:
        """The dialog ``scope`` names is over: its policies go with it."""
        with self._lock:
            for key in [k for k in self._entries if k[1] == scope]:
                del self._entries[key]

    def end_call(self, call_id: str) -> None:
        """Every dialog of ``call_id`` is over (a BYE, a failed INVITE): their policies go."""
        prefix = call_id + " "
        with self._lock:
            for key in [k for k in self._entries if k[1] is not None and k[1].startswith(prefix)]:
                del self._entries[key]

    # -- lookups ---------------------------------------------------------------------

    def in_force(self, scope: str | None = None) -> list[LearnedPolicy]:
        """The policies in force now for what we send in ``scope`` (a dialog's Call-ID,
        or None outside any): those for everything, and that dialog's."""
        with self._lock:
            return [p for p in self._current() if p.scope is None or p.scope == scope]

    def everywhere(self) -> list[LearnedPolicy]:
        """Every policy in force, whatever its scope (to fetch their certificates)."""
        with self._lock:
            return self._current()

    def wanting(self, method: str, content_type: str,
                scope: str | None = None) -> list[LearnedPolicy]:
        """Policies in force in ``scope`` that must read (view) or want signed (verify)
        a ``method`` body of ``content_type``, in the order they were kept."""
        with self._lock:
            return [p for p in self._current() if (p.scope is None or p.scope == scope)
                    and p.wants(method, content_type)]

    def fingerprint(self, host: str) -> bytes | None:
        """The certificate fingerprint ``host`` announced for everything we send (a
        configured entry, a registrar's, a 496's), while such an entry is in force.  A
        dialog's is that dialog's peer's word: it pins nothing for the other calls
        (review 164 K2: one caller's fingerprint had the proxy's real certificate
        refused for every call)."""
        with self._lock:
            for entry in self._current():
                if entry.scope is None and host_key(entry.host) == host_key(host) \
                        and entry.fingerprint is not None:
                    return entry.fingerprint
            return None

    def announced_fingerprints(self, host: str) -> list[bytes]:
        """Every certificate fingerprint ``host`` announced in a policy in force, of any
        scope: what may replace a certificate held for it."""
        with self._lock:
            return [entry.fingerprint for entry in self._current()
                    if host_key(entry.host) == host_key(host) and entry.fingerprint]

    # -- with the lock held ----------------------------------------------------------

    def _configured(self, host: str) -> bool:
        entry = self._entries.get((host_key(host), None))
        return entry is not None and entry.expires_at is None

    def _expiry(self, expires: int | None) -> float:
        wanted = expires if expires else self._default_expires
        return self._clock() + min(float(wanted), self._max_expires)

    def _put(self, entry: LearnedPolicy,
             key: tuple[str, str | None] | None = None) -> LearnedPolicy:
        """Keep ``entry`` (under ``key``, by default its host and scope).  Dialog-scoped
        entries and the rest have bounds of their own (``max_dialog_entries`` and
        ``max_entries``), and a new entry pushes out only one of its own kind: a flood
        of strangers' dialogs never evicts what our registrar told us.  A dialog holds
        at most ``max_per_dialog``, a new one pushing out its own; when the dialogs'
        bound is reached, the dialog holding the most gives one up, so one peer's
        dialog cannot push out another call's policy (review 159 K3)."""
        key = key or (host_key(entry.host), entry.scope)
        if key not in self._entries:
            victim = self._dialog_victim(entry.scope) if entry.scope is not None \
                else self._global_victim()
            if victim is False:
                return entry   # all configured: nothing learnt is kept (and it is not used)
            if victim is not None:
                del self._entries[victim]
        self._entries[key] = entry
        return entry

    def _first_to_lapse(self, keys: list[tuple[str, str | None]]) -> tuple[str, str | None]:
        return min(keys, key=lambda k: self._entries[k].expires_at or 0.0)

    def _global_victim(self) -> tuple[str, str | None] | None | bool:
        """The entry a new one for everything we send pushes out: None when there is
        room, False when every entry is configured."""
        same = [k for k, p in self._entries.items() if p.scope is None]
        if len(same) < self._max_entries:
            return None
        learnt = [k for k in same if self._entries[k].expires_at is not None]
        return self._first_to_lapse(learnt) if learnt else False

    def _dialog_victim(self, scope: str) -> tuple[str, str | None] | None:
        """The entry a new one in dialog ``scope`` pushes out, or None when there is room:
        its own dialog's first to lapse when that dialog is full or the largest; else
        the first to lapse of the dialog holding the most."""
        by_scope: dict[str, list[tuple[str, str | None]]] = {}
        for k, p in self._entries.items():
            if p.scope is not None:
                keys = by_scope.pop(p.scope, [])      # in order of each dialog's latest
                keys.append(k)
                by_scope[p.scope] = keys
        own = by_scope.get(scope, [])
        if len(own) >= self._max_per_dialog:
            return self._first_to_lapse(own)
        if sum(len(keys) for keys in by_scope.values()) < self._max_dialog_entries:
            return None
        # of the dialogs holding the most, the one that learnt last: a flood of new
        # dialogs pushes out its own, never an older call's (review 160 K2)
        largest = max(reversed(by_scope.values()), key=len)
        if own and len(own) + 1 >= len(largest):
            return self._first_to_lapse(own)
        return self._first_to_lapse(largest)

    def _current(self) -> list[LearnedPolicy]:
        now = self._clock()
        for key in [k for k, p in self._entries.items()
                    if p.expires_at is not None and p.expires_at <= now]:
            del self._entries[key]
        return list(self._entries.values())
