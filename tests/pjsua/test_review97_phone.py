"""A fifty-...th attacker's review (December 2026) of d91b4b5: stop 35's newest phone and
UA fixes (review 95's: ``phone._rx_key`` "builds pjsip's own transaction key"), on a real
``e2m-phone listen`` (pjsua2 2.15) with plain UDP sockets on loopback, no Kamailio.
alice's MESSAGE is made with her real UA engine (signed and sealed for bob), as it
would cross an untrusted hop on the leg to bob's UDP phone; alice is an RFC 2543 peer
(her top Via branch has no ``z9hG4bK`` cookie, review 95's hole 3 set-up).  The core
model and what held: ``tests/unit/test_review97.py``.

Holes 1-4: review 95's fix keys an RFC 2543 request by the method, the CSeq number,
the From tag, the Call-ID and the top Via's sent-by *as written* (lower-cased sent-by,
the rest exact).  pjsip (``create_tsx_key_2543``) prints the same fields into a string
(the port as a number: ``pj_utoa(via->sent_by.port)``; the branch as written, with its
quotes: ``int_parse_via_param`` keeps them, so ``"z9hG4bK..."`` is no cookie) and looks
it up with ``pj_hash_get_lower``: case folded.  Each hole:

- attacker: an **untrusted hop** on the leg to bob's UDP phone (review 83's seat), or
  an off-path sender who read the MESSAGE's ids;
- messages: a bodiless copy of alice's MESSAGE (same CSeq, Call-ID, From tag, sent-by,
  and branch), with one field spelt as pjsip reads it the same but ``_rx_key`` does not:
  hole 1 the Call-ID in other letters
  (``test_hole_a_2543_copy_with_the_call_id_in_other_letters_swallows_alices_message``),
  hole 2 the From tag in other letters (``..._with_the_from_tag_in_other_letters_...``),
  hole 3 the sent-by port with a leading zero (``..._with_a_leading_zero_in_the_port_...``),
  hole 4 the branch ``"z9hG4bKhop"`` in quotes (``..._on_a_quoted_cookie_branch_...``);
  then alice's real one, back to back;
- effect (run): bob's phone shows the hop's empty plaintext MESSAGE, alice's real
  signed and sealed MESSAGE is absorbed by pjsip as the copy's retransmission: she gets
  the copy's 200 again, bob never sees her text and is not told (no 482, no
  ``duplicate_refused``) - review 93/95's swallow back for a 2543 peer;
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` lines 350-360 (the 2543 key: Call-ID
  and From tag kept as written, the sent-by as a string, the branch read unquoted by the
  core's ``via_branch`` where pjsip keeps the quotes);
- fix: fold the case of the whole key (``str.lower`` of every field, as
  ``pj_hash_get_lower`` does); take the sent-by as (host lower-cased, port as an int, 0
  when absent); decide 3261 vs 2543 on the branch *as pjsip reads it* (a quoted value is
  no cookie: read the raw parameter, quotes kept) - or better: refuse (400) a request
  whose top Via branch is quoted or has no cookie when its 2543 key is already taken with
  other octets, with every field compared case-insensitively.

Hole 5 (``test_hole_a_copy_with_a_via_the_core_cannot_read_swallows_alices_reinvite``),
RFC 3261 (every deployment: the top Via at bob is Kamailio's, with the cookie):

- attacker: an **untrusted hop** on the leg to bob's UDP phone;
- messages: alice (scripted with her real engine) calls bob's phone, 200, ACK; her hold
  re-INVITE (CSeq 2, signed, SDP sealed for bob, ``a=sendonly``) is held by the hop,
  which first sends a bodiless copy of it on her very branch with ``;rport;rport`` in
  the top Via, then hers;
- effect (run): finals ``[200, 200, 200]`` on her branch, no 482, no
  ``duplicate_refused``; bob's 200 (sealed for alice) offers ``a=sendrecv``: pjsua took
  the bodiless copy and absorbed her hold as its retransmission (her phone holds, bob's
  media never did); and bob's phone files her signed, sealed hold as the call's record
  ("encrypted by alice ... signed by alice (trusted)"), which pjsua never took;
- at fault: ``_rx_key`` lines 346-349: ``via_branch`` raises on the repeated parameter
  and the copy is keyed as an RFC 2543 request with branch "" ("pjsip refuses such a
  request": it does not - it reads the Via, last value of a repeated parameter wins);
- fix: refuse (400) in ``_on_rx`` a request whose top Via the core cannot read.

Controls: alice's 2543 MESSAGE alone is shown with her security; the copy with every
field as alice wrote it (review 95's fix) is refused 482 and bob told; a copy whose
Call-ID differs by one character is another transaction to pjsip too (alice's
real one is then shown or refused by pjsip, never absorbed as the copy's).  Her hold
alone is answered ``a=recvonly`` and filed with her security; the hold's copy with a
readable Via is refused 482 and her refused hold is not filed.

Fixed (stop 36): as ``tests/unit/test_review97.py``'s docstring says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import UdpStranger
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review83_phone import (ALICES_TEXT, _alices_message, _bodiless_copy,
                                             _copy_ahead_is_never_shown_as_alices)

pytestmark = [pytest.mark.pjsua2]

HERS = "r2543-alice"        # alice's branch: an RFC 2543 peer (no cookie)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review97-pki"),
                         users=("alice", "bob"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
        ) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _via(msg: sip.SipMessage, old: str, new: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None and old in via, (via, old)
    return msg.replace("Via", via.replace(old, new, 1))


def _other_call_id(copy: sip.SipMessage) -> sip.SipMessage:
    other = copy.call_id.swapcase()
    assert other != copy.call_id
    return copy.replace("Call-ID", other)


def _other_from_tag(copy: sip.SipMessage) -> sip.SipMessage:
    tag = copy.from_tag or ""
    assert tag.swapcase() != tag, tag
    return copy.replace("From", (copy.get("From") or "").replace(f"tag={tag}",
                                                                 f"tag={tag.swapcase()}"))


def _zero_port(copy: sip.SipMessage) -> sip.SipMessage:
    via = copy.get("Via") or ""
    sent_by = via.split(None, 1)[1].partition(";")[0]
    host, _, port = sent_by.rpartition(":")
    return _via(copy, sent_by, f"{host}:0{port}")


def _quoted_cookie(copy: sip.SipMessage) -> sip.SipMessage:
    return _via(copy, f"branch={HERS}", 'branch="z9hG4bKhop97"')


def _copy_ahead(pki: TestPKI, bob: PhoneProcess,
                mutate: Callable[[sip.SipMessage], sip.SipMessage] | None):
    """The hop's bodiless copy of alice's (RFC 2543) MESSAGE, ``mutate``d, then hers.
    bob's message_in events, the first final status, every final status, bob's
    duplicate_refused events."""
    peer = UdpStranger(bob.port)
    try:
        real = _alices_message(pki, bob, peer)
        real = _via(real, f"branch={real.via_branch()}", f"branch={HERS}")
        mark = bob.mark()
        if mutate is not None:                    # None: alice's alone
            peer.send(mutate(_bodiless_copy(real)).serialize())
        peer.send(real.serialize())
        time.sleep(1.5)
        answers = [sip.parse(d) for d in peer.drain(0.5)]
        finals = [a.status for a in answers if not a.is_request and a.status >= 200]
        shown = bob.of("message_in", since=mark)
        refused = bob.of("duplicate_refused", since=mark)
        print(f"\nshown: {[(e['text'], (e['security'] or {}).get('summary')) for e in shown]};"
              f" finals: {finals}; refused: {refused}")
        return shown, finals[0] if finals else None, finals, refused
    finally:
        peer.close()


def _alices_never_swallowed(shown, status, finals, refused) -> None:
    """Fixed (stop 36): a copy whose top Via the core reads otherwise than pjsip (a
    quoted branch, a port pjsip reads as a number of more than five digits) is refused
    400 at the hook, before pjsip sees it, and alice's MESSAGE is shown; any other copy
    pjsip takes for hers is refused 482 (review 83's outcome)."""
    if status == 400:
        assert finals == [400, 200] and not refused, (finals, refused)
        assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
        return
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_control_an_rfc_2543_peers_message_alone_is_shown(pki, bob):
    shown, status, finals, refused = _copy_ahead(pki, bob, None)
    assert finals == [200]
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    assert shown[0]["security"]["signed"] and shown[0]["security"]["encrypted"]


def test_control_the_2543_copy_as_alice_wrote_it_is_refused_482(pki, bob):
    shown, status, finals, refused = _copy_ahead(pki, bob, lambda c: c)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)
    assert 482 in finals and [r["code"] for r in refused] == [482]


def test_control_a_copy_under_another_call_id_is_another_pjsip_transaction(pki, bob):
    """One character more in the Call-ID: pjsip's key differs too, so alice's real
    MESSAGE is never absorbed as the copy's retransmission (shown, or refused)."""
    shown, status, finals, refused = _copy_ahead(
        pki, bob, lambda c: c.replace("Call-ID", c.call_id + "x"))
    assert any(e["text"] == ALICES_TEXT.decode() for e in shown) or 482 in finals, finals


def test_hole_a_2543_copy_with_the_call_id_in_other_letters_swallows_alices_message(pki, bob):
    _alices_never_swallowed(*_copy_ahead(pki, bob, _other_call_id))


def test_hole_a_2543_copy_with_the_from_tag_in_other_letters_swallows_alices_message(pki, bob):
    _alices_never_swallowed(*_copy_ahead(pki, bob, _other_from_tag))


def test_hole_a_2543_copy_with_a_leading_zero_in_the_port_swallows_alices_message(pki, bob):
    _alices_never_swallowed(*_copy_ahead(pki, bob, _zero_port))


def test_hole_a_2543_copy_on_a_quoted_cookie_branch_swallows_alices_message(pki, bob):
    _alices_never_swallowed(*_copy_ahead(pki, bob, _quoted_cookie))


# ------------------------------------- hole 5: an RFC 3261 re-INVITE, a Via the core cannot read

CALL_KINDS = ("call_incoming", "call_media", "call_state", "call_ended")


def _dup_rport(copy: sip.SipMessage) -> sip.SipMessage:
    """``;rport`` twice in the top Via: pjsip reads the Via (the branch, its cookie: an
    RFC 3261 transaction); the core's ``via_branch`` raises (a parameter given twice), so
    ``_rx_key`` files the copy under an RFC 2543 key."""
    return _via(copy, ";branch=", ";rport;rport;branch=")


def _finals_on(peer: UdpStranger, branch: str, wait: float) -> list[sip.SipMessage]:
    time.sleep(wait)
    answers = [sip.parse(d) for d in peer.drain(0.5)]
    return [a for a in answers if not a.is_request and a.status >= 200
            and a.via_branch() == branch]


def _hold_copy_ahead(pki: TestPKI, bob: PhoneProcess,
                     mutate: Callable[[sip.SipMessage], sip.SipMessage] | None):
    """alice (scripted, her real engine; RFC 3261 branches) calls bob's phone, which
    answers; ACK.  Her hold re-INVITE (CSeq 2, signed, SDP sealed for bob) is held by the
    hop, which sends its bodiless copy ``mutate``d first (None: none), then hers.  Then
    alice's BYE.  The finals on her re-INVITE's branch, bob's duplicate_refused events,
    and bob's received-INVITE records of CSeq 2 (summary) from the call's events."""
    from e2m_lab.flows import SRTP_OFFER, ua_engine
    from tests.pjsua.test_review83_phone import HOST
    alice = ua_engine(pki, "alice", peers=("bob",))
    peer = UdpStranger(bob.port)
    try:
        contact = [("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")]
        common = dict(from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                      via_host=f"{HOST}:{peer.local_port}")
        target = f"sip:bob@{HOST}:{bob.port}"
        invite = alice.protect(sip.make_request(
            "INVITE", target, body=SRTP_OFFER, content_type="application/sdp",
            extra_headers=contact, **common)).message
        mark = bob.mark()
        peer.send(invite.serialize())
        ok = [a for a in _finals_on(peer, invite.via_branch(), 2.0) if a.status == 200][0]
        alice.open(ok)
        ids = dict(call_id=invite.call_id, from_tag=invite.from_tag, to_tag=ok.to_tag)
        peer.send(sip.make_request("ACK", target, cseq=1, **ids, **common).serialize())
        time.sleep(0.5)
        hold = SRTP_OFFER + b"a=sendonly\r\n"
        real = alice.protect(sip.make_request(
            "INVITE", target, cseq=2, body=hold, content_type="application/sdp",
            extra_headers=contact, **ids, **common)).message
        if mutate is not None:
            peer.send(mutate(_bodiless_copy(real)).serialize())
        peer.send(real.serialize())
        answers = _finals_on(peer, real.via_branch(), 2.0)
        finals = [f.status for f in answers]
        ok2 = [a for a in answers if a.status == 200]
        # what bob's pjsua answered: to her hold (sendonly) a recvonly answer; to the
        # bodiless copy an offer of its own (sendrecv)
        answered = alice.open(ok2[0]).message.body if ok2 else b""
        peer.send(sip.make_request("ACK", target, cseq=2, **ids, **common).serialize())
        peer.send(sip.make_request("BYE", target, cseq=3, **ids, **common).serialize())
        try:
            bob.wait("call_ended", since=mark, timeout=8)
        except AssertionError:
            pass
        records = [(r["security"] or {}).get("summary", "")
                   for kind in CALL_KINDS for e in bob.of(kind, since=mark)
                   for r in (e.get("security") or [])
                   if r["direction"] == "rx" and r["what"] == "INVITE" and r.get("cseq") == 2
                   and r["security"]]
        refused = bob.of("duplicate_refused", since=mark)
        print(f"\nfinals on alice's hold branch: {finals}; refused: {refused}; "
              f"bob's records of her hold: {sorted(set(records))}; "
              f"bob's 200 says: {_directions(answered)}")
        return finals, refused, records, answered
    finally:
        peer.close()


def _directions(sdp: bytes) -> list[bytes]:
    return [line for line in sdp.splitlines() if line.startswith(b"a=") and line[2:] in
            (b"sendrecv", b"sendonly", b"recvonly", b"inactive")]


def _hold_never_swallowed(finals: list[int], refused: list[dict], records: list[str],
                          answered: bytes) -> None:
    """Secure: bob's pjsua took alice's signed, sealed hold (its 200 answers it:
    recvonly), or her hold was refused 482 and bob told - never absorbed under the copy's
    200 while bob's phone files her signed hold as the call's."""
    took_hers = b"a=recvonly" in answered
    assert took_hers or (482 in finals and [r["code"] for r in refused] == [482]), \
        (finals, refused, records, answered)
    if not took_hers:
        assert not records, records


def test_control_alices_hold_alone_is_taken_with_her_security(pki, bob):
    finals, refused, records, answered = _hold_copy_ahead(pki, bob, None)
    assert 200 in finals and not refused and b"a=recvonly" in answered
    assert records and all("signed by sip:alice@example.com" in r for r in records)
    _hold_never_swallowed(finals, refused, records, answered)


def test_control_the_hold_copy_with_a_readable_via_is_refused_482(pki, bob):
    finals, refused, records, answered = _hold_copy_ahead(pki, bob, lambda c: c)
    assert 482 in finals and [r["code"] for r in refused] == [482]
    assert not records                 # her refused hold is not filed as the call's


def test_hole_a_copy_with_a_via_the_core_cannot_read_swallows_alices_reinvite(pki, bob):
    _hold_never_swallowed(*_hold_copy_ahead(pki, bob, _dup_rport))
