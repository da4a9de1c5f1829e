"""Bugs the reliability runs found in kamailio_app/, fixed and kept as regression
tests with their reproducers (a new one found goes in as a strict xfail first)."""

from __future__ import annotations

import pytest

from flowkit import TRUSTED, known_proxy, message, ua_engine
from kamailio_harness import RawUas, register
from wire import transact


def test_a_large_request_over_tcp_is_forwarded(proxy_factory, sipp, pki):
    """Reproducer: a MESSAGE with a 60 KiB body the proxy does not have to view, over
    TCP to a user registered over UDP: it must be read whole and forwarded (200)."""
    proxy = proxy_factory("trusted", view=("INVITE:application/sdp",))
    uas = RawUas()
    try:
        register(proxy, "bob", uas.port, sipp)
        big = message(pki, b"x" * (60 * 1024), content_type="application/octet-stream")
        got = transact(proxy.port, big, "tcp", timeout=5)
        assert got is not None and got.status == 200, got and (got.status, got.reason)
    finally:
        uas.close()


def test_a_request_too_big_for_the_next_hop_is_read_whole_then_refused_by_transport(
        proxy_factory, sipp, pki):
    """200 KiB is read whole (not the 400 of a truncated read) and inspected; UDP to
    the registered contact cannot carry it, so Kamailio answers 500 'Cannot Relay'."""
    proxy = proxy_factory("trusted", view=("INVITE:application/sdp",))
    uas = RawUas()
    try:
        register(proxy, "bob", uas.port, sipp)
        big = message(pki, b"x" * (200 * 1024), content_type="application/octet-stream")
        got = transact(proxy.port, big, "tcp", timeout=5)
        assert got is not None and (got.status, got.reason) == (500, "Cannot Relay")
    finally:
        uas.close()


def test_an_oversize_e2m_body_gets_413(proxy_factory, sipp, pki):
    proxy = proxy_factory("trusted", view=("MESSAGE:*",))
    uas = RawUas()
    try:
        register(proxy, "bob", uas.port, sipp)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
        msg = alice.protect(message(pki, b"hello")).message
        msg = msg.with_body(b"\x30\x83\x04\x38\x00" + b"A" * (270 * 1024))
        got = transact(proxy.port, msg, "tcp", timeout=5)
        assert got is not None and got.status == 413, got and (got.status, got.reason)
    finally:
        uas.close()


def test_a_short_keycache_expiry_the_config_accepts_starts(proxy_factory):
    proxy = proxy_factory("short", view=("INVITE:application/sdp",),
                   extra={"kamailio": {"keycache_expire": 20}})
    assert proxy.options().status == 200
