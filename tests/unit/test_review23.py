"""Review 23, what held in the core (the holes it found are wire tests:
``tests/kamailio/test_review23_wire.py``, ``tests/cluster/test_review23_cluster.py``).

The memos of ``80c8f6c`` (``certpath.signing_key`` by (certificate, limits),
``certstore._check_usage`` by (certificate, use, limits)) and the budget scopes made
classes were attacked here: a key or usage remembered under one set of limits must not
answer for stricter ones, a certificate differing in one byte is another entry, nested
scopes share the outer budget without resetting it, and a budget never crosses into
another thread (the phone's pjsua threads).  All pass on ``80c8f6c``.  The last tests
are the core's side of the wire test's fix: a Call-ID or tag that is not visible ASCII is
``MalformedError``.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from e2m_plugins import certpath, certstore
from e2m_plugins.cms.budget import _CURRENT, budget_scope, message_budget, spend
from e2m_plugins.cms.limits import DEFAULT_LIMITS
from e2m_plugins.certfiles import certificate_key
from e2m_plugins.errors import CertificateRejectedError, E2MError, LimitExceededError
from tests.unit.test_verify_memo import _cert, _with_other_signature, pki  # noqa: F401


def _rsa_user(root_key, bits: int = 2048):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _cert("alice", key.public_key(), "Memo Root", root_key, ca=False)


def test_control_a_remembered_signing_key_does_not_answer_for_stricter_limits(pki) -> None:  # noqa: F811
    _, root_key, _, _ = pki
    cert = _rsa_user(root_key)
    certpath.signing_key(cert)                                    # remembered (defaults)
    assert (certificate_key(cert), DEFAULT_LIMITS) in certpath._SIGNING_KEYS
    with pytest.raises(E2MError):
        certpath.signing_key(cert, replace(DEFAULT_LIMITS, min_rsa_bits=3072))
    with pytest.raises(LimitExceededError):
        certpath.signing_key(cert, replace(DEFAULT_LIMITS, max_certificate_bytes=64))
    # equal limits built anew are the same entry (a dataclass compares by value)
    assert certpath.signing_key(cert, replace(DEFAULT_LIMITS)) is certpath.signing_key(cert)


def test_control_a_remembered_usage_does_not_answer_for_stricter_limits(pki) -> None:  # noqa: F811
    _, root_key, _, _ = pki
    cert = _rsa_user(root_key)
    certstore._check_usage(cert, "alice", False, None)
    with pytest.raises(CertificateRejectedError):
        certstore._check_usage(cert, "alice", False, replace(DEFAULT_LIMITS, min_rsa_bits=3072))
    with pytest.raises(CertificateRejectedError):
        certstore._check_usage(cert, "alice", True, replace(DEFAULT_LIMITS, min_rsa_bits=3072))


def test_control_a_one_byte_twin_is_another_memo_entry(pki) -> None:  # noqa: F811
    _, _, leaf, _ = pki
    twin = _with_other_signature(leaf)
    assert twin != leaf and certificate_key(twin) != certificate_key(leaf)
    certpath.signing_key(leaf)
    assert (certificate_key(twin), DEFAULT_LIMITS) not in certpath._SIGNING_KEYS
    assert (certificate_key(leaf), DEFAULT_LIMITS) in certpath._SIGNING_KEYS


def test_control_nested_scopes_share_and_keep_the_outer_budget() -> None:
    with message_budget(3) as outer:
        spend("a")
        with budget_scope(32) as inner:
            assert inner is outer
            spend("b")
        with budget_scope(32):                 # a second nested scope resets nothing
            spend("c")
            with pytest.raises(LimitExceededError):
                spend("d")
        assert _CURRENT.get() is outer and outer.spent == 3
    assert _CURRENT.get() is None


def test_control_a_budget_does_not_cross_threads() -> None:
    seen = []
    with message_budget(1):
        spend("here")
        thread = threading.Thread(target=lambda: seen.append(_CURRENT.get()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_control_an_inner_message_budget_restores_the_outer_one() -> None:
    with message_budget(5) as outer:
        with message_budget(1) as inner:
            assert inner is not outer
        assert _CURRENT.get() is outer
    assert _CURRENT.get() is None


# -- ids the proxy's host cannot name (the core's side of the wire test's fix) ---------

def _raw(call_id: bytes, to_tag: bytes) -> bytes:
    return (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-r23\r\n"
            b"From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>;tag=" + to_tag
            + b"\r\nCall-ID: " + call_id + b"\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("tag", [b"b\xe9x", "b\u00e9x".encode(), b"b\x7fx"])
def test_a_tag_that_is_not_visible_ascii_is_malformed(tag: bytes) -> None:
    """Octets that are not UTF-8, UTF-8 beyond ASCII, a control: none is in any tag's
    grammar, and the first makes Kamailio's ``$tt`` unreadable from Python (on
    ``80c8f6c`` the first two were read as tags)."""
    from e2m_plugins.errors import MalformedError
    from e2m_plugins.sip import parse
    with pytest.raises(MalformedError):      # a control is refused by the parse itself
        _ = parse(_raw(b"r23@example.com", tag)).to_tag
    assert parse(_raw(b"r23@example.com", b"b-1.x~'`")).to_tag == "b-1.x~'`"


@pytest.mark.parametrize("call_id", [b"r23\xe9@example.com", b"r23 @example.com"])
def test_a_call_id_that_is_not_visible_ascii_is_malformed(call_id: bytes) -> None:
    from e2m_plugins.errors import MalformedError
    from e2m_plugins.sip import parse
    with pytest.raises(MalformedError, match="Call-ID"):
        _ = parse(_raw(call_id, b"b1")).call_id
    assert parse(_raw(b"a-b.c!%*_+`'~()<>:\\\"/[]?{}@h", b"b1")).call_id.startswith("a-b")
