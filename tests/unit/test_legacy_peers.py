"""Peers that cannot do what E2M requires by default, served only where a setting says so.

reSIProcate, the one maintained SIP stack with S/MIME, sends EnvelopedData with
AES-128-CBC, RSA PKCS#1 v1.5 and issuerAndSerialNumber, unsigned, and opens only that.
A ``[[legacy]]`` entry in UA.toml (an AoR or a domain) lets a UA talk to such a peer;
``[policy] legacy_peers`` lets the proxy take its bodies.  Everyone else keeps the
strict defaults, and a refusal names the setting.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, proxy_engine, ua_engine
from e2m_plugins import headers as hdr
from e2m_plugins.body import message_body, protect_content, top_parts, with_entity
from e2m_plugins.cms.envelope import describe_envelope
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.config import LegacyPeer
from e2m_plugins.errors import DecryptionError, E2MError, SignatureRequiredError
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.testpki import init_test_pki


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="rsa")


def _resiprocate_body(world, sender: str, recipient: str, text: bytes = b"hi from resip"):
    """What a reSIProcate UA sends: CBC EnvelopedData, v1.5, issuerAndSerial, unsigned,
    with no SIP context."""
    msg = message(world, text, sender=sender, recipient=recipient)
    entity, _ = protect_content("text/plain", text,
                                [recipient_for_certificate(world.user(recipient).cert)],
                                cipher="aes-128-cbc")
    return with_entity(msg, entity)


def test_we_send_a_legacy_peer_what_it_opens(world):
    alice = ua_engine(world, "alice", legacy=(LegacyPeer(world.aor("bob"), sign=False),))
    sent = alice.protect(message(world))
    (part,) = top_parts(message_body(sent.message))
    desc = describe_envelope(part.decoded())
    assert desc.envelope_type == "enveloped-data" and desc.content_algorithm == "aes-128-cbc"
    (recipient,) = desc.recipients
    assert (recipient.kind, recipient.key_algorithm) == ("ktri", "rsa-pkcs1v15")
    assert recipient.identifier.startswith("issuer-serial=")
    assert not sent.info.signed and desc.content_type == "data"   # the peer does not verify


def test_a_legacy_peer_that_verifies_gets_signed_bodies(world):
    alice = ua_engine(world, "alice", legacy=(LegacyPeer(world.aor("bob"), sign=True),))
    assert alice.protect(message(world)).info.signed


def test_everyone_else_keeps_the_strict_defaults(world):
    alice = ua_engine(world, "alice", legacy=(LegacyPeer("example.net"),))   # another domain
    sent = alice.protect(message(world))
    (part,) = top_parts(message_body(sent.message))
    assert describe_envelope(part.decoded()).envelope_type == "auth-enveloped-data"
    assert sent.info.signed


def test_cbc_and_unsigned_only_from_the_legacy_peer_named(world):
    from_alice = _resiprocate_body(world, "alice", "bob")
    strict = ua_engine(world, "bob")
    with pytest.raises(DecryptionError):            # CBC refused, same answer as any failure
        strict.open(from_alice)
    # Unsigned CBC is a padding oracle for any hop that can tamper: "bad padding" and
    # "good padding but unsigned" must not answer differently, so a peer named only for
    # signing or only for unsigned bodies still gets the one decryption answer.
    for partial in (LegacyPeer(world.aor("alice")),
                    LegacyPeer(world.aor("alice"), accept_unsigned=True)):
        with pytest.raises(DecryptionError):
            ua_engine(world, "bob", legacy=(partial,)).open(from_alice)
    lenient = ua_engine(world, "bob", legacy=(LegacyPeer(world.aor("alice"),
                                                         accept_unsigned=True,
                                                         accept_unsigned_cbc=True),))
    opened = lenient.open(from_alice)
    assert opened.message.body == b"hi from resip" and not opened.info.signed
    assert world.aor("alice") not in opened.info.describe()  # nobody vouched for the sender
    # carol is not named: the same body from her is still refused
    with pytest.raises(E2MError):
        lenient.open(_resiprocate_body(world, "carol", "bob"))


def test_unsigned_gcm_from_a_signing_legacy_peer_names_the_setting(world):
    """No oracle in authenticated encryption, so the refusal can say what to change."""
    msg = message(world, b"unsigned gcm", sender="alice", recipient="bob")
    entity, _ = protect_content("text/plain", b"unsigned gcm",
                                [recipient_for_certificate(world.user("bob").cert)])
    signing_only = ua_engine(world, "bob", legacy=(LegacyPeer(world.aor("alice")),))
    with pytest.raises(SignatureRequiredError) as caught:
        signing_only.open(with_entity(msg, entity))
    assert "require_signature" in str(caught.value)  # the refusal names the setting


def test_the_proxy_takes_cbc_only_from_named_legacy_peers(world):
    def labelled(msg):
        entity, _ = protect_content("text/plain", b"to the archive",
                                    [recipient_for_certificate(world.user("bob").cert),
                                     recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                    cipher="aes-128-cbc")
        return with_entity(msg, entity).add(
            hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(hdr.BodyLabel(TRUSTED, ())))

    body = labelled(message(world))
    strict = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    refused = strict.inspect(body)
    assert refused.action == "reply" and refused.code == 496 and not refused.seen
    signed_only = proxy_engine(world, TRUSTED, view=("MESSAGE:*",),
                               legacy_peers=(world.aor("alice"),))
    refused = signed_only.inspect(labelled(message(world)))   # CBC must still be signed
    assert refused.action == "reply" and refused.code == 496 and not refused.seen
    named = proxy_engine(world, TRUSTED, view=("MESSAGE:*",),
                         legacy_peers=(world.aor("alice"),), legacy_unsigned_cbc=True)
    taken = named.inspect(labelled(message(world)))
    assert taken.action == "forward" and [s.plaintext for s in taken.seen] == [b"to the archive"]
    # a legacy sender's CBC body gets the one answer for every failure after decryption
    assert answer_for(DecryptionError(), "proxy").code == 496
    other = named.inspect(labelled(message(world, sender="carol")))
    assert other.action == "reply" and other.code == 496


def test_a_signed_body_from_a_legacy_peer_is_still_checked(world):
    """A legacy peer that signs: the signature must still be the sender's."""
    proxy = known_proxy(world, TRUSTED, ("MESSAGE:*",))
    carol = ua_engine(world, "carol", proxies=(proxy,),
                      legacy=(LegacyPeer(world.aor("bob"), sign=True),))
    forged = carol.protect(message(world, sender="carol")).message
    forged = forged.replace("From", f"<{world.aor('alice')}>;tag={forged.from_tag}")
    bob = ua_engine(world, "bob", legacy=(LegacyPeer(world.aor("alice"), accept_unsigned=True),))
    with pytest.raises(E2MError):
        bob.open(forged)
