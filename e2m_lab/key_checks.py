"""What a proxy, or anyone on the wire, can read of a UA's SRTP keys (the tests of
reviews 167 to 175 ask it of ``UAEngine.protect``'s output, 179 and 181 of the phone's
datagrams), and the unsplit keyed bodies an insider sends (reviews 179, 181)."""

from __future__ import annotations

from typing import Any

from e2m_plugins.body import message_body, top_parts
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.recipients import CertificateKey
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage

from .flows import TRUSTED


def proxy_reads(pki: Any, message: SipMessage, host: str = TRUSTED) -> list[bytes]:
    """The plaintext of every top-level part of ``message`` that ``host``'s own
    certificate key opens."""
    cred = pki.proxy(host)
    out: list[bytes] = []
    body = message_body(message)
    if body is None:
        return out
    for part in top_parts(body):
        try:
            out.append(open_envelope(part.decoded(), [CertificateKey(cred.cert, cred.key)]).plaintext)
        except E2MError:
            continue
    return out


def keys_kept_secret(engine: Any, message: SipMessage, *, key: bytes) -> bool:
    """Whether ``engine`` keeps ``key`` from every proxy and from the wire when it
    protects ``message``: refused (a typed error), or sealed for the peer alone, or
    split (the proxies reading no key)."""
    try:
        protected = engine.protect(message)
    except E2MError:
        return True
    info = protected.info
    if key in protected.message.body or not info.encrypted:
        return False
    return info.split or not info.readable_by


def failure_answer_with(pki: Any, body: bytes, *, call_id: str, proxies: tuple,
                        status: int = 488, tag: str = "b-fail") -> tuple[Any, SipMessage]:
    """bob's engine and his ``status`` answer carrying ``body`` as its SDP, to alice's
    SRTP INVITE (split for ``proxies``) that he opened: what a stack that answers a
    refused offer with its capabilities would hand ``protect``."""
    from e2m_plugins.sip import make_response

    from .flows import SRTP_OFFER, invite, ua_engine
    alice = ua_engine(pki, "alice", proxies=proxies)
    bob = ua_engine(pki, "bob", proxies=proxies)
    got = bob.open(alice.protect(invite(pki, SRTP_OFFER, call_id=call_id)).message).message
    reply = make_response(got, status, "Not Acceptable Here",
                          [("Contact", "<sip:bob@127.0.0.1:5062>")], body, "application/sdp")
    return bob, reply.replace("To", f"{got.get('To')};tag={tag}")


def sealed_whole(pki: Any, signer: str, message: SipMessage, readers: list[str],
                 recipients: list) -> SipMessage:
    """``message`` whose keyed SDP is sealed whole for ``recipients`` (no split), signed by
    ``signer``, its signed context naming ``readers`` and labelled for them as a viewing
    proxy relays it: what an insider sends to hand a proxy its media key."""
    import time

    from e2m_plugins import headers as hdr, mime
    from e2m_plugins.body import protect_content, with_entity
    cred = pki.user(signer)
    entity, _ = protect_content("application/sdp", message.body, recipients,
                                signer=(cred.cert, cred.key), bind_to=message,
                                readers=readers, at=time.time(),
                                content_id=mime.new_content_id("example.com"))
    out = with_entity(message, entity)
    for host in readers:
        out = out.add(hdr.PROXY_REQUIRED_BODY,
                      hdr.format_proxy_required_body(hdr.BodyLabel(host, ())))
    return out


def keys_shown(pki: Any, datagrams: list[bytes]) -> list[str]:
    """Which of ``datagrams`` show an SRTP key on the wire or to the proxy's key."""
    from e2m_plugins import sip
    bad = []
    for data in datagrams:
        if b"inline:" in data or b"a=crypto" in data:
            bad.append("wire: " + data[:60].decode(errors="replace"))
            continue
        try:
            msg = sip.parse(data)
        except Exception:  # noqa: BLE001 - not SIP: nothing a proxy reads
            continue
        if any(b"inline:" in p or b"a=crypto" in p for p in proxy_reads(pki, msg)):
            bad.append("proxy: " + data[:60].decode(errors="replace"))
    return bad
