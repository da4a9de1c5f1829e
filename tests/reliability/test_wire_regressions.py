"""Bugs the reliability runs found in kamailio_app/, fixed and kept as regression
tests with their reproducers (a new one found goes in as a strict xfail first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import RawUas
from e2m_lab.sipp import register
from e2m_lab.wire import transact

pytestmark = pytest.mark.kamailio   # and sipp where a test uses the fixture


@contextmanager
def bob_behind(proxy_factory, sipp, view: tuple[str, ...]) -> Iterator:
    """A trusted proxy viewing ``view``, with bob registered on a RawUas behind it."""
    proxy = proxy_factory("trusted", view=view)
    uas = RawUas()
    try:
        register(proxy, "bob", uas.port, sipp)
        yield proxy
    finally:
        uas.close()


@pytest.mark.parametrize("kib, answer", [(60, (200, "OK")), (200, (500, "Cannot Relay"))])
def test_a_large_request_over_tcp_is_read_whole(proxy_factory, sipp, pki, kib, answer):
    """Reproducer: a MESSAGE with a big body the proxy does not have to view, over TCP
    to a user registered over UDP, must be read whole (not the 400 of a truncated
    read).  60 KiB is forwarded (200); 200 KiB is inspected, but UDP to the contact
    cannot carry it, so Kamailio answers 500 'Cannot Relay'."""
    with bob_behind(proxy_factory, sipp, ("INVITE:application/sdp",)) as proxy:
        big = message(pki, b"x" * (kib * 1024), content_type="application/octet-stream")
        got = transact(proxy.port, big, "tcp", timeout=5)
        assert got is not None and (got.status, got.reason) == answer, got and (got.status, got.reason)


def test_an_oversize_e2m_body_gets_413(proxy_factory, sipp, pki):
    with bob_behind(proxy_factory, sipp, ("MESSAGE:*",)) as proxy:
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
        msg = alice.protect(message(pki, b"hello")).message
        msg = msg.with_body(b"\x30\x83\x04\x38\x00" + b"A" * (270 * 1024))
        got = transact(proxy.port, msg, "tcp", timeout=5)
        assert got is not None and got.status == 413, got and (got.status, got.reason)


def test_a_short_keycache_expiry_the_config_accepts_starts(proxy_factory):
    proxy = proxy_factory("short", view=("INVITE:application/sdp",),
                   extra={"kamailio": {"keycache_expire": 20}})
    assert proxy.options().status == 200
