"""One delivery per request the sender meant once, across its digest retries.

A proxy that asks for digest refuses the first attempt of a MESSAGE or INVITE
with 401/407, and the phone sends it again with a new CSeq, protected again for
that CSeq (the signed context binds it).  The refused attempt is then a valid
body that never reached its recipient: whoever saw it on the way (a visited
network without TLS) can send it straight to the recipient, whose replay check
has never seen that CSeq, and the message would be shown twice, or a second
call would ring.

A request without a To tag (a new MESSAGE or an initial INVITE) is the sender's
*one* attempt at that Call-ID and From tag: pjsua makes a new Call-ID for every
MESSAGE and every call, and a retry (digest, 422, a 496/495/493 handled with the
same Call-ID) exists only because the earlier attempt never reached us.  So a
second one within the replay window is a copy, unless it is a retransmission of
the first (the same CSeq and top Via branch, which pjsip absorbs itself):

- MESSAGE: a second copy with the *same content* (other content under the same
  Call-ID is another message: some UAs reuse a Call-ID for a conversation);
- INVITE: any second initial INVITE.

Either is answered 482 (RFC 3261 §8.2.2.2, a merged request) and not delivered.
Only requests whose body was protected are remembered.

A repeat with the same CSeq and branch is a retransmission only while pjsip still has
the INVITE's transaction to absorb it: the ACK ends it (pjsip terminates the server
transaction on the ACK of a 2xx, and soon after the ACK of a failure), so the same
bytes after the ACK are someone's copy that pjsua would take as a new call: 482.
Over a reliable transport (a TCP or TLS phone: its one listener) nothing is ever
retransmitted, and pjsip ends a MESSAGE's transaction the moment it answers (Timer J
is 0): any repeat of a MESSAGE is a copy there.  A UDP phone also takes requests on a
TCP listener at its UDP port (RFC 3261 18.2.1): a MESSAGE that came that way
(``check(..., reliable=True)``) is held to the same rule, whichever way its copy comes.

Bounded: ``limit`` entries (the oldest go first) of at most ``max_age`` seconds, and
at most ``per_sender`` (``limit`` / 8) for one From URI, whose own oldest go first: one
user's flood of signed requests does not push out the entries of everyone else.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from e2m_plugins import sip
from e2m_plugins.errors import E2MError

__all__ = ["FirstCopy", "Duplicate"]


class Duplicate(Exception):
    """A copy of a request already delivered: ``code``/``reason`` to answer with."""

    def __init__(self, code: int, reason: str, method: str) -> None:
        super().__init__(f"a second copy of a {method} already delivered")
        self.code, self.reason, self.method = code, reason, method


def _sender(msg: sip.SipMessage) -> str:
    """The From URI (the signer, when the body was signed), or "" when unreadable."""
    try:
        return sip.parse_address(msg.get("From") or "").uri.lower()
    except E2MError:
        return ""


class FirstCopy:
    """Remembers the first copy of each new MESSAGE and initial INVITE taken."""

    def __init__(self, max_age: float, limit: int = 1024,
                 clock: Callable[[], float] = time.monotonic, *, reliable: bool = False,
                 per_sender: int | None = None) -> None:
        """``reliable``: every request reaches us over TCP or TLS."""
        self.max_age, self.limit, self.clock = max_age, limit, clock
        self.reliable = reliable
        self.per_sender = per_sender or (limit // 8 if limit >= 64 else limit)
        self._senders: dict[str, int] = {}           # From AoR -> entries kept
        # (method, Call-ID, From tag[, content digest]) -> (when, CSeq, top Via branch,
        # whether its transaction is over: the INVITE was ACKed or the MESSAGE came
        # over a stream, From AoR)
        self._seen: OrderedDict[tuple[str, ...], tuple[float, int, str, bool, str]] = \
            OrderedDict()
        self.absorbed = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, request: sip.SipMessage, plain: sip.SipMessage, protected: bool, *,
              reliable: bool | None = None) -> None:
        """Raise Duplicate if ``request`` (as received; ``plain`` as opened) copies a
        request already taken; otherwise remember it when its body was ``protected``
        (encrypted or signed: only such a body is worth copying, and a stranger's
        plaintext requests must not push the real entries out).  ``reliable``: it came
        over TCP or TLS (None: as the phone's transport, the constructor's)."""
        method = request.method
        if method == "ACK":
            self._acked(request)
            return
        # the core's reading of the To tag, which pjsip shares: a ";tag=" in a display
        # name or a quoted parameter is none (review 25)
        if method not in ("MESSAGE", "INVITE") or request.to_tag is not None:
            return
        key: tuple[str, ...] = (method, request.call_id, request.from_tag or "")
        if method == "MESSAGE":
            digest = hashlib.sha256((plain.get("Content-Type") or "").encode() + b"\0"
                                    + plain.body).hexdigest()
            key += (digest,)
        now = self.clock()
        self._expire(now)
        cseq, branch = request.cseq[0], request.via_branch()
        first = self._seen.get(key)
        if first is not None:
            if (first[1], first[2]) == (cseq, branch) and not first[3]:
                return               # a retransmission: pjsip's transaction has it
            self.absorbed += 1
            raise Duplicate(482, "Loop Detected", method)
        if not protected:
            return
        sender = _sender(request)
        if self._senders.get(sender, 0) >= self.per_sender:
            self._drop(next(k for k, v in self._seen.items() if v[4] == sender))
        # a MESSAGE taken over a stream: pjsip's transaction ends with its answer, so
        # nothing is left to absorb a repeat (same flag as an INVITE's ACK)
        over = (self.reliable if reliable is None else reliable) and method == "MESSAGE"
        self._seen[key] = (now, cseq, branch, over, sender)
        self._senders[sender] = self._senders.get(sender, 0) + 1
        while len(self._seen) > self.limit:
            self._drop(next(iter(self._seen)))

    def _drop(self, key: tuple[str, ...]) -> None:
        sender = self._seen.pop(key)[4]
        left = self._senders.get(sender, 1) - 1
        if left > 0:
            self._senders[sender] = left
        else:
            self._senders.pop(sender, None)

    def _acked(self, ack: sip.SipMessage) -> None:
        """The ACK of an initial INVITE taken (its CSeq): its transaction is over."""
        try:
            key, cseq = ("INVITE", ack.call_id, ack.from_tag or ""), ack.cseq[0]
        except E2MError:
            return
        first = self._seen.get(key)
        if first is not None and first[1] == cseq:
            self._seen[key] = (*first[:3], True, first[4])

    def _expire(self, now: float) -> None:
        while self._seen:
            key, (when, *_) = next(iter(self._seen.items()))
            if now - when <= self.max_age:
                break
            self._drop(key)
