"""Review 190 (attacker's review of the launcher's log path after stop 50, c0b7eaa).

Set-up: a real Kamailio 5.6.3 through ``start_proxy``, a ``[cluster]`` node with its own
PostgreSQL whose one configured peer never runs (as review 185's ``lone_node``); the
attacker sends UDP from that peer's DMQ address and port (the peer down, or a forged
source: UDP proves no source).  The log searched is what the launcher writes after
``LogCutter``, at the default level (info).

Hole K1: a KDMQ node-list body's status value is logged at ERROR, uncut
-----------------------------------------------------------------------
- Attacker: a [cluster] peer, or anyone who can send one UDP datagram from a peer's DMQ
  address:port.  No credentials.
- Messages: one ``KDMQ sip:notification_peer@<node's DMQ socket>`` whose body is one
  line ``sip:127.0.0.1:<port>;status=<canary>`` (no newline in the value).
- Effect observed: dmq's ``set_dmq_node_params`` logs ``ERROR: dmq [dmqnode.c:130]:
  set_dmq_node_params(): invalid status parameter: <canary>``: a piece of the body on the
  record's first line, with none of ``[[``, a ``_QUOTING`` place or a DEBUG level, so
  LogCutter passes it whole (1 record per KDMQ; the 40-octet canary verbatim; any
  length up to the datagram's, no quote or newline needed).  The same body line also
  reaches ``dmqnode.c:212`` "could not resolve <host>" (a host of the sender's choosing).
- Code at fault: Kamailio 5.6.3 ``src/modules/dmq/dmqnode.c:130`` (from
  ``notification_peer.c:404`` ``extract_node_list``), passed by
  ``kamailio_app/launcher.py:499-509`` ``LogCutter._first_line`` (508-509) (a record above DEBUG
  that is not named in ``_QUOTING`` and has no ``[[`` goes out whole).
- Suggested fix: name ``[dmqnode.c`` (and ``[notification_peer.c``) in ``_QUOTING``; more
  robustly, cut every record above DEBUG from a module that parses a KDMQ body (dmq,
  htable's ht_dmq.c, dmq_usrloc) after its function name, as DEBUG records are.
- Test: ``test_a_kdmq_node_list_status_stays_out_of_the_log``.

Hole K2: the same KDMQ stops DMQ for good (a lock left held); not a log path, found here
----------------------------------------------------------------------------------------
- Attacker: as K1 (one datagram from a peer's DMQ address:port).
- Messages: the K1 KDMQ (any node line that ``build_dmq_node`` refuses: a bad status, a
  URI it cannot parse, a host that does not resolve), then an honest node-list KDMQ.
- Effect observed: ``extract_node_list`` takes ``dmq_node_list->lock`` and, when
  ``build_dmq_node`` fails, returns -1 without releasing it; the DMQ worker then blocks
  on the same lock (``build_notification_body``), so the bad KDMQ is never answered and
  neither is any later one (0 answers in 5 s; the honest control before it got its 200
  in well under a second).  Every later ``bcast_dmq_message`` (htable's replication of
  e2mkeys, e2mseen, e2mtargets from a SIP worker) and ``is_from_remote_node`` takes that
  lock too: read in the source, not timed here.
- Code at fault: Kamailio 5.6.3 ``src/modules/dmq/notification_peer.c:405-406``
  (``if(find == NULL) return -1;`` inside ``lock_get(&update_list->lock)``); reached
  through ``kamailio_app/kemi.py:1192`` ``KSR.dmq.handle_message()`` for any KDMQ whose
  source is a peer's address:port, whatever its body.
- Suggested fix: in ``route_dmq``, refuse a ``notification_peer`` KDMQ whose body is not
  one line per node, each ``sip:<address of a configured peer or ours>:<port>`` with at
  most ``;status=(active|timeout|disabled|pending)``, before ``handle_message``; or patch
  dmq (``goto error`` there) in the Kamailio the project ships.
- Test: ``test_a_bad_node_list_leaves_dmq_answering``.

Controls
--------
- ``test_an_honest_node_list_is_answered``: a node-list KDMQ naming the peer
  ``;status=active`` from the peer's address gets its 200 (the harness reaches dmq's
  notification peer, and K2's "no answer" is not the harness's).

Tried and held
--------------
- tls at info/notice: its connection and certificate records (tls_server.c:418-564) log
  at ``cfg_get(tls, tls_cfg, log)``, 3 by default (tls_cfg.c:54, L_DBG), so they are
  DEBUG records and cut after their function name.
- auth, auth_db, srdb1, db_sqlite, db_postgres above DEBUG: only the nc (nonce.c:418),
  table or column names, sqlite3/libpq error texts and (km_dbase.c:267) a query, which
  for auth_db names the user and reads back the HA1 without printing it.
- app_python3: ``python_handle_exception`` (python_support.c:150/156) writes its text on
  continuation lines (dropped once serving); ``_log_exception`` prints ``str(exc)`` of
  E2MError only, whose texts name header names, lengths and limits (sip.py, headers.py);
  ``_summary`` prints the error's class name and a lower-cased media type, never
  ``verdict.detail``; cert_route's details name a check, an AoR and cryptography's
  parse error.  ``aor_of``'s "not a SIP address of record: {uri!r}" quotes a URI with
  its password, but every caller that logs catches it silently (certservice._target).
- ``LogCutter._cut``: a ``(): `` or a quote in the log prefix (Call-ID, CSeq) only makes
  the cut earlier (the first ``(): `` is searched; ``<core>`` follows the prefix); a
  ``N(pid) DEBUG: `` in a prefix makes ``_first_line`` take the DEBUG cut, shorter too.
- core/parser records with no quote before the value ("Failed parsing name-addr (",
  "status code non-numerical:", "not digit >") keep at most 200 octets of one header
  value, never a body (the header section ends before it).
- xhttp's "strange message" (xhttp_mod.c:280) and tm's "failed to parse retr buffer"
  (t_msgbuilder.c:950) quote a buffer from its start or after a newline: the first line
  is a request line, the rest continuation.
- htable's ht_dmq.c:600/604 name a table and a cell, not a value; dmq_usrloc's
  usrloc_sync.c:356 "bad socket <%s>" quotes one JSON string (a socket), not read here.

Fixed (stop 50): ``route_dmq`` hands a KDMQ to ``notification_peer`` to dmq only when
its body is one line per node of the cluster (a configured peer's DMQ address or ours,
``;status=`` a known state, each once: ``kamailio_app/dmq_bodies.node_list_ok``); any
other is answered 400 with a warning that quotes nothing of it.  So dmq never refuses
a line: its lock is not left held (K2) and it logs no value of the body (K1).  Both hole
tests failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import lone_node as cluster_lone_node, peer_kdmq
from e2m_lab.kamailio_harness import ProxyHandle
from e2m_plugins.testpki import TestPKI

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def lone_node(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """A [cluster] node whose one peer never runs (``e2m_lab.cluster.lone_node``)."""
    with cluster_lone_node(pki, tmp_path_factory.mktemp("review190-node"), "review190") as node:
        yield node


def _notification(node: ProxyHandle, body: str, wait: float = 3.0) -> tuple[str, list[bytes]]:
    """One KDMQ to dmq's notification peer from the peer's DMQ address:port with
    ``body``; (the log after it, the final answers' status lines within ``wait`` s)."""
    mark = node.log_mark()
    answers = peer_kdmq(node, "notification_peer", body.encode(), wait=wait)
    time.sleep(0.3)
    return node.log_since(mark), answers


def _final(answers: list[bytes]) -> list[bytes]:
    return [a.split(b"\r\n", 1)[0] for a in answers if not a.startswith(b"SIP/2.0 1")]


def test_an_honest_node_list_is_answered(lone_node):
    _, answers = _notification(
        lone_node, f"sip:127.0.0.1:{lone_node.peer_port};status=active\r\n")
    assert any(b" 200 " in line for line in _final(answers)), answers


def test_a_kdmq_node_list_status_stays_out_of_the_log(lone_node):
    canary = "CANARY" + secrets.token_hex(17)
    log, _ = _notification(
        lone_node, f"sip:127.0.0.1:{lone_node.peer_port};status={canary}\r\n", wait=1.0)
    assert canary not in log, [line[:300] for line in log.splitlines() if canary in line]


def test_a_bad_node_list_leaves_dmq_answering(lone_node):
    _notification(lone_node, f"sip:127.0.0.1:{lone_node.peer_port};status=bogus\r\n",
                  wait=1.0)
    _, answers = _notification(
        lone_node, f"sip:127.0.0.1:{lone_node.peer_port};status=active\r\n", wait=5.0)
    assert any(b" 200 " in line for line in _final(answers)), answers
