"""Review 174 (attacker's review of 0b55d73): the RECEIVING side of the SDP split.

Hole K1: the SDP-viewing proxy co-signs the SDP and plants SRTP keys of its own choosing
- Attacker: the curious proxy the caller chose to read the SDP (``view =
  INVITE application/sdp``).  It holds the body's CEK (it is a recipient of the envelope)
  and a certificate that chains to the users' trust anchor (the UAs encrypt to it, so
  they trust its issuer).  No untrusted hop can do it: it lacks the CEK.
- Messages: alice's INVITE with an SDP offer that has no SDES keys
  (``flows.SDP_OFFER``, ``m=audio 49170 RTP/AVP 0 8``): not split, sealed for bob and
  the proxy, signed by alice.  The proxy opens the envelope, signs the very same
  eContent with its own key, its SignerInfo carrying one signed attribute
  ``e2m-sdp-keys`` = ``seal_keys(SdpKeys(((0, "a=crypto:1 AES_CM_128_HMAC_SHA1_80
  inline:RVZJTEVW..."),)), bob's certificate)`` (bob's public key is all it needs), adds
  that SignerInfo and its certificate next to alice's (alice's signature untouched),
  and seals the SignedData again for bob and itself with alice's CEKReference.
- Effect observed: ``bob.open`` accepts it: ``SecurityInfo(split=True, trusted=True,
  signers=('sip:alice@example.com', 'sip:proxy.example.com'))`` and the SDP bob's phone
  gets ends with ``a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:RVZJTEVW...`` (40
  characters of key alice never sent and the proxy knows): bob's stack is handed SRTP
  keys "end-to-end only" that the proxy chose, i.e. the media can be decrypted or
  forged by it, and bob sees alice's SDP with a line she did not write.
- Code at fault: ``e2m_plugins/body.py:436`` (``open_sealed_keys`` takes the
  ``e2m-sdp-keys`` attribute of whichever signer carries it, not of the sender) and
  ``e2m_plugins/body.py:353`` (``check_signed_by`` is satisfied by any one signer being
  the peer, so a co-signer rides along); used by ``ua.py:1398`` and
  ``ua.py:1146`` (``_with_sealed_keys``).
- Suggested fix: take sealed keys only from a SignerInfo whose certificate is the
  sender's (``check_user_names(cert, peer)``), and refuse (``InconsistentSplitError``) a
  part where any other signer carries ``e2m-sdp-keys``; simpler still, refuse a body
  part signed by anyone but its sender (no E2M flow has co-signers).
- Test: ``test_k1_proxy_cosigner_cannot_plant_sdp_keys``.

Controls
- ``test_control_honest_split_offer_reaches_bob_with_alices_keys``: a split SRTP offer
  opens on bob with alice's key and ``split=True``; the proxy's view has no key.
- ``test_control_forgery_reaches_bob_as_sent``: the same re-sealing WITHOUT a planted
  attribute (only alice's SignerInfo) is accepted and bob gets ``SDP_OFFER`` byte for
  byte: the re-sealing itself is sound, so K1's effect is the co-signer's keys.

Tried and held
- The proxy co-signs a SPLIT offer (alice's signer carries her ``e2m-sdp-keys``) and
  adds its own keys: refused, ``InconsistentSplitError("sealed SDP keys must come once,
  signed, with an SDP")`` (``test_held_cosigner_keys_next_to_alices_are_refused``).
- The proxy drops alice's SignerInfo and signs alone with planted keys: refused,
  ``UntrustedSignerError`` (certificate CN=proxy.example.com is not for
  sip:alice@example.com) (``test_held_proxy_alone_cannot_sign_for_alice``).
- Not done in the time (about 20 minutes): CEK reuse after a proxy joins or leaves the
  readers, the proxy archive of unsplit legacy SDP, the real pjsua2 phone for K1 (the
  engine result is what the phone is handed: ``Opened.message``).

Fixed (stop 49): ``body.open_sealed_keys`` takes sealed SDP keys only from a signer whose
certificate names the sender (the peer the engine checked the part against); keys
carried by any other signer refuse the part (``InconsistentSplitError``).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_OFFER, SDP_VIEW, SRTP_OFFER, TRUSTED, invite, known_proxy, ua_engine
from e2m_plugins import mime
from e2m_plugins.body import message_body, seal_keys, top_parts, with_entity
from e2m_plugins.cms import der, oids
from e2m_plugins.cms.envelope import open_envelope, seal
from e2m_plugins.cms.recipients import CertificateKey
from e2m_plugins.cms.signed import sign, signed_content
from e2m_plugins.errors import E2MError, InconsistentSplitError, UntrustedSignerError
from e2m_plugins.sdp import SdpKeys
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import _recipient

ALICE_KEY = b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"     # flows.CRYPTO's inline key
EVIL_KEY = "RVZJTEVWSUxFVklMRVZJTEVWSUxFVklMRVZJTEVW"
EVIL = SdpKeys(((0, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + EVIL_KEY),))


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _signed_fields(content_info: bytes) -> list[der.TLV]:
    """The fields of a ContentInfo(SignedData): version, digestAlgorithms,
    encapContentInfo, [0] certificates, signerInfos."""
    return der.items(der.items(der.items(der.read_all(content_info))[1])[0])


def _reseal(world, msg: SipMessage, *, plant: bool, keep_alice: bool = True) -> SipMessage:
    """What the SDP-viewing proxy can do with the CEK it holds: open alice's envelope,
    optionally add a SignerInfo of its own (over the same content) carrying planted
    ``e2m-sdp-keys`` sealed to bob's public certificate, and seal it again for bob and
    itself under alice's CEKReference."""
    cred = world.proxy(TRUSTED)
    bob_cert = world.user("bob").cert
    part = message_body(msg)
    envelope = open_envelope(part.decoded(), [CertificateKey(cred.cert, cred.key)], want_cek=True)
    assert envelope.content_type == "signed-data"
    signed = envelope.plaintext
    fields = _signed_fields(signed)
    certs = [f for f in fields if f.tag == der.context(0)][0]
    cert_bytes = b"".join(c.encoded for c in der.items(certs)) if keep_alice else b""
    signer_bytes = b"".join(s.encoded for s in der.items(fields[-1])) if keep_alice else b""
    if plant:
        planted = seal_keys(EVIL, _recipient(bob_cert, False)).der
        mine = _signed_fields(sign(signed_content(signed), cred.cert, cred.key,
                                   extra_attributes=((oids.SDP_KEYS, planted),)))
        cert_bytes += b"".join(c.encoded for c in der.items(
            [f for f in mine if f.tag == der.context(0)][0]))
        signer_bytes += b"".join(s.encoded for s in der.items(mine[-1]))
    signed_data = der.seq(fields[0].encoded, fields[1].encoded, fields[2].encoded,
                          der.tlv(der.context(0), cert_bytes), der.tlv(0x31, signer_bytes))
    content_info = der.seq(der.enc_oid(oids.SIGNED_DATA), der.tlv(der.context(0), signed_data))
    sealed = seal(content_info, [_recipient(bob_cert, False), _recipient(cred.cert, False)],
                  content_type=oids.SIGNED_DATA, cek_reference=envelope.cek_reference)
    entity = mime.smime_entity(sealed.der, "authEnveloped-data", content_id=part.content_id,
                               handling=part.handling)
    return with_entity(msg, entity)


def _pair(world):
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    return ua_engine(world, "alice", proxies=sdp_proxy), ua_engine(world, "bob", proxies=sdp_proxy)


# -- K1 --------------------------------------------------------------------------------

def test_k1_proxy_cosigner_cannot_plant_sdp_keys(world):
    alice, bob = _pair(world)
    sent = alice.protect(invite(world, SDP_OFFER, call_id="r174-k1"))
    assert not sent.info.split and sent.info.readable_by == (TRUSTED,)
    forged = _reseal(world, sent.message, plant=True)
    try:
        opened = bob.open(forged)
    except E2MError:
        return                                   # refused with a typed error: secure
    body = opened.message.body or b""
    assert EVIL_KEY.encode() not in body, (
        f"bob's phone is handed the proxy's SRTP key (split={opened.info.split}, "
        f"signers={opened.info.signers})")
    assert body == SDP_OFFER


# -- controls ----------------------------------------------------------------------

def test_control_honest_split_offer_reaches_bob_with_alices_keys(world):
    alice, bob = _pair(world)
    sent = alice.protect(invite(world, SRTP_OFFER, call_id="r174-control-split"))
    assert sent.info.split
    cred = world.proxy(TRUSTED)
    view = open_envelope(top_parts(message_body(sent.message))[0].decoded(),
                         [CertificateKey(cred.cert, cred.key)]).plaintext
    assert b"m=audio" in view and ALICE_KEY not in view
    opened = bob.open(sent.message)
    assert opened.info.split and opened.info.signers == ("sip:alice@example.com",)
    assert ALICE_KEY in opened.message.body


def test_control_forgery_reaches_bob_as_sent(world):
    alice, bob = _pair(world)
    sent = alice.protect(invite(world, SDP_OFFER, call_id="r174-control-reseal"))
    opened = bob.open(_reseal(world, sent.message, plant=False))
    assert opened.message.body == SDP_OFFER and not opened.info.split
    assert opened.info.signers == ("sip:alice@example.com",)


# -- tried and held --------------------------------------------------------------------

def test_held_cosigner_keys_next_to_alices_are_refused(world):
    alice, bob = _pair(world)
    sent = alice.protect(invite(world, SRTP_OFFER, call_id="r174-held-split"))
    assert sent.info.split
    with pytest.raises(InconsistentSplitError):
        bob.open(_reseal(world, sent.message, plant=True))


def test_held_proxy_alone_cannot_sign_for_alice(world):
    alice, bob = _pair(world)
    sent = alice.protect(invite(world, SDP_OFFER, call_id="r174-held-alone"))
    with pytest.raises(UntrustedSignerError):
        bob.open(_reseal(world, sent.message, plant=True, keep_alice=False))
