"""A fifty-...th attacker's review (December 2026) of af54be7: stop 36's phone and
core-parser fixes (review 97's), on a real ``e2m-phone listen`` (pjsua2 2.15) with plain
UDP sockets on loopback, no Kamailio.  alice's MESSAGE is made with her real UA engine
(signed and sealed for bob), as it would cross an untrusted hop on the leg to bob's UDP
phone.  The core model and the full list of what held: ``tests/unit/test_review100.py``.

No hole found.  ``_rx_key``'s ``IndexError`` on a Via without a sent-by (the unit
module's robustness finding) has no effect here:
``test_control_a_via_without_a_sent_by_gets_no_answer_and_the_phone_serves_on``.

What held on the phone (controls): a hop's bodiless copy of alice's MESSAGE ahead of hers
on her branch with one character ``%XX``-escaped, with the cookie's ``z`` as ``%7A``, or
with a decoy branch first and hers under the name ``br%61nch``: pjsip 2.15 keys the
parameter as written, like the phone, so the copy is another transaction to both: pjsip
takes the copy (200, shown as the plaintext it is) and refuses alice's real MESSAGE
itself as a merged request (482): she hears it failed, nothing is absorbed, nothing is
shown as hers.  The same for an RFC 2543 peer's copy with a %-escaped From tag (pjsip
delivers her MESSAGE too).  A copy on her branch with the method written ``Message``
draws no final answer and leaves nothing taken: hers is shown.  The copy as alice wrote
it: 482 from the phone
(``duplicate_refused``).
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
from tests.pjsua.test_review97_phone import _copy_ahead as _copy_ahead_2543

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review100-pki"),
                         users=("alice", "bob"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
        ) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _esc(text: str, index: int) -> str:
    return f"{text[:index]}%{ord(text[index]):02X}{text[index + 1:]}"


def _via(msg: sip.SipMessage, old: str, new: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None and old in via, (via, old)
    return msg.replace("Via", via.replace(old, new, 1))


def _escaped_branch(index: int) -> Callable[[sip.SipMessage], sip.SipMessage]:
    def mutate(copy: sip.SipMessage) -> sip.SipMessage:
        branch = copy.via_branch()
        return _via(copy, f"branch={branch}", f"branch={_esc(branch, index)}")
    return mutate


def _other_decoded_branch(copy: sip.SipMessage) -> sip.SipMessage:
    branch = copy.via_branch()
    other = chr(ord(branch[8]) ^ 1)
    assert other.lower() != branch[8].lower()
    return _via(copy, f"branch={branch}", f"branch={branch[:8]}%{ord(other):02X}{branch[9:]}")


def _escaped_name(copy: sip.SipMessage) -> sip.SipMessage:
    branch = copy.via_branch()
    return _via(copy, f";branch={branch}", f";branch=z9hG4bKdecoy100;br%61nch={branch}")


def _escaped_from_tag(copy: sip.SipMessage) -> sip.SipMessage:
    tag = copy.from_tag or ""
    return copy.replace("From", (copy.get("From") or "").replace(f"tag={tag}",
                                                                 f"tag={_esc(tag, 0)}"))


def _copy_ahead(pki: TestPKI, bob: PhoneProcess,
                mutate: Callable[[sip.SipMessage], sip.SipMessage] | None):
    """The hop's bodiless copy of alice's (RFC 3261) MESSAGE, ``mutate``d, then hers.
    bob's message_in events, the first final status, every final status, bob's
    duplicate_refused events."""
    peer = UdpStranger(bob.port)
    try:
        real = _alices_message(pki, bob, peer)
        mark = bob.mark()
        if mutate is not None:
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


def test_control_alices_message_alone_is_shown_with_her_security(pki, bob):
    shown, status, finals, refused = _copy_ahead(pki, bob, None)
    assert finals == [200] and not refused
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    assert shown[0]["security"]["signed"] and shown[0]["security"]["encrypted"]


def test_control_the_copy_as_alice_wrote_it_is_refused_482(pki, bob):
    shown, status, finals, refused = _copy_ahead(pki, bob, lambda c: c)
    _copy_ahead_is_never_shown_as_alices(shown, status, finals, refused)
    assert 482 in finals and [r["code"] for r in refused] == [482]


def test_control_a_copy_whose_decoded_branch_is_not_hers_is_another_transaction(pki, bob):
    """The escaped copy is well formed and taken by pjsip (answered 200, shown as the
    plaintext it is); decoded to another branch than hers it is another transaction to
    pjsip too: her MESSAGE is not absorbed as its retransmission but refused by pjsip
    itself as a merged request (482, RFC 3261 §8.2.2.2: same Call-ID, From tag and CSeq
    on another branch), so alice hears it failed."""
    shown, status, finals, refused = _copy_ahead(pki, bob, _other_decoded_branch)
    assert status == 200 and not refused
    assert [(e["text"], e["security"]["summary"]) for e in shown] == [("", "plaintext")]
    assert finals == [200, 482], finals


def _merged_by_pjsip(shown, status, finals, refused) -> None:
    """pjsip took the copy as a transaction of its own (200, the plaintext copy shown) and
    refused alice's real MESSAGE as a merged request (482, not the phone's: no
    ``duplicate_refused``): never absorbed under the copy's 200, never shown as hers."""
    assert finals == [200, 482] and not refused, (finals, refused)
    assert [(e["text"], e["security"]["summary"]) for e in shown] == [("", "plaintext")]


@pytest.mark.parametrize("where", ["after_cookie", "cookie", "escaped_name"])
def test_control_a_percent_escaped_copy_is_another_transaction_to_pjsip_too(pki, bob, where):
    mutate = {"after_cookie": _escaped_branch(8), "cookie": _escaped_branch(0),
              "escaped_name": _escaped_name}[where]
    _merged_by_pjsip(*_copy_ahead(pki, bob, mutate))


def test_control_a_2543_copy_with_a_percent_escaped_from_tag_is_another_transaction(pki, bob):
    """What held: pjsip 2.15 keys a From tag as written (no unescaping there), so the copy
    is another transaction to pjsip as to the phone, and alice's MESSAGE is shown."""
    shown, status, finals, refused = _copy_ahead_2543(pki, bob, _escaped_from_tag)
    assert finals == [200, 200] and not refused
    assert [e["text"] for e in shown] == ["", ALICES_TEXT.decode()]


# ---------------------------------------- a Via without a sent-by (no hole: no answer at all)

def _strangers_message(bob: PhoneProcess, peer: UdpStranger, via: str) -> sip.SipMessage:
    from tests.pjsua.test_review83_phone import HOST
    msg = sip.make_request("MESSAGE", f"sip:bob@{HOST}:{bob.port}",
                           from_uri="sip:mallory@example.net", to_uri="sip:bob@example.com",
                           body=b"hi", content_type="text/plain")
    return msg.replace("Via", via)


def _answer_to(bob: PhoneProcess, via: str) -> list[int]:
    peer = UdpStranger(bob.port)
    try:
        peer.send(_strangers_message(bob, peer, via).serialize())
        time.sleep(1.0)
        return [sip.parse(d).status for d in peer.drain(0.5)]
    finally:
        peer.close()


def test_control_a_via_without_a_sent_by_gets_no_answer_and_the_phone_serves_on(pki, bob):
    """An off-path sender's MESSAGE with ``Via: ;branch=x`` (``_rx_key`` raises
    ``IndexError``) or ``SIP/2.0/UDP ;branch=x`` (``MalformedError``): neither is answered
    (there is no sent-by to answer to), and a readable stranger's MESSAGE right after
    gets the phone's defined answer (488: plaintext where E2M is required)."""
    assert _answer_to(bob, ";branch=r100-stranger") == []
    assert _answer_to(bob, "SIP/2.0/UDP ;branch=r100-stranger") == []
    assert _answer_to(bob, "SIP/2.0/UDP 127.0.0.1:9;branch=r100-stranger;rport") == [488]


# ----------------------------------------------- the method in other letters (held)

def _method_in_other_letters(copy: sip.SipMessage) -> sip.SipMessage:
    raw = copy.serialize().replace(b"MESSAGE sip:", b"Message sip:", 1)
    return sip.parse(raw.replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 Message", 1))


def test_control_a_copy_with_the_method_in_other_letters_does_not_touch_alices(pki, bob):
    """A hop's bodiless copy on alice's branch written ``Message`` (one key with hers in
    pjsip's folded table and in ``_rx_key``): it draws no final answer and leaves no
    taken transaction behind; alice's MESSAGE right after is answered 200 and shown with
    her security."""
    shown, status, finals, refused = _copy_ahead(pki, bob, _method_in_other_letters)
    assert finals == [200] and not refused, (finals, refused)
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    assert shown[0]["security"]["signed"] and shown[0]["security"]["encrypted"]
