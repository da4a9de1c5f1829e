"""Fixtures for the shared-store tests: a private PostgreSQL (``e2m_lab.postgres``) and
proxies on it.

``cluster``: nodes A and B on ``pg_url`` (e2m_lab/cluster.py), ``alice`` and ``bob``
its phones (the core's UA engines on UDP sockets).

``postgres`` (module scope): one server for a test module; ``pg_url`` gives each test
a database of its own in it.  ``own_postgres``: a server for one test, for tests that
kill it (SIGKILL) and start it again.  Everything listens on 127.0.0.1 on free ports
and is stopped at teardown; on failure the server's log tail is printed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import Alice, Bob, Cluster, start_cluster
from e2m_lab.kamailio_harness import ProxyStarter
from e2m_lab.postgres import PostgresServer
from e2m_lab.pytest_fixtures import failed

_names = itertools.count(1)


def _print_tail(server: PostgresServer) -> None:
    print(f"\n===== PostgreSQL log (port {server.port}), last lines =====\n{server.tail(30)}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One server for the session (initdb and a start cost about 1.5 s: once per module
    added half a minute to the suite); each test gets a database of its own."""
    server = PostgresServer().start()
    yield server
    server.stop()


_last_database: list[str] = []      # the previous test's, dropped when the next is made


@pytest.fixture
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a new, empty database for this test (the previous test's goes: its
    proxies are stopped by then)."""
    name = f"t{next(_names)}"
    url = postgres.create_database(name, dropping=list(_last_database))
    _last_database[:] = [name]
    yield url
    if failed(request):
        _print_tail(postgres)


@pytest.fixture(scope="module")
def module_pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database for a whole module: for proxies its tests share (module
    scope, ``module_proxy_factory``) when each test leaves them in a state the next
    does not depend on.  Dropped when the next database is made (after the module's
    proxies are stopped); a ``pg_url`` made meanwhile does not drop it."""
    name = f"t{next(_names)}"
    url = postgres.create_database(name)
    yield url
    _last_database.append(name)


@pytest.fixture(scope="module")
def module_proxy_factory(pki, tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[ProxyStarter]:
    """``proxy_factory`` for proxies a module's tests share: each stopped after the
    module's last test (also when one failed)."""
    starter = ProxyStarter(pki, tmp_path_factory.mktemp("module-proxies"))
    yield starter
    starter.stop_all()


@pytest.fixture
def own_postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    if failed(request):
        _print_tail(server)
    server.stop()


@pytest.fixture
def cluster(proxy_factory, pg_url) -> Cluster:
    return start_cluster(proxy_factory, pg_url)


@pytest.fixture
def alice(pki) -> Iterator[Alice]:
    phone = Alice(pki)
    yield phone
    phone.close()


@pytest.fixture
def bob(pki) -> Iterator[Bob]:
    phone = Bob(pki)
    yield phone
    phone.close()
