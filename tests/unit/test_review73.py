"""A seventy-third attacker's review (December 2026) of 06451c8: secure defaults and what an
operator actually deploys (the example configs, the launcher's checks, the files the
proxy and the phone read and write, the archive CLI).

The attacker of these holes is the one the brief adds to the four: a local user of the
proxy's or the phone's machine who is not the operator (a shell account, a service
running as another user, a backup reader), who reads what the file modes let him read.
Each hole ends in the four attackers' goals: a body read by someone not chosen, or an
identity forged.

Hole 1 (``test_hole_a_world_readable_proxy_key_is_taken``,
``test_hole_a_world_readable_phone_key_is_taken``): the private key of ``[identity] key``
(the proxy's: every body a UA sealed for the domain, the key cache's seal key and the
digest nonce secret are derived from it; the phone's: every body sealed for the user and
every signature in her name) is loaded whatever its mode.  A key written 0644 (``openssl
genpkey`` under umask 022, ``cp`` from a tarball, a config-management template) is taken
silently, while the phone refuses a digest ``password_file`` of mode 0644
(``pjsua_hooks/credentials.py``) and the archive refuses an archive file others may read
(``archive._check_private_file``): the secret that matters more is the one not checked.
The local user copies the key: he then opens every body sealed for the proxy or the user
(captured on any hop), and signs as the user.  At fault: ``e2m_plugins/config.py``
``load_proxy_config`` and ``load_ua_config`` (``reader.load("[identity].key", ...,
load_private_key)``; ``certfiles._read`` is ``Path.read_bytes``).  Fix: read
``[identity] key`` (and ``[tls] key``) as ``credentials._read_file`` reads the password
file (O_NOFOLLOW, fstat, refuse ``st_mode & 0o077`` with "chmod 600 it").

Hole 2 (``test_hole_a_world_readable_proxy_toml_holding_the_database_password_is_taken``):
the cluster examples (``kamailio_app/examples/cluster-node-*.toml``) put the PostgreSQL
password in PROXY.toml (``[cluster] db_url = "postgres://e2m:CHANGE-ME@..."``, also what
``[auth] db_url`` takes) and PROXY.toml is read whatever its mode: under umask 022 it is
0644.  The launcher keeps the password out of the cfg, out of argv and out of logs
(``pgpass`` 0600, ``masked()``), but the file it came from is readable by every local
user, who then connects as the proxy's role: he reads every archived plaintext, and (the
role made the tables with ``db init``) rewrites or deletes rows unnoticed.  The phone
refuses a ``password`` in UA.toml for this reason (threat model, "Read the digest
password from a shared UA.toml").  At fault: ``kamailio_app/config.py``
``_cluster_settings``/``_auth_settings`` (``PgUrl.parse(raw)`` of the TOML text) with
``load_app_config`` never looking at the file's mode.  Fix: refuse a PROXY.toml holding a
password unless it is ours and ``st_mode & 0o077 == 0``, or take the password only from a
``password_file`` (0600) / ``PGPASSFILE`` as the phone does.

Hole 3 (``test_hole_decrypted_output_into_an_existing_file_keeps_its_mode``):
``write_output(..., private=True)`` (``e2m archive show --out``, ``e2m cms decrypt
--out``, ``e2m sip open --out``) promises "created 0600 from the start: decrypted content
should not become readable by others just because of a loose umask", but opens with
``O_CREAT|O_TRUNC`` and mode 0600, which applies only when the file is new: an existing
0644 file (made by ``touch``, an editor, or an earlier ``--out`` of another tool) keeps
its mode, and the archived plaintext (alice's IM) lands in a file every local user reads.
``testpki._write_private`` has the ``fchmod`` for exactly this case; ``write_output`` has
not.  At fault: ``e2m_plugins/cli/__init__.py`` ``write_output`` (``os.open(path,
O_WRONLY|O_CREAT|O_TRUNC, 0o600)``).  Fix: ``os.fchmod(fd, 0o600)`` before writing (and
O_NOFOLLOW; better, write a new file and rename it over).

Hole 5 (``test_hole_a_users_file_others_can_read_is_used``): ``[auth] users``, the SQLite
subscriber table, holds HA1 = MD5(user:realm:password), which is all a digest response
needs (a password equivalent).  ``ensure_users_db`` makes a new one 0600, but an existing
file is used whatever its mode (``if path.exists(): return False``): a 0644 users file
(copied from a backup, made by ``sqlite3`` or kamdbctl under umask 022) is taken by the
launcher and by ``e2m-proxy users add``, while the archive and the certificate table
refuse such a file.  The local user reads alice's HA1 and registers, calls and publishes
a certificate as alice (identity forged; the home proxy's digest is the only thing that
names a caller without a signature).  At fault: ``kamailio_app/users.py``
``ensure_users_db`` (``if path.exists(): return False``) called from
``launcher.write_runtime_files``.  Fix: check an existing file as
``archive._check_private_file`` does (regular, ours, ``st_mode & 0o077 == 0``) and refuse
with "chmod 600 it".

Controls: the same key at 0600, the same PROXY.toml at 0600, a new ``--out`` file and a
users file the product made are taken (and come out 0600) (the set-up is sound, only the mode decides); the phone's password
file at 0644 is refused (the precedent the holes are measured against).

Tried and held:
- the digest password: never in UA.toml (config error), ``password_file`` 0600 checked;
  ``e2m-proxy users add`` reads it from stdin, stores HA1 only, users.sqlite made 0600;
- the launcher's runtime files (pgpass, nonce secret, tls.cfg) are ``_write_private``
  (unlink, O_EXCL|O_NOFOLLOW, 0600) in a dir checked like StrictModes (review 70); the
  Kamailio cfg carries the users' URL without its password; ``--print-cfg`` masks
  ``scheme://user:password@``; ``PgUrl.__repr__``/``__str__`` and every error use
  ``masked()``;
- the SQLite archive and the certificate table are created 0600 (O_EXCL|O_NOFOLLOW), an
  existing one others may read is refused; ``e2m archive list/show`` escape every stored
  field (review 61) and never print the plaintext unless ``--out`` is given;
- ``e2m pki`` writes keys 0600 with ``fchmod`` for an existing file;
- the phone's pjsua message log sits before the hook (wire form, ciphertext) and is off
  unless ``log_messages``; ``E2M_PHONE_KEY_WITNESS`` writes only SHA-256 of SRTP keys;
- the example configs: home-proxy.toml has ``[auth]``, ``[limits]`` and TLS 1.2+; the
  ``[tls] ca`` that also issues user certificates is review 67's known limit.

Fixed (stop 32): ``e2m_plugins.privatefiles`` (one place) refuses a file that is not
a regular file of ours that only we may read, opened without following a symlink;
used for ``[identity] key`` (proxy and phone, ``certfiles.load_private_key_file``),
``[tls] key``, a PROXY.toml that holds a database password (``load_app_config``)
and an existing ``[auth] users`` file (``ensure_users_db``).  ``cli.write_output``
writes decrypted ``--out`` content to a new 0600 file renamed over the path.  The
harness writes its PROXY.toml files 0600 (``tomlfile.write_toml``).  All four holes
turned XPASS; the markers are gone.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from e2m_plugins.config import ConfigError, load_proxy_config, load_ua_config
from e2m_plugins.testpki import TestPKI
from tests.unit.test_config import PROXY_TOML, UA

PROXY = "proxy.example.com"

@pytest.fixture
def confdir(pki: TestPKI, tmp_path: Path) -> Path:
    """The session PKI's files copied next to the configs (keys 0600, as written)."""
    for name in ("ca.crt", "alice.crt", "alice.key", "bob.crt",
                 f"proxy-{PROXY}.crt", f"proxy-{PROXY}.key"):
        shutil.copy(pki.directory / name, tmp_path / name)
    for name in ("alice.key", f"proxy-{PROXY}.key"):
        (tmp_path / name).chmod(0o600)
    (tmp_path / "UA.toml").write_text(UA)
    (tmp_path / "PROXY.toml").write_text(PROXY_TOML)
    return tmp_path


def _refused(load, path: Path) -> str | None:
    """The refusal's text, or None when the config was taken."""
    try:
        load(path)
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


# -- hole 1: a private key others can read ------------------------------------------

def test_control_a_private_key_of_mode_0600_is_taken(confdir: Path):
    assert stat.S_IMODE((confdir / f"proxy-{PROXY}.key").stat().st_mode) == 0o600
    assert load_proxy_config(confdir / "PROXY.toml").host == PROXY
    assert load_ua_config(confdir / "UA.toml").aor == "sip:alice@example.com"


def test_control_the_phone_refuses_a_password_file_others_can_read(tmp_path: Path):
    """The precedent: the phone's digest password file at 0644 is refused."""
    from pjsua_hooks.credentials import PasswordError, read_password
    secret = tmp_path / "alice.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    with pytest.raises(PasswordError, match="chmod 600"):
        read_password(str(secret), environ={})
    secret.chmod(0o600)
    assert read_password(str(secret), environ={}) == "s3cret"


def test_hole_a_world_readable_proxy_key_is_taken(confdir: Path):
    (confdir / f"proxy-{PROXY}.key").chmod(0o644)
    refusal = _refused(load_proxy_config, confdir / "PROXY.toml")
    assert refusal is not None and "[identity].key" in refusal, (
        "the proxy's private key, readable by every local user, was taken without a word")


def test_hole_a_world_readable_phone_key_is_taken(confdir: Path):
    (confdir / "alice.key").chmod(0o644)
    refusal = _refused(load_ua_config, confdir / "UA.toml")
    assert refusal is not None and "[identity].key" in refusal, (
        "alice's private key, readable by every local user, was taken (her 0644 password "
        "file would have been refused)")


# -- hole 2: PROXY.toml with the database password, readable by all ---------------

def _cluster_toml(tmp_path: Path, pki: TestPKI, mode: int) -> Path:
    from e2m_lab.kamailio_harness import write_proxy_config
    path = write_proxy_config(tmp_path / "node", 5070, pki=pki, e2m=True, auth=True,
                              db_url="postgres://e2m:CHANGE-ME@127.0.0.1:5432/e2m")
    path.chmod(mode)
    return path


def test_control_a_private_proxy_toml_with_the_database_password_is_taken(tmp_path: Path,
                                                                         pki: TestPKI):
    from kamailio_app.config import load_app_config
    config = load_app_config(_cluster_toml(tmp_path, pki, 0o600))
    assert config.cluster is not None and config.cluster.db.password == "CHANGE-ME"
    # the password stays out of what the launcher shows and renders
    assert "CHANGE-ME" not in config.cluster.db.masked()
    assert config.auth is not None and "CHANGE-ME" not in config.auth.db_url


def test_hole_a_world_readable_proxy_toml_holding_the_database_password_is_taken(
        tmp_path: Path, pki: TestPKI):
    from kamailio_app.config import load_app_config
    path = _cluster_toml(tmp_path, pki, 0o644)
    assert "CHANGE-ME" in path.read_text()            # what every local user reads
    refusal = _refused(load_app_config, path)
    assert refusal is not None, (
        "PROXY.toml holds the PostgreSQL password and is mode 0644: taken without a word")


# -- hole 3: decrypted output into an existing file keeps its mode ------------------

def _archive_with_one_body(tmp_path: Path) -> Path:
    from kamailio_app.archive import BodyRecord, SqliteArchive
    db = tmp_path / "archive.sqlite"
    archive = SqliteArchive(db)
    text = b"alice to bob: the merger closes on Friday"
    import hashlib
    archive.record([BodyRecord(call_id="c1@a", from_uri="sip:alice@example.com",
                               to_uri="sip:bob@example.com", method="MESSAGE",
                               direction="request", content_type="text/plain",
                               plaintext=text, sha256=hashlib.sha256(text).hexdigest(),
                               signature="verified", signer="sip:alice@example.com")])
    archive.close()
    return db


def _show(db: Path, out: Path) -> int:
    from e2m_plugins.cli import main
    return main(["archive", "show", "1", "--db", str(db), "--out", str(out)])


def test_control_archive_show_out_makes_a_new_file_0600(tmp_path: Path, capsys):
    db = _archive_with_one_body(tmp_path)
    out = tmp_path / "msg.txt"
    assert _show(db, out) == 0
    assert out.read_bytes().startswith(b"alice to bob")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_hole_decrypted_output_into_an_existing_file_keeps_its_mode(tmp_path: Path, capsys):
    db = _archive_with_one_body(tmp_path)
    out = tmp_path / "msg.txt"
    out.write_text("")
    out.chmod(0o644)                                  # touch under umask 022
    assert _show(db, out) == 0
    assert out.read_bytes().startswith(b"alice to bob")
    mode = stat.S_IMODE(out.stat().st_mode)
    assert not mode & 0o077, f"the plaintext is in a file of mode {mode:04o}"


# -- hole 5: the users file (HA1) others can read -------------------------------------

def _auth_config(tmp_path: Path, pki: TestPKI):
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.config import load_app_config
    path = write_proxy_config(tmp_path / "home", 5070, pki=pki, e2m=False, auth=True,
                              users={"alice": "alice-secret"})
    return load_app_config(path)


def test_control_a_users_file_made_by_the_product_is_0600_and_used(tmp_path: Path,
                                                                  pki: TestPKI):
    from kamailio_app.launcher import write_runtime_files
    config = _auth_config(tmp_path, pki)
    users = config.auth.users
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    write_runtime_files(config, run)                   # taken: ours, 0600
    from kamailio_app.launcher import AUTH_SECRET_FILE
    assert stat.S_IMODE((run / AUTH_SECRET_FILE).stat().st_mode) == 0o600


def test_hole_a_users_file_others_can_read_is_used(tmp_path: Path, pki: TestPKI):
    import sqlite3
    from kamailio_app.launcher import write_runtime_files
    from kamailio_app.users import UsersError
    config = _auth_config(tmp_path, pki)
    users = config.auth.users
    users.chmod(0o644)                                 # restored from a backup, umask 022
    with sqlite3.connect(users) as db:                 # what every local user reads
        (ha1,) = db.execute("SELECT ha1 FROM subscriber WHERE username = 'alice'").fetchone()
    assert len(ha1) == 32
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    try:
        write_runtime_files(config, run)
    except UsersError:
        return                                         # secure: refused
    pytest.fail(f"the users file is mode 0644 (alice's HA1 {ha1[:6]}... readable by all) "
                "and the launcher used it")
