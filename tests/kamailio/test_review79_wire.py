"""A seventy-ninth attacker's review (December 2026) of 753b2c5: the stream transports
(TCP) into Kamailio, framing first (real Kamailio 5.6.3, ``home_proxy``: MESSAGE
text/plain viewed, SQLite archive, open registrar).

Every test here is a ``test_control_*`` that passes and pins what held at the proxy.
The one hole found is past the proxy, in the TCP phone that receives what it relays
(``tests/pjsua/test_review79_phone.py``, and its core half ``tests/unit/test_review79.py``):
item 3's LF-only message, read alike by Kamailio and the core and relayed, swallows the
requests that follow it on a TCP phone's connection.

Attackers tried: an **insider UA** sending over TCP a MESSAGE whose framing differs
between Kamailio's stream reader and the core (to hide a body from the archive), and
an **insider callee** (or a hop between it and the proxy) sending over UDP a request or
a reply whose body the proxy relays onto a caller's TCP connection (to smuggle a second
message behind the first, one the proxy never read).

What held (each a control below):

1. A MESSAGE over TCP with no Content-Length (``tcp_accept_no_cl=yes`` is set for
   xhttp): Kamailio frames it as headers only; the octets after the blank line are a
   next "message" that does not parse and is dropped.  Bob gets the MESSAGE with no
   body, and neither he nor the archive sees the octets.  Same reading on both sides.
2. Two MESSAGEs pipelined in one TCP segment: each read, relayed and archived apart.
3. Content-Length forms the core would read otherwise: ``Content-Length`` and ``l:``
   both present (equal or not, in either order) and ``Content-Length: +9`` are refused
   (nothing relayed, nothing archived); LF-only line ends, ``Content-Length :`` (space
   before the colon) and a tab after the colon are read alike by Kamailio and the core
   (the body bob gets is the body archived).
4. A UDP MESSAGE with no Content-Length whose body is a whole second SIP request,
   relayed to a caller registered over TCP: Kamailio adds a Content-Length covering the
   whole body, so the caller reads one message, and the archive kept that body whole.
5. A UDP 200 to alice's TCP MESSAGE with ``Content-Length: 0`` and a whole SIP request
   after it (tm relays a reply's datagram as received): ``$bs`` counts the trailing
   octets, so ``response_needs_reading`` is true, the exact read fails and the core
   reply route drops it (review 69's fix also covers replies without a body); nothing
   reaches alice's TCP connection.

Not tried for lack of time (ideas for a next review): the pjsua2 phone over TCP
(pjsip's ``pjsip_find_msg`` frames by the first Content-Length and finds the end of
headers by ``\\n\\r\\n`` only, while Kamailio accepts LF-only line ends, item 3: a message
with LF-only line ends relayed to a TCP phone may desynchronise its stream), TLS
renegotiation and client certificates, a ``sips:``/``;transport=tls`` downgrade on the
next leg, and Via ``received``/``rport`` over TCP after the connection closed.

Fixed (stop 33): ``sip.parse(exact=True)`` refuses a head line that does not end in
CRLF; ``kemi.route_sanity`` answers such a request 400 before anything reads it and the
core reply route drops such a reply (``kemi._bare_line_ends``, the head only: a body may
hold any octets).  The holes turned XPASS and the markers are gone; controls that took
LF-only lines as read alike now assert the refusal (they said what the proxy did, not
what it should do).
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact

pytestmark = pytest.mark.kamailio

_N = itertools.count()


def _message(body: bytes, to: str, extra: list[bytes], *, content_length: bool = True,
             eol: bytes = b"\r\n") -> tuple[bytes, str]:
    """A MESSAGE from alice to ``to`` as TCP bytes, and its Call-ID."""
    n = next(_N)
    call_id = "r79-%d-%d@127.0.0.1" % (os.getpid(), n)
    lines = [b"MESSAGE sip:%s@example.com SIP/2.0" % to.encode(),
             b"Via: SIP/2.0/TCP 127.0.0.1:9;rport;branch=z9hG4bK-r79-%d-%d" % (os.getpid(), n),
             b"From: <sip:alice@example.com>;tag=r79a%d" % n,
             b"To: <sip:%s@example.com>" % to.encode(),
             b"Call-ID: " + call_id.encode(),
             b"CSeq: 1 MESSAGE", b"Max-Forwards: 70", b"Content-Type: text/plain", *extra]
    if content_length:
        lines.append(b"Content-Length: %d" % len(body))
    return eol.join(lines) + eol + eol + body, call_id


def _over_tcp(port: int, data: bytes, wait: float = 1.5) -> bytes:
    """Send ``data`` on a new TCP connection to the proxy; what came back in ``wait`` s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    got = b""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65535)
            except (socket.timeout, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    return got


def _archived(proxy, call_id: str) -> list[bytes]:
    return [bytes(row.plaintext or b"") for row in proxy.archive_rows()
            if getattr(row, "call_id", None) == call_id]


@pytest.fixture
def callee(home_proxy, request):
    """A raw UDP UA registered under a user name of this test's own."""
    user = "r79%d" % next(_N)
    uas = RawUas()
    register_contact(home_proxy, user, uas.port)
    yield user, uas
    uas.close()


def test_control_a_tcp_message_without_content_length_carries_no_body_anywhere(
        home_proxy, callee):
    user, bob = callee
    data, call_id = _message(b"HIDDEN-NO-CL", user, [], content_length=False)
    answer = _over_tcp(home_proxy.port, data)
    assert answer.startswith(b"SIP/2.0 200"), answer
    got = [m for m in bob.wait_for(1, timeout=3) if m.get("Call-ID") == call_id]
    assert len(got) == 1 and got[0].body == b""
    assert not any(b"HIDDEN-NO-CL" in raw for raw in bob.raw)
    assert not any(b"HIDDEN-NO-CL" in text for text in _archived(home_proxy, call_id))


def test_control_pipelined_tcp_messages_are_each_read_and_archived(home_proxy, callee):
    user, bob = callee
    first, first_id = _message(b"FIRST-PIPED", user, [])
    second, second_id = _message(b"SECOND-PIPED", user, [])
    answer = _over_tcp(home_proxy.port, first + second)
    assert answer.count(b"SIP/2.0 200") == 2, answer
    bob.wait_for(2, timeout=3)
    bodies = {m.get("Call-ID"): m.body for m in bob.received}
    assert bodies.get(first_id) == b"FIRST-PIPED" and bodies.get(second_id) == b"SECOND-PIPED"
    assert _archived(home_proxy, first_id) == [b"FIRST-PIPED"]
    assert _archived(home_proxy, second_id) == [b"SECOND-PIPED"]


@pytest.mark.parametrize("extra", [
    [b"Content-Length: 10", b"l: 10"],
    [b"Content-Length: 0", b"l: 10"],
    [b"l: 10", b"Content-Length: 0"],
    [b"Content-Length: +10"],
], ids=["both-forms-equal", "zero-then-compact", "compact-then-zero", "plus-sign"])
def test_control_ambiguous_content_length_on_tcp_is_refused(home_proxy, callee, extra):
    user, bob = callee
    data, call_id = _message(b"AMBIGUOUS!", user, extra, content_length=False)
    answer = _over_tcp(home_proxy.port, data)
    assert b"SIP/2.0 200" not in answer
    time.sleep(0.5)
    assert not any(m.get("Call-ID") == call_id for m in bob.received)
    assert not any(b"AMBIGUOUS!" in raw for raw in bob.raw)
    assert _archived(home_proxy, call_id) == []


@pytest.mark.parametrize("extra,eol", [
    ([b"Content-Length : 10"], b"\r\n"),
    ([b"Content-Length:\t10"], b"\r\n"),
], ids=["space-before-colon", "tab-after-colon"])
def test_control_odd_but_unambiguous_framing_is_read_alike(home_proxy, callee, extra, eol):
    user, bob = callee
    data, call_id = _message(b"ODD-FRAMED", user, extra, content_length=not extra, eol=eol)
    answer = _over_tcp(home_proxy.port, data)
    assert answer.startswith(b"SIP/2.0 200"), answer
    got = [m for m in bob.wait_for(1, timeout=3) if m.get("Call-ID") == call_id]
    assert len(got) == 1 and got[0].body == b"ODD-FRAMED"
    assert _archived(home_proxy, call_id) == [b"ODD-FRAMED"]


def test_lf_only_lines_are_refused_and_nothing_is_relayed(home_proxy, callee):
    """Fixed (stop 33; the review's control took LF-only lines as read alike): a bare LF
    is what a TCP phone cannot frame, so the proxy answers 400 and relays nothing."""
    user, bob = callee
    data, call_id = _message(b"ODD-FRAMED", user, [], content_length=True, eol=b"\n")
    answer = _over_tcp(home_proxy.port, data)
    assert answer.startswith(b"SIP/2.0 400"), answer
    assert not [m for m in bob.wait_for(1, timeout=1.5) if m.get("Call-ID") == call_id]
    assert _archived(home_proxy, call_id) == []


_INNER = (b"MESSAGE sip:alice@example.com SIP/2.0\r\n"
          b"Via: SIP/2.0/TCP 127.0.0.9:5060;branch=z9hG4bK-r79-inner\r\n"
          b"From: <sip:carol@example.com>;tag=inner\r\nTo: <sip:alice@example.com>\r\n"
          b"Call-ID: r79-inner@x\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\n"
          b"Content-Length: 12\r\n\r\nINNER-SECRET")


@pytest.fixture
def alice_over_tcp(home_proxy):
    alice = SipUa(home_proxy.port, transport="tcp", user="r79alice%d" % next(_N))
    register = alice.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
    answer = alice.request(register.replace("Contact", alice.contact))
    assert answer is not None and answer.status == 200, answer
    yield alice
    alice.close()


def _stream(alice: SipUa, wait: float = 1.5) -> bytes:
    alice.sock.settimeout(wait)
    data = alice._buffer
    try:
        data += alice.sock.recv(65535)
    except (socket.timeout, TimeoutError, OSError):
        pass
    return data


def test_control_a_udp_body_without_content_length_is_framed_whole_on_tcp(
        home_proxy, alice_over_tcp):
    alice = alice_over_tcp
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        outer = (b"MESSAGE sip:%s@example.com SIP/2.0\r\n"
                 b"Via: SIP/2.0/UDP 127.0.0.1:%d;rport;branch=z9hG4bK-r79-outer%d\r\n"
                 b"From: <sip:bob@example.com>;tag=outer\r\nTo: <sip:%s@example.com>\r\n"
                 b"Call-ID: r79-outer-%d@x\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n"
                 b"Content-Type: text/plain\r\n\r\n"
                 % (alice.user.encode(), udp.getsockname()[1], next(_N), alice.user.encode(),
                    os.getpid())) + _INNER
        udp.sendto(outer, ("127.0.0.1", home_proxy.port))
        time.sleep(1.0)
        stream = _stream(alice)
    finally:
        udp.close()
    head, _, body = stream.partition(b"\r\n\r\n")
    assert head.startswith(b"MESSAGE "), stream[:200]
    assert b"Content-Length: %d" % len(_INNER) in head
    assert body == _INNER             # one message on the stream, the inner one its body
    assert _archived(home_proxy, "r79-outer-%d@x" % os.getpid()) == [_INNER]


def test_control_a_udp_reply_with_octets_past_content_length_never_reaches_a_tcp_caller(
        home_proxy, callee, alice_over_tcp):
    user, bob = callee
    alice = alice_over_tcp

    def smuggling_ok(request):
        lines = [b"SIP/2.0 200 OK"] + [("%s: %s" % (n, v)).encode() for n, v in request.headers
                                       if n.lower() in ("via", "from", "to", "call-id", "cseq")]
        return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n" + _INNER
    bob.responder = smuggling_ok
    message = alice.build("MESSAGE", "sip:%s@example.com" % user,
                          headers=[("Content-Type", "text/plain")]).with_body(b"hi bob")
    mark = home_proxy.log_mark()
    alice.send(message.replace("Via", alice.via()))
    time.sleep(1.0)
    stream = _stream(alice)
    assert bob.wait_for(1, timeout=2)
    assert b"INNER-SECRET" not in stream and b"r79-inner@x" not in stream
    assert home_proxy.wait_log("octets after the Content-Length body", mark)


def test_a_bare_lf_reply_never_reaches_a_tcp_caller(home_proxy, callee, alice_over_tcp):
    """The reply direction of the fix (stop 33): bob answers alice's TCP MESSAGE with a
    bodiless 200 whose lines end in bare LF (no body, so nothing would read it for
    E2M); the core reply route drops it, and alice's stream carries no 200."""
    user, bob = callee
    alice = alice_over_tcp

    def bare_lf_ok(request):
        lines = [b"SIP/2.0 200 OK"] + [("%s: %s" % (n, v)).encode() for n, v in request.headers
                                       if n.lower() in ("via", "from", "to", "call-id", "cseq")]
        return b"\n".join(lines) + b"\nContent-Length: 0\n\n"
    bob.responder = bare_lf_ok
    message = alice.build("MESSAGE", "sip:%s@example.com" % user,
                          headers=[("Content-Type", "text/plain")]).with_body(b"hi bob")
    mark = home_proxy.log_mark()
    alice.send(message.replace("Via", alice.via()))
    assert bob.wait_for(1, timeout=2)
    assert home_proxy.wait_log("lines do not end in CRLF: dropped", mark)
    assert b"SIP/2.0 200" not in _stream(alice, wait=0.5)


def test_a_bare_lf_bye_is_refused(home_proxy, callee):
    """Requests the core never reads (a bodiless BYE) meet the same check at the door."""
    user, bob = callee
    data, call_id = _message(b"", user, [], eol=b"\n")
    data = data.replace(b"MESSAGE sip:", b"BYE sip:").replace(b"1 MESSAGE", b"1 BYE") \
        .replace(b"Content-Type: text/plain\n", b"")
    answer = _over_tcp(home_proxy.port, data)
    assert answer.startswith(b"SIP/2.0 400"), answer
    assert not [m for m in bob.wait_for(1, timeout=1.0) if m.get("Call-ID") == call_id]


def test_a_bare_lf_behind_a_nul_in_the_head_is_refused(home_proxy, callee):
    """Stop 37 (tried while fixing review 103's hole 3): the check read the head with
    {s.substr}, which copies up to a NUL and pads with zeros, so a NUL in a header could
    hide a bare LF after it (relayed to a TCP phone, such a message swallows the next
    ones: reviews 79, 80).  It held by luck (the zeros took the head's closing CRLF as
    well, so it was refused all the same); the head is now read byte-exact (base64 of
    the whole message, or slices checked against Kamailio's SHA-256 of it)."""
    user, bob = callee
    data, call_id = _message(b"ODD-FRAMED", user, [b"Subject: hi\x00there", b"X-After: 1"])
    data = data.replace(b"X-After: 1\r\n", b"X-After: 1\n")
    assert b"\x00" in data and b"1\nContent-Type" not in data and b"X-After: 1\n" in data
    answer = _over_tcp(home_proxy.port, data)
    relayed = [m for m in bob.wait_for(1, timeout=1.5) if m.get("Call-ID") == call_id]
    assert answer.startswith(b"SIP/2.0 400") and not relayed, (answer[:80], len(relayed))
