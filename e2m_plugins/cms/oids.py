"""Object identifiers used by the CMS layer, with short readable names."""

from __future__ import annotations

# Content types (RFC 5652, RFC 5083)
DATA = "1.2.840.113549.1.7.1"
SIGNED_DATA = "1.2.840.113549.1.7.2"
ENVELOPED_DATA = "1.2.840.113549.1.7.3"
AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
DIGESTED_DATA = "1.2.840.113549.1.7.5"
ENCRYPTED_DATA = "1.2.840.113549.1.7.6"
AUTHENTICATED_DATA = "1.2.840.113549.1.9.16.1.2"
COMPRESSED_DATA = "1.2.840.113549.1.9.16.1.9"

# Attributes
CONTENT_TYPE_ATTR = "1.2.840.113549.1.9.3"
MESSAGE_DIGEST_ATTR = "1.2.840.113549.1.9.4"
SIGNING_TIME_ATTR = "1.2.840.113549.1.9.5"
CEK_REFERENCE = "1.2.840.113549.1.9.16.2.30"      # RFC 3185 id-aa-CEKReference
CEK_MAX_DECRYPTS = "1.2.840.113549.1.9.16.2.31"   # RFC 3185 id-aa-CEKMaxDecrypts
# Our own attribute (docs/protocol.md §2): the SIP message an envelope belongs to.
# A UUID-based OID (X.667, arc 2.25) needs no registration and cannot collide.
SIP_CONTEXT = "2.25.332687052271650812903644570241587645908"
# Our own signed attribute (docs/protocol.md §6.1): an SDP's keying lines, sealed for the
# peer alone (an AuthEnvelopedData whose content is SdpKeys).
SDP_KEYS = "2.25.295584270981942484695982166604888077255"
# Our own signed attribute (docs/protocol.md §2): the To tag of the message a body was
# signed for ("" when it has none), apart from SIP_CONTEXT so that readers that predate
# it still read the context (an unknown attribute is ignored).
SIP_TO_TAG = "2.25.217932073687819758014915659225280083837"

# Content encryption
AES128_CBC = "2.16.840.1.101.3.4.1.2"
AES192_CBC = "2.16.840.1.101.3.4.1.22"
AES256_CBC = "2.16.840.1.101.3.4.1.42"
AES128_GCM = "2.16.840.1.101.3.4.1.6"
AES192_GCM = "2.16.840.1.101.3.4.1.26"
AES256_GCM = "2.16.840.1.101.3.4.1.46"
DES_EDE3_CBC = "1.2.840.113549.3.7"
RC2_CBC = "1.2.840.113549.3.2"
CHACHA20_POLY1305 = "1.2.840.113549.1.9.16.3.18"

# Key wrap
AES128_WRAP = "2.16.840.1.101.3.4.1.5"
AES192_WRAP = "2.16.840.1.101.3.4.1.25"
AES256_WRAP = "2.16.840.1.101.3.4.1.45"
CMS3DES_WRAP = "1.2.840.113549.1.9.16.3.6"
CMSRC2_WRAP = "1.2.840.113549.1.9.16.3.7"

# Key transport
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
RSAES_OAEP = "1.2.840.113549.1.1.7"
MGF1 = "1.2.840.113549.1.1.8"
P_SPECIFIED = "1.2.840.113549.1.1.9"

# Key agreement (RFC 5753, RFC 8418)
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"
X25519 = "1.3.101.110"
STDDH_SHA1KDF = "1.3.133.16.840.63.0.2"
STDDH_SHA224KDF = "1.3.132.1.11.0"
STDDH_SHA256KDF = "1.3.132.1.11.1"
STDDH_SHA384KDF = "1.3.132.1.11.2"
STDDH_SHA512KDF = "1.3.132.1.11.3"
STDDH_HKDF_SHA256 = "1.2.840.113549.1.9.16.3.19"
STDDH_HKDF_SHA384 = "1.2.840.113549.1.9.16.3.20"
STDDH_HKDF_SHA512 = "1.2.840.113549.1.9.16.3.21"

# Signature algorithms (RFC 3279, RFC 4055, RFC 5754, RFC 5758, RFC 8410, RFC 8419).
# RSA_ENCRYPTION, EC_PUBLIC_KEY and MGF1 above double as signature identifiers.
RSASSA_PSS = "1.2.840.113549.1.1.10"
SHA1_WITH_RSA = "1.2.840.113549.1.1.5"
SHA224_WITH_RSA = "1.2.840.113549.1.1.14"
SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
SHA384_WITH_RSA = "1.2.840.113549.1.1.12"
SHA512_WITH_RSA = "1.2.840.113549.1.1.13"
ECDSA_WITH_SHA1 = "1.2.840.10045.4.1"
ECDSA_WITH_SHA224 = "1.2.840.10045.4.3.1"
ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
ECDSA_WITH_SHA384 = "1.2.840.10045.4.3.3"
ECDSA_WITH_SHA512 = "1.2.840.10045.4.3.4"
ED25519 = "1.3.101.112"
ED448 = "1.3.101.113"
DSA = "1.2.840.10040.4.1"
DSA_WITH_SHA1 = "1.2.840.10040.4.3"
DSA_WITH_SHA1_OIW = "1.3.14.3.2.27"    # the old OIW form
DSA_WITH_SHA224 = "2.16.840.1.101.3.4.3.1"
DSA_WITH_SHA256 = "2.16.840.1.101.3.4.3.2"

# Digests
SHA1 = "1.3.14.3.2.26"
SHA224 = "2.16.840.1.101.3.4.2.4"
SHA256 = "2.16.840.1.101.3.4.2.1"
SHA384 = "2.16.840.1.101.3.4.2.2"
SHA512 = "2.16.840.1.101.3.4.2.3"

NAMES: dict[str, str] = {
    DATA: "data", SIGNED_DATA: "signed-data", ENVELOPED_DATA: "enveloped-data",
    AUTH_ENVELOPED_DATA: "auth-enveloped-data", DIGESTED_DATA: "digested-data",
    ENCRYPTED_DATA: "encrypted-data", AUTHENTICATED_DATA: "authenticated-data",
    COMPRESSED_DATA: "compressed-data",
    CONTENT_TYPE_ATTR: "content-type", MESSAGE_DIGEST_ATTR: "message-digest",
    SIGNING_TIME_ATTR: "signing-time",
    CEK_REFERENCE: "cek-reference", CEK_MAX_DECRYPTS: "cek-max-decrypts",
    SIP_CONTEXT: "e2m-sip-context", SDP_KEYS: "e2m-sdp-keys", SIP_TO_TAG: "e2m-sip-to-tag",
    AES128_CBC: "aes-128-cbc", AES192_CBC: "aes-192-cbc", AES256_CBC: "aes-256-cbc",
    AES128_GCM: "aes-128-gcm", AES192_GCM: "aes-192-gcm", AES256_GCM: "aes-256-gcm",
    DES_EDE3_CBC: "des-ede3-cbc", RC2_CBC: "rc2-cbc", CHACHA20_POLY1305: "chacha20-poly1305",
    AES128_WRAP: "aes128-wrap", AES192_WRAP: "aes192-wrap", AES256_WRAP: "aes256-wrap",
    CMS3DES_WRAP: "cms3des-wrap", CMSRC2_WRAP: "cmsrc2-wrap",
    RSA_ENCRYPTION: "rsa-pkcs1v15", RSAES_OAEP: "rsaes-oaep",
    EC_PUBLIC_KEY: "ec-public-key", X25519: "x25519",
    STDDH_SHA1KDF: "ecdh-x963kdf-sha1", STDDH_SHA224KDF: "ecdh-x963kdf-sha224",
    STDDH_SHA256KDF: "ecdh-x963kdf-sha256", STDDH_SHA384KDF: "ecdh-x963kdf-sha384",
    STDDH_SHA512KDF: "ecdh-x963kdf-sha512", STDDH_HKDF_SHA256: "ecdh-hkdf-sha256",
    STDDH_HKDF_SHA384: "ecdh-hkdf-sha384", STDDH_HKDF_SHA512: "ecdh-hkdf-sha512",
    SHA1: "sha1", SHA224: "sha224", SHA256: "sha256", SHA384: "sha384", SHA512: "sha512",
}


CONTENT_TYPES: dict[str, str] = {
    name: oid for oid, name in NAMES.items()
    if oid in (DATA, SIGNED_DATA, ENVELOPED_DATA, AUTH_ENVELOPED_DATA, DIGESTED_DATA,
               ENCRYPTED_DATA, AUTHENTICATED_DATA, COMPRESSED_DATA)
}


def name_of(dotted: str) -> str:
    """Readable name for an OID, or the dotted form when we have none."""
    return NAMES.get(dotted, dotted)
