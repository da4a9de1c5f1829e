"""Review 164 (an attacker's review of fe86571): the phone's ring-then-answer for
certificates (review 162 HB1's fix: ``UAEngine.certificates_to_answer``,
``holds_proxy_certificate``, ``PhoneAccount.onIncomingCall`` / ``answer_call``,
``SipEndpoint.answer_ringing``, ``phone.py _answer_waits`` / ``_after_pump``) and what
reviews 159-162 left around it (the fetcher, the certificate store), on a real pjsua2
phone (``e2m-phone listen``, the stranger lab of ``tests/e2e/test_phone_stranger.py``).

Set-up (as review 162's HB1 test): bob's phone, auto answer, ``fetch_timeout`` 2 s,
``[e2m] cert_url_hosts = ["127.0.0.1"]`` (the deployment serves its proxies'
certificates from one host); alice calls bob with her proxy's policy
(``px.example.com``, view ``INVITE:application/sdp``, ``cert-url`` on a loopback
server serving px's real certificate) on her INVITE, as ``ProxyEngine._announce``
adds it.  The attacker is mallory: an insider, any user the deployment's CA issued a
certificate to (not one of bob's ``[peers]``: her signed offer gives bob her
certificate), calling bob directly (or through a proxy that removes only policies
naming itself).  Hosts ``*.example.com`` are hers to name (``accepts_proxy``: the
caller's domain).

Hole K1: a stranger's slow fetches leave the next first call unreadable again
- Attacker: mallory (above); no server of her own beyond one that accepts and never
  answers (here a silent loopback HTTP server on the deployment's cert host).
- Messages: one INVITE (her signed SDP) with 16 ``Proxy-Body-Policy`` values, hosts
  ``h0..h15.example.com``, each ``cert-url`` on the silent server; then, 1 s later,
  alice's honest first call.
- Effect observed: mallory's call rings (180 at 0.01 s); her 180 takes the 16 policies
  and the phone queues 16 fetches, 4 at a time, each running its full 2 s deadline
  (16 connections to the silent server, 12 fetch errors in 3 s).  alice's call rings
  too (180 at 0.01 s) but px's fetch is queued behind the 16 (0 connections to the good
  server in 6 s): her 200 goes at 3.01-3.02 s (then 3.52, 4.52) without px's part, so her
  proxy drops it: review 162 HB1 is back for anyone who rings bob first.  Read, not
  run: mallory's call is then answered (3 s) and lives; her 16 dialog policies stay
  wanted, so every 30 s cool-down the 16 hosts are queued again (8 s of the 4 workers
  per 30 s per such call, 4 call slots: 32 s per 30 s, the queue never drains).
- Code at fault: ``pjsua_hooks/fetcher.py:309`` (one unbounded FIFO ``_jobs`` for
  every policy's fetch, dialog-scoped strangers' and the call being answered alike),
  ``:354``; ``pjsua_hooks/endpoint.py:627`` (the ring waits a fixed 3 s whatever the
  queue ahead holds); ``e2m_plugins/ua.py:623`` (``certificates_wanted``: every scope).
- Suggested fix: fetch what a ringing call waits for first (a priority lane, or a
  fetch started from ``answer_waits`` outside the shared queue), bound the fetches a
  dialog's policies may queue (one host at a time per dialog), and refuse to queue
  dialog-scoped hosts while a ringing call's hosts wait.
- Test: ``test_hole_k1_a_callers_silent_fetches_do_not_leave_the_next_first_call_unreadable``.

Hole K2: one caller's dialog policy takes another caller's proxy certificate away
- Attacker: mallory (above).
- Messages: after alice's first call (readable: bob fetched px's certificate), one INVITE
  of mallory's naming ``px.example.com`` (her domain's host too) with alice's proxy's
  real ``view`` and ``cert-url`` and ``cert-fp="sha256:<another certificate>"``.
- Effect observed: bob answers mallory at once (px's certificate is held, so no ring);
  her 200 takes the policy into her dialog's scope and ``_take_policies`` finds the held
  certificate not matching her fingerprint and drops it for everyone
  (``certs.remove_proxy``).  Every later fetch of px's real certificate is refused (29 times by the 2nd call: "does
  not match the fingerprint it announced": ``LearnedPolicies.fingerprint`` answers the
  first entry of any scope that has one, mallory's).  alice's next call rings 3 s and
  its 200 (3.01 s) is not readable by px: dropped.  It lasts while mallory's dialog
  policy does (her call, up to ``expires=86400``).  Review 57/58 shut this for the
  proxy that relays (it removes policies in its own name); a proxy the INVITE never
  passed is open, and a dialog-scoped word changes the global certificate store.
- Code at fault: ``e2m_plugins/ua.py:310`` (``_take_policies``: a dialog-scoped
  policy's fingerprint removes a certificate held for every scope);
  ``e2m_plugins/learned_policies.py:221`` (``fingerprint``: any scope's).
- Suggested fix: a policy scoped to a dialog never removes nor pins a certificate for
  others: keep its fingerprint for that dialog only (a mismatch leaves the proxy out
  of that dialog), and check a fetched certificate against the fingerprint of an
  entry for everything we send, or of the scope that asked.
- Test: ``test_hole_k2_one_callers_policy_does_not_take_another_callers_proxy_certificate``.

Hole K3: a certificate the engine refuses is fetched again at every tick
- Attacker: mallory (as K2), or any source of a policy whose fetched certificate the
  engine rejects (wrong fingerprint, another host's certificate, not a certificate).
- Messages: K2's one INVITE.
- Effect observed: the fetcher counts a transfer that worked as a success (it drops
  the host's 30 s cool-down, ``fetcher.py:372``) although ``add_proxy_certificate``
  refused the body; the host stays wanted, so ``fetch_certificates`` (every 0.1 s)
  fetches it again: 48 GETs of px's real URL (the deployment's cert host) and 48
  ``error`` events in 5 s after one INVITE (every 0.1 s tick), for as long as the
  policy lives.  Each phone mallory calls so GETs the cert host ten times a second: an
  amplification onto the deployment's certificate server and the phone's own loop.
- Code at fault: ``pjsua_hooks/fetcher.py:372`` with ``pjsua_hooks/phone.py:1510``
  (``_fetched``: a rejected certificate does not cool the host down).
- Suggested fix: a rejected certificate counts as a failed fetch (cool the host down,
  ``force`` excepted), e.g. ``fetcher.failed(host)`` from ``_fetched``.
- Test: ``test_hole_k3_a_refused_certificate_is_not_fetched_again_at_once``.

Controls (unmarked, pass):
- ``test_control_k1_a_first_call_alone_is_answered_readable_at_once``: no stranger
  ahead: the 200 is readable and goes within 1 s (0.02 s seen), not after 3 s;
- ``test_control_late_offer_first_call_rings_then_answers_readable``: a bodiless INVITE
  (alice is one of bob's peers): 180, then a readable 200 with bob's offer (0.02 s);
- ``test_control_k2_the_same_policy_without_a_fingerprint_leaves_the_certificate``:
  mallory's policy for px with no ``cert-fp``: alice's next call is readable at once;
- ``test_control_cancel_while_ringing_is_never_answered``: a CANCEL during the ring:
  200 to the CANCEL, 487 to the INVITE, and no 200 to the INVITE in the next 4 s (the
  ring's answer skips a disconnected call).

Tried and held (figures from runs on fe86571):
- past 32: unreachable.  pjsua's ``maxCalls`` is 4 (``UaConfig`` default, the endpoint
  never sets it): with one call up, 3 of mallory's 6 INVITEs rang, the other 3 were
  answered 486 by pjsua at once; none was answered 200 at once.  An insider holding
  the 4 slots could do so before fe86571 too (auto-answered calls she keeps up), so
  this is not new; the ``_MAX_RINGING`` branch is dead code on this configuration;
- CANCEL while ringing: 487, the ringing entry dropped (``call.disconnected``), no
  late 200 (control above); pjsip sends the 180 once and runs no UAS timer in 3 s;
- an INVITE the phone refuses: a caller with no checked certificate and no key is
  refused 403 in the receive hook (``_refuse_unanswerable``), before any slot, ring
  or 180, so the ringing path never takes a refused stranger's policies (review 159
  K2's phone test still passes on fe86571: 3 passed); a 200 the hook refuses after the
  ring becomes ``answer_failure``'s final error (read, ``answer_call``);
- threads: ``answer_waits`` runs inside pjsip's callback on the loop thread (parse and
  the engine lock only); ``answer_ringing`` runs from ``_after_pump`` on the same
  thread (``threadCnt = 0``, ``mainThreadOnly``): no pjsua call from a worker (read);
- honest calls: a first call alone is answered readable within a tick (control), a late
  offer too (control); 100rel: the account runs ``prackUse`` 0, so an INVITE that
  Requires 100rel is refused 420 by pjsip as before (read), and one that only Supports
  it gets an unreliable 180; session timers are inactive (``timerUse``); SRTP changes
  only the 200's body (read, not run here).
- not reached in the time: the certificate service client.

Fixed (stop 48), each hole test no longer marked (each failed on fe86571):
- K1: a call's answer waits for the first two proxies its INVITE names
  (``phone._RING_HOSTS``), and their fetches go before every other
  (``CertificateFetcher.submit(..., urgent=True)``, a priority queue): mallory's 16
  silent hosts no longer hold alice's proxy behind them.
- K2: a dialog's policy pins no fingerprint and takes no certificate for the other
  calls: ``LearnedPolicies.fingerprint`` reads entries for everything we send only,
  and ``_take_policies`` drops a held certificate on a fingerprint only for those.
  Reviews 57 and 58's unit controls, which showed a forged in-dialog policy dropping
  the proxy's certificate, now show it kept.
- K3: a certificate the engine refuses cools its host down as a failed fetch
  (``CertificateFetcher.refused``, from ``E2MPhone._fetched``).
"""

from __future__ import annotations

import hashlib
import time

import pytest

from e2m_lab.flows import SDP_OFFER, ua_engine
from e2m_lab.stranger import sip_request
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki, issue_proxy
from tests.e2e.test_phone_stranger import Lab, assert_serving, lab  # noqa: F401

pytestmark = [pytest.mark.pjsua2]

PROXY = "px.example.com"        # alice's proxy, in her (and bob's, and mallory's) domain
E2M = {"cert_url_hosts": ["127.0.0.1"]}
PHONE = {"fetch_timeout": 2.0, "srtp": False}
OTHER_FP = hashlib.sha256(b"not px.example.com's certificate").hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("r164-pki"),
                         users=("alice", "bob", "mallory"), key_type="ec")


def _policy(host: str, url: str, extra: str = "") -> tuple[str, str]:
    return ("Proxy-Body-Policy",
            f'{host};view="INVITE:application/sdp";cert-url="{url}"{extra}')


def _invite(lab: Lab, stranger, who: str, *, headers=(), body: bytes | None = SDP_OFFER,
            tag: str = "t164") -> tuple[bytes, str]:
    """``who``'s initial INVITE to bob (her SDP protected and signed by her engine) with
    ``headers`` added on the way (as a proxy adds its policy)."""
    engine = ua_engine(lab.pki, who, peers=("bob",))
    raw = sip_request("INVITE", stranger.target, via=stranger.via,
                      from_=f"<sip:{who}@example.com>;tag={tag}", to="<sip:bob@example.com>",
                      body=body or b"", content_type="application/sdp" if body else None)
    msg = sip.parse(raw)
    if body:
        msg = engine.protect(msg).message
    for name, value in headers:
        msg = msg.add(name, value)
    return msg.serialize(), msg.call_id


def _responses(stranger, call_id: str, seconds: float, until_final: bool = False):
    """(seconds since the call, status, message) of each response to ``call_id``."""
    out = []
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for data in stranger.drain(timeout=0.1):
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001
                continue
            if not msg.is_request and msg.call_id == call_id:
                out.append((time.monotonic() - start, msg.status, msg))
        if until_final and any(s >= 200 for _, s, m in out if (m.get("CSeq") or "").endswith("INVITE")):
            break
    return out


def _call(lab: Lab, bob, who: str, headers, *, body: bytes | None = SDP_OFFER,
          tag: str = "t164", seconds: float = 4.0):
    stranger = lab.stranger(bob)
    data, call_id = _invite(lab, stranger, who, headers=headers, body=body, tag=tag)
    stranger.send(data)
    return stranger, call_id, _responses(stranger, call_id, seconds, until_final=True)


def _oks(got) -> list[tuple[float, sip.SipMessage]]:
    return [(t, m) for t, s, m in got if s == 200]


def _readable_by(msg: sip.SipMessage) -> set[str]:
    return {v.split(";")[0].strip() for v in msg.get_all("Proxy-Required-Body")}


def _summary(got) -> list[tuple[float, int, list[str]]]:
    return [(round(t, 2), s, sorted(_readable_by(m))) for t, s, m in got]


def _cert_server(lab: Lab):
    from cryptography.hazmat.primitives import serialization
    proxy = issue_proxy(lab.pki.ca, PROXY, "ec")
    return lab.server("body", body=proxy.cert.public_bytes(serialization.Encoding.DER))


# --------------------------------------------------------------------------- K1

def test_hole_k1_a_callers_silent_fetches_do_not_leave_the_next_first_call_unreadable(lab: Lab):
    good = _cert_server(lab)
    silent = lab.server("silent")
    bob = lab.phone(phone=PHONE, e2m=E2M)
    eve, eve_call, rang = _call(lab, bob, "mallory", tag="m164", seconds=1.0,
                                headers=[_policy(f"h{i}.example.com", silent.url())
                                         for i in range(16)])
    assert any(s == 180 for _, s, _ in rang), _summary(rang)
    _, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], seconds=4.0)
    oks = _oks(got)
    assert_serving(bob, eve, "after the two calls")
    assert oks, f"bob never answered alice: {_summary(got)}"
    assert PROXY in _readable_by(oks[0][1]), (
        f"alice's first 200 at {oks[0][0]:.2f} s is not readable by {PROXY} "
        f"(responses {_summary(got)}; {silent.connections} connections to mallory's silent "
        f"server, {good.connections} to px's): her proxy drops it")


def test_control_k1_a_first_call_alone_is_answered_readable_at_once(lab: Lab):
    good = _cert_server(lab)
    bob = lab.phone(phone=PHONE, e2m=E2M)
    stranger, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], seconds=4.0)
    oks = _oks(got)
    assert oks and PROXY in _readable_by(oks[0][1]), _summary(got)
    assert oks[0][0] < 1.0, f"the first call rang {oks[0][0]:.2f} s: {_summary(got)}"
    assert_serving(bob, stranger)


def test_control_late_offer_first_call_rings_then_answers_readable(lab: Lab):
    good = _cert_server(lab)
    bob = lab.phone(phone=PHONE, e2m=E2M)
    stranger, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], body=None)
    oks = _oks(got)
    assert any(s == 180 for _, s, _ in got), _summary(got)
    assert oks and PROXY in _readable_by(oks[0][1]) and oks[0][0] < 1.0, _summary(got)
    assert oks[0][1].body, "the late offer's 200 carries no offer"
    assert_serving(bob, stranger)


def test_control_cancel_while_ringing_is_never_answered(lab: Lab):
    silent = lab.server("silent")
    bob = lab.phone(phone=PHONE, e2m=E2M)
    eve = lab.stranger(bob)
    data, call_id = _invite(lab, eve, "mallory", tag="c164",
                            headers=[_policy("h.example.com", silent.url())])
    eve.send(data)
    rang = _responses(eve, call_id, 0.5)
    assert any(s == 180 for _, s, _ in rang), _summary(rang)
    invite = sip.parse(data)
    eve.send((f"CANCEL {eve.target} SIP/2.0\r\nVia: {invite.get('Via')}\r\n"
              f"Max-Forwards: 70\r\nFrom: {invite.get('From')}\r\nTo: {invite.get('To')}\r\n"
              f"Call-ID: {call_id}\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n").encode())
    after = _responses(eve, call_id, 4.0)
    finals = [(s, m.get("CSeq")) for _, s, m in after if s >= 200]
    assert (200, "1 CANCEL") in finals and (487, "1 INVITE") in finals, finals
    assert (200, "1 INVITE") not in finals, finals
    assert_serving(bob, eve)


# --------------------------------------------------------------------------- K2, K3

def _first_call_then_mallory(lab: Lab, extra: str):
    """alice's first call (bob fetches px's certificate), then mallory's INVITE naming px
    with ``extra`` parameters; returns bob, the cert server and mallory's responses."""
    good = _cert_server(lab)
    bob = lab.phone(phone=PHONE, e2m=E2M)
    _, _, first = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a1")
    assert _oks(first) and PROXY in _readable_by(_oks(first)[0][1]), _summary(first)
    _, _, eve = _call(lab, bob, "mallory", [_policy(PROXY, good.url(), extra)], tag="m2")
    assert _oks(eve), _summary(eve)
    return bob, good


def test_hole_k2_one_callers_policy_does_not_take_another_callers_proxy_certificate(lab: Lab):
    bob, good = _first_call_then_mallory(
        lab, f';cert-fp="sha256:{OTHER_FP}";expires=86400')
    stranger, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a2")
    oks = _oks(got)
    refused = [e for e in bob.of("error") if e.get("message") == PROXY]
    assert_serving(bob, stranger, "after the calls")
    assert oks and PROXY in _readable_by(oks[0][1]), (
        f"alice's next call after mallory's: {_summary(got)}; px's real certificate "
        f"refused {len(refused)} time(s) ({refused[0].get('detail') if refused else ''})")


def test_control_k2_the_same_policy_without_a_fingerprint_leaves_the_certificate(lab: Lab):
    bob, good = _first_call_then_mallory(lab, ";expires=86400")
    stranger, _, got = _call(lab, bob, "alice", [_policy(PROXY, good.url())], tag="a2")
    oks = _oks(got)
    assert oks and PROXY in _readable_by(oks[0][1]) and oks[0][0] < 1.0, _summary(got)
    assert_serving(bob, stranger)


def test_hole_k3_a_refused_certificate_is_not_fetched_again_at_once(lab: Lab):
    bob, good = _first_call_then_mallory(
        lab, f';cert-fp="sha256:{OTHER_FP}";expires=86400')
    before = good.connections
    time.sleep(5.0)
    again = good.connections - before
    refused = [e for e in bob.of("error") if e.get("message") == PROXY]
    assert again <= 1, (f"px's cert URL fetched {again} more time(s) in 5 s after the "
                        f"engine refused it ({len(refused)} refusals so far)")
