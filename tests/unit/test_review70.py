"""A seventieth attacker's review (December 2026) of cdfc7a2: today's fixes, attacked; here
the launcher's private runtime dir (``launcher._check_private``, stop 32).

The attacker of these holes is the one the threat model's stop-32 row names: a local
user of the proxy's machine (outside the four attackers, but it ends in theirs: whoever
writes the cfg Kamailio loads, or ``trusted.list``, makes himself a ``[limits] trusted``
peer whose P-Asserted-Identity is kept, or loads code of his own).

Hole 2 (``test_hole_a_file_planted_before_the_chmod_keeps_its_owner``): the check reads
the dir's own mode and owner only.  The dir the check refused (systemd's
``RuntimeDirectory``, or a shared 0777/1777 dir a script made) was open when the local
user planted ``kamailio.cfg`` (his own file, mode 0666) and kept it open (O_RDWR); the
admin then does what the error says (``chmod 700``).  The check passes, and the launcher
writes the cfg with ``Path.write_text`` into the existing file: it stays the local
user's, and his descriptor reads the whole cfg (database URL with its password, the
secret file's path) and can rewrite it before Kamailio reads it.  (The secrets go through
``_write_private``: unlink, O_EXCL|O_NOFOLLOW; ``kamailio.cfg``, ``tls.cfg``,
``trusted.list``, ``ds.list`` and the CA bundle do not, and a planted symlink there makes
the launcher, often root, write through it.)  At fault: ``kamailio_app/launcher.py``
``main`` (``cfg_path.write_text(render_cfg(...))``) and ``write_runtime_files``
(``write_text``/``write_bytes``), with ``_check_private`` not looking inside.  Fix:
write every runtime file as ``_write_private`` does (unlink, then O_CREAT|O_EXCL|
O_NOFOLLOW, 0600), or refuse a runtime dir holding any entry not ours.

Hole 3 (``test_hole_a_parent_others_can_write_lets_the_dir_be_swapped``): the check
does not look at the parents.  Under a parent the local user may write (0777 without
the sticky bit; a group-writable ``/srv/e2m``), he renames the checked dir away between
the check and the writes (or at any later time: the FIFO and the ctl socket are found by
path) and plants one of his own: the cfg is written into his dir.  (Here the race is
won for him: the swap runs right after ``_check_private``.)  At fault:
``kamailio_app/launcher.py`` ``_check_private`` (``path.stat()`` of the dir alone).  Fix:
also refuse when any parent up to ``/`` is writable by others without the sticky bit, or
is owned by someone other than us or root (as OpenSSH's ``StrictModes`` does), and open
the dir once (O_DIRECTORY|O_NOFOLLOW) and create the files relative to that descriptor.

Controls: a fresh 0700 dir under a private parent is taken and the cfg written there is
ours; a 0755 dir is refused (stop 32 holds).

Tried and held (other targets of review 70, read and not found wanting in the time):
- a symlink given as ``--runtime-dir``: ``resolve()`` follows it and the target is
  checked; a symlink planted in place of a secret file: ``_write_private`` unlinks it;
- ``_keeper``'s case (item 6): the caller ``answer_share`` and the key quotas name is
  the digest-proved From user as written, and auth_check's flag 1 holds that user to
  the credentials with its case (run: ``tests/kamailio/test_review70_wire.py``
  ``test_control_held_no_account_writes_as_another_case``), so one account cannot
  write as many spellings nor as another-cased account.

Fixed (stop 32): ``launcher._check_private`` refuses a runtime dir holding anything
another user owns and one under a parent others may write (no sticky bit) or owned by
anyone but us or root; every runtime file is written anew (``_write_private``:
unlink, ``O_EXCL|O_NOFOLLOW``, 0600).  Hole 2's assertion now also takes the refusal
as secure (exit 2, his descriptor read nothing); a test of the fix's second half (a
file planted after the check is replaced, not written into) is added.  Both holes
turned XPASS; the markers are gone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2m_plugins.testpki import TestPKI

_NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _config(tmp_path: Path, pki: TestPKI) -> Path:
    from e2m_lab.kamailio_harness import write_proxy_config
    return write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True)


def test_control_a_private_dir_is_taken_and_a_shared_one_refused(tmp_path, pki: TestPKI):
    from kamailio_app.launcher import main
    path = _config(tmp_path, pki)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    assert main(["--config", str(path), "--runtime-dir", str(run), "--print-cfg"]) == 0
    info = (run / "kamailio.cfg").stat()
    assert info.st_uid == os.geteuid()
    shared = tmp_path / "open-run"
    shared.mkdir()
    shared.chmod(0o755)
    assert main(["--config", str(path), "--runtime-dir", str(shared), "--print-cfg"]) == 2


@needs_root
def test_hole_a_file_planted_before_the_chmod_keeps_its_owner(tmp_path, pki: TestPKI):
    from kamailio_app.launcher import main
    path = _config(tmp_path, pki)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)                       # open, as the refused dir was
    planted = run / "kamailio.cfg"
    planted.write_text("")
    os.chown(planted, _NOBODY, _NOBODY)
    planted.chmod(0o666)
    fd = os.open(planted, os.O_RDWR)       # the local user's descriptor
    try:
        run.chmod(0o700)                   # what the error message says to do
        code = main(["--config", str(path), "--runtime-dir", str(run), "--print-cfg"])
        seen = os.pread(fd, 1 << 20, 0)
        owner = (run / "kamailio.cfg").stat().st_uid
        # secure: the dir refused (a file in it is another's), or the cfg written anew
        assert not seen and (code == 2 or owner == os.geteuid()), (
            f"the cfg Kamailio loads is uid {owner}'s; his descriptor read {len(seen)} octets "
            f"of it: {seen[:60]!r}")
    finally:
        os.close(fd)


@needs_root
def test_a_runtime_file_planted_after_the_check_is_replaced_not_written_into(tmp_path,
                                                                            pki: TestPKI):
    """The fix's second half: every runtime file is made anew (unlink, O_EXCL, 0600), so
    one planted after the check (a race) is not the one Kamailio loads."""
    from kamailio_app.config import load_app_config
    from kamailio_app.launcher import write_runtime_files
    from e2m_lab.kamailio_harness import write_proxy_config
    config = load_app_config(write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True,
                                                limits={"trusted": ["127.0.0.9"]}))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    planted = run / "trusted.list"
    planted.write_text("")
    os.chown(planted, _NOBODY, _NOBODY)
    fd = os.open(planted, os.O_RDWR)
    try:
        write_runtime_files(config, run)
        assert os.pread(fd, 4096, 0) == b""
        made = (run / "trusted.list").stat()
        assert made.st_uid == os.geteuid() and made.st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


@needs_root
def test_hole_a_parent_others_can_write_lets_the_dir_be_swapped(tmp_path, pki: TestPKI,
                                                                  monkeypatch):
    from kamailio_app import launcher
    path = _config(tmp_path, pki)
    parent = tmp_path / "srv"
    parent.mkdir()
    parent.chmod(0o777)                    # others may write it (no sticky bit)
    run = parent / "run"
    run.mkdir(mode=0o700)
    check = launcher._check_private

    def check_then_swap(where: Path) -> None:
        check(where)
        # the local user wins the race: rename the checked dir away, plant his own
        where.rename(parent / "away")
        where.mkdir()
        os.chown(where, _NOBODY, _NOBODY)
        where.chmod(0o777)
    monkeypatch.setattr(launcher, "_check_private", check_then_swap)
    rc = launcher.main(["--config", str(path), "--runtime-dir", str(run), "--print-cfg"])
    written = run / "kamailio.cfg"
    assert rc == 2 and not written.exists(), (
        f"rc {rc}: the cfg was written into the local user's dir "
        f"(dir uid {run.stat().st_uid}, mode {run.stat().st_mode & 0o777:o})")
