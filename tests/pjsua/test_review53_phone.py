"""Review 53 on a real ``e2m-phone listen`` process (pjsua2, auto-answer): a bare second
dialog under a live call's Call-ID whose From tag is the *caller's own tag in another
letter case* passes the hook's ``FirstCopy`` (which keys by the tag as written) and is a
second call to pjsip; pjsua answers it, the sender ACKs and BYEs, and the phone's 200 to
that BYE ends the slot the engine names by the lower-cased tag: the live call's.  alice's
next re-INVITE under her key gets 493 (see ``tests/unit/test_review53.py``, hole 1).
From plain sockets on loopback, no Kamailio.

Fixed (stop 30): see ``tests/unit/test_review53.py``; the attack's INVITE is refused 482
(``test_control_the_callers_tag_in_another_case_is_refused``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST
from e2m_plugins.testpki import TestPKI, init_test_pki

from test_review51_phone import ALICE_TAG, _AlicesCall

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review53-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    """bob's e2m-phone with SRTP (it answers calls itself)."""
    yield from answering_phone(tmp_path, pki, request)


def test_control_the_callers_exact_tag_is_refused_and_the_call_goes_on(pki, bob):
    """The second INVITE with alice's exact tag (another branch) is refused 482 by the
    engine since the fix (as the hook's FirstCopy did before); her re-INVITE under K0
    is answered 200."""
    call = _AlicesCall(pki, bob)
    try:
        assert call.bare_second_dialog(bob, ALICE_TAG) == 482
        assert call.reinvite(2) == 200
    finally:
        call.close()


def test_control_the_callers_tag_in_another_case_is_refused(pki, bob):
    """The attack's INVITE (alice's tag in upper case), a new call to the hook and to
    pjsip, is refused 482 by the engine since the fix: it names the peer's tag of a
    dialog of ours under way."""
    call = _AlicesCall(pki, bob)
    try:
        assert call.bare_second_dialog(bob, ALICE_TAG.upper()) == 482
        assert call.reinvite(2) == 200
    finally:
        call.close()


def test_hole_a_second_dialog_with_the_callers_tag_in_another_case_ends_the_live_key(pki, bob):
    """Attacker: anyone who read the live call's Call-ID, alice's From tag and the two
    AoRs (plaintext headers), from any address; no certificate, no signature.

    Messages: alice's SRTP call with bob's phone is answered (K0 kept at the phone under
    (C, a1b2c3d4e5f6, {alice, bob})).  The attacker sends the phone a bodiless INVITE
    From alice;tag=A1B2C3D4E5F6 To bob under Call-ID C.  The hook's FirstCopy keys by
    the tag as written (no 482), review 51's own-tag refusal looks for the phone's
    tags only, pjsua auto-answers it (a second call), the attacker ACKs and BYEs; pjsua
    answers the BYE 200 and ``protect`` of that 200 runs ``_end_dialog``, which sees
    the live call in ``_parties`` and ends "its own peer's slot": the lower-cased tag's,
    the live call's.

    Effect: alice's call goes on in pjsua, but her next re-INVITE under K0 (hold,
    resume, a refresh) is refused 493 at the phone.

    Fix: see the unit test (refuse a new dialog that names a live dialog's remote tag,
    in any case; end a second dialog's slots by the INVITE they belong to)."""
    call = _AlicesCall(pki, bob)
    try:
        call.bare_second_dialog(bob, ALICE_TAG.upper())
        assert call.reinvite(2) == 200
    finally:
        call.close()


def test_control_pjsua_takes_a_second_invite_to_another_uri(pki, bob):
    """The premise of the unit test's hole 2: a bare INVITE under the live call's Call-ID
    From alice To another URI of the phone (its contact, ``sip:bob@127.0.0.1:port``) is
    answered 200 by pjsua as a second call and ended by the sender's BYE; the live
    call's key is untouched (other parties, other slots: its re-INVITE is answered 200).
    Its end takes the live call's dialog *policies* (scope (C, alice)), which this
    phone, configured without a proxy, has none of: see the unit test."""
    call = _AlicesCall(pki, bob)
    try:
        assert call.bare_second_dialog(bob, "zz53", f"sip:bob@{HOST}:{bob.port}") == 200
        assert call.reinvite(2) == 200
    finally:
        call.close()
