"""Review 133 (attacker's review of 55c3915), area 1: the late-copy answer memory
(``kamailio_app/late_copies.py``, htable ``e2manswered``, ``Verdict.replay_key``), on a
real Kamailio (``proxy_factory``, E2M on, ``view = MESSAGE:*``); alice is her own
``UAEngine`` (signed, sealed, bound MESSAGE for bob and ``proxy.example.com``) on a UDP
socket, bob a ``RawUas`` registered at the proxy answering 200.  This module also holds
the review's list of what was tried and held (all areas).

Hole K4 (an honest break): with ``[auth]`` the memory never answers, and the
message is delivered twice
------------------------------------------------------------------------------------

- Who: nobody (alice, whose 200 was lost, behind a home proxy with digest
  authentication: the deployment of ``make demo`` and of every example home proxy).
- Messages: alice's MESSAGE (CSeq 1) is challenged 407; she sends it again (CSeq 2,
  re-protected) with ``Proxy-Authorization`` (qop=auth, nc=00000001): 200, bob got 1.
  6.5 s later (tm's transaction over, her Timer F still running) her retransmission,
  the very same datagram.
- Observed: the late copy is answered **407 Proxy Authentication Required**, the log
  says ``e2m: MESSAGE from 127.0.0.137 refused: stale nonce`` and never "a late copy of
  one answered": the credentials are checked before the engine (``kemi.py:1098``
  ``route_auth`` before ``inspect_request`` at ``:1887``), and the cfg's
  ``nonce_count=1`` / ``one_time_nonce=1`` (``templates/kamailio.cfg.tmpl:206-208``)
  refuse a nonce count seen before.  ``stale=true`` tells a UA to retry without asking
  its user (RFC 7616 §3.3): it sends the MESSAGE anew (CSeq 3, a new signed context,
  hence a new replay key), which the proxy relays: **bob got the MESSAGE twice** (figure
  from the test doing what the UA does: retry answered 200, bob's count 2), and the
  archive holds it twice.  So stop 42's memory (review 123 HB2) works only on a proxy
  without ``[auth]``; with it the late copy is neither refused as a replay nor answered
  from memory, but delivered again.
- Code at fault: ``kamailio_app/kemi.py:1295-1349`` (``route_auth``, via
  ``route_request`` at ``:1098``) runs before ``inspect_request`` (``:2047-2086``, where
  ``remembered_answer`` is asked), and ``late_copies.remembered_answer`` is keyed by
  what only the engine's reading gives.
- Fix: answer a late copy before the challenge: keep the 2xx also under the request's
  transaction identity (top Via branch and sent-by, Call-ID, From tag, CSeq; what tm
  matched on) for the same 32 s and give it, statelessly, to a request with that
  identity before ``route_auth`` (a hop replaying the datagram gets the 200 it could
  get now without ``[auth]``: nothing relayed); or, when ``auth_check`` fails only as
  stale or used before (-4, -6), ask the engine and give the remembered answer if it
  has one (private-key work on a failed-nonce request: bounded by pike).
- Test: ``test_late_copy_through_a_proxy_with_digest_gets_the_remembered_2xx`` (strict
  xfail).  Control: ``test_control_the_same_late_copy_without_auth_gets_the_remembered_2xx``
  (the same flow through a proxy without ``[auth]``: the late copy is answered 200 from
  memory, bob got 1).

Fixed (stop 43), K4: when ``auth_check`` fails only because the nonce (or its count)
was used before or expired (-4, -6), ``kamailio.answer_late_copy`` asks the engine for
the request's replay key without recording anything (``ProxyEngine.replay_key_of``,
the read-only half of the engine's reading) and, if the answer memory holds a 2xx for
it, gives that statelessly; else the 407 (stale) goes as before.  On the code before,
the hole test failed (407, and the UA's retry delivered the MESSAGE twice); now the late
copy gets 200 from memory and bob got it once.  The price: a request with a used nonce
and a signed body costs its private-key work before the challenge (pike bounds it per
source, as it bounds a stranger's requests to our users, which are read unchallenged).

Tried and held
--------------

Area 1 (answer memory):

- Untrusted hop between alice and the proxy: send alice's signed MESSAGE first with a
  ``Route`` past the proxy to a UAS of its own (the Request-URI and To tag unchanged, so
  the answer key is the same), which answers 200, then let alice's copy through: the
  proxy answers her 200 from memory and bob never gets it (read in the code, not run:
  ``late_copies.answer_key`` binds no Route).  Not counted as a hole: that hop can
  answer alice 200 itself and drop the MESSAGE with or without the memory, and the
  diverted copy is archived with "(sent to ... via ...)".
- A hop past the proxy replaying the forwarded MESSAGE: 200 from memory, relayed
  nowhere (``tests/kamailio/test_late_copies_wire.py`` already runs it).
- Insider alice re-using a CSeq with another text: answered 200 from memory, neither
  delivered nor archived, so nothing is hidden from the archive that bob got (read).
- Off-path sender: needs a signed body to reach the memory at all (the key is a digest
  of the signed context's fields with To tag and Request-URI): nothing to send.
- A failure answer is never kept; a 2xx with a body is not kept (``$bs``); INVITE, ACK,
  CANCEL are not kept (read, ``late_copies.py``).
- Memory bound: ``e2manswered`` has ``autoexpire=32`` and one entry per relayed signed
  request answered 2xx; its growth is bounded by the request rate (``[limits]``
  pike: 30 per 2 s per address) times 32 s, as ``e2mseen``'s (which lives longer) is.
  No cap of its own (read).
- Forged DMQ writing ``e2manswered`` on another node: not run.  The KDMQ gate
  (``kemi.py:1048-1066``, ``dmq_accepts``: UDP, a ``peers`` address and port, this
  node's DMQ socket) and its reviews (40, 42, 44, 109) cover it; a forged peer source
  is the documented limit (``docs/threat-model.md``, "The cluster").  A method spelled
  ``kdmq`` is not taken for ``KDMQ`` (``$rm`` compared exactly) and never reaches
  ``dmq_handle_message``; a request sent on to a node's DMQ socket from a SIP socket is
  dropped there (read).

Area 2 (SDP views): see ``test_review133_answer_sdp_wire.py`` (hole K3, its early-media
variant held, and what was read).

Area 3 (certificate service): see ``test_review133_cert_refresh_wire.py`` (K1).  Also
held: a refresh from another address is 403 and moves nothing (control there); a
refresh's ``Contact`` moves only the Request-URI (existing
``test_a_target_refresh_cannot_aim_notifies_at_a_victim``); a refresh's
``Record-Route`` is ignored (the route set is fixed at the SUBSCRIBE: read,
``notifier.refresh_dialog``).

Area 4 (IPv6 phone): see ``tests/e2e/test_review133_ipv6_phone.py`` (K2).
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import message
from e2m_lab.kamailio_harness import digest_credentials, parse_challenge, registered_uas
from e2m_plugins import sip
from tests.kamailio.test_late_copies_wire import WAIT_PAST_TM, _alice, _udp, _via

pytestmark = [pytest.mark.kamailio]

PASSWORDS = {"alice": "al-Secret-133", "bob": "bo-Secret-133"}


def _final(sock: socket.socket, raw: bytes, port: int) -> sip.SipMessage | None:
    sock.sendto(raw, ("127.0.0.1", port))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            reply = sip.parse(sock.recvfrom(65535)[0])
        except socket.timeout:
            continue
        if (reply.status or 0) >= 200:
            return reply
    return None


def _answered_then_late(proxy, pki, source: str, auth: bool):
    """alice's signed, sealed MESSAGE to bob (registered, a RawUas answering 200) through
    ``proxy``; with ``auth`` the first try is challenged and the retry (CSeq 2) carries
    her credentials, as any UA sends them.  Then the very same datagram again after tm's
    transaction ended (her answer was lost; Timer F still runs).  Returns (the late
    copy's answer, MESSAGEs bob got, the challenge-retry a UA then sends: its answer and
    MESSAGEs bob got by then, or None)."""
    with registered_uas(proxy, "bob", PASSWORDS["bob"] if auth else None,
                        source.rsplit(".", 1)[0] + ".200") as bob:
        sock = _udp(source)
        try:
            alice = _alice(pki)
            plain = message(pki)
            cseq = 1
            creds = None
            if auth:
                first = alice.protect(plain.replace("Via", _via(sock, "c"))).message
                challenge = _final(sock, first.serialize(), proxy.port)
                assert challenge is not None and challenge.status == 407, challenge
                params = parse_challenge(challenge.get("Proxy-Authenticate") or "")
                creds = digest_credentials(params, "MESSAGE", plain.request_uri or "",
                                           "alice", PASSWORDS["alice"])
                cseq = 2
            sent = alice.protect(plain.replace("CSeq", f"{cseq} MESSAGE")
                                 .replace("Via", _via(sock, "a"))).message
            if creds:
                sent = sent.add("Proxy-Authorization", creds)
            raw = sent.serialize()
            ok = _final(sock, raw, proxy.port)
            assert ok is not None and ok.status == 200, ok
            assert len(bob.wait_for(1, method="MESSAGE")) == 1
            time.sleep(WAIT_PAST_TM)
            late = _final(sock, raw, proxy.port)
            time.sleep(0.5)
            got = len(bob.wait_for(1, method="MESSAGE"))
            retry = None
            if late is not None and late.status == 407:
                # what a UA does with a 407 to its request: answer the challenge, next CSeq
                params = parse_challenge(late.get("Proxy-Authenticate") or "")
                again = alice.protect(plain.replace("CSeq", f"{cseq + 1} MESSAGE")
                                      .replace("Via", _via(sock, "r"))).message
                again = again.add("Proxy-Authorization", digest_credentials(
                    params, "MESSAGE", plain.request_uri or "", "alice", PASSWORDS["alice"]))
                answer = _final(sock, again.serialize(), proxy.port)
                time.sleep(0.5)
                retry = (answer.status if answer else None,
                         len(bob.wait_for(2, timeout=1.0, method="MESSAGE")))
            return late, got, retry
        finally:
            sock.close()


def test_late_copy_through_a_proxy_with_digest_gets_the_remembered_2xx(proxy_factory, pki):
    proxy = proxy_factory("r133-late-auth", e2m=True, view=("MESSAGE:*",), auth=True,
                          users=dict(PASSWORDS))
    mark = proxy.log_mark()
    late, got, retry = _answered_then_late(proxy, pki, "127.0.0.137", auth=True)
    log = proxy.log_since(mark)
    print("\n".join(ln[ln.index("e2m:"):] for ln in log.splitlines() if "e2m: MESSAGE from" in ln))
    print(f"\nlate copy answered {late.status if late else None} "
          f"{late.reason if late else ''}; bob got {got}; a UA's retry after it: {retry}; "
          f"'late copy' in the log: {'a late copy of one answered' in log}")
    assert late is not None and late.status == 200, late
    assert got == 1


def test_control_the_same_late_copy_without_auth_gets_the_remembered_2xx(proxy_factory, pki):
    proxy = proxy_factory("r133-late-open", e2m=True, view=("MESSAGE:*",))
    mark = proxy.log_mark()
    late, got, retry = _answered_then_late(proxy, pki, "127.0.0.138", auth=False)
    assert late is not None and late.status == 200, late
    assert got == 1 and retry is None
    assert proxy.wait_log("a late copy of one answered 200", mark, timeout=2)
