"""Seeds, targets and the one property every network-facing parser must hold.

Shared by the pytest property tests (``tests/fuzz``) and the atheris runner
(``fuzz/run.py``), so both fuzz exactly the same entry points:

    only a typed error (``e2m_plugins.errors.E2MError`` and its subclasses)
    may come out of a parser fed hostile bytes; ``ProxyEngine.inspect``
    never raises at all (it returns a verdict).

Seed corpora are made here, at run time, by the project's own code (a fresh
in-memory test PKI per process: no key is ever written or committed).
Nothing here logs or prints plaintext or keys.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from e2m_plugins import headers as hdr
from e2m_plugins import grammar, mime, sdp, sip
from e2m_plugins.body import protect_content
from e2m_plugins.cms.envelope import cek_reference_attributes, open_envelope, seal
from e2m_plugins.cms.limits import Limits
from e2m_plugins.cms.recipients import (CertificateKey, KeyTransRecipient, SharedKEK,
                                        recipient_for_certificate)
from e2m_plugins.cms.signed import sign, verify
from e2m_plugins.errors import E2MError
from e2m_plugins.proxy import Verdict
from e2m_plugins.layers import open_message
from e2m_plugins.ua import UAEngine

from . import flows

TRUSTED = flows.TRUSTED
VIEW = ("MESSAGE:*", "INVITE:application/sdp")

# Inputs below this size must each take less than PER_INPUT_BOUND seconds.
BOUNDED_SIZE = 64 * 1024
PER_INPUT_BOUND = 1.0


class PropertyViolation(AssertionError):
    """A target broke the contract in a way that is not an untyped exception."""


# ----------------------------------------------------------------- the world

class Kit:
    """One test PKI, the keys and engines the targets use, and the seed corpora.

    Built once per process (RSA key generation is the slow part, ~1 s).
    """

    def __init__(self) -> None:
        from e2m_plugins.testpki import init_test_pki
        self.pki = init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))
        self.pki.proxy(TRUSTED, "ec")
        self.pki.proxy(TRUSTED, "x25519")
        self.pki.user("alice", "ec")
        self.anchors = (self.pki.ca.cert,)
        rsa, ec, x = (self.pki.proxy(TRUSTED, kt) for kt in ("rsa", "ec", "x25519"))
        self.kek = SharedKEK(key_id=b"fuzz-reference-0", kek=bytes(range(16)))
        self.keys = [CertificateKey(c.cert, c.key) for c in (rsa, ec, x)] + [self.kek]
        self.proxy = flows.proxy_engine(self.pki, TRUSTED, view=VIEW)
        self.reset_ua()

    def reset_ua(self) -> None:
        """A fresh bob and alice (UA engines learn policies, certificates and keys)."""
        self.bob = flows.ua_engine(self.pki, "bob")
        self.alice = flows.ua_engine(self.pki, "alice")

    # -- credentials -------------------------------------------------------

    def cred(self, name: str, key_type: str = "rsa"):
        return self.pki.proxy(name, key_type) if "." in name else self.pki.user(name, key_type)

    # -- seed corpora ------------------------------------------------------

    @cached_property
    def envelopes(self) -> list[bytes]:
        """EnvelopedData / AuthEnvelopedData for the proxy, every recipient kind."""
        rsa, ec, x = (self.cred(TRUSTED, kt).cert for kt in ("rsa", "ec", "x25519"))
        bob = self.cred("bob").cert
        body = inner_sdp()
        ref = cek_reference_attributes(b"r" * 16, 5)
        made = [
            seal(body, [recipient_for_certificate(rsa)]),
            seal(body, [recipient_for_certificate(rsa)], cipher="aes-128-cbc"),
            seal(body, [KeyTransRecipient(rsa, oaep=True)], cipher="aes-256-gcm"),
            seal(body, [KeyTransRecipient(rsa, use_ski=True)], cipher="aes-256-cbc"),
            seal(body, [recipient_for_certificate(ec)]),
            seal(body, [recipient_for_certificate(x)]),
            seal(body, [recipient_for_certificate(bob), recipient_for_certificate(rsa),
                        recipient_for_certificate(ec)], cek_reference=b"q" * 16),
            seal(body, [self.kek]),
            seal(body, [self.kek], cipher="aes-128-cbc", extra_attributes=tuple(ref)),
            seal(b"short", [recipient_for_certificate(rsa)], authenticated_attributes=tuple(ref)),
        ]
        return [m.der for m in made]

    @cached_property
    def signed(self) -> list[bytes]:
        alice, alice_ec = self.cred("alice"), self.cred("alice", "ec")
        text = mime.inner_entity("text/plain", b"hello")
        return [
            sign(text, alice.cert, alice.key),
            sign(text, alice.cert, alice.key, rsa_pss=True),
            sign(text, alice_ec.cert, alice_ec.key, include_certificate=True),
            sign(self.envelopes[0], alice.cert, alice.key, content_type="auth-enveloped-data"),
        ]

    @cached_property
    def smime(self) -> list[bytes]:
        """What ``open_message`` takes: DER, PEM, base64, S/MIME entities, nested layers."""
        rsa = self.cred(TRUSTED).cert
        alice = self.cred("alice")
        der0 = self.envelopes[0]
        pem = (b"-----BEGIN CMS-----\n" + base64.encodebytes(der0) + b"-----END CMS-----\n")
        ste, _ = protect_content("text/plain", b"sign then encrypt", [recipient_for_certificate(rsa)],
                                 signer=(alice.cert, alice.key), content_id="s1@example.com")
        text = mime.inner_entity("text/plain", b"detached")
        detached = mime.multipart_signed(text, sign(text, alice.cert, alice.key, detached=True))
        return [der0, self.envelopes[4], pem, base64.encodebytes(self.envelopes[7]),
                mime.encode_part(ste), mime.encode_part(detached), self.signed[0], self.signed[3],
                mime.encode_part(mime.smime_entity(der0, "enveloped-data", transfer_encoding="base64"))]

    @cached_property
    def mime_entities(self) -> list[bytes]:
        rsa = self.cred(TRUSTED).cert
        bob = self.cred("bob").cert
        alice = self.cred("alice")
        view, _ = protect_content("application/sdp", flows.SDP_OFFER, [recipient_for_certificate(rsa)],
                                  content_id="v@example.com", handling="optional")
        full, _ = protect_content("application/sdp", flows.SRTP_OFFER, [recipient_for_certificate(bob)],
                                  content_id="f@example.com")
        mixed = mime.multipart_mixed([view, full])
        nested = mime.multipart_mixed([mixed, mime.make_part("text/plain", b"x", content_id="t@x")])
        text = mime.inner_entity("text/plain", b"signed text")
        signed = mime.multipart_signed(text, sign(text, alice.cert, alice.key, detached=True))
        return [mime.encode_part(p) for p in (view, mixed, nested, signed)] + [
            mime.inner_entity("application/sdp", flows.SDP_OFFER, content_length=True),
            mime.encode_part(mime.make_part("text/plain; charset=utf-8", b"hi there",
                                            transfer_encoding="base64", content_id="b@x")),
        ]

    @cached_property
    def sdps(self) -> list[bytes]:
        video = (b"m=video 51372 RTP/SAVP 96 97\r\na=rtpmap:96 H264/90000\r\n"
                 b"a=rtcp:51373 IN IP4 198.51.100.7\r\na=key-mgmt:mikey AQAFgM0X\r\n"
                 b"a=sendonly\r\n")
        return [flows.SDP_OFFER, flows.SDP_ANSWER, flows.SRTP_OFFER, flows.SRTP_ANSWER,
                flows.SRTP_OFFER + video, flows.SDP_OFFER.replace(b"\r\n", b"\n") + b"k=clear:x\n"]

    @cached_property
    def header_values(self) -> list[bytes]:
        policy = self.proxy.policy_header()[1]
        return [s.encode() for s in (
            policy, f"{policy}, other.example.com;view=\"*:*\";expires=60",
            f'{TRUSTED};cid="p1@example.com"', f"{TRUSTED};cid=<a@x>, cid=<b@x>, [2001:db8::1]",
            f'{TRUSTED};view="INVITE:application/sdp,MESSAGE:text/*";verify="*:*";'
            f'cert-fp="sha256:{"ab:" * 31}ab";cert-url="https://{TRUSTED}:8443/c.der?x=1";ext=1',
            f"380 {TRUSTED} \"Required to view 'application/sdp'\", 399 a \"x\"",
        )]

    @cached_property
    def _flows(self) -> tuple[list[bytes], list[bytes]]:
        """(messages that reach the proxy, messages that reach bob), serialised."""
        pki = self.pki
        kp = flows.known_proxy(pki, TRUSTED, VIEW)
        alice = flows.ua_engine(pki, "alice", proxies=(kp,))
        alice_signs = flows.ua_engine(pki, "alice", proxies=(kp,), sign=True)
        bob = flows.ua_engine(pki, "bob", proxies=(kp,))
        proxy = flows.proxy_engine(pki, TRUSTED, view=VIEW)
        to_proxy: list[sip.SipMessage] = []
        to_bob: list[sip.SipMessage] = []

        def through(msg: sip.SipMessage) -> sip.SipMessage:
            to_proxy.append(msg)
            verdict = proxy.inspect(msg)
            out = flows.apply_forward(msg, verdict) if verdict.action == "forward" else msg
            to_bob.append(out)
            return out

        through(alice.protect(flows.message(pki)).message)
        through(alice_signs.protect(flows.message(pki, b"signed and sealed")).message)
        offer = flows.invite(pki, flows.SRTP_OFFER, call_id="fuzz-call-1")
        delivered = through(alice.protect(offer).message)
        received = bob.open(delivered).message
        reply = bob.protect(flows.answer(received, flows.SRTP_ANSWER)).message
        through(reply)
        alice.open(reply)
        bye = sip.make_request("BYE", f"sip:bob@{pki.domain}", from_uri=pki.aor("alice"),
                               to_uri=pki.aor("bob"), call_id="fuzz-call-1", cseq=2, from_tag="a1",
                               to_tag="b1")
        to_proxy.append(bye)
        plain = flows.message(pki)
        to_proxy.append(plain)  # a plaintext MESSAGE
        # a 496 from the proxy, for bob's react/open paths (alice's first try, no key for it)
        first = flows.ua_engine(pki, "alice").protect(flows.message(pki)).message
        verdict = proxy.inspect(first)
        if verdict.action == "reply":
            to_bob.append(flows.reply_from(first, verdict))
        return [m.serialize() for m in to_proxy], [m.serialize() for m in to_bob]

    @cached_property
    def refusals(self) -> list[bytes]:
        """E2M answers a UAC reacts to: the proxy's 496s (MESSAGE and INVITE) and bob's 493."""
        pki = self.pki
        alice = flows.ua_engine(pki, "alice")
        proxy = flows.proxy_engine(pki, TRUSTED, view=VIEW, verify=("MESSAGE:*",))
        out = []
        for plain in (flows.message(pki), flows.invite(pki)):
            sent = alice.protect(plain).message
            out.append(flows.reply_from(sent, proxy.inspect(sent)))
        signed_less = flows.ua_engine(pki, "alice", sign=False, proxies=(
            flows.known_proxy(pki, TRUSTED, ("MESSAGE:*",)),)).protect(flows.message(pki)).message
        out.append(flows.reply_from(signed_less, proxy.inspect(signed_less)))   # 495
        from e2m_plugins.errors import NoMatchingRecipientError
        refusal = self.bob.refusal(flows.message(pki), NoMatchingRecipientError("x"))
        if refusal is not None:
            out.append(refusal)
        return [m.serialize() for m in out]

    @property
    def proxy_messages(self) -> list[bytes]:
        return self._flows[0]

    @property
    def ua_messages(self) -> list[bytes]:
        return self._flows[1]

    @property
    def sip_messages(self) -> list[bytes]:
        extra = [b"\r\n\r\nOPTIONS sip:x SIP/2.0\nv: SIP/2.0/UDP h;branch=z9hG4bK1\ni: 1\n"
                 b"l: 0\nCSeq: 1 OPTIONS\nf: <sip:a@b>;tag=1\nt: sip:x\n\n",
                 b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK2\r\n"
                 b"Call-ID: 2\r\nCSeq: 1 INVITE\r\nFrom: \"A \\\"q\\\"\" <sip:a@b>;tag=1\r\n"
                 b"To: <sip:b@c>;tag=2\r\nX-Long: a,\r\n b,\r\n\tc\r\nContent-Length: 0\r\n\r\n"]
        return self.proxy_messages + self.ua_messages[-2:] + extra


def inner_sdp() -> bytes:
    return mime.inner_entity("application/sdp", flows.SRTP_OFFER)


_KIT: Kit | None = None


def kit() -> Kit:
    global _KIT
    if _KIT is None:
        _KIT = Kit()
    return _KIT


# ------------------------------------------------------------------ targets
#
# Each target takes the raw bytes an attacker controls.  Raising an E2MError
# is the parser saying "no" and is fine; anything else escaping is a bug.

# CBC and 3DES are refused by default; the opener still has those paths for a
# deployment that accepts them, so the envelope target fuzzes with them accepted.
_EVERY_CIPHER = Limits(accept_cbc=True, accept_legacy_algorithms=True)


def t_cms_envelope(k: Kit, data: bytes) -> None:
    opened = open_envelope(data, k.keys, want_cek=True, limits=_EVERY_CIPHER)
    repr(opened)


def t_cms_signed(k: Kit, data: bytes) -> None:
    verify(data, trust_anchors=k.anchors)


def t_smime_open(k: Kit, data: bytes) -> None:
    opened = open_message(data, keys=k.keys, trust_anchors=k.anchors)
    opened.order  # noqa: B018


def t_mime(k: Kit, data: bytes) -> None:
    entity = mime.parse_entity(data)
    for part in mime.walk(entity):
        part.decoded()
        mime.smime_type_of(part)
        if part.content_type.mime_type == "multipart/signed":
            signed = mime.parse_signed(part)
            mime.canonical_text(signed.signed_bytes)
    if entity.content_type.is_multipart:
        parts = mime.parse_multipart(entity)
        for part in parts:
            if part.content_id:
                mime.find_by_cid(parts, part.content_id)


def t_sip(k: Kit, data: bytes) -> None:
    n = sip.frame_length(data)
    if n is not None and not 0 <= n <= len(data):
        raise PropertyViolation(f"frame_length {n} outside 0..{len(data)}")
    msg = sip.parse(data)
    msg.serialize()
    for getter in (lambda: msg.method, lambda: msg.call_id, lambda: msg.cseq, lambda: msg.from_tag,
                   lambda: msg.to_tag, lambda: msg.dialog_id(),
                   lambda: [sip.parse_address(v) for n in ("From", "To", "Contact")
                            for v in msg.get_all(n)],
                   lambda: [grammar.split_header_list(v) for v in msg.get_all("Via")]):
        try:
            getter()
        except E2MError:
            pass


def t_headers(k: Kit, data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for fn in (hdr.parse_proxy_required_body, hdr.parse_policy_headers, hdr.PolicyHeader.parse,
               hdr.parse_warnings, hdr.parse_content_type_warnings):
        try:
            result = fn(text)
        except E2MError:
            continue
        if fn is hdr.parse_proxy_required_body:
            hdr.labels_for(result, TRUSTED)
        elif fn is hdr.parse_policy_headers:
            p = hdr.policy_for(result, TRUSTED)
            if p is not None:
                p.view_matches("INVITE", "application/sdp")


def t_sdp(k: Kit, data: bytes) -> None:
    view, keys = sdp.separate_keys(data)
    if sdp.has_keys(view):
        raise PropertyViolation("the proxy's SDP still holds keying lines")
    if keys.lines:
        again_view, again = sdp.separate_keys(sdp.merge_keys(view, sdp.SdpKeys.decode(keys.encode())))
        # the same lines (a final line may gain its line end) and the same keys
        if (again_view.rstrip(b"\r\n"), sorted(again.lines)) != (view.rstrip(b"\r\n"),
                                                                 sorted(keys.lines)):
            raise PropertyViolation("the keys did not go back where they were")
    sdp.media_summary(data)


def t_proxy_inspect(k: Kit, data: bytes) -> None:
    msg = sip.parse(data)  # a parse error never reaches the engine: fine
    try:
        verdict = k.proxy.inspect(msg)
    except E2MError as exc:
        raise PropertyViolation(f"ProxyEngine.inspect raised {type(exc).__name__}") from exc
    if not isinstance(verdict, Verdict) or verdict.action not in ("forward", "reply"):
        raise PropertyViolation(f"inspect returned {verdict!r}")
    verdict.to_json_text()


def t_ua_open(k: Kit, data: bytes) -> None:
    msg = sip.parse(data)
    k.bob.open(msg)


def t_ua_react(k: Kit, data: bytes) -> None:
    response = sip.parse(data)
    method = response.cseq[1]
    request = (flows.invite(k.pki) if method == "INVITE" else flows.message(k.pki))  # fresh Call-ID
    alice = UAEngine(k.alice.config)   # fresh: what one answer teaches must not leak into the next
    reaction = alice.react(response, request)
    if reaction.action not in ("none", "fail", "retry"):
        raise PropertyViolation(f"react gave {reaction.action!r}")


@dataclass(frozen=True)
class Target:
    name: str
    fn: Callable[[Kit, bytes], None]
    seeds: Callable[[Kit], list[bytes]]
    what: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cms_envelope", t_cms_envelope, lambda k: k.envelopes,
           "cms.envelope.open_envelope (ktri v1.5/OAEP, kari P-256/X25519, kekri; CBC/GCM)"),
    Target("cms_signed", t_cms_signed, lambda k: k.signed, "cms.signed.verify"),
    Target("smime_open", t_smime_open, lambda k: k.smime,
           "layers.open_message (DER, PEM, base64, S/MIME entities, nested layers)"),
    Target("mime", t_mime, lambda k: k.mime_entities,
           "mime.parse_entity, walk, parse_multipart, parse_signed, decoded, find_by_cid"),
    Target("sip", t_sip, lambda k: k.sip_messages,
           "sip.parse, frame_length, header accessors, parse_address, split_header_list"),
    Target("headers", t_headers, lambda k: k.header_values,
           "headers: Proxy-Required-Body, Proxy-Body-Policy, Warning"),
    Target("sdp", t_sdp, lambda k: k.sdps, "sdp.separate_keys, merge_keys, has_keys, media_summary"),
    Target("proxy_inspect", t_proxy_inspect, lambda k: k.proxy_messages,
           "sip.parse then ProxyEngine.inspect (must never raise)"),
    Target("ua_open", t_ua_open, lambda k: k.ua_messages, "sip.parse then UAEngine.open"),
    Target("ua_react", t_ua_react, lambda k: k.refusals,
           "sip.parse then UAEngine.react to a 496/495/493 (certificate body, Warning, policy header)"),
)}


# ------------------------------------------------------------- the property

# Bugs already reported (each has a strict xfail test with its minimal
# reproducer in tests/fuzz/test_fuzz_regressions.py).  The fuzzers count them and go
# on, so one known bug does not hide the next one.  When the lead fixes one,
# its xfail test passes (strict: the run fails) and the entry goes from here.
# name -> (exception type, function in e2m_plugins where it is raised)
KNOWN_BUGS: dict[str, tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = {
    # all six found so far are fixed; tests/fuzz/test_fuzz_regressions.py keeps their reproducers
}


def known_bug(exc: BaseException) -> str | None:
    """The KNOWN_BUGS entry ``exc`` is an instance of, or None."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    in_project = [f.co_name for f in frames if "e2m_plugins" in f.co_filename]
    for name, (kind, function) in KNOWN_BUGS.items():
        if isinstance(exc, kind) and function in in_project:
            return name
    return None


@dataclass
class Stats:
    """Per-target counts and the slowest input, for the reports."""

    runs: int = 0
    rejected: int = 0            # typed errors (the parser said no)
    max_seconds: float = 0.0
    max_size: int = 0            # size of the slowest input
    errors: dict[str, int] = field(default_factory=dict)
    known: dict[str, int] = field(default_factory=dict)   # KNOWN_BUGS hits


def run_one(target: Target, k: Kit, data: bytes, stats: Stats | None = None, *,
            tolerate_known: bool = True, timed: bool = True) -> float:
    """Run ``target`` on ``data``; return the seconds it took.

    An ``E2MError`` is swallowed (counted); so is a KNOWN_BUGS exception
    unless ``tolerate_known`` is False.  Anything else propagates, and (``timed``)
    a :class:`PropertyViolation` is raised for an input under ``BOUNDED_SIZE``
    that took longer than ``PER_INPUT_BOUND``.
    """
    start = time.perf_counter()
    bug = None
    try:
        target.fn(k, data)
        name = None
    except E2MError as exc:
        name = type(exc).__name__
    except Exception as exc:
        bug = known_bug(exc)
        if bug is None or not tolerate_known:
            raise
        name = None
    elapsed = time.perf_counter() - start
    if stats is not None and bug is not None:
        stats.known[bug] = stats.known.get(bug, 0) + 1
    if stats is not None:
        stats.runs += 1
        if name:
            stats.rejected += 1
            stats.errors[name] = stats.errors.get(name, 0) + 1
        if elapsed > stats.max_seconds:
            stats.max_seconds, stats.max_size = elapsed, len(data)
    if timed and len(data) < BOUNDED_SIZE and elapsed > PER_INPUT_BOUND:
        raise PropertyViolation(f"{target.name}: {len(data)}-byte input took {elapsed:.2f} s "
                                f"(bound {PER_INPUT_BOUND} s)")
    return elapsed


# ------------------------------------------- hypothesis-driven mutation

# Octets that mean something to one of the parsers: DER tags and lengths,
# line ends, header and parameter punctuation, MIME boundary dashes.
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x81", b"\x84", b"\x30", b"\x31", b"\x04",
               b"\x24", b"\xa0", b"\x06", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b",",
               b"=", b'"', b"\\", b"<", b">", b"@", b"--", b"*", b"/", b"0", b"9")


def mutated(seeds: list[bytes], *, max_ops: int = 4):
    """A hypothesis strategy: one seed, then 1..``max_ops`` random edits.

    Edits: flip a bit, overwrite or insert an interesting octet, delete,
    duplicate or move a span, truncate, splice in a span of another seed,
    insert random bytes, or rewrite a DER length octet.  Hypothesis shrinks
    a failure to the fewest, smallest edits.
    """
    from hypothesis import strategies as st

    @st.composite
    def build(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, max_ops))):
            op = draw(st.sampled_from(("flip", "set", "insert", "delete", "dup", "truncate",
                                       "splice", "random", "length")))
            n = len(data)
            pos = draw(st.integers(0, max(n - 1, 0)))
            if op == "flip" and n:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set" and n:
                tok = draw(st.sampled_from(INTERESTING))
                data[pos:pos + len(tok)] = tok
            elif op == "insert":
                data[pos:pos] = draw(st.sampled_from(INTERESTING)) * draw(st.integers(1, 64))
            elif op == "delete" and n:
                del data[pos:pos + draw(st.integers(1, 64))]
            elif op == "dup" and n:
                span = bytes(data[pos:pos + draw(st.integers(1, 256))])
                at = draw(st.integers(0, n))
                data[at:at] = span * draw(st.integers(1, 8))
            elif op == "truncate":
                del data[pos:]
            elif op == "splice":
                other = draw(st.sampled_from(seeds))
                a = draw(st.integers(0, len(other)))
                data[pos:pos] = other[a:a + draw(st.integers(1, 512))]
            elif op == "random":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
            elif op == "length" and n:
                data[pos] = draw(st.sampled_from((0x00, 0x7f, 0x80, 0x81, 0x82, 0x84, 0x85, 0xff)))
        return bytes(data)

    return build()


def mutate(rng, seeds: list[bytes], *, max_ops: int = 4) -> bytes:
    """The same edits as :func:`mutated`, driven by a ``random.Random`` (no shrinking)."""
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, max_ops)):
        op = rng.choice(("flip", "set", "insert", "delete", "dup", "truncate", "splice",
                         "random", "length"))
        n = len(data)
        pos = rng.randint(0, max(n - 1, 0))
        if op == "flip" and n:
            data[pos] ^= 1 << rng.randint(0, 7)
        elif op == "set" and n:
            tok = rng.choice(INTERESTING)
            data[pos:pos + len(tok)] = tok
        elif op == "insert":
            data[pos:pos] = rng.choice(INTERESTING) * rng.randint(1, 64)
        elif op == "delete" and n:
            del data[pos:pos + rng.randint(1, 64)]
        elif op == "dup" and n:
            span = bytes(data[pos:pos + rng.randint(1, 256)])
            at = rng.randint(0, n)
            data[at:at] = span * rng.randint(1, 8)
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = rng.choice(seeds)
            a = rng.randint(0, len(other))
            data[pos:pos] = other[a:a + rng.randint(1, 512)]
        elif op == "random":
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif op == "length" and n:
            data[pos] = rng.choice((0x00, 0x7f, 0x80, 0x81, 0x82, 0x84, 0x85, 0xff))
    return bytes(data)
