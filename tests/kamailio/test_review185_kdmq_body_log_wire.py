"""Review 185 (attacker's review of LogCutter's records above DEBUG, ea96db7/9f1ec56/ba03154).

Set-up: a real Kamailio per module (``start_proxy``), a ``[cluster]`` node with its own
PostgreSQL whose one configured peer never runs (``lone_node``, as review 2's); the log
searched is what the launcher writes after ``LogCutter`` (``node.log_since(mark)``), at
the default level (info).

Hole K1: a KDMQ body is logged whole, at ERROR, on the record's first line
-------------------------------------------------------------------------
- Attacker: a [cluster] peer, or anyone who can send UDP from a peer's DMQ address and
  port (the peer down, or a forged source on the DMQ network: UDP carries no proof of
  its source).  No credentials.
- Messages: one ``KDMQ sip:htable@<node's DMQ socket>`` over UDP from the peer's
  address:port, ``Content-Type: application/json``, a body that is not JSON (a canary
  inside, no newline).
- Effect observed: htable's ``ht_dmq_handle_msg`` logs ``ERROR: htable [ht_dmq.c:289]:
  ht_dmq_handle_msg(): invalid json doc [[<the whole body>]]``; the body has no newline,
  so it is on the record's FIRST line, and ``_QUOTING`` does not name ``ht_dmq.c``:
  LogCutter passes it whole (1 record per KDMQ, the 676-octet canary body in the log
  verbatim).  dmq_usrloc's ``usrloc_sync.c:507`` prints the same for a
  ``sip:usrloc@`` KDMQ.  A replicated htable or usrloc body is a peer's state (dialog
  targets, sealed key-cache records, contacts); the invariant is that no message body
  reaches the log, and this one is logged at the default level.
- Code at fault: Kamailio 5.6.3 ``src/modules/htable/ht_dmq.c:289`` (``LM_ERR("invalid
  json doc [[%s]]\\n", jdoc.buf.s)``) and ``src/modules/dmq_usrloc/usrloc_sync.c:507``,
  passed by ``kamailio_app/launcher.py:411`` ``_QUOTING`` (``[core/parser/``,
  ``message=<``, ``[core/tcp_read.c`` only) and ``LogCutter._first_line``
  (launcher.py:478-481: a record above DEBUG not named there goes out whole).
- Suggested fix: add ``b"[ht_dmq.c"`` and ``b"[usrloc_sync.c"`` to ``_QUOTING`` (cut at
  the first ``[`` after ``(): ``); more robustly, cut every record above DEBUG at its
  first ``[[`` / ``<`` / ``'`` too, or cap a record's first line (a body quoted on one
  line is long; none of ours is over a few hundred octets).
- Test: ``test_a_kdmq_body_that_is_not_json_stays_out_of_the_log``.

Controls
--------
- ``test_a_strangers_kdmq_body_stays_out_of_the_log``: the same KDMQ from an address that
  is not a peer's is refused 403 by kemi.route_dmq before DMQ sees it: one warning, no
  body.

Tried and held (read in the 5.6.3 source, and/or the existing wire tests)
------------------------------------------------------------------------
- auth/auth_db/srdb1 above DEBUG: only ``nonce.c:418`` "bad nc value" (the nc, no
  secret); no HA1, response or nonce secret.  db_postgres ``km_dbase.c:267`` quotes the
  query, which for auth_db is ``select ha1 ... where username=...`` (no value read back);
  db_sqlite's errors quote sqlite3_errmsg only.
- The log prefix (``{$mt $hdr(CSeq) $ci}``) is capped at 1024 octets
  (dprint.c:456 LOG_PREFIX_SIZE; pv_printf fails past it and no prefix is written), so
  a long Call-ID cannot push ``[core/parser/`` past LogCutter.LIMIT (64 KiB) and leave
  a parser record's body to the uncut tail of the line.
- ``msg_translator.c:426/3326`` and xhttp's ``strange message`` (CRIT) quote the message
  from its start: the request line is the first line, the rest continuation (dropped).
- Our own lines: ``_summary`` logs the error's type name only (``verdict.detail`` is
  never logged), media lines no ``a=crypto``; the shared archive's errors keep the
  first line of psycopg's message (archive_pg.py:64), sqlite's name constraints only.

Untried (time): non-atomic pipe writes (records over PIPE_BUF from two processes
interleaving inside one line past LIMIT), TLS errors with a client's bad record, the
certificate service's ``PUBLISH: %s`` exception texts (cert_route.py:192).

Fixed (stop 50): not by naming ``ht_dmq.c`` and ``usrloc_sync.c``: ``LogCutter`` cuts any
record that prints a buffer Kamailio's way, ``[[...]]``, at its ``[[`` (the translator
and jsonrpcs print so too).  The hole test failed on the code before the fix and passes
with it.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import lone_node as cluster_lone_node
from e2m_lab.kamailio_harness import ProxyHandle
from e2m_plugins.testpki import TestPKI

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]


@pytest.fixture(scope="module")
def lone_node(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """A [cluster] node whose one peer never runs (``e2m_lab.cluster.lone_node``)."""
    with cluster_lone_node(pki, tmp_path_factory.mktemp("review185-node"), "review185") as node:
        yield node


def _kdmq(node: ProxyHandle, source: tuple[str, int], canary: str) -> tuple[str, list[bytes]]:
    """One KDMQ to htable whose body is not JSON, from ``source``; the log after it."""
    body = ('{"action":1,"htname":"e2mtargets","cname":"' + canary + '","type":2,'
            '"strval":"' + "sealed-" * 80 + canary).encode()    # unterminated: not JSON
    mark = node.log_mark()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(source)
    sock.settimeout(1.0)
    host, port = sock.getsockname()
    answers = []
    try:
        sock.sendto((f"KDMQ sip:htable@127.0.0.1:{node.dmq_port} SIP/2.0\r\n"
                     f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-r185{secrets.token_hex(4)}\r\n"
                     f"From: <sip:{host}:{port}>;tag=r185\r\n"
                     f"To: <sip:htable@127.0.0.1:{node.dmq_port}>\r\n"
                     f"Call-ID: r185-{secrets.token_hex(6)}\r\nCSeq: 1 KDMQ\r\nMax-Forwards: 1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     ).encode() + body, ("127.0.0.1", node.dmq_port))
        try:
            while True:
                answers.append(sock.recv(65535))
        except socket.timeout:
            pass
    finally:
        sock.close()
    time.sleep(0.5)            # the launcher drains Kamailio's log every 20 ms
    return node.log_since(mark), answers


def test_a_kdmq_body_that_is_not_json_stays_out_of_the_log(lone_node):
    canary = "CANARY" + secrets.token_hex(10)
    log, _ = _kdmq(lone_node, ("127.0.0.1", lone_node.peer_port), canary)
    assert canary not in log, [line[:300] for line in log.splitlines() if canary in line]


def test_a_strangers_kdmq_body_stays_out_of_the_log(lone_node):
    canary = "CANARY" + secrets.token_hex(10)
    log, answers = _kdmq(lone_node, ("127.0.0.48", 0), canary)
    assert any(b" 403 " in a.split(b"\r\n", 1)[0] for a in answers), answers
    assert "not a [cluster] peer: refused" in log
    assert canary not in log
