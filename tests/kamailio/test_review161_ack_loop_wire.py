"""Review 161 (attacker's review of cbd1d09): review 158 K1's fix of the ACK loop,
attacked by a Route set that changes at every pass.

Set-up: review 158's counting proxy (``home`` from ``test_review158_ack_cost_wire``:
its wrapper logs every body the engine reads and the public-key operations it spent),
its ``visited`` plain routing hop (next_hop = home), bob's phone and dave, a stranger of
other.example.net who calls bob once and so holds our route token; the ACK's body is
review 158's 32-RSA-decryption one (``_layered_entity``).

Hole K1: an ACK whose Route set names us 8 times spirals through us 8 times
---------------------------------------------------------------------------

- Attacker: the off-path stranger of review 158 K1 (one call to any of our users).
- Messages: one ~30 KB ACK in his call whose Route set is the 200's Record-Route
  repeated 8 times (16 entries): ``visited, home`` x 8 through the project's own two
  proxies, or ``home, R`` x 8 with R any loose-routing proxy, one that keeps the Vias
  (``_Reflector``) or one that hides them (``_HidingHop``, topology hiding).
- Effect observed: for ONE datagram, **8 passes at home, 8 readings, 256 public-key
  operations** (0.12-0.16 s of home's CPU) in all three variants, every run; with 9 pairs
  (18 entries) 9 passes, 9 readings, 288 operations.  Review 158's fix stops only a
  Route set longer than 16 entries: there every pass's relay key is the same
  (``"?"``), so the lower Max-Forwards of the second is seen (control below).  At 16
  entries or fewer, each pass has lost a Route entry, so its key is new, no e2mloop
  note is found, and the Via of ours that the request carries (the keeping hop:
  home's own Via right below R's) is never looked at: ``_came_back``'s "no note:
  ``_carries_our_via()``" branch is dead code, as ``_loop_check`` calls it only when
  a note was held.  85 honest MESSAGEs' public-key work (3 each) for one datagram,
  a third of review 158 K1's before its fix.
- Also seen: a bodiless BYE through the Via-hiding hop with 8 pairs made 37 passes
  at home, 60 relays by the hop and 8 BYEs at bob (tm's retransmissions towards the
  silent hop each start another spiral, taken for resends by ``_resent``); no
  reading (0 operations, 0.03 s), so not a test here.  A BYE or MESSAGE with the
  32-operation body is refused at its first pass (1 reading).
- Code at fault: ``kamailio_app/kemi.py:718`` (``_loop_check``: ``held is not None and
  _came_back(...)``, so a request whose key is new is never checked for our Via) and
  ``kemi.py:696-706`` (``_relay_key`` keys the Route set, which every pass shortens: a
  loop through our token is taken for a spiral); used by ``route_in_dialog``'s ACK
  branch (``kemi.py:1567``) and ``relay`` (``kemi.py:1944``).
- Suggested fix: in a dialog of ours, key the pass count by what a spiral cannot
  change (Call-ID, tags, CSeq, method, body digest) and not the Route set, or refuse
  a request whose Route set past our consumed entry names one of our tokens again
  more than once (an honest dialog spirals through us at most twice: review 158's
  bound); and call ``_came_back`` (its Via check) for a first coming too.
- Tests: ``test_hole_k1_an_ack_of_16_route_entries_spirals_through_visited_and_home``
  and ``test_hole_k1_any_loose_routing_proxy_spirals_it_8_times`` (both hops), strict
  xfails: at most 2 passes at home; observed 8.

Controls
--------

- ``test_control_k1_past_16_route_entries_the_loop_rule_holds``: the same ACK with 40
  Route entries through the keeping hop: 1 pass, 1 reading, 32 operations, "came back to
  us unchanged (a loop): dropped" once (review 158's fix holds where the key stays).

Tried and held
--------------

- Review 158's own K1 and K2 tests pass on cbd1d09 (80 entries, through visited or the
  keeping hop: 1 reading, 32 operations, dropped at the second coming; 12 ACKs with a
  Request-URI each: 12 readings, at most 384 operations).
- Replies: see ``test_review161_reply_cost_wire.py`` (K2 there).

Fixed (stop 48): the in-dialog ACK's loop check keys it without its Route
(``kemi._relay_key(with_route=False)``, ``_loop_check``): every pass of one ACK shares
the key, so its second coming (a lower Max-Forwards, or past ``_MAX_PASSES``) is dropped
before it is read.  The hole tests, no longer marked, failed on cbd1d09 and pass (2
passes at home, whichever hop).  The side observation (a bodiless BYE through the
Via-hiding hop, 37 passes, no reading) is review 119 K2's open class, left as it is.
"""

from __future__ import annotations

import socket
import threading

import pytest

from e2m_plugins import sip
from tests.kamailio.test_review158_ack_cost_wire import (  # noqa: F401 - fixtures
    _Bob, _call_through, _dave_in_a_call, _in_dialog, _layered_entity, _reads, _Reflector,
    _settled, _workers_cpu, home, visited)

pytestmark = [pytest.mark.kamailio]


class _HidingHop:
    """A loose-routing proxy that hides the Via stack (topology hiding: reviews 114 and
    123's hops): an in-dialog request whose top Route names it loses that entry, one
    Max-Forwards, and every Via but a new one of its own, and goes to the next Route
    entry (else its Request-URI)."""

    def __init__(self, address: str = "127.0.0.171") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)
        self.address, self.port = address, self.sock.getsockname()[1]
        self.uri = f"<sip:{address}:{self.port};lr>"
        self.relayed = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        n = 0
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(65535)
                msg = sip.parse(data)
            except (socket.timeout, OSError):
                continue
            except Exception:  # noqa: BLE001
                continue
            if not msg.is_request:
                continue
            routes = msg.get_all("Route")
            if not routes or f"{self.address}:{self.port}" not in routes[0]:
                continue
            forwards = int(msg.get("Max-Forwards") or "70") - 1
            if forwards <= 0:
                continue
            n += 1
            headers = [("Via", f"SIP/2.0/UDP {self.address}:{self.port};branch=z9hG4bK-hide{n}")]
            dropped = False
            for name, value in msg.headers:
                low = name.lower()
                if low in ("via", "v"):
                    continue
                if low == "route" and not dropped:
                    dropped = True
                    continue
                if low == "max-forwards":
                    value = str(forwards)
                headers.append((name, value))
            out = sip.SipMessage(msg.start_line, tuple(headers), msg.body)
            target = sip.parse_address(routes[1]).uri if len(routes) > 1 else msg.request_uri
            rest = target.split("@")[-1] if "@" in target else target.split(":", 1)[1]
            host, _, port = rest.split(";")[0].partition(":")
            self.sock.sendto(out.serialize(), (host, int(port or 5060)))
            self.relayed += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


def _loop(home, pki, hop, method: str, pairs: int, body: bool = True):
    bob = _Bob(home)
    dave = None
    try:
        dave, invite, ok = _dave_in_a_call(home, bob)
        ours = list(reversed(ok.get_all("Record-Route")))
        assert len(ours) == 1, ours
        entity = _layered_entity(pki) if body else None
        raw = _in_dialog(dave, invite, ok, method, [ours[0], hop.uri] * pairs, entity)
        mark = home.log_mark()
        cpu = _workers_cpu(home)
        before = bob.got.get(method, 0)
        dave.sock.sendto(raw, ("127.0.0.1", home.port))
        passes = _settled(home, mark, f"e2m: {method} request")
        cpu = _workers_cpu(home) - cpu
        log = home.log_since(mark)
        reads, ops = _reads(log, method)
        return dict(octets=len(raw), passes=passes, reads=reads, ops=ops, cpu=round(cpu, 3),
                    relayed=hop.relayed, bob=bob.got.get(method, 0) - before,
                    loop_logged=log.count("came back to us unchanged"))
    finally:
        if dave is not None:
            dave.close()
        bob.close()


def test_hole_k1_an_ack_of_16_route_entries_spirals_through_visited_and_home(home, visited, pki):
    bob = _Bob(home)
    dave = None
    try:
        dave, invite, ok, routes = _call_through(visited, bob, "127.0.0.178")
        raw = _in_dialog(dave, invite, ok, "ACK", routes * 8, _layered_entity(pki))
        mark = home.log_mark()
        cpu = _workers_cpu(home)
        dave.sock.sendto(raw, ("127.0.0.1", visited.port))
        passes = _settled(home, mark, "e2m: ACK request")
        cpu = _workers_cpu(home) - cpu
        reads, ops = _reads(home.log_since(mark), "ACK")
        print(f"\none {len(raw)}-octet ACK through visited: {passes} passes at home, {reads} "
              f"readings, {ops} public-key operations, {cpu:.2f} s CPU; bob got "
              f"{bob.got.get('ACK', 0)}")
        assert passes <= 2, (passes, reads, ops, cpu)
    finally:
        if dave is not None:
            dave.close()
        bob.close()


@pytest.mark.parametrize("kind", ["keeps the Vias", "hides the Vias"])
def test_hole_k1_any_loose_routing_proxy_spirals_it_8_times(home, pki, kind):
    hop = _Reflector("127.0.0.179") if kind == "keeps the Vias" else _HidingHop("127.0.0.180")
    try:
        got = _loop(home, pki, hop, "ACK", 8)
        print(f"\nthrough a hop that {kind}: {got}")
        assert got["passes"] <= 2, got
    finally:
        hop.close()


def test_control_k1_past_16_route_entries_the_loop_rule_holds(home, pki):
    """The same ACK with 20 pairs (40 entries, more than ``_header_entries`` reads): its
    first two passes have a relay key naming no Route ("?"), the same key, and the
    lower Max-Forwards makes the second a loop (review 158's fix)."""
    hop = _Reflector("127.0.0.181")
    try:
        got = _loop(home, pki, hop, "ACK", 20)
        print(f"\n40 Route entries: {got}")
        assert got["passes"] == 1 and got["loop_logged"] == 1, got
        assert got["reads"] == 1 and got["ops"] == 32, got
    finally:
        hop.close()
