"""Envelope round trips across ciphers, recipient kinds and counts, plus CEK reuse."""

from __future__ import annotations

import itertools

import pytest
from asn1crypto import cms as a1cms

from e2m_plugins.cms import (
    CertificateKey,
    KeyAgreeRecipient,
    KeyTransRecipient,
    Limits,
    SharedKEK,
    describe_envelope,
    open_envelope,
    reuse_kek,
    seal,
)
from e2m_plugins.errors import (
    DecryptionError,
    LimitExceededError,
    MalformedError,
    NoMatchingRecipientError,
)

CONTENT = b"Content-Type: application/sdp\r\n\r\nv=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\n"
CIPHERS = ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"]
# CBC (EnvelopedData) is opened only when a setting accepts it (tests/unit/test_cms_attacks.py).
CBC = Limits(accept_cbc=True)
KEK16 = SharedKEK(b"kek-16", bytes(range(16)))
KEK32 = SharedKEK(b"kek-32", bytes(range(32)))


def _party(pki, kind: str):
    """(recipient spec, opening key) for one recipient kind."""
    if kind == "kekri-128":
        return KEK16, KEK16
    if kind == "kekri-256":
        return KEK32, KEK32
    table = {
        "ktri-v15": ("bob", "rsa", lambda c: KeyTransRecipient(c)),
        "ktri-oaep-ski": ("alice", "rsa", lambda c: KeyTransRecipient(c, oaep=True, use_ski=True)),
        "kari-p256": ("bob", "ec", lambda c: KeyAgreeRecipient(c)),
        "kari-p256-ski-ukm": ("alice", "ec", lambda c: KeyAgreeRecipient(c, use_ski=True, ukm=b"u" * 8)),
        "kari-x25519-hkdf": ("dana", "x25519", lambda c: KeyAgreeRecipient(c)),
        "kari-x25519-x963": ("dana", "x25519", lambda c: KeyAgreeRecipient(c, kdf="x963-sha256",
                                                                             wrap="aes256-wrap")),
    }
    user, key_type, make = table[kind]
    cred = pki.user(user, key_type)
    return make(cred.cert), CertificateKey(cred.cert, cred.key)


KINDS = ["ktri-v15", "ktri-oaep-ski", "kari-p256", "kari-p256-ski-ukm", "kari-x25519-hkdf",
         "kari-x25519-x963", "kekri-128", "kekri-256"]


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("kind", KINDS)
def test_single_recipient_round_trip(pki, cipher, kind):
    spec, key = _party(pki, kind)
    sealed = seal(CONTENT, [spec], cipher=cipher)
    opened = open_envelope(sealed.der, [key], want_cek=True, limits=CBC)
    assert opened.plaintext == CONTENT
    assert opened.content_algorithm == cipher
    assert opened.recipient.kind == kind.split("-")[0]
    assert opened.cek == sealed.cek
    assert opened.envelope_type == ("auth-enveloped-data" if "gcm" in cipher else "enveloped-data")
    # asn1crypto, an independent parser, reads what we wrote.
    parsed = a1cms.ContentInfo.load(sealed.der)
    parsed.native  # noqa: B018 - forces a full parse


# 1-4 recipients drawn from distinct kinds; every recipient opens on its own.
GROUPS = [("ktri-v15",), ("ktri-v15", "kari-x25519-hkdf"),
          ("ktri-oaep-ski", "kari-p256", "kekri-128"),
          ("ktri-v15", "kari-p256-ski-ukm", "kari-x25519-x963", "kekri-256")]


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "+".join(g))
def test_multi_recipient_each_opens_independently(pki, cipher, group):
    parties = [_party(pki, kind) for kind in group]
    sealed = seal(CONTENT, [spec for spec, _ in parties], cipher=cipher)
    assert len(describe_envelope(sealed.der).recipients) == len(group)
    for kind, (_, key) in zip(group, parties):
        opened = open_envelope(sealed.der, [key], limits=CBC)
        assert opened.plaintext == CONTENT, kind
        assert opened.recipient_count == len(group)


def test_cek_reuse_rfc3185(pki):
    """INVITE carries a CEKReference; the 200 OK goes under a kekri from the reversed CEK."""
    bob = pki.user("bob")
    proxy = pki.proxy("proxy.example.com", "x25519")
    invite = seal(CONTENT, [KeyTransRecipient(bob.cert), KeyAgreeRecipient(proxy.cert)],
                  cek_reference=b"ref-1", cek_max_decrypts=5)
    at_proxy = open_envelope(invite.der, [CertificateKey(proxy.cert, proxy.key)], want_cek=True)
    assert at_proxy.cek_reference == b"ref-1"
    assert at_proxy.cek_max_decrypts == 5
    # AuthEnvelopedData: under the GCM tag (docs/protocol.md §2, placement)
    assert {a.name for a in at_proxy.authenticated_attributes} == {"cek-reference", "cek-max-decrypts"}
    assert not at_proxy.unprotected_attributes
    answer = seal(b"answer", [reuse_kek(at_proxy.cek, at_proxy.cek_reference)])
    # The proxy and the caller both hold the first CEK: both read the answer.
    for holder_cek in (at_proxy.cek, invite.cek):
        opened = open_envelope(answer.der, [SharedKEK(b"ref-1", holder_cek[::-1])])
        assert opened.plaintext == b"answer"
        assert opened.recipient.kind == "kekri"
    # The un-reversed CEK is not the KEK (RFC 3185 byte reversal).
    with pytest.raises(DecryptionError):
        open_envelope(answer.der, [SharedKEK(b"ref-1", invite.cek)])


def test_cek_reference_in_enveloped_data_sets_version_2(pki):
    sealed = seal(CONTENT, [KeyTransRecipient(pki.user("bob").cert)], cipher="aes-128-cbc",
                  cek_reference=b"r")
    parsed = a1cms.ContentInfo.load(sealed.der)
    assert parsed["content"]["version"].native == "v2"
    assert parsed["content"]["unprotected_attrs"][0]["type"].dotted == "1.2.840.113549.1.9.16.2.30"


def test_cek_reference_goes_to_auth_attrs_for_gcm(pki):
    sealed = seal(CONTENT, [KEK16], cipher="aes-128-gcm", cek_reference=b"r")
    parsed = a1cms.ContentInfo.load(sealed.der)
    assert parsed["content"]["auth_attrs"][0]["type"].dotted == "1.2.840.113549.1.9.16.2.30"
    assert not parsed["content"]["unauth_attrs"]


def test_no_matching_recipient(pki):
    sealed = seal(CONTENT, [KeyTransRecipient(pki.user("bob").cert)])
    alice = pki.user("alice")
    with pytest.raises(NoMatchingRecipientError):
        open_envelope(sealed.der, [CertificateKey(alice.cert, alice.key), KEK16])


def test_wrong_private_key_for_matching_certificate(pki):
    """A certificate that matches the rid but the wrong key: decryption error, not a crash."""
    bob, alice = pki.user("bob"), pki.user("alice")
    for cipher in CIPHERS:
        sealed = seal(CONTENT, [KeyTransRecipient(bob.cert)], cipher=cipher)
        if "gcm" in cipher:
            with pytest.raises(DecryptionError):
                open_envelope(sealed.der, [CertificateKey(bob.cert, alice.key)])
            continue
        # CBC has no integrity: the fallback CEK passes the PKCS#7 padding check
        # about once in 256 envelopes, and the envelope layer then returns garbage
        # (body.open_part turns that into the same DecryptionError). What must
        # hold every time: no crash, and never the plaintext.
        with pytest.raises(DecryptionError):  # refused by default
            open_envelope(sealed.der, [CertificateKey(bob.cert, alice.key)])
        for _ in range(8):
            try:
                opened = open_envelope(sealed.der, [CertificateKey(bob.cert, alice.key)], limits=CBC)
            except DecryptionError:
                continue
            assert opened.plaintext != CONTENT
    dana, bob_ec = pki.user("dana", "x25519"), pki.user("bob", "ec")
    sealed = seal(CONTENT, [KeyAgreeRecipient(dana.cert)])
    with pytest.raises(DecryptionError):
        open_envelope(sealed.der, [CertificateKey(dana.cert, pki.proxy("proxy.example.com", "x25519").key)])
    sealed = seal(CONTENT, [KeyAgreeRecipient(bob_ec.cert)])
    with pytest.raises(DecryptionError):
        open_envelope(sealed.der, [CertificateKey(bob_ec.cert, pki.user("alice", "ec").key)])


def test_wrong_kek_with_same_id():
    sealed = seal(CONTENT, [KEK16])
    with pytest.raises(DecryptionError):
        open_envelope(sealed.der, [SharedKEK(KEK16.key_id, bytes(16))])


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1:]


@pytest.mark.parametrize("cipher", CIPHERS)
def test_tampered_ciphertext_is_a_decryption_error(cipher):
    sealed = seal(CONTENT * 3, [KEK16], cipher=cipher)
    if "gcm" in cipher:
        # The last content bytes sit just before the 16-byte tag.
        offset, mask = len(sealed.der) - 20, 0x01
    else:
        # CBC content ends the DER. Flipping bit 4 of the last byte of the
        # second-to-last block flips the same bit of the pad-length byte, which
        # (1..16) then becomes 0 or 17..31: always bad padding. Tampering the last
        # block itself would randomise it and pass the pad check 1 time in 256.
        offset, mask = len(sealed.der) - 17, 0x10
    with pytest.raises(DecryptionError):
        open_envelope(_flip(sealed.der, offset, mask), [KEK16], limits=CBC)


def test_wrong_gcm_tag():
    sealed = seal(CONTENT, [KEK16], cipher="aes-128-gcm")
    with pytest.raises(DecryptionError):
        open_envelope(_flip(sealed.der, len(sealed.der) - 1), [KEK16])


def test_authenticated_attributes_are_covered_by_the_tag():
    from e2m_plugins.cms import Attribute
    from e2m_plugins.cms import der

    attr = Attribute("1.3.6.1.4.1.99999.1", (der.octet_string(b"dialog-1"),))
    sealed = seal(CONTENT, [KEK16], authenticated_attributes=(attr,))
    opened = open_envelope(sealed.der, [KEK16])
    assert opened.authenticated_attributes == (attr,)
    tampered = sealed.der.replace(b"dialog-1", b"dialog-2")
    with pytest.raises(DecryptionError):
        open_envelope(tampered, [KEK16])


@pytest.mark.parametrize("cut", [1, 10, 40, 100])
def test_truncated_der_is_malformed(cut):
    sealed = seal(CONTENT, [KEK16])
    with pytest.raises(MalformedError):
        open_envelope(sealed.der[:-cut], [KEK16])


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"hello world", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff",
                                     b"\x30\x03\x06\x01\x2a", bytes(range(256))])
def test_garbage_is_malformed(garbage):
    with pytest.raises(MalformedError):
        open_envelope(garbage, [KEK16])


def test_trailing_bytes_rejected():
    sealed = seal(CONTENT, [KEK16])
    with pytest.raises(MalformedError):
        open_envelope(sealed.der + b"\x00", [KEK16])


def test_limits():
    big = seal(b"x" * 5000, [KEK16])
    with pytest.raises(LimitExceededError):
        open_envelope(big.der, [KEK16], limits=Limits(max_body_bytes=1000))
    many = seal(CONTENT, [SharedKEK(bytes([i + 1]), bytes(16)) for i in range(5)])
    with pytest.raises(LimitExceededError):
        open_envelope(many.der, [KEK16], limits=Limits(max_recipients=4))
    assert open_envelope(many.der, [SharedKEK(b"\x05", bytes(16))]).plaintext == CONTENT


def test_repr_never_shows_secrets():
    sealed = seal(CONTENT, [KEK16], cek_reference=b"r")
    opened = open_envelope(sealed.der, [KEK16], want_cek=True)
    for text in (repr(sealed), repr(opened), repr(KEK16)):
        assert "application/sdp" not in text
        assert sealed.cek.hex() not in text
        assert KEK16.kek.hex() not in text


def test_each_output_uses_a_fresh_cek_and_iv():
    one, two = seal(CONTENT, [KEK16]), seal(CONTENT, [KEK16])
    assert one.cek != two.cek and one.der != two.der


@pytest.mark.parametrize("a,b", list(itertools.combinations(["aes-128-cbc", "aes-128-gcm"], 2)))
def test_cipher_and_envelope_type_must_agree(a, b):
    """An EnvelopedData claiming a GCM cipher (or the reverse) is refused."""
    sealed = seal(CONTENT, [KEK16], cipher=a)
    swapped = sealed.der.replace(bytes.fromhex("0609608648016503040102"), bytes.fromhex("0609608648016503040106"))
    with pytest.raises(MalformedError):
        open_envelope(swapped, [KEK16])
