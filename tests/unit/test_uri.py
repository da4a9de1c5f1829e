"""One parser for SIP URIs, AoRs and hosts."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins import uri
from e2m_plugins.errors import E2MError, MalformedError
from e2m_plugins.uri import SipIdentity


def test_parse_uri_parts() -> None:
    u = uri.parse_uri("<SIPS:Alice@Atlanta.Example.COM:5061;Transport=tls;lr?Subject=x&p=%20>")
    assert (u.scheme, u.user, u.host, u.port) == ("sips", "Alice", "Atlanta.Example.COM", 5061)
    assert u.params == {"transport": "tls", "lr": None}
    assert u.headers == "Subject=x&p=%20" and u.password is None
    v6 = uri.parse_uri("sip:[2001:DB8::1]")
    assert (v6.user, v6.host, v6.port, v6.params) == (None, "[2001:DB8::1]", None, {})
    # The one '@' ends the user part, which may hold ';' and '?' (RFC 3261 §19.1.3).
    day = uri.parse_uri("sip:alice;day=tuesday@atlanta.com")
    assert (day.user, day.host, day.params) == ("alice;day=tuesday", "atlanta.com", {})
    assert uri.parse_uri("sip:+1-212-555-1212:1234@gateway.com;user=phone").password == "1234"


@pytest.mark.parametrize("text", [
    "tel:+123", "mailto:a@b", "sip:", "sip:@example.com", "sip:a@", "sip:a@b@c",
    "sip:a@b;x=1;X=2",              # a URI parameter given twice
    "sip:a@b;", "sip:a@b:", "sip:a@b:99999", "sip:a@b:5o60", "sip:a b@c", "sip:a@b c",
    "sip:a@[2001:db8::1", "sip:a@[fe80::1%25eth0]", "sip:a@[::1]x", "sip:a@-bad-.com",
    "sip:a@b?x=<y>", "sip:a\"b@c", "sip:a@b;x=\"y\"",
])
def test_malformed_uris(text: str) -> None:
    with pytest.raises(MalformedError):
        uri.parse_uri(text)
    assert uri.identity_of(text) is None


def test_aor_rules() -> None:
    alice = SipIdentity("alice", "example.com")
    for text in ("sip:alice@example.com", "sips:alice@EXAMPLE.com", "SIP:alice@example.com.",
                 "<sip:alice@example.com:5061;transport=tls?subject=x>",
                 "sip:al%69ce@example.com"):
        assert uri.aor_of(text) == alice, text
        assert uri.same_aor(text, "sip:alice@example.com")
    assert not uri.same_aor("sip:Alice@example.com", "sip:alice@example.com")  # user: case kept
    assert not uri.same_aor("sip:alice@example.com", "sip:alice@example.org")
    assert not uri.same_aor("sip:example.com", "sip:example.com")             # no user: no AoR
    assert not uri.same_aor("tel:1", "tel:1")
    assert uri.identity_of("sip:[2001:DB8:0::1]:5060") == SipIdentity(None, "[2001:db8::1]")
    for bad in ("sip:alice:secret@example.com", "sip:%ff@example.com", "sip:example.com"):
        with pytest.raises(MalformedError):
            uri.aor_of(bad)
    assert str(alice) == "sip:alice@example.com"


def test_a_user_part_with_a_semicolon_is_a_user_not_a_host() -> None:
    # A SAN URI sip:ss1.example.com;x@evil.example.com names no proxy ss1.example.com.
    assert uri.identity_of("sip:ss1.example.com;x@evil.example.com") == \
        SipIdentity("ss1.example.com;x", "evil.example.com")


def test_hosts() -> None:
    assert uri.host_key("Example.COM.") == "example.com"
    assert uri.host_key("[2001:DB8:0::1]") == "[2001:db8::1]"
    assert uri.split_hostport("[::1]:5060") == ("[::1]", 5060)
    assert uri.split_hostport("h.example.com") == ("h.example.com", None)
    for bad in ("", "h:", "h:x", "[::1]5060", "a_b.example.com", "h.example.com:65536"):
        with pytest.raises(MalformedError):
            uri.split_hostport(bad)


def test_http_urls() -> None:
    assert uri.http_url_host("https://Certs.Example.com:8443/p.der") == "certs.example.com"
    assert uri.check_http_url("http://[::1]/c") == "http://[::1]/c"
    for bad in (None, "", "ftp://x/c", "https://", "http://x:99999/", "http://x/a b", "file:///etc"):
        with pytest.raises(MalformedError):
            uri.http_url_host(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("sip:@;?=[]%.<>aA1 ")), max_size=40))
def test_uri_parser_raises_only_typed_errors(text: str) -> None:
    try:
        uri.parse_uri("sip:" + text)
    except E2MError:
        pass


def test_pathological_uris_take_linear_time() -> None:
    start = time.perf_counter()
    for text in ("sip:" + "%4" * 40000 + "@h", "sip:a@" + "a-" * 40000, "sip:a@h;" + "x=%" * 40000,
                 "sip:a@h?" + "%a" * 40000, "sip:" + "a." * 40000 + "!"):
        with pytest.raises(MalformedError):
            uri.parse_uri(text)
    assert time.perf_counter() - start < 2.0
