"""Review 110 (attacker's review of e180fd3): the shared PostgreSQL restarted under
a running node or cluster (real Kamailio, real PostgreSQL, the core's UA engines).

A routine restart of the database (``pg_ctl restart``, a minor upgrade, a failover, an
operator's ``pg_terminate_backend``) ends every session the server holds.  Each
Kamailio worker keeps its psycopg session for good (``ProcessConnection``) and finds it
dead only on its next use, which fails (``AdminShutdown: terminating connection due to
administrator command``).  Both users of that session take that one failure, with the
database up and answering, for an outage.

Hole K1 (honest break; nobody attacks, every user pays) -- the archive.
  Set-up: the home proxy on a shared PostgreSQL (``_home`` of
  ``test_cluster_wire.py``), one worker; alice's signed, encrypted MESSAGE 200 and
  archived (the worker holds a session).  The database is restarted (fast shutdown,
  started again, ``SELECT 1`` answers) before anything else is sent.
  Messages: two more honest MESSAGEs of alice's.
  Effect: with ``[archive] fail_request_on_error = true`` both are answered 500
  (``e2m_archive_failed`` 2): the first because the dead session failed, the second
  because the worker then rests ``retry_after`` (1 s) without asking.  With
  ``spool_max = 0`` both are relayed and neither is archived (stored 1 of 3,
  ``e2m_archive_lost`` 2): plaintext the operator runs the proxy to archive is gone
  although the database was never away when it arrived.  A node with several workers
  pays once per worker that held a session.  (With a spool nothing is lost: the two
  are spooled and replayed, control below.)  The same script on ``PostgresArchive``
  alone: first write after a restart ``ArchiveUnavailable``, the next ones fine; same
  after ``pg_terminate_backend`` of the e2m-proxy sessions.
  Code at fault: ``kamailio_app/pgconn.py:180`` (``ProcessConnection.get`` hands back a
  session whose server side is gone: ``closed`` is only set by the client),
  ``kamailio_app/archive_pg.py:63`` (``_failure``: any OperationalError is
  ``ArchiveUnavailable``) and ``kamailio_app/archive_spool.py:249-258`` (``record``: the
  failure starts the rest and, strict or spool-less, refuses or loses the message).
  Fix: when a statement fails on a session that was reused (not just made) with a
  connection-level error (AdminShutdown, "server closed the connection", a broken
  socket) and nothing of the transaction can have been committed, drop it and try
  once on a fresh connection (bounded by the same connect timeout) before calling the
  database away; or check a reused session cheaply (psycopg ``pgconn.status``/a
  ``SELECT 1`` after idle) before use.
  Tests: ``test_hole_a_strict_node_refuses_honest_requests_after_the_database_restarted``,
  ``test_hole_a_node_without_spool_loses_messages_after_the_database_restarted``.

Hole K2 (untrusted hop; the window comes with every restart) -- the replay claims.
  Set-up: the two-node cluster (``start_cluster``) on one PostgreSQL, bob registered;
  six calls of alice's whose signed INVITE is sent to A and B at the same moment
  (review 37's ``copies_to_both``): none reaches bob twice and no claim is skipped
  (every worker that took one now holds a session).  The database is restarted and
  answers.
  Messages: six more such calls, each INVITE (octet for octet, fresh Via branches)
  sent by the hop to both nodes at once.
  Effect: the workers' first claims fail on the dead sessions, the node-wide away flag
  goes up (``_went_away``), and every request until the timer's probe (every 2 s,
  raised again by the next worker holding a dead session) is decided by the node's own
  table alone: ``e2m_replay_claims_unavailable`` (A, B) went from (0, 0) to (8, 13),
  (6, 12), (10, 10) in three runs, and the replayed INVITE reached bob twice in 1, 3,
  0 and 2 of 6 calls in four runs -- review 37's hole back, with the database up.  The
  test asserts the counter (deterministic) and the duplicates.
  Code at fault: ``kamailio_app/replay_claims.py:123`` (``claim``: the dead session's
  error is ``ClaimsUnavailable``) and ``:182`` (``check_and_record``: one such failure
  raises the node's flag), on ``pgconn.py:180`` as in K1.
  Fix: as K1 (one retry on a fresh connection for a reused session's connection-level
  error before raising the flag); the flag then means the database is away.
  Test: ``test_hole_after_a_database_restart_the_nodes_skip_the_replay_claims``.

Controls (pass unmarked):
  ``test_control_a_forwarding_node_spools_and_replays_across_the_restart``: the same
  restart without ``fail_request_on_error``: spooled 2, replayed, the archive holds the
  three texts once each, nothing lost.
  ``test_control_a_strict_node_is_back_once_its_worker_reconnected``: the strict rule
  live: database killed, 500; started again and the rest over, 200; the archive holds
  exactly the two answered 200, the spool empty.
  ``test_control_copies_to_both_nodes_are_relayed_once_while_the_database_is_up``:
  review 37's fix live on this set-up (six calls, none twice, no claim skipped).

Tried and held:
  - SIGSTOP during replay (``SpooledArchive`` on a real server, library level): 3,000
    messages spooled with the database killed, started again, the replay loop frozen
    twice for 3 s mid-batch and resumed: 3,000 rows, 3,000 distinct ids and texts, none
    lost, none twice (a commit whose acknowledgement was lost is absorbed by ``ON
    CONFLICT (message_uid, part)``), the spool empty.
  - A restart with a spool (control above): nothing lost, nothing twice, the senders
    and order kept.
  - Digest across the proxy's domains: auth_db runs with ``use_domain 0`` and one
    realm, ``digest_aor`` names the first domain: the domains are aliases of one user
    table by design (README), so a nonce or credentials "of another realm" are not a
    second identity; a downstream challenge in our realm is refused
    (``own_realm_challenge``).  Nonces across nodes were reviews 67 and 71's.
  - ``_LAST_READ`` in a failure route (read only): the faked request is keyed by
    ($mi, $ml, $ci) (review 105); what it feeds is ``drop_attempt_keys``'s scope, whose
    names come from the transaction's own AVP, so a collision with another message of
    the same Call-ID and length at worst leaves the attempt's keys to their expiry.
    Not driven on the wire.

Untried (time): big replies (32-64 KB, NULs, past 49,149 octets) through tm's reply
routes on TCP/TLS; PRACK/UPDATE on an early route set with 100rel and their answers
sent straight to the caller by an insider callee; ``cert_table_pg`` on a restart (it
uses the same ``ProcessConnection`` and likely shows K1's pattern: a PUBLISH or
SUBSCRIBE answered as if the database were away); Kamailio's own ``db_postgres``
(auth_db) after a restart (a REGISTER with digest right after it); a failover to a
read-only standby.

Fixed (stop 38): ``pgconn.ProcessConnection.get`` polls a kept connection's socket (no
wait) before handing it out; an idle autocommit session the server spoke to unasked
(a restart's FATAL, then its close) is dropped and a new one made, so the first query
after a routine restart runs on a live session.  The archive, the replay claims and
the certificate table all take their connections there.  The three hole tests failed
on the code before (checked) and pass.
"""

from __future__ import annotations

import secrets
import time

import pytest

from tests.cluster.test_cluster_wire import Alice, _home, _spool, _stat, _wait_caught_up

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]


def _restart(pg) -> None:
    """A routine restart of the database: fast shutdown (every session ended by the
    server), the same cluster started again, and answering before we go on."""
    pg.stop(keep=True)
    pg.start()
    assert pg.psql("SELECT 1").strip() == "1"


def test_hole_a_strict_node_refuses_honest_requests_after_the_database_restarted(
        proxy_factory, pki, own_postgres):
    proxy, uas = _home(proxy_factory, own_postgres.url, fail_request_on_error=True, workers=1)
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    assert alice.message(f"t-{tag}-0".encode()) == 200          # the worker's connection
    _restart(own_postgres)
    after = [alice.message(f"t-{tag}-{n}".encode()) for n in (1, 2)]
    failed = _stat(proxy, "e2m_archive_failed")
    print(f"\nstrict node, database restarted and answering: {after}, "
          f"e2m_archive_failed {failed}")
    assert after == [200, 200] and failed == 0


def test_control_a_forwarding_node_spools_and_replays_across_the_restart(
        proxy_factory, pki, own_postgres):
    """The same restart without fail_request_on_error: the first write fails on the
    dead session, the message is spooled and replayed; nothing is lost or stored twice."""
    proxy, uas = _home(proxy_factory, own_postgres.url, workers=1)
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    texts = [f"t-{tag}-{n}".encode() for n in range(3)]
    assert alice.message(texts[0]) == 200
    _restart(own_postgres)
    assert [alice.message(t) for t in texts[1:]] == [200, 200]
    _wait_caught_up(proxy)
    stored = [r.plaintext for r in proxy.archive_rows()]
    print(f"\nforwarding node across the restart: spooled "
          f"{_stat(proxy, 'e2m_archive_spooled')}, stored {len(stored)}")
    assert stored == texts and _stat(proxy, "e2m_archive_lost") == 0


def test_control_a_strict_node_is_back_once_its_worker_reconnected(
        proxy_factory, pki, own_postgres):
    """The strict rule working: with the database killed, 500; started again, the
    worker's rest over and its connection remade, 200 (the set-up of K1, live)."""
    proxy, uas = _home(proxy_factory, own_postgres.url, fail_request_on_error=True, workers=1)
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    assert alice.message(f"t-{tag}-0".encode()) == 200
    own_postgres.kill()
    assert alice.message(f"t-{tag}-1".encode()) == 500
    own_postgres.start()
    time.sleep(1.2)                                  # retry_after (1 s) is over
    assert alice.message(f"t-{tag}-2".encode()) == 200
    assert [r.plaintext for r in proxy.archive_rows()] == [f"t-{tag}-{n}".encode()
                                                           for n in (0, 2)]
    assert _spool(proxy).pending() == 0


# --------------------------------------------------------------------------- replay claims across a restart

def _cluster_on(proxy_factory, pg, alice_type, pki, bob):
    from e2m_lab.cluster import REPLICATION, contacts, register_bob, start_cluster, wait_until
    nodes = start_cluster(proxy_factory, pg.url)
    a, b = nodes.nodes
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    return nodes, a, b


def _unavailable(a, b) -> tuple[int, int]:
    from e2m_lab.cluster import stat
    return (stat(a, "e2m_replay_claims_unavailable"), stat(b, "e2m_replay_claims_unavailable"))


@pytest.mark.slow
def test_control_copies_to_both_nodes_are_relayed_once_while_the_database_is_up(
        proxy_factory, pki, own_postgres, bob):
    """Review 37's check live on this set-up: alice's signed INVITE sent to A and B at
    once, six calls: every one reaches bob once, every claim asked of the database."""
    from e2m_lab.cluster import Alice as ClusterAlice
    from tests.cluster.test_review37_cluster import copies_to_both
    nodes, a, b = _cluster_on(proxy_factory, own_postgres, ClusterAlice, pki, bob)
    assert copies_to_both(ClusterAlice, pki, bob, a, b, 6) == []
    assert _unavailable(a, b) == (0, 0)


@pytest.mark.slow
def test_hole_after_a_database_restart_the_nodes_skip_the_replay_claims(
        proxy_factory, pki, own_postgres, bob):
    from e2m_lab.cluster import Alice as ClusterAlice
    from tests.cluster.test_review37_cluster import copies_to_both
    nodes, a, b = _cluster_on(proxy_factory, own_postgres, ClusterAlice, pki, bob)
    before = copies_to_both(ClusterAlice, pki, bob, a, b, 6)   # workers hold sessions
    assert before == [] and _unavailable(a, b) == (0, 0)
    _restart(own_postgres)
    after = copies_to_both(ClusterAlice, pki, bob, a, b, 6)
    skipped = _unavailable(a, b)
    print(f"\nafter the restart (database answering): relayed twice {len(after)} of 6, "
          f"requests decided without the claims (A, B) {skipped}")
    assert skipped == (0, 0)           # every claim asked of the database that is up
    assert after == []


def test_hole_a_node_without_spool_loses_messages_after_the_database_restarted(
        proxy_factory, pki, own_postgres):
    proxy, uas = _home(proxy_factory, own_postgres.url, workers=1,
                       extra={"archive": {"spool_max": 0}})
    alice = Alice(pki, proxy)
    tag = secrets.token_hex(4)
    texts = [f"t-{tag}-{n}".encode() for n in range(3)]
    assert alice.message(texts[0]) == 200
    _restart(own_postgres)
    assert [alice.message(t) for t in texts[1:]] == [200, 200]
    stored = [r.plaintext for r in proxy.archive_rows()]
    lost = _stat(proxy, "e2m_archive_lost")
    print(f"\nno spool, database restarted and answering: stored {len(stored)} of 3, "
          f"e2m_archive_lost {lost}")
    assert stored == texts and lost == 0
