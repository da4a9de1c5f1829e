"""Review 131: the archive's schema 5 (``media.rtcp_address``, stop 42) with an old node
(schema 4 code) and a new one on one PostgreSQL.

Set-up: one PostgreSQL database of the session's server (``pg_url``), brought to
schema 4 and then upgraded to 5 (``migrate``), as the README's ``e2m-proxy db upgrade``
does "after installing a newer e2m-proxy (any node, once)"; a node still running the
code of 6fd3705 (the commit before stop 42, schema 4) goes on writing, as nodes only
check the schema when they start (``PostgresArchive.ensure_schema``).  The old node is
that commit's own ``kamailio_app`` and ``e2m_plugins`` (``git archive`` into a temporary
folder) in a subprocess; the new one is this tree's, also in a subprocess.  Each does
what ``bootstrap.ProxyApp.observe`` does with the media of one copy of the same
message: ``media_summary`` of its SDP, ``media_records``, ``content_uid(_identity(...))``
and ``PostgresArchive.record(..., uid=)``.  The message is one INVITE whose SDP is
pjsua2's own offer (it always writes ``a=rtcp:PORT``, port only).

Finding K3 (archive duplication in a mixed cluster, small)
----------------------------------------------------------

- Attacker: none needed (an insider can make it happen on purpose: the same request or
  2xx through two nodes); the operator following the README's upgrade.
- Observed: the two copies are stored under two ``message_uid``s: the media table holds
  2 rows for the one ``m=`` line (the old node's with ``rtcp_address`` NULL, the new
  node's with ``127.0.0.1``), where the archive's rule is one row per message "by any
  worker or node" (``content_uid``'s docstring, review 61).  The same SDP without
  ``a=rtcp`` (Asterisk's) gives one uid and one row on both nodes (control).
- Code at fault: ``kamailio_app/archive.py:100-102``: ``content_uid`` adds
  ``rtcp_address`` "only when there is one: a message's id stays what it was before",
  but ``e2m_plugins/sdp.py:362`` sets ``rtcp_address`` to the connection address for
  every ``a=rtcp`` without one, so the id changed for every SDP with ``a=rtcp`` (every
  pjsua offer and answer).  It also means a message archived before the upgrade and
  seen again after it (a late retransmission) is a second row.
- Fix: leave the uid's fields as they were (hash ``rtcp_address`` only when the
  ``a=rtcp`` line itself named an address, or not at all: the rest of the row already
  identifies the message), or document that a rolling upgrade across schema 5 double
  archives, and restart every node right after ``db upgrade``.
- Test: ``test_finding_k3_one_message_two_nodes_two_uids_after_schema5``.

Controls: ``test_control_k3_without_rtcp_one_message_one_row`` (Asterisk's SDP: one
uid, one row; the old node writes into the schema 5 table after the upgrade).

Tried and held: the old node keeps writing after the upgrade (its INSERT names its
columns; ``rtcp_address`` is NULL for its rows) and the new code reads its rows
(``media()``, ``rtcp_address`` None).  The spool: a new node writing to a database
still at schema 4 (started while it was unreachable, so ``ensure_schema`` could not
refuse) gets ``UndefinedColumn: column "rtcp_address" ... does not exist``; the message
is spooled (``e2m_archive_spooled`` 1, nothing lost), and after ``migrate`` to 5 the
replay writes both media rows, the RTCP address kept (``127.0.0.9:4003``) and the other
NULL (``test_control_spool_replay_keeps_the_rtcp_address_after_db_upgrade``).

Fixed (stop 42), K3: ``archive.content_uid`` leaves the RTCP address out (the body's
digest covers it), so a node before schema 5 and one after give one message one id.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import ROOT
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.archive_schema import migrate
from kamailio_app.pgconn import PgUrl, connect

pytestmark = pytest.mark.postgres

OLD_COMMIT = "6fd3705"     # the commit before stop 42 (fe9df1f): schema 4 code

PJSUA_OFFER = (b"v=0\r\no=- 3912345678 3912345678 IN IP4 127.0.0.1\r\ns=pjmedia\r\n"
               b"b=AS:84\r\nt=0 0\r\na=X-nat:0\r\nm=audio 4000 RTP/AVP 0 101\r\n"
               b"c=IN IP4 127.0.0.1\r\nb=TIAS:64000\r\na=rtcp:4001 IN IP4 127.0.0.1\r\n"
               b"a=sendrecv\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
               b"a=fmtp:101 0-16\r\n")
PJSUA_PORT_ONLY = PJSUA_OFFER.replace(b"a=rtcp:4001 IN IP4 127.0.0.1", b"a=rtcp:4001")
ASTERISK_OFFER = (b"v=0\r\no=- 1234 1236 IN IP4 127.0.0.1\r\ns=Asterisk\r\n"
                  b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 17014 RTP/AVP 0 101\r\n"
                  b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
                  b"a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")

NODE = r"""
import sys
from e2m_plugins import sip
from e2m_plugins.sdp import media_summary
from kamailio_app.archive import content_uid
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.bootstrap import _identity, media_records
from kamailio_app.pgconn import PgUrl
url, sdp_path, call_id = sys.argv[1:4]
sdp = open(sdp_path, "rb").read()
message = sip.make_request("INVITE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", call_id=call_id, from_tag="a1",
                           body=sdp, content_type="application/sdp")
lines = media_records(message, media_summary(sdp))
uid = content_uid(_identity(message, ()), [], lines)
PostgresArchive(PgUrl.parse(url)).record([], lines, uid=uid)
print(uid)
"""


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schema 4 code (``kamailio_app``, ``e2m_plugins``) of OLD_COMMIT."""
    out = tmp_path_factory.mktemp("schema4-code")
    data = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "kamailio_app",
                           "e2m_plugins"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out)   # our own repository's files
    return out


def _node(tree: Path, url: str, sdp: bytes, call_id: str, tmp_path: Path) -> str:
    sdp_path = tmp_path / f"sdp-{call_id}-{tree.name}.bin"
    sdp_path.write_bytes(sdp)
    done = subprocess.run([sys.executable, "-c", NODE, url, str(sdp_path), call_id],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _upgraded_database(pg_url: str) -> None:
    url = PgUrl.parse(pg_url)
    with connect(url) as conn:
        assert migrate(conn, "postgres", target=4) == (0, 4)    # the old nodes' db init
    with connect(url) as conn:
        assert migrate(conn, "postgres") == (4, 5)              # db upgrade, once


def _two_nodes(pg_url, old_tree, tmp_path, sdp, call_id):
    _upgraded_database(pg_url)
    old_uid = _node(old_tree, pg_url, sdp, call_id, tmp_path)
    new_uid = _node(ROOT, pg_url, sdp, call_id, tmp_path)
    rows = PostgresArchive(PgUrl.parse(pg_url)).media(call_id=call_id)
    print(old_uid, new_uid, rows)
    return old_uid, new_uid, rows


@pytest.mark.parametrize("sdp", [PJSUA_OFFER, PJSUA_PORT_ONLY], ids=["rtcp-address", "rtcp-port"])
def test_finding_k3_one_message_two_nodes_two_uids_after_schema5(pg_url, old_tree, tmp_path,
                                                                 sdp):
    old_uid, new_uid, rows = _two_nodes(pg_url, old_tree, tmp_path, sdp, "r131-k3")
    assert {r["rtcp_port"] for r in rows} == {4001}
    assert old_uid == new_uid and len(rows) == 1, (old_uid, new_uid, rows)


def test_control_k3_without_rtcp_one_message_one_row(pg_url, old_tree, tmp_path):
    """Asterisk's SDP (no ``a=rtcp``): both nodes give the same uid, one row; the old
    node writes into the schema 5 table after the upgrade."""
    old_uid, new_uid, rows = _two_nodes(pg_url, old_tree, tmp_path, ASTERISK_OFFER, "r131-c3")
    assert old_uid == new_uid and len(rows) == 1, (old_uid, new_uid, rows)
    assert rows[0]["rtcp_address"] is None and rows[0]["port"] == 17014


# -- the spool and a database still at schema 4 -------------------------------------------

def test_control_spool_replay_keeps_the_rtcp_address_after_db_upgrade(tmp_path, pg_url):
    """A new node writing to a database still at schema 4 (it started while the database
    was unreachable, so ``ensure_schema`` could not refuse; then the operator ran ``db
    upgrade`` late): the INSERT naming ``rtcp_address`` fails, the message waits in the
    spool, nothing is counted lost; after the upgrade the replay writes it with its RTCP
    address (held)."""
    from dataclasses import replace

    from kamailio_app.archive import BodyRecord, MediaRecord
    from kamailio_app.archive_spool import ArchiveEvents, SpooledArchive, SpoolFile
    url = PgUrl.parse(pg_url)
    with connect(url) as conn:
        assert migrate(conn, "postgres", target=4) == (0, 4)
    lines: list[tuple[str, str]] = []
    spooled = SpooledArchive(PostgresArchive(url), SpoolFile(tmp_path / "spool.sqlite"),
                             events=ArchiveEvents(log=lambda level, line: lines.append((level, line))))
    body = BodyRecord(call_id="r131-spool", from_uri="sip:alice@example.com",
                      to_uri="sip:bob@example.com", method="INVITE", direction="request",
                      content_type="application/sdp", plaintext=b"v=0", sha256="0" * 64,
                      signature="valid", signer="sip:alice@example.com")
    media = MediaRecord(call_id="r131-spool", method="INVITE", direction="request",
                        media="audio", address="127.0.0.1", port=4000, port_count=1,
                        proto="RTP/SAVP", codecs="0 PCMU/8000", flow="sendrecv",
                        rtcp_port=4003, rtcp_address="127.0.0.9")
    uid = spooled.record([body], [media, replace(media, media="video", port=4010,
                                                 rtcp_port=None, rtcp_address=None)])
    print(spooled.pending(), dict(spooled.events.counts), lines)
    assert spooled.pending() == 1 and "e2m_archive_lost" not in spooled.events.counts
    with connect(url) as conn:
        assert migrate(conn, "postgres") == (4, 5)
    assert spooled.replay() == 1 and spooled.pending() == 0
    rows = PostgresArchive(url).media(call_id="r131-spool")
    assert [(r["media"], r["rtcp_address"], r["rtcp_port"]) for r in rows] == [
        ("audio", "127.0.0.9", 4003), ("video", None, None)]
    assert {r for r in PostgresArchive(url).bodies() if r.message_uid == uid}
