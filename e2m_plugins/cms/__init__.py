"""CMS for E2M: multi-recipient envelopes, CEK reuse, signatures.

Build with ``seal`` and ``sign``; open with ``open_envelope`` or ``verify``.
``e2m_plugins.layers.open_message`` unwraps nested sign/encrypt layers.  All failures on
untrusted input are ``e2m_plugins.errors.E2MError`` subclasses.
"""

from .ciphers import DEFAULT_CIPHER, ENCRYPT_CIPHERS
from .envelope import (
    Attribute,
    EnvelopeDescription,
    OpenedEnvelope,
    Sealed,
    cek_reference_attributes,
    content_info_type,
    describe_envelope,
    open_envelope,
    seal,
)
from .limits import DEFAULT_LIMITS, Limits
from .recipients import (
    CertificateKey,
    KekLookup,
    KeyAgreeRecipient,
    KeyTransRecipient,
    RecipientSummary,
    SharedKEK,
    recipient_for_certificate,
    reuse_kek,
)
from .signed import SignerInfoResult, VerifyResult, sign, verify

__all__ = [
    "DEFAULT_CIPHER", "ENCRYPT_CIPHERS", "Attribute", "EnvelopeDescription", "OpenedEnvelope",
    "Sealed", "cek_reference_attributes", "content_info_type", "describe_envelope",
    "open_envelope", "seal", "DEFAULT_LIMITS", "Limits", "CertificateKey", "KeyAgreeRecipient",
    "KekLookup", "KeyTransRecipient", "RecipientSummary", "SharedKEK", "recipient_for_certificate", "reuse_kek",
    "SignerInfoResult", "VerifyResult", "sign", "verify",
]
