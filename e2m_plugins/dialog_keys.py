"""The CEKs a UA keeps per dialog for reuse (RFC 3185), and when it may use them.

A key is kept when the UA offers it (a ``CEKReference`` in an envelope it
sent, ``offer``) or receives one (``keep_received``); a later message of the
same dialog may then be sent under it as a ``KEKRecipientInfo`` (KEK = the
CEK reversed) and opened with it.  The rules (docs/protocol.md §2):

* **Confirmation.**  A key the UA offered is not used until the peer has
  shown it holds it: the 2xx to the request that carried it (a 2xx to
  another CSeq does not count), or, for a key offered in a response, a
  request inside the dialog.  A failure response drops the unconfirmed keys.
  Keys received from the peer are usable at once (``settle``), and a key the
  peer offered in a request goes when we answer that request with a failure
  (491 glare, 487 after its CANCEL, 488): the peer drops it on that answer,
  so keeping it would seal our next body for a key nobody else has
  (``answered``, review 35).
* **Retirement.**  After a 496 inside the dialog the keys the refusing proxy
  was thought to hold are retired: never used to send again, but still
  opened until they age out (``retire_held_by``); after a 493 from the peer,
  every key of the dialog (``retire_dialog``: the peer holds none of them).
* **Who may read.**  Each key records the proxies that hold it too
  (``readers``; ``"?"`` when the envelope had holders we cannot name).  SRTP
  keys go only under a key no proxy holds; other content under a key whose
  holders are all named, preferring the one most proxies hold (``reusable``).
* **Lifetime.**  A key is used (to send or to open) only while younger than
  ``max_age`` seconds and used fewer than ``max_uses`` times; the dialog's
  keys go at BYE or a failed INVITE (``end_dialog``), or when the
  application gives the call up (``forget_call``).

Keys live under (Call-ID, tag, parties) slots: the dialog-creating request has
only the UAC's tag, and keys stored under it are found again from either side
once the To tag exists.  Every later key goes under the *peer's* tag, since all
forks of an INVITE share the caller's (review 43).  A key never leaves its
dialog, and a dialog is its Call-ID and tags *and its two parties* (the From and
To AoRs): anyone who has read the ids off the wire can put them on a message of
its own, signed as itself, so the parties are part of every slot's name and a
key is found, kept, confirmed or dropped only by a message between the same two
AoRs (a third party's call under the same ids has slots of its own: review 45).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .cms.recipients import KekLookup
from .errors import E2MError
from .sip import SipMessage, parse_address
from .sipcontext import message_aors
from .uri import host_key

__all__ = ["DialogKey", "DialogKeys", "PendingUses", "MAX_DIALOGS", "MAX_KEYS_PER_DIALOG",
           "MAX_SLOTS_PER_CALL",
           "dialog_parties"]

MAX_DIALOGS = 4096               # bound on (Call-ID, tag) slots with kept CEKs
MAX_KEYS_PER_DIALOG = 8          # bound on keys kept in one slot (the newest stay)
MAX_SLOTS_PER_CALL = 6           # slots of one Call-ID and pair: our INVITE's, a few forks
_SWEEP_EVERY = 256               # keeps between sweeps of aged-out slots

Slot = tuple[str, str, frozenset[str]]   # (Call-ID, lower-cased tag, the two AoRs)


def _transaction(message: SipMessage) -> tuple[int, str, str]:
    """A request's transaction as its responses name it too: CSeq and top Via branch."""
    try:
        branch = message.via_branch() or ""
    except E2MError:
        branch = ""
    return (*message.cseq, branch)


def dialog_parties(message: SipMessage) -> frozenset[str]:
    """The two parties of ``message``'s dialog, whichever way it goes: its From and To
    AoRs as the signed SIP context names them (their URIs as written when they are no
    AoR; empty when there is none).  The same for every message of one dialog."""
    try:
        return frozenset(message_aors(message))
    except E2MError:
        pass
    try:
        return frozenset(parse_address(message.get(name) or "").uri for name in ("From", "To"))
    except E2MError:
        return frozenset()


@dataclass
class DialogKey:
    """A CEK both ends of a dialog hold, and who else holds it."""

    reference: bytes
    cek: bytes = field(repr=False)
    readers: frozenset[str]                  # proxy hosts that hold it too
    exclusive: bool                          # no one but the two UAs (and ``readers``)
    created: float
    uses: int = 0
    confirmed: bool = True                   # False: ours, and the peer has not shown it has it
    retired: bool = False                    # a reader lost it (496): opens, never reused
    offered_in: tuple[int, str] | None = None    # CSeq of our request that carried it, if one did
    parties: frozenset[str] = frozenset()    # the dialog's From and To AoRs (dialog_parties)
    # the peer's request we have not answered: its CSeq and top Via branch (its transaction)
    received_in: tuple[int, str, str] | None = None
    # the INVITE failed: retired, and it opens only until then (a late 2xx under it)
    open_until: float | None = None


class PendingUses:
    """The dialog keys one received message may open with (``lookup``, an opening
    key), and which of them it did: ``spend`` counts their uses once the message was
    accepted."""

    def __init__(self, lock: threading.Lock, kept: dict[bytes, DialogKey]) -> None:
        self._lock, self._kept = lock, kept
        self._found: dict[bytes, DialogKey] = {}
        self.lookup = KekLookup(self._kek_for)

    def _kek_for(self, reference: bytes) -> bytes | None:
        key = self._kept.get(reference)
        if key is None:
            return None
        self._found[reference] = key
        return key.cek[::-1]  # RFC 3185: the KEK is the CEK reversed

    def exclusive(self, reference: bytes) -> bool:
        """Whether the key ``reference`` names, which a lookup found, is one no one but
        the dialog's two UAs holds (no reader, none unknown)."""
        key = self._found.get(reference)
        return key is not None and key.exclusive and not key.readers

    def holders(self, reference: bytes) -> frozenset[str] | None:
        """Who besides the two UAs holds the key ``reference`` names (a lookup found
        it); None when unknown.  A key offered in a body under it is theirs too."""
        key = self._found.get(reference)
        if key is None or "?" in key.readers or (not key.exclusive and not key.readers):
            return None
        return key.readers

    def spend(self) -> None:
        """One use of each key a lookup found, however many parts it opened (a hop's
        copies of one part must not use a key up faster than the peer counts it,
        review 66), once: the found keys are forgotten."""
        with self._lock:
            for key in self._found.values():
                key.uses += 1
        self._found.clear()


class DialogKeys:
    """The CEKs one UA keeps per dialog for RFC 3185 reuse.

    Bounds: at most ``max_dialogs`` (4096) slots, the oldest slot evicted
    first; at most ``max_keys_per_dialog`` (8) keys per slot, the newest
    kept; a key is used only while younger than ``max_age`` seconds and
    used fewer than ``max_uses`` times, and every 256th key kept sweeps the
    slots whose keys have all aged out (dialogs that ended without a BYE we
    saw).  A dialog has at most two slots (one per tag).

    The ``DialogKey`` objects returned are the kept ones: read them, do not
    change them.  ``clock`` returns seconds (``time.time`` by default).
    Thread-safe: one lock around every read and change.
    """

    def __init__(self, *, max_age: float, max_uses: int,
                 clock: Callable[[], float] = time.time,
                 max_dialogs: int = MAX_DIALOGS,
                 max_keys_per_dialog: int = MAX_KEYS_PER_DIALOG) -> None:
        self._max_age = max_age
        self._max_uses = max_uses
        self._clock = clock
        self._max_dialogs = max_dialogs
        self._max_keys = max_keys_per_dialog
        self._lock = threading.Lock()
        self._slots: dict[Slot, list[DialogKey]] = {}
        self._calls: dict[str, dict[Slot, None]] = {}   # Call-ID -> its slots, in order
        self._keeps = 0
        # (open until, slot) of keys a failed INVITE left to open a late 2xx, in order:
        # they go once that passes, at the next use of the table (review 129), not at
        # their age's end (a failed call's CEK is not kept an hour)
        self._lingering: deque[tuple[float, Slot]] = deque()

    def __repr__(self) -> str:
        return f"DialogKeys({len(self)} of {self._max_dialogs} slots)"

    def __len__(self) -> int:
        """How many (Call-ID, tag) slots are kept (a dialog has one or two)."""
        with self._lock:
            return len(self._slots)

    # -- keeping keys ----------------------------------------------------------------

    def offer(self, message: SipMessage, reference: bytes, cek: bytes,
              readers: frozenset[str]) -> DialogKey | None:
        """Keep a key we offered in ``message`` for the peer and ``readers``.

        It is not usable until the peer shows it holds it (``settle``).
        None when ``message`` has no tag to keep it under.
        """
        key = DialogKey(reference, cek, readers, not readers, self._clock(), confirmed=False,
                        offered_in=message.cseq if message.is_request else None,
                        parties=dialog_parties(message))
        with self._lock:
            return self._keep(message, key, message.to_tag if message.is_request
                              else message.from_tag)

    def keep_received(self, message: SipMessage, reference: bytes, cek: bytes, *,
                      readers: frozenset[str] | None) -> DialogKey | None:
        """Keep a key the peer offered in ``message``, usable at once.

        ``readers`` are the proxies the sender's signed SIP context says hold the key
        besides us: the only account of who holds it that a hop or a co-recipient
        cannot change.  None when nothing signed vouches for it (a legacy peer): the
        holders are then unknown (``"?"``), so the key is never exclusive.  None is
        returned when ``message`` has no tag to keep the key under.
        """
        if readers is None:
            readers, exclusive = frozenset({"?"}), False
        else:
            exclusive = not readers
        key = DialogKey(reference, cek, readers, exclusive, self._clock(),
                        parties=dialog_parties(message),
                        received_in=_transaction(message) if message.is_request else None)
        with self._lock:
            return self._keep(message, key, message.from_tag if message.is_request
                              else message.to_tag)

    # -- confirmation, retirement and the end of a dialog ----------------------------

    def settle(self, message: SipMessage) -> None:
        """A 2xx, or a request inside the dialog, shows the peer got the keys we
        offered; a failure response shows it did not, so they go.  A response speaks
        only for the request it answers, by its whole CSeq: a retransmitted 200 of an
        earlier transaction must not vouch for a key offered since, nor the 200 to a
        CANCEL for the INVITE it cancels, and a failure of another request (a 405 to
        an INFO, a stray 481) must not drop a key still waiting for its answer
        (review 36).  A request from the peer vouches only for keys we offered in
        responses."""
        status = message.status or 0
        if message.is_request and not message.to_tag:
            return
        answers = None if message.is_request else message.cseq
        with self._lock:
            for slot in self._slots_of(message):
                bucket = self._slots.get(slot, [])
                if not message.is_request and status >= 300:
                    # (a key kept to open a late 2xx, ``end_dialog(linger=...)``, stays)
                    bucket[:] = [k for k in bucket if k.confirmed or k.offered_in != answers
                                 or k.open_until is not None]
                elif message.is_request or 200 <= status < 300:
                    for key in bucket:
                        if key.offered_in is None or key.offered_in == answers:
                            key.confirmed = True
                            if not message.is_request and key.open_until is not None:
                                # a late 2xx made the call after all: its key opens for
                                # the call's life, as the peer's and the proxy's do, and
                                # still seals nothing of ours (review 132)
                                key.open_until = None

    def answered(self, response: SipMessage) -> None:
        """Our final ``response`` to a request of the peer's: a failure drops the keys
        that request offered (the peer drops them on it too: ``settle``); a 2xx keeps
        them for the dialog, as any key of the peer's.  Matched by transaction (CSeq
        and top Via branch), not CSeq alone: our 403 or 482 to a hop's copy of a
        ringing INVITE must not drop the key the INVITE itself offered (review 49)."""
        status = response.status or 0
        if status < 200:
            return
        request = _transaction(response)
        with self._lock:
            for slot in self._slots_of(response):
                bucket = self._slots.get(slot, [])
                if status >= 300:
                    bucket[:] = [k for k in bucket if k.received_in != request]
                else:
                    for key in bucket:
                        if key.received_in == request:
                            key.received_in = None

    def retire_dialog(self, message: SipMessage) -> None:
        """The peer answered 493 inside ``message``'s dialog: it could open nothing we
        sealed, so it holds none of the dialog's keys (it restarted, or dropped a key
        we kept).  None is used to send again; they still open until they age out."""
        with self._lock:
            for key in self._all(message):
                key.retired = True

    def retire_held_by(self, message: SipMessage, host: str) -> None:
        """``host`` answered 496 inside ``message``'s dialog: it lost the keys we
        thought it held (say it restarted).  They are not reused again, so the
        retry is keyed afresh for the peer and the proxy, with a new reference
        both can reuse.  They still open what was already sent under them (a 200
        retransmitted because its ACK was lost in the restart) until they age out."""
        name = host_key(host)
        with self._lock:
            for key in self._all(message):
                if name in {host_key(r) for r in key.readers if r != "?"}:
                    key.retired = True

    def end_dialog(self, message: SipMessage, *, peer_tag: str | None = None,
                   keep: frozenset[str] = frozenset(), linger: float | None = None) -> None:
        """BYE (sent or received), or a failed INVITE: the call's keys go, every slot of
        its Call-ID between its two parties (another fork's early key too: review 47; a
        third who names the ids ends nothing) but those under a tag in ``keep``
        (lower-cased: another dialog's of ours under the Call-ID).  ``peer_tag``: only the
        keys under the peer's tag go, not the INVITE's own under ours, which every fork
        of it shares (a BYE to another fork than the one that answered, or one we got
        and may refuse: review 45).  ``linger`` (an INVITE's failure answer): they are
        retired instead, never used to send again, and open only ``linger`` seconds more,
        for a 2xx a proxy relays after the failure (review 127)."""
        parties = dialog_parties(message)
        until = None if linger is None else self._clock() + linger
        with self._lock:
            for slot in list(self._calls.get(message.call_id, ())):
                if slot[2] == parties and slot[1] not in keep \
                        and (peer_tag is None or slot[1] == peer_tag.lower()):
                    if until is None:
                        self._drop(slot)
                        continue
                    for key in self._slots.get(slot, []):
                        key.retired = True
                        key.open_until = until if key.open_until is None \
                            else min(key.open_until, until)
                    self._lingering.append((until, slot))

    def forget_call(self, call_id: str) -> None:
        """Every key of ``call_id`` goes (the call ended without a message we saw)."""
        with self._lock:
            for slot in list(self._calls.get(call_id, ())):
                self._drop(slot)

    # -- lookups ---------------------------------------------------------------------

    def kept(self, message: SipMessage) -> list[DialogKey]:
        """Every key kept for ``message``'s dialog, whatever its state."""
        with self._lock:
            return self._all(message)

    def holds(self, message: SipMessage, tag: str) -> bool:
        """Whether keys are kept under ``tag`` in ``message``'s dialog (its Call-ID and
        parties)."""
        with self._lock:
            return bool(self._slots.get((message.call_id, tag.lower(), dialog_parties(message))))

    def for_call(self, call_id: str) -> list[DialogKey]:
        """Every key kept under ``call_id``, whatever its state."""
        with self._lock:
            self._end_lingering()
            return [k for s in self._calls.get(call_id, ()) for k in self._slots.get(s, [])]

    def usable(self, message: SipMessage) -> list[DialogKey]:
        """The dialog's keys that may open a message: confirmed, younger than
        ``max_age`` and used fewer than ``max_uses`` times (retired ones
        included), oldest first."""
        with self._lock:
            return self._usable(message)

    def reusable(self, message: SipMessage, *, exclusive: bool,
                 acceptable: Callable[[str], bool] | None = None) -> DialogKey | None:
        """The newest usable, unretired key fit for the content: for ``exclusive``
        content (SRTP keys) one only the two UAs hold; otherwise any key whose
        holders we can all name, and (``acceptable``) would each choose ourselves,
        preferring the one the most proxies hold (they read the offer, so they read
        the answer).  A holder the peer named that we would not (its own recorder,
        one our ``accept_proxies`` refuses) must not read what we send (review 75).
        Does not count a use."""
        with self._lock:
            return self._reusable(message, exclusive, acceptable)

    def reuse(self, message: SipMessage, *, exclusive: bool,
              acceptable: Callable[[str], bool] | None = None) -> DialogKey | None:
        """``reusable``, counting one use of the key it returns."""
        with self._lock:
            key = self._reusable(message, exclusive, acceptable)
            if key is not None:
                key.uses += 1
            return key

    def opening_lookup(self, message: SipMessage) -> PendingUses:
        """The KEKs of the dialog's usable keys, found by kekri identifier (the
        CEKReference), for opening ``message``.  A key found counts a use (the count
        covers both directions of the dialog) only when ``spend`` says the message was
        accepted: refused copies (replays, a downgrade) must not use a key up (review
        63; the proxy's ``_spend`` is the same rule).  Keys we offered open before the
        peer has confirmed them: confirmation guards what we *send* (a body under a key
        the peer may not hold); the peer may seal its early bodies (a reliable 183, an
        early UPDATE) under our INVITE's key as soon as it has it (review 43)."""
        with self._lock:
            kept = {key.reference: key for key in self._usable(message, opening=True)}
        return PendingUses(self._lock, kept)

    # -- with the lock held ----------------------------------------------------------

    @staticmethod
    def _slots_of(message: SipMessage) -> list[Slot]:
        """Where a dialog's keys live: Call-ID plus each tag of the dialog, and its
        two parties."""
        parties = dialog_parties(message)
        tags = [t for t in (message.from_tag, message.to_tag) if t]
        return [(message.call_id, t.lower(), parties) for t in tags]

    def _end_lingering(self) -> None:
        """Keys past their ``open_until`` go (and their slot, when that empties it)."""
        now = self._clock()
        while self._lingering and self._lingering[0][0] <= now:
            _, slot = self._lingering.popleft()
            bucket = self._slots.get(slot)
            if bucket is None:
                continue
            bucket[:] = [k for k in bucket if k.open_until is None or now < k.open_until]
            if not bucket:
                self._drop(slot)

    def _all(self, message: SipMessage) -> list[DialogKey]:
        """The keys of ``message``'s dialog: its slots (its two parties')."""
        self._end_lingering()
        return [k for slot in self._slots_of(message) for k in self._slots.get(slot, [])]

    def _usable(self, message: SipMessage, opening: bool = False) -> list[DialogKey]:
        now = self._clock()
        found: list[DialogKey] = []
        for key in self._all(message):
            if key not in found and (key.confirmed or opening) \
                    and now - key.created < self._max_age and key.uses < self._max_uses \
                    and (key.open_until is None or (opening and now < key.open_until)):
                found.append(key)
        found.sort(key=lambda k: k.created)   # oldest first across both slots (stable)
        return found

    def _reusable(self, message: SipMessage, exclusive: bool,
                  acceptable: Callable[[str], bool] | None = None) -> DialogKey | None:
        keys = [k for k in reversed(self._usable(message)) if not k.retired]  # newest first
        if exclusive:
            return next((k for k in keys if k.exclusive and not k.readers), None)
        shared = [k for k in keys if "?" not in k.readers
                  and (acceptable is None or all(acceptable(host) for host in k.readers))]
        return max(shared, key=lambda k: len(k.readers), default=None)

    def _keep(self, message: SipMessage, key: DialogKey, peer_tag: str | None) -> DialogKey | None:
        # Under the peer's tag when the message has it: every fork of our INVITE shares
        # our own tag, so a key one fork offers (a 183 from another device) kept under
        # it would be found in the dialog that answered and seal our next body for the
        # wrong device (review 43).  Our tag alone is the slot of the dialog-creating
        # request.  The slot names the parties, so no third party can hold it (45).
        slots = self._slots_of(message)
        if not slots:
            return None
        slot = next((s for s in slots if peer_tag and s[1] == peer_tag.lower()), slots[0])
        if slot not in self._slots and sum(
                1 for s in self._calls.get(message.call_id, ()) if s[2] == slot[2]
        ) >= MAX_SLOTS_PER_CALL:
            # one call's forks (a callee's many 183s, each its own tag) must not push
            # other calls' keys out of the table (review 47); counted per pair, so a
            # third party who learnt the Call-ID cannot use the pair's slots up
            return None
        self._keeps += 1
        if self._keeps % _SWEEP_EVERY == 0:  # now and then, not on every message: O(dialogs)
            now = self._clock()
            for stale in [s for s, keys in self._slots.items()
                          if all(now - k.created >= self._max_age for k in keys)]:
                self._drop(stale)  # dialogs that ended without a BYE we saw
        if len(self._slots) >= self._max_dialogs and slot not in self._slots:
            # dicts keep insertion order: the first slot is the oldest dialog
            self._drop(next(iter(self._slots)))
        kept = next((k for k in self._all(message) if k.reference == key.reference), None)
        if kept is not None:
            # Never replaced: a retransmission carries the same key, and anyone else who
            # names the reference (a co-recipient holding another CEK) must not swap it.
            return kept
        bucket = self._slots.setdefault(slot, [])
        self._calls.setdefault(slot[0], {})[slot] = None
        bucket[:] = (bucket + [key])[-self._max_keys:]
        return key

    def _drop(self, slot: Slot) -> None:
        self._slots.pop(slot, None)
        slots = self._calls.get(slot[0])
        if slots is not None:
            slots.pop(slot, None)
            if not slots:
                del self._calls[slot[0]]
