"""What a test needs beyond Python, said with a marker; skipped, with the reason, where
that is missing.  A pytest plugin, loaded by ``tests/conftest.py`` and ``bench/conftest.py``.

The markers (registered in ``pyproject.toml``) and what each one checks:

- ``kamailio``: the Kamailio that ``e2m-proxy`` runs, i.e. ``kamailio_app.config``'s
  default binary (``/usr/sbin/kamailio``, outside a normal user's PATH) and its
  ``app_python3`` module;
- ``sipp``: ``sipp`` on PATH (``e2m_lab.sipp`` runs it by name);
- ``pjsua2``: the ``pjsua2`` Python module (the phone, ``e2m-phone``);
- ``tcpdump``: a tcpdump that may capture here (root, ``sudo -n`` or cap_net_raw);
- ``openssl``: the ``openssl`` command line tool;
- ``postgres``: Debian's PostgreSQL server binaries (``e2m_lab.postgres`` runs a
  private cluster of them).

A test carries them as a module's ``pytestmark`` or its own decorator; a test that uses
a fixture of ``e2m_lab.pytest_fixtures`` or ``tests/kamailio/conftest.py`` is marked
here as well (``FIXTURE_NEEDS``), so it cannot forget.  Where everything is installed
(CI, ``make setup``) nothing is skipped: a test is skipped only when the check fails.
``make test-unit`` deselects the first three (``-m "not kamailio and not sipp and not
pjsua2"``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

# A test using one of these fixtures needs what they start.
FIXTURE_NEEDS: dict[str, tuple[str, ...]] = {
    "proxy_factory": ("kamailio",),
    "home_proxy": ("kamailio",),
    "visited_proxy": ("kamailio",),
    "sipp": ("sipp",),
    # tests/cluster: a private PostgreSQL
    "postgres": ("postgres",),
    "pg_url": ("postgres",),
    "own_postgres": ("postgres",),
}


def _kamailio_default(name: str) -> str:
    from kamailio_app.config import KamailioSettings

    return next(f.default for f in fields(KamailioSettings) if f.name == name)


def _kamailio() -> str | None:
    binary = _kamailio_default("binary")
    if not os.access(binary, os.X_OK) or os.path.isdir(binary):
        return f"Kamailio is not installed: no {binary} (make setup installs it)"
    module = Path(_kamailio_default("module_path")) / "app_python3.so"
    if not module.exists():
        return f"Kamailio's Python module is not installed: no {module} (kamailio-python3-modules)"
    return None


def _sipp() -> str | None:
    return None if shutil.which("sipp") else "SIPp is not installed: no sipp on PATH (sip-tester)"


def _pjsua2() -> str | None:
    return None if importlib.util.find_spec("pjsua2") else \
        "pjsua2 is not installed: no pjsua2 module in this Python"


def _tcpdump() -> str | None:
    from .capture import tcpdump_command

    return None if tcpdump_command() else \
        "tcpdump is missing or may not capture here (not root, no sudo -n, no cap_net_raw)"


def _openssl() -> str | None:
    return None if shutil.which("openssl") else "openssl is not installed: no openssl on PATH"


def _postgres() -> str | None:
    from .postgres import server_binaries

    return None if server_binaries() else \
        "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb (make setup installs it)"


CHECKS: dict[str, Callable[[], str | None]] = {
    "kamailio": _kamailio, "sipp": _sipp, "pjsua2": _pjsua2, "tcpdump": _tcpdump,
    "postgres": _postgres,
    "openssl": _openssl,
}


@functools.cache
def missing(marker: str) -> str | None:
    """Why what ``marker`` stands for is missing here, or None when it is present."""
    return CHECKS[marker]()


@pytest.hookimpl(tryfirst=True)   # before -m deselects: the fixture marks must count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, markers in FIXTURE_NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    if item.get_closest_marker(marker) is None:
                        item.add_marker(marker)
        reasons = [why for marker in CHECKS
                   if item.get_closest_marker(marker) is not None
                   and (why := missing(marker)) is not None]
        if reasons:
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
