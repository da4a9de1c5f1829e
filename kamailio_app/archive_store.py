"""Which archive PROXY.toml asks for: the embedded SQLite file (``[archive] path``)
or, with ``[cluster] db_url``, PostgreSQL behind this node's spool.  The proxy, ``e2m
archive`` and ``e2m-proxy db`` all open it here, so they agree on where it is."""

from __future__ import annotations

from .archive import ArchiveStore, SqliteArchive
from .archive_spool import ArchiveEvents, SpooledArchive, SpoolFile
from .config import AppConfig

__all__ = ["open_archive", "open_shared", "open_spool"]


def open_shared(config: AppConfig) -> ArchiveStore:
    """The PostgreSQL archive of ``[cluster] db_url`` (no spool)."""
    from .archive_pg import PostgresArchive
    assert config.cluster is not None
    cluster = config.cluster
    return PostgresArchive(cluster.db, connect_timeout=cluster.connect_timeout,
                           statement_timeout_ms=cluster.statement_timeout_ms)


def open_spool(config: AppConfig) -> SpoolFile | None:
    settings = config.archive
    if not settings.shared or settings.spool is None or settings.spool_max == 0:
        return None
    return SpoolFile(settings.spool, settings.busy_timeout_ms)


def open_archive(config: AppConfig, events: ArchiveEvents | None = None) -> ArchiveStore | None:
    """The archive the proxy writes to (None: it keeps none)."""
    settings = config.archive
    if settings.shared:
        return SpooledArchive(open_shared(config), open_spool(config),  # type: ignore[arg-type]
                              max_messages=settings.spool_max,
                              max_bytes=settings.spool_max_mb * 1024 * 1024,
                              share_percent=settings.spool_share, events=events)
    if settings.path is not None:
        return SqliteArchive(settings.path, settings.busy_timeout_ms)
    return None
