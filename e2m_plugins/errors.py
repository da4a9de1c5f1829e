"""One small hierarchy of typed errors for everything the core refuses.

Adapters map these to SIP answers; callers catch ``E2MError`` to know that the
input (not the program) was at fault.  Messages never carry plaintext or keys.
"""

from __future__ import annotations


class E2MError(Exception):
    """Base of every error the core raises on bad or unacceptable input."""


class MalformedError(E2MError):
    """The input is not well-formed (bad DER, bad base64, bad MIME, bad PEM)."""


class UnsupportedAlgorithmError(E2MError):
    """Well-formed, but uses an algorithm or structure this core does not open."""


class NoMatchingRecipientError(E2MError):
    """None of the RecipientInfos is addressed to any key we were given."""


class DecryptionError(E2MError):
    """Decryption failed: wrong key, tampered ciphertext, bad padding or tag.

    Deliberately carries no detail about which step failed, so that RSA
    padding errors cannot be told apart from any other failure.
    """

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


class SignatureInvalidError(E2MError):
    """A signature or message digest does not match the content."""


class UntrustedSignerError(E2MError):
    """The signature is sound but its signer does not chain to a trust anchor,
    is outside its validity period, or is not the identity we expected."""


class LimitExceededError(E2MError):
    """The input is larger or deeper than the configured limits allow."""
