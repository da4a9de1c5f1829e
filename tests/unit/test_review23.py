"""Review 23, what held in the core (the holes it found are wire tests:
``tests/kamailio/test_review23_wire.py``, ``tests/cluster/test_review23_cluster.py``).

The memos of ``80c8f6c`` (``certpath.signing_key`` by (certificate, limits),
``certstore._check_usage`` by (certificate, use, limits)) and the budget scopes made
classes were attacked here: a key or usage remembered under one set of limits must not
answer for stricter ones, a certificate differing in one byte is another entry, nested
scopes share the outer budget without resetting it, and a budget never crosses into
another thread (the phone's pjsua threads).  All pass on ``80c8f6c``.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from e2m_plugins import certpath, certstore
from e2m_plugins.cms.budget import _CURRENT, budget_scope, message_budget, spend
from e2m_plugins.cms.limits import DEFAULT_LIMITS
from e2m_plugins.errors import CertificateRejectedError, E2MError, LimitExceededError
from tests.unit.test_verify_memo import _cert, _with_other_signature, pki  # noqa: F401


def _rsa_user(root_key, bits: int = 2048):
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _cert("alice", key.public_key(), "Memo Root", root_key, ca=False)


def test_control_a_remembered_signing_key_does_not_answer_for_stricter_limits(pki) -> None:  # noqa: F811
    _, root_key, _, _ = pki
    cert = _rsa_user(root_key)
    certpath.signing_key(cert)                                    # remembered (defaults)
    assert (cert, DEFAULT_LIMITS) in certpath._SIGNING_KEYS
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
    assert twin != leaf and hash(twin) != hash(leaf)
    certpath.signing_key(leaf)
    assert (twin, DEFAULT_LIMITS) not in certpath._SIGNING_KEYS


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
