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
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` lines 351-360 (the 2543 key: Call-ID
  and From tag kept as written, the sent-by as a string, the branch read unquoted by the
  core's ``via_branch`` where pjsip keeps the quotes);
- fix: fold the case of the whole key (``str.lower`` of every field, as
  ``pj_hash_get_lower`` does); take the sent-by as (host lower-cased, port as an int, 0
  when absent); decide 3261 vs 2543 on the branch *as pjsip reads it* (a quoted value is
  no cookie: read the raw parameter, quotes kept) - or better: refuse (400) a request
  whose top Via branch is quoted or has no cookie when its 2543 key is already taken with
  other octets, with every field compared case-insensitively.

Controls: alice's 2543 MESSAGE alone is shown with her security; the copy with every
field as alice wrote it (review 95's fix) is refused 482 and bob told; a copy whose
Call-ID differs by one character is another transaction to pjsip too (alice's
real one is then shown or refused by pjsip, never absorbed as the copy's).
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


@pytest.mark.xfail(strict=True, reason="review 97: untrusted hop, a 2543 copy with the "
                   "Call-ID in other letters swallows alice's MESSAGE (no 482)")
def test_hole_a_2543_copy_with_the_call_id_in_other_letters_swallows_alices_message(pki, bob):
    _copy_ahead_is_never_shown_as_alices(*_copy_ahead(pki, bob, _other_call_id))


@pytest.mark.xfail(strict=True, reason="review 97: untrusted hop, a 2543 copy with the "
                   "From tag in other letters swallows alice's MESSAGE (no 482)")
def test_hole_a_2543_copy_with_the_from_tag_in_other_letters_swallows_alices_message(pki, bob):
    _copy_ahead_is_never_shown_as_alices(*_copy_ahead(pki, bob, _other_from_tag))


@pytest.mark.xfail(strict=True, reason="review 97: untrusted hop, a 2543 copy whose Via "
                   "port has a leading zero swallows alice's MESSAGE (no 482)")
def test_hole_a_2543_copy_with_a_leading_zero_in_the_port_swallows_alices_message(pki, bob):
    _copy_ahead_is_never_shown_as_alices(*_copy_ahead(pki, bob, _zero_port))


@pytest.mark.xfail(strict=True, reason="review 97: untrusted hop, a 2543 copy on a quoted "
                   "\"z9hG4bK\" branch swallows alice's MESSAGE (no 482)")
def test_hole_a_2543_copy_on_a_quoted_cookie_branch_swallows_alices_message(pki, bob):
    _copy_ahead_is_never_shown_as_alices(*_copy_ahead(pki, bob, _quoted_cookie))
