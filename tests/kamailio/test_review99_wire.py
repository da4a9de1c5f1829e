"""A ninety-ninth attacker's review (December 2026) of af54be7: stop 36's proxy fixes
(reviews 96 and 98: the route token binding the dialog's parties, the BYE's way, the
door's ``400 Bad From or To``), fresh eyes, on a real Kamailio with ``[auth]``.

Hole 1 (``test_hole_an_ack_written_as_the_dialogs_other_party_is_archived_as_his``):
**off-path sender** (eve, no account) or **insider UA** (mallory, her own password).
Review 98's fix binds the dialog's two parties into the route token, *sorted*, so that
the callee's requests (From and To swapped) carry the same token.  Nothing binds which
party a tag belongs to.  So the attacker calls bob (eve unchallenged, as any stranger
calling one of our users; mallory with her own credentials), bob answers, and the
attacker sends the dialog's ACK with From and To swapped: ``From: <sip:bob@example.com>``
and ``To: <sip:eve@other.example.net>`` (form ``uris``: the tags left where they were,
the caller's tag in From; form ``tags``: the tags swapped too, the form of an ACK from
bob's side, which only exists after a re-INVITE *bob* sent, and bob sent none) with a
body (SDP, covered by the ``INVITE:application/sdp`` rule, or text).  The pair sorts the
same, the token fits, an ACK is never challenged (``route_auth``), ``route_in_dialog``
reads it (``inspect_only``) and the archive keeps it with ``from_uri =
sip:bob@example.com``: a body bob never wrote, in bob's name, made by a stranger without
credentials (the same gap review 98 closed for "From alice", one party over).  At fault:
``kamailio_app/dialog_route.py:92`` (``dialog_parties``: ``first, second =
sorted(named)``) with ``RouteTokens.admits`` (dialog_route.py:191-203: any of the
request's tags with the sorted pair), and ``kamailio_app/kemi.py:1095-1100``
(``route_in_dialog``: an ACK with a body is read and archived under its From).  Fix:
bind the order: mint the token over (caller's AoR, callee's AoR) as the initial request
names them, and admit a request whose *From* tag is the caller's tag only with From =
caller, To = callee, one whose *To* tag is the caller's only with From = callee, To =
caller (form ``uris``); and for an ACK (never challenged) archive its body under its
From only when it acknowledges an INVITE this proxy relayed in that dialog from that
From tag with that CSeq number (tm's 2xx-ACK match, or a note of in-dialog INVITEs
relayed), else under no sender (form ``tags``).

Hole 2 (``test_hole_a_cancel_written_from_alice_is_archived_as_hers``): **off-path
sender**, no account.  A CANCEL is never challenged either, and tm matches it to the
INVITE by its top Via branch (RFC 3261 §9.2), not by its From: review 98 left it
"not tried".  eve calls dan (his phone only rings), then sends the CANCEL of her INVITE
(her INVITE's Via, Call-ID, From tag, CSeq number) written ``From:
<sip:alice@example.com>``, with a text body and ``Proxy-Required-Body:
proxy.example.com`` (anyone may ask the proxy to view a part).  ``route_cancel``
(``t_check_trans`` finds eve's INVITE) calls ``inspect_only``, the engine opens the
labelled part, and the archive keeps it with ``from_uri = sip:alice@example.com``.  At
fault: ``kamailio_app/kemi.py:1054-1058`` (``route_cancel``: ``inspect_only`` for any
CANCEL tm matches, whatever its From) and ``route_auth`` (kemi.py:913, CANCEL never
challenged).  Fix: a CANCEL's From must be its INVITE's (``$T_req($fu)`` once
``t_check_trans`` matched, compared by AoR with ``identity_of``); otherwise relay it
unread (or drop it), archiving nothing; simpler still, archive no CANCEL body (a CANCEL
carries no offer or answer, RFC 3261 §9.1).

Finding 3 (``test_hole_a_gateways_number_portability_flag_is_refused_400``): no
attacker, an **honest flow broken** (the brief's "PSTN" and "the door's 400" items;
availability, not one of the four attackers' gains).  A PSTN gateway's INVITE to bob
with ``From: <sip:+15551234;npdi@gw.example.net;user=phone>`` (RFC 4694's number
portability flag in the user part, legal per RFC 3261 §19.1.1) passes the door (the
core reads the From header as a name-addr and the URI whole) but is answered ``400 Bad
From or To`` by ``record_route``: ``kemi._dialog_parties`` passes Kamailio's ``$fu``, the
URI without brackets, and ``dialog_parties`` (``kamailio_app/dialog_route.py:81``,
``bare = parse_address(uri).uri``) parses that bare addr-spec as a name-addr, where the
first ``;`` starts header parameters and ``npdi@gw.example.net`` is a malformed one:
no parties, no token, refused.  The same call with ``sip:+15551234@gw...;user=phone``
is record-routed (control).  Fix: take the scheme from the URI text itself
(``uri.partition(":")[0]``), or wrap ``$fu``/``$tu`` in ``<...>`` before
``parse_address``; the identity is already read from the whole URI (``identity_of``).

Controls: the attacker's own ACK (From and To as in her INVITE) is archived under her
own From; review 98's fix holds: in the same dialog an ACK "From alice" leaves no row;
eve's own CANCEL with the same label and body is read and archived under eve's From and
reaches dan (the CANCEL path is as the hole uses it).

Tried and held (code read or run through the unit models, ``tests/unit/test_review99.py``):
- AoR spellings of the parties: case of the host, ``%61`` escapes, ports, ``user=phone``,
  ``sips:`` for ``sip:``, a display name, URI parameters: ``dialog_parties`` reads them
  with ``identity_of``, as the engine, the archive's signer check and ``from_ours`` do,
  so every spelling the core reads as alice's is alice's to the token too (refused in
  mallory's dialog), and an honest UA changing them in-dialog is still admitted;
  ``tel:`` with parameters or in other case (folded, the same party); a URI the core
  cannot read is 400 at the door before the token is asked;
- the BYE's way: a Route entry past ours to the hop's UAS, ``;r2`` added to our entry
  (``double_rr_entry`` then compares the Route past both entries with what
  ``loose_route`` chose: a destination that differs is not the dialog's way), an entry
  ``loose_route`` did not take off; a Request-URI with ``;maddr=`` to a hop: this
  Kamailio is built without ``HONOR_MADDR`` (no ``maddr dst`` in the binary), so the
  BYE goes to the target's own host and port.
Not tried: a Request-URI naming alice's host and port with another ``;transport=``
(``kemi._target`` compares scheme, user, host and port only): a listener on alice's
address is needed, i.e. a hop on her host; a front with ``[auth]``.

Fixed (stop 36): as ``tests/unit/test_review99.py``'s docstring says; the CANCEL control
now asserts eve's own CANCEL is relayed (200, reaches dan) and archived under no one.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import (PROXY_HOST, SipUa, parse_address_uri, registered_uas,
                                      start_proxy)
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "mallory": "mallory-Secret-3",
         "dan": "dan-Secret-4"}
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n"
       b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
ALICE, BOB, DAN = "sip:alice@example.com", "sip:bob@example.com", "sip:dan@example.com"


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review99-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bob(home):
    """bob's one contact (a raw UAS answering 200, Record-Route copied back)."""
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.150") as uas:
        yield uas


def _ring(request):
    """dan's phone rings and never answers an INVITE (180); anything else 200."""
    from e2m_plugins.sip import make_response
    return make_response(request, 180 if request.method == "INVITE" else 200,
                         "Ringing" if request.method == "INVITE" else "OK")


@pytest.fixture(scope="module")
def dan(home):
    with registered_uas(home, "dan", USERS["dan"], "127.0.0.166", responder=_ring) as uas:
        yield uas


def _rows(home, call_id: str, method: str):
    return [row for row in home.archive_rows() if row.call_id == call_id and row.method == method]


def _wait_rows(home, call_id: str, method: str, timeout: float = 1.5):
    deadline = time.monotonic() + timeout
    rows = _rows(home, call_id, method)
    while not rows and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _rows(home, call_id, method)
    return rows


def _attacker(port: int, name: str, source: str) -> SipUa:
    if name == "mallory":
        return SipUa(port, user="mallory", password=USERS["mallory"], source=source)
    return SipUa(port, user="eve", domain="other.example.net", source=source)


def _dialog_with_bob(home, attacker: str, source: str):
    """The attacker's own call to bob, answered 200.  Returns (ua, invite as sent, 200,
    route set, bob's target)."""
    ua = _attacker(home.port, attacker, source)
    invite = ua.build("INVITE", BOB, to=BOB)
    ok = ua.request(invite, timeout=6)
    assert ok is not None and ok.status == 200, ok
    sent = ua.sent[-1]
    routes = list(reversed(ok.get_all("Record-Route")))
    assert routes and "e2m-rr=" in routes[0], routes
    target = parse_address_uri(ok.get("Contact") or "") or ""
    return ua, sent, ok, routes, target


def _ack(ua, sent, ok, routes, target, *, from_uri, to_uri, swap_tags, body, content_type):
    from_tag, to_tag = (ok.to_tag, sent.from_tag) if swap_tags else (sent.from_tag, ok.to_tag)
    ack = ua.build("ACK", target or BOB, to=to_uri, call_id=sent.get("Call-ID"),
                   from_tag=from_tag, cseq=sent.cseq[0], to_tag=to_tag, routes=routes,
                   body=body, content_type=content_type)
    ack = ack.replace("From", f"<{from_uri}>;tag={from_tag}")
    ack = ack.replace("To", f"<{to_uri}>;tag={to_tag}")
    return ack.replace("Via", ua.via())


BODIES = [("application/sdp", SDP), ("text/plain", b"bob: I approve the transfer")]


# -- hole 1: an ACK written as the dialog's other party ---------------------------------

@pytest.mark.parametrize("attacker,source", [("eve", "127.0.0.151"), ("mallory", "127.0.0.152")])
@pytest.mark.parametrize("content_type,body", BODIES)
def test_control_the_attackers_own_ack_is_archived_naming_no_one(home, bob, attacker,
                                                                  source, content_type, body):
    """The attacker's own ACK (her From, her tag) is routed and its body archived.  Since
    stop 37 (review 101) an unsigned ACK body names no sender: the dialog's other party
    can write the very same ACK; a body its From signed for it names her
    (``tests/kamailio/test_review101_wire.py``)."""
    ua, sent, ok, routes, target = _dialog_with_bob(home, attacker, source)
    try:
        own = str(ua.aor)
        ua.send(_ack(ua, sent, ok, routes, target, from_uri=own, to_uri=BOB, swap_tags=False,
                     body=body, content_type=content_type))
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        assert rows and all(row.from_uri is None and row.plaintext == body for row in rows), \
            [r.summary() for r in rows]
    finally:
        ua.close()


def test_control_review_98_holds_an_ack_from_alice_leaves_no_row(home, bob):
    ua, sent, ok, routes, target = _dialog_with_bob(home, "eve", "127.0.0.153")
    try:
        ua.send(_ack(ua, sent, ok, routes, target, from_uri=ALICE, to_uri=BOB, swap_tags=False,
                     body=b"alice: forged", content_type="text/plain"))
        time.sleep(1.0)
        assert not _rows(home, sent.get("Call-ID"), "ACK")
    finally:
        ua.close()


@pytest.mark.parametrize("form", ["uris", "tags"])
@pytest.mark.parametrize("attacker,source", [("eve", "127.0.0.154"), ("mallory", "127.0.0.155")])
@pytest.mark.parametrize("content_type,body", BODIES)
def test_hole_an_ack_written_as_the_dialogs_other_party_is_archived_as_his(
        home, bob, form, attacker, source, content_type, body):
    ua, sent, ok, routes, target = _dialog_with_bob(home, attacker, source)
    try:
        ua.send(_ack(ua, sent, ok, routes, target, from_uri=BOB, to_uri=str(ua.aor),
                     swap_tags=form == "tags", body=body, content_type=content_type))
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        as_bob = [row.summary() for row in rows if (row.from_uri or "").startswith(BOB)]
        assert not as_bob, f"archived as bob's, no credentials asked: {as_bob}"
    finally:
        ua.close()


# -- hole 2: a CANCEL written From alice --------------------------------------------------

def _cancel_while_ringing(home, dan, source: str, from_uri: str | None, text: bytes):
    """eve (no account) calls dan, whose phone rings; then the CANCEL of her INVITE,
    its From ``from_uri`` (None: her own), with ``text`` labelled for the proxy.
    Returns (Call-ID, CANCEL rows, the CANCEL's answer, whether dan got a CANCEL)."""
    eve = SipUa(home.port, user="eve", domain="other.example.net", source=source)
    try:
        invite = eve.build("INVITE", DAN, to=DAN).replace("Via", eve.via())
        eve.send(invite)
        ringing = eve.receive(3)
        while ringing is not None and (ringing.status or 0) < 180:
            ringing = eve.receive(3)
        assert ringing is not None and ringing.status == 180, ringing
        cancel = eve.build("CANCEL", DAN, to=DAN, call_id=invite.get("Call-ID"),
                           from_tag=invite.from_tag, cseq=invite.cseq[0], body=text,
                           content_type="text/plain",
                           headers=[("Proxy-Required-Body", PROXY_HOST)])
        cancel = cancel.replace("Via", invite.get("Via") or "")
        if from_uri is not None:
            cancel = cancel.replace("From", f"<{from_uri}>;tag={invite.from_tag}")
        eve.send(cancel)
        answer = None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            message = eve.receive(deadline - time.monotonic())
            if message is None:
                break
            if not message.is_request and message.cseq == (invite.cseq[0], "CANCEL"):
                answer = message
                break
        call_id = invite.get("Call-ID")
        rows = _wait_rows(home, call_id, "CANCEL")
        got = any(m.method == "CANCEL" and m.get("Call-ID") == call_id for m in dan.received)
        return call_id, rows, answer, got
    finally:
        eve.close()


def test_control_a_strangers_own_cancel_is_relayed_and_not_archived(home, dan):
    """Fixed (stop 36): a CANCEL's body is read (its INVITE's keys go) but archived under
    no one, eve's own included: a CANCEL is never challenged and tm matches it whatever
    its From says."""
    _, rows, answer, got = _cancel_while_ringing(home, dan, "127.0.0.167", None,
                                                 b"control: eve cancels")
    assert answer is not None and answer.status == 200, answer
    assert [row.from_uri for row in rows] == []
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:     # tm's own CANCEL to dan
        time.sleep(0.1)
        got = True if any(m.method == "CANCEL" for m in dan.received) else got
    assert got


def test_hole_a_cancel_written_from_alice_is_archived_as_hers(home, dan):
    _, rows, answer, _ = _cancel_while_ringing(home, dan, "127.0.0.168", ALICE,
                                               b"alice: cancel the order")
    as_alice = [row.summary() for row in rows if (row.from_uri or "").startswith(ALICE)]
    assert not as_alice, f"archived as alice's (answer {answer and answer.status}): {as_alice}"


# -- finding 3: an honest gateway's call refused 400 (number portability in the user) -------

def _gateway_call(home, bob, source: str, from_uri: str):
    """A PSTN gateway (no account here: a stranger's call to one of our users) calls bob
    with ``from_uri`` as its From; the INVITE's final answer."""
    gw = SipUa(home.port, user="gw", domain="gw.example.net", source=source)
    try:
        invite = gw.build("INVITE", BOB, to=BOB)
        invite = invite.replace("From", f"<{from_uri}>;tag={invite.from_tag}")
        return gw.transact(invite, timeout=4)
    finally:
        gw.close()


def test_control_a_gateways_number_with_user_phone_is_record_routed(home, bob):
    answer = _gateway_call(home, bob, "127.0.0.171", "sip:+15551234@gw.example.net;user=phone")
    assert answer is not None and answer.status == 200, answer
    assert any("e2m-rr=" in rr for rr in answer.get_all("Record-Route"))


def test_hole_a_gateways_number_portability_flag_is_refused_400(home, bob):
    answer = _gateway_call(home, bob, "127.0.0.172",
                           "sip:+15551234;npdi@gw.example.net;user=phone")
    assert answer is not None and answer.status == 200, answer
