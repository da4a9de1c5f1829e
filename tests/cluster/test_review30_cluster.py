"""A thirtieth attacker's review (December 2026) of 4518507: the shared archive
(PostgreSQL behind each node's spool, ``kamailio_app/archive*.py``) on a real Kamailio
node and a real PostgreSQL.

The hole: the archive's ``bodies`` and ``media`` tables index ``call_id`` with a plain
B-tree (``bodies_call_id``, ``media_call_id``, ``archive_schema._V1_SQLITE``).  A B-tree
entry of PostgreSQL holds at most 2704 bytes, so a row whose Call-ID is longer than
that (and does not compress: random letters) is refused with ``ProgramLimitExceeded``
("index row size 3016 exceeds btree version 4 maximum 2704 for index
bodies_call_id").  That is an ``OperationalError``, which ``PostgresArchive._failure``
reads as "the database is away" (``ArchiveUnavailable``), not as rows refused for good
(only ``DataError`` and ``IntegrityError`` are).  SIP puts no bound on a Call-ID; the
core's parser takes header lines up to 8 KiB, the signed SIP context 1024 bytes of
Call-ID, and a *plaintext* body (which the proxy views and archives like any other)
needs no context at all: an off-path stranger's MESSAGE to one of our users (never
challenged) with a 3000-byte Call-ID is enough.  Then:

- ``fail_request_on_error = false`` (the default): the stranger's message is forwarded and
  its rows go to the node's spool "until the database is back".  The database is up and
  will refuse it for ever: the replay (oldest first) stops at it every second, and since
  "while the spool holds messages, new ones join it", every later message of every
  user on that node goes to the spool behind it, never reaching the shared archive;
  past ``spool_max`` (10,000) or ``spool_max_mb`` they are lost outright.  One datagram
  turns the node's archive off until an operator edits the spool by hand.
- ``fail_request_on_error = true``: the stranger's request gets 500, and the worker that
  saw the "outage" rests for ``retry_after`` (1 s), answering every other user's request
  ``500 Archive Unavailable`` meanwhile.  One such request per worker per second keeps
  the strict archive refusing everyone.

A fix: read ``ProgramLimitExceeded`` (SQLSTATE class 54) as rows refused for good (and
never block the replay on one message); index a digest of the Call-ID (or
``USING hash``) instead of the Call-ID itself; and bound the Call-ID the proxy takes
(the signed context already stops at 1024 bytes).

``test_control_*`` are the same flows with a stranger's Call-ID of ordinary length: they
pass.

Both holes failed on ``4518507`` (strict xfails).  Fixed: the core reads no Call-ID or
tag over 1024 octets (``sip.MAX_ID_OCTETS``, what a signed context can bind), so the
stranger's request is answered 400 and never reaches the archive; and a row the
database refuses for one of its limits (SQLSTATE class 54) is lost and said so, not
taken for an outage (``archive_pg``; ``tests/unit/test_review30.py``).
"""

from __future__ import annotations

import random
import secrets
import string
import time

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, RawUas
from e2m_lab.wire import transact
from e2m_plugins.sip import make_request
from tests.cluster.test_cluster_wire import Alice, _home, _spool, _stat, _stored

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]


def _long_call_id(seed: int, length: int = 3000) -> str:
    """Visible ASCII that does not compress (PostgreSQL compresses long index entries
    first; a run of one letter would fit)."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits)
                   for _ in range(length)) + "@stranger.example.net"


def _strangers_message(proxy: ProxyHandle, call_id: str) -> int | None:
    """A plaintext MESSAGE from a stranger (a From of another domain: never challenged)
    to bob, with ``call_id``; the answer's status."""
    request = make_request("MESSAGE", "sip:bob@example.com",
                           from_uri="sip:eve@stranger.example.net",
                           to_uri="sip:bob@example.com", call_id=call_id,
                           body=b"hello from a stranger", content_type="text/plain")
    answer = transact(proxy.port, request, timeout=8)
    return answer.status if answer is not None else None


def _spool_then_alice(proxy_factory, pki, pg_url: str, strangers_call_id: str,
                      strangers_answer: int = 200) -> tuple[ProxyHandle, RawUas, list[bytes]]:
    proxy, uas = _home(proxy_factory, pg_url, extra={"archive": {"spool_max": 3}})
    assert _strangers_message(proxy, strangers_call_id) == strangers_answer
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    texts = [f"t-{tag}-{n}".encode() for n in range(4)]
    for text in texts:
        assert alice.message(text) == 200
    # the replay runs every second: up to 4 s for alice's four in the archive and the
    # spool empty (nothing left to replay, so nothing more can be written); the tests
    # assert on what is there then, as after a fixed 4 s
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and not (
            set(texts) <= set(_stored(proxy)) and _spool(proxy).pending() == 0):
        time.sleep(0.2)
    return proxy, uas, texts


def test_hole_a_strangers_long_call_id_stops_the_nodes_archive(proxy_factory, pki, pg_url):
    """Attacker: off-path sender (no account).  Attack: one plaintext MESSAGE to bob whose
    Call-ID is 3000 random letters.  Effect: PostgreSQL refuses its row (B-tree entry
    over 2704 bytes), the archive takes that for an outage and spools it; the replay
    stops at it for ever and every later message on the node joins the spool behind
    it: alice's four MESSAGEs (200, delivered) never reach the shared archive, and past
    ``spool_max`` (3 here, 10,000 by default) they are lost.  Fix: see the module."""
    proxy, uas, texts = _spool_then_alice(proxy_factory, pki, pg_url, _long_call_id(30),
                                          strangers_answer=400)
    stored = _stored(proxy)
    print(f"\nspool holds {_spool(proxy).pending()}, lost {_stat(proxy, 'e2m_archive_lost')}, "
          f"archived {sorted(stored)} of {len(texts)}")
    assert set(texts) <= set(stored), "alice's messages are not in the shared archive"
    assert _stat(proxy, "e2m_archive_lost") == 0
    assert _spool(proxy).pending() == 0
    assert not any("stranger" in (m.get("From") or "") for m in uas.received)   # refused


def test_control_a_strangers_ordinary_call_id_leaves_the_archive_alone(proxy_factory, pki,
                                                                       pg_url):
    """The same flow with a 200-byte Call-ID: every message archived, the spool empty."""
    proxy, uas, texts = _spool_then_alice(proxy_factory, pki, pg_url,
                                          _long_call_id(30, length=200))
    stored = _stored(proxy)
    assert set(texts) <= set(stored) and max(stored.values()) == 1
    assert _spool(proxy).pending() == 0 and _stat(proxy, "e2m_archive_lost") == 0
    assert _stat(proxy, "e2m_archive_spooled") == 0


def _strict_rounds(proxy_factory, pki, pg_url: str, length: int) -> list[int | None]:
    """Strict archiving; five rounds of: the stranger's MESSAGEs (one per worker and one
    more, each its own Call-ID of ``length``), then one of alice's.  alice's answers."""
    proxy, uas = _home(proxy_factory, pg_url, fail_request_on_error=True)
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    answers = []
    for n in range(5):
        for k in range(3):
            _strangers_message(proxy, _long_call_id(100 * n + k, length=length))
        answers.append(alice.message(f"t-{tag}-{n}".encode()))
    return answers


def test_hole_a_strangers_long_call_ids_make_the_strict_archive_refuse_alice(
        proxy_factory, pki, pg_url):
    """Attacker: off-path sender.  Attack: ``[archive] fail_request_on_error = true``;
    plaintext MESSAGEs to bob with 3000-byte Call-IDs, a few per second (one per worker
    is enough).  Effect: each one's write fails as "database away", so its worker
    answers every request for the next second ``500 Archive Unavailable`` without
    trying: alice's MESSAGEs, sent right after, are refused (the database is up all
    along).  Fix: see the module (a refusal of the rows themselves must not rest the
    worker)."""
    answers = _strict_rounds(proxy_factory, pki, pg_url, 3000)
    print(f"\nalice's answers: {answers}")
    assert answers == [200] * 5


def test_control_strangers_ordinary_call_ids_leave_the_strict_archive_alone(
        proxy_factory, pki, pg_url):
    assert _strict_rounds(proxy_factory, pki, pg_url, 200) == [200] * 5
