"""Files that only their owner may read: private keys, passwords, user databases.

Such a file is opened without following a symlink (the mode checked is the mode of the
file read) and refused when it is not a regular file, belongs to another user, or is
open to group or others, as OpenSSH refuses a key file: what anyone on the machine may
read is no longer a secret (review 73: a 0644 proxy key opened every body sealed for
the proxy, and the key cache's seal key and the digest nonce secret derive from it).
A file root owns is also taken when only its group may read it besides root (mode 0640
at most: ``root:kamailio``, how Debian hands daemons their keys), as PostgreSQL takes
its server key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import E2MError

__all__ = ["PrivateFileError", "check_private_file", "read_private_file"]


class PrivateFileError(E2MError, ValueError):
    """A file that must be its owner's alone is not (or cannot be read)."""


_ACL = "system.posix_acl_access"


def _has_acl(target: int | str | Path) -> bool:
    """Whether the file carries a POSIX access ACL: with one, the group bits of its mode
    are only the ACL's mask, and users the mode never names may read it.  A file system
    without extended attributes holds none."""
    try:
        if isinstance(target, int):
            os.getxattr(target, _ACL)
        else:
            os.getxattr(target, _ACL, follow_symlinks=False)
    except OSError:
        return False
    return True


def _check(info: os.stat_result, where: str, target: int | str | Path) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise PrivateFileError(f"{where} is not a regular file (a symlink?)")
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.geteuid():
        if mode & 0o077:
            raise PrivateFileError(f"{where} may be read or written by others "
                                   f"(mode {mode:04o}); chmod 600 it")
    elif info.st_uid == 0:
        # root's file that the daemon's group reads (root:kamailio 0640), as PostgreSQL
        # takes its server key: only root may change it, and nobody else read it
        if mode & 0o037:
            raise PrivateFileError(f"{where} is root's and may be read or written by "
                                   f"others than its group (mode {mode:04o}); chmod 0640 "
                                   "it, or make it ours with mode 0600")
        if _has_acl(target):
            # 0640 on paper, while the ACL names other readers (review 95)
            raise PrivateFileError(f"{where} is root's and carries an access ACL; remove "
                                   "it (setfacl -b) and chmod 0640 it")
    else:
        raise PrivateFileError(f"{where} belongs to another user (uid {info.st_uid})")


def check_private_file(path: str | Path, what: str = "file") -> None:
    """Refuse ``path`` unless it is a regular file of ours that only we may read."""
    where = f"{what} {path}"
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise PrivateFileError(f"{where} cannot be read: {exc.strerror}") from None
    _check(info, where, path)


def read_private_file(path: str | Path, what: str = "file", max_size: int = 1 << 20) -> bytes:
    """The bytes of ``path``, checked as ``check_private_file`` says on the very file
    opened; at most ``max_size`` bytes (a larger one is refused)."""
    where = f"{what} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PrivateFileError(f"{where} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _check(info, where, fd)
        if info.st_size > max_size:
            raise PrivateFileError(f"{where} is larger than {max_size} bytes")
        chunks, left = [], max_size + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise PrivateFileError(f"{where} is larger than {max_size} bytes")
    return data
