"""The octets an INVITE spends, trimmed without losing what anyone needs (docs/protocol.md
§6.2): pjsip reads at most 4000 bytes, and a roaming call's INVITE came to 4,120.

- recipients are named by subjectKeyIdentifier (24 octets in a kari) instead of issuer
  and serial number (62), in the envelope and in the sealed SDP keys, except toward a
  ``[[legacy]]`` peer and for a certificate without the extension;
- a proxy leaves ``expires`` out of its policy when it is the 3600 a UA assumes.
"""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from e2m_lab.flows import (SRTP_OFFER, TRUSTED, SipPath, invite, known_proxy, proxy_engine,
                           ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins.body import message_body, top_parts
from e2m_plugins.cms import CertificateKey, open_envelope
from e2m_plugins.cms.envelope import describe_envelope
from e2m_plugins.cms.recipients import issuer_and_serial, subject_key_identifier
from e2m_plugins.config import LegacyPeer
from e2m_plugins.ua import UAEngine
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _envelope(msg):
    (part,) = top_parts(message_body(msg))
    return part.decoded()


def _signed_inside(world, msg) -> bytes:
    """The SignedData bob finds in the envelope (its signed attributes in the clear)."""
    bob = world.user("bob")
    return open_envelope(_envelope(msg), [CertificateKey(bob.cert, bob.key)]).plaintext


def test_a_split_invite_names_bob_and_the_proxy_by_ski_and_still_opens(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(world, SRTP_OFFER))
    assert sent.info.split and sent.info.signed and sent.info.readable_by == (TRUSTED,)
    ids = [r.identifier for r in describe_envelope(_envelope(sent.message)).recipients]
    assert len(ids) == 2 and all(i.startswith("ski=") for i in ids), ids
    assert sorted(ids) == sorted("ski=" + subject_key_identifier(c).hex() for c in
                                 (world.user("bob").cert, world.proxy(TRUSTED).cert))
    # the sealed SDP keys (a signed attribute) name bob by SKI too, never by issuer+serial
    inner = _signed_inside(world, sent.message)
    assert issuer_and_serial(world.user("bob").cert) not in inner
    assert subject_key_identifier(world.user("bob").cert) in inner
    # nothing lost: the proxy reads the SDP without keys, bob gets it with them
    trip = SipPath([proxy_engine(world, TRUSTED, view=SDP_VIEW)]).request(sent.message)
    (seen,) = trip.seen_by(TRUSTED)
    assert b"a=crypto" not in seen.plaintext and b"m=audio" in seen.plaintext
    opened = ua_engine(world, "bob").open(trip.delivered)
    assert opened.message.body == SRTP_OFFER and opened.info.trusted


def test_a_legacy_peer_still_gets_issuer_and_serial(world):
    """RFC 3261 stacks (reSIProcate) look for their issuerAndSerialNumber."""
    alice = ua_engine(world, "alice", legacy=(LegacyPeer(world.aor("bob"), sign=True),))
    sent = alice.protect(invite(world))
    (recipient,) = describe_envelope(_envelope(sent.message)).recipients
    assert recipient.identifier.startswith("issuer-serial="), recipient


def test_a_certificate_without_ski_is_named_by_issuer_and_serial(world):
    """SKI only from the extension: another stack would not compute RFC 5280's method 1."""
    bob = world.user("bob")
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder().subject_name(bob.cert.subject).issuer_name(
        world.ca.cert.subject).public_key(bob.cert.public_key()).serial_number(
        x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1)
                                                      ).not_valid_after(
        now + datetime.timedelta(days=1))
    for ext in bob.cert.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(ext.value, ext.critical)
    bare = builder.sign(world.ca.key, hashes.SHA256())
    with pytest.raises(x509.ExtensionNotFound):
        bare.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    alice = ua_engine(world, "alice")
    alice = UAEngine(dataclasses.replace(alice.config, peers={world.aor("bob"): bare}))
    sent = alice.protect(invite(world))
    (recipient,) = describe_envelope(_envelope(sent.message)).recipients
    assert recipient.identifier.startswith("issuer-serial="), recipient
    # and bob's key still opens it
    opened = open_envelope(_envelope(sent.message), [CertificateKey(bare, bob.key)])
    assert opened.plaintext


def test_the_policy_leaves_out_the_default_expires_and_keeps_any_other(world):
    name, value = proxy_engine(world, TRUSTED, view=SDP_VIEW).policy_header()
    assert name == hdr.PROXY_BODY_POLICY and "expires" not in value
    (policy,) = hdr.parse_policy_headers([value])
    assert policy.expires is None and policy.cert_fingerprint and policy.cert_url
    _, short = proxy_engine(world, TRUSTED, view=SDP_VIEW, policy_expires=60).policy_header()
    assert hdr.parse_policy_headers([short])[0].expires == 60
    _, withdrawn = proxy_engine(world, TRUSTED, view=SDP_VIEW, policy_expires=0).policy_header()
    assert hdr.parse_policy_headers([withdrawn])[0].expires == 0
