"""Review 113 (attacker's review of d038d44): PRACK and UPDATE on a 100rel early
dialog through the home proxy, on a real Kamailio 5.6.3 (``home_proxy``: E2M on,
open registrar), raw UAs on both sides.  No hole seen here; controls only.

``test_control_prack_and_an_early_update_go_both_ways_through_the_proxy`` (honest flow):
alice's INVITE (``Supported: 100rel``) reaches bob with our Record-Route; bob's reliable
183 (``Require: 100rel``, ``RSeq: 1``, a To tag, the Record-Route copied) reaches alice
with our entry; her PRACK (Route: that entry, the 183's To tag, ``RAck``) reaches bob
and his 200 reaches her; bob's UPDATE in the early dialog (Route: the INVITE's
Record-Route, From his early tag, To her tag) reaches her.  The route token admits
both sides of an early dialog as of a confirmed one.

``test_control_a_reliable_183_without_our_entry_is_dropped``: an untrusted hop on bob's
leg (or bob) takes our Record-Route out of the reliable 183: dropped in the core reply
route (review 90: alice's early route set would be empty and her PRACK and UPDATE go
past us); nothing reaches alice.

``test_control_a_strangers_prack_in_the_early_dialog_is_refused``: an off-path sender
who learnt the Call-ID, both tags and our Record-Route entry (a hop's copy) sends a PRACK
in that early dialog written ``From`` himself: ``403 Not Routed Here`` (the token binds
the parties, review 98), bob gets nothing.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import SipMessage, make_request, make_response, parse_address

pytestmark = pytest.mark.kamailio


def _wait_status(ua: SipUa, status: int, timeout: float = 3.0) -> SipMessage | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ua.receive(max(0.05, deadline - time.monotonic()))
        if got is not None and not got.is_request and got.status == status:
            return got
    return None


def _early_dialog(proxy, *, strip: bool):
    """alice's INVITE to bob and bob's reliable 183 (our Record-Route taken out when
    ``strip``): (alice, bob, the INVITE as bob got it, alice's INVITE, the 183 as alice
    got it or None)."""
    user = "r113bob%d" % int(strip)
    bob = RawUas(responder=lambda req: None if req.method == "INVITE"
                 else make_response(req, 200, "OK"))
    register_contact(proxy, user, bob.port)
    alice = SipUa(proxy.port, user="r113alice")
    invite = alice.build("INVITE", f"sip:{user}@example.com", to=f"sip:{user}@example.com",
                         headers=[("Supported", "100rel")])
    alice.send(invite.replace("Via", alice.via()))
    (got,) = bob.wait_for(1, method="INVITE")
    ringing = make_response(got, 183, "Session Progress",
                            [("Require", "100rel"), ("RSeq", "1"),
                             ("Contact", f"<sip:{user}@127.0.0.1:{bob.port}>")])
    if strip:
        ringing = ringing.remove("Record-Route")
    bob.sock.sendto(ringing.serialize(), ("127.0.0.1", proxy.port))
    return alice, bob, got, alice.sent[-1], _wait_status(alice, 183)


def test_control_prack_and_an_early_update_go_both_ways_through_the_proxy(home_proxy):
    alice, bob, got, sent, early = _early_dialog(home_proxy, strip=False)
    try:
        assert early is not None
        ours = got.get_all("Record-Route")
        assert len(ours) == 1 and "e2m-rr=" in ours[0] and early.get_all("Record-Route") == ours
        prack = alice.build("PRACK", f"sip:127.0.0.1:{bob.port}",
                            to=parse_address(sent.get("To")).uri, call_id=sent.get("Call-ID"),
                            from_tag=sent.from_tag, to_tag=early.to_tag, routes=ours,
                            headers=[("RAck", f"1 {sent.cseq[0]} INVITE")])
        answer = alice.request(prack)
        assert answer is not None and answer.status == 200, answer
        assert len(bob.wait_for(1, method="PRACK", timeout=1)) == 1
        update = make_request("UPDATE", alice.contact.strip("<>"),
                              from_uri=parse_address(got.get("To")).uri, to_uri=alice.aor,
                              call_id=sent.get("Call-ID"), from_tag=early.to_tag,
                              to_tag=sent.from_tag, cseq=1,
                              extra_headers=[("Route", r) for r in ours]
                              + [("Via", f"SIP/2.0/UDP 127.0.0.1:{bob.port};branch=z9hG4bKr113u")])
        bob.sock.sendto(update.serialize(), ("127.0.0.1", home_proxy.port))
        got_update = alice.receive(2)
        assert got_update is not None and got_update.is_request
        assert got_update.method == "UPDATE"
    finally:
        alice.close()
        bob.close()


def test_control_a_reliable_183_without_our_entry_is_dropped(home_proxy):
    mark = home_proxy.log_mark()
    alice, bob, _, _, early = _early_dialog(home_proxy, strip=True)
    try:
        assert early is None
        assert "(no Record-Route)" in home_proxy.log_since(mark)
    finally:
        alice.close()
        bob.close()


def test_control_a_strangers_prack_in_the_early_dialog_is_refused(home_proxy):
    alice, bob, got, sent, early = _early_dialog(home_proxy, strip=False)
    stranger = SipUa(home_proxy.port, user="r113mallory", source="127.0.0.113")
    try:
        assert early is not None
        prack = stranger.build("PRACK", f"sip:127.0.0.1:{bob.port}",
                               to=parse_address(sent.get("To")).uri,
                               call_id=sent.get("Call-ID"), from_tag=sent.from_tag,
                               to_tag=early.to_tag, routes=got.get_all("Record-Route"),
                               headers=[("RAck", f"1 {sent.cseq[0]} INVITE")])
        answer = stranger.request(prack)
        assert answer is not None and answer.status == 403, answer
        assert bob.wait_for(1, method="PRACK", timeout=0.5) == []
    finally:
        stranger.close()
        alice.close()
        bob.close()
