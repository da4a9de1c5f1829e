"""PROXY.toml validation, cfg rendering, and the archive with its ``e2m archive`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive import Archive, BodyRecord, MediaRecord
from kamailio_app.archive_schema import ARCHIVE_VERSION
from kamailio_app.config import AppConfigError, load_app_config
from kamailio_app.launcher import render_cfg

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "PROXY.toml"
    path.write_text(text)
    return path


def test_a_good_config_and_its_defaults(tmp_path):
    path = _write(tmp_path, '[kamailio]\nlisten = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]\n'
                            'next_hop = "sip:127.0.0.1:5080"\n[archive]\npath = "a.sqlite"\n')
    config = load_app_config(path)
    assert config.e2m.enabled is True
    assert config.kamailio.workers == 4 and config.kamailio.shm_mb == 256
    assert config.kamailio.pkg_mb == 16
    assert str(config.kamailio.http_listener) == "tcp:127.0.0.1:5070"
    assert config.archive.path == tmp_path / "a.sqlite"          # relative to the file
    assert config.archive.fail_request_on_error is False


def test_every_mistake_is_listed_at_once(tmp_path):
    path = _write(tmp_path, '[kamailio]\nlisten = ["sctp:127.0.0.1:1", "udp:example.com:5070", '
                            '"udp:127.0.0.1:99999"]\nworkers = 0\nwokers = 3\n'
                            'next_hop = "http://x"\nlog_level = "loud"\n'
                            '[archive]\npath = "no/such/dir/a.sqlite"\nfail_request_on_error = "yes"\n'
                            '[e2m]\nenabled = 1\n')
    with pytest.raises(AppConfigError) as caught:
        load_app_config(path)
    problems = caught.value.problems
    assert len(problems) == 10, problems
    text = str(caught.value)
    for word in ("protocol", "IP address", "port out of range", "workers", "wokers",
                 "next_hop", "log_level", "does not exist", "fail_request_on_error", "enabled"):
        assert word in text


def test_missing_section_and_bad_toml(tmp_path):
    with pytest.raises(AppConfigError, match="section is missing"):
        load_app_config(_write(tmp_path, "[e2m]\nenabled = false\n"))
    with pytest.raises(AppConfigError, match="not valid TOML"):
        load_app_config(_write(tmp_path, "[kamailio\n"))


@pytest.mark.kamailio   # kamailio -c
def test_rendered_cfg_is_complete_and_private_to_its_runtime_dir(tmp_path):
    path = _write(tmp_path, '[kamailio]\nlisten = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]\n'
                            'domains = ["example.com"]\n[e2m]\nenabled = false\n')
    text = render_cfg(load_app_config(path), tmp_path / "run")
    assert "@@" not in text
    assert "listen=udp:127.0.0.1:5070\nlisten=tcp:127.0.0.1:5070" in text
    assert "alias=example.com" in text
    assert f'"unix:{tmp_path}/run/kamailio_ctl"' in text
    assert "#!define WITH_HTTP" not in text          # a plain hop publishes no certificate
    checked = subprocess.run(["/usr/sbin/kamailio", "-c", "-f", "/dev/stdin"], input=text.encode(),
                             capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode()[-1500:]


def test_kemi_script_replaces_the_shipped_one_and_must_exist(tmp_path):
    listen = '[kamailio]\nlisten = ["udp:127.0.0.1:5070"]\n'
    default = render_cfg(load_app_config(_write(tmp_path, listen)), tmp_path / "run")
    assert f'"{ROOT / "kamailio_app" / "kemi.py"}"' in default
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "routing.py").write_text("# a site's own script\n")
    config = load_app_config(_write(tmp_path, listen + 'kemi_script = "site/routing.py"\n'))
    assert config.kamailio.kemi_script == tmp_path / "site" / "routing.py"   # relative to the file
    assert f'"{tmp_path / "site" / "routing.py"}"' in render_cfg(config, tmp_path / "run")
    for bad in ("site/missing.py", "site"):
        with pytest.raises(AppConfigError, match="kemi_script"):
            load_app_config(_write(tmp_path, listen + f'kemi_script = "{bad}"\n'))


def test_launcher_refuses_a_bad_config_with_exit_2(tmp_path):
    path = _write(tmp_path, '[kamailio]\nlisten = []\n[e2m]\nenabled = true\n')
    done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "listen" in done.stderr


def test_launcher_lists_the_core_sections_mistakes_when_e2m_is_on(tmp_path):
    path = _write(tmp_path, '[kamailio]\nlisten = ["udp:127.0.0.1:5070"]\n[identity]\nhost = "p"\n')
    done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "[identity]" in done.stderr and "[trust]" in done.stderr


def _records() -> tuple[list[BodyRecord], list[MediaRecord]]:
    body = BodyRecord(call_id="c1@x", from_uri="sip:alice@example.com", to_uri="sip:bob@example.com",
                      method="MESSAGE", direction="request", content_type="text/plain",
                      plaintext=b"secret words", sha256="00" * 32, signature="valid",
                      signer="sip:alice@example.com", cid="1@x")
    media = MediaRecord(call_id="c1@x", method="INVITE", direction="response", media="audio",
                        address="127.0.0.1", port=4000, port_count=1, proto="RTP/AVP",
                        codecs="0 PCMU/8000", flow="sendrecv")
    return [body], [media]


def test_archive_round_trip_and_wal(tmp_path):
    archive = Archive(tmp_path / "a.sqlite")
    bodies, media = _records()
    archive.record(bodies, media)
    archive.record(bodies)
    (first, second) = archive.bodies()
    assert first.plaintext == b"secret words" and second.id == first.id + 1
    assert "secret" not in repr(first) and "secret" not in repr(bodies[0])
    assert archive.media("c1@x")[0]["port"] == 4000
    mode = archive._connect().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "a.sqlite").stat().st_mode & 0o077 == 0      # it holds plaintext


def test_copies_of_one_message_share_a_uid_and_are_stored_once(tmp_path):
    """content_uid: the same identity and records (the time aside) give the same uid,
    and the archive keeps that message once; anything the archive shows that differs
    gives another uid."""
    from dataclasses import replace
    from kamailio_app.archive import content_uid
    bodies, media = _records()
    identity = ("c1@x", "a1", "b1", 2, "INVITE", 200)
    uid = content_uid(identity, bodies, media)
    later = [replace(bodies[0], time=12345.0)]
    assert content_uid(identity, later, media) == uid
    others = [
        content_uid(("c1@x", "a1", "b1", 3, "INVITE", 200), bodies, media),    # another CSeq
        content_uid(("c1@x", "a1", "b2", 2, "INVITE", 200), bodies, media),    # another fork
        content_uid(identity, [replace(bodies[0], signature="none")], media),
        content_uid(identity, [replace(bodies[0], signer="sip:carol@example.com")], media),
        content_uid(identity, [replace(bodies[0], sha256="11" * 32)], media),
        content_uid(identity, bodies, []),
        content_uid(identity, bodies + bodies, media),
        content_uid(identity, bodies, [replace(media[0], port=4002)]),
    ]
    assert uid not in others and len(set(others)) == len(others)
    archive = Archive(tmp_path / "a.sqlite")
    for copy in (bodies, later, bodies):
        assert archive.record(copy, media, uid=content_uid(identity, copy, media)) == uid
    assert len(archive.bodies()) == 1 and len(archive.media()) == 1
    archive.record(bodies, media, uid=others[0])
    assert len(archive.bodies()) == 2


def test_a_migration_committed_between_two_reads_is_never_taken_for_version_1(tmp_path):
    """Three nodes ran ``db init`` at once: one read "no schema_version table", another
    node's migration committed, then it read "bodies is there", i.e. version 1, and
    stopped with "run db upgrade" (seen twice in the PostgreSQL test).  Here the other
    node's commit lands right after the first statement."""
    import sqlite3
    from kamailio_app.archive_schema import migrate, read_version
    path = tmp_path / "race.sqlite"
    other = sqlite3.connect(path, isolation_level=None)

    class CommitAfterFirstRead:
        def __init__(self) -> None:
            self.conn = sqlite3.connect(path, isolation_level=None)
            self.reads = 0

        def execute(self, sql: str, args: tuple = ()):
            result = self.conn.execute(sql, args)
            rows = result.fetchall()
            self.reads += 1
            if self.reads == 1:
                migrate(other, "sqlite")          # another node, in between
            return _Rows(rows)

    class _Rows:
        def __init__(self, rows: list) -> None:
            self.rows = rows

        def fetchone(self):
            return self.rows[0] if self.rows else None

    found = read_version(CommitAfterFirstRead(), "sqlite")
    assert found in (0, ARCHIVE_VERSION)
    assert read_version(other, "sqlite") == ARCHIVE_VERSION


def test_archive_command_lists_without_text_and_shows_to_out(tmp_path, capsys):
    db = tmp_path / "a.sqlite"
    Archive(db).record(*_records())
    assert e2m_main(["archive", "list", "--db", str(db)]) == 0
    listed = capsys.readouterr().out
    assert "MESSAGE" in listed and "secret" not in listed
    assert e2m_main(["archive", "show", "1", "--db", str(db), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["signature"] == "valid" and shown["media"][0]["address"] == "127.0.0.1"
    assert "plaintext" not in shown
    out = tmp_path / "text"
    assert e2m_main(["archive", "show", "1", "--db", str(db), "--out", str(out)]) == 0
    assert out.read_bytes() == b"secret words"
    assert e2m_main(["archive", "show", "9", "--db", str(db)]) == 1
    assert e2m_main(["archive", "list"]) == 2
    capsys.readouterr()
    config = tmp_path / "PROXY.toml"
    config.write_text('[kamailio]\nlisten = ["udp:127.0.0.1:5070"]\n[archive]\npath = "a.sqlite"\n')
    assert e2m_main(["archive", "list", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["length"] == len(b"secret words")


@pytest.mark.kamailio   # the launcher's --check runs kamailio -c
@pytest.mark.parametrize("name", ["home-proxy.toml", "visited-proxy.toml"])
def test_example_configs_are_valid(name, pki, tmp_path):
    """The examples in kamailio_app/examples pass the launcher's checks and kamailio -c."""
    examples = ROOT / "kamailio_app" / "examples"
    for item in examples.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    for host in ("proxy.example.com", "visited.example.com"):   # the examples' TLS certificates
        pki.tls_server(host)
    (tmp_path / "pki").symlink_to(pki.directory)
    done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config",
                           str(tmp_path / name), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-1500:]


def test_archive_row_names_the_sender_of_each_body():
    """A request's body comes from its From; a response's from the responder (whom the
    request was sent to).  Naming alice as the sender of bob's SDP answer would put
    words in her mouth."""
    from e2m_plugins.proxy import SeenBody
    from e2m_plugins.sip import make_request, make_response
    from kamailio_app.bootstrap import body_records

    invite = make_request("INVITE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                          to_uri="sip:bob@example.com")
    answer = make_response(invite, 200, "OK").replace("To", "<sip:bob@example.com>;tag=b1")
    seen = (SeenBody(cid=None, content_type="application/sdp", plaintext=b"v=0\r\n",
                     encrypted=True, signature="none", signer=None),)
    (offer_row,) = body_records(invite, seen)
    # kemi passes whom the request was sent to (reviews 32, 33); without it (a stray
    # reply) an unsigned answer names nobody
    (answer_row,) = body_records(answer, seen, responder=invite.request_uri)
    (stray_row,) = body_records(answer, seen)
    assert (offer_row.from_uri, offer_row.to_uri) == ("sip:alice@example.com", "sip:bob@example.com")
    assert (answer_row.from_uri, answer_row.to_uri) == ("sip:bob@example.com", "sip:alice@example.com")
    assert (stray_row.from_uri, stray_row.to_uri) == (None, "sip:alice@example.com")


def test_the_archive_is_never_written_through_a_symlink_or_for_others_to_read(tmp_path):
    """Whoever can write to the archive's folder must not be able to make the proxy
    write plaintext into a file of their choosing or one others can read."""
    import os
    import stat

    from kamailio_app.archive import ArchiveError
    body = BodyRecord(call_id="c@x", from_uri="sip:alice@example.com", to_uri="sip:bob@example.com",
                      method="MESSAGE", direction="request", content_type="text/plain",
                      plaintext=b"secret", sha256="0" * 64, signature="valid")
    # a symlink planted where the archive goes (dangling, and to an existing file)
    planted = tmp_path / "elsewhere.sqlite"
    for make_target in (False, True):
        link = tmp_path / f"link-{make_target}.sqlite"
        if make_target:
            planted.write_bytes(b"")
        link.symlink_to(planted)
        with pytest.raises(ArchiveError):
            Archive(link).record([body])
        assert not planted.exists() or planted.read_bytes() == b""
    # a file others can read is refused, not used
    loose = tmp_path / "loose.sqlite"
    loose.write_bytes(b"")
    loose.chmod(0o644)
    with pytest.raises(ArchiveError):
        Archive(loose).record([body])
    # a new archive is created for its owner only
    fresh = tmp_path / "fresh.sqlite"
    Archive(fresh).record([body])
    assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o600
