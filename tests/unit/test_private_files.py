"""Files only their owner may read (``e2m_plugins.privatefiles``): what is refused, and
the one shared arrangement Debian daemons use that is taken, as PostgreSQL takes it for
its server key: a file root owns, that its group may read and nobody else."""

from __future__ import annotations

import os

import pytest

from e2m_plugins import privatefiles
from e2m_plugins.privatefiles import PrivateFileError, check_private_file, read_private_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of other owners")


def _file(tmp_path, mode, uid=0):
    path = tmp_path / "proxy.key"
    path.write_bytes(b"secret")
    os.chown(path, uid, 0)
    path.chmod(mode)
    return path


@pytest.fixture
def as_kamailio(monkeypatch):
    # the proxy runs as an unprivileged user (uid 1000 here); the test, as root, makes
    # the files it is handed
    monkeypatch.setattr(privatefiles.os, "geteuid", lambda: 1000)


def test_a_root_owned_key_its_group_may_read_is_taken(tmp_path, as_kamailio):
    path = _file(tmp_path, 0o640)
    assert read_private_file(path, "key") == b"secret"
    check_private_file(path, "key")


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o641, 0o642, 0o670])
def test_a_root_owned_key_others_or_its_group_may_change_or_read_is_refused(
        tmp_path, as_kamailio, mode):
    path = _file(tmp_path, mode)
    with pytest.raises(PrivateFileError, match="0640"):
        read_private_file(path, "key")
    with pytest.raises(PrivateFileError):
        check_private_file(path, "key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_our_own_key_stays_ours_alone(tmp_path, as_kamailio, mode):
    path = _file(tmp_path, mode, uid=1000)
    with pytest.raises(PrivateFileError, match="chmod 600"):
        read_private_file(path, "key")
    assert read_private_file(_file(tmp_path, 0o600, uid=1000), "key") == b"secret"


def test_another_users_key_is_refused_whatever_its_mode(tmp_path, as_kamailio):
    for mode in (0o600, 0o640):
        with pytest.raises(PrivateFileError, match="another user"):
            read_private_file(_file(tmp_path, mode, uid=1234), "key")
