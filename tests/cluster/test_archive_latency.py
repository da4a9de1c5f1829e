"""What the shared archive costs per message, next to the embedded one: the write
alone (one transaction: a body row and a media row), and an encrypted MESSAGE through
a real Kamailio to bob and back.  Printed for the operator (``-s``); the bounds only
catch a write path gone badly wrong."""

from __future__ import annotations

import statistics
import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa
from e2m_lab.wire import transact
from kamailio_app.archive import BodyRecord, MediaRecord, SqliteArchive
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.archive_schema import migrate
from kamailio_app.pgconn import PgUrl, connect

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROUNDS = 300


def _figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"median {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"


def _time_writes(archive) -> list[float]:
    body = BodyRecord(call_id="lat@x", from_uri="sip:alice@example.com",
                      to_uri="sip:bob@example.com", method="INVITE", direction="request",
                      content_type="application/sdp", plaintext=b"v=0\r\n" * 40,
                      sha256="0" * 64, signature="valid")
    media = MediaRecord(call_id="lat@x", method="INVITE", direction="request", media="audio",
                        address="127.0.0.1", port=4000, port_count=1, proto="RTP/AVP",
                        codecs="0 PCMU/8000")
    archive.record([body], [media])          # connect first
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        archive.record([body], [media])
        samples.append(time.perf_counter() - started)
    return samples


def test_archive_write_latency_sqlite_and_postgres(tmp_path, pg_url):
    with connect(PgUrl.parse(pg_url), autocommit=True) as conn:
        migrate(conn, "postgres")
    sqlite_times = _time_writes(SqliteArchive(tmp_path / "a.sqlite"))
    pg_times = _time_writes(PostgresArchive(PgUrl.parse(pg_url)))
    print(f"\narchive write, one message (1 body + 1 media row), {ROUNDS} rounds:"
          f"\n  SQLite (WAL, synchronous=NORMAL): {_figures(sqlite_times)}"
          f"\n  PostgreSQL (loopback, own connection): {_figures(pg_times)}")
    assert statistics.median(pg_times) < 0.05


def _round_trips(proxy, pki, count: int) -> list[float]:
    uas = RawUas()
    try:
        bob = SipUa(proxy.port, user="bob")
        bob.request(bob.build("REGISTER", "sip:example.com")
                    .replace("Contact", f"<sip:bob@127.0.0.1:{uas.port}>"))
        bob.close()
        alice = ua_engine(pki, "alice",
                          proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:text/plain",)),))
        sealed = [alice.protect(message(pki, b"round trip %d" % n)).message
                  for n in range(count + 5)]
        samples = []
        for n, request in enumerate(sealed):
            started = time.perf_counter()
            answer = transact(proxy.port, request)
            assert answer is not None and answer.status == 200
            if n >= 5:                       # the workers' first connections aside
                samples.append(time.perf_counter() - started)
        return samples
    finally:
        uas.close()


@pytest.mark.kamailio
def test_message_round_trip_through_kamailio_sqlite_and_postgres(proxy_factory, pki, pg_url):
    embedded = proxy_factory("embedded", view=("MESSAGE:text/plain",), workers=1)
    shared = proxy_factory("shared", view=("MESSAGE:text/plain",), workers=1, db_url=pg_url)
    local, remote = _round_trips(embedded, pki, 100), _round_trips(shared, pki, 100)
    print(f"\nencrypted MESSAGE through Kamailio (1 worker) to bob and back, 100 each:"
          f"\n  SQLite archive: {_figures(local)}\n  PostgreSQL archive: {_figures(remote)}")
    assert len(shared.archive_rows()) == 105 and len(embedded.archive_rows()) == 105
