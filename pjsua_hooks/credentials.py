"""The phone's digest password and its TLS settings, checked before pjsua sees them.

The password is never in UA.toml (a file people share and copy): ``[phone]
password_file`` names a file that only its owner may read (mode 0600 or
stricter), relative to the UA.toml's directory, or the environment variable
``E2M_PHONE_PASSWORD`` holds it.  With both, the file wins (it was named on
purpose; the environment may be inherited).  The password is read when the
phone starts, handed to pjsua's ``AuthCredInfo`` and dropped; no message here
or anywhere else quotes it.

With ``transport = "tls"`` every SIP URI the phone sends to (registrar, proxy)
must say so (``sips:`` or ``;transport=tls``): pjsua would otherwise pick a
plain transport for it, or none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from e2m_plugins.privatefiles import PrivateFileError, read_private_file

__all__ = ["PASSWORD_ENV", "MAX_PASSWORD", "PasswordError", "check_credentials",
           "check_tls_uris", "read_password", "tls_uri"]

PASSWORD_ENV = "E2M_PHONE_PASSWORD"
MAX_PASSWORD = 256          # characters; a digest password, not a file to slurp
_REALM = re.compile(r'[\x21\x23-\x5b\x5d-\x7e]{1,255}')
_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,64}")   # RFC 3261 user, no escapes


class PasswordError(ValueError):
    """The password file or variable cannot be used (the message never quotes it)."""


def _clean(text: str, where: str) -> str:
    """One line: a final newline is dropped; nothing else is changed."""
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise PasswordError(f"{where} is empty")
    if len(text) > MAX_PASSWORD:
        raise PasswordError(f"{where} holds more than {MAX_PASSWORD} characters")
    if any(not ch.isprintable() for ch in text):
        raise PasswordError(f"{where} must be one line of printable characters")
    return text


def _read_file(path: Path) -> str:
    where = f"password file {path}"
    try:
        data = read_private_file(path, "password file", 4 * MAX_PASSWORD)
    except FileNotFoundError:
        raise PasswordError(f"{where} cannot be opened: No such file or directory") from None
    except PrivateFileError as exc:
        raise PasswordError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordError(f"{where} is not UTF-8 text") from None
    return _clean(text, where)


def read_password(password_file: str | None,
                  environ: dict[str, str] | None = None) -> str | None:
    """The digest password: from ``password_file`` if set, else from
    ``E2M_PHONE_PASSWORD``; None when neither is given.  Raises PasswordError."""
    if password_file:
        return _read_file(Path(password_file))
    env = os.environ if environ is None else environ
    value = env.get(PASSWORD_ENV)
    if value:
        return _clean(value, f"the environment variable {PASSWORD_ENV}")
    return None


def check_credentials(values: dict[str, Any], config_path: Path) -> list[str]:
    """Problems with ``[phone] password_file`` / ``auth_user`` in ``values`` (the
    parsed table); resolves ``password_file`` against the UA.toml's directory in place."""
    problems: list[str] = []
    name = values.get("password_file")
    if name is not None:
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = config_path.parent / path
        values["password_file"] = str(path)
        try:
            _read_file(path)        # checked now, read again at start
        except PasswordError as exc:
            problems.append(f"[phone].password_file: {exc}")
    user = values.get("auth_user")
    if user is not None and not _USER.fullmatch(user):
        problems.append("[phone].auth_user must be a SIP user name (1-64 characters, "
                        "no spaces, quotes or '@')")
    realm = values.get("auth_realm")
    if realm is not None and not _REALM.fullmatch(realm):
        problems.append("[phone].auth_realm must be the home proxy's realm (1-255 visible "
                        "characters, no quotes or backslashes)")
    return problems


def tls_uri(uri: str) -> bool:
    """Whether pjsua sends to ``uri`` over TLS (``sips:`` or ``;transport=tls``)."""
    lower = uri.strip().lower()
    return lower.startswith("sips:") or bool(re.search(r";\s*transport\s*=\s*tls\b", lower))


def check_tls_uris(values: dict[str, Any]) -> list[str]:
    """With ``transport = "tls"``: the registrar and proxy URIs must name TLS."""
    if values.get("transport") != "tls":
        return []
    return [f"[phone].{key} must be a sips: URI or carry ;transport=tls when "
            f"[phone].transport is \"tls\" (it is {values[key]!r})"
            for key in ("registrar", "proxy") if values.get(key) and not tls_uri(values[key])]
