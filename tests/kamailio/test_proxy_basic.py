"""The proxy as a SIP node: start, REGISTER, OPTIONS, 404, byte-exact relay, certificate URL.

Real Kamailio started by ``e2m-proxy``, driven by real SIPp, on loopback.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from e2m_plugins.headers import parse_policy_headers
from e2m_plugins.sip import make_request
from e2m_lab.kamailio_harness import PROXY_HOST, ProxyHandle
from e2m_lab.sipp import SippRunner, register, send_with_sipp

pytestmark = pytest.mark.kamailio   # and sipp where a test uses the fixture

TEXT = b"Hello, Bob. Routing proxies only route.\r\n"


def _message(sipp: SippRunner, proxy: ProxyHandle, tmp_path: Path, to_user: str,
             body: bytes, expect: int, ctype: str = "text/plain"):
    request = make_request("MESSAGE", f"sip:{to_user}@example.com", from_uri="sip:alice@example.com",
                           to_uri=f"sip:{to_user}@example.com", body=body, content_type=ctype)
    return send_with_sipp(sipp, proxy.port, request, expect=expect, workdir=tmp_path)


def _received_body(trace: str) -> bytes:
    """The body of the first MESSAGE in a SIPp UAS message trace (text bodies only)."""
    start = trace.index("MESSAGE sip:")
    head, _, rest = trace[start:].partition("\r\n\r\n")
    length = int(next(line.split(":", 1)[1] for line in head.splitlines()
                      if line.lower().startswith("content-length")))
    return rest.encode("utf-8", "surrogateescape")[:length]


def test_plain_proxy_registers_routes_and_relays_byte_exact(proxy_factory, sipp, tmp_path):
    proxy = proxy_factory("plain", e2m=False)
    bob = sipp.uas("uas_message.xml")

    registered = register(proxy, "bob", bob.port, sipp)
    assert registered.logged("Proxy-Body-Policy") == [""]   # a routing hop announces nothing

    options = sipp.uac("uac_options.xml", proxy.port)
    assert options.rc == 0 and options.logged("Proxy-Body-Policy") == [""]

    unknown = _message(sipp, proxy, tmp_path, "nobody", TEXT, expect=404)
    assert unknown.rc == 0, unknown.output[-800:]

    sent = _message(sipp, proxy, tmp_path, "bob", TEXT, expect=200)
    assert sent.rc == 0, sent.output[-800:]
    got = bob.wait()
    assert got.rc == 0
    assert _received_body(got.messages) == TEXT


def test_e2m_proxy_announces_policy_and_serves_its_certificate(proxy_factory, sipp, tmp_path,
                                                               pki):
    proxy = proxy_factory("home", e2m=True)
    bob = sipp.uas("uas_message.xml")

    registered = register(proxy, "bob", bob.port, sipp)
    (value,) = registered.logged("Proxy-Body-Policy")
    (policy,) = parse_policy_headers(value.strip())
    assert policy.is_for(PROXY_HOST)
    assert policy.view_matches("MESSAGE", "text/plain")
    assert policy.cert_url == proxy.cert_url

    options = sipp.uac("uac_options.xml", proxy.port)
    assert options.rc == 0
    assert parse_policy_headers(options.logged("Proxy-Body-Policy")[0].strip()) == [policy]

    with urllib.request.urlopen(policy.cert_url, timeout=5) as answer:
        assert answer.headers["Content-Type"] == "application/pkix-cert"
        der = answer.read()
    assert hashlib.sha256(der).digest() == policy.cert_fingerprint
    assert x509.load_der_x509_certificate(der) == pki.proxy(PROXY_HOST).cert

    unknown = _message(sipp, proxy, tmp_path, "nobody", TEXT, expect=404)
    assert unknown.rc == 0, unknown.output[-800:]

    sent = _message(sipp, proxy, tmp_path, "bob", TEXT, expect=200)
    assert sent.rc == 0, sent.output[-800:]
    got = bob.wait()
    assert got.rc == 0
    assert _received_body(got.messages) == TEXT
    # The forwarded request announces the proxy's policy toward the called UA.
    assert f"Proxy-Body-Policy: {value.strip()}" in got.messages


def test_unknown_path_on_the_certificate_listener_is_404(home_proxy):
    url = home_proxy.cert_url.replace("/e2m/cert.der", "/e2m/other")
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    else:  # pragma: no cover - the assertion message is the point
        raise AssertionError("an unknown path was served")


def test_message_over_tcp_with_a_large_binary_body(proxy_factory, sipp, raw_uas, tmp_path):
    """SIP over the TCP listener (the one xhttp shares): a 30 KB body with every octet
    value arrives byte-exact at a UDP contact."""
    proxy = proxy_factory("tcp", e2m=True, view=("MESSAGE:text/plain",))
    register(proxy, "bob", raw_uas.port, sipp)
    body = bytes(range(256)) * 120
    request = make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", body=body,
                           content_type="application/octet-stream")
    sent = send_with_sipp(sipp, proxy.port, request, workdir=tmp_path, transport="tcp")
    assert sent.rc == 0, sent.output[-800:]
    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    assert got.body == body
