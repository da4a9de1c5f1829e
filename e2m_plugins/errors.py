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


# --------------------------------------------------------------------------
# SIP-level refusals raised by the UA and proxy engines.  Each has a row in
# e2m_plugins.sip_errors, which turns it into a SIP answer per role.


class PolicyError(E2MError):
    """The message is well-formed but local E2M policy refuses it."""


class ProxyCannotDecryptError(E2MError):
    """A proxy must view a body (or the part of type ``content_type``) it cannot read.

    ``content_type`` None means the proxy needs the whole body, which the 496
    answer signals by leaving out the Warning (e2m-sec-02; protocol digest §3.2).
    """

    def __init__(self, message: str = "proxy cannot view the body",
                 content_type: str | None = None) -> None:
        super().__init__(message)
        self.content_type = content_type


class SignatureRequiredError(PolicyError):
    """Integrity is required here but the body carries no signature over it."""


class UnsupportedMediaTypeError(E2MError):
    """The body (or a part that matters) is of a media type we do not take.

    ``accept`` overrides the Accept list of the 415 answer when given.
    """

    def __init__(self, message: str = "unsupported media type",
                 content_type: str | None = None, accept: str | None = None) -> None:
        super().__init__(message)
        self.content_type = content_type
        self.accept = accept


class UndecipherableError(E2MError):
    """An encrypted body addressed to us cannot be opened with our keys."""


class DowngradeError(PolicyError):
    """Plaintext, or a body stripped of protection, where E2M protection is required."""


class BindingMismatchError(PolicyError):
    """The body was encrypted for another SIP message (other Call-ID, tag or CSeq):
    copied from another dialog or replayed (docs/protocol.md §2, SIP binding)."""


class MergedRequestError(BindingMismatchError):
    """A new dialog's request names, as its sender's tag, a tag of a dialog of ours under
    way under its Call-ID: the same request by another path (RFC 3261 §8.2.2.2) or a
    hop's copy with its tag re-cased (docs/protocol.md §2)."""


class ReplayError(PolicyError):
    """The body was seen before (a copy of an earlier message), or was made outside
    the accepted time window (docs/protocol.md §2, SIP context)."""


class InconsistentSplitError(PolicyError):
    """The proxy's view of a split SDP is not the full copy without its keys: the
    sender showed the proxy one session and the peer another."""


class CertificateRejectedError(UntrustedSignerError):
    """A certificate we were asked to rely on failed the checks: chain, time,
    name or key type.  Typically the certificate of a 496 or a policy header,
    or a peer certificate before encrypting to it; at a UA it is a local
    decision, never answered on the wire."""
