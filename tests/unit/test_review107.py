"""Review 107 (December 2026) of adf7317: the RFC 6072 certificate service on both
sides, TLS, digest and REGISTER.  This module holds hole K2 (the phone's side) and the
review's "tried and held"; hole K1 (the registrar, on a real Kamailio) is in
``tests/kamailio/test_review107_wire.py``.

Hole K1 (see the wire module) - **insider UA** (or anyone, registrar open) registers a
contact naming the proxy itself; every **off-path** MESSAGE to that AoR then loops 70
times through the proxy past pike, and a burst of 150 from 20 addresses exhausted
Kamailio's shared memory (28 of 30 honest MESSAGEs to bob: 500).

Hole K2 - a peer certificate taught by a signature is never followed: a replacement
(or withdrawal) at the certificate service never reaches the phone, which keeps
sealing for the withdrawn key
(``test_hole_a_certificate_learnt_from_a_signature_outlives_its_withdrawal``).

  Attacker: the thief of bob's old private key, on the path of alice's messages (an
  untrusted hop, or anyone who gets a copy of them) - exactly the case withdrawal is
  for.  No message of the attacker's own is needed.
  Set-up: bob wrote alice a signed MESSAGE while his certificate B_old was current;
  alice's phone kept B_old as bob's encryption certificate from the signature
  (``UAEngine._learn_signer``).  Then bob's key is stolen: he gets B_new issued and
  PUBLISHes it over B_old at his home's certificate service (modelled with the
  service's own decisions, ``certservice.publish``/``served_certificate`` on a memory
  store, and alice's real ``CertServiceClient`` and ``UAEngine``).
  Messages: alice keeps writing to bob for three hours (three times
  ``cert_subscribe_expires``): each minute the phone's ``touch(bob)`` and ``tick()``
  run as ``send_message`` and the loop run them; bob then writes to alice again,
  signed with B_new (accepted).
  Effect (seen): the client sent 0 SUBSCRIBEs in the three hours (it subscribes only
  for a peer the engine lists as wanted, i.e. one with no certificate held); bob's
  B_new signature did not replace B_old either (``_learn_signer`` returns at once when
  a certificate is held); alice's next MESSAGE was sealed for B_old and the thief's
  engine opened it: b"the new door code is 4711"; bob's new key could not
  (NoMatchingRecipientError).  A certificate kept from a signature has no lifetime but
  its notAfter (``certs.add_user`` with no ``_service_peers`` entry), so this lasts
  until the phone restarts or B_old expires (825 days for the test CA).  The same
  holds, by reading, for a certificate taken from a 493 (``_learn_493`` calls
  ``add_peer_certificate`` without ``expires_in``: kept for ever, never followed) -
  not run.  The withdrawal reaches only phones that learnt bob's certificate from the
  service.
  Code at fault: ``e2m_plugins/ua.py:1172`` (``if self.certs.user(peer) is not None:
  return``) and ``:1178`` (``self.certs.add_user(peer, cert)``: no expiry, not a
  service peer), ``ua.py:1351`` (the 493 path alike), and
  ``pjsua_hooks/certservice_client.py:227`` (``tick`` subscribes only for
  ``peer_certificates_wanted()``) with ``:201`` (``want``), which
  ``pjsua_hooks/phone.py:1377`` calls only after a send failed for want of a
  certificate.
  Suggested fix: keep a certificate learnt from a signature or a 493 like one from the
  service: for a bounded time (``_service_peers``, e.g. ``cert_subscribe_expires``),
  and have the phone follow the certificate of every peer it talks to (subscribe when
  the peer is used and no subscription answers for it, whatever taught the key), so a
  replacement or an empty NOTIFY reaches it; and let a newer certificate from an
  accepted signature replace an older one held (``_refuse_older``'s order already
  says which is newer).

Controls (pass): ``test_control_a_certificate_from_the_service_follows_the_replacement``
(the same timeline with B_old fetched from the service: the replacement NOTIFY carries
B_new, alice's MESSAGE opens for bob's new key and not for the thief),
``test_control_a_removal_on_the_service_path_stops_the_sends`` (a withdrawal without
replacement: the empty NOTIFY drops B_old, alice's next MESSAGE is refused, not sealed),
``test_control_the_signature_path_itself_is_sound`` (bob's current signature teaches
his current certificate and he opens alice's answer).  K1's controls are in the wire
module.

Tried and held (adf7317):

- Insider PUBLISH for another AoR, by reading and the existing tests
  (``test_certservice_wire.py``, ``test_certservice_rules_attacks.py``): the owner is
  ``sip:<digest user>@$rd`` compared with the Request-URI's AoR after both are reduced
  by ``aor_of``; spellings, To, ``SIP-If-Match`` of another AoR: 403/412 (re-run here:
  ``test_certservice_rules_attacks.py``, 38 passed; the wire file's publish-for-another,
  not-the-AoR's-own, needs-auth and entity-tag tests, 8 passed).  An AoR under
  the proxy's IP (``sip:alice@127.0.0.1``) is another AoR whose certificate nobody
  holds (the SAN check).  Withdrawal by an insider needs the AoR's own digest.
- Subscriptions and publications keyed alike: ``notifier.open_dialog`` and
  ``certservice._target`` both store ``str(aor_of(Request-URI))``, so a follower with
  an odd spelling (``sip:bob@EXAMPLE.com``) is still told of a change.
- The phone's store: the client's tables are bounded (64 subscriptions, 16 pending, 128
  failures, 8 publish Call-IDs), ``_service_peers`` and ``_newest_from_wire`` at 256;
  certificates from signatures are unbounded in number but each needs a CA-issued
  certificate for a distinct AoR (no stranger has many).  NOTIFYs from another address,
  in no dialog of ours, with an older CSeq, older certificate or CA certificate:
  refused (reviews 4, 26, 65); ``rx_source`` is always set in ``on_rx``, so the
  proxy-address check is never skipped.  A hop's ``Subscription-State: active;
  expires=1`` only shortens what is kept (a denial the hop has anyway).
- TLS at the proxy (``openssl s_client`` on a ``tls:`` listener): TLS 1.3 and 1.2
  with ECDHE-ECDSA-AES256-GCM; TLS 1.0 refused (protocol version alert); 3DES, aNULL
  and AES128-SHA (CBC, SHA-1) refused even at ``@SECLEVEL=0`` (handshake failure);
  compression none.  The client profile verifies the chain only (known limit, review
  67).  The phone's TLS (name and chain, 1.2 only) is covered by review 81's tests.
- K1's variants: the same loop with ``;transport=tcp`` contacts and on an open
  registrar (a stranger registers ``sip:zed@<proxy>`` himself: 70 transactions); on an
  E2M proxy the stranger's MESSAGE loops 70 times too, an INVITE 17 (400 Bad
  Record-Route).

Not tried (time): client-initiated TLS renegotiation as a CPU cost (``openssl
s_client`` ``R`` in ``-quiet`` mode sent it as data; inconclusive), the cluster nodes'
TLS and a front's behaviour with a self-pointing contact (the front's own address is
an alias of every node), a self-pointing contact of a TLS phone, K2 with real pjsua
phones and a real Kamailio service, a nonce reused across realms on a proxy with
several domains, PostgreSQL's ``cert_table_pg``.

Fixed (stop 38): the phone follows every peer it sends to (``CertServiceClient.
_follow_peers_in_use``: a subscription for each peer used lately and followed by none,
not a ``[peers]`` one, within ``MAX_PENDING``), so bob's replacement or withdrawal
reaches it however it learnt his certificate; a newer certificate in an accepted
signature replaces an older one held (``UAEngine._learn_signer``); a certificate its
service withdrew is never learnt back (``_withdrawn``, checked in ``_refuse_older``).
The hole test and stop 38's three variants failed on the code before (checked) and
pass.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import certservice, sip
from e2m_plugins.config import UAConfig
from e2m_plugins.errors import E2MError
from e2m_plugins.testpki import init_test_pki, issue_user
from e2m_plugins.ua import UAEngine
from pjsua_hooks.certservice_client import NotifyAnswer

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _bob(pki, cred) -> UAEngine:
    """bob's UA holding ``cred`` (his old credential: what its thief holds too)."""
    return UAEngine(UAConfig(aor=BOB, certificate=cred.cert, private_key=cred.key,
                             trust_anchors=(pki.ca.cert,),
                             peers={ALICE: pki.user("alice").cert}))


def _signed_by(bob: UAEngine, text: bytes) -> sip.SipMessage:
    plain = sip.make_request("MESSAGE", ALICE, from_uri=BOB, to_uri=ALICE, body=text,
                             content_type="text/plain")
    return sip.parse(bob.protect(plain).message.serialize())


def _alice_to_bob(engine: UAEngine) -> sip.SipMessage:
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB,
                           body=b"the new door code is 4711", content_type="text/plain")
    return sip.parse(engine.protect(msg).message.serialize())


class Service:
    """bob's certificate service as the proxy decides it (``e2m_plugins.certservice``
    on a memory store), and alice's subscriptions to it: every SUBSCRIBE her client
    asks to send is answered at once by a NOTIFY with what the service serves, and a
    change of bob's publication by a NOTIFY to each live subscription."""

    def __init__(self, pki, made) -> None:
        self.pki, self.made = pki, made
        self.store = certservice.MemoryPublicationStore()
        self.etag: str | None = None
        self.handled = 0
        self.dialogs: list[tuple[sip.SipMessage, int]] = []   # (SUBSCRIBE, last CSeq)

    def publish(self, cert) -> None:
        headers = [("Event", "certificate"), ("Expires", "86400")]
        if self.etag:
            headers.append(("SIP-If-Match", self.etag))
        msg = sip.make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB, body=_der(cert),
                               content_type="application/pkix-cert", extra_headers=headers)
        answer = certservice.publish(msg, authenticated=BOB, store=self.store,
                                     anchors=(self.pki.ca.cert,), now=time.time())
        assert answer.code == 200, answer
        self.etag = dict(answer.headers)["SIP-ETag"]
        for index, (sub, cseq) in enumerate(self.dialogs):   # followers told
            self._notify(sub, cseq + 1)
            self.dialogs[index] = (sub, cseq + 1)

    def serve(self) -> int:
        """Answer the SUBSCRIBEs alice's client sent since the last call."""
        client, sent = self.made.client, self.made.sent
        new = sent[self.handled:]
        self.handled = len(sent)
        for _aor, headers in new:
            request = sip.make_request("SUBSCRIBE", BOB, from_uri=ALICE, to_uri=BOB,
                                       extra_headers=[*headers,
                                                      ("Route", "<sip:127.0.0.1:5999;lr>")])
            sub = sip.parse(client.on_tx(request))
            self._notify(sub, 1)
            self.dialogs.append((sub, 1))
        return len(new)

    def _notify(self, sub: sip.SipMessage, cseq: int) -> int:
        body = certservice.served_certificate(self.store, BOB, (self.pki.ca.cert,),
                                              time.time())
        notify = sip.make_request(
            "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=BOB, to_uri=ALICE,
            call_id=sub.call_id, from_tag="srv1", to_tag=sub.from_tag, cseq=cseq,
            extra_headers=[("Event", "certificate"),
                           ("Subscription-State", "active;expires=3600")],
            body=body, content_type="application/pkix-cert" if body else None)
        with pytest.raises(NotifyAnswer) as caught:
            self.made.client.on_rx(notify, PROXY)
        return caught.value.code


def _keep_talking(made, service: Service, hours: float) -> int:
    """alice keeps messaging bob: each minute her phone says so (``touch``, as
    ``send_message`` does) and runs its certificate loop (``tick``); the SUBSCRIBEs it
    sends are answered by the service.  How many it sent."""
    sent = 0
    for _ in range(int(hours * 60)):
        made.clock.now += 60
        made.client.touch(BOB)
        made.client.tick()
        sent += service.serve()
    return sent


def _old_and_new(pki):
    compromised = issue_user(pki.ca, BOB, "ec",
                             not_before=datetime.now(timezone.utc) - timedelta(days=10))
    return compromised, pki.user("bob")


# -- hole K2: a certificate taught by a signature is never followed -------------------

def test_hole_a_certificate_learnt_from_a_signature_outlives_its_withdrawal(pki):
    made = subscriber(pki)
    service = Service(pki, made)
    compromised, current = _old_and_new(pki)
    service.publish(compromised.cert)                 # bob's certificate back then
    # (1) bob writes to alice, signed: alice learns his certificate from the signature
    assert made.engine.open(_signed_by(_bob(pki, compromised), b"lunch?")).info.trusted
    assert _der(made.engine.certs.user(BOB)) == _der(compromised.cert)
    # (2) bob's key is stolen: he gets a new certificate and replaces the published one
    service.publish(current.cert)
    # (3) alice keeps talking to bob for three hours (3 x cert_subscribe_expires)
    subscribes = _keep_talking(made, service, hours=3)
    # (4) bob writes again, signed with his new key: accepted
    assert made.engine.open(_signed_by(_bob(pki, current), b"new phone")).info.trusted
    # (5) alice's next MESSAGE to bob
    outgoing = _alice_to_bob(made.engine)
    thief = _bob(pki, compromised)
    try:
        opened = thief.open(outgoing).message.body
    except E2MError:
        opened = None
    assert opened is None, (f"the thief of bob's withdrawn key read {opened!r}; alice sent "
                            f"{subscribes} SUBSCRIBE(s) in three hours")


def test_hole_variant_the_replacement_reaches_a_signature_taught_phone_unasked(pki):
    """Stop 38's variant of K2: bob never writes again after replacing his
    certificate; following the peers she talks to must bring alice the new one."""
    made = subscriber(pki)
    service = Service(pki, made)
    compromised, current = _old_and_new(pki)
    service.publish(compromised.cert)
    assert made.engine.open(_signed_by(_bob(pki, compromised), b"lunch?")).info.trusted
    service.publish(current.cert)
    assert _keep_talking(made, service, hours=0.1) >= 1
    assert _der(made.engine.certs.user(BOB)) == _der(current.cert)
    with pytest.raises(E2MError):
        _bob(pki, compromised).open(_alice_to_bob(made.engine))


def test_hole_variant_a_withdrawn_key_is_not_taught_back_by_its_thief(pki):
    """Stop 38's variant of K2: bob withdraws his stolen certificate (no new one yet);
    the follow's empty NOTIFY drops it, and the thief's message signed with the old
    key (a valid signature: no revocation) must not teach it back."""
    made = subscriber(pki)
    service = Service(pki, made)
    compromised, _ = _old_and_new(pki)
    service.publish(compromised.cert)
    thief = _bob(pki, compromised)
    assert made.engine.open(_signed_by(thief, b"lunch?")).info.trusted
    made.client.touch(BOB)
    made.client.tick()
    assert service.serve() == 1
    service.store.remove(BOB)
    sub, cseq = service.dialogs[0]
    assert service._notify(sub, cseq + 1) == 200
    assert made.engine.certs.user(BOB) is None
    made.engine.open(_signed_by(thief, b"it is me, bob"))
    assert made.engine.certs.user(BOB) is None
    with pytest.raises(E2MError):
        _alice_to_bob(made.engine)


def test_hole_variant_bobs_new_signature_replaces_the_old_certificate(pki):
    """Stop 38's variant of K2 with no certificate service at all: bob's message
    signed with his new certificate replaces the older one alice learnt, so she
    seals for his new key."""
    made = subscriber(pki)
    compromised, current = _old_and_new(pki)
    assert made.engine.open(_signed_by(_bob(pki, compromised), b"lunch?")).info.trusted
    assert made.engine.open(_signed_by(_bob(pki, current), b"new phone")).info.trusted
    assert _der(made.engine.certs.user(BOB)) == _der(current.cert)
    # and an old signed message (a hop's copy) does not bring the old one back
    made.engine.open(_signed_by(_bob(pki, compromised), b"an old copy"))
    assert _der(made.engine.certs.user(BOB)) == _der(current.cert)


# -- controls -----------------------------------------------------------------------------

def test_control_a_certificate_from_the_service_follows_the_replacement(pki):
    """The rule working on the service path: alice fetched bob's certificate from the
    service (a send blocked, then the fetch); bob replaces it; the NOTIFY carries the
    new one and alice's next MESSAGE opens for bob's new key, not for the thief."""
    made = subscriber(pki)
    service = Service(pki, made)
    compromised, current = _old_and_new(pki)
    service.publish(compromised.cert)
    with pytest.raises(E2MError):                     # nothing held: blocked, wanted
        _alice_to_bob(made.engine)
    made.client.tick()
    assert service.serve() == 1
    assert _der(made.engine.certs.user(BOB)) == _der(compromised.cert)
    service.publish(current.cert)
    assert _der(made.engine.certs.user(BOB)) == _der(current.cert)
    outgoing = _alice_to_bob(made.engine)
    with pytest.raises(E2MError):
        _bob(pki, compromised).open(outgoing)
    assert _bob(pki, current).open(outgoing).message.body == b"the new door code is 4711"


def test_control_a_removal_on_the_service_path_stops_the_sends(pki):
    """A withdrawal without replacement on the service path: the empty NOTIFY drops
    bob's certificate and alice's MESSAGE is refused, not sealed for the old key."""
    made = subscriber(pki)
    service = Service(pki, made)
    compromised, _ = _old_and_new(pki)
    service.publish(compromised.cert)
    with pytest.raises(E2MError):
        _alice_to_bob(made.engine)
    made.client.tick()
    service.serve()
    assert made.engine.certs.user(BOB) is not None
    service.store.remove(BOB)     # bob (or the operator) removes it; the timer's NOTIFY:
    sub, cseq = service.dialogs[0]
    assert service._notify(sub, cseq + 1) == 200
    assert made.engine.certs.user(BOB) is None
    with pytest.raises(E2MError):
        _alice_to_bob(made.engine)


def test_control_the_signature_path_itself_is_sound(pki):
    """The signer path's honest use: a message bob signs with his current certificate
    teaches it, and bob opens alice's answer."""
    made = subscriber(pki)
    current = pki.user("bob")
    assert made.engine.open(_signed_by(_bob(pki, current), b"hello")).info.trusted
    assert _bob(pki, current).open(_alice_to_bob(made.engine)).message.body \
        == b"the new door code is 4711"
