"""Review 30 in memory: the longest Call-ID and tag the core reads, and which database
errors the shared archive takes for rows refused for good.  The wire tests are in
``tests/cluster/test_review30_cluster.py``."""

from __future__ import annotations

import pytest

from e2m_plugins.errors import MalformedError
from e2m_plugins.sip import MAX_ID_OCTETS, make_request


def _request(call_id: str, tag: str = "a1"):
    return make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:eve@example.net",
                        to_uri="sip:bob@example.com", call_id=call_id, from_tag=tag)


def test_a_call_id_or_tag_past_the_bound_is_malformed():
    assert _request("c" * MAX_ID_OCTETS).call_id == "c" * MAX_ID_OCTETS
    with pytest.raises(MalformedError, match="longer than"):
        _ = _request("c" * (MAX_ID_OCTETS + 1)).call_id
    assert _request("c@x", "t" * MAX_ID_OCTETS).from_tag == "t" * MAX_ID_OCTETS
    with pytest.raises(MalformedError, match="longer than"):
        _ = _request("c@x", "t" * (MAX_ID_OCTETS + 1)).from_tag


def test_a_program_limit_is_a_refusal_of_the_rows_not_an_outage():
    psycopg = pytest.importorskip("psycopg")
    from kamailio_app.archive import ArchiveError, ArchiveUnavailable
    from kamailio_app.archive_pg import PostgresArchive
    from kamailio_app.pgconn import PgUrl
    archive = PostgresArchive(PgUrl.parse("postgres://e2m:pw@127.0.0.1:5432/e2m"))
    refused = archive._failure(psycopg.errors.ProgramLimitExceeded("index row size 3016"),
                               "write")
    assert isinstance(refused, ArchiveError) and not isinstance(refused, ArchiveUnavailable)
    away = archive._failure(psycopg.OperationalError("connection refused"), "write")
    assert isinstance(away, ArchiveUnavailable)
