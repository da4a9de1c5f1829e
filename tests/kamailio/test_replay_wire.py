"""Replayed and re-addressed bodies at the real home proxy (the untrusted hop's attack).

A captured MESSAGE sent again with a new branch, through any of the proxy's workers,
must be refused and never archived twice; the same body re-addressed to carol must be
refused and never archived as "alice to carol".  The record of what was seen lives in
the htable all workers share (kamailio_app/replay_htable.py).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import udp_send
from e2m_lab.sipp import register
from e2m_plugins.sip import RequestLine, SipMessage

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

TEXT = b"Replay me if you can."


def test_a_replayed_message_is_refused_by_every_worker_and_archived_once(proxy_factory, sipp,
                                                                         raw_uas, pki):
    home = proxy_factory("home", e2m=True, view=("MESSAGE:*",), workers=4)
    register(home, "bob", raw_uas.port, sipp)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
    sent = alice.protect(message(pki, TEXT)).message

    first = udp_send(home.port, sent)        # a fresh socket and branch each time
    assert first is not None and first.status == 200
    for _ in range(8):                       # spread over the workers
        again = udp_send(home.port, sent)
        # the replay check refuses each copy in every worker; since stop 42 a copy of a
        # request answered 2xx within 32 s gets that answer back (it may be the sender's
        # late retransmission: kamailio_app/late_copies.py), and still goes nowhere
        assert again is not None and again.status == 200, again
        assert "Replayed" not in (again.get("Warning") or "")
    assert home.wait_log("a late copy of one answered 200", timeout=2)
    assert len(raw_uas.wait_for(2, timeout=0.5, method="MESSAGE")) == 1
    assert [r.plaintext for r in home.archive_rows()] == [TEXT]


def test_a_message_readdressed_to_carol_is_refused_and_not_archived(proxy_factory, sipp,
                                                                    raw_uas, pki):
    home = proxy_factory("home", e2m=True, view=("MESSAGE:*",))
    register(home, "carol", raw_uas.port, sipp)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
    sent = alice.protect(message(pki, TEXT)).message
    carol = pki.aor("carol")
    readdressed = SipMessage(RequestLine("MESSAGE", carol), sent.headers,
                             sent.body).replace("To", f"<{carol}>")
    answer = udp_send(home.port, readdressed)
    assert answer is not None and answer.status == 403
    assert raw_uas.wait_for(1, timeout=0.5, method="MESSAGE") == []
    assert home.archive_rows() == []
