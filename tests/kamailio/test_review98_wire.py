"""A ninety-eighth attacker's review (December 2026) of d91b4b5: admitting only real users
(digest auth, registrar, identity), fresh eyes, on a real Kamailio with ``[auth]``.

Hole 1 (``test_hole_an_in_dialog_ack_from_alice_is_archived_as_hers``): **insider UA**
(mallory, a user with her own password) or **off-path sender** (eve, no account).  Digest
holds every request whose From is one of our users to that user's credentials, but an
ACK is never challenged (RFC 3261 §22.1: ``route_auth`` returns at once for ACK and
CANCEL), and the route token an in-dialog request must carry binds only the Call-ID and
the caller's *tag*, not who the parties are.  So the attacker calls bob (mallory with her
own credentials; eve unchallenged, as any stranger calling one of our users: bob's
phone answers, or only rings: a 180 hands back the Record-Route with the token too,
``test_hole_a_strangers_ack_while_the_phone_rings_is_archived_as_alices``),
then sends the dialog's ACK with ``From: <sip:alice@example.com>;tag=<her own tag>``
and a body: an SDP (the home proxy's ``INVITE:application/sdp`` rule covers ACK) or a
text part.  The proxy routes it (token fits), never asks for alice's credentials,
reads the body and archives it with ``from_uri = sip:alice@example.com``; bob's stack
gets it in the dialog (a stack matches in-dialog requests by Call-ID and tags; the
threat model's "pjsip matches in-dialog requests by tags alone").  The archive says
alice sent what mallory or a stranger wrote.  At fault: ``kamailio_app/kemi.py:838``
``route_auth`` (``if auth is None or KSR.is_ACK() or KSR.is_CANCEL(): return True``)
with ``route_in_dialog``'s ACK branch (kemi.py:1004-1010, ``self.inspect_only()`` then
``t_relay``), and ``kamailio_app/dialog_route.py:85-89`` (``RouteTokens.token``: the MAC names
the Call-ID and the caller's tag only).  Fix: bind the dialog's two AoRs into the token
(the caller's From AoR and the callee's To AoR of the initial request, as the core reads
them; RFC 3261 §12.2.1.1 keeps them for the dialog's life), so an in-dialog request
(an ACK above all, which cannot be challenged) naming another party is ``403 Not
Routed Here`` or dropped; or, at the least, archive an ACK's or CANCEL's body under
no sender unless its From is the party that authenticated the dialog's INVITE.

Hole 2 (``test_hole_a_from_the_core_cannot_read_is_archived_as_alices``): **off-path
sender**, no account.  ``from_ours`` asks Kamailio's ``is_myself_furi`` and then the
core's ``identity_of``; a From URI that neither can take apart is "not ours", so it is
never challenged.  ``From: "Alice" <sip:alice@example.com;x="y">`` is such a URI (a
quoted URI parameter: Kamailio's ``parse_addr_spec`` and the core's ``parse_uri`` both
refuse it), yet pjsip takes it as a valid URI of user ``alice`` at ``example.com``
(``Endpoint.utilVerifySipUri`` says 0), the AoR RFC 3261 §19.1.4 compares equal to
alice's.  The proxy reads the stranger's MESSAGE, archives it under ``from_uri =
sip:alice@example.com;x="y"`` (signature none, as alice's own plaintext is), and only
then tm fails to relay it (the From it cannot parse: 408).  A row of a message alice
never sent, which reached nobody, made with no credentials at all.  At fault:
``kamailio_app/kemi.py:904`` ``from_ours`` (an unreadable From is taken for a
stranger's, and ``route_auth`` at kemi.py:844-846 lets it through) and kemi.py:924
``route_sanity`` (``sanity_check_defaults`` checks no URI: 999 leaves out 1024).
Fix: refuse at the door (400) a request whose From or To URI Kamailio or the core
cannot read (``KSR.sanity.sanity_check(1024, 6)``, and ``identity_of`` for a sip/sips
From), before anything is archived; fail closed, as review 30 did for ids.

Controls: the set-up is sound on the same proxy: mallory's and eve's own ACKs (their
own From) are routed, read and archived under their own From; in the same dialog a
MESSAGE or BYE written "From alice" is challenged (407, and 403 with mallory's own
credentials), so the gate holds for every method but ACK and CANCEL; a stranger writing
his own From reaches bob and is archived under it; alice's URI with an unquoted
parameter (which Kamailio reads) is challenged and leaves no row.

Tried and held:
- REGISTER for alice's AoR with mallory's password: To alice From mallory, To and From
  alice (403, ``auth_check`` flag 1); To ``sip:%61lice@example.com`` (the registrar
  unescapes the user to ``alice``, digest compares it raw: with mallory's username 403,
  with the username ``%61lice`` no such account, challenged): nothing bound, a MESSAGE
  to alice reaches alice's contact only
  (``test_control_register_for_alice_with_mallorys_credentials_binds_nothing``);
- a method in lower case (400), a To tag and a Route naming us with no token of ours
  (403) (``test_control_requests_that_skip_auth_get_no_service``);
- by hand, 26 From spellings from a stranger with no account: every one the core or
  Kamailio reads as alice's AoR (a port, ``SIP:``, ``sips:``, ``;maddr=``, a password,
  a parameter twice, ``;lr=``) is challenged (407); of those neither reads, the ones
  Kamailio still relays (``:99999``, ``#x``, ``/x``, ``:5060:5060``, ``%00``, an escaped
  host) are URIs pjsip refuses (``utilVerifySipUri``), and ``example.com..``,
  ``.example.com``, ``example.com--`` name another host to pjsip;
- PUBLISH of a certificate: Kamailio's ``auth_check`` holds To, From and the
  Request-URI user to the credentials (raw), and ``cert_route`` names the owner from
  them and ``$rd``; nothing to gain from an escape without an account so named.

Not tried: CANCEL (also never challenged, matched by tm on the INVITE's branch, not its
From) carrying a body labelled for the proxy: the same root cause as hole 1; a front
with ``[auth]``; the SHA-256 challenge (Kamailio 5.6 here offers MD5 only, a known
limit: password guessing at pike's rate).

Fixed (stop 36): hole 1.  The route token (``dialog_route.RouteTokens.token``) now
binds the dialog's two parties: its MAC covers the Call-ID, the caller's tag and the
sorted From and To AoRs of the initial request as the core reads them
(``dialog_parties``, ``identity_of``), so the callee's requests (From and To swapped)
carry the same token and the wire format (32 hex digits) is unchanged.
``kemi.record_route`` refuses a dialog-creating request whose From or To the core
cannot read (400, no token: fail closed); ``dialog_routed_here`` checks the request's
own From and To, so an in-dialog request written "From alice" in another's dialog is
``403 Not Routed Here`` and such an ACK is dropped (a token of ours not its own: it is
not handed to tm, which would relay it as the 2xx's ACK); ``moved_route_entries``
reads the reply's From and To.  Both hole 1 tests pass with their markers off (the
forged ACK no longer reaches bob or dan either); the controls still pass.  A From or To
of another scheme (``tel:``) names its party as written, case folded: a call to a number
is still record-routed.  Hole 2: the door answers ``400 Bad From or To`` to a request
whose From or To URI Kamailio (``sanity_check(1024, 6)``) or, for sip/sips, the core
cannot read, before anything is read or archived; its test now also asserts that 400.
CANCEL is still not held to its INVITE's From (a CANCEL's body is the review's "not
tried").
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import (SipUa, parse_address_uri, registered_uas, start_proxy,
                                      wait_delivered)
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "mallory": "mallory-Secret-3",
         "dan": "dan-Secret-4"}
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n"
       b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
ALICE = "sip:alice@example.com"


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review98-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bob(home):
    """bob's one contact for the module (a raw UAS answering 200, Record-Route copied)."""
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.50") as uas:
        yield uas


def _rows(home, call_id: str, method: str):
    return [row for row in home.archive_rows() if row.call_id == call_id and row.method == method]


def _dialog_with_bob(home, bob, attacker: str, source: str):
    """The attacker's own call to bob, answered (bob: a raw UAS that answers 200 with the
    Record-Route copied back).  Returns (ua, invite as sent, 200, route set, target)."""
    if attacker == "mallory":
        ua = SipUa(home.port, user="mallory", password=USERS["mallory"], source=source)
    else:
        ua = SipUa(home.port, user="eve", domain="other.example.net", source=source)
    invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
    ok = ua.request(invite, timeout=6)
    assert ok is not None and ok.status == 200, ok
    sent = ua.sent[-1]
    routes = list(reversed(ok.get_all("Record-Route")))
    assert routes and "e2m-rr=" in routes[0], routes
    # the raw UAS writes no Contact: its registered contact is the dialog's target
    target = parse_address_uri(ok.get("Contact") or "") or f"sip:bob@127.0.0.1:{bob.port}"
    return ua, sent, ok, routes, target


def _acked(bob, call_id: str, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.method == "ACK" and m.get("Call-ID") == call_id for m in bob.received):
            return True
        time.sleep(0.05)
    return False


def _in_dialog(ua, method, sent, ok, routes, target, *, from_uri, body, content_type,
               cseq=None):
    request = ua.build(method, target, to="sip:bob@example.com", call_id=sent.get("Call-ID"),
                       from_tag=sent.from_tag, cseq=cseq if cseq is not None else sent.cseq[0],
                       to_tag=ok.to_tag, routes=routes, body=body, content_type=content_type)
    return request.replace("From", f"<{from_uri}>;tag={sent.from_tag}")


# -- hole 1: an ACK, never challenged, written as alice's --------------------------------

@pytest.mark.parametrize("attacker,source", [("mallory", "127.0.0.51"), ("eve", "127.0.0.52")])
@pytest.mark.parametrize("content_type,body", [("application/sdp", SDP),
                                               ("text/plain", b"alice: I approve the transfer")])
def test_control_the_attackers_own_ack_is_archived_naming_no_one(home, bob, attacker, source,
                                                                  content_type, body):
    """The set-up: the attacker's dialog is routed, its ACK (From as in the INVITE) is
    read and archived.  Since stop 37 (review 101) an unsigned ACK body names no sender
    (the dialog's other party can write the same ACK); one its From signed for it does."""
    ua, sent, ok, routes, target = _dialog_with_bob(home, bob, attacker, source)
    try:
        own = str(ua.aor)
        ack = _in_dialog(ua, "ACK", sent, ok, routes, target, from_uri=own, body=body,
                         content_type=content_type)
        ua.send(ack.replace("Via", ua.via()))
        assert _acked(bob, sent.get("Call-ID"))
        time.sleep(0.3)
        rows = _rows(home, sent.get("Call-ID"), "ACK")
        assert rows and all(row.from_uri is None and row.plaintext == body for row in rows), \
            [r.summary() for r in rows]
    finally:
        ua.close()


@pytest.mark.parametrize("attacker,source", [("mallory", "127.0.0.53"), ("eve", "127.0.0.54")])
def test_control_any_other_in_dialog_request_from_alice_is_challenged(home, bob, attacker,
                                                                         source):
    """The gate exists: in the attacker's own dialog, a MESSAGE or BYE written "From
    alice" needs alice's credentials (407; mallory's own are refused 403)."""
    ua, sent, ok, routes, target = _dialog_with_bob(home, bob, attacker, source)
    try:
        for cseq, method in ((sent.cseq[0] + 1, "MESSAGE"), (sent.cseq[0] + 2, "BYE")):
            body = b"alice: in-dialog, unproved" if method == "MESSAGE" else b""
            request = _in_dialog(ua, method, sent, ok, routes, target, from_uri=ALICE,
                                 body=body, content_type="text/plain" if body else None,
                                 cseq=cseq)
            answer = ua.request(request)
            assert answer is not None and answer.status in (403, 407), answer
        assert not [m for m in bob.received if m.method in ("MESSAGE", "BYE")
                    and m.get("Call-ID") == sent.get("Call-ID")]
    finally:
        ua.close()


@pytest.mark.parametrize("attacker,source", [("mallory", "127.0.0.55"), ("eve", "127.0.0.56")])
@pytest.mark.parametrize("content_type,body", [("application/sdp", SDP),
                                               ("text/plain", b"alice: I approve the transfer")])
def test_hole_an_in_dialog_ack_from_alice_is_archived_as_hers(home, bob, attacker, source,
                                                             content_type, body):
    ua, sent, ok, routes, target = _dialog_with_bob(home, bob, attacker, source)
    try:
        ack = _in_dialog(ua, "ACK", sent, ok, routes, target, from_uri=ALICE, body=body,
                         content_type=content_type)
        ua.send(ack.replace("Via", ua.via()))
        _acked(bob, sent.get("Call-ID"))
        time.sleep(0.3)
        rows = _rows(home, sent.get("Call-ID"), "ACK")
        as_alice = [row.summary() for row in rows if (row.from_uri or "").startswith(ALICE)]
        assert not as_alice, f"archived as alice's, no credentials asked: {as_alice}"
    finally:
        ua.close()


def _ring(request):
    """dan's phone rings and never answers an INVITE (180 with the Record-Route)."""
    from e2m_plugins.sip import make_response
    return make_response(request, 180 if request.method == "INVITE" else 200,
                         "Ringing" if request.method == "INVITE" else "OK")


@pytest.fixture(scope="module")
def dan(home):
    with registered_uas(home, "dan", USERS["dan"], "127.0.0.66", responder=_ring) as uas:
        yield uas


def _ringing_dialog(home, dan, source: str):
    """eve (no account) calls dan, whose phone only rings: the 180 gives her a To tag
    and the Record-Route with the token.  Returns (ua, invite, 180, route set)."""
    eve = SipUa(home.port, user="eve", domain="other.example.net", source=source)
    invite = eve.build("INVITE", "sip:dan@example.com", to="sip:dan@example.com")
    invite = invite.replace("Via", eve.via())
    eve.send(invite)
    ringing = eve.receive(3)
    while ringing is not None and (ringing.status or 0) < 180:
        ringing = eve.receive(3)
    assert ringing is not None and ringing.status == 180, ringing
    routes = list(reversed(ringing.get_all("Record-Route")))
    assert routes and "e2m-rr=" in routes[0], routes
    return eve, invite, ringing, routes


def _ack_while_ringing(home, dan, source: str, from_uri: str, text: bytes):
    eve, invite, ringing, routes = _ringing_dialog(home, dan, source)
    try:
        ack = eve.build("ACK", f"sip:dan@127.0.0.1:{dan.port}", to="sip:dan@example.com",
                        call_id=invite.get("Call-ID"), from_tag=invite.from_tag,
                        cseq=invite.cseq[0], to_tag=ringing.to_tag, routes=routes, body=text,
                        content_type="text/plain")
        eve.send(ack.replace("From", f"<{from_uri}>;tag={invite.from_tag}")
                 .replace("Via", eve.via()))
        _acked(dan, invite.get("Call-ID"))
        time.sleep(0.3)
        return _rows(home, invite.get("Call-ID"), "ACK")
    finally:
        eve.close()


def test_control_a_strangers_own_ack_while_the_phone_rings_is_archived_naming_no_one(home,
                                                                                      dan):
    """eve's own ACK is read and its body archived; unsigned, it names no sender (stop 37,
    review 101: an ACK is never challenged)."""
    rows = _ack_while_ringing(home, dan, "127.0.0.67", "sip:eve@other.example.net",
                              b"control: eve, ringing")
    assert [(row.from_uri, row.plaintext) for row in rows] == [(None, b"control: eve, ringing")]


def test_hole_a_strangers_ack_while_the_phone_rings_is_archived_as_alices(home, dan):
    """Hole 1 with no answer at all: dan's phone only rings (180); eve, with no account,
    sends an ACK in that early dialog written From alice, with a text body."""
    rows = _ack_while_ringing(home, dan, "127.0.0.68", ALICE, b"alice: ring only")
    as_alice = [row.summary() for row in rows if (row.from_uri or "").startswith(ALICE)]
    assert not as_alice, f"archived as alice's: {as_alice}"


# -- hole 2: a From neither Kamailio nor the core can read -------------------------------

def _strangers_message(home, source: str, from_value: str, text: bytes):
    eve = SipUa(home.port, user="eve", domain="other.example.net", source=source)
    try:
        request = eve.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                            body=text, content_type="text/plain")
        if from_value:
            request = request.replace("From", from_value)
        return eve.transact(request, timeout=1.5), request.get("Call-ID")
    finally:
        eve.close()


def test_control_a_stranger_writing_his_own_from_reaches_bob(home, bob):
    answer, call_id = _strangers_message(home, "127.0.0.58", "", b"control: eve's own")
    assert answer is not None and answer.status == 200
    assert wait_delivered(bob, b"control: eve's own")
    rows = _rows(home, call_id, "MESSAGE")
    assert [row.from_uri for row in rows] == ["sip:eve@other.example.net"]


def test_control_alices_uri_with_an_unquoted_parameter_is_challenged(home):
    """Review 2's fix holds where Kamailio or the core can read the From: 407, no row."""
    answer, call_id = _strangers_message(home, "127.0.0.59",
                                         '"Alice" <sip:alice@example.com;x=y>;tag=q0',
                                         b"control: as alice, readable")
    assert answer is not None and answer.status == 407, answer
    assert not _rows(home, call_id, "MESSAGE")


def test_hole_a_from_the_core_cannot_read_is_archived_as_alices(home, bob):
    answer, call_id = _strangers_message(home, "127.0.0.61",
                                         '"Alice" <sip:alice@example.com;x="y">;tag=q1',
                                         b"hole: alice never wrote this")
    time.sleep(0.3)
    rows = [row.summary() for row in _rows(home, call_id, "MESSAGE")]
    assert not rows, (f"archived with no credentials (answer "
                      f"{answer.status if answer else None}): {rows}")
    # fixed (stop 36): refused at the door, with an answer
    assert answer is not None and answer.status == 400, answer


# -- held: REGISTER for alice with mallory's credentials, skipping auth ----------------

def _register(home, ua, to_uri: str, from_uri: str, contact: str, *, username: str | None = None):
    """One REGISTER answered with ``ua``'s password (its digest username ``username``,
    default its own), To and From as given."""
    reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
    reg = reg.replace("To", f"<{to_uri}>")
    reg = reg.replace("From", f"<{from_uri}>;tag=r{time.monotonic_ns()}")
    reg = reg.replace("Contact", contact)
    if username is None:
        return ua.request(reg)
    own = ua.user
    ua.user = username          # a digest username of the attacker's choosing
    try:
        return ua.request(reg)
    finally:
        ua.user = own


def test_control_register_for_alice_with_mallorys_credentials_binds_nothing(home):
    """Held: mallory's password never binds a contact to alice's AoR (To alice From
    mallory, To and From alice: 403; To ``sip:%61lice@...``, which the registrar would
    unescape to alice while digest compares the raw user: no such account, challenged
    again), and alice's calls still reach alice."""
    with registered_uas(home, "alice", USERS["alice"], "127.0.0.62") as alice:
        mallory = SipUa(home.port, user="mallory", password=USERS["mallory"], source="127.0.0.63")
        thief = f"<sip:alice@127.0.0.63:{mallory.local_port}>"
        try:
            for to_uri, from_uri, username, wanted in (
                    (ALICE, "sip:mallory@example.com", None, (403,)),
                    (ALICE, ALICE, None, (403,)),
                    ("sip:%61lice@example.com", "sip:%61lice@example.com", None, (403,)),
                    ("sip:%61lice@example.com", "sip:%61lice@example.com", "%61lice",
                     (401, 403))):
                answer = _register(home, mallory, to_uri, from_uri, thief, username=username)
                assert answer is not None and answer.status in wanted, (to_uri, username, answer)
            dan = SipUa(home.port, user="dan", password=USERS["dan"], source="127.0.0.64")
            try:
                answer = dan.message("alice", b"control: dan to alice")
                assert answer is not None and answer.status == 200
                assert wait_delivered(alice, b"control: dan to alice")
            finally:
                dan.close()
            stolen = mallory.receive(0.5)
            assert stolen is None or not stolen.is_request, stolen
        finally:
            mallory.close()


def test_control_requests_that_skip_auth_get_no_service(home, bob):
    """Held: a method in lower case is 400 at the door; a request with a To tag and a
    Route naming the proxy but no token of ours is 403; neither reaches bob."""
    eve = SipUa(home.port, user="eve", domain="other.example.net", source="127.0.0.65")
    try:
        lower = eve.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=b"held: lower case", content_type="text/plain")
        data = lower.replace("Via", eve.via()).serialize()
        data = data.replace(b"MESSAGE sip:", b"message sip:", 1)
        eve.send(data)
        answer = eve.receive(2.0)
        assert answer is not None and answer.status == 400, answer
        forged = eve.build("MESSAGE", f"sip:bob@127.0.0.1:{bob.port}", to="sip:bob@example.com",
                           to_tag="made-up", routes=[f"<sip:127.0.0.1:{home.port};lr>"],
                           from_tag="ft", body=b"held: no token", content_type="text/plain")
        forged = forged.replace("From", "<sip:alice@example.com>;tag=ft")
        answer = eve.transact(forged)
        assert answer is not None and answer.status == 403, answer
        assert not wait_delivered(bob, b"held: lower case", 0.3)
        assert not wait_delivered(bob, b"held: no token", 0.3)
    finally:
        eve.close()
