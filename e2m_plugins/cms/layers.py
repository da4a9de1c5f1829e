"""Open a message through all its CMS layers: envelopes and signatures, either order.

RFC 8591 and e2m-sec-02 send SignedData inside the envelope (sign, then
encrypt); RFC 3261 §23.2 sends the envelope inside SignedData.  Senders also
nest at two levels: directly in CMS (eContentType ``signed-data``) or through
a MIME entity (``Content-Type: application/pkcs7-mime`` inside the plaintext).
``open_message`` follows each layer, bounded by ``Limits.max_nesting_depth``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509

from .envelope import OpenedEnvelope, content_info_type, open_envelope
from .inputs import CmsInput, load_cms_message
from .limits import DEFAULT_LIMITS, Limits
from .recipients import OpeningKey
from .signed import VerifyResult, verify
from . import oids
from ..errors import LimitExceededError, MalformedError, UnsupportedAlgorithmError

_CMS_TYPES = {"signed-data", "enveloped-data", "auth-enveloped-data"}
# A MIME header block whose Content-Type carries CMS, looked for in the first lines only.
_CMS_ENTITY = re.compile(
    rb"(?im)^content-type:[ \t]*(application/(x-)?pkcs7-(mime|signature)|multipart/signed)\b")
_HEAD_SCAN = 4096


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


def _nested(content: bytes, content_type: str, limits: Limits) -> CmsInput | None:
    """The CMS inside a layer's content, or None when the content is final."""
    if content_type in _CMS_TYPES:
        return CmsInput(der=content)
    if content_type != "data":
        return None
    head = content[:_HEAD_SCAN]
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None or not _CMS_ENTITY.search(head[:end.start()]):
        return None
    return load_cms_message(content, limits=limits)


def open_message(data: bytes, *, keys: Sequence[OpeningKey] = (),
                 trust_anchors: Sequence[x509.Certificate] = (), want_cek: bool = False,
                 at: datetime | None = None, check_time: bool = True,
                 extra_certs: Sequence[x509.Certificate] = (),
                 limits: Limits = DEFAULT_LIMITS) -> OpenedMessage:
    """Decrypt and verify every layer of ``data`` (DER, PEM or an S/MIME entity).

    Each signature must verify against ``trust_anchors``; each envelope must
    be addressed to one of ``keys``.  Raises the typed errors of the layer
    that failed.
    """
    current: CmsInput | None = load_cms_message(data, limits=limits)
    layers: list[OpenedEnvelope | VerifyResult] = []
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
            result = verify(current.der, trust_anchors=trust_anchors,
                            detached_content=current.detached_content, at=at,
                            check_time=check_time, extra_certs=extra_certs, limits=limits)
            layers.append(result)
            content, content_type = result.content, result.content_type
        else:
            raise UnsupportedAlgorithmError(f"CMS content type {kind} is not supported")
        current = _nested(content, content_type, limits)
    return OpenedMessage(content, content_type, tuple(layers))
