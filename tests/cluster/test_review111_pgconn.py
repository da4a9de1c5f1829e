"""Review 111 (an attacker's review of afb1199), PostgreSQL sessions: stop 38's
``pgconn._server_has_spoken`` (review 110's fix), with a real PostgreSQL.

Hole K3 (``test_hole_k3_a_session_on_a_high_descriptor_is_made_anew_for_every_query``):
cost per query.  ``_server_has_spoken`` polls the kept session's socket with
``select.select``, which refuses a descriptor of 1024 or more (``ValueError:
filedescriptor out of range in select()``); the code counts that as "ended"
(``kamailio_app/pgconn.py:172-174``), so ``ProcessConnection.get`` drops and remakes
the session at every use.  Set-up: a process with 1,100 descriptors open (of
/dev/null; the soft limit here is 20,000), then a ``ProcessConnection`` to the test
database and 20 queries.  Effect (seen): socket fd 1101, 20 sessions (20 backend pids)
for 20 queries, 16.1 ms a query, against 1 session and 0.8 ms a query at fd 5 (the
control): a full connection (TCP, start-up, password authentication) per query, and a
server backend started and ended per query.  Reach through Kamailio NOT shown: a
Kamailio process gets such descriptors when it holds many sockets (a TCP reader holds
the connections it serves; Kamailio raises its open files limit for
``tcp_max_connections``), and the session made after that (first use, or after a
restart or error) would sit past 1023; I did not drive a worker there in the time.
psycopg's own waits use ``selectors`` (epoll) and have no such limit: this is new in
stop 38.  Fix: poll with ``select.poll()`` (or ``selectors.DefaultSelector``), which
take any descriptor; or read psycopg's ``conn.pgconn`` state.

Controls (pass unmarked): ``test_control_k3_a_session_on_a_low_descriptor_is_kept``
(one session for 20 queries); ``test_control_k3_a_session_the_server_ended_is_replaced_before_use``
(``pg_terminate_backend`` on the kept session: the next query runs on a new one).

Tried and held (read): a server speaking unasked on an idle autocommit session: a
NOTICE/ParameterStatus after a reload or a promotion is sent when the next command is
read (PostgresMain processes SIGHUP after ReadCommand), so it is read with that
command's answer; NOTIFY needs a LISTEN, which nothing issues; FATAL (terminate,
idle_session_timeout, shutdown) is the case the rule is for.  Even a spurious
"spoken" only costs one reconnect, not a failure.  A session ended mid-transaction:
callers take ``get()`` once per operation (``SqlArchive``, ``replay_claims`` are single
statements in autocommit), so no half transaction moves to a new session (read).

Fixed (stop 38): ``pgconn._server_has_spoken`` uses ``select.poll``, which takes any
descriptor.  The hole test failed on the code before (checked) and passes.
"""

from __future__ import annotations

import os
import resource
import time

import pytest

from kamailio_app.pgconn import PgUrl, ProcessConnection

pytestmark = [pytest.mark.postgres]


def _backend(db: ProcessConnection) -> int:
    return db.get().execute("SELECT pg_backend_pid()").fetchone()[0]


def _fds_up_to(limit: int) -> list[int]:
    """Open descriptors (of /dev/null) until the next one the process gets is past
    ``limit``: what a process with many sockets open (a Kamailio TCP reader holding
    its connections) hands the next socket it makes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, limit + 256), hard))
    held = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        held.append(fd)
        if fd >= limit:
            return held


def _queries(db: ProcessConnection, count: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    pids = [_backend(db) for _ in range(count)]
    return pids, (time.perf_counter() - started) / count


def test_hole_k3_a_session_on_a_high_descriptor_is_made_anew_for_every_query(pg_url):
    held = _fds_up_to(1100)
    db = ProcessConnection(PgUrl.parse(pg_url))
    try:
        pids, each = _queries(db, 20)
        print("fd", db.get().fileno(), "sessions for 20 queries", len(set(pids)),
              "%.2f ms a query" % (each * 1000))
    finally:
        db.drop()
        for fd in held:
            os.close(fd)
    assert len(set(pids)) == 1


def test_control_k3_a_session_on_a_low_descriptor_is_kept(pg_url):
    db = ProcessConnection(PgUrl.parse(pg_url))
    try:
        pids, each = _queries(db, 20)
        print("fd", db.get().fileno(), "sessions for 20 queries", len(set(pids)),
              "%.2f ms a query" % (each * 1000))
    finally:
        db.drop()
    assert len(set(pids)) == 1


def test_control_k3_a_session_the_server_ended_is_replaced_before_use(pg_url):
    """Review 110's rule is live: a session the server terminated is replaced, the query
    answered on a new one."""
    db = ProcessConnection(PgUrl.parse(pg_url))
    other = ProcessConnection(PgUrl.parse(pg_url))
    try:
        first = _backend(db)
        other.get().execute("SELECT pg_terminate_backend(%s)", (first,))
        time.sleep(0.3)
        second = _backend(db)
    finally:
        db.drop()
        other.drop()
    assert second != first
