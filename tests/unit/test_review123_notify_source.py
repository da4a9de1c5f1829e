"""Review 123 (attacker's review of 487265c), unit: the e2m-phone's answer to a
certificate NOTIFY that comes from its proxy's address but another UDP port (a cluster
node's DMQ socket), the phone's half of honest break HB4; the wire half, the figures and
the fix are in ``tests/cluster/test_review123_cert_notify_node.py``.

Set-up: the real ``CertServiceClient`` (``e2m_lab.certservice_subscriber``, as the phone
builds it: NOTIFYs must come from ``PROXY``, 127.0.0.1:5999), alice following bob:
SUBSCRIBE answered 200, first NOTIFY with bob's certificate from ``PROXY`` (200).  Then
bob's withdrawal (an empty body, CSeq 2) from 127.0.0.1:5090, the example node's DMQ
port.

Observed (control, passes): answered 481 "Subscription Does Not Exist" (``_notify``,
``pjsua_hooks/certservice_client.py:501-505``; ``ProxySource.matches`` compares the
port over UDP), and the phone keeps bob's certificate and its subscription as active:
it is not told the withdrawal, and the service, taking the 481 (RFC 6665 4.2.2), forgets
the subscription (``cert_route.on_reply``), so the phone hears nothing more until its
own renewal, 80 % of 24 h later.  The same NOTIFY from ``PROXY`` withdraws it (control).
"""

from __future__ import annotations

import pytest

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_certservice_client import BOB, answer, der, notify_for, subscribe_to_bob

DMQ = (PROXY[0], 5090)


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _following(pki):
    made = subscriber(pki)
    engine, client = made.engine, made.client
    out = subscribe_to_bob(engine, client, made.sent)
    ok = sip.make_response(out, 200, "OK", extra_headers=[("Expires", "3600")])
    assert client.on_rx(ok, PROXY) is True
    assert answer(client, notify_for(out, der(pki, "bob"), to_tag=ok.to_tag)) == 200
    assert engine.certs.user(BOB) is not None
    withdrawal = notify_for(out, b"", to_tag=ok.to_tag).replace("CSeq", "2 NOTIFY")
    return engine, client, withdrawal


def test_control_hb4_a_withdrawal_from_the_nodes_dmq_port_is_answered_481(pki):
    engine, client, withdrawal = _following(pki)
    code = answer(client, withdrawal, DMQ)
    print(f"\nwithdrawal from {DMQ}: {code}; bob's certificate still held: "
          f"{engine.certs.user(BOB) is not None}")
    assert code == 481
    assert engine.certs.user(BOB) is not None      # not told


def test_control_hb4_the_same_withdrawal_from_the_proxy_is_taken(pki):
    engine, client, withdrawal = _following(pki)
    assert answer(client, withdrawal, PROXY) == 200
    assert engine.certs.user(BOB) is None
