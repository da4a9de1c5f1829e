"""Fixtures for tests against a real Kamailio (started with ``e2m-proxy``) and real SIPp.

Everything runs on 127.0.0.1 on free ports (never 5060); every process a test starts
is stopped in teardown, also when the test fails.  When a test fails, the report
shows the SIP exchange (SIPp traces and the raw UAS's log, bodies replaced by their
length and sha256) and the Kamailio log lines written during the test.

Fixture API (for flow tests written elsewhere; import helpers from this module
with ``from e2m_lab.kamailio_harness import ...`` or use the fixtures):

``proxy_factory(name, *, e2m=True, next_hop=None, view=..., verify=..., archive=True,
                fail_request_on_error=False, workers=2, extra=None) -> ProxyHandle``
    Writes ``<tmp>/<name>/PROXY.toml`` and starts ``e2m-proxy`` on a free port (UDP and
    TCP share the number); returns once the proxy answers OPTIONS.  Stopped at teardown.
    ``e2m=True`` needs the session ``pki`` fixture's proxy credential for
    ``proxy.example.com`` (RSA).  ``extra`` is a dict of TOML sections merged in, e.g.
    ``{"policy": {"verify": ["MESSAGE:*"]}}``.  Issue 14: ``auth=True`` (or a dict of
    ``[auth]`` keys) with ``users={name: password}``; ``tls=True`` (a ``tls:`` listener on
    ``.tls_port``, the session PKI's TLS certificate; a dict adds ``[tls]`` keys);
    ``limits={...}`` (``[limits]`` keys).  Without ``auth`` the registrar is open; the
    flood limits are on but never apply to 127.0.0.1, the proxy's own address.

``home_proxy`` / ``visited_proxy`` (module scope)
    The trusted E2M proxy (view MESSAGE:text/plain and INVITE:application/sdp, SQLite
    archive) and an untrusted plain routing hop whose next_hop is the home proxy.

``ProxyHandle``: ``.port``, ``.uri`` (sip:127.0.0.1:port), ``.cert_url``,
    ``.archive_path``, ``.log_path``, ``.log_since(mark)``, ``.log_mark()``,
    ``.wait_log(text)``, ``.options()`` (raw OPTIONS, returns the response), ``.shm()``,
    ``.add_user(name, password)``, ``.tls_port``, ``.stop()``.

``SipUa(port, transport=, source=, user=, password=)``: a UA over UDP, TCP or TLS from
    any loopback address that answers 401/407 with digest (``register``, ``message``,
    ``call``, ``request``, ``transact``).

``sipp`` (function scope): ``SippRunner``
    ``.uac(scenario, target_port, keys={...}, headers=[(n, v)], expect=200) -> SippResult``
    runs to completion; ``.uas(scenario, keys=...) -> SippUas`` runs in the background on
    ``.port`` until ``.wait()``.  Scenarios are files of tests/sipp; a ``*.tmpl.xml``
    gets ``@@HEADERS@@`` and ``@@EXPECT@@`` filled in.  ``SippResult.rc``,
    ``.logged(name)`` (values the scenario logged as ``name=value``), ``.messages``
    (the SIPp message trace).

``raw_uas`` (function scope): ``RawUas``, a binary-safe UDP peer on ``.port`` that
    answers every request with 200 (or what ``.responder`` returns) and keeps the exact
    bytes in ``.received`` (list of ``e2m_plugins.sip.SipMessage``).

``register(proxy, user, contact_port, sipp)``: REGISTER through SIPp, returns the
    SippResult (its ``logged("Proxy-Body-Policy")`` is the policy header of the 200).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2m_plugins.testpki import TestPKI
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.pytest_fixtures import failed, print_proxy_log

_RUNNING: list[ProxyHandle] = []


@pytest.fixture(autouse=True)
def _failure_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, print what the module-scoped proxies logged during the test."""
    marks = [(proxy, proxy.log_mark()) for proxy in list(_RUNNING)]
    yield
    if not failed(request):
        return
    for proxy, mark in marks:
        print_proxy_log(proxy, mark)


@pytest.fixture(scope="module")
def home_proxy(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """The trusted E2M proxy (archive on, views MESSAGE text and INVITE SDP)."""
    handle = start_proxy(tmp_path_factory.mktemp("home"), pki=pki, e2m=True)
    _RUNNING.append(handle)
    yield handle
    handle.stop()
    _RUNNING.remove(handle)


@pytest.fixture(scope="module")
def visited_proxy(home_proxy: ProxyHandle,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """An untrusted plain routing hop in front of the home proxy."""
    handle = start_proxy(tmp_path_factory.mktemp("visited"), pki=None, e2m=False,
                         next_hop=home_proxy.uri)
    _RUNNING.append(handle)
    yield handle
    handle.stop()
    _RUNNING.remove(handle)
