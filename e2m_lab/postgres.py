"""A private PostgreSQL for tests and demos: Debian's server binaries, a cluster made
with ``initdb`` in a folder of ours, listening on 127.0.0.1 and a free port only.

Nothing of the machine's own PostgreSQL is used or touched (no ``pg_ctlcluster``, no
system service).  PostgreSQL refuses to run as root, so as root the cluster belongs to
the ``postgres`` system user (made by the Debian package) and its folder is handed to
it.  Password authentication (scram-sha-256) even on loopback, as in a deployment: the
URL carries a password made for this cluster.

    with PostgresServer() as pg:   # a folder of its own in $TMPDIR, removed at stop
        pg.url        # postgres://e2m:<password>@127.0.0.1:<port>/e2m

(pytest's ``tmp_path`` will not do as root: its parents are closed to other users, the
``postgres`` user included.)
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .ports import HOST, free_port
from .processes import PARENT, processes_with

__all__ = ["PostgresServer", "PostgresUnavailable", "server_binaries"]

_START_TIMEOUT = 30.0
_RUN_AS = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (``make setup`` installs Debian's)."""


def server_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has ``initdb`` and
    ``postgres`` (Debian keeps them off PATH), or None."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    found = [d / "bin" for d in root.iterdir()
             if (d / "bin" / "initdb").exists() and (d / "bin" / "postgres").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
               default=None)


class PostgresServer:
    """One PostgreSQL server: ``start()`` makes the cluster (first time) and runs it,
    ``stop()`` stops it (fast shutdown), also when used as a context manager."""

    def __init__(self, folder: Path | None = None, *, port: int | None = None,
                 user: str = "e2m", database: str = "e2m") -> None:
        bindir = server_binaries()
        if bindir is None:
            raise PostgresUnavailable("PostgreSQL server binaries not found "
                                      "(apt install postgresql; make setup does)")
        self.bindir = bindir
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="e2m-pg-") if folder is None else folder)
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "run"
        self.log = self.folder / "postgres.log"
        self.port = port or free_port()
        self.user = user
        self.database = database
        self.password = secrets.token_urlsafe(18)
        self._process: subprocess.Popen | None = None

    # -- where it is ---------------------------------------------------------------
    @property
    def url(self) -> str:
        """What Kamailio's db_postgres and libpq both read."""
        return f"postgres://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return f"postgres://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    def create_database(self, name: str, *, dropping: Iterable[str] = ()) -> str:
        """A new, empty database in this cluster (one per test); its URL.  The
        databases named in ``dropping`` go first (an earlier test's: a server kept for
        the session holds one database at a time, not one per test)."""
        names = [*dropping, name]
        if not all(n.replace("_", "").isalnum() for n in names):
            raise ValueError(f"database names {names!r}: letters, digits and _ only")
        # one statement per line: psql runs each in its own transaction, as DROP and
        # CREATE DATABASE need
        self.psql("".join(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE);\n' for old in dropping)
                  + f'CREATE DATABASE "{name}";\n', database="postgres")
        return self.url_for(name)

    @property
    def conninfo(self) -> str:
        return (f"host={HOST} port={self.port} dbname={self.database} user={self.user} "
                f"password={self.password}")

    # -- running it ----------------------------------------------------------------
    def _as_owner(self) -> dict:
        """subprocess arguments that run a command as the cluster's owner."""
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam(_RUN_AS)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _hand_over(self, *paths: Path) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam(_RUN_AS)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self.socket_dir.chmod(0o700)
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._hand_over(self.folder, self.socket_dir, pwfile)
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                        "--pwfile", str(pwfile), "--auth-local=scram-sha-256",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, capture_output=True, timeout=120, **self._as_owner())
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{HOST}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       # a commit survives a SIGKILL of the server (not an OS crash)
                       "fsync = off\nfull_page_writes = off\n"
                       "max_connections = 100\nshared_buffers = 32MB\n")

    def start(self) -> "PostgresServer":
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = open(self.log, "ab")
        self._hand_over(self.log)
        self._process = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.data)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, **self._as_owner())
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited {self._process.returncode}: {self.tail()}")
            if self._ready():
                self._create_database()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres did not start in {_START_TIMEOUT:.0f} s: {self.tail()}")

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password}

    def _ready(self) -> bool:
        probe = subprocess.run([str(self.bindir / "pg_isready"), "-h", HOST, "-p", str(self.port),
                                "-U", self.user, "-d", "postgres"],
                               capture_output=True, timeout=10)
        return probe.returncode == 0

    def _create_database(self) -> None:
        exists = self.psql("SELECT 1 FROM pg_database WHERE datname = :'name'",
                           database="postgres", variables={"name": self.database})
        if exists.strip() != "1":
            self.psql(f'CREATE DATABASE "{self.database}"', database="postgres")

    def psql(self, sql: str, *, database: str | None = None,
             variables: dict[str, str] | None = None) -> str:
        """Run ``sql`` with psql (unaligned, tuples only) and return its output."""
        client = shutil.which("psql") or str(self.bindir / "psql")
        args = [client, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", HOST,
                "-p", str(self.port), "-U", self.user, "-d", database or self.database]
        for name, value in (variables or {}).items():
            args += ["-v", f"{name}={value}"]
        done = subprocess.run(args, input=sql, capture_output=True, text=True, timeout=60,
                              env=self._client_env())
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer...).  Each child
        calls setsid(), so signalling the postmaster's process group reaches it alone."""
        if self._process is None or self._process.poll() is not None:
            return []
        return [self._process.pid, *processes_with(PARENT, self._process.pid)]

    def _signal_all(self, signum: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server, every process of it at once (a crash of the database
        host); ``start()`` again brings the same cluster back."""
        if self._process is not None and self._process.poll() is None:
            self._signal_all(signal.SIGKILL)
            self._process.wait(timeout=10)
            time.sleep(0.2)

    def pause(self) -> None:
        """SIGSTOP every process of the server: it keeps its connections and answers
        nothing (a frozen host or a stalled disk); ``resume()`` lets it go on."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT every process, then wait (up to 5 s) until the server answers again:
        stopped at once after a resume (a test's teardown), its fast shutdown sometimes
        hung until the 15 s kill, the suite's slowest teardown."""
        self._signal_all(signal.SIGCONT)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not self._ready():
            time.sleep(0.05)

    def stop(self, *, keep: bool = False) -> None:
        """Stop the server; a folder we made is removed unless ``keep`` (a restart)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._process = process
            self._signal_all(signal.SIGCONT)          # a paused server could not stop
            self._process = None
            process.send_signal(2)           # SIGINT: fast shutdown, clients cut off
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._own_folder and not keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
