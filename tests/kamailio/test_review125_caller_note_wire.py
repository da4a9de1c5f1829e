"""Review 125 (attacker's review of 98296ba): stop 41's owner mark on the caller's target
note (``$avp(e2m_target_mine)``) guards the failure route only; a **2xx** to a
stranger's INVITE under alice's Call-ID and From tag still takes her note.  On a real
Kamailio 5.6 E2M proxy (``proxy_factory``, ``e2m=True``), as stop 41's
``test_caller_target_owner_wire.py``, whose set-up and measure this copies.

Hole K3 (``test_hole_k3_a_strangers_answered_invite_takes_alices_ringing_note``)
--------------------------------------------------------------------------------

- Attacker: an **off-path sender** or **insider UA** who knows a ringing call's Call-ID
  and caller's tag (an untrusted hop reads them; stop 41's own threat-model row), and has
  a UAS of his own that the proxy reaches (here registered as ``carol`` from
  127.0.0.72; with the registrar open anyone may, with ``[auth]`` any user may).
- Set-up and messages: alice's INVITE to bob (``Call-ID: r125-...@x``, ``From`` tag
  ``alice-tag``, bob answers 180 only) rings; ``e2mtargets`` holds 1 item, her caller
  note.  From 127.0.0.93 mallory sends ``INVITE sip:carol@example.com`` with alice's
  Call-ID and From tag (his own From URI, Contact and branch); carol's UAS answers ``200
  OK`` with a To tag and a Contact, no E2M keys.
- Observed (every run): the 200 reached mallory, and ``e2mtargets`` went from 1 item to
  **0**: alice's note was removed while her call rang.  Her call's 2xx then finds no
  caller target to bind, so the BYE's 2xx cannot end her dialog's keys at the proxy:
  they live to their TTL, exactly the effect stop 41 fixed for a 486 (its test read 1
  item after the 486; with a 200 instead of a 486 it is 0 again).
- Code at fault: ``kamailio_app/kemi.py:1926-1934`` (``note_dialog_targets``): the 2xx's
  Call-ID and From tag name the note (``held``), whoever's transaction wrote it; the
  keyless branch (``_targets_life`` None) then ``sht_rm``\\s it.  ``_TARGET_MINE_AVP`` is
  read only in ``end_failed_invite_notes`` (``kemi.py:2424``).  By reading, the keyed
  branch (``kemi.py:1944-1947``) would bind alice's note to mallory's dialog, so alice's
  own 2xx finds it bound (``"|" in held``) and notes nothing: the same loss (not run: it
  needs an E2M-keyed INVITE from mallory).
- Suggested fix: in ``note_dialog_targets`` (not ``stray``), touch the caller note only
  when ``$avp(e2m_target_mine)`` is set for the transaction the 2xx matched; a stray
  2xx (no transaction) should not remove a note that is not bound yet either.

Controls (unmarked, pass)
-------------------------

- ``test_control_k3_a_strangers_own_answered_invites_leave_alices_note``: with alice's
  call ringing, three INVITEs of mallory's under his own Call-IDs and tags, each answered
  200 (keyless): ``e2mtargets`` holds 1 item after them (alice's): a keyless 200 removes
  only the note its own Call-ID and tag name.

Tried and held (this review's pjsua and failure-route work; the prefix-length work is
in ``test_review125_prefix_lengths.py``)
------------------------------------------------------------------------------------

- ``pjsua_hooks/strong_rand.py`` on a real pjsua2 phone (an ad hoc probe, not kept):
  ``strong_rand.secrets`` replaced by a recorder of the calling thread; a phone started
  (``require_e2m``), alice called bob in the same phone, 6 s of media over the null
  device, hang-up.  48,751 calls into the callback by the time ``start``, two transports and two
  accounts were done (libInit, the self-test), 86 during 6 s of media, 40 at hang-up, **all on the main thread**: with
  ``threadCnt = 0``, ``mainThreadOnly`` and the media thread not calling ``rand()``, no
  pjsip thread takes the GIL through the callback, so no wedge between a pjsip lock and
  the GIL was found.  The slot is written before ``libCreate`` (``endpoint.py:160``) so
  no GUID is made from glibc first; ``install`` is idempotent and restores at exit.
- Other identifier sources in the wheel (read, ``nm -D``): the extension imports
  ``rand``/``srand`` and OpenSSL's ``RAND_bytes`` only (no ``random``, ``lrand48``,
  ``arc4random``, libuuid); pjlib's GUIDs (Call-ID, tags, branches, so the ACK and CANCEL
  that reuse an INVITE's branch), CSeq, RTP SSRC and ICE/STUN ids all go through
  ``pj_rand``.  The SDP ``o=`` session id is the clock (pjmedia), predictable, but
  nothing in the product matches on it.
- A stranger's failing INVITE (486) under alice's ids: the failure route honours the
  mark (stop 41's test, run here); a CANCEL of his own INVITE ends in the same failure
  route (read).
- Retransmissions of alice's INVITE, and a stranger's copy with her branch (read): tm
  takes them as retransmissions of her transaction; the note is written once.
- One stray reply from an IPv6 source does not ban its /64 (pipelimit works in the core
  reply route); see the other module.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact, udp_transaction
from e2m_plugins.sip import make_request, make_response

pytestmark = pytest.mark.kamailio


def _ringing(request):
    return make_response(request, 180, "Ringing") if request.method == "INVITE" else None


def _answer(request):
    """mallory's own UAS (registered as carol): every INVITE answered 200 with a Contact."""
    if request.method != "INVITE":
        return None
    return make_response(request, 200, "OK",
                         extra_headers=[("Contact", "<sip:carol@127.0.0.72:5998>")])


def _invite(call_id: str, from_tag: str, to_user: str, from_user: str, port: int):
    return make_request("INVITE", f"sip:{to_user}@example.com",
                        from_uri=f"sip:{from_user}@elsewhere.example",
                        to_uri=f"sip:{to_user}@example.com", call_id=call_id,
                        from_tag=from_tag, extra_headers=[
                            ("Contact", f"<sip:{from_user}@127.0.0.1:{port}>")])


def _items(proxy) -> int:
    return proxy.htable_items("e2mtargets")


def _set_up(proxy_factory, name: str):
    proxy = proxy_factory(name, e2m=True)
    bob, carol = RawUas(_ringing), RawUas(_answer)
    register_contact(proxy, "bob", bob.port)
    register_contact(proxy, "carol", carol.port, source="127.0.0.72")
    return proxy, bob, carol


def _ring_bob(proxy, bob, call_id: str) -> SipUa:
    alice = SipUa(proxy.port, user="alice", timeout=3)
    alice.send(_invite(call_id, "alice-tag", "bob", "alice", alice.local_port)
               .replace("Via", alice.via()))
    assert bob.wait_for(1, method="INVITE"), "alice's INVITE did not reach bob"
    time.sleep(0.2)
    return alice


@pytest.mark.xfail(strict=True, reason="review 125 hole K3: a stranger's INVITE under alice's "
                   "Call-ID/tag answered 200 (keyless) removes alice's ringing caller note")
def test_hole_k3_a_strangers_answered_invite_takes_alices_ringing_note(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "r125-owner200")
    call_id = f"r125-{time.monotonic_ns()}@x"
    alice = _ring_bob(proxy, bob, call_id)
    try:
        before = _items(proxy)
        assert before == 1                           # alice's caller-target note
        forged = _invite(call_id, "alice-tag", "carol", "mallory", 5999)
        reply = udp_transaction(proxy.port, forged, timeout=5, source="127.0.0.93")
        assert reply is not None and reply.status == 200, reply
        assert carol.wait_for(1, method="INVITE")
        time.sleep(0.3)
        # secure: a 2xx to an INVITE whose transaction did not write the note leaves it
        assert _items(proxy) == 1, "the stranger's 200 removed alice's note"
    finally:
        alice.close()
        bob.close()
        carol.close()


def test_control_k3_a_strangers_own_answered_invites_leave_alices_note(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "r125-owner200-c")
    alice = _ring_bob(proxy, bob, f"r125-c-{time.monotonic_ns()}@x")
    try:
        assert _items(proxy) == 1
        for n in range(3):
            own = _invite(f"mallory-{n}-{time.monotonic_ns()}@x", f"m{n}", "carol",
                          "mallory", 5999)
            reply = udp_transaction(proxy.port, own, timeout=5, source="127.0.0.93")
            assert reply is not None and reply.status == 200, reply
        assert len(carol.wait_for(3, method="INVITE")) == 3
        time.sleep(0.3)
        assert _items(proxy) == 1        # alice's only: each keyless 200 took its own note
    finally:
        alice.close()
        bob.close()
        carol.close()
