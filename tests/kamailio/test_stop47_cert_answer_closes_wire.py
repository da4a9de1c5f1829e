"""Stop 47: the answer to a certificate NOTIFY over the connection the service opened
closes that connection and frees its place at once, on a real Kamailio 5.6.3.

Honest break found in stop 47 (from review 146 HB1 failing in CI under load)
---------------------------------------------------------------------------------

- Who: honest UDP followers of a large certificate behind one address (one NAT): each
  NOTIFY with the certificate goes over a TCP connection the service opens to the
  follower's port, at most ``MAX_CONNECTS`` places at a time toward the address.
- Effect observed on ``4ce285d``: the follower answered 200 over that connection at
  once, yet the proxy closed it only ``CONNECT_LIFETIME`` s (4 s) after its opening,
  and the place was freed at the next tick after that.  With 4 followers behind one
  address, the 2 owed ones were retried every 2 s into places still held: under CPU
  load one of them was told nothing for 10 s (review 146 HB1 failed in CI twice, and
  3 times of 3 here with 3 busy processes on the 2 cores).
- Code at fault: ``cert_connects.OpenedConnections.close_answered`` took ``$Rp`` for the
  connection's local port.  ``$Rp`` is the port of the socket the message is bound to
  (``pv_get_rcvport``: ``msg->rcv.bind_address->port_no``), a listener's for every
  connection, the proxy's own included: the check "no listener's port" never held, and
  no answer closed anything.  The unit test's fake had ``$Rp`` be the local port.
- Fix: an answer from a place's address and port over a connection newer than the
  place's floor is checked against the listing (``core.tcp_list``, whose local port is
  the connection's own): only the proxy's own connection is closed and its place
  freed; a twin's, to our listener, still frees nothing (review 147 K3).  The listing
  runs only for an answer that tm matched to a NOTIFY of ours in its dialog and that
  comes from a place held.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.certclient import CertClient, forget_certificates
from kamailio_app.cert_connects import CONNECT_LIFETIME
from tests.kamailio.test_review145_cert_follow_connects_wire import (  # noqa: F401
    USERS, address, home, large_certificate)
from tests.kamailio.test_review146_cert_connect_budget_wire import UdpFollower

pytestmark = [pytest.mark.kamailio, pytest.mark.slow]


def answered_connection(home, pki, source: str) -> dict:
    """A UDP follower at ``source`` of bob's large certificate: when its TCP NOTIFY came
    (it answers 200 at once over that connection), and when the proxy closed it."""
    publisher = CertClient(home.port, "bob", password=USERS["bob"], source=address())
    follower = UdpFollower(home, source)
    try:
        assert publisher.publish(large_certificate(pki)).status == 200
        follower.subscribe()
        deadline = time.monotonic() + 6
        told = closed = None
        while time.monotonic() < deadline and closed is None:
            had_stream = bool(follower.streams)
            follower.poll(0.02)
            if told is None and follower.certificates and had_stream:
                told = time.monotonic()
            if told is not None and not follower.streams:
                closed = time.monotonic()
        places = home.rpc("htable.dump", "e2mconnects")
        return {"told": told is not None,
                "closed_after": None if closed is None else round(closed - told, 2),
                "place_held": source in places}
    finally:
        follower.close()
        publisher.close()
        forget_certificates(home)


def test_the_answer_closes_the_services_connection_and_frees_its_place(home, pki):
    result = answered_connection(home, pki, "127.0.247.10")
    assert result["told"], result
    # closed on the answer, well before the connection's own life would end it
    assert result["closed_after"] is not None, result
    assert result["closed_after"] < CONNECT_LIFETIME / 2, result
    assert not result["place_held"], result
