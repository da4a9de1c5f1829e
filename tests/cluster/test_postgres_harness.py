"""The private PostgreSQL the cluster tests start: loopback only, password required,
its data kept across a SIGKILL and a restart, its folder gone after stop."""

from __future__ import annotations

import socket
import subprocess

import pytest

from e2m_lab.postgres import PostgresServer

pytestmark = pytest.mark.postgres


def test_a_private_cluster_on_loopback_with_a_password():
    pg = PostgresServer().start()
    try:
        pg.psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)")
        with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
            pass                                           # listening on loopback
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{pg.port}"],
                                   capture_output=True, text=True).stdout
        local = {line.split()[3] for line in listening.splitlines()}
        assert local == {f"127.0.0.1:{pg.port}"}, listening       # nowhere else
        wrong = subprocess.run(
            [str(pg.bindir / "psql"), "-X", "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user,
             "-d", pg.database, "-c", "select 1"],
            capture_output=True, text=True, env={"PGPASSWORD": "wrong", "PATH": "/usr/bin"})
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
        pg.kill()
        assert not pg.running
        pg.start()
        assert pg.psql("SELECT n FROM kept").strip() == "42"
    finally:
        pg.stop()
    assert not pg.folder.exists()
