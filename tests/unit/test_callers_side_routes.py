"""``RouteTokens.keeps_callers_side``: below our Record-Route entry, a reply carries the
entries its request reached us with, and nothing else (review 82, fixed in stop 34).

A hop on the callee's leg that adds or rewrites an entry there becomes the caller's
first hop (RFC 3261 12.1.2: her route set is the list reversed); entries above ours are
the callee's side, which the hop is on anyway.  Our entry carries, beside the dialog's
token, a MAC of the Record-Route the request reached us with (the second half of
``e2m-rr``'s value), so the check
needs no state and holds for a stray reply too (review 86)."""

from __future__ import annotations

import pytest

from kamailio_app.dialog_route import RouteTokens, dialog_parties, routes_within_bounds

ROUTES = RouteTokens(b"r" * 32)
PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To
CALL, TAG = "c1@example.com", "at1"
CALLERS = "<sip:192.0.2.7:5061;transport=tls;lr>"
CALLEES = "<sip:198.51.100.9;lr>"
HOP = "<sip:203.0.113.66;lr>"


def ours_tls(below: list[str]) -> str:
    """Our TLS entry as ``record_route`` writes it for a request that reached us with
    Record-Route ``below``."""
    return f"<sip:10.0.0.1:5061;transport=tls;lr{ROUTES.param(CALL, TAG, below, parties=PARTIES)}>"


def ours_udp(below: list[str]) -> str:
    return f"<sip:10.0.0.1:5060;lr{ROUTES.param(CALL, TAG, below, parties=PARTIES)}>"


def kept(reply: list[str]) -> bool:
    return routes_within_bounds(reply) and ROUTES.keeps_callers_side(CALL, TAG, reply, parties=PARTIES)


@pytest.mark.parametrize("reply", [
    [ours_tls([])],                                          # the caller came straight to us
    [CALLEES, ours_tls([CALLERS]), CALLERS],                 # her own proxy below ours
    [f"{CALLEES}, {ours_udp([CALLERS])}", ours_tls([CALLERS]), CALLERS],   # double RR
    [ours_tls([CALLERS]), "<sip:192.0.2.7:5061;transport=tls;lr=on>"],    # reprinted lr
    [ours_tls([CALLERS]), " <SIP:192.0.2.7:5061;Transport=TLS;lr> "],     # blanks, case
])
def test_a_reply_with_the_callers_side_as_the_request_had_it_is_kept(reply):
    assert kept(reply)


def test_a_spiral_is_kept_at_either_of_our_entries():
    """The request passed us twice (a cluster's nodes share the key): the entry of its
    second pass vouches for what lies below it, its first pass's entry included."""
    first = ours_tls([CALLERS])
    second = ours_udp([HOP, first, CALLERS])
    assert kept([second, HOP, first, CALLERS])
    assert kept([HOP, first, CALLERS])


@pytest.mark.parametrize("reply", [
    [ours_tls([]), HOP],                                     # review 82: an entry added
    [ours_tls([CALLERS]), f"{HOP}, {CALLERS}"],              # added above hers
    [ours_tls([CALLERS]), CALLERS, HOP],                     # added below hers
    [ours_tls([CALLERS]), HOP],                              # hers rewritten to the hop
    [ours_tls([CALLERS])],                                   # hers removed
    [HOP, CALLERS],                                          # ours gone: nothing vouches
    [ours_tls([CALLERS]).replace(ROUTES.token(CALL, TAG, parties=PARTIES), "0" * 32), CALLERS],
    [f"<sip:10.0.0.1:5061;transport=tls;lr;e2m-rr={ROUTES.token(CALL, TAG, parties=PARTIES)}>", CALLERS],
    # (the MAC taken out: the token alone, as an entry written before the MAC was)
    # review 86: our entry kept whole inside a quoted display name, the hop's URI outside
    [f'"{ours_tls([])[:-1]}>" <sip:127.0.0.1:5999;lr>'],
    [ours_tls([CALLERS]), f'"{CALLERS}" <sip:127.0.0.1:5999;lr>'],
])
def test_a_reply_whose_callers_side_differs_is_not_kept(reply):
    assert not kept(reply)


def test_another_dialogs_token_does_not_vouch():
    other = RouteTokens(b"r" * 32).param("c2@example.com", TAG, [CALLERS], parties=PARTIES)
    assert not kept([f"<sip:10.0.0.1;lr{other}>", CALLERS])


def test_a_uas_reprinting_the_parameters_in_another_order_is_kept():
    """pjsip prints ``lr`` first: ``;r2=on;lr`` comes back as ``;lr;r2=on`` (seen in the
    roaming call's 200 on the first try of this check)."""
    mine = "<sip:192.0.2.7:5061;transport=tls;r2=on;lr>"
    assert kept([ours_tls([mine]), "<sip:192.0.2.7:5061;lr;r2=on;transport=tls>"])
    assert not kept([ours_tls([mine]), "<sip:192.0.2.7:5061;lr;r2=on;transport=udp>"])


def test_an_unreadable_callers_side_vouches_for_nothing():
    assert not kept([f"<sip:10.0.0.1;lr{ROUTES.param(CALL, TAG, None, parties=PARTIES)}>"])


def test_an_entry_written_before_review98_no_longer_routes_its_dialog():
    """The token binds the dialog's parties since review 98: an entry written before
    (the token of the Call-ID and tag alone, as the old 128-bit token's first half or
    with the MAC after it) no longer routes its dialog; the parameter keeps its size."""
    import hashlib
    import hmac
    old = hmac.new(b"r" * 32, b"\x00".join((CALL.encode(), TAG.encode())),
                   hashlib.sha256).digest()[:16].hex()
    assert not ROUTES.admits(CALL, (TAG,), [f"<sip:10.0.0.1;lr;e2m-rr={old}>"],
                             parties=PARTIES)
    assert len(ROUTES.param(CALL, TAG, [], parties=PARTIES)) == len(";e2m-rr=") + 32    # the same size


def test_the_entry_found_is_the_one_this_transaction_wrote():
    """Review 112 (stop 39): the reply check holds the entry this transaction wrote to
    the socket its request came in on.  In a spiral our lowest entry is the first
    pass's; the entry whose MAC fits the Via below ours is this pass's own, and with
    double Record-Route the lower of the two (the one facing the caller)."""
    alices_via, hops_via = "SIP/2.0/TCP 192.0.2.7:5061;branch=z9hG4bKa1", \
        "SIP/2.0/UDP 203.0.113.66;branch=z9hG4bKh1"
    first = f"<sip:10.0.0.1:5060;transport=tcp;lr{ROUTES.param(CALL, TAG, [], alices_via, parties=PARTIES)}>"
    second = f"<sip:10.0.0.1:5060;lr{ROUTES.param(CALL, TAG, [HOP, first], hops_via, parties=PARTIES)}>"
    reply = [second, HOP, first]
    assert ROUTES.callers_side_entry(CALL, TAG, reply, hops_via, parties=PARTIES) == second[1:-1]
    assert ROUTES.callers_side_entry(CALL, TAG, reply, alices_via, parties=PARTIES) == first[1:-1]
    assert ROUTES.callers_side_entry(CALL, TAG, reply, "SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKx",
                                     parties=PARTIES) is None
    upper, lower = ours_udp([CALLERS]), ours_tls([CALLERS])
    assert ROUTES.callers_side_entry(CALL, TAG, [f"{CALLEES}, {upper}", lower, CALLERS],
                                     parties=PARTIES) == lower[1:-1]
