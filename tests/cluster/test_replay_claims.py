"""A cluster's replay claims (``kamailio_app/replay_claims.py``): the first node to claim
a signed body's replay record in the shared PostgreSQL wins (review 37); while the
database cannot be asked, the node's own table decides.  The wire test is
``tests/cluster/test_review37_cluster.py``."""

from __future__ import annotations

import threading

import pytest

from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.errors import ReplayError
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.archive_spool import ArchiveEvents
from kamailio_app.pgconn import PgUrl
from kamailio_app.replay_claims import (CLAIMS_COUNTER, AwayFlag, ClaimedReplayCache,
                                        ClaimsUnavailable, PgReplayClaims)
from kamailio_app.replay_htable import HtableReplayCache


class _Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def claims_db(pg_url):
    url = PgUrl.parse(pg_url)
    PostgresArchive(url).migrate()
    return url


def test_the_first_claim_wins_and_an_expired_one_is_taken_over(claims_db):
    clock = _Clock()
    node_a, node_b = PgReplayClaims(claims_db, clock=clock), PgReplayClaims(claims_db, clock=clock)
    assert node_a.claim("r-one", 60) is True
    assert node_b.claim("r-one", 60) is False
    assert node_a.claim("r-one", 60) is False          # a second sighting anywhere
    assert node_b.claim("r-two", 60) is True
    clock.now += 61
    assert node_b.claim("r-one", 60) is True           # expired: taken over
    clock.now += 61
    assert node_a.sweep() == 2 and node_a.sweep() == 0
    node_a.probe()


def test_many_nodes_claiming_at_once_one_wins(claims_db):
    """Eight connections (as eight workers of two nodes) claim the same names at once:
    each name is won exactly once."""
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        claims = PgReplayClaims(claims_db)
        won = [claims.claim(f"r-{n}", 60) for n in range(30)]
        with lock:
            results.extend(won)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 240 and results.count(True) == 30


def test_a_database_that_reads_but_will_not_keep_claims_fails_the_probe_for_good(pg_url):
    """The probe writes, as a claim does: a database without the table, or one that
    only reads (a standby after a failover), keeps the flag up instead of lowering it
    every 2 s for the next claim to raise again; both are refusals the timer reports."""
    import psycopg
    url = PgUrl.parse(pg_url)
    with pytest.raises(ClaimsUnavailable) as missing:
        PgReplayClaims(url).probe()
    assert missing.value.permanent
    PostgresArchive(url).migrate()
    PgReplayClaims(url).probe()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with pytest.raises(ClaimsUnavailable) as read_only:
        PgReplayClaims(url).probe()
    assert read_only.value.permanent


def test_an_unreachable_database_raises_claims_unavailable():
    claims = PgReplayClaims(PgUrl.parse("postgres://e2m:pw@127.0.0.1:9/none"), connect_timeout=2)
    with pytest.raises(ClaimsUnavailable):
        claims.claim("r-one", 60)


# -- the node's cache with claims (a stand-in for the database) ----------------------

class _Claims:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.away = False
        self.asked = 0

    def claim(self, name: str, ttl: int) -> bool:
        self.asked += 1
        if self.away:
            raise ClaimsUnavailable("OperationalError")
        if name in self.held:
            return False
        self.held.add(name)
        return True

    probes = 0

    def probe(self) -> None:
        self.probes += 1
        if self.away:
            raise ClaimsUnavailable("OperationalError")

    def sweep(self, budget_s: float = 1.0) -> int:
        return 0


class _Context:
    """What ``check_and_record`` reads of a signed SIP context."""

    def __init__(self, key: str, when: float) -> None:
        self.key, self.time = key, when

    def check_time(self, now, window):
        pass

    def replay_key(self, to_tag=None):
        return self.key + (to_tag or "")


def _node(claims, lines=None, away=None):
    events = ArchiveEvents(log=lambda level, line: (lines if lines is not None else []).append(
        (level, line)))
    local = HtableReplayCache(MemoryHtable(), window=300)
    return ClaimedReplayCache(local, claims, events=events, away=away), events


def test_a_copy_at_the_other_node_before_replication_is_a_replay():
    import time as _time
    claims = _Claims()
    node_a, _ = _node(claims)
    node_b, _ = _node(claims)
    context = _Context("k1", _time.time())
    node_a.check_and_record(context, None, retransmissions=False)
    with pytest.raises(ReplayError, match="another node"):
        node_b.check_and_record(context, None, retransmissions=False)
    with pytest.raises(ReplayError):                   # the node's own table: no round trip
        node_a.check_and_record(context, None, retransmissions=False)
    assert claims.asked == 2


def test_while_the_database_is_away_the_nodes_own_table_decides_until_the_timer_sees_it_back():
    """The first failed claim raises the node's flag (shared by its workers); no worker
    asks again until the timer's probe answers and takes it down."""
    import time as _time
    claims, lines, flag = _Claims(), [], AwayFlag()
    node, events = _node(claims, lines, flag)
    other_worker, other_events = _node(claims, lines, flag)
    claims.away = True
    node.check_and_record(_Context("k1", _time.time()), None, retransmissions=False)
    other_worker.check_and_record(_Context("k2", _time.time()), None, retransmissions=False)
    assert claims.asked == 1                           # one timeout for the node
    with pytest.raises(ReplayError):
        node.check_and_record(_Context("k1", _time.time()), None, retransmissions=False)
    assert events.counts[CLAIMS_COUNTER] == other_events.counts[CLAIMS_COUNTER] == 1
    assert [lv for lv, _ in lines] == ["warn"]
    node.tend()                                        # the timer: still away
    assert flag.is_set() and claims.probes == 1
    claims.away = False
    node.tend()
    assert not flag.is_set() and [lv for lv, _ in lines] == ["warn", "info"]
    other_worker.check_and_record(_Context("k3", _time.time()), None, retransmissions=False)
    assert claims.asked == 2


# --------------------------------------------------------------------------- fork slots (review 39)

def test_fork_slots_are_claimed_across_nodes_and_a_known_tag_costs_no_round_trip():
    claims = _Claims()
    node_a, _ = _node(claims)
    node_b, _ = _node(claims)
    assert node_a.admit_fork("early", "t1", 2) == 0
    assert node_b.admit_fork("early", "t2", 2) == 1        # slot 0 is A's, not replicated yet
    assert node_b.admit_fork("early", "t3", 2) is None     # both slots gone in the cluster
    asked = claims.asked
    assert node_a.admit_fork("early", "t1", 2) == 0        # its own: read, not claimed
    assert node_b.admit_fork("early", "t2", 2) == 1
    assert node_b.admit_fork("early", "t2", 2, claim=False) == 1   # found past the gap
    assert node_b.admit_fork("early", "t9", 2, claim=False) is None
    assert claims.asked == asked
    # the first To tag of a 2xx to an UPDATE (limit 1, ProxyEngine._first_tag)
    assert node_a.admit_fork("\nctx", "x", 1) == 0 and node_b.admit_fork("\nctx", "y", 1) is None


def test_fork_slots_while_the_database_is_away_are_the_nodes_own_and_counted():
    claims, lines, flag = _Claims(), [], AwayFlag()
    node, events = _node(claims, lines, flag)
    claims.away = True
    assert node.admit_fork("early", "t1", 2) == 0
    assert node.admit_fork("early", "t2", 2) == 1
    assert claims.asked == 1 and flag.is_set()             # one timeout, then the flag
    assert events.counts[CLAIMS_COUNTER] == 2
    assert [lv for lv, _ in lines] == ["warn"]


def test_a_database_that_refuses_the_claims_is_an_error_once_a_minute():
    """Review 40: a table that is not there is not an outage that ends by itself."""
    claims, lines, flag = _Claims(), [], AwayFlag()
    node, _ = _node(claims, lines, flag)
    flag.set(True)

    def refuse() -> None:
        raise ClaimsUnavailable("UndefinedTable", permanent=True)

    claims.probe = refuse
    node.tend()
    node.tend()
    assert flag.is_set() and [lv for lv, _ in lines] == ["error"]
    assert "db upgrade" in lines[0][1]
    node._refused_logged -= 61                          # a minute later
    node.tend()
    assert [lv for lv, _ in lines] == ["error", "error"]
