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

import pytest

from e2m_plugins import headers as hdr

from test_review57_wire import in_dialog_with_policy

pytestmark = pytest.mark.kamailio


def test_hole_a_bare_ack_carries_a_policy_in_the_proxys_name(proxy_factory):
    """The control (an in-dialog INFO loses the forged policy) is review 57's."""
    got, forged = in_dialog_with_policy(proxy_factory, "ACK")
    assert forged not in got.get_all(hdr.PROXY_BODY_POLICY)
