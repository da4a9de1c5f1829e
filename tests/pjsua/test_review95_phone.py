"""A fifty-...th attacker's review (December 2026) of 13d9573 (the ninety-fifth): this
stop's phone fixes (``phone._rx_key``: a received request keyed "as pjsip does"), on a
real ``e2m-phone listen`` (pjsua2) with plain UDP sockets on loopback, no Kamailio;
alice's MESSAGE is made with her real UA engine (signed and sealed for bob), as it
would cross an untrusted hop on the leg to bob's UDP phone.  The core model, the
other holes and what held: ``tests/unit/test_review95.py``.

Hole 1 (``test_hole_a_copy_in_other_letters_swallows_alices_message``):

- attacker: an **untrusted hop** on the leg to bob's phone (review 83's seat);
- messages: a bodiless copy of alice's MESSAGE whose Via branch is hers with every
  letter after the cookie in the other case, then her real one, back to back;
- effect: pjsip finds its server transactions with ``pj_hash_get_lower`` (the key's
  case folded): the copy is delivered (empty, plaintext) and alice's real MESSAGE is
  absorbed as its retransmission - she gets a 200, bob never sees her text and is not
  told (no 482, no ``duplicate_refused``): review 93's swallow is back;
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` (lines 348-349) keeps the branch as
  written; fix: fold its case (and read the cookie case-insensitively, hole 2).

Hole 2 (``test_hole_a_copy_with_the_cookie_in_other_case_swallows_alices_message``):
the same with the cookie written ``Z9HG4BK``: pjsip reads it with ``pj_strnicmp`` (an
RFC 3261 branch, the same transaction as alice's); ``_rx_key`` files it under its RFC
2543 key.

Hole 3 (``test_hole_a_2543_copy_on_another_branch_swallows_alices_message``): alice an
RFC 2543 peer (her branch ``r2543-alice``, no cookie), the hop's bodiless copy on
``r2543-hop`` (the same Call-ID, From tag, CSeq and sent-by): pjsip's 2543 key
(``create_tsx_key_2543``) has no branch, the phone's has one.  Run: two 200s, both on
``r2543-hop`` (the copy's answer resent for hers), the empty copy shown, no 482.  At
fault: ``_rx_key``'s 2543 key (line 350); fix: key it as pjsip (CSeq method with INVITE
and ACK together, CSeq number, From tag, Call-ID, Via sent-by).

Hole 4 (``test_hole_a_second_copy_of_the_493_makes_the_unhold_unreadable_for_bob``):
alice's phone in a call (review 92's ``call`` fixture: her outbound proxy is bob's
socket, the hop's seat).  Her hold re-INVITE (CSeq 2) is answered 493 on her very
branch with bob's public certificate; the phone retries the hold (CSeq 3); the same 493
comes again (the hop's replay, or bob's retransmission for a lost ACK): the phone
reacts again (``e2m_answer`` twice, both ``retry``: ``_keep_reaction`` line 736 queues
every copy, ``UAEngine.react`` follows each, protecting a "retry" CSeq 3 never sent).
bob answers CSeq 3 with 200 under its key; alice's unhold then goes under the phantom
key: bob cannot open it (``NoMatchingRecipientError``).  The core model, the code at
fault and the fix: ``tests/unit/test_review95.py`` hole 5.

Run: in holes 1 and 2 alice's branch got two 200s, both on the copy's spelling of the
branch (pjsip resent the copy's 200 when hers came), bob was shown one empty plaintext
message, no ``duplicate_refused``.

Controls: the copy on alice's branch as written is refused 482 and bob told (stop 35's
fix); a copy on a branch of its own (one letter more) is another transaction to pjsip,
which answers alice's real MESSAGE 482 itself (merged request): only the case-folded
spelling is pjsip's same transaction; an RFC 2543 peer's MESSAGE alone is shown with her
security; one 493 on alice's hold branch, followed once, and the unhold opens at bob.

Fixed (stop 35): as ``tests/unit/test_review95.py``'s docstring says.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import UdpStranger
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review92_phone import call  # noqa: F401 - alice's phone in a call
from tests.pjsua.test_review83_phone import (ALICES_TEXT, _alices_message, _bodiless_copy,
                                             _copy_ahead_is_never_shown_as_alices)

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review95-pki"),
                         users=("alice", "bob"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
        ) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _on_branch(msg: sip.SipMessage, branch: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None
    return msg.replace("Via", via.replace(msg.via_branch(), branch))


def _message_copy_ahead(pki: TestPKI, bob: PhoneProcess, spell, hers: str | None = None):
    """The hop's bodiless copy of alice's MESSAGE on ``spell(her branch)``, then hers.
    bob's message_in events, the first final answer on her branch (in any case), every
    final status, bob's duplicate_refused events, the raw finals."""
    peer = UdpStranger(bob.port)
    try:
        real = _alices_message(pki, bob, peer)
        if hers is not None:             # an RFC 2543 peer: a branch without the cookie
            real = _on_branch(real, hers)
        branch = real.via_branch()
        mark = bob.mark()
        if spell is not None:            # None: alice's alone
            peer.send(_on_branch(_bodiless_copy(real), spell(branch)).serialize())
        peer.send(real.serialize())
        time.sleep(1.5)
        answers = [sip.parse(d) for d in peer.drain(0.5)]
        finals = [(a.status, a.cseq[0], _last_branch(a)) for a in answers
                  if not a.is_request and a.status >= 200 and (
                      _last_branch(a).lower() == branch.lower() or hers is not None)]
        return bob.of("message_in", since=mark), finals[0][0] if finals else None, \
            [f[0] for f in finals], bob.of("duplicate_refused", since=mark), finals
    finally:
        peer.close()


def _last_branch(answer: sip.SipMessage) -> str:
    """The top Via's branch as pjsip reads it: the last ``branch`` parameter."""
    return re.findall(r";\s*branch\s*=\s*([^;,\s]*)", answer.get("Via") or "", re.I)[-1]


def _other_letters(branch: str) -> str:
    other = branch[:7] + branch[7:].swapcase()
    assert other != branch, branch
    return other


def _report(shown, raw, refused) -> None:
    print(f"\nshown: {[(e['text'], (e['security'] or {}).get('summary')) for e in shown]};"
          f" finals on alice's branch: {raw}; refused: {refused}")


def test_hole_a_copy_in_other_letters_swallows_alices_message(pki, bob):
    shown, status, finals, refused, raw = _message_copy_ahead(pki, bob, _other_letters)
    _report(shown, raw, refused)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_hole_a_copy_with_the_cookie_in_other_case_swallows_alices_message(pki, bob):
    shown, status, finals, refused, raw = _message_copy_ahead(
        pki, bob, lambda b: "Z9HG4BK" + b[7:])
    _report(shown, raw, refused)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_a_copy_with_a_branch_put_before_alices_is_refused_400(pki, bob):
    """Stop 36: the copy's Via carries a branch of the hop's and then alice's.  pjsip
    keeps a Via's last ``branch`` parameter (each overwrites the one before), so to
    pjsip the copy is alice's transaction, while the phone's key read none (the core
    refuses a parameter given twice) and filed it under an RFC 2543 key.  Before the
    fix the copy met an unread error further on (500) and alice's MESSAGE passed by
    luck; now the phone refuses a request whose top Via has no single branch with 400,
    before any record, and alice's MESSAGE is shown with her security."""
    shown, status, finals, refused, raw = _message_copy_ahead(
        pki, bob, lambda b: f"z9hG4bK-hop36;branch={b}")
    _report(shown, raw, refused)
    assert sorted(finals) == [200, 400], raw
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    assert shown[0]["security"]["signed"] and shown[0]["security"]["encrypted"]


def test_control_the_copy_on_alices_branch_as_written_is_refused_482(pki, bob):
    shown, status, finals, refused, _ = _message_copy_ahead(pki, bob, lambda b: b)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)
    assert 482 in finals and [r["code"] for r in refused] == [482]


def test_control_a_copy_on_a_branch_of_its_own_is_another_pjsip_transaction(pki, bob):
    """One letter more after the cookie: another transaction to pjsip, which answers
    alice's real MESSAGE 482 itself (a merged request: its Call-ID, From tag and CSeq
    taken) - not the copy's 200 again, as it does when only the letters' case differs
    (holes 1, 2): there pjsip found the copy's own transaction."""
    shown, status, finals, refused, raw = _message_copy_ahead(
        pki, bob, lambda b: _other_letters(b) + "x")
    print(f"\nfinals: {raw} refused: {refused}")
    assert finals == [482], raw
    assert [e["text"] for e in shown] == [""]


def test_hole_a_2543_copy_on_another_branch_swallows_alices_message(pki, bob):
    shown, status, finals, refused, raw = _message_copy_ahead(
        pki, bob, lambda b: "r2543-hop", hers="r2543-alice")
    _report(shown, raw, refused)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)


def test_control_an_rfc_2543_peers_message_alone_is_shown(pki, bob):
    """The set-up is sound: alice's MESSAGE on a branch without the cookie, alone (the
    "copy" is the message itself), is taken and shown with her security."""
    shown, status, finals, refused, raw = _message_copy_ahead(pki, bob, None,
                                                              hers="r2543-alice")
    assert finals == [200], raw
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    assert shown[0]["security"]["signed"] and shown[0]["security"]["encrypted"]


# ------------------------------------- hole 4: one answer on alice's branch, twice (phone)

def _hold_answered_493(alice: PhoneProcess, bob, invite: sip.SipMessage, copies: int):
    """hold; bob's side answers it 493 on alice's own branch (his public certificate),
    the phone retries it (CSeq 3); ``copies - 1`` more copies of the same 493 (a
    retransmission, or the hop's replay); bob answers the retry 200; then unhold: what
    bob's engine makes of it (raises when it cannot open it)."""
    from cryptography.hazmat.primitives import serialization

    from e2m_plugins.sip import make_response
    from tests.pjsua.test_review92_phone import TAG
    mark = alice.mark()
    alice.send("hold")
    held = bob.receive(lambda m: m.is_request and m.method == "INVITE" and m.to_tag == TAG)
    cert = bob.pki.user("bob").cert.public_bytes(serialization.Encoding.DER)
    r493 = make_response(held, 493, "Undecipherable", [], cert, "application/pkix-cert")
    assert r493.via_branch() == held.via_branch()
    bob.send(r493)
    retry = bob.receive(lambda m: m.is_request and m.method == "INVITE"
                        and m.cseq[0] > held.cseq[0])
    for _ in range(copies - 1):
        bob.send(r493)
    deadline = time.monotonic() + 5
    while len(alice.of("e2m_answer", since=mark)) < copies:
        assert time.monotonic() < deadline, alice.of("e2m_answer", since=mark)
        time.sleep(0.1)
    print(f"\ne2m_answer events: {[(e['code'], e['action']) for e in alice.of('e2m_answer', since=mark)]}")
    bob.answer(retry)
    time.sleep(0.3)
    alice.send("unhold")
    unhold = bob.receive(lambda m: m.is_request and m.method == "INVITE"
                         and m.cseq[0] > retry.cseq[0])
    return bob.engine.open(unhold).message


def test_control_one_493_on_alices_branch_then_the_unhold_opens_at_bob(call):
    alice, bob, invite = call
    opened = _hold_answered_493(alice, bob, invite, copies=1)
    assert opened.body and b"m=audio" in opened.body


def test_hole_a_second_copy_of_the_493_makes_the_unhold_unreadable_for_bob(call):
    from e2m_plugins.errors import E2MError
    alice, bob, invite = call
    try:
        opened = _hold_answered_493(alice, bob, invite, copies=2)
    except E2MError as exc:
        pytest.fail(f"bob cannot open alice's unhold: {type(exc).__name__}: {exc}")
    assert opened.body and b"m=audio" in opened.body
