"""What a proxy, or anyone on the wire, can read of a UA's SRTP keys (the tests of
reviews 167 to 175 ask it of ``UAEngine.protect``'s output)."""

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
    out = []
    for part in top_parts(message_body(message)):
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
