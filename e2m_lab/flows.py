"""In-memory SIP paths for engine tests: UA engine -> proxy engines -> UA engine.

No sockets: a request is handed from proxy to proxy by applying each
verdict (remove/add headers, or turn it into the reply the verdict gives),
so a test asserts exactly who could read what at every hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from e2m_plugins.keycache import KeyCache, MemoryKeyCache
from e2m_plugins.testpki import TestPKI
from e2m_plugins.config import KnownProxy, ProxyConfig, UAConfig
from e2m_plugins.proxy import ProxyEngine, Verdict
from e2m_plugins.headers import Rule
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.ua import UAEngine

TRUSTED = "proxy.example.com"       # the home proxy: E2M, archive, firewall
UNTRUSTED = "visited.example.com"   # a routing-only hop that must see nothing

SDP_OFFER = (b"v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\ns=-\r\n"
             b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0 8\r\n"
             b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n")
SDP_ANSWER = (b"v=0\r\no=bob 2808844564 2808844564 IN IP4 127.0.0.1\r\ns=-\r\n"
              b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\n"
              b"a=rtpmap:0 PCMU/8000\r\n")
CRYPTO = b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
SRTP_OFFER = SDP_OFFER.replace(b"RTP/AVP", b"RTP/SAVP") + CRYPTO
SRTP_ANSWER = SDP_ANSWER.replace(b"RTP/AVP", b"RTP/SAVP") + CRYPTO.replace(b"WVNf", b"QUJD")


def rules(*texts: str) -> tuple[Rule, ...]:
    return tuple(Rule.parse(t) for t in texts)


def proxy_engine(pki: TestPKI, host: str, *, view: tuple[str, ...] = (),
                 verify: tuple[str, ...] = (), cache: MemoryKeyCache | None = None,
                 **settings) -> ProxyEngine:
    cred = pki.proxy(host)
    config = ProxyConfig(host=host, certificate=cred.cert, private_key=cred.key,
                         trust_anchors=(pki.ca.cert,), view=rules(*view), verify=rules(*verify),
                         cert_url=f"http://{host}/e2m/cert.der", **settings)
    return ProxyEngine(config, cache if cache is not None else MemoryKeyCache())


def ua_engine(pki: TestPKI, name: str, *, peers: tuple[str, ...] = ("alice", "bob"),
              proxies: tuple[KnownProxy, ...] = (), bind: bool = True, **settings) -> UAEngine:
    cred = pki.user(name)
    config = UAConfig(aor=pki.aor(name), certificate=cred.cert, private_key=cred.key,
                      trust_anchors=(pki.ca.cert,),
                      peers={pki.aor(p): pki.user(p).cert for p in peers if p != name},
                      proxies=proxies, **settings)
    return UAEngine(config, bind=bind)


def known_proxy(pki: TestPKI, host: str, view: tuple[str, ...] = (),
                verify: tuple[str, ...] = ()) -> KnownProxy:
    return KnownProxy(host, pki.proxy(host).cert, rules(*view), rules(*verify))


def apply_forward(message: SipMessage, verdict: Verdict) -> SipMessage:
    """What a proxy sends on: its own labels removed, its headers added; body untouched."""
    out = message
    for name, value in verdict.remove_headers:
        out = out.remove(name, lambda v, value=value: v == value)
    for name, value in verdict.add_headers:
        out = out.add(name, value)
    return out


def reply_from(request: SipMessage, verdict: Verdict) -> SipMessage:
    return make_response(request, verdict.code, verdict.reason, verdict.add_headers,
                         verdict.body, verdict.content_type)


@dataclass
class Hop:
    """The record of one message passing one proxy."""

    host: str
    verdict: Verdict


@dataclass
class Trip:
    """One request (or response) across the path; ``delivered`` is what arrived."""

    delivered: SipMessage | None
    reply: SipMessage | None
    hops: list[Hop] = field(default_factory=list)

    def seen_by(self, host: str) -> list:
        return [s for hop in self.hops if hop.host == host for s in hop.verdict.seen]


@dataclass
class SipPath:
    """UAC -> proxies (in order) -> UAS; responses take the reverse way."""

    proxies: list[ProxyEngine]

    def request(self, message: SipMessage) -> Trip:
        trip = Trip(None, None)
        for proxy in self.proxies:
            verdict = proxy.inspect(message)
            trip.hops.append(Hop(proxy.host, verdict))
            if verdict.action == "reply":
                trip.reply = reply_from(message, verdict)
                return trip
            message = apply_forward(message, verdict)
        trip.delivered = message
        return trip

    def response(self, message: SipMessage) -> Trip:
        trip = Trip(None, None)
        for proxy in reversed(self.proxies):
            verdict = proxy.inspect(message)
            trip.hops.append(Hop(proxy.host, verdict))
            assert verdict.action == "forward", "a proxy cannot refuse a response"
            message = apply_forward(message, verdict)
        trip.delivered = message
        return trip


def invite(pki: TestPKI, sdp: bytes = SDP_OFFER, *, call_id: str | None = None,
           cseq: int = 1, from_tag: str = "a1", to_tag: str | None = None,
           method: str = "INVITE") -> SipMessage:
    return make_request(method, f"sip:bob@{pki.domain}", from_uri=pki.aor("alice"),
                        to_uri=pki.aor("bob"), call_id=call_id, cseq=cseq, from_tag=from_tag,
                        to_tag=to_tag, body=sdp, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])


def reinvite(pki: TestPKI, sender: str, receiver: str, call_id: str, cseq: int,
             from_tag: str, to_tag: str, sdp: bytes = SDP_ANSWER) -> SipMessage:
    """``sender``'s re-INVITE (plaintext) naming the dialog of those ids."""
    return make_request("INVITE", f"sip:{receiver}@127.0.0.1:5061", from_uri=pki.aor(sender),
                        to_uri=pki.aor(receiver), call_id=call_id, cseq=cseq,
                        from_tag=from_tag, to_tag=to_tag, body=sdp,
                        content_type="application/sdp",
                        extra_headers=[("Contact", f"<sip:{sender}@127.0.0.1:5062>")])


SDP_VIEW = ("INVITE:application/sdp",)


def answered_call(pki: TestPKI, proxy: ProxyEngine, call_id: str) -> UAEngine:
    """alice calls bob through ``proxy`` (a home proxy that views SDP), bob answers and
    the proxy reads the answer: the call's key is kept there.  Returns alice."""
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    bob = ua_engine(pki, "bob")
    sent = alice.protect(invite(pki, call_id=call_id)).message
    delivered = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    ok = bob.protect(answer(delivered)).message
    assert proxy.inspect(ok).seen
    alice.open(ok)
    return alice


def kekri_answer(pki: TestPKI, view: tuple[str, ...], *,
                 cache: KeyCache | None = None) -> tuple[ProxyEngine, SipMessage]:
    """A proxy viewing ``view`` that read alice's INVITE (her offer's CEK kept), and
    bob's answer under that CEK (kekri, RFC 3185), not yet shown to it."""
    trusted = proxy_engine(pki, TRUSTED, view=view, cache=cache)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, view),))
    bob = ua_engine(pki, "bob")
    sent = alice.protect(invite(pki)).message
    trusted.inspect(sent)
    reply = bob.protect(answer(bob.open(sent).message))
    assert reply.info.key_reuse
    return trusted, reply.message


def three_phones(pki: TestPKI) -> tuple[UAEngine, UAEngine, UAEngine]:
    """alice, bob and carol, all knowing the home proxy that views SDP; alice knows both
    others, bob and carol know alice (the insider reviews' cast)."""
    proxy = known_proxy(pki, TRUSTED, SDP_VIEW)
    return (ua_engine(pki, "alice", peers=("bob", "carol"), proxies=(proxy,)),
            ua_engine(pki, "bob", peers=("alice",), proxies=(proxy,)),
            ua_engine(pki, "carol", peers=("alice",), proxies=(proxy,)))


def message(pki: TestPKI, text: bytes = b"Hello. This is confidential.", *,
            sender: str = "alice", recipient: str = "bob",
            content_type: str = "text/plain") -> SipMessage:
    return make_request("MESSAGE", f"sip:{recipient}@{pki.domain}", from_uri=pki.aor(sender),
                        to_uri=pki.aor(recipient), body=text, content_type=content_type)


def answer(request: SipMessage, sdp: bytes = SDP_ANSWER, *, to_tag: str = "b1") -> SipMessage:
    """Bob's 200 OK with an SDP answer (plaintext, before protection)."""
    response = make_response(request, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5062>")],
                             sdp, "application/sdp")
    if request.to_tag is None:
        response = response.replace("To", f"{request.get('To')};tag={to_tag}")
    return response


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
