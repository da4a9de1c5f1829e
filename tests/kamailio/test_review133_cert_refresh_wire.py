"""Review 133 (attacker's review of 55c3915), area 3: a follower of the RFC 6072
certificate service refreshes its subscription over another connection.  Real
Kamailio on loopback (``start_proxy``, ``[certs] notify_interval = 2``); the
subscribers are ``CertClient``s over TCP, each from a loopback address of its own.

Hole K1 (an honest break): a TCP follower's refresh over a new connection
--------------------------------------------------------------------------------

- Who: nobody (an honest RFC 6665 subscriber over TCP or TLS).  A TCP client opens
  each connection from a new ephemeral port; a connection goes when the client closes
  it, when the proxy's ``tcp_idle_timeout`` (120 s by default) passes with nothing on
  it, or when a NAT forgets it.  The subscriber then refreshes inside its dialog
  (RFC 6665 §4.1.2.1), over a new connection, from the same address.
- Set-up: bob's certificate published; carol follows it over TCP (``Expires: 600``)
  and answers its first NOTIFY 200 (the subscription is confirmed); she closes that
  connection and sends the in-dialog refresh (same Call-ID and tags, CSeq + 1) over
  a new TCP connection from the same address; then bob PUBLISHes a new certificate.
- Observed: the refresh is answered ``200 OK`` (with its Contact); the subscription's
  ``next_hop`` stays ``sip:127.0.133.3:<old port>;transport=tcp``; Kamailio logs
  ``tcpconn_1st_send(): connect 127.0.133.3:<old port> failed (RST) Connection refused``
  twice (the refresh's NOTIFY, then the change's NOTIFY); carol gets **0 NOTIFYs** on
  her new connection in 3 s + 5 s, and the subscription stays in the table (1 row):
  it is confirmed, so nothing drops it; every NOTIFY of it, the certificate's
  replacement or removal included, goes to a port nobody listens on until it
  lapses, while each refresh tells carol all is well.  (A failed connect is no 481,
  so ``on_reply`` never ends it either.)
- Code at fault: ``kamailio_app/cert_route.py:271-286`` (``route_resubscribe``: the
  refresh is taken from the same site, ``site_of``, whatever its port or transport,
  and ``notifier.refresh_dialog``, ``e2m_plugins/notifier.py:171-178``, keeps
  ``next_hop``; ``cert_table.refreshed`` writes only ``expires`` and
  ``remote_target``).  ``docs/protocol.md`` §11.2 says "a refresh may move the remote
  target but not the first hop" and "a subscriber that changes address (NAT
  rebinding) subscribes anew", but this subscriber did not change address, and it
  is told 200, not told to subscribe anew.
- Fix (either): a refresh that came over TCP or TLS (the handshake proves its
  source, so nothing is forged) from the subscription's site moves ``next_hop`` to
  the new connection's source (``Peer.uri()``, or the top Record-Route as
  ``_next_hop`` checks it) and keeps the route set; or a refresh whose source
  address, port and transport are not the subscription's ``next_hop`` is refused
  (481, so RFC 6665 §4.1.2.2 has the subscriber subscribe anew), keeping the 403
  for another site.
- The same rule meets a UDP follower whose NAT gave it a new port (same address): its
  refresh is 200 and its NOTIFYs go to the old port (read, not run; the docs ask such
  a subscriber to subscribe anew, but nothing tells it to).
- Test: ``test_a_refresh_over_a_new_tcp_connection_keeps_the_notifies_coming``
  (strict xfail; it also passes if the refresh is refused).

Controls (unmarked, pass):

- ``test_control_a_refresh_over_the_same_tcp_connection_gets_its_notifies``: the
  same follow refreshed over its own connection gets the refresh's NOTIFY and the
  change's NOTIFY (3 in all).
- ``test_control_a_refresh_from_another_address_is_still_refused``: the refresh over
  TCP from another address is 403 and ``next_hop`` does not move (the rule a fix must
  keep: a hop or a stranger who knows the dialog's ids cannot move its NOTIFYs).

Tried and held (area 3): see the module ``tests/kamailio/test_review133_late_copies_wire.py``
docstring for the review's full list.

Fixed (stop 43), K1: ``notifier.refresh_dialog`` now takes the refresh's source
(``cert_route.route_resubscribe`` passes it).  For a subscription reached directly (no
route set), a refresh over TCP or TLS from the subscription's address moves
``next_hop`` to that connection (a handshake proved its source), and
``cert_table.refreshed`` stores it.  A datagram from another port, or a refresh over
UDP of a TCP or TLS subscription, may be forged: it is answered 481 (the subscriber
subscribes anew, RFC 6665 §4.1.2.2), and the row stays until its expiry.  Through a
route set, the first hop stays the Record-Route's.  On the code before, the hole test
failed (0 NOTIFYs on the new connection); now it passes, and
``tests/unit/test_notifier.py`` has the rule's cases.  The UDP subscriber whose NAT
moved it now gets 481 instead of a silent 200.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certclient import CertClient, Dialog, closed_and_forgotten
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_plugins.testpki import TestPKI, issue_user

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
BOB = "sip:bob@example.com"
INTERVAL = 2
_sources = iter(range(2, 250))


def source() -> str:
    """A fresh loopback address (127.0.133.x: apart from the other certificate tests')."""
    return f"127.0.133.{next(_sources)}"


def der_of(cred) -> bytes:
    return cred.cert.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("certs-review133"), pki=pki, e2m=True,
                        auth=True, users=USERS,
                        extra={"certs": {"notify_interval": INTERVAL, "min_expires": 2}})
    yield proxy
    proxy.stop()


@pytest.fixture
def made(home: ProxyHandle) -> Iterator[list]:
    with closed_and_forgotten(home) as things:
        yield things


def client(home: ProxyHandle, made: list, user: str, *, password: bool = False,
           src: str | None = None, transport: str = "udp") -> CertClient:
    one = CertClient(home.port, user, password=USERS[user] if password else None,
                     source=src or source(), transport=transport)
    made.append(one)
    return one


def publish(home: ProxyHandle, made: list, body: bytes, etag: str | None = None) -> str:
    answer = client(home, made, "bob", password=True).publish(body, etag=etag)
    assert answer is not None and answer.status == 200, answer
    return answer.get("SIP-ETag") or ""


def next_hop(home: ProxyHandle, call_id: str) -> list[tuple]:
    with sqlite3.connect(home.directory / "certs.sqlite") as conn:
        return conn.execute("SELECT next_hop, source FROM cert_subscriptions WHERE call_id = ?",
                            (call_id,)).fetchall()


def refresh(subscriber: CertClient, dialog: Dialog, cseq: int, expires: int = 600):
    """An in-dialog refresh (RFC 6665 §4.1.2.1) sent by ``subscriber``'s UA."""
    request = subscriber.ua.build("SUBSCRIBE", dialog.target, to=BOB, call_id=dialog.call_id,
                                  from_tag=dialog.from_tag, to_tag=dialog.to_tag, cseq=cseq,
                                  headers=[("Event", "certificate"), ("Expires", str(expires)),
                                           ("Contact", subscriber.ua.contact),
                                           ("Accept", "application/pkix-cert")])
    answer = subscriber.ua.request(request)
    subscriber._answer_notifies()
    return answer


def follow_over_tcp(home, made, pki):
    """bob's certificate published; carol follows it over TCP and answers its first
    NOTIFY (the subscription is confirmed)."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    first = client(home, made, "carol", src=src, transport="tcp")
    answer, dialog = first.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(first.wait_notifies(1)) == 1
    time.sleep(0.3)                                   # its 200 confirms the subscription
    return src, first, dialog


def test_a_refresh_over_a_new_tcp_connection_keeps_the_notifies_coming(home, made, pki):
    """carol's first connection is gone (closed by her, by the proxy's idle timeout or
    by a NAT); she refreshes in the dialog over a new connection from the same address
    (a new port: what any TCP client does).  Secure: the refresh is answered 200 only
    if its NOTIFY, and the NOTIFY of a later certificate change, reach her; or it is
    refused, so that she subscribes anew."""
    src, first, dialog = follow_over_tcp(home, made, pki)
    [(hop_before, _)] = next_hop(home, dialog.call_id)
    mark = home.log_mark()
    first.close()
    time.sleep(0.3)
    second = client(home, made, "carol", src=src, transport="tcp")
    answer = refresh(second, dialog, cseq=first.subscribes[-1].cseq[0] + 1)
    assert answer is not None
    [(hop_after, _)] = next_hop(home, dialog.call_id)
    print(f"\nrefresh from {src}:{second.ua.local_port} answered {answer.status}; "
          f"next hop before {hop_before}, after {hop_after}")
    if answer.status != 200:
        return                                   # refused: she knows to subscribe anew
    got = second.wait_notifies(1, timeout=3.0)
    # and bob replaces his certificate: a follower must hear of it
    publish(home, made, der_of(issue_user(pki.ca, BOB, "ec")))
    got = second.wait_notifies(2, timeout=INTERVAL + 3.0)
    log = home.log_since(mark)
    print(f"NOTIFYs on the new connection: {len(got)}; subscriptions kept: "
          f"{len(next_hop(home, dialog.call_id))}; log lines on connect: "
          f"{sum(1 for line in log.splitlines() if 'connect' in line.lower())}")
    print("\n".join(line for line in log.splitlines() if "connect" in line.lower())[:1500])
    assert len(got) == 2


def test_control_a_refresh_over_the_same_tcp_connection_gets_its_notifies(home, made, pki):
    """Control: the same follow refreshed over the connection it was made on: 200, its
    NOTIFY, then the change's NOTIFY, all on that connection."""
    _, first, dialog = follow_over_tcp(home, made, pki)
    answer = refresh(first, dialog, cseq=first.subscribes[-1].cseq[0] + 1)
    assert answer is not None and answer.status == 200, answer
    assert len(first.wait_notifies(2, timeout=3.0)) == 2
    publish(home, made, der_of(issue_user(pki.ca, BOB, "ec")))
    assert len(first.wait_notifies(3, timeout=INTERVAL + 3.0)) == 3


def test_control_a_refresh_from_another_address_is_still_refused(home, made, pki):
    """Control (the rule a fix must keep): the same refresh over TCP from another
    address is 403 and the subscription's next hop does not move."""
    _, first, dialog = follow_over_tcp(home, made, pki)
    [(hop_before, _)] = next_hop(home, dialog.call_id)
    other = client(home, made, "carol", transport="tcp")
    answer = refresh(other, dialog, cseq=first.subscribes[-1].cseq[0] + 1)
    assert answer is not None and answer.status == 403, answer
    assert next_hop(home, dialog.call_id) == [(hop_before, first.ua.source)]
