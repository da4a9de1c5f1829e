"""Review 138 (attacker's review of d24d457), area 1: the phone's TCP guard admitting the
home's addresses alone (``TcpGuard.admit_only``, ``admit_program``; called from
``E2MPhone.start``).  Real ``e2m-phone listen`` processes (bob), plain sockets from
other loopback addresses (``e2m_lab/stranger.py``, the ``lab`` fixture of
``test_phone_stranger.py``), no Kamailio.

(Docstring: see the end of the review; written after the runs.)
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.stranger import HOST, tcp_flood
from tests.e2e.test_phone_stranger import assert_serving, lab, pki  # noqa: F401 (fixtures)
from tests.e2e.test_udp_phone_tcp_listener import _tcp_request

pytestmark = [pytest.mark.pjsua2]

HOME = "127.0.0.2"            # the outbound proxy's address (nobody listens there)
STRANGER = "127.0.0.50"       # an off-path sender's address
FLOOD = 300                   # connections, every second one closed at once


def _answered(port: int, source: str) -> int | None:
    """The final status an OPTIONS over a fresh TCP connection from ``source`` gets
    (None: no connection completed, or no answer)."""
    answer = _tcp_request(port, "OPTIONS", source=source, timeout=2)
    return None if answer is None else answer.status


def _flood6(port: int, count: int) -> list[socket.socket]:
    """``tcp_flood`` over IPv6 to [::1] (non-blocking connects, every second one closed)."""
    held = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET6)
        sock.setblocking(False)
        try:
            sock.connect(("::1", port))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sock.close()
            continue
        if index % 2:
            time.sleep(0.002)
            sock.close()
        else:
            held.append(sock)
        time.sleep(0.002)
    return held


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _flood(lab, bob, ipv6: bool = False) -> None:
    # from 127.0.0.1 (or ::1), not the home
    held = _flood6(bob.port, FLOOD) if ipv6 else tcp_flood(bob.port, FLOOD, close_every=2)
    try:
        time.sleep(2.0)
    finally:
        for sock in held:
            sock.close()


# -- hole K1: a phone bound to the wildcard address has no gate at all ------------------

@pytest.mark.xfail(strict=True, reason="review 138 hole K1: on a phone bound to 0.0.0.0 "
                   "find_listener misses the listener, so a stranger's TCP connection "
                   "completes despite admit_only")
def test_k1_a_wildcard_bound_phone_completes_no_strangers_connection(lab):
    bob = lab.phone(phone={"transport": "udp", "host": "0.0.0.0",
                           "proxy": f"sip:{HOME}:5090"})
    assert _answered(bob.port, HOME) is not None          # the home gets in
    assert _answered(bob.port, STRANGER) is None, bob.status()["tcp"]


@pytest.mark.xfail(strict=True, reason="review 138 hole K1: a stranger's 300-connection "
                   "TCP churn aborts a UDP phone bound to 0.0.0.0 or :: (no SYN gate: "
                   "pjlib's ioqueue free list runs dry)")
@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_k1_a_wildcard_bound_udp_phone_survives_a_strangers_tcp_churn(lab, host):
    if host == "::" and not _ipv6():
        pytest.skip("no IPv6 loopback")
    home = f"[::2]" if host == "::" else HOME
    bob = lab.phone(phone={"transport": "udp", "host": host, "proxy": f"sip:{home}:5090"})
    _flood(lab, bob, ipv6=host == "::")
    assert bob.alive, f"the phone died (rc={bob.process.returncode})"
    assert "tcp" in bob.status()              # its loop still answers (the status command)


@pytest.mark.xfail(strict=True, reason="review 138 hole K1: a stranger's 300-connection "
                   "TCP churn aborts a TLS phone bound to 0.0.0.0 (its TLS gate never "
                   "found the listener)")
def test_k1_a_wildcard_bound_tls_phone_survives_a_strangers_tcp_churn(lab):
    bob = lab.phone(phone={"transport": "tls", "host": "0.0.0.0",
                           "proxy": f"sips:{HOME}:5091"})
    _flood(lab, bob)
    assert bob.alive, f"the phone died (rc={bob.process.returncode})"
    assert "tcp" in bob.status()              # its loop still answers (the status command)


@pytest.mark.parametrize("transport,host", [("udp", HOST), ("tls", HOST), ("udp", "::1")])
def test_control_k1_a_phone_bound_to_its_address_survives_the_same_churn(lab, transport, host):
    if host == "::1" and not _ipv6():
        pytest.skip("no IPv6 loopback")
    scheme = "sips" if transport == "tls" else "sip"
    home = "[::2]" if host == "::1" else HOME
    bob = lab.phone(phone={"transport": transport, "host": host,
                           "proxy": f"{scheme}:{home}:{5091 if transport == 'tls' else 5090}"})
    _flood(lab, bob, ipv6=host == "::1")
    assert bob.alive, f"the phone died (rc={bob.process.returncode})"
    if transport == "udp" and host == HOST:
        assert_serving(bob, lab.stranger(bob), "after the TCP churn")
    else:
        assert "tcp" in bob.status()          # its loop still answers (the status command)


def test_control_k1_a_phone_bound_to_its_address_admits_the_home_alone(lab):
    bob = lab.phone(phone={"transport": "udp", "host": HOST, "proxy": f"sip:{HOME}:5090"})
    status = bob.status()["tcp"]
    assert status["listener_found"] and status["admitted_sources"] == 1, status
    assert _answered(bob.port, HOME) is not None
    assert _answered(bob.port, STRANGER) is None


# -- honest break HB1: a home of more than MAX_ADMITTED addresses -----------------------

def _cluster(size: int) -> tuple[str, list[str]]:
    """The outbound proxy (a front) and ``size - 1`` nodes' URIs (``home_sources``)."""
    return f"sip:{HOME}:5090", [f"sip:127.0.0.{n}:5070" for n in range(11, 10 + size)]


def _home_answers(lab, size: int) -> tuple[dict[str, int | None], dict]:
    proxy, nodes = _cluster(size)
    bob = lab.phone(phone={"transport": "udp", "proxy": proxy, "home_sources": nodes})
    addresses = [HOME] + [node[4:].rsplit(":", 1)[0] for node in nodes]
    answers = {address: _answered(bob.port, address) for address in addresses}
    return answers, bob.status()["tcp"]


@pytest.mark.xfail(strict=True, reason="review 138 honest break HB1: with 10 home "
                   "addresses (a front and 9 nodes) the filter keeps an arbitrary 8: 2 "
                   "nodes the phone takes requests from never get a TCP connection")
def test_hb1_every_home_address_gets_a_connection_in_a_ten_address_cluster(lab):
    answers, status = _home_answers(lab, 10)
    assert all(status is not None for status in answers.values()), (answers, status)


def test_control_hb1_an_eight_address_cluster_gets_in_and_a_stranger_does_not(lab):
    answers, status = _home_answers(lab, 8)
    assert status["admitted_sources"] == 8, status
    assert all(code is not None for code in answers.values()), answers
    assert _answered(int(lab.phones[0].port), STRANGER) is None
