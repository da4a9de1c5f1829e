"""Review 24: ids Kamailio and the core read differently (a Call-ID's trailing blanks).

Review 23 made the core refuse a Call-ID or tag that is not visible ASCII, so that the
keys the core keeps under a dialog's ids are always the keys kemi can name from
Kamailio's parse (``$ci``, ``$ft``, ``$tt``: a bare BYE is ended from those alone,
``end_dialog_unread`` -> ``ProxyEngine.end_unread``).  Both readers were compared
header by header on this Kamailio (5.6.3): tags agree wherever both accept them
(quoted, ``TAG=``, blanks around ``=``, a tag in the URI as well, commas, ``<>``),
and where they differ one of them refuses (a tag given twice, escapes in a quoted
tag: Kamailio drops the message).  The Call-ID does not: the core strips blanks at
the end of a header value (``_parse_header_line``: ``value.strip(" \\t")``), while
Kamailio's ``$ci`` keeps them: ``Call-ID: abc `` is ``abc`` to the core and ``abc ``
to kemi.  Both accept it (the core's visible-ASCII check runs on the stripped value).

So a call whose INVITE and in-dialog requests write the Call-ID with a trailing blank
(the caller's own UA, or an untrusted hop between the caller and the proxy that adds it
to each of her requests: the signed context binds the stripped Call-ID, so every check
passes) is record-routed with the token of ``abc `` (kemi reads ``$ci``), its keys are
kept and moved under ``abc`` (the core), and its BYE, whose token matches, ends the
dialog ``abc `` in which nothing was kept: the caller's key outlives the call for the
dialog's life (12 h), one per call, on her quota: review 23's effect, by another
spelling.  The hole test was a strict xfail on ``c62af60``; it passes since kemi reads
Kamailio's ids through ``dialog_route.dialog_ids``, blanks stripped as the core strips
them (the route token, ``dialog_routed_here``, a bare BYE's scope, the certificate
service's NOTIFY answers).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa
from e2m_plugins.keycache import short_lived_key
from e2m_plugins.sip import make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _call_and_hang_up(proxy_factory, pki, *, hop_blank: str = ""):
    """(As ``test_review23_wire._call_and_hang_up``, with the hop.) alice calls bob through a
    proxy that reads SDP; bob answers under alice's offer key
    and alice hangs up with a bare BYE.  ``hop_blank`` is what an untrusted hop between
    alice and the proxy appends to the Call-ID of each of her requests (the INVITE and
    the BYE; the ACK is not needed here).  Returns (key-cache items once the 200 was read,
    whether bob got the BYE, alice's answer to it, the key-cache record names left)."""
    from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, invite, known_proxy, ua_engine
    from e2m_lab.kamailio_harness import register_contact
    from e2m_lab.wire import htable_entries
    from e2m_plugins.sip import make_request

    proxy = proxy_factory("review24-callid", e2m=True, view=SDP_VIEW)
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(lambda request: make_response(request, 180, "Ringing")
                 if request.method == "INVITE" else make_response(request, 200, "OK"))
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)

    def hop(request):
        return request.replace("Call-ID", request.call_id + hop_blank) if hop_blank else request
    try:
        register_contact(proxy, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        offer = alice.protect(invite(pki, call_id=f"review24-{time.monotonic_ns()}@x")).message
        alice_ua.send(hop(offer.replace("Via", alice_ua.via())))
        (delivered,) = bob.wait_for(1, method="INVITE")
        reply = answer(bob_engine.open(delivered).message, SDP_ANSWER, to_tag="b24")
        reply = reply.replace("Contact", f"<sip:bob@127.0.0.1:{bob.port}>")
        for route in delivered.get_all("Record-Route"):
            reply = reply.add("Record-Route", route)
        protected = bob_engine.protect(reply)
        assert protected.info.key_reuse
        bob.sock.sendto(protected.message.serialize(), ("127.0.0.1", proxy.port))
        assert proxy.wait_log("e2m: INVITE response 200", timeout=5)
        time.sleep(0.3)
        kept = proxy.htable_items()
        ok = protected.message
        bye = make_request("BYE", f"sip:bob@127.0.0.1:{bob.port}",
                           from_uri=ok.address("From").uri, to_uri=ok.address("To").uri,
                           call_id=ok.call_id, cseq=2, from_tag=ok.from_tag or "",
                           to_tag=ok.to_tag, body=b"")
        for route in reversed(ok.get_all("Record-Route")):
            bye = bye.add("Route", route)
        bye_answer = alice_ua.transact(hop(bye.replace("Via", alice_ua.via())))
        got_bye = bool(bob.wait_for(1, method="BYE", timeout=2))
        deadline = time.monotonic() + 2
        while proxy.htable_items() and time.monotonic() < deadline:
            time.sleep(0.1)
        return kept, got_bye, bye_answer, [name for name, _ in htable_entries(proxy)]
    finally:
        alice_ua.close()
        bob.close()


def test_hole_a_trailing_blank_in_the_call_id_keeps_the_callers_key_past_the_call(
        proxy_factory, pki):
    """Attacker: an untrusted hop between alice and the proxy (or a caller's own UA, an
    insider, writing its Call-IDs so).
    Attack: a space appended to the Call-ID header of alice's INVITE and of her BYE
    (headers only: her signed context binds the Call-ID, and the core, which strips a
    header value's trailing blanks, reads it unchanged, so every check passes).
    Effect: Kamailio's ``$ci`` keeps the blank.  The INVITE is record-routed with the
    token of ``abc `` and the BYE's token matches, so the BYE is routed and bob gets it
    and ends the call: nothing looks wrong.  But the core moved alice's offer key into the
    dialog ``abc`` when it read bob's 200, and the bare BYE is ended from Kamailio's ids
    (``end_dialog_unread``): the dialog ``abc `` holds nothing.  Alice's key stays in the
    key cache for the dialog's life (12 h), one per call, on her quota: what review 23
    fixed for a To tag that is not UTF-8.  (A hop could drop the BYE instead; then bob's
    side never ends and alice sees a timeout.  This one is silent.)
    Fix: one reader for the ids: refuse (400) a request whose ``$ci``/``$ft``/``$tt``
    are not what the core reads (``kemi.end_dialog_unread`` could compare them with
    ``message.call_id`` etc., or read the BYE with the core whenever it ends a dialog);
    or make the core refuse a Call-ID header with blanks around it (as ``$ci`` would
    show them), or strip ``$ci`` in kemi the way the core does (for the route token
    too, so the two agree)."""
    kept, got_bye, _bye_answer, left = _call_and_hang_up(proxy_factory, pki, hop_blank=" ")
    assert kept > 0, "the offer kept no key: nothing to show"
    assert got_bye, "the BYE was not routed: nothing to show"
    assert all(short_lived_key(name) for name in left), \
        f"a dialog record outlived the call: {[n for n in left if not short_lived_key(n)]}"


def test_control_the_same_call_without_the_blank_ends_with_its_keys(proxy_factory, pki):
    """The same call, the Call-ID as alice wrote it: the BYE drops every key."""
    kept, got_bye, bye_answer, left = _call_and_hang_up(proxy_factory, pki)
    assert kept > 0
    assert got_bye and bye_answer is not None and bye_answer.status == 200, bye_answer
    assert left == []
