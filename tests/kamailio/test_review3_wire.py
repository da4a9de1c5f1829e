"""A third attacker's review, on the wire (real Kamailio on loopback): the Record-Route
token (``kamailio_app/dialog_route.py``) and the paths around it.

``test_hole_*`` succeeded when this review ran and pass since the fixes: a stranger's
Route set past the proxy is refused (``kamailio.may_route_onward``), and a standard
method not in capitals is refused at the door (``route_sanity``); ``test_held_*`` the
code refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, RawUas, SipUa, start_proxy, wait_delivered
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI

from kamailio_app.dialog_route import PARAM

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review3-home"), pki=pki, e2m=True, auth=True,
                        users=USERS)
    yield proxy
    proxy.stop()


def _answering_uas() -> Iterator[RawUas]:
    uas = RawUas(lambda request: make_response(request, 200, "OK"))
    yield uas
    uas.close()


@pytest.fixture
def elsewhere() -> Iterator[RawUas]:
    """A UAS of none of our users (the stranger's own): answers 200."""
    yield from _answering_uas()


@pytest.fixture
def victim() -> Iterator[RawUas]:
    """A third party's UAS, none of our users either: answers 200."""
    yield from _answering_uas()


def test_hole_a_preloaded_route_relays_a_strangers_request_anywhere(home, elsewhere):
    """HOLE (off-path sender): a stranger's request to one of our users passes
    ``route_auth`` with no challenge (toward our domain), then ``route_target`` honours
    a preloaded Route past the proxy (``loose_route`` sets the destination to the next
    entry).  So ``Route: <sip:home;lr>, <sip:anywhere;lr>`` makes the home proxy relay
    any initial request (MESSAGE, INVITE, OPTIONS ...) to any address: the open relay
    the route token closed for in-dialog requests, still open for initial ones."""
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.51")
    try:
        forged = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          routes=[f"<sip:127.0.0.1:{home.port};lr>",
                                  f"<sip:127.0.0.1:{elsewhere.port};lr>"],
                          body=b"review3: preloaded", content_type="text/plain")
        answer = ua.transact(forged)
        relayed = wait_delivered(elsewhere, b"review3: preloaded", timeout=0.7)
        assert not relayed, f"relayed past the proxy (answer {answer.status if answer else None})"
    finally:
        ua.close()


def test_hole_a_stranger_mints_a_route_token_and_relays_in_dialog(home, elsewhere, victim):
    """HOLE (off-path sender): the token is meant to be held only by the parties of a
    dialog the proxy record-routed.  A stranger gets one for a Call-ID and tag of his
    choice with no callee: an INVITE to one of our users (no challenge) with a preloaded
    Route to his own UAS is record-routed (token added) and relayed to that UAS, which
    reads the Record-Route.  With it, an in-dialog MESSAGE (a To tag, never challenged
    for a stranger: ``route_auth(in_dialog=True)``) to a third party's address is
    relayed: the open relay of review 2 is back, one INVITE per Call-ID away."""
    invites, tokens, relayed = mint_a_route_token(home, elsewhere, victim, "review3",
                                                  next_hop_params=";lr")
    assert not tokens and not relayed, \
        f"the stranger got the route token; relayed with it to a third party: {relayed}"


def mint_a_route_token(home: ProxyHandle, elsewhere: RawUas, victim: RawUas, label: str, *,
                       next_hop_params: str) -> tuple[list, list[str], bool]:
    """dave's INVITE to bob (ours: never challenged) with ``Route: <home;lr>,
    <elsewhere NEXT_HOP_PARAMS>``; then, with any route token elsewhere read in it, an
    in-dialog MESSAGE (a made-up To tag: never challenged for a stranger) to a third
    party's address.  Returns (the INVITEs elsewhere got, the tokens in them, whether the
    MESSAGE reached the third party)."""
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.52")
    call_id, tag = f"{label}-mint@127.0.0.52", f"mint-tag-{label}"
    try:
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com",
                          call_id=call_id, from_tag=tag,
                          routes=[f"<sip:127.0.0.1:{home.port};lr>",
                                  f"<sip:127.0.0.1:{elsewhere.port}{next_hop_params}>"])
        ua.transact(invite)
        invites = elsewhere.wait_for(1, timeout=0.7, method="INVITE")
        tokens = [rr for m in invites for rr in m.get_all("Record-Route") if f";{PARAM}=" in rr]
        relayed = False
        if tokens:      # what the token buys him: a relay to a third party's address
            text = f"{label}: minted relay".encode()
            relay = ua.build("MESSAGE", f"sip:erin@127.0.0.1:{victim.port}",
                             to="sip:erin@elsewhere.example.org", to_tag="made-up",
                             call_id=call_id, from_tag=tag, routes=[tokens[0]],
                             body=text, content_type="text/plain")
            ua.transact(relay)
            relayed = wait_delivered(victim, text, timeout=0.7)
        return invites, tokens, relayed
    finally:
        ua.close()


# -- policy coverage: the method's spelling ------------------------------------------

@pytest.fixture(scope="module")
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    """bob's phone, registered with his password; answers 200 to everything."""
    from e2m_lab.kamailio_harness import registered_uas
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.21",
                        lambda request: make_response(request, 200, "OK")) as uas:
        yield uas


def _bob_only_sdp_invite(ua: SipUa, pki: TestPKI, method: str):
    from e2m_lab.flows import SDP_OFFER
    from e2m_plugins.body import protect_content, with_entity
    from e2m_plugins.cms.recipients import recipient_for_certificate
    request = ua.build(method, "sip:bob@example.com", to="sip:bob@example.com")
    part, _ = protect_content("application/sdp", SDP_OFFER.replace(b"127.0.0.1", b"203.0.113.66"),
                              [recipient_for_certificate(pki.user("bob").cert)],
                              signer=None, bind_to=request)
    return with_entity(request, part)


@pytest.mark.parametrize("method", ["invite", "INVITE"])
def test_hole_a_lower_case_invite_carries_sdp_the_proxy_never_reads(home, bob, pki, method):
    """HOLE (off-path sender or insider UA): ``[policy] view INVITE:application/sdp``.
    A stranger's ``invite`` (Kamailio parses method names case-insensitively: tm relays
    it as an INVITE) whose SDP is encrypted for bob alone reaches bob's phone, and pjsua2
    2.15.1 takes ``invite`` as a call (``onIncomingCall``, seen in this review); the same
    request spelled ``INVITE`` is refused (the control)."""
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.54")
    try:
        request = _bob_only_sdp_invite(ua, pki, method)
        call_id = request.call_id
        ua.transact(request)
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline and not any(m.call_id == call_id for m in bob.received):
            time.sleep(0.05)
        assert not any(m.call_id == call_id for m in bob.received), \
            f"{method} with bob-only SDP reached bob unread"
    finally:
        ua.close()
