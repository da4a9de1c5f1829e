"""The late 2xx's BYE answering a digest challenge (review 129 HB1, stop 44), without
pjsip: ``LateAnswers.retry_bye`` and ``digest_authorization`` in
``pjsua_hooks.late_2xx``.  A home with ``[auth]`` answers the phone's BYE 407; the
phone sends it again once with the account's credentials (RFC 3261 22.2: CSeq + 1, a
new branch), a second time only for ``stale=true``, and never for a challenge that
is not the home realm's 407.  The wire test: ``tests/e2e/test_late_2xx_phone_wire.py``
``[digest]``; the real phone with a forged challenge:
``tests/pjsua/test_review129_late_2xx_phone.py``.
"""

from __future__ import annotations

import hashlib

import pytest

from e2m_lab.flows import answer, invite, three_phones
from e2m_lab.kamailio_harness import digest_credentials, parse_challenge
from e2m_plugins import sip
from e2m_plugins.challenge import digest_params
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.challenge import digest_authorization
from pjsua_hooks.late_2xx import MAX_AUTH_TRIES, LateAnswers

VIA = "127.0.0.1:5099"
REALM = "example.com"
PASSWORD = "secret-of-alice"


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"),
                         key_type="ec")


class Creds:
    """The phone's credentials callable, counting how often the password was read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> tuple[str, str, str]:
        self.reads += 1
        return ("alice", PASSWORD, REALM)


def _challenge(bye: sip.SipMessage, value: str, status: int = 407) -> sip.SipMessage:
    header = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    return make_response(bye, status, "Auth").add(header, value)


def _home(nonce: str = "n1", **extra: str) -> str:
    params = "".join(f", {k}={v}" for k, v in extra.items())
    return f'Digest realm="{REALM}", nonce="{nonce}", qop="auth"{params}'


def _sent(world, call_id: str):
    """A late 2xx answered: (table, the entry, the BYE sent)."""
    alice, bob, _ = three_phones(world)
    sent = alice.protect(invite(world, call_id=call_id)).message
    got = bob.open(sent).message
    alice.open(make_response(got, 486, "Busy").replace("To", f"{got.get('To')};tag=f1"))
    late = bob.protect(answer(got, to_tag="f2").add("Record-Route",
                                                    "<sip:home.example.com;lr>")).message
    table = LateAnswers()
    out = table.answer(late, late.serialize(), got.from_tag, VIA)
    bye = sip.parse(out[1].data)
    return table, bye


def _answered(table: LateAnswers, bye: sip.SipMessage, value: str, status: int = 407):
    response = _challenge(bye, value, status)
    entry = table.bye_answered(response)
    assert entry is not None
    return entry, response


def _verify(bye: sip.SipMessage, challenge: str) -> None:
    """The BYE's Proxy-Authorization is what a stock UA (the lab's) computes."""
    (value,) = bye.get_all("Proxy-Authorization")
    params = digest_params(value)
    assert params is not None
    expected = digest_credentials(parse_challenge(challenge), "BYE", bye.request_uri or "",
                                  "alice", PASSWORD, cnonce=params["cnonce"])
    assert digest_params(expected)["response"] == params["response"]      # type: ignore
    assert params["uri"] == bye.request_uri and params["realm"] == REALM
    assert params["username"] == "alice" and params["nc"] == "00000001"


# -- the digest itself ---------------------------------------------------------------

@pytest.mark.parametrize("algorithm, expected", [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")])
def test_the_digest_matches_rfc_7616_3_9_1(algorithm, expected):
    challenge = {"realm": "http-auth@example.org", "qop": "auth, auth-int",
                 "algorithm": algorithm,
                 "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
                 "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"}
    value = digest_authorization(challenge, ("Mufasa", "Circle of Life", "x"), "GET",
                                 "/dir/index.html",
                                 cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
    params = digest_params(value)
    assert params is not None and params["response"] == expected
    assert params["qop"] == "auth" and params["opaque"] == challenge["opaque"]
    assert params["algorithm"] == algorithm


def test_without_qop_the_rfc_2069_form():
    challenge = {"realm": REALM, "nonce": "abc"}
    value = digest_authorization(challenge, ("alice", PASSWORD, REALM), "BYE", "sip:b@h")
    params = digest_params(value)
    assert params is not None and "qop" not in params and "cnonce" not in params
    md5 = lambda t: hashlib.md5(t.encode()).hexdigest()     # noqa: E731
    assert params["response"] == md5(f"{md5(f'alice:{REALM}:{PASSWORD}')}:abc:"
                                     f"{md5('BYE:sip:b@h')}")
    assert PASSWORD not in value and md5(f"alice:{REALM}:{PASSWORD}") not in value


# -- the retry -------------------------------------------------------------------------

def test_the_homes_407_gets_the_bye_once_more_with_credentials(world):
    table, bye = _sent(world, "auth-a@x")
    entry, response = _answered(table, bye, _home())
    creds = Creds()
    out, why = table.retry_bye(entry, response, REALM, creds)
    assert out is not None and out.stateful and out.method == "BYE", why
    retry = sip.parse(out.data)
    # RFC 3261 22.2: the same request, CSeq + 1, a new branch, with credentials
    assert retry.cseq == (bye.cseq[0] + 1, "BYE")
    assert retry.via_branch() != bye.via_branch()
    assert retry.via_branch().startswith("z9hG4bK")
    for name in ("From", "To", "Call-ID", "Route", "Max-Forwards"):
        assert retry.get_all(name) == bye.get_all(name), name
    assert retry.request_uri == bye.request_uri and not retry.has("Content-Length")
    _verify(retry, _home())
    assert creds.reads == 1 and table.counts["bye_auth_retries"] == 1
    # its 200 is told as the BYE's final answer (the entry follows the new branch)
    assert table.bye_answered(make_response(retry, 200, "OK")) is entry
    assert table.bye_answered(make_response(bye, 200, "OK")) is None


def test_a_second_407_gets_no_further_retry(world):
    table, bye = _sent(world, "auth-b@x")
    entry, response = _answered(table, bye, _home("n1"))
    out, _ = table.retry_bye(entry, response, REALM, Creds())
    assert out is not None
    retry = sip.parse(out.data)
    creds = Creds()
    # refused with a fresh nonce but no stale=true: the password is wrong (or a forger
    # wants more digests): nothing more is sent, and the password is not even read
    entry, response = _answered(table, retry, _home("n2"))
    out, why = table.retry_bye(entry, response, REALM, creds)
    assert out is None and "stale" in why and creds.reads == 0
    assert table.counts["bye_auth_retries"] == 1


def test_stale_true_may_retry_once_more_and_no_more(world):
    table, bye = _sent(world, "auth-c@x")
    sent = [bye]
    for n in range(MAX_AUTH_TRIES + 2):
        entry, response = _answered(table, sent[-1], _home(f"n{n}", stale="true"))
        out, _ = table.retry_bye(entry, response, REALM, Creds())
        if out is None:
            break
        sent.append(sip.parse(out.data))
    assert len(sent) == 1 + MAX_AUTH_TRIES == 3
    assert [m.cseq[0] for m in sent] == [bye.cseq[0], bye.cseq[0] + 1, bye.cseq[0] + 2]
    _verify(sent[-1], _home("n1", stale="true"))


@pytest.mark.parametrize("value, status", [
    ('Digest realm="evil.example", nonce="n", qop="auth"', 407),      # another realm
    (_home(), 401),                                                    # the callee's 401
    ('Basic realm="example.com"', 407),
    (f'Digest realm="{REALM}", nonce="n", algorithm=MD5-sess, qop="auth"', 407),
    (f'Digest realm="{REALM}", nonce="n", qop="auth-int"', 407),
    (f'Digest realm="{REALM}", qop="auth"', 407),                      # no nonce
    (f'Digest realm="{REALM}", realm="evil.example", nonce="n"', 407),   # two realms
    (f'Digest realm="{REALM}", nonce="{"x" * 600}"', 407),
])
def test_a_challenge_not_the_homes_gets_no_credentials(world, value, status):
    table, bye = _sent(world, f"auth-d-{status}-{len(value)}@x")
    entry, response = _answered(table, bye, value, status)
    creds = Creds()
    out, why = table.retry_bye(entry, response, REALM, creds)
    assert out is None and why, why
    assert creds.reads == 0            # the password is not even read
    assert table.counts["bye_challenges_refused"] == 1


def test_the_home_realms_challenge_among_others_is_the_one_answered(world):
    table, bye = _sent(world, "auth-e@x")
    response = make_response(bye, 407, "Auth") \
        .add("Proxy-Authenticate", 'Digest realm="evil.example", nonce="e", qop="auth"') \
        .add("Proxy-Authenticate", _home("h"))
    entry = table.bye_answered(response)
    assert entry is not None
    out, _ = table.retry_bye(entry, response, REALM, Creds())
    assert out is not None
    retry = sip.parse(out.data)
    (value,) = retry.get_all("Proxy-Authorization")
    assert digest_params(value)["realm"] == REALM and "evil" not in value  # type: ignore


def test_no_retry_without_credentials_or_for_another_answer(world):
    table, bye = _sent(world, "auth-f@x")
    entry, response = _answered(table, bye, _home())
    assert table.retry_bye(entry, response, None, Creds())[0] is None
    # the password could not be read any more
    assert table.retry_bye(entry, response, REALM, lambda: None)[0] is None
    # not the answer bye_answered gave the entry
    other = make_response(bye, 407, "Auth").add("Proxy-Authenticate", _home())
    entry.bye_status = 200
    assert table.retry_bye(entry, other, REALM, Creds())[0] is None


def test_an_entry_gone_gets_no_retry(world):
    table, bye = _sent(world, "auth-g@x")
    entry, response = _answered(table, bye, _home())
    table._entries.clear()
    out, why = table.retry_bye(entry, response, REALM, Creds())
    assert out is None and "no longer" in why
