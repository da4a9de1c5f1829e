"""The spool's share per sender (review 32's open hole) on a real node and a real
PostgreSQL killed for the outage.

While the shared archive's database is away, a node keeps what it cannot store in its
spool, bounded by ``[archive] spool_max`` and ``spool_max_mb``.  Those bounds were for
the node as a whole, so one sender who filled them (a stranger's plaintext MESSAGEs to
one of our users, never challenged) had every later message of every user lost for the
rest of the outage.  Each sender now has a share of both bounds (``spool_share``
percent): the one group of senders the proxy did not authenticate shares one, and each
caller it did (digest, or a signature over a bound SIP context) has its own.
"""

from __future__ import annotations

import secrets
import time

import pytest

from e2m_lab.kamailio_harness import ProxyHandle
from e2m_lab.wire import transact
from e2m_plugins.sip import make_request
from tests.cluster.test_cluster_wire import Alice, _home, _spool, _stat, _stored, _wait_caught_up

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]

SPOOL_MAX = 50          # with the default share of 12 %: six messages a sender


def _strangers_message(proxy: ProxyHandle, n: int) -> int | None:
    """A stranger's plaintext MESSAGE to bob (a From of another domain: never
    challenged), each its own Call-ID; the answer's status."""
    request = make_request("MESSAGE", "sip:bob@example.com",
                           from_uri=f"sip:eve{n}@stranger.example.net",
                           to_uri="sip:bob@example.com",
                           call_id=f"junk-{n}-{secrets.token_hex(4)}@stranger.example.net",
                           body=b"junk %d" % n, content_type="text/plain")
    answer = transact(proxy.port, request, timeout=8)
    return answer.status if answer is not None else None


def _outage(proxy_factory, pki, own_postgres, strangers: int) -> tuple[ProxyHandle, list[bytes]]:
    """Database killed; ``strangers`` junk MESSAGEs, then three of alice's; database back
    and the spool replayed.  alice's texts."""
    proxy, _uas = _home(proxy_factory, own_postgres.url,
                        extra={"archive": {"spool_max": SPOOL_MAX}})
    alice = Alice(pki, proxy)
    own_postgres.kill()
    for n in range(strangers):
        assert _strangers_message(proxy, n) == 200      # forwarded all the same
    return proxy, alices_texts_then_catch_up(alice, proxy, own_postgres, secrets.token_hex(4))


def alices_texts_then_catch_up(alice: Alice, proxy: ProxyHandle, own_postgres,
                               tag: str) -> list[bytes]:
    """alice's three MESSAGEs (delivered) while the database is away, then the database
    back and the spool replayed; her texts."""
    texts = [f"t-{tag}-{n}".encode() for n in range(3)]
    assert [alice.message(text) for text in texts] == [200] * 3
    own_postgres.start()
    time.sleep(0.5)
    _wait_caught_up(proxy, timeout=30.0)
    return texts


@pytest.mark.slow
def test_a_strangers_flood_fills_only_the_unauthenticated_share(proxy_factory, pki,
                                                                  own_postgres):
    """Attacker: off-path sender.  Attack: while the database is away, plaintext MESSAGEs
    to bob, more than ``spool_max``.  Before: they took the whole spool and alice's three
    signed MESSAGEs were lost ("the spool is full").  Now: the strangers' group holds its
    share (6 of 50) and the rest of theirs is lost; alice's go in."""
    proxy, texts = _outage(proxy_factory, pki, own_postgres, strangers=SPOOL_MAX + 4)
    stored = _stored(proxy)
    lost = _stat(proxy, "e2m_archive_lost")
    print(f"\nalice's archived {sum(stored[t] for t in texts)} of {len(texts)}, lost {lost}")
    assert all(stored[text] == 1 for text in texts), "alice's messages were lost"
    assert lost == SPOOL_MAX + 4 - 6                       # all but the strangers' share
    assert "over its share of the spool" in proxy.log_since(0)
    junk = [row for row in proxy.archive_rows() if row.plaintext.startswith(b"junk ")]
    assert len(junk) == 6


def test_control_a_few_strangers_messages_are_spooled_like_anyone_elses(proxy_factory, pki,
                                                                         own_postgres):
    """Within the share nothing is lost: two strangers' messages and alice's three."""
    proxy, texts = _outage(proxy_factory, pki, own_postgres, strangers=2)
    stored = _stored(proxy)
    assert all(stored[text] == 1 for text in texts)
    assert _stat(proxy, "e2m_archive_lost") == 0
    assert _stat(proxy, "e2m_archive_spooled") == 5 and _spool(proxy).pending() == 0
