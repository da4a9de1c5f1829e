"""A fifty-...th attacker's review (December 2026) of ab09b70 (the ninety-third): stop
34's fixes on the phone (``pjsua_hooks/phone.py``: ``handed_digest``, the 482 of
``_one_content_per_transaction``, ``E2MCall.initial`` / ``_taken_by_call``), fresh
eyes.  Real ``e2m-phone listen`` processes (pjsua2) and plain UDP sockets on loopback,
no Kamailio; alice's requests are made with her real UA engine (signed and sealed for
bob), as they would cross an untrusted hop on the leg to bob's UDP phone.

Hole 1 (``test_hole_a_copy_ahead_under_another_cseq_takes_alices_invite_security``):

- attacker: an **untrusted hop** on the leg to bob's phone (UDP, no TLS), holding
  alice's signed, sealed INVITE for a moment (review 83's seat);
- messages: a bodiless copy of alice's INVITE on her very Via branch, same Call-ID and
  From tag, but ``CSeq: 2 INVITE`` where hers is ``1``; then alice's real one right
  after it (two datagrams, back to back);
- effect: the phone's transaction key (``_rx_key``: Call-ID, CSeq number, method, what,
  branch) differs, so no 482; pjsip's does not (RFC 3261 §17.2.3: pjsip keys a server
  transaction by the branch and, but for INVITE/ACK, the method: ``create_tsx_key_3261``),
  so pjsua answers the copy and absorbs alice's real INVITE as its retransmission.  The
  call pjsua took (no offer from anyone) is then shown with alice's offer "encrypted by
  alice for us, signed by sip:alice@example.com (trusted)": ``E2MCall.initial`` is
  ``(2, digest(copy))`` and ``_taken_by_call`` hides only received INVITE records of
  CSeq 2, so her record under CSeq 1 is shown as the call's.  Review 83's INVITE hole
  back with one digit changed.
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` (line 324, used by
  ``_one_content_per_transaction`` line 661) is not pjsip's transaction key, and
  ``E2MPhone._taken_by_call`` (line 1342: ``record["cseq"] != cseq or ...``) lets every
  received INVITE record of another CSeq through;
- fix: key ``_rx_tsx`` as pjsip does (top Via branch, plus the method unless INVITE or
  ACK; the sent-by too to be safe), so any other octets on a taken branch are 482; and
  show a received INVITE record as an incoming call's only if it is the INVITE pjsua took
  (its digest) or an in-dialog request of that call's dialog (its To tag ours, its From
  tag the initial INVITE's), never by CSeq alone.

Hole 2 (``test_hole_a_copy_ahead_under_another_cseq_swallows_alices_message``): the same
with alice's MESSAGE (the copy bodiless, ``CSeq`` one more).  Effect: the copy is shown
(empty, plaintext), alice's real MESSAGE is answered with the copy's 200 (pjsip's
retransmission of it, the copy's CSeq or Call-ID, on her branch) and is never shown, and
bob is not told (no ``duplicate_refused``): the silent swallow under a 200 that stop 34's
482 was to end (review 83's "Fixed" paragraph promises "her real one refused 482 and bob
told").  A Call-ID changed instead of the CSeq does the same (the copy then a message of
its own).  At fault and fix: as hole 1 (``_rx_key``).

Hole 3 (``test_hole_a_second_dialog_under_alices_call_id_shows_her_offer``):

- attacker: an **untrusted hop** that read alice's INVITE (its Call-ID), or anyone who
  learnt the Call-ID (stop 30's row);
- messages: after alice's signed, sealed INVITE rang bob (and was answered), a bodiless
  INVITE of its own: alice's Call-ID, ``From: <alice>`` with a new tag, ``CSeq: 7
  INVITE``, a new branch (a second dialog under her Call-ID, which pjsua takes as a new
  call, as stop 30's row says any may);
- effect: bob's phone shows this second call (its ``call_incoming`` event and
  ``call_security``), which carried no offer and no signature, as "encrypted by alice
  for us, signed by sip:alice@example.com (trusted)": ``_call_security`` is kept per
  Call-ID, and ``_taken_by_call`` shows every received INVITE record whose CSeq is not
  the new call's;
- at fault: ``pjsua_hooks/phone.py`` ``_note_call_security`` (records keyed by Call-ID
  alone, line 780) and ``_taken_by_call`` (line 1342);
- fix: keep a call's records per dialog (Call-ID, From tag, To tag of the received
  request), and show a received INVITE record as an incoming call's only if it is the
  INVITE pjsua took or in that call's dialog.

Controls: alice's INVITE alone is shown with her security (``test_control_*``); the copy
on her branch under her CSeq is refused 482 and shows nothing of hers (stop 34's fix
for that exact form holds); the bodiless second-dialog INVITE with a Call-ID of its own
rings as a call with no signed or encrypted record (the Call-ID is what lends alice's).

Hole 3 needs no timing: ``_call_security`` keeps a Call-ID's records with no age (512
Call-IDs, oldest out), so the same INVITE long after alice's call ended rings a call
shown with her offer.  Hole 1's copy may equally come over TCP while hers comes over
UDP: pjsip's key has no transport.

Tried and held:

- (run) a retransmission of alice's own request is never refused: the engine opens the
  same signed, sealed MESSAGE or INVITE to the same octets every time (three opens,
  one digest), so ``_one_content_per_transaction`` finds the same digest;
- (read) ``_ev_message`` looks a MESSAGE's record up by the digest of pjsua's
  ``whole_msg``: whichever copy pjsip delivers is shown with its own record only (hole
  2's copy is shown empty and "plaintext", never with alice's security);
- (read) an ACK or a CANCEL on alice's INVITE branch ahead of her INVITE: an ACK with
  no transaction makes none in pjsip, a CANCEL's key has its own method; her INVITE is
  then taken normally; a copy with another method on her MESSAGE's branch is another
  transaction to pjsip too (the method is in its key);
- (read) ``whole_msg`` against the handed octets: the hook's output is what pjsip
  parses (a plaintext body as the core read it, ``as_read``), pjsip adds ``received``
  and ``rport`` to its parsed Via, not to the buffer; review 83's controls show the
  digests meet;
- the certificate service's Via branch prediction and late replies: see
  ``tests/kamailio/test_review93_wire.py``.

Fixed (stop 35): as ``tests/unit/test_review93.py``'s docstring says.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review83_phone import (ALICES_TEXT, _alices_message, _bodiless_copy,
                                             _copy_ahead_is_never_shown_as_alices,
                                             _rx_invite_marks)

pytestmark = [pytest.mark.pjsua2]

CALL_KINDS = ("call_incoming", "call_media", "call_state", "call_ended")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review93-pki"),
                         users=("alice", "bob"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
        ) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _alices_invite(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger) -> sip.SipMessage:
    alice = ua_engine(pki, "alice", peers=("bob",))
    plain = sip.make_request(
        "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
        to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}", body=SRTP_OFFER,
        content_type="application/sdp",
        extra_headers=[("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")])
    return alice.protect(plain).message


def _with_cseq(msg: sip.SipMessage, number: int) -> sip.SipMessage:
    return msg.replace("CSeq", f"{number} {msg.cseq[1]}")


def _finals(peer: UdpStranger, branch: str, wait: float) -> list[tuple[int, int, str]]:
    time.sleep(wait)
    answers = [sip.parse(d) for d in peer.drain(0.5)]
    return [(a.status, a.cseq[0], a.call_id) for a in answers
            if not a.is_request and a.via_branch() == branch and a.status >= 200]


# ----------------------------------------------------------- hole 1: INVITE, another CSeq

def _invite_copy_ahead(pki: TestPKI, bob: PhoneProcess, *, copy_cseq: int | None
                       ) -> tuple[list[dict], list, list[dict]]:
    """The hop sends a bodiless copy of alice's INVITE on her branch under ``copy_cseq``
    (None: no copy), then her real one.  bob's call events, the final answers on her
    branch, bob's duplicate_refused events."""
    peer = UdpStranger(bob.port)
    try:
        real = _alices_invite(pki, bob, peer)
        mark = bob.mark()
        if copy_cseq is not None:
            peer.send(_with_cseq(_bodiless_copy(real), copy_cseq).serialize())
        peer.send(real.serialize())
        finals = _finals(peer, real.via_branch(), 2.0)
        try:    # the call's whole life: its end shows every record it was given
            bob.wait("call_ended", since=mark, timeout=8)
        except AssertionError:
            pass
        events = [e for kind in CALL_KINDS for e in bob.of(kind, since=mark)]
        return events, finals, bob.of("duplicate_refused", since=mark)
    finally:
        peer.close()


def test_hole_a_copy_ahead_under_another_cseq_takes_alices_invite_security(pki, bob):
    events, finals, refused = _invite_copy_ahead(pki, bob, copy_cseq=2)
    print(f"\nfinals on alice's branch: {finals}; refused: {refused}; marks: "
          f"{_rx_invite_marks(events)}")
    assert any(e["kind"] == "call_incoming" for e in events), events
    assert _rx_invite_marks(events) == [], _rx_invite_marks(events)


def test_control_the_copy_under_alices_own_cseq_is_refused_and_shows_nothing(pki, bob):
    """Stop 34's fix for review 83's exact form holds: the same copy under alice's own
    CSeq is taken by pjsua, alice's real one refused 482 (bob told), and the call shows
    no signed or encrypted offer."""
    events, finals, refused = _invite_copy_ahead(pki, bob, copy_cseq=1)
    assert any(e["kind"] == "call_incoming" for e in events), events
    assert _rx_invite_marks(events) == []
    assert 482 in [f[0] for f in finals] and [r["code"] for r in refused] == [482], \
        (finals, refused)


def test_control_alices_invite_alone_is_shown_with_her_security(pki, bob):
    events, finals, _ = _invite_copy_ahead(pki, bob, copy_cseq=None)
    assert 200 in [f[0] for f in finals], finals
    assert _rx_invite_marks(events), events


# ---------------------------------------------------------- hole 2: MESSAGE, another CSeq

def _message_copy_ahead(pki: TestPKI, bob: PhoneProcess, *, copy_cseq: int | None,
                        new_call_id: bool = False):
    peer = UdpStranger(bob.port)
    try:
        real = _alices_message(pki, bob, peer)
        copy = _bodiless_copy(real)
        if copy_cseq is not None:
            copy = _with_cseq(copy, copy_cseq)
        if new_call_id:
            copy = copy.replace("Call-ID", "r93-" + real.call_id)
        mark = bob.mark()
        peer.send(copy.serialize())
        peer.send(real.serialize())
        finals = _finals(peer, real.via_branch(), 1.5)
        return bob.of("message_in", since=mark), finals[0][0] if finals else None, \
            [f[0] for f in finals], bob.of("duplicate_refused", since=mark), finals
    finally:
        peer.close()


def test_hole_a_copy_ahead_under_another_cseq_swallows_alices_message(pki, bob):
    shown, status, finals, refused, raw = _message_copy_ahead(pki, bob, copy_cseq=2)
    print(f"\nshown: {[(e['text'], (e['security'] or {}).get('summary')) for e in shown]};"
          f" finals on alice's branch: {raw}; refused: {refused}")
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_hole_a_copy_ahead_under_another_call_id_swallows_alices_message(pki, bob):
    shown, status, finals, refused, raw = _message_copy_ahead(pki, bob, copy_cseq=None,
                                                              new_call_id=True)
    print(f"\nshown: {[(e['text'], (e['security'] or {}).get('summary')) for e in shown]};"
          f" finals on alice's branch: {raw}; refused: {refused}")
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_control_the_message_copy_under_alices_own_cseq_is_refused_482(pki, bob):
    """Stop 34's fix for review 83's exact form: the copy is shown empty and plaintext,
    alice's real one is refused 482 and bob told."""
    shown, status, finals, refused, _ = _message_copy_ahead(pki, bob, copy_cseq=1)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)
    assert 482 in finals and [r["code"] for r in refused] == [482]


# ---------------------------------------------------- hole 3: a second dialog, same Call-ID

def _second_dialog(pki: TestPKI, bob: PhoneProcess, *, same_call_id: bool
                   ) -> tuple[list[dict], list[dict], sip.SipMessage]:
    """alice's INVITE rings bob (answered 200); then the attacker's bodiless INVITE,
    alice's From with a new tag, CSeq 7, a new branch, under alice's Call-ID (or one of
    its own).  bob's call_incoming events for alice's call and for the attacker's."""
    peer = UdpStranger(bob.port)
    other = UdpStranger(bob.port)
    try:
        real = _alices_invite(pki, bob, peer)
        mark = bob.mark()
        peer.send(real.serialize())
        assert 200 in [f[0] for f in _finals(peer, real.via_branch(), 2.0)]
        theirs = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{other.local_port}", cseq=7,
            call_id=real.call_id if same_call_id else None,
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{other.local_port}>")])
        assert theirs.from_tag != real.from_tag and theirs.body == b""
        later = bob.mark()
        other.send(theirs.serialize())
        assert 200 in [f[0] for f in _finals(other, theirs.via_branch(), 2.0)]
        first = bob.of("call_incoming", since=mark)
        second = bob.of("call_incoming", since=later)
        return first, second, theirs
    finally:
        peer.close()
        other.close()


def test_hole_a_second_dialog_under_alices_call_id_shows_her_offer(pki, bob):
    first, second, theirs = _second_dialog(pki, bob, same_call_id=True)
    print(f"\nthe attacker's call (no body, no signature) shown with: "
          f"{_rx_invite_marks(second)}")
    assert second, "the second INVITE did not ring"
    assert _rx_invite_marks(second) == [], _rx_invite_marks(second)


def test_control_a_second_call_with_a_call_id_of_its_own_shows_nothing_signed(pki, bob):
    """The same bodiless INVITE under a Call-ID of its own rings as a call with no
    signed or encrypted record; alice's own call did show hers (the set-up is sound)."""
    first, second, _ = _second_dialog(pki, bob, same_call_id=False)
    assert first and _rx_invite_marks(first[:1]), first
    assert second and _rx_invite_marks(second) == [], second
