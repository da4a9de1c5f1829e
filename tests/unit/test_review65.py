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

What held (tried, no hole): see the end of this module and the report.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import sip
from e2m_plugins.config import UAConfig
from e2m_plugins.errors import E2MError
from e2m_plugins.testpki import init_test_pki, issue_user
from e2m_plugins.ua import MissingPeerCertificateError, UAEngine
from pjsua_hooks.certservice_client import NotifyAnswer

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


def _subscribe_to_bob(engine, client, sent) -> sip.SipMessage:
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB, body=b"hi",
                           content_type="text/plain")
    with pytest.raises(MissingPeerCertificateError):
        engine.protect(msg)
    client.tick()
    request = sip.make_request("SUBSCRIBE", BOB, from_uri=ALICE, to_uri=BOB,
                               extra_headers=[*sent[-1][1],
                                              ("Route", "<sip:127.0.0.1:5999;lr>")])
    out = client.on_tx(request)
    assert out is not None
    return sip.parse(out)


def _notify(sub: sip.SipMessage, body: bytes, cseq: int) -> sip.SipMessage:
    return sip.make_request(
        "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=BOB, to_uri=ALICE,
        call_id=sub.call_id, from_tag="srv1", to_tag=sub.from_tag, cseq=cseq,
        extra_headers=[("Event", "certificate"), ("Subscription-State", "active;expires=3600")],
        body=body, content_type="application/pkix-cert" if body else None)


def _answer(client, notify) -> int:
    with pytest.raises(NotifyAnswer) as caught:
        client.on_rx(notify, PROXY)
    return caught.value.code


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


@pytest.mark.xfail(strict=True, reason="review 65: untrusted hop replays bob's old signed "
                   "MESSAGE (refused) after an empty NOTIFY; its signer certificate becomes "
                   "bob's: alice's next MESSAGE is sealed for his replaced, compromised key")
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
