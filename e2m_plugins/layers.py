"""Every layer of a CMS message opened: envelopes decrypted, signatures verified.

RFC 8591 and e2m-sec-02 send SignedData inside the envelope (sign, then
encrypt); RFC 3261 §23.2 sends the envelope inside SignedData.  Senders also
nest at two levels: directly in CMS (eContentType ``signed-data``) or through
a MIME entity inside the plaintext.  Both orders and both levels are opened,
bounded by ``Limits.max_nesting_depth``.

The public-key work of every layer (decryptions, signature checks, certificate
paths) is counted against one budget, ``Limits.max_public_key_ops``; an engine
that opens several parts of one SIP message wraps them all in one
``budget.message_budget`` so the bound holds per message, not per part.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509

from .cms import oids
from .cms.budget import budget_scope
from .cms.envelope import OpenedEnvelope, content_info_type, open_envelope
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.recipients import OpeningKey
from .cms.signed import VerifyResult
from .cmsinput import CmsInput, load_cms_message, nested_cms, verify_input
from .errors import (DecryptionError, E2MError, LimitExceededError, MalformedError,
                     UnsupportedAlgorithmError)

__all__ = ["OpenedMessage", "open_message", "unauthenticated_plaintext"]


@dataclass(frozen=True, repr=False)
class OpenedMessage:
    """The innermost content and every layer it came through, outermost first."""

    content: bytes
    content_type: str
    layers: tuple[OpenedEnvelope | VerifyResult, ...]

    @property
    def envelopes(self) -> tuple[OpenedEnvelope, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, OpenedEnvelope))

    @property
    def signatures(self) -> tuple[VerifyResult, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, VerifyResult))

    @property
    def encrypted(self) -> bool:
        return bool(self.envelopes)

    @property
    def signed(self) -> bool:
        return bool(self.signatures)

    @property
    def order(self) -> str:
        """"sign-then-encrypt", "encrypt-then-sign", "encrypted", "signed" or "plain"."""
        kinds = ["E" if isinstance(layer, OpenedEnvelope) else "S" for layer in self.layers]
        if "E" in kinds and "S" in kinds:
            return "sign-then-encrypt" if kinds.index("E") < kinds.index("S") else "encrypt-then-sign"
        return "encrypted" if "E" in kinds else "signed" if "S" in kinds else "plain"

    def __repr__(self) -> str:
        return f"OpenedMessage({self.order}, {self.content_type}, {len(self.content)} bytes)"


def open_message(data: bytes, *, keys: Sequence[OpeningKey] = (),
                 trust_anchors: Sequence[x509.Certificate] = (), want_cek: bool = False,
                 at: datetime | None = None, check_time: bool = True,
                 extra_certs: Sequence[x509.Certificate] = (),
                 limits: Limits = DEFAULT_LIMITS) -> OpenedMessage:
    """Decrypt and verify every layer of ``data`` (DER, PEM or an S/MIME entity).

    Each signature must verify against ``trust_anchors``; each envelope must
    be addressed to one of ``keys``.  Raises the typed errors of the layer
    that failed.  CBC envelopes are opened only with ``limits.accept_cbc``
    (``DecryptionError`` otherwise, as for a wrong key), and only when a signature
    covers them (inside or outside), unless ``limits.accept_unsigned_cbc``.
    """
    current: CmsInput | None = load_cms_message(data, limits=limits)
    layers: list[OpenedEnvelope | VerifyResult] = []
    try:
        with budget_scope(limits.max_public_key_ops):
            opened = _open_layers(current, layers, keys=keys, trust_anchors=trust_anchors,
                                  want_cek=want_cek, at=at, check_time=check_time,
                                  extra_certs=extra_certs, limits=limits)
        if opened.signatures or not unauthenticated_plaintext(layers) \
                or limits.accept_unsigned_cbc:
            return opened
        # CBC that no signature covers: a tampered copy that kept its padding would open,
        # one that did not would fail; that difference is the oracle.  Both fail here.
    except E2MError:
        if not unauthenticated_plaintext(layers):
            raise
    # CBC has no integrity: whatever fails after a CBC layer decrypted (garbage that
    # kept valid padding, a signature over tampered blocks) must get the same answer
    # as bad padding, or the difference is a padding oracle (Vaudenay).
    raise DecryptionError() from None


def unauthenticated_plaintext(layers: Sequence[OpenedEnvelope | VerifyResult]) -> bool:
    """True when some layer was decrypted without integrity (EnvelopedData: CBC)."""
    return any(isinstance(layer, OpenedEnvelope) and layer.envelope_type == "enveloped-data"
               for layer in layers)


def _open_layers(current: CmsInput | None, layers: list[OpenedEnvelope | VerifyResult], *,
                 keys: Sequence[OpeningKey], trust_anchors: Sequence[x509.Certificate],
                 want_cek: bool, at: datetime | None, check_time: bool,
                 extra_certs: Sequence[x509.Certificate], limits: Limits) -> OpenedMessage:
    content, content_type = b"", "data"
    while current is not None:
        if len(layers) >= limits.max_nesting_depth:
            raise LimitExceededError(f"more than {limits.max_nesting_depth} nested CMS layers")
        kind = oids.name_of(content_info_type(current.der))
        if kind in ("enveloped-data", "auth-enveloped-data"):
            if current.detached_content is not None:
                raise MalformedError("an envelope cannot be a detached signature")
            opened = open_envelope(current.der, list(keys), want_cek=want_cek, limits=limits)
            layers.append(opened)
            content, content_type = opened.plaintext, opened.content_type
        elif kind == "signed-data":
            result = verify_input(current, trust_anchors=trust_anchors, at=at, check_time=check_time,
                                  extra_certs=extra_certs, limits=limits)
            layers.append(result)
            content, content_type = result.content, result.content_type
        else:
            raise UnsupportedAlgorithmError(f"CMS content type {kind} is not supported")
        current = nested_cms(content, content_type, limits)
    return OpenedMessage(content, content_type, tuple(layers))
