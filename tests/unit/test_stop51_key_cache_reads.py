"""Issue 17 (stop 51): the proxy reads a kept key once per kekri answer.

The live profile of the rate benchmark's kekri dialog (``bench/profile_proxy.py``)
showed each answer looking its kept key up twice: once while the envelope was opened,
and again to ask whose key it was (``_signers_key_opened``).  That answer decides only
whether a message with no signed context claims its fork slot across the cluster (a
signed one's claim is shared anyway), so it is asked only then, and then from a second
read (the record may have changed since the reading: reviews 196, 198).  In Kamailio
each read is an htable round trip and an unsealing.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, kekri_answer
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _counting(engine):
    """Every ``get`` the engine makes of its key cache: (scope's tag count, count)."""
    reads: list[tuple[int, bool]] = []
    real = engine.cache.get

    def get(scope, reference, *, count=True):
        reads.append((len(scope.tags), count))
        return real(scope, reference, count=count)

    engine.cache.get = get
    return reads


def test_a_kekri_answer_reads_its_kept_key_once_and_counts_one_use(world):
    trusted, reply = kekri_answer(world, SDP_VIEW)
    reads = _counting(trusted)
    verdict = trusted.inspect(reply)
    assert [s.plaintext for s in verdict.seen] == [SDP_ANSWER]
    # the confirmed dialog's scope (nothing there yet), then the early one, where the
    # INVITE's key waits: one look each, then the one counted use
    assert reads == [(2, False), (1, False), (1, True)]
