"""What an opener of untrusted CMS input accepts: sizes, counts and algorithms."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LimitExceededError


@dataclass(frozen=True)
class Limits:
    """Upper bounds for untrusted input; the defaults suit SIP bodies.

    SIP over UDP keeps bodies near 1300 octets and TCP bodies rarely pass a few
    kilobytes, so 256 KiB leaves room for certificates without inviting abuse.
    """

    max_body_bytes: int = 256 * 1024
    max_recipients: int = 16
    max_nesting_depth: int = 4
    max_certificates: int = 16
    max_signers: int = 8
    max_attributes: int = 32
    # DER/BER elements one CMS body may make the reader read (each is read once,
    # see cms/der.py).  An envelope for 16 recipients is a few hundred.
    max_der_elements: int = 4096
    # Public-key operations one message may cost (see cms/budget.py).
    max_public_key_ops: int = 32
    # Algorithms.  CBC has no integrity (a padding oracle at a proxy, tampering by
    # anyone): refused unless a setting names who may send it.  3DES and SHA-1
    # signatures are refused unless legacy algorithms are allowed.
    accept_cbc: bool = False
    # CBC with no signature over it (inside or outside) gives whoever can send us a
    # tampered copy a padding oracle: its success and its failure are told apart.  Even
    # where CBC is accepted it must be signed, unless this says otherwise.
    accept_unsigned_cbc: bool = False
    accept_legacy_algorithms: bool = False
    min_rsa_bits: int = 2048
    # Certificates (certpath, signed).  Keys are checked before any operation with them:
    # RSA (and DSA) moduli of min_rsa_bits..max_rsa_bits, RSA exponents odd and < 2^32.
    max_rsa_bits: int = 8192
    max_certificate_bytes: int = 16 * 1024   # one DER certificate
    max_san_entries: int = 100               # subjectAltName entries, nameConstraints subtrees
    max_path_checks: int = 64                # candidate issuers visited while building one path
    # A certificate is counted with cms.der before cryptography reads it, which builds a
    # Python object per name attribute and extension entry (certfiles.certificate_counts).
    # Real names have fewer than 15 attributes (a CA's: C, O, OU, CN; a user's a few more);
    # 32 leaves room for the longest seen and none for a stranger's 670 (review 103).
    max_name_attributes: int = 32            # per subject or issuer Name
    # Every element of one certificate, extension contents included: a user certificate
    # of ours is ~100, one with 100 SAN URIs ~260.  Bounds what SAN directoryNames,
    # CRL distribution points, policies or unknown extensions can make cryptography build.
    max_certificate_elements: int = 512

    def check_size(self, length: int) -> None:
        if length > self.max_body_bytes:
            raise LimitExceededError(
                f"body of {length} bytes exceeds the limit of {self.max_body_bytes}")

    def check_count(self, what: str, count: int, bound: int) -> None:
        if count > bound:
            raise LimitExceededError(f"{count} {what} exceed the limit of {bound}")


DEFAULT_LIMITS = Limits()
