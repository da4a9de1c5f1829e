"""A corpus of malformed and hostile SIP requests, made here by mutating valid E2M
messages built with the core (those the error-table tests send too come from
``e2m_lab.hostile``), sent to a running trusted proxy over UDP and over TCP,
interleaved with valid E2M MESSAGEs.

The answer each hostile request must get is not written down by hand where the core
decides it: the core's proxy engine, loaded in this process from the running proxy's
own PROXY.toml, inspects the very same bytes and its verdict (or the core parser's
refusal, which kemi.py answers 400) is the expectation.  Where SIP itself is broken
(framing, missing mandatory headers, version), Kamailio answers or drops before the
engine runs; those cases carry their expectation and the RFC 3261 reason for it.

Every valid MESSAGE must be forwarded byte-exact and archived; at the end the proxy
answers OPTIONS and its log holds no Python traceback and no body text.
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab import hostile
from e2m_lab.flows import SDP_OFFER, TRUSTED, answer, invite, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import RawUas
from e2m_lab.sipp import register
from e2m_lab.wire import Expected, Peer, digest, engine_expectation, engine_for, with_via

from e2m_plugins import mime
from e2m_plugins.testpki import TestPKI
from e2m_plugins.sip import RequestLine, SipMessage, parse
from e2m_plugins.config import load_proxy_config
from kamailio_app.bootstrap import route_tokens
from kamailio_app.dialog_route import RouteTokens, dialog_parties

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

VIEW = ("MESSAGE:*", "INVITE:application/sdp")
VERIFY = ("MESSAGE:*",)
SECRET = b"corpus secret 5d1e: the launch code is 0000"
SEED = 20261127
DROP_WAIT = 1.5            # how long a dropped request is given to be answered anyway


# --------------------------------------------------------------------------- builders

class Maker:
    """Valid E2M requests from alice's UA engine (signed, encrypted for bob and the
    proxy, labelled), fresh Call-ID each time; and the proxy's routing details."""

    def __init__(self, pki: TestPKI, proxy_port: int, bob_port: int,
                 routes: RouteTokens | None = None) -> None:
        self.pki = pki
        self.proxy_port = proxy_port
        self.bob_port = bob_port
        self.routes = routes or RouteTokens.random()   # the proxy's Record-Route tokens
        known = known_proxy(pki, TRUSTED, VIEW, VERIFY)
        self.alice = ua_engine(pki, "alice", proxies=(known,), sign=True)
        self.n = 0

    def text(self, tag: str = "") -> bytes:
        self.n += 1
        return SECRET + f" #{self.n} {tag}".encode()

    def message(self, text: bytes | None = None) -> SipMessage:
        return self.alice.protect(message(self.pki, text or self.text())).message

    def invite(self) -> SipMessage:
        return self.alice.protect(invite(self.pki, SDP_OFFER, call_id=f"inv{time.monotonic_ns()}@x",
                                         from_tag=f"a{time.monotonic_ns()}")).message

    def hostile(self, build: Callable[..., SipMessage]) -> SipMessage:
        """One of ``e2m_lab.hostile``'s requests, carrying this corpus's secret text."""
        return build(self.pki, text=self.text(build.__name__))


def _label(msg: SipMessage, value: str) -> SipMessage:
    return msg.remove("Proxy-Required-Body").add("Proxy-Required-Body", value)


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1:]


def _base64_entity(msg: SipMessage, b64: bytes) -> SipMessage:
    hs = [(n, v) for n, v in msg.headers if n.lower() != "content-transfer-encoding"]
    out = SipMessage(msg.start_line, (*hs, ("Content-Transfer-Encoding", "base64")), msg.body)
    return out.with_body(b64)


def _sub(pattern: bytes, repl: bytes, data: bytes, count: int = 1) -> bytes:
    out, n = re.subn(pattern, repl, data, count=count)
    assert n, f"mutation pattern {pattern!r} did not match"
    return out


# --------------------------------------------------------------------------- the corpus

@dataclass
class Case:
    """One hostile request.  ``build(maker)`` gives a SipMessage (the Via is set per
    send), ``mutate(bytes)`` breaks the serialized form (None: keep it).
    ``sip`` is the expectation when SIP framing/mandatory headers are broken (the
    engine never sees those bytes): a dict transport -> Expected.  Otherwise the
    engine's verdict on the same bytes is the expectation."""

    name: str
    build: Callable[[Maker], SipMessage]
    mutate: Callable[[bytes], bytes] | None = None
    sip: dict[str, Expected] | None = None
    transports: tuple[str, ...] = ("udp", "tcp")


def _body_cases() -> list[Case]:
    """Truncations and bit flips of the DER, with a correct Content-Length."""
    cases: list[Case] = []
    # Offsets: fixed small ones, fractions, and just short of the end.
    for spec in ("1", "2", "10", "40", "100", "1/4", "1/3", "1/2", "2/3", "3/4", "-20", "-1"):
        def build(m: Maker, spec=spec) -> SipMessage:
            msg = m.message()
            size = len(msg.body)
            cut = (size * int(spec[0]) // int(spec[2]) if "/" in spec
                   else size + int(spec) if spec.startswith("-") else int(spec))
            return msg.with_body(msg.body[:cut])
        cases.append(Case(f"DER truncated at {spec}", build))
    rng = random.Random(SEED)
    # Regions: outer tag and length, content-type OID, recipient infos (early), the
    # encrypted content (middle), the GCM tag (last 16 octets); plus seeded positions.
    spots = [("outer tag", 0), ("outer length", 1), ("content type OID", 8), ("version", 20),
             ("recipient info", 60), ("encrypted key", 200), ("middle", "1/2"), ("GCM tag", -8)]
    spots += [(f"seeded {i}", f"r{rng.random():.6f}:{rng.randrange(8)}") for i in range(6)]
    for label, where in spots:
        def build(m: Maker, where=where) -> SipMessage:
            msg = m.message()
            body, bit = msg.body, 0
            if isinstance(where, int):
                index = where if where >= 0 else len(body) + where
            elif where == "1/2":
                index = len(body) // 2
            else:
                frac, bit_s = where[1:].split(":")
                index, bit = int(float(frac) * len(body)), int(bit_s)
            return msg.with_body(_flip(body, index, bit))
        cases.append(Case(f"bit flip: {label}", build))
    return cases


def _encoding_cases() -> list[Case]:
    def b64(m: Maker, fn) -> SipMessage:
        msg = m.message()
        return _base64_entity(msg, fn(base64.encodebytes(msg.body)))
    return [
        Case("base64: valid (control, must pass)", lambda m: b64(m, lambda b: b)),
        Case("base64: invalid character", lambda m: b64(m, lambda b: b[:30] + b"!" + b[31:])),
        Case("base64: cut mid-quantum", lambda m: b64(m, lambda b: b.rstrip()[:-3])),
        Case("base64: flipped letter", lambda m: b64(m, lambda b: b[:80] + (b"A" if b[80:81] != b"A" else b"B") + b[81:])),
        Case("base64: padding in the middle", lambda m: b64(m, lambda b: b[:40] + b"==" + b[40:])),
        Case("garbage DER", lambda m: m.message().with_body(b"\x30\x82\xff\xff" + bytes(range(256)) * 3)),
        Case("empty S/MIME body", lambda m: m.message().with_body(b"")),
        Case("a certificate instead of an envelope",
             lambda m: m.message().with_body(m.pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER))),
        Case("indefinite length nested 200 deep",
             lambda m: m.message().with_body(b"\x30\x80" * 200 + b"\x00\x00" * 200)),
    ]


def _header_cases() -> list[Case]:
    def ctype(value: str) -> Callable[[Maker], SipMessage]:
        return lambda m: m.message().replace("Content-Type", value)

    def replay(m: Maker) -> SipMessage:
        first = m.message()
        later = m.message()
        return later.with_body(first.body)          # a new Call-ID, the old envelope

    def invite_not_for_proxy(m: Maker) -> SipMessage:
        bare = ua_engine(m.pki, "alice")                 # knows no proxy: bob only
        return bare.protect(invite(m.pki, SDP_OFFER, call_id=f"np{time.monotonic_ns()}@x")).message

    def reinvite_unknown_key(m: Maker) -> SipMessage:
        """In-dialog re-INVITE under a CEK the proxy never saw (Route to the proxy, with
        the token its Record-Route would have carried: the engine, not the routing
        check, is what this case is about)."""
        alice = ua_engine(m.pki, "alice", proxies=(known_proxy(m.pki, TRUSTED, VIEW),))
        bob = ua_engine(m.pki, "bob")
        call = f"rk{time.monotonic_ns()}@x"
        first = alice.protect(invite(m.pki, call_id=call)).message
        opened = bob.open(first).message
        alice.open(bob.protect(answer(opened)).message)
        again = invite(m.pki, call_id=call, cseq=2, to_tag="b1")
        parties = dialog_parties(first.address("From").uri, first.address("To").uri)
        sent = alice.protect(again).message
        return (sent.with_start_line(RequestLine("INVITE", f"sip:bob@127.0.0.1:{m.bob_port}"))
                .insert("Route", f"<sip:127.0.0.1:{m.proxy_port};lr"
                                 f"{m.routes.param(call, first.from_tag or '', parties=parties)}>",
                        1))

    def many_parts(m: Maker) -> SipMessage:
        mixed = mime.multipart_mixed([mime.MimePart((("Content-Type", "text/plain"),), b"x")] * 300)
        return m.message().with_body(mixed.body, mixed.header("Content-Type"))

    def nested_multipart(m: Maker) -> SipMessage:
        body, ctype_ = b"hi", "text/plain"
        for depth in range(12):
            boundary = f"nest{depth}"
            body = (f"--{boundary}\r\nContent-Type: {ctype_}\r\n\r\n".encode() + body
                    + f"\r\n--{boundary}--\r\n".encode())
            ctype_ = f'multipart/mixed; boundary="{boundary}"'
        return m.message().with_body(body, ctype_)

    return [
        Case("label names a missing part", lambda m: m.hostile(hostile.label_names_missing_part)),
        Case("label without host", lambda m: m.hostile(hostile.label_without_host)),
        Case("label with a port", lambda m: _label(m.message(), f"{TRUSTED}:5070")),
        Case("duplicate labels", lambda m: m.message().add("Proxy-Required-Body", f"{TRUSTED}")),
        Case("label for another host only", lambda m: _label(m.message(), "elsewhere.example.net")),
        Case("wrong type: text/plain over DER", ctype("text/plain")),
        Case("wrong type: signed-data over an envelope", ctype("application/pkcs7-mime; smime-type=signed-data")),
        Case("wrong type: multipart without boundary", ctype("multipart/mixed")),
        Case("wrong type: no subtype", ctype("application")),
        Case("wrong type: unknown S/MIME type", ctype("application/pkcs7-mime; smime-type=certs-only")),
        Case("unknown transfer encoding", lambda m: m.message().add("Content-Transfer-Encoding", "x-uuencode")),
        Case("two Content-Type headers", lambda m: m.message().add("Content-Type", "text/plain")),
        Case("unknown recipients only (carol)", lambda m: m.hostile(hostile.for_someone_else)),
        Case("proxy not a recipient, unlabelled", lambda m: m.hostile(hostile.not_a_recipient)),
        Case("INVITE SDP not for the proxy", invite_not_for_proxy),
        Case("re-INVITE under a CEK the proxy never saw", reinvite_unknown_key),
        Case("body cut from another dialog", lambda m: m.hostile(hostile.body_from_another_dialog)),
        Case("envelope replayed in a new dialog", replay),
        Case("unsigned where policy verifies", lambda m: m.hostile(hostile.unsigned)),
        Case("signed by another user", lambda m: m.hostile(hostile.stranger_signs_as_alice)),
        Case("300 MIME parts", many_parts),
        Case("multipart nested 12 deep", nested_multipart),
        # A 270 KiB body gets the engine's 413: see test_wire_regressions.  Over the
        # TCP cap (320 KiB) Kamailio drops the message itself: a SIP-level case below.
        Case("header line of 9 KiB", lambda m: m.message().add("Subject", "s" * 9000)),
        Case("300 headers", lambda m: _many_headers(m.message(), 300)),
        Case("control character in a header", lambda m: m.hostile(hostile.control_character_in_a_header)),
    ]


def _many_headers(msg: SipMessage, count: int) -> SipMessage:
    for i in range(count):
        msg = msg.add(f"X-Pad-{i}", "p")
    return msg


# SIP-level breakage: Kamailio answers or drops before the engine runs.  RFC 3261 §18.3:
# on UDP a Content-Length larger than the datagram is an error (400); on TCP the stream
# waits for the missing octets, so there is nothing to answer yet.  §8.2.6/§20: a request
# without Via, From, To, Call-ID or CSeq cannot be answered (the answer is built from them):
# it is discarded.  A duplicate single-valued framing header (Content-Length, Call-ID)
# makes the framing ambiguous: discarded (no answer can be trusted to reach the sender).
BAD_REQUEST = Expected(400, why="400 from Kamailio (sanity/parser) for broken SIP")
DROP = Expected(None, why="dropped: cannot be answered per RFC 3261")
_CL = rb"Content-Length: (\d+)"


def _sip_cases() -> list[Case]:
    msg = lambda m: m.message()
    both = lambda e: {"udp": e, "tcp": e}
    return [
        Case("Content-Length larger than the data", msg,
             lambda b: re.sub(_CL, lambda x: b"Content-Length: %d" % (int(x.group(1)) + 500), b, count=1),
             sip={"udp": BAD_REQUEST, "tcp": DROP}),
        Case("datagram/stream cut inside the body", msg,
             lambda b: b[:b.index(b"\r\n\r\n") + 4 + 70], sip={"udp": BAD_REQUEST, "tcp": DROP}),
        Case("Content-Length smaller than the body", msg,
             lambda b: re.sub(_CL, lambda x: b"Content-Length: %d" % (int(x.group(1)) - 100), b, count=1),
             sip=both(BAD_REQUEST)),
        Case("no Content-Length", msg, lambda b: _sub(rb"Content-Length: \d+\r\n", b"", b),
             # UDP: the rest of the datagram is the body (engine decides); TCP: mandatory.
             sip={"udp": None, "tcp": BAD_REQUEST}),
        Case("two Content-Length values", msg, lambda b: _sub(rb"(Content-Length: \d+\r\n)", rb"\1Content-Length: 3\r\n", b),
             sip=both(DROP)),
        Case("no From", msg, lambda b: _sub(rb"From: [^\r]*\r\n", b"", b), sip=both(DROP)),
        Case("no Call-ID", msg, lambda b: _sub(rb"Call-ID: [^\r]*\r\n", b"", b), sip=both(DROP)),
        Case("no CSeq", msg, lambda b: _sub(rb"CSeq: [^\r]*\r\n", b"", b), sip=both(DROP)),
        Case("no Via", msg, lambda b: _sub(rb"Via: [^\r]*\r\n", b"", b), sip=both(DROP)),
        Case("two Call-IDs", msg, lambda b: _sub(rb"(Call-ID: [^\r]*\r\n)", rb"\1Call-ID: other@x\r\n", b),
             sip=both(DROP)),
        Case("CSeq method differs from the request's", msg,
             lambda b: _sub(rb"CSeq: 1 MESSAGE", b"CSeq: 1 INVITE", b), sip=both(BAD_REQUEST)),
        Case("Request-URI unparseable", msg,
             lambda b: _sub(rb"^MESSAGE sip:[^ ]+", b"MESSAGE bob@@", b), sip=both(BAD_REQUEST)),
        Case("SIP version 7.0", msg, lambda b: _sub(rb" SIP/2\.0\r\n", b" SIP/7.0\r\n", b), sip=both(DROP)),
        Case("cut inside the header section", msg,
             lambda b: b[:b.index(b"\r\n\r\n") - 25], sip=both(DROP)),
        # RFC 3261 §8.2 says a malformed request SHOULD get 400; Kamailio's parser
        # discards a header section with a NUL octet instead (allowed: SHOULD).
        Case("NUL octet in the Call-ID", msg,
             lambda b: _sub(rb"(Call-ID: [^\r]{3})", b"\\1\x00", b),
             sip=both(Expected(None, why="Kamailio discards a NUL in the header section"))),
        # Routing decisions, taken before the engine: RFC 3261 §16.3 step 3 and §16.5.
        Case("Max-Forwards 0", lambda m: m.hostile(hostile.too_many_hops),
             sip=both(Expected(483, why="RFC 3261 §16.3: Max-Forwards 0"))),
        Case("Request-URI user not registered", lambda m: m.message().with_start_line(
            RequestLine("MESSAGE", "sip:nobody@example.com")),
             sip=both(Expected(404, why="RFC 3261 §16.5: no target in the location service"))),
        # Larger than [kamailio] tcp_max_message_kb (320): Kamailio's TCP reader drops it.
        Case("message over the TCP size cap (400 KiB)",
             lambda m: m.message().with_body(b"\x30\x83\x06\x40\x00" + b"A" * (400 * 1024)),
             sip={"tcp": Expected(None, why="over tcp_rd_buf_size: dropped by Kamailio")},
             transports=("tcp",)),
    ]


def _datagrams() -> list[tuple[str, bytes]]:
    """Not SIP at all: no answer (nobody to answer to)."""
    rng = random.Random(SEED + 1)
    return [("zeros", b"\x00" * 300), ("random", bytes(rng.randrange(256) for _ in range(700))),
            ("start line only", b"MESSAGE sip:bob@example.com SIP/2.0\r\n\r\n"),
            ("a response from nowhere", b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ("TLS client hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160),
            ("HTTP", b"POST /e2m HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")]


CASES = _body_cases() + _encoding_cases() + _header_cases() + _sip_cases()


# --------------------------------------------------------------------------- the run

@dataclass
class Sent:
    case: str
    transport: str
    expected: Expected
    peer: Peer
    request: bytes
    answer: SipMessage | None = None
    bob_before: int = 0
    checks: list[str] = field(default_factory=list)


def _ack(peer: Peer, request: bytes, response: SipMessage) -> None:
    """ACK a non-2xx final answer to an INVITE (same branch), so it is not retransmitted."""
    try:
        req = parse(request)
    except Exception:  # noqa: BLE001 - a request we broke on purpose
        return
    if req.method != "INVITE" or (response.status or 0) < 300:
        return
    ack = SipMessage(RequestLine("ACK", req.request_uri), (
        ("Via", req.get("Via")), ("From", req.get("From")), ("To", response.get("To")),
        ("Call-ID", req.call_id), ("CSeq", f"{req.cseq[0]} ACK"), ("Max-Forwards", "70")), b"")
    peer.send(ack.serialize())


def _line(sent: Sent) -> str:
    got = "no answer" if sent.answer is None else f"{sent.answer.status} {sent.answer.reason}"
    warning = sent.answer.get("Warning") if sent.answer is not None else None
    return (f"{sent.transport} {sent.case!r}: expected {sent.expected.describe()}, got {got}"
            f"{' [' + warning + ']' if warning else ''}; request {len(sent.request)} bytes "
            f"sha256 {digest(sent.request)}")


@pytest.fixture
def corpus_world(proxy_factory, sipp):
    proxy = proxy_factory("trusted", view=VIEW, verify=VERIFY)
    bob = RawUas()
    try:
        register(proxy, "bob", bob.port, sipp)
        yield proxy, bob
    finally:
        bob.close()


def test_hostile_corpus_over_udp_and_tcp_interleaved_with_valid_traffic(corpus_world, pki, exchange):
    proxy, bob = corpus_world
    maker = Maker(pki, proxy.port, bob.port,
                  route_tokens(load_proxy_config(proxy.config_path)))
    engine = engine_for(proxy)
    assert len(CASES) + len(_datagrams()) >= 50
    sent_all: list[Sent] = []
    pending_drops: list[Sent] = []
    valid_texts: list[bytes] = []
    valid_bodies: list[bytes] = []
    failures: list[str] = []
    schedule = [(case, t) for case in CASES for t in case.transports]
    random.Random(SEED).shuffle(schedule)

    def send_valid(transport: str) -> None:
        text = maker.text(f"valid via {transport}")
        msg = maker.message(text)
        peer = Peer(transport, proxy.port)
        try:
            data = with_via(msg, peer).serialize()
            peer.send(data)
            got = peer.final(5.0)
        finally:
            peer.close()
        exchange.append(f"{transport} valid MESSAGE: {got.status if got else 'no answer'}")
        if got is None or got.status != 200:
            failures.append(f"valid MESSAGE over {transport}: "
                            f"{'no answer' if got is None else got.status}")
        valid_texts.append(text)
        valid_bodies.append(msg.body)

    for index, (case, transport) in enumerate(schedule):
        if index % 4 == 0:
            send_valid("udp" if index % 8 == 0 else "tcp")
        peer = Peer(transport, proxy.port)
        data = with_via(case.build(maker), peer).serialize()
        if case.mutate is not None:
            data = case.mutate(data)
        sip_expect = (case.sip or {}).get(transport)
        expected = sip_expect if sip_expect is not None else engine_expectation(engine, data)
        sent = Sent(case.name, transport, expected, peer, data, bob_before=len(bob.received))
        sent_all.append(sent)
        peer.send(data)
        if expected.code is None and not expected.forward:
            pending_drops.append(sent)        # checked at the end: late answers count
            continue
        sent.answer = peer.final(5.0)
        if sent.answer is not None:
            _ack(peer, data, sent.answer)
        exchange.append(_line(sent))
        want = 200 if expected.forward else expected.code
        if sent.answer is None or sent.answer.status != want:
            failures.append(_line(sent))
            continue
        if expected.certificate and sent.answer.body != pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER):
            failures.append(_line(sent) + " - the 496 does not carry the proxy certificate")
        if expected.forward:
            got = bob.wait_for(sent.bob_before + 1, timeout=3.0)
            if len(got) <= sent.bob_before or got[-1].body != parse(data).body:
                failures.append(_line(sent) + " - not delivered byte-exact")
        peer.close()

    # The dropped ones: no answer, not even late; nothing delivered for them.
    time.sleep(DROP_WAIT)
    for sent in pending_drops:
        sent.answer = sent.peer.final(0.05)
        exchange.append(_line(sent))
        if sent.answer is not None:
            failures.append(_line(sent) + " - should have been dropped")
        sent.peer.close()
    for name, junk in _datagrams():
        for transport in ("udp", "tcp"):
            peer = Peer(transport, proxy.port)
            peer.send(junk)
            got = peer.final(0.5)
            exchange.append(f"{transport} datagram {name!r}: {'no answer' if got is None else got.status}")
            if got is not None:
                failures.append(f"{transport} datagram {name!r} was answered {got.status}")
            peer.close()
    send_valid("udp")
    send_valid("tcp")

    # Every valid MESSAGE was delivered byte-exact and archived with its text.
    delivered = {m.body for m in bob.received}
    missing = [i for i, body in enumerate(valid_bodies) if body not in delivered]
    archived = {row.plaintext for row in proxy.archive_rows()}
    unarchived = [i for i, text in enumerate(valid_texts) if text not in archived]
    assert not failures, f"{len(failures)} of {len(sent_all)} sends wrong:\n" + "\n".join(failures)
    assert not missing, f"valid MESSAGEs not delivered: {missing}"
    assert not unarchived, f"valid MESSAGEs not archived: {unarchived}"
    # Nothing refused was archived: rows = valid ones + what the engine forwarded after viewing.
    forwarded_seen = sum(1 for s in sent_all if s.expected.forward)
    rows = proxy.archive_rows()
    assert len(valid_texts) <= len(rows) <= len(valid_texts) + forwarded_seen

    # Still alive and answering; no Python traceback; the route's own failures were answered.
    options = proxy.options(timeout=2.0)
    assert options is not None and options.status == 200
    assert proxy.alive()
    log = proxy.log_since(0)
    assert "Traceback" not in log
    route_failures = log.count("e2m: request route failed")
    answered_500 = sum(1 for s in sent_all if s.answer is not None and s.answer.status == 500)
    assert route_failures <= answered_500, f"{route_failures} route failures, {answered_500} answered 500"
    assert SECRET.decode() not in log
    counts: dict[str, int] = {}
    for s in sent_all:
        key = f"{s.transport} {'forward' if s.expected.forward else s.expected.code or 'drop'}"
        counts[key] = counts.get(key, 0) + 1
    print(f"\ncorpus: {len(CASES)} cases, {len(sent_all)} hostile sends + "
          f"{2 * len(_datagrams())} junk datagrams/streams, {len(valid_texts)} valid MESSAGEs; "
          f"answers by transport: {dict(sorted(counts.items()))}")
