"""The certificate service's SQLite file made by an older e2m-proxy (schema version 1,
before ``cert_subscriptions.source_port``) is brought up to date in place when the
service opens it, its rows kept (stop 47, review 137 HB2).  PostgreSQL:
``tests/cluster/test_cert_table_pg.py``."""

from __future__ import annotations

import sqlite3

import pytest

from kamailio_app.cert_table import (SCHEMA_VERSION, CertDatabase, CertTableError,
                                     SubscriptionTable)

# the subscriptions table and version row as schema version 1 made them
VERSION_1 = """
CREATE TABLE cert_subscriptions (
    call_id TEXT NOT NULL, local_tag TEXT NOT NULL, remote_tag TEXT NOT NULL,
    event_id TEXT NOT NULL, aor TEXT NOT NULL, local_uri TEXT NOT NULL,
    remote_uri TEXT NOT NULL, remote_target TEXT NOT NULL, route_set TEXT NOT NULL,
    next_hop TEXT NOT NULL, source TEXT NOT NULL, contact TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL, cseq INTEGER NOT NULL,
    last_notify DOUBLE PRECISION NOT NULL, pending INTEGER NOT NULL,
    PRIMARY KEY (call_id, local_tag, remote_tag, event_id));
CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL,
                             updated DOUBLE PRECISION NOT NULL);
INSERT INTO schema_version VALUES ('certs', 1, 0);
INSERT INTO cert_subscriptions VALUES ('c1', 'l1', 'f1', '', 'sip:bob@example.com',
    'sip:bob@example.com', 'sip:alice@example.com', 'sip:alice@192.0.2.1:5062',
    '["sip:192.0.2.1:5060;lr"]', 'sip:192.0.2.1:5060;lr', '192.0.2.1', 'sip:x:1',
    1e10, 3, 0, 0);
"""


def version_1_file(path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_1)
    conn.close()
    path.chmod(0o600)


def test_a_version_1_file_gains_the_opening_port_and_keeps_its_rows(tmp_path):
    path = tmp_path / "certs.sqlite"
    version_1_file(path)
    kept = SubscriptionTable(CertDatabase(path)).get("c1", "l1", "f1", "")
    assert kept is not None and kept.source_port == 0        # not known: the old rule
    assert kept.next_hop == "sip:192.0.2.1:5060;lr" and kept.route_set
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version WHERE component = 'certs'"
                        ).fetchone() == (SCHEMA_VERSION,) == (2,)
    CertDatabase(path).ensure_schema()                        # again: nothing to do
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)


def test_a_file_of_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "certs.sqlite"
    version_1_file(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    table = SubscriptionTable(CertDatabase(path))
    for _ in range(2):               # and again: a refused file is never used
        with pytest.raises(CertTableError, match="newer than this e2m-proxy"):
            table.get("c1", "l1", "f1", "")
