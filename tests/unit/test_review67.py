"""The core half of review 67's third hole (``tests/kamailio/test_review67_wire.py``): a
hop spends alice's digest credentials, made for a request to bob, on a request to a
target of its own.  ``challenge.credentials_fit_request``: every credentials header of
our realm must name the Request-URI as its digest ``uri`` (RFC 7616 §3.4.6), whichever
of them the proxy's digest check read (review 28's decoy)."""

from __future__ import annotations

import pytest

from e2m_plugins.challenge import credentials_fit_request

BOB = "sip:bob@example.com"
CAROL = "sip:carol@example.com"


def _creds(uri: str, realm: str = "example.com", user: str = "alice") -> str:
    return (f'Digest username="{user}", realm="{realm}", nonce="n1", uri="{uri}", '
            f'response="0123456789abcdef0123456789abcdef", qop=auth, nc=00000001, '
            f'cnonce="c1"')


@pytest.mark.parametrize("values,request_uri,fits", [
    ([_creds(BOB)], BOB, True),
    ([_creds(BOB)], CAROL, False),                               # the hop's new target
    ([_creds(BOB, realm="EXAMPLE.com")], CAROL, False),           # realm in another case
    ([_creds(CAROL, realm="elsewhere.example"), _creds(BOB)], CAROL, False),  # decoy realm
    ([_creds(CAROL), _creds(BOB)], CAROL, False),                 # a decoy of ours first
    ([_creds(BOB, realm="elsewhere.example")], BOB, False),       # none of our realm
    (['Digest username="alice", realm="example.com", nonce="n1"'], BOB, False),  # no uri
    ([_creds(BOB) + f', uri="{BOB}"'], BOB, False),               # two uris: unclear
    (["Basic YWxpY2U6c2VjcmV0"], BOB, False),
])
def test_credentials_must_name_the_request_uri(values, request_uri, fits):
    assert credentials_fit_request(values, "example.com", request_uri) is fits


def test_a_uri_naming_the_proxy_itself_fits_only_a_request_to_the_proxy():
    """SIPp writes the proxy's own address as the digest ``uri`` (no user) unless given
    ``-auth_uri``: such credentials name no target, so they fit a request to the proxy
    itself (a REGISTER) and no other (review 68: a hop spent them on its own target);
    a uri naming another user's target does not fit either."""
    ours = {"sip:127.0.0.1:5070", "sip:example.com"}
    names_us = ours.__contains__
    assert credentials_fit_request([_creds("sip:127.0.0.1:5070")], "example.com",
                                   "sip:example.com", names_us)
    assert not credentials_fit_request([_creds("sip:127.0.0.1:5070")], "example.com", BOB, names_us)
    assert not credentials_fit_request([_creds(BOB)], "example.com", CAROL, names_us)
