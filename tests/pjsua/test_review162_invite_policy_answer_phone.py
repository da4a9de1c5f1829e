"""Review 162 (an attacker's review of cbd1d09): reviews 159-160's changes to how the
UA engine learns proxy policies (``_learn_495``, ``_park_invite_policies`` /
``_settle_invite_policies``, ``_in_our_dialog``, ``_dialog_victim``, ``_peer_name``), on
the real pjsua2 phone (this module) and in the engine
(``tests/unit/test_review162_495_policy_scope.py``).

Honest break HB1: the phone's answer to a first call is never readable by the caller's
proxy that asked for it on the INVITE (and was not before 384cc70 either)
- Attacker: none (an honest deployment).  alice calls bob; her proxy
  (``px.example.com``, a host of her domain, not bob's registrar) relays her INVITE with
  its ``Proxy-Body-Policy`` (view ``INVITE:application/sdp``, a ``cert-url``), as
  ``ProxyEngine._announce`` does for every request it relays.
- Messages: one initial INVITE, alice's SDP protected and signed by her engine, the
  proxy's policy header added; bob's phone (``e2m-phone listen``, ``auto_answer``).
- Effect observed: bob's phone answers 200 at once (no 180: ``endpoint.py:687``), the
  parked policy is taken while that 200 is protected (``ua.py:342``), but the proxy's
  certificate is not held yet: the 200 goes without the proxy's part.  The fetch runs
  after (1 GET, 1 ``proxy_certificate`` event), but the 4 copies of the 200 seen in
  3.5 s (pjsip's retransmissions are the same protected octets, ``rawhook.py`` memo)
  all lack ``Proxy-Required-Body: px.example.com``: a proxy whose view rule covers INVITE
  responses drops each one (``proxy.py _check_policy``: 496-class error on a response,
  the host drops it), so the first call between those domains never completes (the
  callee's 200 times out).  The same test on a tree of 384cc70 (before fa4a16f's
  parking): 4 copies, none readable, 1 fetch: not a regression of 159-160, an old
  break; review 160 read it and left it.  The second call works (the certificate is
  then held: control).  Read, not run: the caller's side is the same for a late offer
  (the callee's proxy announces its policy in its 200, ``kemi.announce_policy_in_reply``;
  alice's ACK answer goes at once, before that certificate is fetched).
- Code at fault: ``pjsua_hooks/endpoint.py:684-687`` (``onIncomingCall`` answers 200
  in the callback that delivered the INVITE), ``e2m_plugins/ua.py:329-342``
  (``_settle_invite_policies`` takes the policy with the 200 itself), the fetch only from
  the loop (``phone.py:1174``, every 0.1 s) and ``_readers_for`` (``ua.py:774``) leaving
  out a proxy without a certificate silently.
- Suggested fix: when an incoming INVITE's policies name a proxy whose certificate the
  phone does not hold, send 180 (which takes the parked policies and starts the fetch)
  and answer 200 once the fetch ended (``fetch_timeout``), or fetch synchronously
  before the answer with that deadline; and have ``protect`` of a 2xx refuse (or report)
  a policy it cannot honour rather than send a body the proxy will drop.
- Test: ``test_hb1_the_answer_to_a_first_call_is_readable_by_the_proxy_that_asked``.

Hole K1: a 495's ``Proxy-Body-Policy`` is learnt for everything the UA sends: review 159
K1 again, through the header (see the unit module)
- Attacker: whoever can answer one request of alice's on its transaction (the callee
  bob, any hop: Call-ID, CSeq, Via branch), no certificate.
- Messages: one ``495`` to alice's MESSAGE to bob carrying ``Proxy-Body-Policy:
  proxy.example.com;view="MESSAGE:text/plain";verify="MESSAGE:*";expires=86400`` (her
  home, whose certificate she fetched when she registered).
- Effect observed: the phone opens every response before it reacts (``phone.py`` _on_rx
  -> ``UAEngine.open`` -> ``learn``), and ``_policy_origin`` gives a 495 (or 496) answer
  the scope None (``ua.py:359``): the header replaces the home's registrar-taught entry
  (same key, host and no scope) with the attacker's rules for 86,400 s (until the
  registrar's next 200 replaces it back).  alice is ``sign = false``: 3,700 s later
  (the 495's own per-peer ask lapsed at 3,600 s) her MESSAGE to carol is signed
  (``signed=True``), and so is her MESSAGE to carol set ``[[legacy]] sign = false``,
  the very effects review 159 K1 fixed for the 495 itself (``ua.py:778``, ``860``).
- Code at fault: ``e2m_plugins/ua.py:356-359`` (``_policy_origin``: a 495/496 teaches a
  policy for everything we send), reached from ``open`` (``ua.py:1007``) before
  ``react`` checks anything (a 496's certificate checks in ``_learn_496`` come later
  and do not undo it).
- Suggested fix: learn nothing from a 495/496 in ``open``; in ``react``, a 495's policy
  at most for that (method, peer) as its ask, a 496's only after its certificate
  passed, and never over an entry another source (the registrar) set.
- Tests: ``test_hole_k1_a_495_to_bob_does_not_make_alice_sign_to_carol``,
  ``test_hole_k1_a_495_policy_does_not_sign_to_a_legacy_peer_set_sign_false`` (unit).

Controls (unmarked, pass):
``test_control_hb1_the_second_call_is_readable_once_the_certificate_is_held`` (here: the
harness sees a readable 200), ``test_control_k1_a_495_without_a_policy_lapses_and_stays_with_bob``
(unit: the ask alone signs to bob only and lapses at 3,600 s).

Tried and held:
- ``_dialog_victim`` cost: 1,024 learns into 64 dialogs of 16 at the 256 bound, 28 us
  each (rebuilds its per-dialog map each time; linear in 256): no cost to speak of
  (``test_held_dialog_victim_cost_at_the_bound``, unit);
- our tag spelt in another case by the peer: ``_in_our_dialog`` and ``_parties`` both
  lower-case (read); early-dialog UPDATE/PRACK: the caller's tag is in ``_parties``
  from her INVITE, the callee's from his 18x (read; the phone never sends 18x);
- parked policies into another dialog: the key is (Call-ID, peer identity) and only our
  1xx/2xx to an INVITE with both takes them, i.e. a dialog of that Call-ID with that
  peer, which is the scope they land in anyway (read); bounded 64 x 180 s;
- REGISTER (global) and dialog entries of one host live side by side (keys differ by
  scope), ``end_scope`` drops only the dialog's (read); a forked call's BYE to the
  second fork returns before the call's policies go (``_end_dialog``, read);
- a 495 cannot bind another peer by its spelling: the ask's peer is the To of our own
  request, named by identity (read).
Not reached in the time: the certificate service client and pjsua2 thread rules.

Fixed (stop 48): HB1: an automatic answer whose INVITE's waiting policies name a proxy
with a ``cert-url`` whose certificate the phone does not hold
(``UAEngine.certificates_to_answer``) rings first: the 180 takes the policies, the
phone fetches, and the 200 goes once every such certificate is held, or after 3 s
without (``SipEndpoint.answer_ringing``; at most 32 calls ringing so).  The test, no
longer marked, failed on cbd1d09 (and on 384cc70) and passes.  K1 is fixed in the unit
module.  The caller's side (a late offer's ACK answer sent before the callee proxy's
certificate is fetched) is left as found: read, not run.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_OFFER, ua_engine
from e2m_lab.stranger import sip_request
from e2m_plugins import sip
from e2m_plugins.testpki import issue_proxy
from tests.e2e.test_phone_stranger import Lab, assert_serving, lab, pki  # noqa: F401

pytestmark = [pytest.mark.pjsua2]

PROXY = "px.example.com"        # alice's proxy, in her (and bob's) domain


def _policy(url: str) -> tuple[str, str]:
    return ("Proxy-Body-Policy", f'{PROXY};view="INVITE:application/sdp";cert-url="{url}"')


def _alice_invite(lab: Lab, stranger, *, headers=(), body: bytes | None = SDP_OFFER) -> tuple[bytes, str]:
    """alice's initial INVITE to bob as her proxy relays it: her protected SDP (signed,
    bound), the proxy's own policy added on the way."""
    alice = ua_engine(lab.pki, "alice", peers=("bob",))
    raw = sip_request("INVITE", stranger.target, via=stranger.via,
                      from_="<sip:alice@example.com>;tag=a162", to="<sip:bob@example.com>",
                      body=body or b"", content_type="application/sdp" if body else None)
    msg = sip.parse(raw)
    if body:
        msg = alice.protect(msg).message
    for name, value in headers:
        msg = msg.add(name, value)
    return msg.serialize(), msg.call_id


def _answers(stranger, call_id: str, seconds: float) -> list[sip.SipMessage]:
    """Every 200 to ``call_id`` (first copy and retransmissions) within ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for data in stranger.drain(timeout=0.2):
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001
                continue
            if not msg.is_request and msg.call_id == call_id and msg.status == 200:
                out.append(msg)
    return out


def _readable_by(msg: sip.SipMessage) -> set[str]:
    return {v.split(";")[0].strip() for v in msg.get_all("Proxy-Required-Body")}


def _cert_server(lab: Lab):
    proxy = issue_proxy(lab.pki.ca, PROXY, "ec")
    from cryptography.hazmat.primitives import serialization
    return lab.server("body", body=proxy.cert.public_bytes(serialization.Encoding.DER))


E2M = {"cert_url_hosts": ["127.0.0.1"]}


def _call(lab: Lab, bob, server, *, policy_on_invite: bool, body=SDP_OFFER):
    stranger = lab.stranger(bob)
    data, call_id = _alice_invite(lab, stranger, body=body,
                                  headers=[_policy(server.url())] if policy_on_invite else [])
    stranger.send(data)
    answers = _answers(stranger, call_id, 3.5)
    return stranger, answers


def test_hb1_the_answer_to_a_first_call_is_readable_by_the_proxy_that_asked(lab: Lab):
    server = _cert_server(lab)
    bob = lab.phone(phone={"fetch_timeout": 2.0, "srtp": False}, e2m=E2M)
    stranger, answers = _call(lab, bob, server, policy_on_invite=True)
    assert answers, "bob never answered 200"
    readers = [_readable_by(a) for a in answers]
    fetched = bob.of("proxy_certificate")
    assert_serving(bob, stranger, "after the call")
    assert any(PROXY in r for r in readers), (
        f"{len(answers)} copies of bob's 200 within 3.5 s, none readable by {PROXY} "
        f"(its certificate fetched {server.connections} time(s), "
        f"{len(fetched)} proxy_certificate event(s)): the proxy drops each one")


def test_control_hb1_the_second_call_is_readable_once_the_certificate_is_held(lab: Lab):
    """The harness sees a readable 200: the first call's (late) fetch left the
    certificate, so the same policy on a second INVITE makes bob's 200 readable."""
    server = _cert_server(lab)
    bob = lab.phone(phone={"fetch_timeout": 2.0, "srtp": False}, e2m=E2M)
    _, first = _call(lab, bob, server, policy_on_invite=True)
    bob.wait("proxy_certificate", timeout=5)
    stranger, second = _call(lab, bob, server, policy_on_invite=True)
    assert first and second
    assert all(PROXY in _readable_by(a) for a in second), [_readable_by(a) for a in second]
    assert_serving(bob, stranger, "after two calls")
