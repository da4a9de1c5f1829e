"""A fifty-seventh attacker's review (December 2026) of 00358fc: the proxy (Kamailio and
``ProxyEngine``) against insiders and hops, fresh eyes; here on a real Kamailio.

Hole 1 (``test_hole_a_policy_in_the_proxys_name_on_an_answer_reaches_the_caller``), the
wire side of ``tests/unit/test_review57.py``: **insider UA** (bob, registered; the same
from an untrusted hop past the home proxy).  alice (digest-authenticated) sends an
OPTIONS to bob through the home proxy; bob's 200 carries ``Proxy-Body-Policy:
proxy.example.com;view="MESSAGE:*";cert-fp="sha256:<another certificate's>"``.  The
proxy relays it as it is (a bodiless response is not even read: ``route_reply`` stops
at ``response_needs_reading``, and the engine removes nothing from a response).
alice's engine, which learnt the proxy's policy from its own announcement, takes bob's
as her proxy's for everything she sends and drops the proxy's certificate; her next
MESSAGE (to carol) carries no envelope for the proxy and her own proxy answers 496.

Hole 2 (``test_hole_a_bare_bye_carries_a_policy_in_the_proxys_name``): **insider UA**
(bob, the peer of a call through the proxy) or an **untrusted hop** before the proxy on
his side.  bob's BYE ending the call, bodiless, carries the same forged policy.  The
proxy removes a policy in its name from every request the engine reads (an in-dialog
INFO loses it: control), but a bare BYE is never read: ``end_dialog_unread`` takes
``ProxyEngine.only_ends_dialog`` ("nothing to view, announce or remove") and relays it.
alice's engine learns a policy from any request of her dialog (``_policy_origin``: a
request with a To tag), after the BYE ended the call, and the fingerprint check drops
her proxy's certificate for everything she sends (``learn``: ``certs.remove_proxy``),
as in hole 1.  At fault: ``kemi.end_dialog_unread`` / ``only_ends_dialog`` (it is told
of a Proxy-Required-Body header, not of a Proxy-Body-Policy).  Fix: pass
``has_policy=KSR.hdr.is_present(PROXY_BODY_POLICY) > 0`` and read such a BYE (or
remove the policies naming us by name there).

Hole 3 (``test_hole_an_authenticated_user_asserts_another_users_identity``): **insider
UA** (carol, digest-authenticated as carol).  Her MESSAGE (or INVITE) From carol carries
``P-Asserted-Identity: <sip:alice@example.com>`` (``P-Preferred-Identity`` and
``Remote-Party-ID`` alike).  ``auth_check`` holds the From to her credentials, but
nothing in kemi.py or the cfg template removes or checks the identity headers (RFC 3325
§5: a proxy must drop a P-Asserted-Identity it did not assert from a request of an
untrusted source): bob's UA receives carol's request asserting alice, and a stock UA
that trusts its proxy (an RFC 3325 trust domain: most desk phones and softphones show
PAI as the caller) shows it as alice's.  Our phone shows the From (held), so the
effect is on every other UA behind the proxy; the archive names the From (carol).  At
fault: ``kemi.route_auth`` / ``relay`` (nothing removes them).  Fix: remove
``P-Asserted-Identity``, ``P-Preferred-Identity`` and ``Remote-Party-ID`` from every
request not from a ``[limits] trusted`` peer (``KSR.hdr.remove``), or assert the
digest-proved AoR in their place.

Hole 4 (``test_hole_a_second_to_keeps_an_answer_out_of_the_archive_yet_delivers_it``):
**insider UA** (bob, the callee) or an **untrusted hop** past the proxy: the single
From/To/Call-ID/CSeq rule (2026-12-05) for a response.  bob answers alice's MESSAGE
with a 200 whose plaintext body (a receipt; the same for an INVITE 200's SDP under
``INVITE:application/sdp``) the proxy views, with a second ``To`` at the end.  Kamailio
drops such a request (review 54), but relays such a response: tm's reply route calls
``route_reply``, whose ``_read_message`` raises ``MalformedError`` outside its
``E2MError`` guard; ``ksr_onreply_route`` logs "reply route failed" and the response
goes on unchanged.  Nothing is archived (nor its media lines for a firewall), while a
stock UA (pjsip reads the last To) takes the answer.  Our phone refuses it
(``sip.parse``): the effect is on every other UA, and on the archive, for a body the
proxy would have read.  At fault: kemi.py ``route_reply`` (``message = _read_message()``
before the guard) and the engine's "forwarded unread" for this error.  Fix: in the tm
reply route, drop a response that ``check_unambiguous`` refuses (``KSR.tm.t_drop_replies``
/ return 0 from the onreply route), as Kamailio drops such a request.

Held (controls): a From of another user under carol's credentials is 403; an in-dialog
INFO loses the forged policy; an honest answer keeps alice's proxy in place and her
MESSAGE is archived; bob's receipt without the second To is archived.

Fixed (stop 30): see ``tests/unit/test_review57.py``; the controls that showed the old
behaviour on the wire show the fixed one.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import TRUSTED, ua_engine
from e2m_lab.kamailio_harness import SipUa, registered_uas
from e2m_plugins import headers as hdr
from e2m_plugins.sip import make_request, make_response, parse

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
VIEW = ("MESSAGE:*",)
FORGED_FP = hashlib.sha256(b"not the home proxy's certificate").digest()


def _forged_policy(proxy) -> str:
    return hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("MESSAGE:*"),),
                            cert_fingerprint=FORGED_FP, cert_url=proxy.cert_url).format()


def _bob_answers_with(headers):
    def responder(request):
        extra = headers if request.method == "OPTIONS" else []
        return make_response(request, 200, "OK", extra)
    return responder


def _final(ua: SipUa, request, timeout: float = 3.0):
    """Send ``request`` as it is (Via, credentials already in it); its final answer."""
    ua.send(request)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ua.receive(deadline - time.monotonic())
        if got is None:
            return None
        if not got.is_request and got.get("Call-ID") == request.get("Call-ID") \
                and got.cseq == request.cseq and (got.status or 0) >= 200:
            return got
    return None


def _prepared(ua: SipUa, request):
    """``request`` as ``SipUa.request`` would send it with cached credentials, its Via
    set now (alice's engine must see the exact request it records)."""
    creds = ua.credentials(request.method, request.request_uri or "")
    if creds is not None:
        request = request.replace(*creds)
    return request.replace("Via", ua.via())


def _alice_with_her_proxy(pki, proxy):
    """alice's engine: the proxy's policy as its own OPTIONS answer announces it (as her
    registrar's 200 does), and its certificate as fetched from its cert-url."""
    own = proxy.options()
    assert own is not None and own.status == 200
    (announced,) = own.get_all(hdr.PROXY_BODY_POLICY)
    alice = ua_engine(pki, "alice", peers=("bob", "carol"))
    register = make_request("REGISTER", "sip:example.com", from_uri=pki.aor("alice"),
                            to_uri=pki.aor("alice"))
    sent = alice.protect(register).message
    alice.open(make_response(sent, 200, "OK", [(hdr.PROXY_BODY_POLICY, announced)]))
    alice.add_proxy_certificate(TRUSTED, pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER))
    return alice


def _policy_flow(proxy_factory, pki, forged: bool):
    """alice's OPTIONS to bob (answered with or without the forged policy), then her
    MESSAGE to carol; returns (bob's 200 as alice got it, alice's engine, the MESSAGE's
    final answer, whether carol got the text, the archive rows' texts)."""
    proxy = proxy_factory("r57p", e2m=True, view=VIEW, auth=True, users=USERS)
    headers = [(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))] if forged else []
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.40",
                        responder=_bob_answers_with(headers)), \
            registered_uas(proxy, "carol", USERS["carol"], "127.0.0.41") as carol_uas:
        ua = SipUa(proxy.port, user="alice", password=USERS["alice"], source="127.0.0.42")
        alice = _alice_with_her_proxy(pki, proxy)
        try:
            first = ua.request(ua.build("OPTIONS", "sip:bob@example.com", to="sip:bob@example.com"))
            assert first is not None and first.status == 200, first   # credentials cached
            options = alice.protect(_prepared(ua, ua.build(
                "OPTIONS", "sip:bob@example.com", to="sip:bob@example.com"))).message
            got = _final(ua, options)
            assert got is not None and got.status == 200, got
            alice.open(got)
            text = b"alice to carol, for the archive"
            msg = alice.protect(_prepared(ua, ua.build(
                "MESSAGE", "sip:carol@example.com", to="sip:carol@example.com",
                body=text, content_type="text/plain"))).message
            final = _final(ua, msg)
            time.sleep(0.3)
            delivered = any(m.method == "MESSAGE" for m in carol_uas.received)
            rows = [r.plaintext for r in proxy.archive_rows()]
            return got, alice, final, delivered, rows, text
        finally:
            ua.close()


def test_control_an_honest_answer_keeps_alices_proxy_and_her_message_is_archived(
        proxy_factory, pki):
    got, alice, final, delivered, rows, text = _policy_flow(proxy_factory, pki, forged=False)
    assert not got.get_all(hdr.PROXY_BODY_POLICY)
    assert alice.certs.proxy(TRUSTED) is not None
    assert final is not None and final.status == 200, final
    assert delivered and text in rows          # read and archived by her proxy
    assert delivered and text in rows


def test_hole_a_policy_in_the_proxys_name_on_an_answer_reaches_the_caller(proxy_factory, pki):
    got, alice, final, delivered, rows, text = _policy_flow(proxy_factory, pki, forged=True)
    assert not got.get_all(hdr.PROXY_BODY_POLICY)
    assert alice.certs.proxy(TRUSTED) is not None
    assert final is not None and final.status == 200, final
    assert delivered and text in rows          # read and archived by her proxy


# -- a bare BYE ---------------------------------------------------------------------------

def in_dialog_with_policy(proxy_factory, method):
    """bob calls alice (registered RawUas) through the proxy; then bob's bodiless
    ``method`` in the dialog (Route: the proxy's Record-Route; the ACK itself for "ACK")
    carries a policy in the proxy's name.  Returns what alice's UAS received for
    ``method`` and the forged value."""
    proxy = proxy_factory("r57b", e2m=True, view=VIEW)
    forged = _forged_policy(proxy)
    with registered_uas(proxy, "alice", None, "127.0.0.70") as alice_uas:
        ua = SipUa(proxy.port, user="bob", source="127.0.0.71")
        try:
            invite = ua.build("INVITE", "sip:alice@example.com", to="sip:alice@example.com")
            ok = ua.request(invite)
            assert ok is not None and ok.status == 200, ok
            (delivered,) = alice_uas.wait_for(1, method="INVITE")
            routes = delivered.get_all("Record-Route")
            assert routes and "e2m-rr=" in routes[0]
            target = f"sip:alice@127.0.0.1:{alice_uas.port}"
            sent = ua.sent[-1]
            policy = [(hdr.PROXY_BODY_POLICY, forged)]
            ack = ua.build("ACK", target, to="sip:alice@example.com", call_id=sent.get("Call-ID"),
                           from_tag=sent.from_tag, cseq=sent.cseq[0], to_tag=ok.to_tag,
                           routes=routes, headers=policy if method == "ACK" else [])
            ua.send(ack.replace("Via", ua.via()))
            if method != "ACK":
                request = ua.build(method, target, to="sip:alice@example.com",
                                   call_id=sent.get("Call-ID"), from_tag=sent.from_tag,
                                   to_tag=ok.to_tag, routes=routes, headers=policy)
                final = ua.request(request)
                assert final is not None and final.status == 200, final
            (got,) = alice_uas.wait_for(1, method=method)
            return got, forged
        finally:
            ua.close()


def test_control_an_in_dialog_info_loses_the_policy_in_the_proxys_name(proxy_factory):
    """A bodiless INFO in the dialog is read by the engine: the forged policy is gone."""
    got, forged = in_dialog_with_policy(proxy_factory, "INFO")
    assert forged not in got.get_all(hdr.PROXY_BODY_POLICY)


def test_hole_a_bare_bye_carries_a_policy_in_the_proxys_name(proxy_factory):
    got, forged = in_dialog_with_policy(proxy_factory, "BYE")
    assert forged not in got.get_all(hdr.PROXY_BODY_POLICY)


# -- identity headers ---------------------------------------------------------------------

IDENTITY_HEADERS = [("P-Asserted-Identity", "<sip:alice@example.com>"),
                    ("P-Preferred-Identity", "<sip:alice@example.com>"),
                    ("Remote-Party-ID", "<sip:alice@example.com>;party=calling;screen=yes")]


def _carol_sends(proxy_factory, headers, *, from_user="carol"):
    proxy = proxy_factory("r57i", e2m=True, view=VIEW, auth=True, users=USERS)
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.50") as uas:
        ua = SipUa(proxy.port, user="carol", password=USERS["carol"], source="127.0.0.51")
        try:
            first = ua.request(ua.build("OPTIONS", "sip:bob@example.com", to="sip:bob@example.com"))
            assert first is not None and first.status == 200, first
            msg = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                           headers=headers, body=b"it is me", content_type="text/plain")
            if from_user != "carol":
                msg = msg.replace("From", f"<sip:{from_user}@example.com>;tag=pp")
            answer = ua.request(msg)
            got = uas.wait_for(1, timeout=2, method="MESSAGE")
            return answer, got
        finally:
            ua.close()


def test_control_carol_cannot_write_alices_from(proxy_factory):
    """What digest holds: a From of alice under carol's credentials is 403, nothing reaches bob."""
    answer, got = _carol_sends(proxy_factory, [], from_user="alice")
    assert answer is not None and answer.status == 403, answer
    assert got == []


def test_control_carols_message_reaches_bob_from_carol(proxy_factory):
    answer, got = _carol_sends(proxy_factory, IDENTITY_HEADERS)
    assert answer is not None and answer.status == 200, answer
    (delivered,) = got
    assert delivered.address("From").uri == "sip:carol@example.com"


def test_hole_an_authenticated_user_asserts_another_users_identity(proxy_factory):
    answer, got = _carol_sends(proxy_factory, IDENTITY_HEADERS)
    assert answer is not None and answer.status == 200, answer
    (delivered,) = got
    asserted = [v for name, _ in IDENTITY_HEADERS for v in delivered.get_all(name)]
    assert not any("alice" in v for v in asserted), asserted


# -- a second To in a response ------------------------------------------------------------

def receipt_exchange(proxy_factory, name: str, responder, *, bob_at: str, alice_at: str):
    """alice (at ``alice_at``) sends a plain MESSAGE through a proxy that views MESSAGE
    (``name``) to bob (registered at ``bob_at``), whose ``responder`` gives the 200's
    wire bytes for the request.  Returns the 200s that reached alice's socket (raw: our
    own parser may refuse them), the archive's texts and the proxy's log of it."""
    proxy = proxy_factory(name, e2m=True, view=VIEW)
    mark = proxy.log_mark()
    with registered_uas(proxy, "bob", None, bob_at, responder=responder) as uas:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((alice_at, 0))
        sock.settimeout(2)
        port = sock.getsockname()[1]
        try:
            msg = make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                               to_uri="sip:bob@example.com", via_host=f"{alice_at}:{port}",
                               body=b"hello bob", content_type="text/plain")
            sock.sendto(msg.serialize(), ("127.0.0.1", proxy.port))
            answers = []
            try:
                while not answers:
                    data = sock.recv(65535)
                    if data.startswith(b"SIP/2.0 2"):
                        answers.append(data)
            except socket.timeout:
                pass
            assert uas.wait_for(1, method="MESSAGE")
            time.sleep(0.3)
            rows = [r.plaintext for r in proxy.archive_rows()]
            return answers, rows, proxy.log_since(mark)
        finally:
            sock.close()


def _answer_with(proxy_factory, second_to: bool, name: str = "To"):
    """bob answers a plain MESSAGE with a 200 carrying a text body (a receipt), with or
    without a second To (bob himself, or a hop past the proxy)."""
    def responder(request):
        reply = make_response(request, 200, "OK", body=b"receipt", content_type="text/plain")
        if second_to:
            reply = reply.add(name, "<sip:carol@example.com>;tag=second")
        return reply.serialize()
    return receipt_exchange(proxy_factory, "r57d", responder, bob_at="127.0.0.60",
                            alice_at="127.0.0.61")


def test_control_bobs_receipt_is_archived(proxy_factory):
    """The proxy views MESSAGE: bob's plaintext 200 body is archived beside alice's text."""
    answers, rows, _ = _answer_with(proxy_factory, second_to=False)
    assert len(answers) == 1 and parse(answers[0]).body == b"receipt"
    assert b"hello bob" in rows and b"receipt" in rows


def test_control_a_receipt_with_a_second_to_is_dropped_at_the_proxy(proxy_factory):
    """Since the fix the core reply route drops it (as Kamailio drops such a request):
    alice gets no 200 (her transaction times out), and its body is in no row.  On
    00358fc it was relayed unread (``MalformedError`` in the tm reply route)."""
    answers, rows, log = _answer_with(proxy_factory, second_to=True)
    assert not answers
    assert b"receipt" not in rows and b"hello bob" in rows
    assert "second From, To, Call-ID or CSeq: dropped" in log


@pytest.mark.parametrize("name", ["To", "t"])      # the compact form counts as To
def test_hole_a_second_to_keeps_an_answer_out_of_the_archive_yet_delivers_it(proxy_factory, name):
    """Secure: a response with two To headers is dropped as such a request is (or, at
    least, not relayed without being read)."""
    answers, rows, _ = _answer_with(proxy_factory, second_to=True, name=name)
    assert not answers or b"receipt" in rows
