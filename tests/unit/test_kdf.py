"""Our X9.63 and HKDF match cryptography's own KDFs for every scheme and size."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from e2m_plugins.cms import kdf


@pytest.mark.parametrize("scheme", list(kdf.SCHEMES_BY_NAME.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("length", [16, 24, 32, 48, 80])
def test_derive_kek_matches_reference(scheme, length):
    secret, info = os.urandom(32), os.urandom(23)
    if scheme.kind == "x963":
        expected = X963KDF(scheme.hash(), length, info).derive(secret)
    else:
        expected = HKDF(scheme.hash(), length, None, info).derive(secret)
    assert kdf.derive_kek(scheme, secret, info, length) == expected


def test_shared_info_cache_does_not_mix_ukm():
    wrap = bytes.fromhex("300b0609608648016503040105")
    plain = kdf.shared_info(wrap, None, 16)
    assert kdf.shared_info(wrap, None, 16) == plain
    assert kdf.shared_info(wrap, b"ukm", 16) != plain
    assert kdf.shared_info(wrap, None, 32) != plain
