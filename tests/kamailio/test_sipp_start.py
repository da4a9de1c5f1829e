"""SIPp starts on ports nobody else can take from it (issue 11 §3).

SIPp 3.6 binds four sockets when it starts: the SIP port (``-p``), audio and video RTP
(``-mp`` and ``-mp`` + 2, scenario with RTP or not) and a remote-control port (``-cp``).
Left alone, the last two come from fixed ranges every SIPp on the machine shares
(6000-6199, 8888-8947), and a bind that fails with EADDRINUSE ends SIPp with exit code
254 (EXIT_BIND_ERROR).  The harness gives every one of them a fresh free port and starts
SIPp again on new ports when it still loses one.  These tests take ports away from
SIPp on purpose: the default RTP range, and the port ``free_port`` just handed out (the
race between releasing a free port and SIPp binding it).
"""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import e2m_lab.sipp as sipp_module
from e2m_plugins.sip import make_request
from e2m_lab.kamailio_harness import RawUas
from e2m_lab.sipp import SippRunner, send_with_sipp

pytestmark = pytest.mark.sipp

DEFAULT_RTP = range(6000, 6204)       # SIPp's default -mp 6000, 100 even tries, video at +2
DEFAULT_CONTROL = range(8888, 8948)   # SIPp's default -cp 8888, 60 tries


@contextmanager
def held_udp(ports, host: str = "127.0.0.1") -> Iterator[list[int]]:
    """Hold every port of ``ports`` that can be bound (the others are taken already)."""
    held = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        yield [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def port_thief(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The first port ``e2m_lab.sipp`` gets from ``free_port`` is bound by another socket
    right after it was checked free: what a parallel process does in the race window."""
    stolen: list[int] = []
    sockets: list[socket.socket] = []
    real = sipp_module.free_port

    def free_port(**kwargs):
        port = real(**kwargs)
        if not stolen:
            thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            thief.bind(("127.0.0.1", port))
            sockets.append(thief)
            stolen.append(port)
        return port

    monkeypatch.setattr(sipp_module, "free_port", free_port)
    yield stolen
    for sock in sockets:
        sock.close()


def _assert_runs(server, within: float = 0.5) -> None:
    """SIPp is still running ``within`` s after it was reported listening."""
    try:
        rc = server.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return
    if "output" in server.files:
        output = server.files["output"].read_text(errors="replace")
    else:                               # the harness before the fix: a pipe
        output = server.process.stdout.read().decode(errors="replace")
    pytest.fail(f"SIPp exited with {rc} after the harness said it listens on {server.port}: "
                f"{getattr(sipp_module, 'sipp_error_lines', lambda t: t[-500:])(output)}")


def _message_reaches(server, sipp: SippRunner, tmp_path) -> None:
    request = make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", body=b"hello\r\n",
                           content_type="text/plain")
    sent = send_with_sipp(sipp, server.port, request, workdir=tmp_path)
    assert sent.rc == 0, sent.output[-800:]
    assert server.wait().rc == 0


def test_uas_starts_while_the_default_rtp_range_is_taken(sipp: SippRunner, tmp_path):
    # Before the fix SIPp bound its RTP sockets in 6000-6199 and exited with 254
    # ("Unable to bind audio RTP socket (IP=127.0.0.1, port=6198)") once that range was
    # taken, e.g. by 50 SIPps of parallel runs.
    with held_udp(DEFAULT_RTP):
        server = sipp.uas("uas_message.xml")
        _assert_runs(server)
    from e2m_lab.sipp import _socket_ports
    owned = _socket_ports(server.process.pid)
    assert owned == set(server.ports.bound), owned
    assert not owned & set(DEFAULT_RTP) and not owned & set(DEFAULT_CONTROL)
    _message_reaches(server, sipp, tmp_path)


def test_uas_whose_port_is_taken_before_it_binds_starts_again_on_fresh_ports(
        sipp: SippRunner, port_thief: list[int], tmp_path, caplog: pytest.LogCaptureFixture):
    # Before the fix: SIPp exited with 254 ("Unable to bind main socket, errno = 98"),
    # while wait_udp_bound, finding the port taken, took that for SIPp listening.
    with caplog.at_level(logging.WARNING, logger="e2m_lab.sipp"):
        server = sipp.uas("uas_message.xml")
        _assert_runs(server)
    assert port_thief and server.port != port_thief[0]
    assert "Unable to bind main socket" in caplog.text
    assert "Address already in use" in caplog.text
    _message_reaches(server, sipp, tmp_path)


def test_uac_whose_port_is_taken_before_it_binds_runs_again_on_fresh_ports(
        sipp: SippRunner, port_thief: list[int], caplog: pytest.LogCaptureFixture):
    raw = RawUas()
    try:
        with caplog.at_level(logging.WARNING, logger="e2m_lab.sipp"):
            result = sipp.uac("uac_options.xml", raw.port)
    finally:
        raw.close()
    assert result.rc == 0, result.output[-800:]
    assert port_thief and "Unable to bind main socket" in caplog.text
    assert [m.method for m in raw.received] == ["OPTIONS"]


def test_a_uas_on_a_taken_fixed_port_fails_with_sipps_own_message(sipp: SippRunner):
    with held_udp([sipp_module.free_port()]) as (port,):
        with pytest.raises(RuntimeError) as raised:
            server = sipp.uas("uas_message.xml", port=port)
            _assert_runs(server)        # before the fix, uas() returned: "port is taken"
    message = str(raised.value)
    assert f"SIPp exited with 254 before listening on {port}" in message
    assert "Unable to bind main socket, errno = 98 (Address already in use)" in message
