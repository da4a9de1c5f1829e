"""Review 131, finding K4: ``e2m archive show`` (text) says nothing of where RTCP goes.

Stop 42 (review 130 K2) archived ``a=rtcp``'s address (schema 5, ``media.rtcp_address``)
and named it in the ``e2m media:`` log line.  The operator's tool for reading the
archive, ``e2m archive show ID`` without ``--json``, prints one line per media row:
``media <method> <direction> <media> <address>:<port> <proto> <codecs> <flow>``
(``kamailio_app/archive_cmd.py:104-107``): neither ``rtcp_port`` nor ``rtcp_address``.

- Attacker: insider UA (alice) hiding where her call's RTCP goes, as in review 130 K2.
- Set-up: alice's own ``UAEngine`` protects an INVITE for bob with the home proxy as a
  reader of ``INVITE:application/sdp``; its media section ends ``a=rtcp:4003 IN IP4
  127.0.0.9`` (RFC 3605; bob's real pjsua2 phone sends its RTCP there:
  ``tests/pjsua/test_review131_sdp_attr_names_phone.py``
  ``test_control_k2_rfc3605_rtcp_address_archived_and_used``, 2 datagrams).  The proxy
  engine's verdict is archived as ``bootstrap.observe`` does (``body_records``,
  ``media_records``) into an SQLite archive; then ``e2m archive show 1 --db FILE``.
- Observed: the media line reads ``media INVITE request audio 127.0.0.1:4000 RTP/SAVP 0
  PCMU/8000, 8 PCMA/8000 sendrecv``: 127.0.0.9 (and port 4003) appear nowhere in the
  output; ``--json`` and the log line do name them (controls).
- Fix: print ``rtcp <address>:<port>`` on the media line when ``rtcp_port`` is set, as
  ``media_log_lines`` does.
- Test: ``test_finding_k4_archive_show_names_where_rtcp_goes``.

Fixed (stop 42), K4: ``e2m archive show`` prints ``rtcp ADDRESS:PORT`` after a stream
that has one.
"""

from __future__ import annotations

import json

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, invite, known_proxy, proxy_engine, ua_engine
from e2m_plugins.cli import main as e2m_main
from e2m_plugins.testpki import TestPKI, init_test_pki
from kamailio_app.archive import Archive
from kamailio_app.bootstrap import body_records, media_log_lines, media_records

SDP_VIEW = ("INVITE:application/sdp",)
SDP = SRTP_OFFER.replace(b"49170", b"4000") + b"a=rtcp:4003 IN IP4 127.0.0.9\r\n"


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


@pytest.fixture
def archived(pki, tmp_path):
    alice = ua_engine(pki, "alice", peers=("bob",), proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    wire = alice.protect(invite(pki, SDP)).message
    verdict = proxy_engine(pki, TRUSTED, view=SDP_VIEW).inspect(wire)
    assert verdict.action == "forward" and verdict.seen, verdict
    db = tmp_path / "archive.sqlite"
    Archive(db).record(body_records(wire, verdict.seen), media_records(wire, verdict.media))
    return db, media_log_lines(wire, verdict.media)


def _show(db, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert e2m_main(["archive", "show", "1", "--db", str(db), *extra]) == 0
    return capsys.readouterr().out


def test_finding_k4_archive_show_names_where_rtcp_goes(archived, capsys):
    db, _ = archived
    shown = _show(db, capsys)
    print(shown)
    (line,) = [l for l in shown.splitlines() if l.startswith("media")]
    assert line.startswith("media         INVITE request audio 127.0.0.1:4000 RTP/SAVP")
    assert "127.0.0.9" in line and "4003" in line, line


def test_control_k4_json_and_log_line_name_the_rtcp_address(archived, capsys):
    db, log = archived
    shown = json.loads(_show(db, capsys, "--json"))
    assert [(m["rtcp_address"], m["rtcp_port"]) for m in shown["media"]] == [("127.0.0.9", 4003)]
    assert log == ["e2m media: INVITE request audio 127.0.0.1:4000 RTP/SAVP sendrecv "
                   "rtcp 127.0.0.9:4003"]
