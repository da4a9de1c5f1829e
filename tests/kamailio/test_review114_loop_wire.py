"""Review 114 (an attacker's review of 3bc1fa2), wire: stop 39's loop detection
(``kemi._relay_key``, ``_came_back``, ``_carries_our_via``, htable ``e2mloop``) on real
Kamailio 5.6.3 proxies, with review 112's ping-pong set-up (a binding naming a hop
that sends the request back).

Hole K2 (``test_hole_k2_a_loop_through_a_hop_that_hides_the_via_stack_is_missed``):
**off-path sender** springing a trap an **insider UA** set (review 112's threat), where
the hop on the loop hides the Via stack, as a topology-hiding edge does (Kamailio's
``topos`` module, most SBCs: Call-ID, tags, CSeq and Request-URI kept, every Via
replaced by its own); or an **untrusted hop** doing the same.

- Set-up: a plain proxy H (``e2m=False``; the same with E2M on), dave registered at H
  with ``Contact: <sip:dave@127.0.0.1:HOP>``.  HOP (``_Hop``, a stateless forwarder in
  this module) answers each request 100 (no retransmission storm), and sends it back to
  H with Request-URI ``sip:dave@127.0.0.1:H`` (what a registrar naming H, V in review
  112, writes), Max-Forwards one less, and the Via stack replaced by its own single Via
  (branch derived from the incoming one, as a stateless element does, so H's own
  retransmissions stay retransmissions).
- Messages: one stranger's ``MESSAGE sip:dave@example.com`` to H.
- Effect (seen): 35 transactions at H for the one datagram (plain and E2M alike;
  the hop got 70-87 requests with retransmissions) until Max-Forwards runs out: the
  same count as review 112's loop before the fix.  Every pass from the second on has
  the same relay key (Request-URI ``dave@127.0.0.1:H``, tags, Call-ID, CSeq, no Route),
  but carries no Via of H's, so ``_came_back`` says no.  With E2M on, each pass is also
  read by the engine.
- Control: the same hop keeping the Via stack (its Via on top of H's): 2 transactions,
  the third pass is ``482 Loop Detected`` at H ("came back to us unchanged (a loop)").
- At fault: ``kamailio_app/kemi.py:674`` (``_came_back``: a repeat of the key counts
  only with ``_carries_our_via``, ``kemi.py:682-705``): RFC 3261 16.3 step 4's test
  needs the Via, which an element between may take away; README "one that comes back
  carrying one of the proxy's Vias is the loop".
- Fix (suggested): keep with the key the Max-Forwards the proxy sent it with
  (``sht_seti(e2mloop, key, mf)``), and call a repeat of the key a loop when its
  Max-Forwards is lower than that, whatever its Vias: a loop only lowers it, a copy
  sent again from outside (a replay, a retransmission after the transaction ended)
  comes with the caller's original value.  Our Via need not survive for that.

Tried and held (this module, run):

- A stranger's MESSAGE into review 112's two-proxy loop with one octet 0xff in the
  Call-ID or the From tag (so ``_relay_key`` would give None and nothing be noted):
  the door answers 400 (``Bad Request``/``Bad From or To``) before any relay, no
  transaction (``test_held_k2_*_octet_*``).  A binding whose contact holds 0xff (in a
  parameter, the user, a header part) so that every later pass's Request-URI could
  not be read: the REGISTER is 400 (``test_held_k2_a_binding_with_an_octet_*``).
- Forking in the loop (dave has 10 bindings at H naming V, each with its own
  parameter, and 10 at V naming H, max_contacts=10): one datagram makes 11
  transactions at H and 10 at V, 110 and 100 branch replies received (each branch's
  repeat is a 482), in about 30 ms, and the stranger gets 482: bounded by
  max_contacts squared per datagram (n=1: 3 transactions, n=4: 9), not by
  Max-Forwards.  Some runs made 22: ``_came_back`` looks the key up and
  ``_note_relayed`` notes it only as the request leaves (after the engine's work), so
  two copies of one key handled at once by the two workers both pass (a race, one
  extra pass per concurrent copy, bounded the same).  An RFC 3261 branch check would allow the same (each pass has another
  Request-URI); the figure is worth knowing (an amplification of about 400 messages per
  datagram), not counted as a hole (``test_held_k2_forks_in_the_loop_are_bounded``).

Fixed (stop 39): ``_note_relayed`` keeps the Max-Forwards the request came with, and
``_came_back`` takes a lower one on the same request as a loop as well as a Via of
ours.  Both hole tests failed on the code before the fix and pass with it (markers
removed).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, build_request
from e2m_plugins import sip

pytestmark = [pytest.mark.kamailio]


def _created(node) -> int:
    found = re.search(r"created:\s*(\d+)", node.rpc("tm.stats"))
    assert found
    return int(found.group(1))


def _register(node, user, domain, contact):
    ua = SipUa(node.port, user=user, domain=domain, source="127.0.0.60")
    try:
        reg = ua.build("REGISTER", f"sip:{domain}", headers=[("Expires", "600")])
        return ua.request(reg.replace("Contact", contact))
    finally:
        ua.close()


def _send_raw(port, raw, source="127.0.0.61", timeout=10.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    via = (f"SIP/2.0/UDP {source}:{sock.getsockname()[1]};rport;"
           f"branch=z9hG4bK-r114-{time.monotonic_ns()}")
    raw = raw.replace(b"@@VIA@@", via.encode())
    try:
        sock.sendto(raw, ("127.0.0.1", port))
        answers = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, _ = sock.recvfrom(65535)
            except socket.timeout:
                break
            answers.append(data.split(b"\r\n", 1)[0])
            if not data.startswith(b"SIP/2.0 1"):
                break
        return answers
    finally:
        sock.close()


def _message(user, n, *, octet_in=None):
    msg = sip.parse(build_request("MESSAGE", f"sip:{user}@example.com", to_user=user,
                                  body=b"hi", content_type="text/plain"))
    msg = msg.replace("From", f"<sip:someone{n}@elsewhere.example.org>;tag=x{n}")
    msg = msg.replace("Via", "@@VIA@@")
    raw = msg.serialize()
    if octet_in == "call-id":
        cid = msg.get("Call-ID").encode()
        raw = raw.replace(b"Call-ID: " + cid, b"Call-ID: " + cid + b"\xff", 1)
    elif octet_in == "from-tag":
        raw = raw.replace(f";tag=x{n}".encode(), f";tag=x{n}\xff".encode("latin-1"), 1)
    return raw


def _register_raw(node, user, domain, contact: bytes):
    ua = SipUa(node.port, user=user, domain=domain, source="127.0.0.60")
    try:
        reg = ua.build("REGISTER", f"sip:{domain}", headers=[("Expires", "600")])
        raw = reg.replace("Contact", "@@CONTACT@@").replace("Via", "@@VIA@@").serialize()
        raw = raw.replace(b"@@CONTACT@@", contact)
        return _send_raw(node.port, raw, source="127.0.0.60")
    finally:
        ua.close()


def _stats(node):
    text = node.rpc("tm.stats")
    return {k: int(v) for k, v in re.findall(r"(\w+):\s*(\d+)", text)}


class _Hop:
    """A stateless hop: each request it gets is answered 100 and sent to ``target``
    with Request-URI ``ruri`` and Max-Forwards one less; with ``hide`` the Via stack is
    replaced by its own Via (topology hiding), else its Via goes on top.  The branch
    is derived from the incoming Via stack (a stateless element's rule)."""

    def __init__(self, target_port, ruri, hide=True, host="127.0.0.1"):
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.target, self.ruri, self.hide = target_port, ruri, hide
        self.got = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep serving
                continue
            if not msg.is_request or msg.method in ("ACK", "CANCEL"):
                continue
            self.got += 1
            self.sock.sendto(sip.make_response(msg, 100, "Trying").serialize(), peer)
            forwards = int(msg.get("Max-Forwards") or "70") - 1
            if forwards <= 0:
                continue
            branch = hashlib.sha256("\n".join(msg.get_all("Via")).encode()).hexdigest()[:16]
            onward = (msg.remove("Via") if self.hide else msg)
            onward = onward.replace("Max-Forwards", str(forwards))
            rest = onward.serialize().split(b"\r\n", 1)[1]
            via = f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-hop{branch}"
            out = f"{msg.method} {self.ruri} SIP/2.0\r\n{via}\r\n".encode() + rest
            self.sock.sendto(out, ("127.0.0.1", self.target))

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


def _through_hop(proxy_factory, name, *, hide, e2m=False):
    """(transactions at H for one stranger's MESSAGE, what the hop got, H's log)."""
    home = proxy_factory(name, e2m=e2m)
    hop = _Hop(home.port, f"sip:dave@127.0.0.1:{home.port}", hide=hide)
    try:
        bound = _register(home, "dave", "example.com", f"<sip:dave@127.0.0.1:{hop.port}>")
        assert bound is not None and bound.status == 200
        before = _created(home)
        mark = home.log_mark()
        answers = _send_raw(home.port, _message("dave", 1), timeout=10)
        time.sleep(1.5)
        made = _created(home) - before
        print("hide", hide, "e2m", e2m, "transactions at H", made, "hop got", hop.got,
              "stranger got", answers)
        return made, hop.got, home.log_since(mark)
    finally:
        hop.close()


def test_hole_k2_a_loop_through_a_hop_that_hides_the_via_stack_is_missed(proxy_factory):
    made, _, _ = _through_hop(proxy_factory, "r114-k2-hide", hide=True)
    # secure: the request coming back unchanged is refused at its first repeat
    assert made <= 3, made


def test_hole_k2_e2m_on_a_loop_through_a_via_hiding_hop_is_missed(proxy_factory):
    made, _, _ = _through_hop(proxy_factory, "r114-k2-hide-e2m", hide=True, e2m=True)
    assert made <= 3, made


def test_control_k2_the_same_loop_through_a_hop_keeping_the_vias_is_482(proxy_factory):
    made, _, log = _through_hop(proxy_factory, "r114-k2-keep", hide=False)
    assert made <= 3, made
    assert "came back to us unchanged (a loop): refused" in log


@pytest.mark.parametrize("octet_in", ["call-id", "from-tag"])
def test_held_k2_a_strangers_message_with_an_octet_is_refused_before_the_loop(
        proxy_factory, octet_in):
    home, other = _two(proxy_factory, "r114-k2-oct", 1)
    before = _created(home) + _created(other)
    answers = _send_raw(home.port, _message("dave", 1, octet_in=octet_in))
    time.sleep(0.5)
    assert answers and answers[-1].startswith(b"SIP/2.0 400"), answers
    assert _created(home) + _created(other) - before == 0


@pytest.mark.parametrize("shape", ["param", "user", "header"])
def test_held_k2_a_binding_with_an_octet_is_refused(proxy_factory, shape):
    home = proxy_factory("r114-k2-bind", e2m=False)
    port = home.port + 1
    contact = {"param": f"<sip:dave@127.0.0.1:{port};x=a".encode() + b"\xff>",
               "user": b"<sip:dave" + b"\xff" + f"@127.0.0.1:{port}>".encode(),
               "header": f"<sip:dave@127.0.0.1:{port}?X=a".encode() + b"\xff>"}[shape]
    answers = _register_raw(home, "dave", "example.com", contact)
    assert answers and answers[-1].startswith(b"SIP/2.0 400"), answers


def _two(proxy_factory, name, n):
    """Review 112's loop: dave has ``n`` bindings at H naming V and ``n`` at V naming H."""
    home = proxy_factory(name + "-h", e2m=False)
    other = proxy_factory(name + "-v", e2m=False, domains=("example.net",))
    at_home = ", ".join(f"<sip:dave@127.0.0.1:{other.port};k={i}>" for i in range(n))
    at_other = ", ".join(f"<sip:dave@127.0.0.1:{home.port};k={i}>" for i in range(n))
    assert _register(home, "dave", "example.com", at_home).status == 200
    assert _register(other, "dave", "example.net", at_other).status == 200
    return home, other


def test_held_k2_forks_in_the_loop_are_bounded(proxy_factory):
    n = 10
    home, other = _two(proxy_factory, "r114-k2-fork", n)
    h0, v0 = _stats(home), _stats(other)
    answers = _send_raw(home.port, _message("dave", 1), timeout=20)
    time.sleep(1.0)
    h1, v1 = _stats(home), _stats(other)
    made = h1["created"] - h0["created"] + v1["created"] - v0["created"]
    replies = h1["rpl_received"] - h0["rpl_received"] + v1["rpl_received"] - v0["rpl_received"]
    print("transactions", made, "branch replies", replies, "stranger got", answers)
    # 21 in most runs, 22 in some: the key is looked up, then noted only as the
    # request leaves, so two copies handled at once by two workers may both pass
    assert made <= 3 * n, made
    assert replies <= 3 * n * n, replies
    assert answers and answers[-1].startswith(b"SIP/2.0 482"), answers
