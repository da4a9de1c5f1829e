"""A hundred-and-first attacker's review (December 2026) of 640725e: stop 36's dialog
rules on a cluster, behind a front, and with stock clients; the wire half (a real
Kamailio with ``[auth]`` and the archive).  The core half: ``tests/unit/test_review101.py``.

Hole 1 (``test_hole_the_callee_writes_the_callers_ack_and_it_is_archived_as_hers``):
**insider UA** (mallory, a registered user of ours, as the *callee*; any remote UA alice
calls is in the same seat).  Review 99's fix archives an ACK under its From only when
the route token says it comes from the caller's side (``kemi.route_in_dialog``,
kamailio_app/kemi.py:1109, ``self.inspect_only(archive=self.routed_side() == 0)``), on
the ground that "only the caller's [ACK], whose From the token binds to the dialog's
INVITE (challenged when it names one of our users), is archived under its From"
(kemi.py:1101-1107).  But the token is no secret from the callee: it rides in the
Record-Route the callee received, and the caller's side of it is (Call-ID, the caller's
tag, From caller, To callee), all of which the callee's own INVITE copy and 200 hold.
Messages: alice (digest proved) calls mallory; mallory's UAS answers 200 (Record-Route
copied back); then mallory sends the dialog's ACK *written as alice's*: ``From:
<sip:alice@example.com>;tag=<alice's tag>``, ``To: <sip:mallory@example.com>;tag=<her
own>``, alice's Call-ID and CSeq number, ``Route:`` our entry, Request-URI her own
contact, a body (SDP, or a text such as "alice: I approve the transfer").  An ACK is
never challenged (``route_auth`` is not asked), ``RouteTokens.side`` returns 0 (the
caller's side: exactly what alice's own ACK carries), and ``inspect_only`` reads and
archives it.  Effect: an archive row with ``from_uri = sip:alice@example.com`` for a
body alice never wrote (signature none), made by the party she called: review 98's and
99's misattribution, from the one seat their fixes did not think of.  Fix: never archive
an ACK body under its From on the token's word; archive it under its From only when it
is signed by that From's certificate (the signer the engine verified equals the From
AoR), or only when the ACK comes from where alice's INVITE came from (its top Via
sent-by and source equal to those noted with the caller's target at her INVITE), else
under no one as for the callee's side and CANCEL.

Controls: alice's own ACK with a body is archived under her From
(``test_control_the_callers_own_ack_is_archived_as_hers``: the path the hole uses);
mallory's ACK in the callee's form (From mallory, the tags swapped) is read and
archived under no one (review 99's fix holds:
``test_control_the_callees_own_ack_is_archived_under_no_one``).

Tried and held (read, or run through the unit models): see ``tests/unit/test_review101.py``.

Fixed (stop 37): an ACK's bodies are archived from either side (nothing it carries is
lost), and an archive row names the ACK's From only for a body that From signed for this
very ACK (``SeenBody.bound``: a signed SIP context checked against it); any other names
no one (``bootstrap.body_records``).  The token's sides stay what they are (no longer an
archive decision).  The hole tests failed on the product code before (checked) and pass;
the controls now assert an unsigned ACK body archived naming no one, and alice's signed
one named hers.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, ua_engine
from e2m_lab.kamailio_harness import SipUa, registered_uas, start_proxy
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "mallory": "mallory-Secret-3"}
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.9\r\ns=-\r\nc=IN IP4 127.0.0.9\r\nt=0 0\r\n"
       b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
ALICE, MALLORY = "sip:alice@example.com", "sip:mallory@example.com"
BODIES = [("application/sdp", SDP), ("text/plain", b"alice: I approve the transfer")]


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review101-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def mallory(home):
    """mallory's one contact: a raw UAS answering 200 (Record-Route copied back)."""
    with registered_uas(home, "mallory", USERS["mallory"], "127.0.0.201") as uas:
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


def _alice_calls_mallory(home, mallory, source: str):
    """alice (digest proved) calls mallory, whose UAS answers 200.  Returns (alice's UA,
    the INVITE as she sent it last, the 200, the INVITE as mallory's UAS got it)."""
    alice = SipUa(home.port, user="alice", password=USERS["alice"], source=source)
    invite = alice.build("INVITE", MALLORY, to=MALLORY)
    ok = alice.request(invite, timeout=6)
    assert ok is not None and ok.status == 200, ok
    sent = alice.sent[-1]
    got = [m for m in mallory.wait_for(method="INVITE", timeout=3)
           if m.get("Call-ID") == sent.get("Call-ID")]
    assert got and any("e2m-rr=" in rr for rr in got[-1].get_all("Record-Route")), got
    return alice, sent, ok, got[-1]


def _ack(ua: SipUa, delivered, ok, *, from_uri: str, to_uri: str, swap_tags: bool,
         target: str, body: bytes, content_type: str):
    """An ACK of the dialog alice's INVITE ``delivered`` (as mallory got it) made, sent
    through our entry (the caller's route set: the Record-Route reversed), its From and
    To as given, the tags alice's and mallory's (``swap_tags``: mallory's in From)."""
    alices_tag, mallorys_tag = delivered.from_tag, ok.to_tag
    from_tag, to_tag = (mallorys_tag, alices_tag) if swap_tags else (alices_tag, mallorys_tag)
    routes = list(reversed(delivered.get_all("Record-Route")))
    ack = ua.build("ACK", target, to=to_uri, call_id=delivered.get("Call-ID"),
                   from_tag=from_tag, cseq=delivered.cseq[0], to_tag=to_tag, routes=routes,
                   body=body, content_type=content_type)
    ack = ack.replace("From", f"<{from_uri}>;tag={from_tag}")
    ack = ack.replace("To", f"<{to_uri}>;tag={to_tag}")
    return ack.replace("Via", ua.via())


def test_control_the_callers_own_signed_ack_is_archived_as_hers(home, mallory, pki):
    """Fixed (stop 37): an ACK's body names its From in the archive only when its From
    signed it for this very ACK (``SeenBody.bound``): alice's engine signs and seals her
    ACK's SDP for mallory and the home proxy, which reads it and names her."""
    alice, sent, ok, delivered = _alice_calls_mallory(home, mallory, "127.0.0.202")
    try:
        target = f"sip:mallory@127.0.0.1:{mallory.port}"
        ack = _ack(alice, delivered, ok, from_uri=ALICE, to_uri=MALLORY, swap_tags=False,
                   target=target, body=SDP, content_type="application/sdp")
        engine = ua_engine(pki, "alice", peers=("mallory",),
                           proxies=(known_proxy(pki, TRUSTED, ("ACK:application/sdp",)),))
        alice.send(engine.protect(ack).message)
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        assert rows and all(row.from_uri == ALICE and row.signature == "valid"
                            for row in rows), [r.summary() for r in rows]
    finally:
        alice.close()


@pytest.mark.parametrize("content_type,body", BODIES)
def test_control_the_callers_own_unsigned_ack_is_archived_naming_no_one(home, mallory,
                                                                        content_type, body):
    """Fixed (stop 37): alice's own unsigned ACK body is archived (nothing is lost), but
    names no sender: the callee could have written the very same ACK (the hole below)."""
    alice, sent, ok, delivered = _alice_calls_mallory(home, mallory, "127.0.0.207")
    try:
        target = f"sip:mallory@127.0.0.1:{mallory.port}"
        alice.send(_ack(alice, delivered, ok, from_uri=ALICE, to_uri=MALLORY, swap_tags=False,
                        target=target, body=body, content_type=content_type))
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        assert rows and all(row.from_uri is None and row.plaintext == body for row in rows), \
            [r.summary() for r in rows]
    finally:
        alice.close()


@pytest.mark.parametrize("content_type,body", BODIES)
def test_control_the_callees_own_ack_is_archived_under_no_one(home, mallory, content_type,
                                                               body):
    """mallory's ACK in the callee's form (From her, the tags swapped) reaches her target;
    since stop 37 its body is archived naming no one (review 99's fix left no row)."""
    alice, sent, ok, delivered = _alice_calls_mallory(home, mallory, "127.0.0.203")
    evil = SipUa(home.port, user="mallory", source="127.0.0.204")
    try:
        before = len(mallory.received)
        target = f"sip:mallory@127.0.0.1:{mallory.port}"
        evil.send(_ack(evil, delivered, ok, from_uri=MALLORY, to_uri=ALICE, swap_tags=True,
                       target=target, body=body, content_type=content_type))
        relayed = [m for m in mallory.wait_for(before + 1, timeout=3)[before:]
                   if m.method == "ACK"]
        assert relayed, "the callee-side ACK was not routed"
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        assert rows and all(row.from_uri is None for row in rows), [r.summary() for r in rows]
    finally:
        evil.close()
        alice.close()


@pytest.mark.parametrize("content_type,body", BODIES)
def test_hole_the_callee_writes_the_callers_ack_and_it_is_archived_as_hers(
        home, mallory, content_type, body):
    alice, sent, ok, delivered = _alice_calls_mallory(home, mallory, "127.0.0.205")
    evil = SipUa(home.port, user="mallory", source="127.0.0.206")
    try:
        before = len(mallory.received)
        target = f"sip:mallory@127.0.0.1:{mallory.port}"
        evil.send(_ack(evil, delivered, ok, from_uri=ALICE, to_uri=MALLORY, swap_tags=False,
                       target=target, body=body, content_type=content_type))
        mallory.wait_for(before + 1, timeout=3)
        rows = _wait_rows(home, sent.get("Call-ID"), "ACK")
        as_alice = [row.summary() for row in rows if (row.from_uri or "").startswith(ALICE)]
        assert not as_alice, f"mallory's body archived as alice's: {as_alice}"
    finally:
        evil.close()
        alice.close()
