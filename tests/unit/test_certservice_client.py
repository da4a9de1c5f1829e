"""The phone's certificate-service client (pjsua_hooks/certservice_client.py) without
pjsua: a real UA engine and test PKI, the SIP pjsua would hand the hook written out.

What it must hold: a NOTIFY is used only in a dialog we opened and only from our
proxy; what it carries goes through the engine's checks; state is bounded in count
and age; our PUBLISH leaves as a certificate PUBLISH no longer than notAfter.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_lab.flows import ua_engine
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import MissingPeerCertificateError
from pjsua_hooks import certservice_client as csc
from pjsua_hooks.certservice_client import CertServiceClient, NotifyAnswer

ALICE, BOB, CAROL = "sip:alice@example.com", "sip:bob@example.com", "sip:carol@example.com"


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def setup(pki):
    made = subscriber(pki)
    return made.engine, made.client, made.clock, made.sent


def der(pki, name: str) -> bytes:
    return pki.user(name).cert.public_bytes(Encoding.DER)


def want(engine, aor: str) -> None:
    """What makes the engine want a peer: a MESSAGE it cannot seal."""
    msg = sip.make_request("MESSAGE", aor, from_uri=ALICE, to_uri=aor, body=b"hi",
                           content_type="text/plain")
    with pytest.raises(MissingPeerCertificateError):
        engine.protect(msg)


def go_out(client: CertServiceClient, aor: str, headers) -> sip.SipMessage:
    """The SUBSCRIBE pjsua would build from ``send_subscribe``, through the hook."""
    request = sip.make_request("SUBSCRIBE", aor, from_uri=ALICE, to_uri=aor,
                               extra_headers=[*headers, ("Accept", "application/sdp"),
                                              ("Route", "<sip:127.0.0.1:5999;lr>")])
    out = client.on_tx(request)
    assert out is not None
    return sip.parse(out)


def notify_for(sub: sip.SipMessage, body: bytes, *, sender: str | None = None,
               state: str = "active;expires=3600", to_tag: str = "srv1") -> sip.SipMessage:
    return sip.make_request(
        "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=sender or sub.get("To").strip("<>"),
        to_uri=ALICE, call_id=sub.call_id, from_tag=to_tag, to_tag=sub.from_tag,
        extra_headers=[("Event", "certificate"), ("Subscription-State", state)],
        body=body, content_type="application/pkix-cert" if body else None)


def answer(client, notify, source=PROXY) -> int:
    with pytest.raises(NotifyAnswer) as caught:
        client.on_rx(notify, source)
    return caught.value.code


def subscribe_to_bob(engine, client, sent):
    want(engine, BOB)
    client.tick()
    assert [aor for aor, _ in sent] == [BOB]
    return go_out(client, BOB, sent[-1][1])


def test_the_subscribe_on_the_wire(pki, setup):
    engine, client, clock, sent = setup
    sub = subscribe_to_bob(engine, client, sent)
    assert sub.get("Event") == "certificate" and sub.get("Expires") == "3600"
    assert sub.get("Accept") == "application/pkix-cert"
    assert sub.get("Contact") == "<sip:alice@127.0.0.1:5070>"
    assert not sub.has(csc.MARKER)
    assert client.pending(BOB)


def test_a_checked_certificate_is_kept_and_an_empty_notify_drops_it(pki, setup):
    engine, client, clock, sent = setup
    sub = subscribe_to_bob(engine, client, sent)
    assert answer(client, notify_for(sub, der(pki, "bob"))) == 200
    assert engine.certs.user(BOB) is not None and not client.pending(BOB)
    kinds = [e["kind"] for e in client.events]
    assert "peer_certificate" in kinds
    assert answer(client, notify_for(sub, b"")) == 200
    assert engine.certs.user(BOB) is None
    assert "removed" in client.failure(BOB)


def test_a_notify_in_no_dialog_of_ours_is_481_and_unread(pki, setup):
    """Even while a fetch for that very AoR waits: another Call-ID is another dialog."""
    engine, client, clock, sent = setup
    subscribe_to_bob(engine, client, sent)
    stranger = sip.make_request("NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=BOB,
                                to_uri=ALICE, to_tag="guess",
                                extra_headers=[("Event", "certificate"),
                                               ("Subscription-State", "active")],
                                body=der(pki, "bob"), content_type="application/pkix-cert")
    assert answer(client, stranger) == 481
    assert engine.certs.user(BOB) is None and client.pending(BOB)


def test_a_notify_from_another_address_than_our_proxy_is_481(pki, setup):
    engine, client, clock, sent = setup
    sub = subscribe_to_bob(engine, client, sent)
    assert answer(client, notify_for(sub, der(pki, "bob")), source=("127.0.0.9", 5999)) == 481
    assert engine.certs.user(BOB) is None and client.pending(BOB)


@pytest.mark.parametrize("body,sender,check", [
    ("carol", None, "is not for sip:bob@example.com"),
    ("carol", CAROL, "came from sip:carol@example.com"),
    ("garbage", None, "not a readable certificate"),
])
def test_what_the_checks_refuse_is_never_used(pki, setup, body, sender, check):
    engine, client, clock, sent = setup
    sub = subscribe_to_bob(engine, client, sent)
    data = der(pki, "carol") if body == "carol" else b"\x30\x82garbage"
    assert answer(client, notify_for(sub, data, sender=sender)) == 200
    assert engine.certs.user(BOB) is None and engine.certs.user(CAROL) is None
    assert check in client.failure(BOB)


def test_fetches_are_bounded_and_time_out(pki, setup):
    engine, client, clock, sent = setup
    for n in range(csc.MAX_PENDING + 10):
        want(engine, f"sip:user{n}@example.com")
    client.tick()
    assert len(sent) == csc.MAX_PENDING
    assert client.stats()["pending"] == csc.MAX_PENDING
    clock.now += csc.FETCH_TIMEOUT + 1
    client.tick()
    assert client.stats()["subscriptions"] <= csc.MAX_FOLLOWED
    assert "did not answer" in client.failure("sip:user0@example.com")
    assert len(client._failures) <= csc.MAX_OUTCOMES
    clock.now += csc.OUTCOME_MAX_AGE + 1
    client.tick()
    assert client.failure("sip:user0@example.com") is None


def test_a_followed_peer_is_renewed_and_the_old_dialog_then_refused(pki, setup):
    engine, client, clock, sent = setup
    old = subscribe_to_bob(engine, client, sent)
    ok = sip.make_response(old, 200, "OK", extra_headers=[("Expires", "100")])
    assert client.on_rx(ok, PROXY) is True
    # the dialog is the 200's To tag: a NOTIFY from another tag is not ours
    assert answer(client, notify_for(old, der(pki, "bob"), to_tag="other")) == 481
    assert answer(client, notify_for(old, der(pki, "bob"), state="active;expires=100",
                                     to_tag=ok.to_tag)) == 200
    client.touch(BOB)
    clock.now += 85
    client.touch(BOB)
    client.tick()
    assert len(sent) == 2
    client.tick()
    assert len(sent) == 2                  # one renewal at a time
    new = go_out(client, BOB, sent[-1][1])
    assert new.call_id != old.call_id
    assert answer(client, notify_for(new, der(pki, "bob"), to_tag="srv2")) == 200
    assert answer(client, notify_for(old, der(pki, "bob"), to_tag=ok.to_tag)) == 481


def test_our_publish_leaves_as_a_certificate_publish(pki, setup):
    engine, client, clock, sent = setup
    pidf = sip.make_request("PUBLISH", ALICE, from_uri=ALICE, to_uri=ALICE,
                            extra_headers=[("Event", "presence"), ("Accept", "x/y")],
                            body=b"<presence/>", content_type="application/pidf+xml")
    out = sip.parse(client.on_tx(pidf))
    assert out.get("Event") == "certificate"
    assert out.get("Content-Type") == "application/pkix-cert"
    assert out.get("Content-Disposition") == "signal"
    assert out.body == der(pki, "alice")
    assert 0 < int(out.get("Expires")) <= 3600
    refresh = sip.make_request("PUBLISH", ALICE, from_uri=ALICE, to_uri=ALICE,
                               extra_headers=[("Event", "presence"), ("SIP-If-Match", "e1")])
    out = sip.parse(client.on_tx(refresh))
    assert not out.body and out.get("SIP-If-Match") == "e1" and out.get("Expires")
    other = pidf.replace("To", f"<{BOB}>")
    assert client.on_tx(other) is None


def test_publish_expires_no_later_than_not_after(pki):
    from datetime import datetime, timedelta, timezone
    from e2m_plugins.testpki import issue_user

    soon = issue_user(pki.ca, ALICE, "ec", not_after=datetime.now(timezone.utc)
                      + timedelta(seconds=120))
    engine = ua_engine(pki, "alice", peers=())
    client = CertServiceClient(engine, soon.cert, send_subscribe=lambda *a: None,
                               contact=lambda: "sip:alice@127.0.0.1:5070")
    pidf = sip.make_request("PUBLISH", ALICE, from_uri=ALICE, to_uri=ALICE,
                            extra_headers=[("Event", "presence")],
                            body=b"<presence/>", content_type="application/pidf+xml")
    assert int(sip.parse(client.on_tx(pidf)).get("Expires")) <= 120


def test_over_tcp_the_proxy_is_known_by_its_address_only(pki):
    engine = ua_engine(pki, "alice", peers=())
    sent: list = []
    client = CertServiceClient(engine, pki.user("alice").cert,
                               send_subscribe=lambda aor, headers: sent.append((aor, headers)),
                               contact=lambda: "sip:alice@127.0.0.1:5070;transport=tcp",
                               proxy_address=PROXY, udp=False)
    sub = subscribe_to_bob(engine, client, sent)
    assert answer(client, notify_for(sub, der(pki, "bob")), source=("127.0.0.2", 5999)) == 481
    assert answer(client, notify_for(sub, der(pki, "bob")), source=("127.0.0.1", 40111)) == 200
    assert engine.certs.user(BOB) is not None


def test_a_peers_entry_wins(pki):
    """bob is in [peers]: nothing is fetched for him, and a certificate a NOTIFY
    brings for him (here carol's key under a fake subscription) does not replace it."""
    engine = ua_engine(pki, "alice", peers=("bob",))
    sent: list = []
    client = CertServiceClient(engine, pki.user("alice").cert,
                               send_subscribe=lambda aor, headers: sent.append((aor, headers)),
                               contact=lambda: "sip:alice@127.0.0.1:5070", proxy_address=PROXY)
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB, body=b"hi",
                           content_type="text/plain")
    engine.protect(msg)
    client.tick()
    assert sent == []
    assert client.want(BOB)                 # even if asked by hand ...
    sub = go_out(client, BOB, sent[-1][1])
    other = issue_other_bob(pki)
    assert answer(client, notify_for(sub, other)) == 200
    assert "configured in [peers]" in client.failure(BOB)
    held = engine.certs.user(BOB).public_bytes(Encoding.DER)
    assert held == der(pki, "bob")          # ... the configured one stays


def issue_other_bob(pki) -> bytes:
    from e2m_plugins.testpki import issue_user

    return issue_user(pki.ca, BOB, "ec").cert.public_bytes(Encoding.DER)


def _refuse_follow(engine, client, sent):
    follow = subscribe_to_bob(engine, client, sent)
    full = sip.make_response(follow, 403, "Too Many Subscriptions")
    assert client.on_rx(full, PROXY) is True
    return follow


@pytest.mark.parametrize("state", ["terminated;reason=timeout", "active;expires=0"])
def test_a_refused_follow_is_fetched_instead_and_not_tried_again_at_once(pki, setup, state):
    """Review 115 (stop 39): a stranger's subscriptions held bob's places at his service,
    so alice's follow got 403 and her send failed, though the service answers a fetch.
    The refused follow is replaced by a fetch (Expires: 0) at the next tick, the send
    waiting meanwhile; the fetched certificate is kept ``TERMINATED_CACHE`` s, and no
    follow is tried again for ``OUTCOME_MAX_AGE`` s (a fetch when the engine wants it)."""
    engine, client, clock, sent = setup
    _refuse_follow(engine, client, sent)
    assert client.pending(BOB) and client.failure(BOB) is None
    client.tick()
    assert len(sent) == 2 and dict(sent[-1][1])["Expires"] == "0"
    fetch = go_out(client, BOB, sent[-1][1])
    assert client.on_rx(sip.make_response(fetch, 200, "OK", extra_headers=[("Expires", "0")]),
                        PROXY) is True
    client.tick()                            # the fetch waits for its NOTIFY
    assert client.pending(BOB)
    assert answer(client, notify_for(fetch, der(pki, "bob"), state=state)) == 200
    assert engine.certs.user(BOB) is not None and not client.pending(BOB)
    client.touch(BOB)
    for _ in range(3):
        clock.now += 1
        client.tick()
    assert len(sent) == 2, "no follow storm: the refusal is remembered"
    clock.now += csc.TERMINATED_CACHE + 1
    later = time.time() + csc.TERMINATED_CACHE + 1
    engine._clock = lambda: later          # the engine keeps it by its own clock
    want(engine, BOB)                      # lapsed: wanted again
    client.tick()
    assert len(sent) == 3 and dict(sent[-1][1])["Expires"] == "0"     # fetched again
    again = go_out(client, BOB, sent[-1][1])
    assert answer(client, notify_for(again, der(pki, "bob"), state=state, to_tag="srv2")) == 200
    clock.now += csc.OUTCOME_MAX_AGE
    client.tick()
    client.touch(BOB)
    client.tick()
    assert dict(sent[-1][1])["Expires"] == "3600"                    # followed again later


def test_a_refused_fetch_fails_the_send(pki, setup):
    engine, client, clock, sent = setup
    _refuse_follow(engine, client, sent)
    client.tick()
    fetch = go_out(client, BOB, sent[-1][1])
    assert client.on_rx(sip.make_response(fetch, 403, "Forbidden"), PROXY) is True
    assert not client.pending(BOB) and "403" in client.failure(BOB)
    client.tick()
    assert len(sent) == 2


def test_a_challenge_to_a_follow_is_left_to_pjsua(pki, setup):
    """pjsua answers a 401/407 with the account's credentials in the same dialog: the
    challenge is not a refusal (it ended the subscription, and the NOTIFY after the
    retry's 200 was then refused 481; review 116 read it)."""
    engine, client, clock, sent = setup
    follow = subscribe_to_bob(engine, client, sent)
    assert client.on_rx(sip.make_response(follow, 407, "Proxy Authentication Required"),
                        PROXY) is True
    client.tick()
    assert len(sent) == 1 and client.pending(BOB) and client.failure(BOB) is None
    ok = sip.make_response(follow, 200, "OK", extra_headers=[("Expires", "3600")])
    assert client.on_rx(ok, PROXY) is True
    assert answer(client, notify_for(follow, der(pki, "bob"), to_tag=ok.to_tag)) == 200
    assert engine.certs.user(BOB) is not None and not client.pending(BOB)
