"""Issue 14: no log line carries a body, not even the core's parser errors.

Before: a request whose Via failed to parse was logged by Kamailio's core at ERROR with
the rest of the message, body included (``parse_via(): parsing via on: <...>`` and
``parse_msg: message=<...>``): a plaintext MESSAGE's text reached the log.  Now
``sip_parser_log`` keeps the second out and the launcher cuts the first (one line,
``sip_parser_log_oneline``) before the quoted text.  Each broken request carries a
unique canary in its body; the canary must be in no log line.
"""

from __future__ import annotations

import secrets
import socket
import time

import pytest

from e2m_lab.kamailio_harness import ProxyHandle

pytestmark = pytest.mark.kamailio


def _request(canary: str, *, via: str | None = None,
             cseq: str = "1 MESSAGE", from_: str = "<sip:alice@example.com>;tag=c1",
             start: str = "MESSAGE sip:bob@example.com SIP/2.0") -> bytes:
    # a branch of its own per request, as a UA makes it (one a live request holds is 482)
    via = via or f"SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-c{secrets.token_hex(4)}"
    body = f"the secret text {canary}\r\n".encode()
    return (f"{start}\r\nVia: {via}\r\nFrom: {from_}\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: canary-{secrets.token_hex(4)}@x\r\nCSeq: {cseq}\r\nMax-Forwards: 70\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


BROKEN = {
    "Via": dict(via="SIP/2.0/UDP 127.0.0.1:9 ;;;@@branch=z9hG4bK-c1"),
    "Via transport": dict(via="SIP/2.0/%%% 127.0.0.1:9;branch=z9hG4bK-c1"),
    "CSeq": dict(cseq="one MESSAGE"),
    "From": dict(from_="<sip:alice@example.com;tag=c1"),
    "request line": dict(start="MESSAGE sip:bob@example.com SIP/9.9 extra"),
}


# Broken framing on TCP: Kamailio's TCP reader logs its whole buffer at ERROR.
TCP_ONLY = {
    "Content-Length": lambda data: data.replace(b"Content-Length: ", b"Content-Length: x"),
    "message over tcp_max_message_kb": lambda data: data.replace(
        b"the secret text", b"the secret text " + b"padding " * 3000),
}


def _send(proxy: ProxyHandle, data: bytes, transport: str) -> None:
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(data, ("127.0.0.1", proxy.port))
        sock.close()
        return
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
        sock.sendall(data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        time.sleep(0.3)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_no_body_of_a_broken_request_reaches_the_log(proxy_factory, transport):
    proxy = proxy_factory("canary", e2m=True, view=("MESSAGE:*",), log_level="debug",
                          extra={"kamailio": {"tcp_max_message_kb": 16}})
    mark = proxy.log_mark()
    canaries = {}
    for name, broken in BROKEN.items():
        canary = f"CANARY{secrets.token_hex(8)}"
        canaries[name] = canary
        _send(proxy, _request(canary, **broken), transport)
    if transport == "tcp":
        for name, breaking in TCP_ONLY.items():
            canary = f"CANARY{secrets.token_hex(8)}"
            canaries[name] = canary
            _send(proxy, breaking(_request(canary)), transport)
    assert proxy.options() is not None           # alive, and every line has passed
    time.sleep(0.5)
    log = proxy.log_since(mark)
    for name, canary in canaries.items():
        assert canary not in log, f"the body of the request with a broken {name} was logged"
    assert "parse_via" in log                     # the core did complain ...
    assert "cut by e2m-proxy" in log              # ... and its quote was cut
    if transport == "tcp":
        assert "parse_content_length()" in log    # the broken length was seen too
