"""Every hostile shape of the cost benchmark gets a defined answer, in ``make test``.

``bench/test_hostile_cost.py`` times these shapes (``e2m_lab/costly.py``); here each
one-datagram shape runs once through the proxy and bob and must be refused with a
typed error from the error table, never an untyped exception or a forward.  The work
each may cost is bounded by counts (tests/unit/test_signed.py, test_headers.py); the
time is the benchmark's to report.
"""

from __future__ import annotations

import pytest

from e2m_lab import costly
from e2m_lab.flows import TRUSTED, proxy_engine, ua_engine
from e2m_plugins import sip
from e2m_plugins.errors import E2MError
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.testpki import init_test_pki

_PKI = init_test_pki(None, users=("alice", "bob", "carol"), proxy_hosts=(TRUSTED,))
_SHAPES = costly.build(_PKI, transports=["udp"])


@pytest.mark.parametrize("shape", _SHAPES, ids=[f"{s.name}/{s.transport}" for s in _SHAPES])
def test_a_hostile_shape_gets_a_typed_refusal(shape):
    proxy = proxy_engine(_PKI, TRUSTED, view=("MESSAGE:*",))
    verdict = proxy.inspect(sip.parse(shape.raw))
    assert verdict.action == "reply", f"{shape.name}: forwarded"
    assert verdict.error not in (None, "InternalError") and 400 <= (verdict.code or 0) <= 699
    bob = ua_engine(_PKI, "bob")
    with pytest.raises(E2MError) as refused:
        bob.open(sip.parse(shape.raw))
    assert answer_for(refused.value, "ua") is not None
