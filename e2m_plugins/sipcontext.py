"""What a protected body says about the SIP message it was made for, and the checks.

A sender puts one ``SipContext`` in the signed attributes of every SignedData it
makes (and, for AuthEnvelopedData, in the envelope's authenticated attributes): the
message fields a body belongs to (Call-ID, From tag, CSeq, method, From and To AoRs,
the status of a response, the time it was made), and what the sender asked of the
proxies for this one body part (which of them may read it, the part's Content-ID and
handling, the CEK reference it offers for reuse).  Proxies change none of these
fields, so every reader can compare them with the message it received:

* a body cut from another message, re-addressed, or re-wrapped by a recipient into a
  message of its own no longer matches (``BindingMismatchError``);
* a body made too long ago, or seen before, is refused by the replay check
  (``ReplayError``; the cache is ``replay.ReplayCache``);
* which proxies may read a part, and who else holds a key offered for reuse, are
  read from the signed context alone, never from a header or a RecipientInfo a hop
  or a co-recipient could change.

Wire format (docs/protocol.md §2, "SIP context"), attribute ``e2m-sip-context``
(``oids.SIP_CONTEXT``) with one value::

    SipContext ::= SEQUENCE {
        callId       UTF8String,
        fromTag      UTF8String,
        cseq         INTEGER,
        method       UTF8String,
        fromAoR      UTF8String,          -- sip:user@host, lower-case host
        toAoR        UTF8String,
        status       INTEGER,             -- 0 in a request
        time         GeneralizedTime,     -- when the sender made it (UTC, seconds)
        readers      SEQUENCE OF UTF8String,   -- proxy hosts that may read this part
        contentId    UTF8String,          -- "" for a body that is one part
        handling     UTF8String,          -- "required" or "optional"
        cekReference OCTET STRING OPTIONAL }   -- offered for reuse with this part

A signed body also names the To tag of its message in a signed attribute of its own,
``e2m-sip-to-tag`` (``oids.SIP_TO_TAG``, one UTF8String, lower-cased; empty for a
message without one, such as a dialog-creating request): kept apart so that readers
older than it still read the context.  Read into ``SipContext.to_tag``; a copy of the
message with another To tag (a hop re-tagging a 2xx into dialogs of its own, or giving
an initial INVITE a made-up one) no longer matches.  Bodies without the attribute
(senders older than it, unsigned ones) bind no To tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from .cms import der
from .errors import BindingMismatchError, E2MError, MalformedError, ReplayError
from .sip import SipMessage
from .uri import aor_of, host_key

__all__ = ["SipContext", "context_for", "message_aors", "encode_to_tag", "decode_to_tag"]

_MAX_READERS = 16
_MAX_ELEMENTS = 64
_MAX_TEXT = 1024


def message_aors(message: SipMessage) -> tuple[str, str]:
    """The From and To AoRs of ``message`` as the context writes them."""
    return str(aor_of(message.address("From").uri)), str(aor_of(message.address("To").uri))


@dataclass(frozen=True)
class SipContext:
    """One ``SipContext`` value; see the module docstring for the fields."""

    call_id: str
    from_tag: str
    cseq: int
    method: str
    from_aor: str
    to_aor: str
    status: int
    time: int
    readers: tuple[str, ...] = ()
    content_id: str = ""
    handling: str = "required"
    cek_reference: bytes | None = None
    # the To tag its signer bound (``e2m-sip-to-tag``, lower-cased; "" for none), not part
    # of the SipContext value: None when the body binds none (an older sender's)
    to_tag: str | None = None

    # -- wire ------------------------------------------------------------------

    def encode(self) -> bytes:
        stamp = datetime.fromtimestamp(self.time, timezone.utc).strftime("%Y%m%d%H%M%SZ")
        fields = [_utf8(self.call_id), _utf8(self.from_tag), der.enc_integer(self.cseq),
                  _utf8(self.method), _utf8(self.from_aor), _utf8(self.to_aor),
                  der.enc_integer(self.status), der.tlv(0x18, stamp.encode("ascii")),
                  der.seq(*(_utf8(r) for r in self.readers)), _utf8(self.content_id),
                  _utf8(self.handling)]
        if self.cek_reference is not None:
            fields.append(der.tlv(0x04, self.cek_reference))
        return der.seq(*fields)

    @classmethod
    def decode(cls, value: bytes) -> SipContext:
        """Read one value; ``MalformedError`` for anything that is not a SipContext."""
        try:
            # 12 fields and up to 16 readers: anything needing more elements is refused
            # before the rest of it is read
            items = der.items(der.read_all(value, max_elements=_MAX_ELEMENTS), 11, "SipContext")
            if len(items) > 12:
                raise MalformedError("SipContext: too many fields")
            texts = [_text(items[i]) for i in (0, 1, 3, 4, 5, 9, 10)]
            cseq, status = _integer(items[2]), _integer(items[6])
            stamp = items[7].expect(0x18, "time")
            moment = datetime.strptime(bytes(stamp.value).decode("ascii"), "%Y%m%d%H%M%SZ")
            readers = tuple(_text(r) for r in items[8].expect(der.SEQUENCE, "readers").children())
            reference = der.octets(items[11].expect(der.OCTET_STRING, "cekReference")) \
                if len(items) == 12 else None
        except (UnicodeDecodeError, ValueError):
            raise MalformedError("malformed SipContext") from None
        if len(readers) > _MAX_READERS:
            raise MalformedError("SipContext: too many readers")
        if texts[6] not in ("required", "optional") or not 0 <= cseq < 2 ** 31 \
                or not (status == 0 or 100 <= status <= 699):
            raise MalformedError("SipContext: a field is out of range")
        return cls(call_id=texts[0], from_tag=texts[1], cseq=cseq, method=texts[2],
                   from_aor=texts[3], to_aor=texts[4], status=status,
                   time=int(moment.replace(tzinfo=timezone.utc).timestamp()),
                   readers=readers, content_id=texts[5], handling=texts[6],
                   cek_reference=reference)

    # -- checks ----------------------------------------------------------------

    def message_fields(self) -> tuple[str, str, int, str, str, str, int]:
        return (self.call_id, self.from_tag, self.cseq, self.method, self.from_aor,
                self.to_aor, self.status)

    def check_message(self, message: SipMessage) -> None:
        """``BindingMismatchError`` unless this context names ``message``."""
        try:
            expected = _fields_of(message)
        except E2MError:
            raise BindingMismatchError("the message has no Call-ID, tags or AoRs to bind to") from None
        if self.message_fields() != expected:
            raise BindingMismatchError("the body was made for another SIP message")
        if self.to_tag is not None and self.to_tag != (message.to_tag or "").lower():
            raise BindingMismatchError("the body was made for another dialog (To tag)")

    def check_part(self, content_id: str | None, handling: str) -> None:
        """``BindingMismatchError`` unless the part carries the Content-ID and handling
        the sender gave it (a hop that swaps parts or their labels is found here)."""
        if self.content_id != _cid(content_id) or self.handling != handling:
            raise BindingMismatchError("the body part is not the one that was signed")

    def check_time(self, now: float, window: float) -> None:
        """``ReplayError`` when made more than ``window`` seconds before or after ``now``."""
        if abs(now - self.time) > window:
            raise ReplayError("the body was made outside the accepted time window")

    def replay_key(self, to_tag: str | None = None) -> str:
        """The same for every copy of one message's body, whatever path it took, and
        different for any two messages: a digest of the DER of the message fields (no
        separator a percent-decoded AoR could contain makes two of them collide).
        ``to_tag``: a response's, which the context does not bind, so that each fork's
        2xx is a message of its own."""
        parts = [_utf8(self.call_id), _utf8(self.from_tag), der.enc_integer(self.cseq),
                 _utf8(self.method), _utf8(self.from_aor), _utf8(self.to_aor),
                 der.enc_integer(self.status)]
        if to_tag is not None:
            parts.append(_utf8(to_tag))
        return hashlib.sha256(der.seq(*parts)).hexdigest()[:32]

    def same_message(self, other: SipContext) -> bool:
        return self.message_fields() == other.message_fields()


def context_for(message: SipMessage, *, time: float, readers: Iterable[str] = (),
                content_id: str | None = None, handling: str = "required",
                cek_reference: bytes | None = None) -> SipContext:
    """The context a sender writes for one body part of ``message``."""
    call_id, from_tag, cseq, method, from_aor, to_aor, status = _fields_of(message)
    return SipContext(call_id, from_tag, cseq, method, from_aor, to_aor, status, int(time),
                      tuple(sorted({host_key(r) for r in readers})), _cid(content_id), handling,
                      cek_reference)


def encode_to_tag(to_tag: str) -> bytes:
    """The ``e2m-sip-to-tag`` attribute value for ``to_tag`` (tags compare without case)."""
    return _utf8(to_tag.lower())


def decode_to_tag(value: bytes) -> str:
    """One ``e2m-sip-to-tag`` value; ``MalformedError`` if it is not one UTF8String."""
    try:
        return _text(der.read_all(value, max_elements=1)).lower()
    except (UnicodeDecodeError, ValueError):
        raise MalformedError("malformed e2m-sip-to-tag") from None


def _fields_of(message: SipMessage) -> tuple[str, str, int, str, str, str, int]:
    number, method = message.cseq
    from_aor, to_aor = message_aors(message)
    status = 0 if message.is_request else int(message.status or 0)
    return (message.call_id, message.from_tag or "", number, method, from_aor, to_aor, status)


def _cid(content_id: str | None) -> str:
    return (content_id or "").strip().strip("<>").strip()


def _utf8(text: str) -> bytes:
    return der.tlv(0x0C, text.encode("utf-8", "surrogateescape"))


def _text(item: der.TLV) -> str:
    raw = bytes(item.expect(0x0C, "UTF8String").value)
    if len(raw) > _MAX_TEXT:
        raise MalformedError("SipContext: a text field is too long")
    return raw.decode("utf-8", "surrogateescape")


def _integer(item: der.TLV) -> int:
    if item.end - item.start > 8:
        raise MalformedError("SipContext: an INTEGER is too long")
    return der.integer(item)
