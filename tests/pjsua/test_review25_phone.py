"""Review 25 (attacker's review of the phone and the UA engine): attacks on a real
``e2m-phone listen`` process (pjsua2) from plain sockets on loopback, no Kamailio.

The phone tells an initial request from an in-dialog one with its own regular
expression over the raw To header (``firstcopy._to_tagged`` and ``phone._to_tag``:
``;tag=`` anywhere after the first ``>``), while the core (``SipMessage.to_tag``) and
pjsip parse the header: a display name or a quoted header parameter that holds
``>;tag=`` is no tag to them, but a tag to the phone.  The signed SIP context binds the
To AoR and the To tag, never the display name or other parameters, so anyone may
write them.

``test_hole_*`` were strict xfails on ``2ddf22c`` (each failed there, as the review's
``--runxfail`` runs showed) and pass since the phone reads the To tag with the core's
parser and keeps a security record for every request under its own transaction (top Via
branch).  ``test_control_*``: the same flows without the odd To header.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.stranger import HOST, UdpStranger, sip_request
from e2m_plugins import sip
from e2m_plugins.ua import next_attempt
from e2m_plugins.testpki import TestPKI
from tests.pjsua.test_review2_phone import answered_and_acked, bob, pki  # noqa: F401 - fixtures

pytestmark = [pytest.mark.pjsua2]

# What a hop (or a stranger) writes in To: no tag for the core and pjsip, a tag for the
# phone's regular expression.
ODD_TO_DISPLAY = '"x>;tag=1"'


def _with_odd_to(message: sip.SipMessage) -> sip.SipMessage:
    """The same message with a display name in To that holds ``>;tag=`` (the To AoR,
    and the absence of a To tag, as the core and pjsip read them, unchanged)."""
    to = message.get("To") or ""
    uri = to if to.strip().startswith("<") else f"<{to.strip()}>"
    odd = message.replace("To", f"{ODD_TO_DISPLAY} {uri}")
    assert odd.to_tag is None and odd.address("To").uri == message.address("To").uri
    return odd


def _challenged_and_real(pki: TestPKI, port: int, peer: UdpStranger, method: str
                         ) -> tuple[sip.SipMessage, bytes, bytes]:
    """alice's first attempt (CSeq 1, the one a proxy refused 407) and her retry
    (CSeq 2, new branch), each protected for its own CSeq, as the phone sends them."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    body, ctype = ((SRTP_OFFER, "application/sdp") if method == "INVITE"
                   else (b"pay carol 10 euros", "text/plain"))
    extra = [("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")] if method == "INVITE" else []
    plain = sip.make_request(method, f"sip:bob@{HOST}:{port}", from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}",
                             body=body, content_type=ctype, extra_headers=extra)
    first = alice.protect(plain).message
    retry = alice.protect(next_attempt(plain)).message
    return first, first.serialize(), retry.serialize()


def _challenged_invite_sent_again(pki: TestPKI, bob: PhoneProcess, *, odd: bool
                                  ) -> tuple[int, bytes | None]:
    """alice's real INVITE (the retry) rings bob and is ACKed; then the challenged first
    attempt is sent to bob straight (with the odd To when ``odd``).  Returns how many
    calls rang and the final answer to the copy."""
    peer = UdpStranger(bob.port)
    try:
        first, _, retry = _challenged_and_real(pki, bob.port, peer, "INVITE")
        mark = answered_and_acked(pki, bob, peer, retry, sip.parse(retry))
        copy = _with_odd_to(first) if odd else first
        peer.send(copy.serialize())                       # the hop's copy of attempt 1
        again = peer.answered(first.call_id, timeout=4)
        time.sleep(0.5)
        return len(bob.of("call_incoming", since=mark)), again
    finally:
        peer.close()


def test_hole_the_challenged_first_invite_with_an_odd_to_display_name_rings_a_second_call(
        pki, bob):
    """Attacker: an untrusted on-path hop (or anyone on a leg without TLS) that saw
    alice's first INVITE, the one her proxy refused 407 (docs/threat-model.md, "The
    phone with digest and TLS").

    Attack: once alice's real call (the digest retry, CSeq 2) is up at bob, send the
    challenged first attempt (CSeq 1, a valid signed body bob's replay check never saw)
    to bob's phone straight, with one change the signature does not cover: To's display
    name becomes ``"x>;tag=1"``.  ``FirstCopy.check`` reads the To header with a
    regular expression (``;tag=`` after the first ``>``) and takes the INVITE for an
    in-dialog request, so it is not checked as a copy; the core reads no To tag, so the
    signed context (empty To tag, To AoR unchanged) matches; pjsip reads no To tag
    either and starts a new call.

    Effect: a second call rings at bob, shown as alice's, signed and trusted, and is
    answered 200 (the hole `FirstCopy` closed, ``test_the_challenged_first_invite_sent_
    to_the_peer_rings_no_second_call``, open again).  The same works for a MESSAGE
    (shown twice: ``tests/unit/test_review25.py``).

    Fix: decide "initial or in-dialog" from the parsed To tag (``request.to_tag``, as the
    engine and pjsip do) in ``firstcopy._to_tagged`` and ``phone._to_tag``, never from
    the raw header text."""
    calls, again = _challenged_invite_sent_again(pki, bob, odd=True)
    assert calls == 1, f"a second call rang: {calls} call_incoming events"
    assert again is not None and again.startswith(b"SIP/2.0 482"), again[:40] if again else again


def test_control_the_challenged_first_invite_sent_again_is_482(pki, bob):
    calls, again = _challenged_invite_sent_again(pki, bob, odd=False)
    assert calls == 1
    assert again is not None and again.startswith(b"SIP/2.0 482"), again[:40] if again else again


def _strangers_invites(bob: PhoneProcess, *, odd: bool, count: int = 3
                       ) -> tuple[list[int | None], int, int]:
    """``count`` bodiless INVITEs from a stranger bob holds no certificate of; returns
    their final answers within 2 s, bob's ``call_refused`` events and pjsua's calls."""
    stranger = UdpStranger(bob.port)
    try:
        mark = bob.mark()
        to = f"{ODD_TO_DISPLAY} <sip:bob@example.com>" if odd else "<sip:bob@example.com>"
        statuses = []
        for _ in range(count):
            _, call_id = stranger.request("INVITE", to=to)
            statuses.append(stranger.final(call_id, timeout=2.0))
        time.sleep(0.5)
        return statuses, len(bob.of("call_refused", since=mark)), bob.status()["pjsua_calls"]
    finally:
        stranger.close()


def test_hole_a_strangers_invite_with_an_odd_to_display_name_takes_a_call_slot(bob):
    """Attacker: an off-path stranger (docs/threat-model.md, "The phone against an
    off-path stranger", row 8).

    Attack: bodiless INVITEs from a caller bob holds no certificate of, whose To reads
    ``"x>;tag=1" <sip:bob@example.com>``.  ``E2MPhone._on_rx`` refuses an INVITE whose
    answer it could not protect only ``if not _to_tag(msg)``, and ``_to_tag`` is the same
    regular expression as FirstCopy's: it finds a tag in the display name, so the
    INVITE is taken for a re-INVITE and passed to pjsua, which reads no To tag and
    gives it a call slot.

    Effect: row 8 is back: no answer at once (pjsua's 200 cannot be protected, the hook
    refuses it, pjsip retransmits it into the hook until the caller gives up), each
    INVITE holds a pjsua call slot (``pjsua_calls``), and a few of them take every
    slot a real caller needs.

    Fix: ``phone._to_tag`` from the parsed To tag (``msg.to_tag``)."""
    statuses, refused, calls = _strangers_invites(bob, odd=True)
    assert (calls, refused) == (0, 3), \
        f"{calls} pjsua calls held by a stranger's INVITEs, {refused} refused, answers {statuses}"
    assert all(s is not None and s >= 400 for s in statuses), statuses


def test_control_a_strangers_invite_is_refused_at_once(bob):
    statuses, refused, calls = _strangers_invites(bob, odd=False)
    assert all(s is not None and s >= 400 for s in statuses), statuses
    assert refused == 3 and calls == 0


def _empty_message_after_a_signed_one(pki: TestPKI, bob: PhoneProcess, *, same_ids: bool
                                      ) -> tuple[list[dict], int | None]:
    """alice's signed MESSAGE reaches bob; then a bodiless MESSAGE "from alice" (another
    branch), under her message's Call-ID and CSeq when ``same_ids``, else fresh ones.
    Returns bob's message_in events since the first and the final answer to the second."""
    peer = UdpStranger(bob.port)
    try:
        first, _, _ = _challenged_and_real(pki, bob.port, peer, "MESSAGE")
        mark = bob.mark()
        peer.send(first.serialize())
        assert peer.final(first.call_id, timeout=5) == 200
        bob.wait("message_in", since=mark)
        call_id = first.call_id if same_ids else "fresh-" + first.call_id
        data = sip_request("MESSAGE", f"sip:bob@{HOST}:{bob.port}", via=peer.via,
                           call_id=call_id, cseq=first.cseq[0],
                           from_=f"<{pki.aor('alice')}>;tag=forged", to=f"<{pki.aor('bob')}>")
        peer.send(data)
        status = peer.final(call_id, timeout=3)
        time.sleep(0.5)
        return bob.of("message_in", since=mark), status
    finally:
        peer.close()


def test_hole_a_bodiless_message_is_shown_with_an_earlier_messages_security(pki, bob):
    """Attacker: an untrusted hop (or anyone who saw the Call-ID and CSeq of one of
    alice's MESSAGEs to bob; SIP headers travel in the clear without TLS).

    Attack: after alice's signed, encrypted MESSAGE reached bob, send bob a MESSAGE
    without a body, From alice, with her message's Call-ID and CSeq (any From tag, a new
    branch).  The engine opens a bodiless request without complaint (nothing to
    refuse, even with ``require`` on), FirstCopy remembers only protected requests, and
    pjsua delivers it.  ``E2MPhone._on_rx`` records a message's SecurityInfo only
    ``if msg.body``, and ``_ev_message`` looks it up by (Call-ID, CSeq, method): the
    bodiless MESSAGE finds alice's.

    Effect: bob's phone shows a message nobody signed or encrypted (``message_in``, text
    empty) as "encrypted by sip:alice@... for us; signed by sip:alice@... (trusted)".

    Fix: record a SecurityInfo for every request handed to pjsua (an empty one for a
    bodiless message) so it replaces what an earlier message under the same key left,
    or key the record by what identifies this very message (its top Via branch)."""
    shown, status = _empty_message_after_a_signed_one(pki, bob, same_ids=True)
    assert len(shown) == 2 and status == 200, (len(shown), status)
    forged = shown[1]["security"]
    assert forged is None or not (forged["signed"] or forged["encrypted"] or forged["trusted"]), \
        forged["summary"]


def test_control_a_bodiless_message_under_fresh_ids_shows_no_security(pki, bob):
    shown, status = _empty_message_after_a_signed_one(pki, bob, same_ids=False)
    assert len(shown) == 2 and status == 200, (len(shown), status)
    assert shown[0]["security"]["trusted"]
    forged = shown[1]["security"]
    assert forged is None or not (forged["signed"] or forged["encrypted"] or forged["trusted"])


@pytest.mark.parametrize("header", ["Call-ID", "From"])
def test_an_id_the_core_refuses_is_answered_400_and_the_phone_goes_on(bob, header):
    """A stranger's MESSAGE whose Call-ID, or From tag, holds an octet that is not UTF-8
    (review 23 made the core refuse such ids): the Call-ID one reaches the phone's hook
    and is answered 400; pjsip's own parser drops the other before it (no answer).  No
    message event either way, and the phone answers the next request as before."""
    peer = UdpStranger(bob.port)
    try:
        mark = bob.mark()
        data = sip_request("MESSAGE", f"sip:bob@{HOST}:{bob.port}", via=peer.via,
                           call_id="r25-odd-XX", from_="<sip:stranger@example.net>;tag=sXX",
                           body=b"hello", content_type="text/plain")
        target = b"r25-odd-XX" if header == "Call-ID" else b"tag=sXX"
        peer.send(data.replace(target, target.replace(b"XX", b"\xe9")))
        answers = [d.split(b"\r\n", 1)[0] for d in peer.drain(timeout=3)
                   if d.startswith(b"SIP/2.0 ")]
        assert answers == ([b"SIP/2.0 400 Bad Request"] if header == "Call-ID" else []), answers
        assert not bob.of("message_in", since=mark)
        _, call_id = peer.request("OPTIONS")
        assert peer.final(call_id, timeout=5) == 200
    finally:
        peer.close()
