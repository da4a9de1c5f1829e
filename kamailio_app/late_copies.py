"""The answer a protected request got, kept 32 s for its late retransmissions.

tm absorbs a request's retransmissions only while its transaction lives (its wait
timer, 5 s after the final answer); a sender whose answer was lost keeps
retransmitting for Timer F's 32 s.  A copy after tm let go reaches the engine, whose
replay check refuses a body seen before: the sender was told 403 for a MESSAGE the
callee had (review 123 HB2).

So the bodiless 2xx a request the engine recorded (``Verdict.replay_key``) got is kept in the
htable ``e2manswered`` under that key for ``TRANSACTION_LIFETIME``, and a copy the
replay check refuses as that very message is given that answer here, statelessly,
and goes no further: nothing is relayed, archived or spent a second time.  The key is
the body's signed SIP context (``SipContext.replay_key``) with the request's To tag and
Request-URI (``answer_key``), so only the same signed request finds the answer; a hop replaying it within the 32 s gets a 200 and achieves
nothing.  A failure answer is not kept: a late copy of a refused request is refused
again (its answer may differ, it stays a failure).  Nothing here is a secret (a
digest and a status line).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from e2m_plugins.replay import TRANSACTION_LIFETIME
from e2m_plugins.sip import SipMessage

from .htable_items import put_expiring

__all__ = ["ANSWERED_TABLE", "ANSWER_KEY_AVP", "answer_key", "note_answer_key",
           "remember_answer", "remembered_answer"]

ANSWERED_TABLE = "e2manswered"          # declared in the cfg template
# The request's replay key, set in the request route; tm brings it to the reply route.
ANSWER_KEY_AVP = "$avp(e2m_answer_key)"
_KEY = re.compile(r"[0-9a-f]{32}")
_REASON = re.compile(r"[ -~]{1,64}")     # printable ASCII, bounded: it goes in a reply
# INVITE's 2xx is end to end (a proxy cannot make one up); ACK and CANCEL get no
# answer of their own to keep.
_NOT_KEPT = frozenset({"INVITE", "ACK", "CANCEL"})


def answer_key(replay_key: str | None, request: SipMessage) -> str | None:
    """What an answer is kept under: the replay key with the request's To tag and
    Request-URI as received.  A body from a sender before ``e2m-sip-to-tag`` binds no To
    tag, so her MESSAGEs in two forks of one call (the same CSeq) share a replay key;
    the second is a replay to the check (403), never a late copy of the first, which
    would answer it 200 and deliver nothing (review 129)."""
    if not replay_key or not _KEY.fullmatch(replay_key):
        return None
    bound = "\x00".join((replay_key, request.to_tag or "", request.request_uri or ""))
    return hashlib.sha256(bound.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def note_answer_key(ksr: Any, request: SipMessage, replay_key: str | None) -> None:
    """In the request route, for a request forwarded after the engine recorded it."""
    key = answer_key(replay_key, request)
    if key is not None and request.method not in _NOT_KEPT:
        ksr.pv.sets(ANSWER_KEY_AVP, key)


def remember_answer(ksr: Any) -> None:
    """In tm's reply route: a bodiless 2xx to a request noted above is kept for its late
    copies.  One with a body (an UPDATE's or PRACK's SDP answer) is not: a status line
    made up here would drop its answer, so its late copy is refused as before."""
    status = ksr.pv.get("$rs") or 0
    if not 200 <= status < 300 or int(ksr.pv.get("$bs") or 0) != 0:
        return
    key = ksr.pv.get(ANSWER_KEY_AVP)
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return
    reason = ksr.pv.get("$rr")
    if not isinstance(reason, str) or not _REASON.fullmatch(reason):
        reason = "OK"
    put_expiring(ksr, ANSWERED_TABLE, key, "%d %s" % (status, reason),
                 int(TRANSACTION_LIFETIME))


def remembered_answer(ksr: Any, request: SipMessage,
                      replay_key: str | None) -> tuple[int, str] | None:
    """The answer kept for the message a refused copy repeats; None when there is none
    (never answered 2xx, or longer ago than a transaction's lifetime)."""
    key = answer_key(replay_key, request)
    if key is None:
        return None
    held = ksr.htable.sht_get(ANSWERED_TABLE, key)
    if not isinstance(held, str):
        return None
    code, _, reason = held.partition(" ")
    if not code.isdigit() or not 200 <= int(code) < 300 or not _REASON.fullmatch(reason):
        return None
    return int(code), reason
