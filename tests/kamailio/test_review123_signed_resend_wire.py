"""Review 123 (attacker's review of 487265c), wire: an E2M-protected MESSAGE's UDP
retransmission after tm's transaction ended.  Docstring completed below."""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from tests.kamailio.test_review114_loop_wire import _register
from tests.kamailio.test_review119_loop_wire import LOOP_LOG, TIMER_E, _Uas

pytestmark = [pytest.mark.kamailio]


def _resend(port, raw, sock, schedule):
    start, out = time.monotonic(), []
    for at in schedule:
        time.sleep(max(0.0, start + at - time.monotonic()))
        sock.sendto(raw, ("127.0.0.1", port))
        got = []
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            try:
                got.append(sock.recvfrom(65535)[0].split(b"\r\n", 1)[0].decode())
            except socket.timeout:
                break
        out.append((at, got))
    return out


def _sent(proxy_factory, pki, name, schedule):
    home = proxy_factory(name, e2m=True, view=("MESSAGE:*",))
    uas = _Uas()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.65", 0))
    sock.settimeout(0.3)
    try:
        bound = _register(home, "bob", pki.domain, f"<sip:bob@127.0.0.1:{uas.port}>")
        assert bound is not None and bound.status == 200
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
        via = (f"SIP/2.0/UDP 127.0.0.65:{sock.getsockname()[1]};rport;"
               f"branch=z9hG4bK-r123s{time.monotonic_ns()}")
        # one protected MESSAGE, its octets sent again as they are (a phone's stack
        # retransmits the very datagram; the e2m-phone hook keeps its output for that)
        raw = alice.protect(message(pki).replace("Via", via)).message.serialize()
        mark = home.log_mark()
        out = _resend(home.port, raw, sock, schedule)
        time.sleep(0.3)
        log = home.log_since(mark)
        print(f"\nanswers {out}; bob got {uas.got}; loop lines {log.count(LOOP_LOG)}; "
              f"replay refusals {log.count('error=ReplayError')}")
        return [lines[-1] if lines else None for _, lines in out], uas.got
    finally:
        sock.close()
        uas.close()


@pytest.mark.xfail(strict=True, reason="review 123 hole HB2: a protected MESSAGE's "
                   "retransmission after tm's transaction ended is 403 (replay), bob got it")
def test_hole_hb2_a_protected_messages_late_retransmission_is_answered_as_such(proxy_factory,
                                                                                pki):
    finals, got = _sent(proxy_factory, pki, "r123-hb2", TIMER_E[:5])
    assert None not in finals, finals
    # secure and honest: the copy is the same request; bob got it once or twice, and the
    # caller is not told it failed
    assert finals == ["SIP/2.0 200 OK"] * 5, (finals, got)


def test_control_hb2_copies_within_the_transaction_are_absorbed(proxy_factory, pki):
    finals, got = _sent(proxy_factory, pki, "r123-hb2-ctl", TIMER_E[:4])
    assert finals == ["SIP/2.0 200 OK"] * 4 and got == 1, (finals, got)
