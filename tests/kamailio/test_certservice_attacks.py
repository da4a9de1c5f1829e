"""The certificate service (docs/protocol.md §11) against the attackers of
docs/threat-model.md, on the wire: real Kamailio on loopback, each attacker a socket
on a loopback address of its own (a forged source address on loopback is the same as
a real one: the proxy sees only the datagram).

Each test is written as the attack; its docstring says what the attack did on the
code as first committed (ec351b6) and what it does now.  The figures are printed
(``pytest -s``) and copied into docs/threat-model.md.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certclient import CertClient, cert_rows, closed_and_forgotten
from e2m_lab.kamailio_harness import ProxyHandle, SipUa, start_proxy
from kamailio_app.cert_route import UNANSWERED
from kamailio_app.cert_table import EVICTABLE_AFTER
from e2m_plugins.sip import frame_length, make_response, parse
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
BOB = "sip:bob@example.com"
_sources = iter(range(2, 250))


def source() -> str:
    """A fresh loopback address (127.0.1.x: apart from the other certificate tests')."""
    return f"127.0.1.{next(_sources)}"


def der_of(cred) -> bytes:
    return cred.cert.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("certs-attacks"), pki=pki, e2m=True,
                        auth=True, users=USERS,
                        extra={"certs": {"notify_interval": 2, "min_expires": 2}})
    yield proxy
    proxy.stop()


@pytest.fixture
def made(home: ProxyHandle) -> Iterator[list]:
    """Everything a test opens (clients, sockets) is closed after it; the tables are
    emptied."""
    with closed_and_forgotten(home) as things:
        yield things


def client(home: ProxyHandle, made: list, user: str, password: bool = False,
           **kwargs) -> CertClient:
    one = CertClient(home.port, user, password=USERS[user] if password else None,
                     source=source(), **kwargs)
    made.append(one)
    return one


def publish(home: ProxyHandle, made: list, body: bytes) -> str:
    answer = client(home, made, "bob", password=True).publish(body)
    assert answer is not None and answer.status == 200, answer
    return answer.get("SIP-ETag") or ""


rows = cert_rows


def never_accepting(host: str, port: int) -> list[socket.socket]:
    """A TCP listener at ``host:port`` whose accept queue is already full, so the
    proxy's connect there never completes (a forged source that never answers); the
    sockets, for the caller to close."""
    hole = socket.socket()
    hole.bind((host, port))
    hole.listen(0)
    out = [hole]
    for _ in range(2):                        # fill its accept queue
        filler = socket.socket()
        out.append(filler)
        filler.setblocking(False)
        try:
            filler.connect((host, port))
        except BlockingIOError:
            pass
    return out


def large_certificate(pki: TestPKI, aor: str, size: int, pad: int = 80) -> bytes:
    """A certificate of ``aor`` of about ``size`` octets (more SAN URIs, each ``pad``
    characters longer than an AoR; at most 100 SAN entries are taken)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.UniformResourceIdentifier(aor)] + [
        x509.UniformResourceIdentifier(f"sip:alias{i:03d}-{'x' * pad}@example.com")
        for i in range(size // (pad + 30))]
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "big")]))
            .issuer_name(pki.ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=9))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(pki.ca.key, hashes.SHA256()))
    return cert.public_bytes(Encoding.DER)


def minimal_subscribe(ua: SipUa, aor: str = BOB, expires: int = 0) -> bytes:
    """The smallest SUBSCRIBE the service answers (what a reflector's user sends)."""
    request = ua.build("SUBSCRIBE", aor, to=aor, headers=[
        ("Event", "certificate"), ("Contact", f"<sip:{ua.source}:{ua.local_port}>"),
        ("Expires", str(expires))])
    return request.replace("Via", ua.via()).serialize()


def reflected(home: ProxyHandle, made: list, seconds: float = 4.5) -> tuple[int, int, list]:
    """A victim at a loopback address that never answers: one SUBSCRIBE ``from`` it,
    then every datagram that reaches it within ``seconds``: past tm's last retransmission
    before fr_timer (at 0.5, 1.5 and 3.5 s with T1 = 0.5 s; 1 and 3 s with T1 = 1 s).
    (octets sent, octets received, the datagrams)."""
    victim = SipUa(home.port, user="carol", source=source())
    made.append(victim)
    sent = minimal_subscribe(victim)
    victim.sock.sendto(sent, ("127.0.0.1", home.port))
    datagrams = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        victim.sock.settimeout(left)
        try:
            datagrams.append(victim.sock.recv(65535))
        except (socket.timeout, TimeoutError):
            break
    return len(sent), sum(len(d) for d in datagrams), datagrams


# -- off-path sender: reflection -------------------------------------------------------

def test_reflection_of_a_fetch_is_bounded(home, made, pki):
    """Off-path sender, forged source: one UDP fetch (Expires: 0) "from" a victim that
    never answers.  Before: the 200 and the NOTIFY with the certificate, retransmitted
    by tm every 0.5, 1, 2 s until fr_timer (5 s): 4 NOTIFYs, about 11x the SUBSCRIBE
    in octets with a P-256 certificate.  Now: the NOTIFYs the proxy makes itself are
    given up after 2.5 s with T1 = 1 s (tm's local-request event): 2 copies."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    sent, received, datagrams = reflected(home, made)
    notifies = [d for d in datagrams if d.startswith(b"NOTIFY ")]
    print(f"\nreflection, P-256 certificate: {sent} octets sent, {received} received "
          f"({received / sent:.1f}x), {len(notifies)} NOTIFYs")
    assert len(notifies) <= 2, len(notifies)
    assert received / sent < 8


def test_reflection_of_a_large_certificate_never_goes_over_udp(home, made, pki):
    """A NOTIFY above 1300 octets must go over a congestion-controlled transport (RFC
    3261 §18.1.1).  Before: a 10 KiB certificate went over UDP (fragmented), 4 times:
    some 40 KiB toward the victim for one SUBSCRIBE of ~300 octets (~140x).  Now: the
    certificate waits until the subscriber answered a small NOTIFY (``pending``, no
    body) at its address, then goes over TCP; a forged source never answers: it gets
    the 200 and the small NOTIFY (twice), and the proxy never connects to it."""
    publish(home, made, large_certificate(pki, BOB, 10 * 1024))
    sent, received, datagrams = reflected(home, made)
    notifies = [parse(d) for d in datagrams if d.startswith(b"NOTIFY ")]
    print(f"\nreflection, 10 KiB certificate: {sent} octets sent, {received} received "
          f"over UDP ({received / sent:.1f}x), {len(notifies)} NOTIFYs without body")
    assert notifies and all(n.body == b"" for n in notifies)
    assert all((n.get("Subscription-State") or "").startswith("pending") for n in notifies)
    assert received / sent < 5


def test_a_large_certificate_reaches_a_udp_subscriber_over_tcp(home, made, pki):
    """The other side of the rule above: a subscriber on UDP that listens on TCP at the
    same port (RFC 3261 §18.2.1 says it must) answers the small NOTIFY and then gets
    the 10 KiB certificate over TCP, byte-exact, in the fetch's final NOTIFY."""
    body = large_certificate(pki, BOB, 10 * 1024)
    publish(home, made, body)
    ua = SipUa(home.port, user="carol", source=source())
    made.append(ua)
    listener = socket.socket()
    made.append(listener)
    listener.bind((ua.source, ua.local_port))
    listener.listen(1)
    listener.settimeout(5)
    ua.sock.sendto(minimal_subscribe(ua), ("127.0.0.1", home.port))
    answer = ua.receive(3)
    assert answer is not None and answer.status == 200, answer
    assert answer.get("Expires") == "0"
    first = ua.receive(3)
    assert first is not None and first.method == "NOTIFY" and first.body == b""
    assert (first.get("Subscription-State") or "").startswith("pending")
    ua.send(make_response(first, 200, "OK"))
    conn, _ = listener.accept()
    made.append(conn)
    conn.settimeout(5)
    data = b""
    while (length := frame_length(data) if data else None) is None or len(data) < length:
        chunk = conn.recv(65535)
        assert chunk, "the proxy closed the connection before a whole NOTIFY"
        data += chunk
    notify = parse(data[:frame_length(data)])
    assert notify.method == "NOTIFY" and notify.body == body
    assert "TCP" in (notify.get("Via") or "").upper()
    assert (notify.get("Subscription-State") or "").startswith("terminated")
    assert notify.call_id == first.call_id and notify.cseq[0] == first.cseq[0] + 1
    conn.sendall(make_response(notify, 200, "OK").serialize())


# -- off-path sender: a forged 481 ------------------------------------------------------

def test_a_forged_481_does_not_end_someone_elses_subscription(home, made, pki):
    """Off-path sender (here told the dialog's identifiers: Call-ID and tags, which a
    hop or an eavesdropper sees): a reply ``481`` to "our NOTIFY", sent to the proxy
    from anywhere with any Via branch.  Before: the core reply route ran the service's
    481 handling for every reply, transaction or not: the subscription was deleted.
    Now only a reply tm matched to one of our own NOTIFY transactions counts."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    alice = client(home, made, "alice")
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None
    [notify] = alice.wait_notifies(1)
    forged = make_response(notify, 481, "Call/Transaction Does Not Exist")
    forged = forged.replace("Via", f"SIP/2.0/UDP 127.0.0.1:{home.port};"
                                   "branch=z9hG4bKforged481")
    attacker = SipUa(home.port, user="carol", source=source())
    made.append(attacker)
    attacker.send(forged)
    time.sleep(0.5)
    left = rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                dialog.call_id)
    assert left == [(1,)], "a forged 481 ended alice's subscription"


# -- an eavesdropper / hop that saw one SUBSCRIBE ---------------------------------------

def test_a_replayed_subscribe_from_elsewhere_does_not_take_the_subscription(home, made, pki):
    """Untrusted hop (or anyone who saw alice's SUBSCRIBE): the same SUBSCRIBE, octet
    for octet, sent again from another address once tm forgot the transaction.  tm's
    To tag is a function of the Via (CRC of host, port, branch), so the replay names
    alice's dialog.  Before: "renewed" it: the subscription's source and first hop
    became the attacker's, and alice's NOTIFYs went there.  Now: 403, nothing moves."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    alice = client(home, made, "alice")
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None
    alice.wait_notifies(1)
    seen = alice.subscribes[-1]
    time.sleep(5.5)                   # tm's wait timer: the transaction is gone
    attacker = SipUa(home.port, user="carol", source=source())
    made.append(attacker)
    attacker.send(seen.serialize())
    reply = attacker.receive(3)
    [(where, hop)] = rows(home, "SELECT source, next_hop FROM cert_subscriptions WHERE "
                                "call_id = ?", dialog.call_id)
    print(f"\nreplayed SUBSCRIBE: answered {reply.status if reply else None}, "
          f"subscription now at {where}")
    assert where == alice.ua.source and alice.ua.source in hop
    assert reply is None or reply.status >= 400


def test_a_refresh_or_unsubscribe_from_elsewhere_is_refused(home, made, pki):
    """The same attacker inside the dialog: a SUBSCRIBE with alice's Call-ID and tags
    from another address.  Before: an unsubscribe (Expires: 0) from anywhere ended
    alice's subscription.  Now: 403 unless it comes from the subscription's source."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    alice = client(home, made, "alice")
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None
    alice.wait_notifies(1)
    seen = alice.subscribes[-1]
    attacker = CertClient(home.port, "alice", source=source())
    made.append(attacker)
    unsubscribe = attacker.ua.build("SUBSCRIBE", dialog.target, to=BOB, call_id=dialog.call_id,
                                    from_tag=dialog.from_tag, to_tag=dialog.to_tag,
                                    cseq=seen.cseq[0] + 1, headers=[
                                        ("Event", "certificate"), ("Expires", "0"),
                                        ("Contact", attacker.ua.contact)])
    reply = attacker.ua.request(unsubscribe)
    assert reply is not None and reply.status == 403, reply
    assert rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                dialog.call_id) == [(1,)]
    refreshed, _ = alice.subscribe(BOB, 300, dialog=dialog)   # alice herself still can
    assert refreshed is not None and refreshed.status == 200


# -- off-path sender: filling the bounds -------------------------------------------------

def test_forged_subscriptions_do_not_hold_a_sources_places(proxy_factory, pki):
    """Off-path sender, forged source: as many SUBSCRIBEs (Expires: 3600) "from" a
    visited proxy's address as its per-source bound allows; the victim never answers
    the NOTIFYs.  Before: the places were held for the whole hour: every user behind
    that address got 403 Too Many Subscriptions.  Now: at a full bound, a subscription
    whose NOTIFY has gone unanswered for a second makes room; and the timer drops
    every subscription none of whose NOTIFYs was answered 2xx once its NOTIFY's
    transaction is over (RFC 6665 §4.2.2; 2.5 s, swept 4 s after).  An answering
    subscription stays."""
    proxy = proxy_factory("forged-bounds", e2m=True, auth=True, users=USERS,
                          extra={"certs": {"max_subscriptions_per_source": 4}})
    things: list = []
    try:
        victim = SipUa(proxy.port, user="carol", source=source())
        things.append(victim)
        for _ in range(4):
            victim.sock.sendto(minimal_subscribe(victim, expires=3600),
                               ("127.0.0.1", proxy.port))
        time.sleep(0.3)
        assert rows(proxy, "SELECT count(*) FROM cert_subscriptions") == [(4,)]
        # the real user behind that address (same address, another port) follows bob
        real = CertClient(proxy.port, "alice", source=victim.source)
        things.append(real)
        refused, _ = real.subscribe(BOB, 3600)
        assert refused is not None and refused.status == 403    # within the second...
        time.sleep(EVICTABLE_AFTER + 0.2)
        answer, _ = real.subscribe(BOB, 3600)                    # ...then room is made
        print(f"\n4 forged subscriptions from {victim.source}: the real user refused "
              f"for {EVICTABLE_AFTER} s, then served")
        assert answer is not None and answer.status == 200, answer
        assert len(real.wait_notifies(1)) == 1
        deadline = time.monotonic() + UNANSWERED + 3
        while rows(proxy, "SELECT count(*) FROM cert_subscriptions") != [(1,)] \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rows(proxy, "SELECT source FROM cert_subscriptions") == [(victim.source,)]
        time.sleep(1.5)                                          # the answering one stays
        assert rows(proxy, "SELECT count(*) FROM cert_subscriptions") == [(1,)]
    finally:
        for thing in things:
            thing.close()


def test_a_forged_2xx_does_not_confirm_a_forged_subscription(home, made, pki):
    """The forger of a subscription (from a victim's address, which never answers)
    also forges the 200 to its NOTIFY, from its own address: it knows the Call-ID and
    From tag it chose and can work out tm's To tag (read here from the table in its
    stead), not the NOTIFY's Via branch.  Result: the forged 200 matches no
    transaction of ours, the subscription stays unconfirmed and is dropped."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    victim = SipUa(home.port, user="carol", source=source())
    made.append(victim)
    forged = parse(minimal_subscribe(victim, expires=3600))
    victim.sock.sendto(forged.serialize(), ("127.0.0.1", home.port))
    time.sleep(0.3)
    [(local_tag,)] = rows(home, "SELECT local_tag FROM cert_subscriptions WHERE call_id = ?",
                          forged.call_id)
    notify_like = forged.replace("CSeq", "1 NOTIFY")
    answer = make_response(notify_like, 200, "OK")
    answer = answer.replace("From", f"<{BOB}>;tag={local_tag}") \
                   .replace("To", f"<{victim.aor}>;tag={forged.from_tag}") \
                   .replace("Via", f"SIP/2.0/UDP 127.0.0.1:{home.port};branch=z9hG4bKguess1")
    attacker = SipUa(home.port, user="carol", source=source())
    made.append(attacker)
    attacker.send(answer)
    deadline = time.monotonic() + UNANSWERED + 3
    while rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
               forged.call_id) != [(0,)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                forged.call_id) == [(0,)]


def test_a_target_refresh_cannot_aim_notifies_at_a_victim(home, made, pki):
    """Insider UA: alice refreshes her subscription with a Contact naming a victim.
    The Request-URI of later NOTIFYs becomes the victim's URI, but they still go to
    alice's address (the first hop never moves): the victim receives nothing."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    victim = SipUa(home.port, user="carol", source=source())
    made.append(victim)
    alice = client(home, made, "alice")
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None
    alice.wait_notifies(1)
    aimed = f"<sip:victim@{victim.source}:{victim.local_port}>"
    refresh = alice.ua.build("SUBSCRIBE", dialog.target, to=BOB, call_id=dialog.call_id,
                             from_tag=dialog.from_tag, to_tag=dialog.to_tag,
                             headers=[("Event", "certificate"), ("Expires", "600"),
                                      ("Contact", aimed)])
    refreshed = alice.ua.request(refresh)
    assert refreshed is not None and refreshed.status == 200, refreshed
    notifies = alice.wait_notifies(2)
    assert len(notifies) == 2 and notifies[1].request_uri.startswith("sip:victim@")
    victim.sock.settimeout(1.0)
    try:
        stray = victim.sock.recv(65535)
    except (socket.timeout, TimeoutError):
        stray = b""
    assert stray == b""


def test_real_subscribers_at_many_addresses_fill_one_aors_followers(proxy_factory, pki):
    """Insider or any stranger with several addresses, answering the NOTIFYs: 5
    addresses x 2 subscriptions fill the per-AoR bound (here 10; 100 by default, 5
    addresses x 20).  Result: it works, for as long as they refresh (the bound is what
    bounds a publisher's fan-out).  A fetch is never refused, so an honest subscriber
    can still get the certificate; it only cannot follow it."""
    proxy = proxy_factory("fill-aor", e2m=True, auth=True, users=USERS,
                          extra={"certs": {"max_subscriptions_per_aor": 10,
                                           "max_subscriptions_per_source": 2}})
    things: list = []
    try:
        for _ in range(5):
            one = CertClient(proxy.port, "carol", source=source())
            things.append(one)
            for _ in range(2):
                assert one.subscribe(BOB, 3600)[0].status == 200
        honest = CertClient(proxy.port, "alice", source=source())
        things.append(honest)
        assert honest.subscribe(BOB, 3600)[0].status == 403
        assert honest.subscribe(BOB, 0)[0].status == 200          # the fetch still works
    finally:
        for thing in things:
            thing.close()


# -- untrusted hop: a replayed PUBLISH ---------------------------------------------------

def test_a_replayed_publish_is_not_taken(home, made, pki):
    """Untrusted hop: bob's authenticated PUBLISH of his old certificate, replayed
    after he published a new one.  Kamailio's digest is one-time (qop=auth with nonce
    counting): the replay is challenged, bob's new certificate stays."""
    old, new = der_of(pki.user("bob", "ec")), der_of(pki.user("bob", "ec"))
    bob = client(home, made, "bob", password=True)
    first = bob.publish(old)
    assert first is not None and first.status == 200
    replayed = bob.ua.sent[-1]
    if new == old:
        from e2m_plugins.testpki import issue_user
        new = der_of(issue_user(pki.ca, BOB, "ec"))
    second = bob.publish(new, etag=first.get("SIP-ETag"))
    assert second is not None and second.status == 200
    hop = SipUa(home.port, user="bob", source=source())
    made.append(hop)
    answer = hop.transact(replayed)
    assert answer is not None and answer.status in (401, 407), answer
    [(stored,)] = rows(home, "SELECT der FROM cert_publications WHERE aor = ?", BOB)
    assert bytes(stored) == new


# -- storage -----------------------------------------------------------------------------

def test_a_locked_database_is_answered_500_and_the_worker_serves_on(home, made, pki):
    """Another process holds the write lock of the service's SQLite file (a stuck
    ``e2m-proxy certs``, a backup): a PUBLISH and a follow get 500 with Retry-After
    within the busy timeout, and once the lock is gone the service works."""
    db = sqlite3.connect(home.directory / "certs.sqlite", isolation_level=None)
    made.append(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        bob = client(home, made, "bob", password=True)
        started = time.monotonic()
        answer = bob.publish(der_of(pki.user("bob", "ec")))
        took = time.monotonic() - started
        assert answer is not None and answer.status == 500 and answer.get("Retry-After")
        assert took < 2.5
        alice = client(home, made, "alice")
        follow, _ = alice.subscribe(BOB, 600)
        assert follow is not None and follow.status == 500
    finally:
        db.execute("ROLLBACK")
    assert bob.publish(der_of(pki.user("bob", "ec"))).status == 200


def test_hostile_text_in_dialog_identifiers_is_stored_as_text(home, made, pki):
    """SQL in a Call-ID, a From tag and an Event id (all parameters: nothing is
    pasted into SQL).  The subscription is kept with the text as sent."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    ua = SipUa(home.port, user="carol", source=source())
    made.append(ua)
    call_id = "x');DROP-TABLE-cert_subscriptions;--@h"
    request = ua.build("SUBSCRIBE", BOB, to=BOB, call_id=call_id, from_tag="t'or'1'='1",
                       headers=[("Event", "certificate;id=a'b"), ("Expires", "600"),
                                ("Contact", ua.contact)])
    answer = ua.transact(request)
    assert answer is not None and answer.status in (200, 400), answer
    names = {r[0] for r in rows(home, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"cert_subscriptions", "cert_publications"} <= names
    if answer.status == 200:
        assert rows(home, "SELECT remote_tag FROM cert_subscriptions WHERE call_id = ?",
                    call_id) == [("t'or'1'='1",)]


def test_forged_large_fetches_do_not_take_the_proxys_tcp_connections(proxy_factory, pki):
    """Off-path sender, forged sources whose hosts never answer TCP's handshake (a
    black-holed range; here: a listener whose accept queue is full, so its kernel
    drops further SYNs): UDP fetches of a large certificate, each of which makes the
    proxy connect to the forged address over TCP (RFC 3261 §18.1.1).  Each pending
    connect holds one of the proxy's tcp_max_connections until tcp_connect_timeout.
    With the TCP rule alone (the first fix of the reflection): 6 such fetches took all
    4 connections, a real user's TCP fetch got no answer.  Now the proxy connects only
    to an address that answered a small NOTIFY over UDP: nothing is held."""
    proxy = proxy_factory("tcp-slots", e2m=True, auth=True, users=USERS,
                          limits={"tcp_max_connections": 4})
    things: list = []
    try:
        bob = CertClient(proxy.port, "bob", password=USERS["bob"], source=source())
        things.append(bob)
        assert bob.publish(large_certificate(pki, BOB, 4 * 1024)).status == 200
        for _ in range(6):
            forged = SipUa(proxy.port, user="carol", source=source())
            things.append(forged)
            things += never_accepting(forged.source, forged.local_port)
            forged.sock.sendto(minimal_subscribe(forged), ("127.0.0.1", proxy.port))
        time.sleep(1.0)
        real = CertClient(proxy.port, "alice", source=source(), transport="tcp")
        things.append(real)
        answer, _ = real.subscribe(BOB, 0)
        print(f"\nafter 6 forged large fetches: a real TCP fetch got "
              f"{answer.status if answer else None}")
        assert answer is not None and answer.status == 200, answer
        assert len(real.wait_notifies(1)) == 1
    finally:
        for thing in things:
            thing.close()


def test_a_certificate_at_the_16_kib_limit_and_one_past_it(home, made, pki):
    """Storage bound: a certificate just under 16 KiB is taken and fetched byte-exact
    over TCP (through Kamailio's PV buffer as base64, 22 KiB); one just past it is
    refused (403, nothing stored)."""
    under = large_certificate(pki, BOB, 16300, pad=200)
    over = large_certificate(pki, BOB, 16700, pad=200)
    assert len(under) <= 16 * 1024 < len(over)
    bob = client(home, made, "bob", password=True, transport="tcp")
    refused = bob.publish(over)
    assert refused is not None and refused.status == 403, refused
    assert rows(home, "SELECT count(*) FROM cert_publications") == [(0,)]
    answer = bob.publish(under)
    assert answer is not None and answer.status == 200, answer
    carol = client(home, made, "carol", transport="tcp")
    fetched, _ = carol.subscribe(BOB, 0)
    assert fetched is not None and fetched.status == 200
    [notify] = carol.wait_notifies(1)
    assert notify.body == under


def test_a_record_route_asking_for_tcp_does_not_make_the_proxy_connect(proxy_factory, pki):
    """Off-path sender, forged sources as above, but small fetches whose Record-Route
    names the forged address itself with ``transport=tcp``: the first hop is "the
    source" (the rule against third parties holds), yet the NOTIFY would make the
    proxy connect over TCP to an address that never answered.  Before: 6 such fetches
    took all 4 TCP connections of a test proxy (a real user's TCP fetch: no answer).
    Now: a top Record-Route must ask for the transport the SUBSCRIBE came on (403)."""
    proxy = proxy_factory("tcp-slots-rr", e2m=True, auth=True, users=USERS,
                          limits={"tcp_max_connections": 4})
    things: list = []
    try:
        bob = CertClient(proxy.port, "bob", password=USERS["bob"], source=source())
        things.append(bob)
        assert bob.publish(der_of(pki.user("bob", "ec"))).status == 200
        answers = []
        for _ in range(6):
            forged = SipUa(proxy.port, user="carol", source=source())
            things.append(forged)
            things += never_accepting(forged.source, forged.local_port)
            request = forged.build("SUBSCRIBE", BOB, to=BOB, headers=[
                ("Event", "certificate"), ("Contact", f"<sip:{forged.source}:{forged.local_port}>"),
                ("Expires", "0"),
                ("Record-Route", f"<sip:{forged.source}:{forged.local_port};transport=tcp;lr>")])
            forged.sock.sendto(request.replace("Via", forged.via()).serialize(),
                               ("127.0.0.1", proxy.port))
            answer = forged.receive(2)
            answers.append(answer.status if answer is not None else None)
        time.sleep(1.0)
        real = CertClient(proxy.port, "alice", source=source(), transport="tcp")
        things.append(real)
        answer, _ = real.subscribe(BOB, 0)
        print(f"\nforged fetches with a TCP Record-Route answered {answers}; then a real "
              f"TCP fetch got {answer.status if answer else None}")
        assert answer is not None and answer.status == 200, answer
        assert set(answers) == {403}
    finally:
        for thing in things:
            thing.close()
