"""Review 128: sources counted by site on a real dual-stack listener (placeholder text,
replaced below once the figures are in)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2m_lab.ports import free_port
from e2m_plugins.sip import parse

pytestmark = pytest.mark.kamailio

INSIDE = os.environ.get("E2M_R128_NETNS") == "1"
OUT = os.environ.get("E2M_R128_OUT", "")
VISITED = "127.0.0.2"          # an honest visited proxy, listed in [limits] trusted
STRANGER = "127.0.0.3"         # an IPv4 stranger
BURST = 60                     # OPTIONS back to back (pike: 30 in 2 s, then a 300 s ban)
NEIGHBOURS = "2001:db8:128"    # one /56's worth: 2001:db8:128:100::/56


# ----------------------------------------------------------------------------- outer half

def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def netns_run(tmp_path_factory) -> dict:
    if INSIDE:
        pytest.skip("the inner half runs the attack")
    if not _unshare_works():
        pytest.skip("needs root and unshare -n (a network namespace of its own)")
    out = tmp_path_factory.mktemp("r128") / "result.json"
    env = dict(os.environ, E2M_R128_NETNS="1", E2M_R128_OUT=str(out))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(root), f"{__file__}::test_inner_dual_stack"],
        cwd=str(root), env=env, capture_output=True, text=True, timeout=400)
    if not out.exists():
        pytest.fail("the inner half wrote nothing:\n" + (done.stdout + done.stderr)[-4000:])
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.xfail(strict=True, reason="review 128 hole HB1: a [limits] trusted IPv4 peer is "
                   "pike-banned on a dual-stack udp:[::] listener (seen as ::ffff:a.b.c.d)")
def test_honest_break_hb1_trusted_peer_banned_on_dual_stack_listener(netns_run):
    r = netns_run
    # secure: the visited proxy listed in [limits] trusted is never limited, whichever of
    # our listeners it reaches: every OPTIONS answered, no ban in its name
    assert r["trusted_dual_answered"] == BURST, r
    assert VISITED not in r["bans_after_trusted"], r["bans_after_trusted"]


def test_control_trusted_peer_exempt_on_ipv4_listener(netns_run):
    r = netns_run
    # the same peer, the same burst, to the IPv4 listener: exempt, all answered
    assert r["trusted_v4_answered"] == BURST, r


def test_control_dual_stack_listener_sees_ipv4_clients_as_mapped(netns_run):
    r = netns_run
    # the set-up is live: Kamailio shows an IPv4 client of udp:[::] as ::ffff:a.b.c.d
    assert f"::ffff:{VISITED}" in r["pike_log"], r["pike_log"]


def test_control_mapped_stranger_banned_by_its_ipv4_address(netns_run):
    r = netns_run
    # site_of holds for the mapped form: the stranger's burst on udp:[::] ends in a ban
    # named by his IPv4 address, which then holds on the IPv4 listener too
    assert 0 < r["stranger_dual_answered"] <= 40, r
    assert STRANGER in r["bans_after_stranger"], r["bans_after_stranger"]
    assert r["stranger_v4_after_ban"] == 0, r


# ----------------------------------------------------------------------------- inner half

class _Peer:
    """A UDP socket on one address (IPv4 or IPv6) of the namespace's loopback."""

    def __init__(self, address: str) -> None:
        self.address = address
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, 78, 1)     # IPV6_FREEBIND
        self.sock.bind((address, 0))
        self.port = self.sock.getsockname()[1]
        self.host = f"[{address}]" if ":" in address else address

    def close(self) -> None:
        self.sock.close()

    def _ask(self, target: tuple[str, int], request: str, call_id: str,
             wait: float) -> int | None:
        self.sock.sendto(request.encode(), target)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.02, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                return None
            message = parse(data)
            if not message.is_request and message.call_id == call_id \
                    and (message.status or 0) >= 200:
                return message.status
        return None

    def options(self, target: tuple[str, int], n: int, wait: float = 0.3) -> int | None:
        call_id = f"r128o-{self.address}-{target[1]}-{n}-{time.monotonic_ns()}"
        request = "\r\n".join([
            "OPTIONS sip:example.com SIP/2.0",
            f"Via: SIP/2.0/UDP {self.host}:{self.port};rport;branch=z9hG4bKr128o{n}x"
            f"{time.monotonic_ns()}",
            f"From: <sip:x@example.net>;tag=o{n}", "To: <sip:example.com>",
            f"Call-ID: {call_id}", "CSeq: 1 OPTIONS", "Max-Forwards: 70", "Content-Length: 0",
            "", ""])
        return self._ask(target, request, call_id, wait)


def _burst(address: str, target: tuple[str, int], count: int = BURST) -> int:
    """OPTIONS back to back, the answered ones counted; stopped after 5 unanswered in a
    row (the source is then banned for 300 s)."""
    peer = _Peer(address)
    answered = silent = 0
    for i in range(count):
        if peer.options(target, i) is not None:
            answered, silent = answered + 1, 0
        else:
            silent += 1
            if silent == 5:
                break
    peer.close()
    return answered


def _bans(proxy) -> str:
    return " ".join(proxy.rpc("htable.dump", "e2mban").split())[:3000]


@pytest.mark.skipif(not INSIDE, reason="the inner half, run by the outer tests in a netns")
def test_inner_dual_stack(proxy_factory):
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
    subprocess.run(["ip", "-6", "route", "add", "local", f"{NEIGHBOURS}::/48", "dev", "lo",
                    "table", "local"], check=True, capture_output=True)
    port, dual = free_port(), free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:[::]:{dual}"]
    proxy = proxy_factory("r128", port=port, limits={"trusted": [VISITED]},
                          extra={"kamailio": {"listen": listen}})
    result: dict = {}
    v4, ds = ("127.0.0.1", port), ("127.0.0.1", dual)

    # control: the trusted visited proxy on the IPv4 listener
    result["trusted_v4_answered"] = _burst(VISITED, v4)
    # HB1: the same peer on the dual-stack listener (an IPv4 datagram to udp:[::])
    mark = proxy.log_mark()
    result["trusted_dual_answered"] = _burst(VISITED, ds)
    result["pike_log"] = "\n".join(line for line in proxy.log_since(mark).splitlines()
                                   if "pike" in line.lower() or "banned" in line)[-2000:]
    result["bans_after_trusted"] = _bans(proxy)

    # control: an IPv4 stranger on the dual-stack listener, banned by his IPv4 address
    result["stranger_dual_answered"] = _burst(STRANGER, ds)
    result["bans_after_stranger"] = _bans(proxy)
    result["stranger_v4_after_ban"] = _burst(STRANGER, v4, count=5)
    Path(OUT).write_text(json.dumps(result))
