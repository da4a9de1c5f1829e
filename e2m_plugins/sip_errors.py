"""The one table from each typed error to the SIP answer a UA or a proxy gives.

Adapters catch ``E2MError``, call ``answer_for(error, role)`` and send what it
says; ``None`` means the error is local (nothing goes on the wire).  The table
is keyed by (error class, role); lookups follow the MRO, so a subclass without
its own row answers like its parent.  ``error_table_markdown`` renders the
table with the reason for every row (docs/protocol.md §8 holds its output).

495, 496 and warn-code 380 come from e2m-sec-02, were never registered, and
380 now means "SIPS Not Allowed" (RFC 5630): they are settings (``E2MCodes``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Union

from . import errors as e
from .grammar import quote_string

__all__ = [
    "Role",
    "ROLES",
    "E2MCodes",
    "DEFAULT_CODES",
    "DEFAULT_ACCEPT",
    "SipAnswer",
    "Row",
    "ERROR_TABLE",
    "INTERNAL_ERROR",
    "answer_for",
    "error_table_markdown",
]

Role = Literal["ua", "proxy"]
ROLES: tuple[Role, ...] = ("ua", "proxy")

# What a 415 lists when the error names nothing narrower.  A bare
# application/pkcs7-mime means every smime-type (RFC 8591).
DEFAULT_ACCEPT = ("application/pkcs7-mime, application/pkcs7-signature, multipart/signed, "
                  "multipart/mixed, application/sdp, text/plain")

MISC_WARN_CODE = 399  # RFC 3261 §20.43 "Miscellaneous warning": free text, registered


@dataclass(frozen=True)
class E2MCodes:
    """The draft's unregistered code points, and the 415 Accept list, as settings."""

    proxy_indecipherable: int = 496
    signature_required: int = 495
    warn_code: int = 380
    accept: str = DEFAULT_ACCEPT

    def __post_init__(self) -> None:
        for name in ("proxy_indecipherable", "signature_required"):
            if not 400 <= getattr(self, name) <= 699:
                raise ValueError(f"{name} must be a 4xx-6xx response code")
        if not 300 <= self.warn_code <= 399:
            raise ValueError("warn_code must be a 3xx warn-code (RFC 3261 §20.43)")
        if "\r" in self.accept or "\n" in self.accept:
            raise ValueError("accept must be one header line")


DEFAULT_CODES = E2MCodes()


@dataclass(frozen=True)
class SipAnswer:
    """A response to send: status, reason, and what goes with it.

    ``warning`` is a Warning header value with an ``{agent}`` placeholder
    (fill it with ``warning_header``); ``needs_certificate`` asks for our
    certificate as an ``application/pkix-cert`` body (496, and 493 which
    RFC 3261 lets carry the key to encrypt to); ``accept`` is the
    Accept header value of a 415.
    """

    code: int
    reason: str
    warning: str | None = None
    needs_certificate: bool = False
    accept: str | None = None

    def warning_header(self, agent: str) -> str | None:
        """The Warning value with ``agent`` (our host, or host:port) filled in."""
        if self.warning is None:
            return None
        if not _AGENT.fullmatch(agent):
            raise ValueError("warn-agent must be a host or host:port")
        # str.replace, not format: the text may hold braces from the wire.
        return self.warning.replace("{agent}", agent, 1)


INTERNAL_ERROR = SipAnswer(500, "Server Internal Error")

_AGENT = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")

# A row's code is a number, the name of an E2MCodes field, or None for "local".
CodeRef = Union[int, Literal["proxy_indecipherable", "signature_required"], None]


@dataclass(frozen=True)
class Row:
    """One cell of the table; ``why`` is the one-line reason shown in the docs."""

    code: CodeRef
    reason: str
    why: str
    warning: str | None = None          # free text for a 399, or "required-to-view"
    needs_certificate: bool = False
    accept: bool = False


_REQUIRED_TO_VIEW = "required-to-view"


def _both(row: Row) -> dict[Role, Row]:
    return {"ua": row, "proxy": row}


_UA_493 = ("our certificate goes with it so the UAC rebuilds recipientInfos for our key "
           "(RFC 3261 §21.4.28); same answer for wrong key and bad padding, so no oracle")
_PROXY_496 = ("e2m-sec-02 (digest §3.2): the proxy cannot view a body it must view; "
              "its certificate lets the UAC add it; no Warning = the whole body; "
              "same answer for every decryption failure, so no oracle")

_TABLE: dict[type[e.E2MError], dict[Role, Row]] = {
    e.E2MError: _both(Row(400, "Bad Request",
                          "catch-all for bad input without a narrower row")),
    e.MalformedError: _both(Row(400, "Bad Request",
                                "the body (DER, MIME, base64, header) is not well-formed")),
    e.UnsupportedAlgorithmError: _both(Row(
        415, "Unsupported Media Type",
        "the body is in a format (here: a CMS algorithm) we cannot process (RFC 3261 §21.4.13); "
        "493 would make the UAC retry with the same algorithm, 488 is about sessions",
        warning="Unsupported CMS algorithm", accept=True)),
    e.NoMatchingRecipientError: {
        "ua": Row(493, "Undecipherable", "no RecipientInfo is for us: " + _UA_493,
                  needs_certificate=True),
        "proxy": Row("proxy_indecipherable", "Proxy Indecipherable", _PROXY_496,
                     needs_certificate=True),
    },
    e.DecryptionError: {
        "ua": Row(493, "Undecipherable", "our RecipientInfo did not open: " + _UA_493,
                  needs_certificate=True),
        "proxy": Row("proxy_indecipherable", "Proxy Indecipherable", _PROXY_496,
                     needs_certificate=True),
    },
    e.UndecipherableError: {
        "ua": Row(493, "Undecipherable", _UA_493, needs_certificate=True),
        "proxy": Row("proxy_indecipherable", "Proxy Indecipherable", _PROXY_496,
                     needs_certificate=True),
    },
    e.SignatureInvalidError: _both(Row(
        403, "Forbidden",
        "e2m-sec-02 proxy rules (digest §5): a proxy MAY answer 403 to a bad signature; "
        "a UA refuses for the same reason (the body is not what was signed, so no retry will help)",
        warning="Invalid signature")),
    e.UntrustedSignerError: _both(Row(
        403, "Forbidden",
        "the signature is sound but its signer is not trusted or not who it claims: a refusal, "
        "not a key problem, so not 493",
        warning="Signer not trusted")),
    e.CertificateRejectedError: {
        "ua": Row(
            None, "",
            "a 496's or policy's certificate (or a peer's, before encrypting) failed our checks: "
            "we do not disclose, we do not answer a response; the UA reports it locally"),
        "proxy": Row(403, "Forbidden",
                     "a proxy only checks certificates of messages it forwards; it refuses them "
                     "as it refuses an untrusted signer",
                     warning="Certificate not trusted"),
    },
    e.LimitExceededError: _both(Row(
        413, "Request Entity Too Large",
        "the body exceeds our size, depth or count limits (RFC 3261 §21.4.11); it is not malformed, "
        "so not 400, and 513 is about the whole message, not its body")),
    e.PolicyError: _both(Row(403, "Forbidden",
                             "well-formed but refused by local E2M policy",
                             warning="Refused by E2M policy")),
    e.ProxyCannotDecryptError: {
        "ua": Row(493, "Undecipherable",
                  "a UA never needs a proxy's view; if raised at a UA it answers as for any body it "
                  "cannot read", needs_certificate=True),
        "proxy": Row("proxy_indecipherable", "Proxy Indecipherable",
                     "e2m-sec-02 (digest §3.2): 496 with the proxy certificate and warn-code 380 "
                     "\"Required to view '<type>'\" (no Warning when the whole body is needed)",
                     warning=_REQUIRED_TO_VIEW, needs_certificate=True),
    },
    e.SignatureRequiredError: _both(Row(
        "signature_required", "Signature Required",
        "e2m-sec-02 (digest §3.3): integrity needed, no signature; no Warning since the signature must "
        "cover the whole body; ono-04/e2m-00 let a UAS send it too")),
    e.UnsupportedMediaTypeError: _both(Row(
        415, "Unsupported Media Type",
        "RFC 3261 §21.4.13 with Accept; RFC 8591 requires it for MESSAGE", accept=True)),
    e.BindingMismatchError: _both(Row(
        403, "Forbidden",
        "the envelope's authenticated SIP binding names another message: a body cut from "
        "another dialog or replayed; refused like a bad signature, since retrying cannot help",
        warning="Body bound to another message")),
    e.MergedRequestError: _both(Row(
        482, "Loop Detected",
        "RFC 3261 §8.2.2.2: a new dialog's request whose sender's tag is one of a dialog under "
        "way under its Call-ID is the same request by another path, or a hop's copy; the "
        "first stays, the copy is refused")),
    e.ReplayError: _both(Row(
        403, "Forbidden",
        "the body's signed SIP context was seen before or is outside the time window: a "
        "captured message sent again; refused like a bad signature, since retrying the same "
        "body cannot help (a real retry has a new CSeq and a fresh context)",
        warning="Replayed or stale body")),
    e.InconsistentSplitError: _both(Row(
        403, "Forbidden",
        "the SDP keys sealed for the peer do not fit the SDP the proxy read (a line that is "
        "not a keying line, keys in the proxy's copy too, or keys sealed for others as well): "
        "the sender would show the proxy one session and the peer another",
        warning="SDP keys do not fit the SDP")),
    e.DowngradeError: {
        "ua": Row(488, "Not Acceptable Here",
                  "plaintext or stripped protection where E2M is required: the type itself is "
                  "supported (not 415), nothing is encrypted (not 493), and protecting the body "
                  "fixes it (not 403); the Warning says why",
                  warning="E2M protection required"),
        "proxy": Row(403, "Forbidden",
                     "a proxy that finds protection missing or stripped against its policy refuses "
                     "to forward (fail closed)",
                     warning="E2M protection required"),
    },
}

ERROR_TABLE: Mapping[type[e.E2MError], Mapping[Role, Row]] = MappingProxyType(
    {cls: MappingProxyType(rows) for cls, rows in _TABLE.items()})


def _row_for(error_type: type[BaseException], role: Role) -> Row | None:
    for cls in error_type.__mro__:  # subclasses inherit their parent's row
        rows = _TABLE.get(cls)  # type: ignore[call-overload]
        if rows is not None:
            return rows[role]
    return None


def _code(ref: CodeRef, codes: E2MCodes) -> int | None:
    return getattr(codes, ref) if isinstance(ref, str) else ref


def _quoted_text(text: str) -> str:
    # A warn-text is a quoted-string: controls dropped, '"' and '\\' escaped.
    return quote_string("".join(ch for ch in text if ch >= " " and ch != "\x7f"))


def _warning(row: Row, error: BaseException, codes: E2MCodes) -> str | None:
    if row.warning is None:
        return None
    if row.warning == _REQUIRED_TO_VIEW:
        content_type = getattr(error, "content_type", None)
        if not content_type:
            return None  # no Warning: the proxy needs the whole body
        text = f"Required to view '{content_type}'"
        return f"{codes.warn_code} {{agent}} {_quoted_text(text)}"
    return f"{MISC_WARN_CODE} {{agent}} {_quoted_text(row.warning)}"


def answer_for(error: BaseException, role: Role,
               codes: E2MCodes = DEFAULT_CODES) -> SipAnswer | None:
    """The SIP answer ``role`` ("ua" or "proxy") gives for ``error``; None if local.

    An exception that is not an ``E2MError`` is a bug, not bad input: it gets
    500 so the process keeps serving.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if not isinstance(error, e.E2MError):
        return INTERNAL_ERROR
    row = _row_for(type(error), role)
    assert row is not None  # E2MError itself has a row
    code = _code(row.code, codes)
    if code is None:
        return None
    accept = None
    if row.accept:
        accept = getattr(error, "accept", None) or codes.accept
    return SipAnswer(code=code, reason=row.reason, warning=_warning(row, error, codes),
                     needs_certificate=row.needs_certificate, accept=accept)


def _cell(row: Row, codes: E2MCodes) -> str:
    code = _code(row.code, codes)
    if code is None:
        return "local (no answer)"
    extras = []
    if row.needs_certificate:
        extras.append("certificate body")
    if row.warning == _REQUIRED_TO_VIEW:
        extras.append(f"Warning {codes.warn_code} when the type is known")
    elif row.warning:
        extras.append(f'Warning {MISC_WARN_CODE} "{row.warning}"')
    if row.accept:
        extras.append("Accept")
    return f"{code} {row.reason}" + (f" + {', '.join(extras)}" if extras else "")


def error_table_markdown(codes: E2MCodes = DEFAULT_CODES) -> str:
    """The table as Markdown: error, UA answer, proxy answer, and why for each role."""
    lines = ["| error | role | answer | why |", "|---|---|---|---|"]
    for cls, rows in _TABLE.items():
        for role in ROLES:
            row = rows[role]
            why = row.why.replace("|", "\\|")
            lines.append(f"| `{cls.__name__}` | {role} | {_cell(row, codes)} | {why} |")
    return "\n".join(lines) + "\n"
