"""Review 132 (attacker's review of 85ea3f7), certificate NOTIFYs that need another
transport than the subscription's: a SUBSCRIBE made over UDP whose NOTIFY must go over
TCP (RFC 3261 18.1.1), told to a real ``e2m-phone`` (pjsua2).

**Honest break HB2: a real UDP phone is never told a certificate too large for a UDP
NOTIFY.**

- Who: nobody hostile.  bob replaces his certificate with an RSA-4096 one (934 octets
  of DER); alice, a stock ``e2m-phone`` registered over UDP (its only transport), follows
  bob at the home proxy's certificate service.
- Set-up: the fixtures of ``tests/e2e/test_cert_discovery.py`` (real Kamailio with the
  certificate service, ``notify_interval`` 2 s; real phones, UDP).  bob (EC) publishes;
  alice sends him a MESSAGE (she fetches and follows his certificate); bob restarts with
  the new certificate and publishes it (200).
- Observed (one run each): with an EC replacement (475 octets) alice's phone reports
  ``peer_certificate`` with the new fingerprint (control).  With the RSA-4096 one, none
  within 11 s (3 intervals + 5 s); Kamailio logged ``tcpconn_1st_send(): connect
  127.0.0.1:35512 failed (RST) Connection refused`` and ``tm ... Attempt to send to
  precreated request failed`` for alice's port (and the same for a second port): the
  NOTIFY, above 1300 octets with tm's additions, went to TCP at the phone's UDP port,
  where pjsua2 has no listener.  alice keeps sealing for bob's old key (a key he no
  longer holds, or one that was compromised) until something else tells her (bob's
  493 carrying his certificate).  The same holds for a first follow: the confirmed
  NOTIFY carrying any certificate above ~1140 octets of DER never reaches a UDP phone.
- Code at fault: ``e2m_plugins/notifier.py:198-209`` (``next_hop_for_size`` moves a
  large NOTIFY to ``transport=tcp`` at the subscriber's UDP address, RFC 3261
  18.1.1/18.2.1 assume the UAS listens on TCP at that port), with
  ``kamailio_app/cert_route.py:329-341`` (``_notify`` has no other way); on the phone
  side ``pjsua_hooks/endpoint.py`` creates one transport of the configured kind (no TCP
  listener for a UDP phone).  The threat-model row (docs/threat-model.md:333, "a real
  subscriber on UDP ... gets the certificate over TCP on the same port") was shown with
  a raw socket that listens on TCP, not with the product's phone.
- Suggested fix: either the phone also listens on TCP at its UDP port (RFC 3261
  18.2.1; and its ``ProxySource`` must then take a TCP NOTIFY from the proxy's address
  at any port, as it does for a TCP phone), or the service sends the large certificate
  to a UDP subscriber that has not shown a TCP listener as a NOTIFY without the body and
  a ``cert-url`` (HTTP fetch, which the phone already does for proxies), or over UDP
  once the subscriber confirmed (answered) from that address.

Controls (unmarked, pass): ``test_..._reaches_a_udp_follower[ec]``: the same flow with
an EC replacement; alice is told the new fingerprint.

Tried and held: see ``tests/unit/test_review132_late_call_keys.py``.

Fixed (stop 43), HB2: a UDP phone also listens on TCP at its UDP address and port
(RFC 3261 18.2.1; ``SipEndpoint.add_udp_with_tcp``, ``[phone] udp_tcp_listener``,
default on).  The TCP guard of a TCP phone bounds that listener (connections, idle and
half-sent ones, the SYN gate); ``tcp_accept`` defaults to true on a UDP phone, since the
listener exists for the proxy to connect to.  The hook says whether a message came over
TCP (``RawSipHook.rx_over_tcp``), and ``ProxySource.matches(source, tcp=True)`` then
compares the proxy's address alone, as for a TCP phone: the certificate client takes
the large NOTIFY from the proxy's address at any source port, a request over TCP from
another address is still a stranger's (403).  A MESSAGE taken over that listener is
held to the TCP rule of ``FirstCopy`` (pjsip ends its transaction with the answer).
The account stays bound to UDP: Via and Contact say UDP, and pjsip's own switch to TCP
for a large request is skipped.  Measured (one run): the RSA-4096 replacement (934
octets of DER) reached alice within about 0.8 s of bob's publication, over a TCP
connection her phone accepted (``accepted`` 1); the EC control still comes over UDP
(``accepted`` 0).  The strict xfail is gone; the listener's own attacks are in
``tests/e2e/test_udp_phone_tcp_listener.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.kamailio_harness import ProxyHandle
from e2m_plugins.testpki import TestPKI, issue_user, write_credential
from tests.e2e.test_cert_discovery import (BOB, INTERVAL, fingerprint, group, home,  # noqa: F401
                                           pki, send, ua)

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.slow]


def _replace_bob(tmp_path: Path, pki: TestPKI, group, home: ProxyHandle, bob, kind: str):
    new_dir = tmp_path / f"bob-{kind}"
    new_dir.mkdir()
    key = rsa.generate_private_key(65537, 4096) if kind == "rsa4096" else None
    cred = issue_user(pki.ca, BOB, "rsa" if key is not None else "ec", key=key)
    write_credential(cred, new_dir, "bob")
    (new_dir / "ca.crt").write_bytes((pki.directory / "ca.crt").read_bytes())
    bob.stop()
    group.running.remove(bob)
    (tmp_path / f"v-{kind}").mkdir()
    bob2 = group.start("bob", ua(tmp_path / f"v-{kind}", "bob", new_dir, home))
    assert bob2.wait("certificate_published", timeout=10)["fingerprint"] == fingerprint(cred.cert)
    return cred


def _flow(tmp_path, pki, home, group, kind: str) -> tuple[int, bool, int]:
    """(the new certificate's DER size, whether alice's phone was told it, TCP connections
    alice's phone accepted: the NOTIFY's way in when it is above 1300 octets)."""
    bob = group.start("bob", ua(tmp_path, "bob", pki.directory, home))
    bob.wait("certificate_published", timeout=10)
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home))
    alice.wait("certificate_published", timeout=10)
    assert send(alice, BOB, "hello-bob")["kind"] == "message_sent"
    alice.wait("peer_certificate", lambda e: e["aor"] == BOB)   # she follows bob
    mark = alice.mark()
    cred = _replace_bob(tmp_path, pki, group, home, bob, kind)
    new_fp = fingerprint(cred.cert)
    try:
        alice.wait("peer_certificate", lambda e: e["aor"] == BOB and e["fingerprint"] == new_fp,
                   since=mark, timeout=3 * INTERVAL + 5)
        told = True
    except AssertionError:
        told = False
    tcp = alice.status()["tcp"]
    return len(cred.cert.public_bytes(Encoding.DER)), told, tcp["accepted"] if tcp else 0


def test_control_a_replaced_certificate_reaches_a_udp_follower_ec(tmp_path, pki, home, group):
    size, told, accepted = _flow(tmp_path, pki, home, group, "ec")
    assert size < 600 and told
    assert accepted == 0        # every NOTIFY fits UDP


def test_hole_hb2_a_large_replaced_certificate_reaches_a_udp_follower(tmp_path, pki, home,
                                                                      group):
    size, told, accepted = _flow(tmp_path, pki, home, group, "rsa4096")
    assert size > 900
    assert told
    assert accepted >= 1        # the large NOTIFY came in over the phone's TCP listener
