"""A fifty-eighth attacker's review (December 2026) of b4bb1dc: the last two fixes
(reviews 56 and 57), here on a real Kamailio: policies in the proxy's name removed from
what it relays.

Hole 1 (``test_hole_a_bare_ack_carries_a_policy_in_the_proxys_name``): **insider UA**
(bob here, the caller: any user whose calls reach the callee through the callee's home
proxy) or an **untrusted hop** before that proxy.  bob calls alice through the proxy;
alice answers 200; bob's ACK (Route: the proxy's Record-Route with its token) carries
``Proxy-Body-Policy: <the proxy>;view=...;cert-fp="sha256:<another certificate>"``.
Review 57 removes such a policy from every request the engine reads, from responses,
and now makes a bare BYE/CANCEL read; but ``route_in_dialog`` relays an ACK with
``KSR.tm.t_relay()`` alone (bare) or after ``inspect_only`` (with a body), which never
applies ``remove_headers``.  Effect: alice's UAS gets the forged policy; her engine
learns policies from any request of her dialog with a To tag (the ACK included), drops
her home proxy's certificate (the fingerprint differs) and her next MESSAGE to anyone
is 496 at her own proxy (``tests/unit/test_review58.py`` controls).  At fault:
``kamailio_app/kemi.py`` ``route_in_dialog``: ``if KSR.is_ACK(): if _has_body():
self.inspect_only(); KSR.tm.t_relay()``.  Fix: a header-only pass removing policies
naming this proxy before relaying any ACK (``KSR.hdr.is_present(PROXY_BODY_POLICY)``
then the engine's ``_policies_in_our_name``), and ``inspect_only`` applying
``verdict.remove_headers``.

Control: a bodiless INFO in the same dialog loses the forged policy (read by the engine).

Looked at, held (code read, not all run): ``drop_asserted_identity`` runs for every
request after sanity (CANCEL and in-dialog too); PAI/PPI/RPID have no compact form and
``KSR.hdr.is_present`` matches a name in any case by parsed type; ``$hdrc(From/To/
Call-ID/CSeq)`` counts by parsed type, compact ``f``/``t``/``i`` included, in the core
reply route (stray replies too); the Python parser's compact forms for those four are
the same as Kamailio's.

Fixed (stop 30): the proxy reads an in-dialog ACK that carries a ``Proxy-Body-Policy``
(as one with a body) and ``inspect_only`` applies the verdict's ``remove_headers``, so
a policy in the proxy's name goes from an ACK as from any request.  The hole's marker
is gone; it is a guard now.
"""

from __future__ import annotations

import hashlib

import pytest

from e2m_lab.flows import TRUSTED
from e2m_lab.kamailio_harness import SipUa, registered_uas
from e2m_plugins import headers as hdr

pytestmark = pytest.mark.kamailio

VIEW = ("MESSAGE:*",)
FORGED_FP = hashlib.sha256(b"not the home proxy's certificate").digest()


def _forged_policy(proxy) -> str:
    return hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("MESSAGE:*"),),
                            cert_fingerprint=FORGED_FP, cert_url=proxy.cert_url).format()


def _call_with_policy_on(proxy_factory, method):
    """bob calls alice (a registered RawUas) through the proxy; his ACK (and, for
    ``method`` INFO, a bodiless INFO after it) carries the forged policy only on
    ``method``.  Returns what alice's UAS received for ``method`` and the forged value."""
    proxy = proxy_factory("r58a", e2m=True, view=VIEW)
    forged = _forged_policy(proxy)
    with registered_uas(proxy, "alice", None, "127.0.0.72") as alice_uas:
        ua = SipUa(proxy.port, user="bob", source="127.0.0.73")
        try:
            invite = ua.build("INVITE", "sip:alice@example.com", to="sip:alice@example.com")
            ok = ua.request(invite)
            assert ok is not None and ok.status == 200, ok
            (delivered,) = alice_uas.wait_for(1, method="INVITE")
            routes = delivered.get_all("Record-Route")
            assert routes and "e2m-rr=" in routes[0]
            target = f"sip:alice@127.0.0.1:{alice_uas.port}"
            sent = ua.sent[-1]
            ack_headers = [(hdr.PROXY_BODY_POLICY, forged)] if method == "ACK" else []
            ack = ua.build("ACK", target, to="sip:alice@example.com", call_id=sent.get("Call-ID"),
                           from_tag=sent.from_tag, cseq=sent.cseq[0], to_tag=ok.to_tag,
                           routes=routes, headers=ack_headers)
            ua.send(ack.replace("Via", ua.via()))
            if method != "ACK":
                request = ua.build(method, target, to="sip:alice@example.com",
                                   call_id=sent.get("Call-ID"), from_tag=sent.from_tag,
                                   to_tag=ok.to_tag, routes=routes,
                                   headers=[(hdr.PROXY_BODY_POLICY, forged)])
                final = ua.request(request)
                assert final is not None and final.status == 200, final
            (got,) = alice_uas.wait_for(1, method=method)
            return got, forged
        finally:
            ua.close()


def test_control_an_in_dialog_info_loses_the_policy_in_the_proxys_name(proxy_factory):
    got, forged = _call_with_policy_on(proxy_factory, "INFO")
    assert forged not in got.get_all(hdr.PROXY_BODY_POLICY)


def test_hole_a_bare_ack_carries_a_policy_in_the_proxys_name(proxy_factory):
    got, forged = _call_with_policy_on(proxy_factory, "ACK")
    assert forged not in got.get_all(hdr.PROXY_BODY_POLICY)
