"""Review 166 (an attacker's review of 46ed1ef): the ringing call's urgent fetches,
the unpinned dialog ``cert-fp`` and the cool-down of a refused certificate, on a real
pjsua2 phone (``e2m-phone listen``, review 164's lab: bob auto-answers,
``fetch_timeout`` 2 s, ``[e2m] cert_url_hosts = ["127.0.0.1"]``; alice's INVITE
carries her proxy's policy ``px.example.com`` with a ``cert-url`` serving px's real
certificate).  The attacker is mallory: an insider (any user our CA issued a
certificate to) calling bob directly; ``*.example.com`` hosts are hers to name.

Hole K1: a caller's bad cert-url for another caller's proxy cools that proxy down
- Attacker: mallory (above); no server of her own: any URL on the deployment's cert
  host that does not serve px's certificate (here one serving "not a certificate"; a
  404, a silent path or a URL ``check_url`` refuses does the same: every failure,
  and since 46ed1ef every refusal, cools the *host* down, whatever URL failed).
- Messages: one INVITE (her signed SDP) with ``Proxy-Body-Policy: px.example.com;
  view="INVITE:application/sdp";cert-url="<junk>";expires=86400``; then alice's
  honest first call with px's real policy.
- Effect observed: mallory's ring fetches her URL for px (urgent, 1 GET), the engine
  refuses the body and ``refused`` cools px down for 30 s.  alice's call: ``submit``
  returns None for a cooling host, which ``_answer_waits`` takes for "queued", so her
  call rings for a fetch that never runs: 180 at 0.00 s, 200 at 3.01 s readable by []
  (0 GETs of px's real URL, 1 refusal): her proxy drops it (review 162 HB1 back).
- Code at fault: ``pjsua_hooks/fetcher.py:346`` (the cool-down is keyed on the host,
  whoever's URL failed; set even before ``check_url``), ``:365`` (``refused``: the
  same for a certificate refused), ``pjsua_hooks/phone.py:1488`` (a cooling host is
  waited for as if queued).
- Suggested fix: cool down (host, url) or (host, scope), not the host: a dialog's
  failed URL must not stop another policy's URL for the same host; ``submit`` should
  tell "cooling" apart from "queued" and the ring not wait for a host it cannot fetch.
- Test: ``test_hole_k1_a_callers_bad_cert_url_does_not_cool_down_another_callers_proxy``.

Hole K2: while her call lives, px's real certificate is never fetched
- Attacker, Messages: as K1, mallory keeping her call up (no BYE), alice calling
  again 34 s later.
- Effect observed: after each 30 s cool-down the 0.1 s tick (``fetch_certificates``)
  walks ``certificates_wanted`` in insertion order, mallory's dialog entry for px
  first, and queues *her* URL (2 GETs of it in 34 s, 0 of px's real one); alice's
  entry finds px busy or cooling.  alice's call at 34 s: 180, 200 at 3.01 s readable
  by []: every first call to bob through px is unreadable for as long as mallory's one
  call (``expires=86400``) lives.
- Code at fault: ``pjsua_hooks/phone.py:1498`` with ``e2m_plugins/ua.py:625`` and
  ``e2m_plugins/learned_policies.py:208`` (one URL per host, the first entry's, any
  scope), with K1's cool-down per host.
- Suggested fix: prefer the URL of an entry for everything we send, then the ringing
  call's own; try each distinct URL of a host (own cool-down each), and never let a
  dialog's entry decide the fetch for another dialog.
- Test: ``test_hole_k2_the_cool_down_never_lets_the_proxys_real_certificate_in`` (slow).

Honest break HB1: a proxy that changes its key keeps getting answers sealed for the old
- Attacker: nobody.  bob learns px's policy only from alice's INVITEs (bob is not px's
  registrant: those entries are dialog-scoped).
- Messages: alice's first call with px's policy (``cert-url`` of the old certificate,
  ``cert-fp`` its fingerprint); px changes its key; alice's next call with px's policy
  naming the new certificate's URL and ``cert-fp``.
- Effect observed: the second 200 goes at 0.00 s sealed for the old key's SKI, not the
  new one's; 0 GETs of the new certificate.  46ed1ef made a dialog's ``cert-fp`` drop
  nothing, so bob keeps sealing for px's old key until that certificate expires (825
  days here): px (new key) cannot read any answer of bob's, and drops them.  Before
  46ed1ef, ``_take_policies`` dropped it and the ring fetched the new one.
- Code at fault: ``e2m_plugins/ua.py:307`` (``scope is None`` only) with
  ``e2m_plugins/learned_policies.py:229``.
- Suggested fix: a dialog-scoped fingerprint mismatch must not keep the old key for
  *that* dialog: leave the held certificate for the others but, for the dialog whose
  policy names another fingerprint, fetch its URL and seal for the certificate that
  matches (per-scope certificate), or ring until it is fetched.
- Test: ``test_honest_break_hb1_a_proxy_that_changes_its_key_gets_answers_for_the_new_one``.

Controls (unmarked, pass):
- ``test_control_k1_a_bad_cert_url_for_another_host_leaves_alices_call``: mallory's junk
  URL for ``h.example.com`` (fetched, refused): alice's first call readable at once;
- ``test_control_hb1_the_same_key_again_is_answered_at_once``: the same pinned key twice:
  both 200s within 1 s, sealed for it, one GET.

Tried and held (figures from runs on 4cb2854):
- review 164 K2's attack (a dialog's other ``cert-fp``): the held certificate kept, the
  fingerprint ignored (review 164's tests pass); a dialog's unpinned ``cert-fp`` lets a
  caller have another certificate of px kept only if it chains to our CA and names px
  and is served from px or a ``cert_url_hosts`` host: in this lab the only such
  certificates are px's own (HB1 shows the old one stays; an attacker cannot mint one);
- a registrar's (scope None) fingerprint still pins: ``fingerprint`` reads it first,
  so a dialog-fetched certificate with another key is refused (read, ua.py:639);
- the priority queue: urgent entries are (0, n), ordinary (1, n), stop (2, n): FIFO
  within a rank, the stop after all work (read); an urgent fetch needs a ringing call,
  and pjsua's 4 call slots with ``_RING_HOSTS`` 2 bound a stranger's urgent fetches to
  8 at once (2 s each): the registrar's policy fetch waits at most ~4 s behind them
  (read, not run); close() with urgent jobs queued lets the daemon workers finish them
  within their deadlines (read).

Fixed (stop 48), each test no longer marked (each failed on 4cb2854):
- K1: the fetcher cools down a (host, URL) pair, not a host (``CertificateFetcher``
  ``_tried``, ``refused(host, url)``), and a call waits only for what can come
  (``would_fetch``): mallory's bad URL for px keeps alice's good one in.
- K2: ``UAEngine.certificates_wanted`` gives each host and URL once, those of policies
  for everything we send first: a dialog's URL no longer stands before the others.
- HB1: a policy whose ``cert-fp`` names another key than the one held wants a
  certificate again (``_needs_certificate``: in ``certificates_wanted`` and
  ``certificates_to_answer``; the ringing call waits for the matching one); a fetched
  certificate replaces a held one only when a policy in force, of any scope, names it
  (``LearnedPolicies.announced_fingerprints``), so a dialog's word alone still drops
  nothing (review 164 K2).
"""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from e2m_plugins.testpki import issue_proxy

from tests.e2e.test_phone_stranger import Lab, assert_serving, lab  # noqa: F401
from tests.pjsua.test_review164_ring_for_certificates_phone import (  # noqa: F401
    E2M, PHONE, PROXY, _call, _cert_server, _oks, _policy, _readable_by, _summary, pki)

pytestmark = [pytest.mark.pjsua2]


def _mallory_names_px(lab: Lab, bob, url: str, tag: str = "m166"):
    """mallory's call naming alice's proxy with her own ``cert-url`` (on the
    deployment's cert host); she keeps the call up."""
    eve, _, got = _call(lab, bob, "mallory", [_policy(PROXY, url, ";expires=86400")],
                        tag=tag, seconds=4.0)
    return eve, got


def test_hole_k1_a_callers_bad_cert_url_does_not_cool_down_another_callers_proxy(lab: Lab):
    good = _cert_server(lab)
    junk = lab.server("body", body=b"not a certificate")
    bob = lab.phone(phone=PHONE, e2m=E2M)
    eve, rang = _mallory_names_px(lab, bob, junk.url())
    _, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a166")
    oks = _oks(got)
    refused = [e for e in bob.of("error") if e.get("message") == PROXY]
    assert_serving(bob, eve, "after the two calls")
    assert oks, f"bob never answered alice: {_summary(got)}"
    assert PROXY in _readable_by(oks[0][1]) and oks[0][0] < 1.0, (
        f"alice's first 200 at {oks[0][0]:.2f} s readable by {sorted(_readable_by(oks[0][1]))} "
        f"(responses {_summary(got)}; mallory's {_summary(rang)}; {junk.connections} GET(s) "
        f"of mallory's URL, {good.connections} of px's real one; {len(refused)} refusal(s))")


def test_control_k1_a_bad_cert_url_for_another_host_leaves_alices_call(lab: Lab):
    good = _cert_server(lab)
    junk = lab.server("body", body=b"not a certificate")
    bob = lab.phone(phone=PHONE, e2m=E2M)
    eve, _ = _call(lab, bob, "mallory", [_policy("h.example.com", junk.url())],
                   tag="m166c", seconds=4.0)[0::2]
    _, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a166c")
    oks = _oks(got)
    assert junk.connections >= 1
    assert oks and PROXY in _readable_by(oks[0][1]) and oks[0][0] < 1.0, _summary(got)
    assert_serving(bob, eve)


@pytest.mark.slow
def test_hole_k2_the_cool_down_never_lets_the_proxys_real_certificate_in(lab: Lab):
    good = _cert_server(lab)
    junk = lab.server("body", body=b"not a certificate")
    bob = lab.phone(phone=PHONE, e2m=E2M)
    eve, _ = _mallory_names_px(lab, bob, junk.url())
    _, _, first = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a166a")
    time.sleep(31.0)                 # past the 30 s cool-down, both calls still up
    _, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a166b")
    oks = _oks(got)
    assert_serving(bob, eve, "after the calls")
    assert oks and PROXY in _readable_by(oks[0][1]), (
        f"alice's call 34 s after mallory's: {_summary(got)} (first {_summary(first)}); "
        f"{junk.connections} GET(s) of mallory's URL, {good.connections} of px's real one")


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_honest_break_hb1_a_proxy_that_changes_its_key_gets_answers_for_the_new_one(lab: Lab):
    der = serialization.Encoding.DER
    old, new = issue_proxy(lab.pki.ca, PROXY, "ec"), issue_proxy(lab.pki.ca, PROXY, "ec")
    s_old = lab.server("body", body=old.cert.public_bytes(der))
    s_new = lab.server("body", body=new.cert.public_bytes(der))

    def fp(cred) -> str:
        return f';cert-fp="sha256:{hashlib.sha256(cred.cert.public_bytes(der)).hexdigest()}"'

    bob = lab.phone(phone=PHONE, e2m=E2M)
    _, _, g1 = _call(lab, bob, "alice", [_policy(PROXY, s_old.url(), fp(old))], tag="a1")
    assert _oks(g1) and _ski(old.cert) in _oks(g1)[0][1].body, _summary(g1)
    # px changes its key: its policy on alice's next INVITE names the new certificate
    stranger, _, g2 = _call(lab, bob, "alice", [_policy(PROXY, s_new.url(), fp(new))],
                            tag="a2")
    oks = _oks(g2)
    assert_serving(bob, stranger)
    assert oks, _summary(g2)
    body = oks[0][1].body
    assert _ski(new.cert) in body and _ski(old.cert) not in body, (
        f"alice's call after px's new key: {_summary(g2)}; 200 sealed for the old key: "
        f"{_ski(old.cert) in body}, the new: {_ski(new.cert) in body}; "
        f"{s_new.connections} GET(s) of the new certificate")


def test_control_hb1_the_same_key_again_is_answered_at_once(lab: Lab):
    der = serialization.Encoding.DER
    old = issue_proxy(lab.pki.ca, PROXY, "ec")
    s_old = lab.server("body", body=old.cert.public_bytes(der))
    pin = f';cert-fp="sha256:{hashlib.sha256(old.cert.public_bytes(der)).hexdigest()}"'
    bob = lab.phone(phone=PHONE, e2m=E2M)
    for tag in ("c1", "c2"):
        stranger, _, got = _call(lab, bob, "alice", [_policy(PROXY, s_old.url(), pin)], tag=tag)
        oks = _oks(got)
        assert oks and oks[0][0] < 1.0 and _ski(old.cert) in oks[0][1].body, _summary(got)
    assert s_old.connections == 1
    assert_serving(bob, stranger)
