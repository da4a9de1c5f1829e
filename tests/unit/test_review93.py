"""A fifty-...th attacker's review (December 2026) of ab09b70 (the ninety-third): stop
34's fixes on the phone, the record keeping read without pjsua (``E2MPhone`` built
without an endpoint).  The wire tests, with the attacker, the messages, the effect, the
code at fault and what held: ``tests/pjsua/test_review93_phone.py`` (the phone) and
``tests/kamailio/test_review93_wire.py`` (the certificate service).

Hole 1 / 2 here (``test_hole_another_cseq_on_a_taken_branch_is_not_refused``,
``test_hole_another_call_id_on_a_taken_branch_is_not_refused``): an **untrusted hop**'s
bodiless copy of alice's request on her Via branch, with one more CSeq (or another
Call-ID), then her real one.  ``_one_content_per_transaction`` keys a transaction by
``_rx_key`` (Call-ID, CSeq, method, what, branch), pjsip by branch and method (INVITE
and ACK together): the real one is not refused 482, pjsip absorbs it as the copy's
retransmission (alice gets the copy's 200), and for an INVITE the call pjsua took shows
her offer.  Fix: key ``_rx_tsx`` as pjsip keys a server transaction.

Hole 3 here (``test_hole_a_second_dialog_under_the_call_id_shows_the_first_ones_offer``):
an **untrusted hop** (or anyone with the Call-ID) rings bob with a bodiless INVITE of its
own under alice's Call-ID (a new From tag, another CSeq): ``call_security`` of that call
shows alice's signed, encrypted offer (records kept per Call-ID, ``_taken_by_call``
hides only the new call's own CSeq).  Fix: records per dialog; an incoming call shows a
received INVITE record only if it is the INVITE pjsua took or in that call's dialog.

Controls: the copy under alice's own CSeq is refused 482 (stop 34's fix), the same
octets again are a retransmission (not refused), a new request on a branch of its own is
taken; alice's own call shows her offer; her re-INVITE in her dialog is shown too.

Fixed (stop 35): the phone keys a received request's transaction as pjsip does
(``phone._rx_key``: an RFC 3261 branch and the method, an ACK under its INVITE's; an
ACK is never refused 482), so a copy on alice's branch under another CSeq or Call-ID is
refused 482 and reported; a call's security records carry their dialog's tags, and an
incoming call shows only the INVITE pjsua took or a re-INVITE of its own dialog
(``_taken_by_call``; the core model's ``_incoming`` keeps the caller's tag as
``_ev_incoming_call`` now does).  The certificate service counts a NOTIFY reply only
when none of its ids holds a ``|`` (``cert_route.on_reply``): without one, the reply's
joined ids equal the stored string only when each id is equal.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import pytest

from e2m_plugins import sip
from e2m_plugins.ua import SecurityInfo
from pjsua_hooks.phone import E2MCall, E2MPhone, handed_digest
from pjsua_hooks.rawhook import RxReject

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


def _phone() -> E2MPhone:
    phone = E2MPhone.__new__(E2MPhone)          # only the record keeping, no pjsua
    phone._rx_tsx = OrderedDict()
    phone._rx_info = OrderedDict()
    phone._call_security = {}
    phone._pending_errors = deque()
    return phone


def _taken(phone: E2MPhone, msg: sip.SipMessage, now: float = 0.0) -> None:
    """What ``_on_rx`` does with a request it hands on unchanged."""
    from pjsua_hooks.phone import _bounded_put_aged, _rx_key
    handed = handed_digest(msg.serialize())
    phone._one_content_per_transaction(msg, _rx_key(msg), msg.method, handed, now)
    _bounded_put_aged(phone._rx_tsx, _rx_key(msg), handed, now)


def _alices(method: str = "MESSAGE") -> sip.SipMessage:
    body, ctype = (b"hi", "text/plain") if method == "MESSAGE" else (b"v=0\r\n", "application/sdp")
    return sip.make_request(method, "sip:bob@127.0.0.1:5070", from_uri=ALICE, to_uri=BOB,
                            body=body, content_type=ctype)


def _copy(real: sip.SipMessage, *, cseq: int | None = None,
          call_id: str | None = None) -> sip.SipMessage:
    copy = real.with_body(b"").remove("Content-Type")
    if cseq is not None:
        copy = copy.replace("CSeq", f"{cseq} {real.cseq[1]}")
    if call_id is not None:
        copy = copy.replace("Call-ID", call_id)
    assert copy.via_branch() == real.via_branch()
    return copy


def _refused_482(phone: E2MPhone, msg: sip.SipMessage) -> bool:
    try:
        _taken(phone, msg, 0.1)
    except RxReject as exc:
        return exc.code == 482
    return False


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_another_cseq_on_a_taken_branch_is_not_refused(method):
    phone, real = _phone(), _alices(method)
    _taken(phone, _copy(real, cseq=real.cseq[0] + 1))
    assert _refused_482(phone, real)


def test_hole_another_call_id_on_a_taken_branch_is_not_refused():
    phone, real = _phone(), _alices()
    _taken(phone, _copy(real, call_id="r93-" + real.call_id))
    assert _refused_482(phone, real)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_copy_under_alices_own_cseq_is_refused(method):
    phone, real = _phone(), _alices(method)
    _taken(phone, _copy(real))
    assert _refused_482(phone, real)


def test_control_a_retransmission_and_a_request_of_its_own_are_taken():
    phone, real = _phone(), _alices()
    _taken(phone, real)
    assert not _refused_482(phone, real)                       # the same octets again
    other = _alices()                                          # a branch of its own
    assert other.via_branch() != real.via_branch()
    assert not _refused_482(phone, other)


# ----------------------------------------------------------------- hole 3: the records

_SIGNED = SecurityInfo(content_type="application/sdp", encrypted=True, signed=True)
_BARE = SecurityInfo(content_type="application/sdp")


def _record(phone: E2MPhone, msg: sip.SipMessage, info: SecurityInfo) -> bytes:
    handed = handed_digest(msg.serialize())
    phone._note_call_security("rx", msg, msg.method, info, size=1, handed=handed)
    return handed


def _incoming(msg: sip.SipMessage) -> E2MCall:
    # as ``_ev_incoming_call`` keeps it: (CSeq, digest, the caller's tag since stop 35)
    call = E2MCall(remote=ALICE, outgoing=False, initial=(msg.cseq[0],
                                                          handed_digest(msg.serialize()),
                                                          msg.from_tag or ""))
    call.call_ids.append(msg.call_id)
    return call


def _shown_signed(phone: E2MPhone, call: E2MCall) -> list:
    return [r for r in phone.call_security(call)
            if r["direction"] == "rx" and r["what"] == "INVITE" and r["security"]
            and (r["security"]["signed"] or r["security"]["encrypted"])]


def test_hole_a_second_dialog_under_the_call_id_shows_the_first_ones_offer():
    phone, alices = _phone(), _alices("INVITE")
    _record(phone, alices, _SIGNED)
    theirs = sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri=ALICE, to_uri=BOB,
                              call_id=alices.call_id, cseq=7)
    assert theirs.from_tag != alices.from_tag and not theirs.body
    assert _shown_signed(phone, _incoming(theirs)) == []


def test_control_alices_call_shows_her_offer_and_her_reinvite():
    phone, alices = _phone(), _alices("INVITE")
    _record(phone, alices, _SIGNED)
    reinvite = sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri=ALICE,
                                to_uri=BOB, call_id=alices.call_id, cseq=2,
                                from_tag=alices.from_tag, to_tag="bobs",
                                body=b"v=0\r\n", content_type="application/sdp")
    _record(phone, reinvite, _SIGNED)
    assert len(_shown_signed(phone, _incoming(alices))) == 2
