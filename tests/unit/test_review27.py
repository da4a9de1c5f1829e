"""Review 27: which digest challenges are answered (the core's ``challenge_realm`` and
the phone's ``keep_answerable``), in memory.  The wire tests are
``tests/pjsua/test_review27_phone.py`` and ``tests/kamailio/test_review27_wire.py``."""

from __future__ import annotations

import pytest

from e2m_plugins.challenge import challenge_realm, names_realm
from e2m_plugins.sip import make_request, make_response
from pjsua_hooks.challenges import keep_answerable


@pytest.mark.parametrize("value,realm", [
    ('Digest realm="example.com", nonce="n"', "example.com"),
    ('digest  nonce="n", REALM="Example.COM"', "Example.COM"),
    ('Digest realm=example.com,nonce="n"', "example.com"),
    ('Digest realm="exam\\ple.com", nonce="n"', "example.com"),
    ('Digest realm="a, realm=b", nonce="n"', "a, realm=b"),
    ('Digest realm="x", realm="example.com"', None),           # two: unclear
    ('Digest nonce="n"', None),
    ('Basic realm="example.com"', None),
    ('Digest opaque="realm=example.com", nonce="n"', None),       # inside another value
])
def test_challenge_realm(value, realm):
    assert challenge_realm(value) == realm


def test_names_realm_counts_an_unreadable_realm_as_ours():
    assert names_realm('Digest realm="EXAMPLE.com"', "example.com")
    assert names_realm('Digest nonce="n"', "example.com")
    assert not names_realm('Digest realm="example.net"', "example.com")


def _answer(method: str, status: int, *headers: tuple[str, str]):
    request = make_request(method, "sip:bob@example.com", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", call_id="c27@x", from_tag="a")
    answer = make_response(request, status, "Challenge")
    for name, value in headers:
        answer = answer.add(name, value)
    return answer


HOME = 'Digest realm="example.com", nonce="n"'
AWAY = 'Digest realm="bob.example.net", nonce="n"'


@pytest.mark.parametrize("method,status,header,value,kept", [
    ("MESSAGE", 407, "Proxy-Authenticate", HOME, True),       # the home proxy's
    ("REGISTER", 401, "WWW-Authenticate", HOME, True),        # the home registrar's
    ("MESSAGE", 407, "Proxy-Authenticate", AWAY, False),
    ("REGISTER", 401, "WWW-Authenticate", AWAY, False),
    ("MESSAGE", 401, "WWW-Authenticate", HOME, False),        # a callee's 401
    ("INVITE", 401, "WWW-Authenticate", HOME, False),
    ("MESSAGE", 407, "WWW-Authenticate", HOME, False),        # the other header
    ("REGISTER", 401, "Proxy-Authenticate", HOME, False),
    ("MESSAGE", 407, "Proxy-Authenticate", 'Digest nonce="n"', False),
])
def test_keep_answerable(method, status, header, value, kept):
    answer = _answer(method, status, (header, value))
    out, refused = keep_answerable(answer, "example.com")
    assert (out is answer) == kept and bool(refused) != kept
    if not kept:
        assert not out.get(header) and refused[0].status == status
        assert "nonce" not in repr(refused)


def test_keep_answerable_keeps_ours_and_takes_out_a_second_one():
    answer = _answer("MESSAGE", 407, ("Proxy-Authenticate", AWAY), ("Proxy-Authenticate", HOME))
    out, refused = keep_answerable(answer, "example.com")
    assert out.get_all("Proxy-Authenticate") == [HOME]
    assert [r.realm for r in refused] == ["bob.example.net"]


def test_other_statuses_are_left_alone():
    answer = _answer("MESSAGE", 403, ("Proxy-Authenticate", AWAY))
    assert keep_answerable(answer, "example.com") == (answer, [])


@pytest.mark.parametrize("value", [
    'Digest opaque="x, realm=example.com", nonce="n"',           # inside a quoted value
    'Digest realm="example.com',                                 # unterminated
    'Digest realm="bob.example.net", opaque="q", realm=example.com',
])
def test_challenge_realm_reads_quotes_as_a_client_does(value):
    assert challenge_realm(value) is None
