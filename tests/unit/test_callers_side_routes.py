"""``RouteTokens.keeps_callers_side``: below our Record-Route entry, a reply carries the
entries its request reached us with, and nothing else (review 82, fixed in stop 34).

A hop on the callee's leg that adds or rewrites an entry there becomes the caller's
first hop (RFC 3261 12.1.2: her route set is the list reversed); entries above ours are
the callee's side, which the hop is on anyway."""

from __future__ import annotations

import pytest

from kamailio_app.dialog_route import RouteTokens

ROUTES = RouteTokens(b"r" * 32)
CALL, TAG = "c1@example.com", "at1"
OURS_TLS = f"<sip:10.0.0.1:5061;transport=tls;lr;e2m-rr={ROUTES.token(CALL, TAG)}>"
OURS_UDP = f"<sip:10.0.0.1:5060;lr;e2m-rr={ROUTES.token(CALL, TAG)}>"
CALLERS = "<sip:192.0.2.7:5061;transport=tls;lr>"
CALLEES = "<sip:198.51.100.9;lr>"
HOP = "<sip:203.0.113.66;lr>"


def kept(reply: list[str], request: list[str]) -> bool:
    return ROUTES.keeps_callers_side(CALL, TAG, reply, request)


@pytest.mark.parametrize("reply, below", [
    ([OURS_TLS], []),                                        # the caller came straight to us
    ([CALLEES, OURS_TLS, CALLERS], [CALLERS]),               # her own proxy below ours
    ([f"{CALLEES}, {OURS_UDP}", OURS_TLS, CALLERS], [CALLERS]),   # double Record-Route
    ([OURS_TLS, "<sip:192.0.2.7:5061;transport=tls;lr=on>"], [CALLERS]),  # reprinted lr
    ([OURS_TLS, " <SIP:192.0.2.7:5061;Transport=TLS;lr> "], [CALLERS]),   # blanks, case
])
def test_a_reply_with_the_callers_side_as_the_request_had_it_is_kept(reply, below):
    assert kept(reply, below)


def test_a_spiral_is_kept_at_either_of_our_entries():
    """The request passed us twice (a cluster's nodes share the key): each transaction
    finds the entry its request reached us under."""
    reply = [OURS_UDP, HOP, OURS_TLS, CALLERS]
    assert kept(reply, [HOP, OURS_TLS, CALLERS])     # the second pass
    assert kept(reply, [CALLERS])                     # the first


@pytest.mark.parametrize("reply, below", [
    ([OURS_TLS, HOP], []),                                   # review 82: an entry added
    ([OURS_TLS, f"{HOP}, {CALLERS}"], [CALLERS]),            # added above hers
    ([OURS_TLS, CALLERS, HOP], [CALLERS]),                   # added below hers
    ([OURS_TLS, HOP], [CALLERS]),                            # hers rewritten to the hop
    ([OURS_TLS], [CALLERS]),                                 # hers removed
    ([HOP, CALLERS], [CALLERS]),                             # ours gone: nothing vouches
    ([OURS_TLS.replace(ROUTES.token(CALL, TAG), "0" * 32), CALLERS], [CALLERS]),
])
def test_a_reply_whose_callers_side_differs_is_not_kept(reply, below):
    assert not kept(reply, below)


def test_another_dialogs_token_does_not_vouch():
    other = RouteTokens(b"r" * 32).param("c2@example.com", TAG)
    assert not kept([f"<sip:10.0.0.1;lr{other}>", CALLERS], [CALLERS])


def test_a_uas_reprinting_the_parameters_in_another_order_is_kept():
    """pjsip prints ``lr`` first: ``;r2=on;lr`` comes back as ``;lr;r2=on`` (seen in the
    roaming call's 200 on the first try of this check)."""
    mine = "<sip:192.0.2.7:5061;transport=tls;r2=on;lr>"
    assert kept([OURS_TLS, "<sip:192.0.2.7:5061;lr;r2=on;transport=tls>"], [mine])
    assert not kept([OURS_TLS, "<sip:192.0.2.7:5061;lr;r2=on;transport=udp>"], [mine])
