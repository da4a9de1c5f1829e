"""A sixty-fifth attacker's review (December 2026) of ef7ffd6: the phone's certificates
and what it learns (the RFC 6072 client, 496/495/493 reactions, the peer and proxy
certificate caches, ``certstore``/``certpath``).

Hole 1 - a refused message's signer certificate becomes the peer's encryption key,
past ``_refuse_older`` (``test_hole_a_replayed_old_message_plants_bobs_replaced_certificate``).

  Attacker: an untrusted hop on alice's path (the address her certificate NOTIFYs come
  from, as in review 26) holding one MESSAGE bob sent alice before he replaced his
  (compromised) certificate; the thief of that old key reads the result.
  Messages: (1) bob's real service NOTIFYs give alice his new certificate (the newest
  issue time the wire gave is noted, review 26); (2) the hop's empty NOTIFY at the same
  CSeq drops it (a hop can always deny service: review 26 made sure alice is then
  *refused*, not sealed for the old key); (3) the hop replays bob's old MESSAGE, signed
  with the replaced certificate: alice refuses it (403, a replay).
  Effect: ``UAEngine._check_signer`` runs for each part *before* the context and replay
  checks, and keeps the signer's certificate as bob's encryption certificate whenever
  none is held (``self.certs.add_user(peer, cert)``), with no ``_refuse_older`` (nor
  ``check_not_a_ca``, nor ``_note_from_wire``).  So a message alice refused plants bob's
  replaced certificate; her next MESSAGE to bob is sealed for the compromised key and
  the thief opens it.  No key of bob's is needed, only a copy of an old message of his.
  Fault: ``e2m_plugins/ua.py`` ``_check_signer`` (the ``if self.certs.user(peer) is None:
  ... add_user`` block) and its place in ``_open`` (before ``check_context`` and
  ``_check_replay``).  Fix: keep a signer's certificate only once the message was
  accepted (after ``_check_replay``, beside ``_keep_received``), and only through the
  checks the wire's other paths run: ``check_not_a_ca`` and ``_refuse_older`` against
  the held one and ``_newest_from_wire`` (and note it there).

Hole 2 - the certificate service's own ``pending`` NOTIFY is read as a removal
(``test_hole_the_services_pending_notify_on_a_renewal_drops_the_held_certificate``,
``test_hole_the_services_pending_notify_ends_the_first_fetch``).

  Attacker: nobody (a peer whose certificate NOTIFY is above 1300 octets: a 4096-bit
  RSA certificate, or a public CA's 2048-bit one), or an untrusted hop.
  Messages: the proxy's first NOTIFY to a subscription that has not answered yet at its
  address (every new one, every renewal: the client renews with a new dialog) is
  ``Subscription-State: pending;expires=N`` with no body
  (``kamailio_app/cert_route.py`` ``CertService._plan``).
  Effect: the client passes it to ``accept_certificate_notify``, which reads "no body"
  as "removed": on a renewal bob's held certificate is dropped (sends to him fail until
  the TCP NOTIFY arrives, never when alice takes no TCP), and a first fetch ends at once
  as "no certificate" so the waiting MESSAGE or call fails.
  Fault: ``pjsua_hooks/certservice_client.py`` ``_notify`` (any state goes to the
  engine) and ``e2m_plugins/ua.py`` ``accept_certificate_notify``
  (``if not notify.body: drop``).  Fix: a ``pending`` NOTIFY leaves what is held and
  the fetch pending (and is only answered 200); only ``active`` without a body removes.

What held (tried, no hole): a certificate NOTIFY from another address or dialog (481),
From another AoR (refused by the engine), an older certificate over the service or a
493 (``_refuse_older``), a CA:TRUE certificate over the service or a 493
(``check_not_a_ca``); a 496 naming a proxy outside our domain and the peer's (refused;
a proxy of the peer's domain learnt for bob is asked again per peer in
``_readers_for``), a 496 replacing a configured proxy's certificate (pinned); strays
(496/495/493 to nothing we sent: counted, dropped); peers wanted are only AoRs we
ourselves tried to seal for (a stranger's INVITE is refused through ``certs.user``,
not ``_peer_certificate``), so a stranger fills neither the wanted list nor the
pending fetches.

Fixed (stop 31): a signer's certificate is kept only from a message accepted (after
the replay and context checks, ``UAEngine._learn_signer``), and checked as every
certificate from the wire is: not a CA, not issued before one held or given for that
peer (``_refuse_older``), and its issue time noted; the phone's certificate client
answers a bodiless ``pending`` NOTIFY 200 and changes nothing (the certificate comes
in the NOTIFY that follows).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certservice_subscriber import subscriber
from e2m_plugins import sip
from e2m_plugins.config import UAConfig
from e2m_plugins.errors import E2MError
from e2m_plugins.testpki import init_test_pki, issue_user
from e2m_plugins.ua import MissingPeerCertificateError, UAEngine
from tests.unit.test_review4 import _answer, _notify, _subscribe_to_bob

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _bob_engine(pki, cred) -> UAEngine:
    """bob's UA with a given credential (his old key: what its thief holds)."""
    return UAEngine(UAConfig(aor=BOB, certificate=cred.cert, private_key=cred.key,
                             trust_anchors=(pki.ca.cert,),
                             peers={ALICE: pki.user("alice").cert}))


def _old_and_new_bob(pki):
    compromised = issue_user(pki.ca, BOB, "ec",     # bob's certificate before he replaced it
                             not_before=datetime.now(timezone.utc) - timedelta(days=10))
    return compromised, pki.user("bob").cert


def _bobs_old_message(pki, compromised) -> sip.SipMessage:
    """A MESSAGE bob sent alice back then, signed with (and as) his old certificate:
    what a hop on the path kept a copy of."""
    old_bob = _bob_engine(pki, compromised)
    plain = sip.make_request("MESSAGE", ALICE, from_uri=BOB, to_uri=ALICE,
                             body=b"see you at noon", content_type="text/plain")
    return sip.parse(old_bob.protect(plain).message.serialize())


def _hops_copy(message: sip.SipMessage) -> sip.SipMessage:
    """The hop's copy: the same octets with a new top Via branch (a new transaction;
    the same branch would be a retransmission)."""
    via = message.get("Via") or ""
    return message.replace("Via", via.rsplit("branch=", 1)[0] + "branch=z9hG4bK-r65copy")


def _alice_to_bob(engine) -> sip.SipMessage:
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB,
                           body=b"the new door code is 4711", content_type="text/plain")
    return sip.parse(engine.protect(msg).message.serialize())


def _alice_follows_then_hop_empties(pki):
    """Steps (0)-(2): alice got bob's old message back then (and, from its signature,
    his old certificate); she follows bob; the service gives his new certificate; the
    hop's empty NOTIFY drops it."""
    made = subscriber(pki)
    engine, client, sent = made.engine, made.client, made.sent
    compromised, replacement = _old_and_new_bob(pki)
    old_message = _bobs_old_message(pki, compromised)
    assert engine.open(old_message).info.trusted            # delivered back then
    engine.certs.remove_user(BOB)   # (whatever alice held from it is gone: a lapse, a restart)
    sub = _subscribe_to_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(replacement), cseq=1)) == 200
    assert _der(engine.certs.user(BOB)) == _der(replacement)
    assert _answer(client, _notify(sub, b"", cseq=1)) == 200      # the hop's empty NOTIFY
    assert engine.certs.user(BOB) is None
    return engine, compromised, replacement, old_message


def test_hole_a_replayed_old_message_plants_bobs_replaced_certificate(pki):
    engine, compromised, _, old_message = _alice_follows_then_hop_empties(pki)
    # (3) the hop replays bob's old MESSAGE: refused (a replay) ...
    from e2m_plugins.errors import ReplayError
    with pytest.raises(ReplayError):
        engine.open(_hops_copy(old_message))
    # ... and what alice sends bob next
    try:
        outgoing = _alice_to_bob(engine)
    except MissingPeerCertificateError:
        outgoing = None          # secure: refused for want of bob's certificate (review 26)
    if outgoing is not None:
        thief = _bob_engine(pki, compromised)
        with pytest.raises(E2MError):
            thief.open(outgoing)   # today it opens: the thief reads alice's text
    held = engine.certs.user(BOB)
    assert held is None or _der(held) != _der(compromised.cert), \
        "a refused message planted bob's replaced certificate"


def test_control_without_the_replay_alice_seals_nothing_for_the_old_key(pki):
    """Steps (0)-(2) alone: review 26's guarantee holds, alice's MESSAGE is refused for
    want of bob's certificate; and the replay itself is well formed (it is refused as
    a replay, not as unreadable) and still opens for the thief's key's holder."""
    engine, compromised, _, old_message = _alice_follows_then_hop_empties(pki)
    with pytest.raises(MissingPeerCertificateError):
        _alice_to_bob(engine)
    from e2m_plugins.errors import ReplayError
    fresh = subscriber(pki).engine
    assert fresh.open(old_message).info.trusted    # the copy is sound: signed by bob's old key
    with pytest.raises(ReplayError):
        fresh.open(_hops_copy(old_message))        # and the hop's copy is a replay


def test_control_the_service_path_refuses_the_replaced_certificate(pki):
    """The same old certificate over the service path after the empty NOTIFY: refused
    (review 26's high-water mark), so the signer path is the only way back."""
    made = subscriber(pki)
    engine, client, sent = made.engine, made.client, made.sent
    compromised, replacement = _old_and_new_bob(pki)
    sub = _subscribe_to_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(replacement), cseq=1)) == 200
    assert _answer(client, _notify(sub, b"", cseq=1)) == 200
    _answer(client, _notify(sub, _der(compromised.cert), cseq=1))
    assert engine.certs.user(BOB) is None


def test_control_bobs_current_signature_teaches_his_current_certificate(pki):
    """The signer path's legitimate use: a message bob signs with his current
    certificate gives alice a key to answer him with (no 493 round trip)."""
    engine = subscriber(pki).engine
    bob = _bob_engine(pki, pki.user("bob"))
    plain = sip.make_request("MESSAGE", ALICE, from_uri=BOB, to_uri=ALICE, body=b"hello",
                             content_type="text/plain")
    assert engine.open(sip.parse(bob.protect(plain).message.serialize())).info.trusted
    assert _der(engine.certs.user(BOB)) == _der(pki.user("bob").cert)
    assert bob.open(_alice_to_bob(engine)).message.body == b"the new door code is 4711"


# --------------------------------------------------------------------------
# Hole 2: the proxy's own "pending" NOTIFY (a large certificate held back) is taken as a
# removal

def _pending_notify(sub: sip.SipMessage, cseq: int = 1) -> sip.SipMessage:
    """What ``kamailio_app.cert_route.CertService._plan`` sends a subscriber that has
    not answered yet when the NOTIFY with the certificate is above 1300 octets (any RSA
    certificate, see below): ``Subscription-State: pending;expires=...``, no body."""
    return sip.make_request(
        "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=BOB, to_uri=ALICE,
        call_id=sub.call_id, from_tag="srv1", to_tag=sub.from_tag, cseq=cseq,
        extra_headers=[("Event", "certificate"),
                       ("Subscription-State", "pending;expires=3600")])


def _renewal(made) -> sip.SipMessage:
    """alice keeps talking to bob: at 80 % of the granted hour the client opens a new
    subscription (the old one lapses)."""
    client, sent = made.client, made.sent
    made.clock.now += 3000
    client.touch(BOB)
    before = len(sent)
    client.tick()
    assert len(sent) == before + 1, "no renewal was sent"
    request = sip.make_request("SUBSCRIBE", BOB, from_uri=ALICE, to_uri=BOB,
                               extra_headers=[*sent[-1][1],
                                              ("Route", "<sip:127.0.0.1:5999;lr>")])
    return sip.parse(client.on_tx(request))


def _following_bob(pki):
    made = subscriber(pki)
    sub = _subscribe_to_bob(made.engine, made.client, made.sent)
    assert _answer(made.client, _notify(sub, _der(pki.user("bob").cert), cseq=1)) == 200
    assert _der(made.engine.certs.user(BOB)) == _der(pki.user("bob").cert)
    return made


def test_hole_the_services_pending_notify_on_a_renewal_drops_the_held_certificate(pki):
    """Nobody needed: alice follows bob, whose certificate NOTIFY is above 1300 octets
    (``notifier.next_hop_for_size``: a 4096-bit RSA certificate, or a public CA's
    2048-bit one with its CRL and AIA extensions, plus the NOTIFY's headers).  Each renewal is a new subscription, on the
    proxy's probation until alice answers one NOTIFY at her address, so its first NOTIFY
    says ``Subscription-State: pending;expires=N`` with no body (RFC 6665 §4.1.3: "pending"
    is "not yet authorized", no content yet).  The client hands every bodiless NOTIFY to
    ``accept_certificate_notify``, which reads "no body" as "removed" and drops bob's
    certificate (``drop_peer_certificate``), and records the failure "its certificate
    was removed from its service".  Until the timer's NOTIFY over TCP (a second or more;
    never, when alice's TCP listener is closed: ``tcp_accept = false`` or a TLS phone)
    every MESSAGE to bob fails, a call's answer cannot be sealed.  The same on the first
    fetch: ``pending(aor)`` turns False at the pending NOTIFY, so the waiting send is
    retried at once and fails "its certificate service has no certificate for it".

    Fault: ``pjsua_hooks/certservice_client.py`` ``_notify`` (calls
    ``accept_certificate_notify`` whatever the state) and ``e2m_plugins/ua.py``
    ``accept_certificate_notify`` (``if not notify.body: drop``).  Fix: a ``pending``
    NOTIFY (any bodiless NOTIFY that is not ``active``/``terminated``) changes nothing
    held and leaves the fetch pending; only an ``active`` one without a body removes."""
    made = _following_bob(pki)
    sub2 = _renewal(made)
    assert _answer(made.client, _pending_notify(sub2)) == 200
    held = made.engine.certs.user(BOB)
    assert held is not None and _der(held) == _der(pki.user("bob").cert), \
        "the service's pending NOTIFY dropped bob's certificate"


def test_hole_the_services_pending_notify_ends_the_first_fetch(pki):
    made = subscriber(pki)
    sub = _subscribe_to_bob(made.engine, made.client, made.sent)
    assert made.client.pending(BOB)
    assert _answer(made.client, _pending_notify(sub)) == 200
    assert made.client.pending(BOB) and made.client.failure(BOB) is None, \
        f"the fetch ended on a pending NOTIFY: {made.client.failure(BOB)}"


def test_control_the_pending_notify_then_the_certificate_and_a_real_removal(pki):
    """The set-up is sound: the 2xx alice's client gives the pending NOTIFY (it is in
    her subscription's dialog, from the proxy) is what releases the certificate, whose
    NOTIFY is then taken; an ``active`` NOTIFY without a body (a real removal) still
    drops it."""
    made = _following_bob(pki)
    sub2 = _renewal(made)
    assert _answer(made.client, _pending_notify(sub2)) == 200
    assert _answer(made.client, _notify(sub2, _der(pki.user("bob").cert), cseq=2)) == 200
    assert _der(made.engine.certs.user(BOB)) == _der(pki.user("bob").cert)
    assert _answer(made.client, _notify(sub2, b"", cseq=3)) == 200
    assert made.engine.certs.user(BOB) is None


def test_control_an_rsa_certificate_notify_is_past_the_udp_bound(pki, tmp_path):
    """Why the pending NOTIFY is the common case, not an attack: the notifier's NOTIFY
    with a 4096-bit RSA user certificate (the test CA's minimal one: ~1.2 KB; a public
    CA's with CRL and AIA extensions passes already at 2048 bits) is above
    ``notifier.next_hop_for_size``'s 1300 octets, so a new (unconfirmed) subscription
    over UDP gets the bodiless one first."""
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
    from e2m_plugins import notifier
    key = rsa_keys.generate_private_key(public_exponent=65537, key_size=4096)
    der = _der(issue_user(pki.ca, BOB, "rsa", key=key).cert)
    sub = notifier.Subscription(
        call_id="r65-c", local_tag="t1", remote_tag="a1", event_id="", aor=BOB,
        local_uri=BOB, remote_uri=ALICE, remote_target="sip:alice@192.0.2.9:5060",
        route_set=(), next_hop="sip:192.0.2.9:5060", source="192.0.2.9",
        contact="sip:proxy.example.com", expires=4600.0)
    from kamailio_app.cert_route import CertService
    _, hop, _, body, held = CertService._plan(sub, 1, 3600, der, confirmed=False)
    assert held and body == b""
