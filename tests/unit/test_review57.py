"""A fifty-seventh attacker's review (December 2026) of 00358fc: the proxy (Kamailio and
``ProxyEngine``) against insiders and hops, fresh eyes: how each request and response is
read, refused, edited and relayed; the policy header the proxy announces and strips;
digest and who may send as whom; the single From/To/Call-ID/CSeq rule for responses.

``test_hole_*`` xfail strictly on 00358fc (their assertion is the secure behaviour);
``test_control_*`` pass and show that the set-up is sound.  The same holes on a real
Kamailio: ``tests/kamailio/test_review57_wire.py``.

Hole 1 (``test_hole_a_policy_in_the_proxys_name_rides_a_response_to_the_caller``):
**insider UA** (bob, the callee: any user his answers reach alice through the home
proxy) or an **untrusted hop** past the home proxy (it rewrites the answers it
forwards).  alice learnt the home proxy's policy from her registrar's 200 (the normal
way: ``[[proxies]]`` not configured) and holds its certificate.  She sends an OPTIONS to
bob through the home proxy; bob's 200 carries ``Proxy-Body-Policy:
proxy.example.com;view="MESSAGE:*";cert-fp="sha256:<not the proxy's>"``.  The proxy
removes every policy in its own name from a *request* (``_policies_in_our_name``: the
UAS must learn its policy from it alone, threat model "Put a policy header in the home
proxy's name before it"), but ``_inspect_response`` removes nothing, and the UA learns
policies from exactly such answers (a 2xx to its own OPTIONS or REGISTER: for all it
sends; a 2xx in a dialog: for that dialog).  alice's engine takes bob's word as her
proxy's: the entry her registrar set is replaced (for up to ``max_policy_expires``), the
fingerprint differs, so ``learn`` drops the home proxy's certificate
(``certs.remove_proxy``), and the real certificate fetched from its cert-url is then
refused ("does not match the fingerprint it announced").  Her next MESSAGE, to anyone,
goes without an envelope for her proxy: refused 496 by her own proxy.  Effect: a
callee (or a hop) rewrites what the caller's own proxy asks of her, globally, and makes
her next request refused.  At fault: ``ProxyEngine._inspect_response``
(e2m_plugins/proxy.py) returns ``Verdict("forward", seen=..., media=...)`` with no
``remove_headers``; ``kemi.route_reply`` applies what it says, and a response the
engine does not need to read (no body: ``response_needs_reading``) is not even looked
at.  Fix: remove policy headers naming this proxy from every response it relays (the
same ``_policies_in_our_name``), and in kemi do so also for a bodiless response (a
header-only pass before ``response_needs_reading``).

Hole 2 (``test_hole_a_bare_bye_is_relayed_unread_with_a_policy_in_the_proxys_name``):
the same forged policy on bob's bare BYE (the peer's own, or a hop's before the proxy).
``inspect`` would remove it (control), but ``only_ends_dialog("BYE", has_body=False,
has_label=False)`` tells the host that ``inspect`` would do nothing ("nothing to view,
announce or remove"), and Kamailio relays a bare BYE unread (``end_dialog_unread``).
alice learns from any request of her dialog with a To tag, so she drops her proxy's
certificate as in hole 1 (control: her next MESSAGE is 496).  At fault:
``ProxyEngine.only_ends_dialog`` (e2m_plugins/proxy.py) and its caller in kemi.py.  Fix:
``only_ends_dialog`` false when a ``Proxy-Body-Policy`` is present (kemi passes
``KSR.hdr.is_present``).

Controls: the same policy in a *request* is replaced by the proxy's own; the same
OPTIONS answered without the forged header leaves alice's certificate and policy in
place and her next MESSAGE is read by the proxy; the forged answer's effect today.

Looked at (engine and kemi; see the wire module for Kamailio):

- A second From/To/Call-ID/CSeq in a *response* (a hop's or the callee's): the engine
  (``check_unambiguous``) forwards it unread with the error recorded, and our phone
  refuses it (``sip.parse``): held here (control).  On Kamailio it is a hole (wire
  module, hole 4): unlike such a request, the response is relayed, its body never
  archived, and a stock UA reads the last copy.
- A 496 by a hop or the callee naming the home proxy with its real certificate: known
  (review 54).  With another host's certificate it is refused by ``_learn_496``.
- Digest: ``auth_check`` flag 1 holds the From user (a REGISTER's To user) to the
  credentials; a From in our domain spelled with a trailing dot, a port or another case
  is still ours (``from_ours`` through ``identity_of``); a body signed by alice in a
  request authenticated as carol fails ``check_signed_by`` (the From is carol's); the
  archive names the request's From, which auth held, and a response's sender by the
  Request-URI kept with the transaction (reviews 32, 33).
- Record-Route tokens (``dialog_route``): an HMAC of Call-ID and the caller's tag; a
  token of one dialog does not admit another Call-ID or tag; the Route text read is
  bounded.  That the parties may route their in-dialog requests anywhere is the
  documented limit.

Fixed (stop 30): policies naming the proxy go from every request and response it
relays (``ProxyEngine._policies_in_our_name``; a ``Proxy-Body-Policy`` makes a bodiless
response read and a bare BYE read: ``response_needs_reading`` / ``only_ends_dialog``
take ``has_policy``, required); ``P-Asserted-Identity``, ``P-Preferred-Identity`` and
``Remote-Party-ID`` go from every request but a ``[limits] trusted`` peer's
(``kemi.drop_asserted_identity``); a reply with a second From, To, Call-ID or CSeq is
dropped in the core reply route (``kemi._repeats_a_single_header``).  The holes'
markers are gone; they are guards now, and the controls that showed today's
behaviour show the fixed one.
"""

from __future__ import annotations

import hashlib

import pytest

from e2m_lab.flows import (TRUSTED, answer, apply_forward, invite, message, proxy_engine,
                           ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins.errors import CertificateRejectedError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki

VIEW = ("MESSAGE:*",)
# the forged policy names the real proxy and its real rules; only the fingerprint is
# another certificate's (as after a key change)
FORGED_FP = hashlib.sha256(b"not the home proxy's certificate").digest()


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


def registered_user(world, proxy, user: str = "alice"):
    """``user``, whose registrar's 200 announced the home proxy's policy; the user fetched
    its certificate from the cert-url (the normal way, ``[[proxies]]`` not configured)."""
    engine = ua_engine(world, user, peers=tuple(u for u in ("alice", "bob", "carol") if u != user))
    register = make_request("REGISTER", f"sip:{world.domain}", from_uri=world.aor(user),
                            to_uri=world.aor(user))
    sent = engine.protect(register).message
    engine.open(make_response(sent, 200, "OK", [proxy.policy_header()]))
    engine.add_proxy_certificate(TRUSTED, proxy.certificate_der)
    assert engine.certs.proxy(TRUSTED) is not None
    return engine


def _options_through_proxy(world, proxy, alice, answer_headers):
    """alice's OPTIONS to bob through the proxy; bob's 200 (with ``answer_headers``) back
    through it; returns the 200 as the proxy forwards it to alice."""
    options = make_request("OPTIONS", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"))
    sent = alice.protect(options).message
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward"
    delivered = apply_forward(sent, verdict)
    reply = make_response(delivered, 200, "OK", answer_headers)
    back = proxy.inspect(reply)
    assert back.action == "forward" and back.error is None
    return apply_forward(reply, back)


def _forged_policy(proxy):
    return hdr.PolicyHeader(TRUSTED, view=proxy.config.view, cert_fingerprint=FORGED_FP,
                            cert_url=proxy.config.cert_url).format()


def _next_message_verdict(world, proxy, alice):
    """alice's next MESSAGE (to carol: any peer) at her own proxy."""
    sent = alice.protect(message(world, b"to carol", recipient="carol")).message
    return proxy.inspect(sent)


def test_control_a_policy_in_the_proxys_name_on_a_request_is_replaced(world):
    """The rule the hole is about, in the request direction: bob's OPTIONS to alice with
    the forged policy reaches her with the proxy's own policy only."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    request = make_request("OPTIONS", f"sip:alice@{world.domain}", from_uri=world.aor("bob"),
                           to_uri=world.aor("alice"),
                           extra_headers=[(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))])
    verdict = proxy.inspect(request)
    out = apply_forward(request, verdict)
    assert out.get_all(hdr.PROXY_BODY_POLICY) == [proxy.policy_header()[1]]


def test_control_an_honest_answer_leaves_alices_proxy_in_place(world):
    """The same OPTIONS answered without the forged header: alice keeps the certificate
    and the policy her registrar announced, and the proxy reads her next MESSAGE."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    alice = registered_user(world, proxy)
    delivered = _options_through_proxy(world, proxy, alice, [])
    alice.open(delivered)
    assert alice.certs.proxy(TRUSTED) is not None
    verdict = _next_message_verdict(world, proxy, alice)
    assert verdict.action == "forward", verdict
    assert [s.plaintext for s in verdict.seen] == [b"to carol"]


def test_control_the_forged_answer_is_taken_by_alice_as_her_proxys_word(world):
    """What the hole's effect rests on: a forged header that reaches alice (added past
    the proxy on her side, where TLS to her proxy is the defence) is taken (an answer
    to her own OPTIONS): she drops the proxy's certificate, refuses the real one
    fetched again from the cert-url, and her next MESSAGE is 496.  Since the fix the
    proxy removes it from what it relays (the hole below)."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    alice = registered_user(world, proxy)
    delivered = _options_through_proxy(world, proxy, alice, [])
    delivered = delivered.add(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))
    alice.open(delivered)
    assert alice.certs.proxy(TRUSTED) is None
    with pytest.raises(CertificateRejectedError):
        alice.add_proxy_certificate(TRUSTED, proxy.certificate_der)   # from the cert-url
    verdict = _next_message_verdict(world, proxy, alice)
    assert verdict.action == "reply" and verdict.code == 496, verdict


def test_hole_a_policy_in_the_proxys_name_rides_a_response_to_the_caller(world):
    """bob answers alice's OPTIONS with a policy in the home proxy's name (another
    certificate's fingerprint).  Secure: the proxy removes it (as from a request), so
    alice keeps her proxy's certificate and the proxy reads her next MESSAGE."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    alice = registered_user(world, proxy)
    delivered = _options_through_proxy(world, proxy, alice,
                                       [(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))])
    alice.open(delivered)
    assert alice.certs.proxy(TRUSTED) is not None
    verdict = _next_message_verdict(world, proxy, alice)
    assert verdict.action == "forward", verdict


def test_hole_the_engine_removes_no_policy_in_its_name_from_a_response(world):
    """The engine's verdict for bob's 200 names the forged header to remove."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    request = make_request("OPTIONS", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"))
    forged = _forged_policy(proxy)
    reply = make_response(request, 200, "OK", [(hdr.PROXY_BODY_POLICY, forged)])
    verdict = proxy.inspect(reply)
    assert (hdr.PROXY_BODY_POLICY, forged) in verdict.remove_headers


def test_control_a_response_with_a_second_to_is_forwarded_unread(world):
    """Held (the duplicate rule for responses): bob's 200 to alice's MESSAGE with a second
    To is forwarded unread with the error recorded, keeps nothing, is never archived;
    alice's phone refuses it (``sip.parse``)."""
    from e2m_plugins import sip
    from e2m_plugins.errors import MalformedError
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    request = message(world, b"hi bob")
    reply = make_response(request, 200, "OK").add("To", "<sip:carol@example.com>;tag=zz")
    verdict = proxy.inspect(reply)
    assert verdict.action == "forward" and verdict.error == "MalformedError"
    assert not verdict.seen and not verdict.kept
    with pytest.raises(MalformedError):
        sip.parse(reply.serialize())


# -- hole 2: a bare BYE is relayed unread, its policy in our name too ---------------------

def _bye_from_bob(world, proxy, call_id):
    """bob's BYE ending alice's call (the peer's own request, or a hop's copy of it),
    carrying a policy in the home proxy's name."""
    return make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=7, from_tag="b1",
                        to_tag="a1",
                        extra_headers=[(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))])


def test_control_the_engine_removes_the_policy_from_a_bye_it_reads(world):
    """Read by the engine (``inspect``), bob's BYE loses the policy in the proxy's name."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    bye = _bye_from_bob(world, proxy, "bye-call@x")
    verdict = proxy.inspect(bye)
    assert verdict.action == "forward"
    assert verdict.remove_headers == ((hdr.PROXY_BODY_POLICY, _forged_policy(proxy)),)


def test_control_a_bye_with_the_policy_no_longer_drops_her_proxys_certificate(world):
    """What the BYE hole's effect rested on: alice (her proxy's policy learnt, her call
    with bob answered) opens bob's BYE as relayed unread, forged policy included, whose
    fingerprint differs.  She dropped her proxy's certificate, and her next MESSAGE was
    refused 496 by her own proxy.  Since stop 48 (review 164 K2) a dialog's policy takes
    no certificate from the other calls: she keeps it and her next MESSAGE goes on."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    alice = registered_user(world, proxy)
    bob = ua_engine(world, "bob", peers=("alice",))
    sent = alice.protect(invite(world, call_id="bye-call@x")).message
    delivered = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    ok = bob.protect(answer(delivered)).message
    alice.open(apply_forward(ok, proxy.inspect(ok)))
    assert alice.certs.proxy(TRUSTED) is not None
    alice.open(_bye_from_bob(world, proxy, "bye-call@x"))      # as Kamailio relays it
    assert alice.certs.proxy(TRUSTED) is not None
    verdict = _next_message_verdict(world, proxy, alice)
    assert verdict.action == "forward", verdict


def test_hole_a_bare_bye_is_relayed_unread_with_a_policy_in_the_proxys_name(world):
    """``only_ends_dialog`` promises that for a bare BYE ``inspect`` would do no more than
    ``end_unread`` ("nothing to view, announce or remove"); Kamailio then relays it
    unread.  With a policy in our name, ``inspect`` would remove it: the promise must not
    be made (or the host must be told of the header)."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    bye = _bye_from_bob(world, proxy, "bye-call-2@x")
    unread = proxy.needs_no_reading("BYE", has_body=False, has_label=False,
                                    has_policy=bool(bye.get_all(hdr.PROXY_BODY_POLICY)))
    verdict = proxy.inspect(bye)
    assert not (unread and verdict.remove_headers), verdict.remove_headers
