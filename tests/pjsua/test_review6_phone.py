"""A sixth attacker's review of the phone (the fifth review's fixes): on a real
``e2m-phone listen`` process (pjsua2), from plain sockets on loopback, no Kamailio.

``test_hole_*``: an attack that SUCCEEDS on the code as it stands, kept as a strict
xfail (its assertion is what the fix must make true).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki

from test_review5_phone import _Call, _contact

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review6-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    """bob's e2m-phone with SRTP (it answers calls itself)."""
    yield from answering_phone(tmp_path, pki, request)


def _carols_own_call_with_the_same_call_id(call: _Call, bob: PhoneProcess) -> None:
    """carol calls bob herself (her own tag, signed by her, no To tag) reusing the
    Call-ID of alice's live call; bob's phone answers it, carol ACKs and hangs up."""
    pki, port = call.pki, call.thief.local_port
    invite = sip.make_request(
        "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("carol"),
        to_uri=pki.aor("bob"), call_id=call.call_id, from_tag="c6own",
        via_host=f"{HOST}:{port}", body=SRTP_OFFER, content_type="application/sdp",
        extra_headers=[("Contact", f"<sip:carol@{HOST}:{port}>")])
    call.thief.send(call.carol.protect(invite).message.serialize())
    ok = call.thief.answered(call.call_id, timeout=10)
    assert ok is not None and ok.startswith(b"SIP/2.0 200"), ok[:60] if ok else ok
    answered = sip.parse(ok)
    assert answered.to_tag != call.bob_tag                 # a second dialog of bob's
    target = _contact(ok)
    dialog = dict(from_uri=pki.aor("carol"), to_uri=pki.aor("bob"), call_id=call.call_id,
                  from_tag="c6own", to_tag=answered.to_tag, via_host=f"{HOST}:{port}")
    call.thief.send(sip.make_request("ACK", target, cseq=1, **dialog).serialize())
    time.sleep(0.3)
    mark = bob.mark()
    call.thief.send(sip.make_request("BYE", target, cseq=2, **dialog).serialize())
    assert call.thief.final(call.call_id, timeout=5) == 200
    bob.wait("call_ended", since=mark, timeout=5)


def test_hole_a_second_call_with_the_same_call_id_ends_the_first_calls_entry(pki, bob):
    """Insider UA (carol) who read the ids of alice's live call to bob off the wire.

    Control: her re-INVITE naming the call is refused 403 (``_check_parties``).  Then
    she calls bob HERSELF with the SAME Call-ID (her own From tag, no To tag: pjsip
    takes it as a new call, a second dialog), lets bob's phone answer and hangs up.
    pjsua reports DISCONNECTED for her call, and the phone (``_ev_call_state``) calls
    ``engine.forget_call(call_id)``, which drops EVERY parties entry of that Call-ID
    (and its dialog keys and policies): alice's call's entry too.  Her next re-INVITE
    into alice's call is answered 200 (bob's SRTP keys sealed for carol, media to her).

    Fix: the phone must forget only the ended dialog: pass our tag (pjsua's
    ``CallInfo.localTag`` or the ended call's own tag, kept on ``E2MCall``) and have
    ``UAEngine.forget_call(call_id, local_tag)`` drop that tag's entry only (and keys /
    policies only when no other entry of ours still holds that Call-ID); also
    ``E2MPhone._by_call_id`` keyed by Call-ID alone lets the second call shadow the
    first."""
    call = _Call(pki, bob)
    try:
        assert call.hijack(5) == 403                                  # control: refused
        _carols_own_call_with_the_same_call_id(call, bob)
        assert call.hijack(7) == 403, "carol's re-INVITE into alice's call was answered"
    finally:
        call.close()


def test_hole_a_second_call_with_the_same_call_id_takes_the_first_calls_place(pki, bob):
    """Found at stop 30 (a 5 s teardown led to it), the same insider as above.

    carol's own call under the Call-ID of alice's live call took alice's call's place in
    the phone's table of calls (``E2MPhone._by_call_id``, keyed by Call-ID alone), and
    every later pjsua event of alice's call (its media, its end) was charged to carol's:
    alice's call never ended in the phone's account (one live call left per attack, kept
    for good, and a quit that waits for it), and the application was told that carol's
    call ended when alice's did.

    Fix: a pjsua event names its own call object, and the phone charges it to the call
    that holds that object; a second dialog never takes a live call's Call-ID entry."""
    call = _Call(pki, bob)
    try:
        _carols_own_call_with_the_same_call_id(call, bob)
        mark = bob.mark()
    finally:
        call.close()                                # alice hangs up: BYE, 200
    ended = bob.wait("call_ended", since=mark, timeout=5)
    assert ended["call_id"] == call.call_id
    status = bob.status()
    assert status["live_calls"] == 0, status
    assert len(bob.of("call_ended")) == 2, "alice's call and carol's each end once"
