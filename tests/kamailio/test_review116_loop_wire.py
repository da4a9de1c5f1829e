"""Review 116 (an attacker's review of 4587037), wire: stop 39's Max-Forwards loop rule
(``kemi._came_back``, ``_note_relayed``, ``_max_forwards``, htable ``e2mloop``) on a real
Kamailio 5.6.3, with review 114's hop (``test_review114_loop_wire._Hop``) made to write
Max-Forwards in other ways.  This module also holds the whole review's "tried and held".

Hole K2 (``test_hole_k2_*``): **off-path sender** springing a trap an **insider UA** set
(dave's binding naming a hop), where the hop on the loop hides the Via stack and writes
Max-Forwards afresh (70) instead of counting it down (an element that regenerates the
header; or an **untrusted hop** doing so).

- Set-up: a plain proxy H (``e2m=False``), dave registered at H with ``Contact:
  <sip:dave@127.0.0.1:HOP>``; HOP (``_Hop116``, stateless) answers 100 and sends each
  request back to H with Request-URI ``sip:dave@127.0.0.1:H``, its own single Via
  (topology hiding, as review 114's K2) and ``Max-Forwards: 70``.
- Messages: one stranger's ``MESSAGE sip:dave@example.com`` to H.
- Effect (seen, two runs): 4,767 transactions at H for the one datagram (hop got 8,412
  and 8,491 requests with retransmissions), ended only because H's 64 MB of shared memory
  ran out: "relay_reply(): cannot alloc reply shmem" and "_reply_light(): cannot allocate
  shmem buffer" logged 1,441 times each, "build_cell(): could not allocate shared
  memory", "t_newtran(): new_t failed" (the proxy then fails honest requests, review
  107/112's effect).  Before stop 39 the same hop looped too (no Via of ours, and
  Max-Forwards never runs out): stop 39's rule needs the hop to count down.
- At fault: ``kamailio_app/kemi.py:676-680`` (``_came_back``: a repeat of the key within
  32 s is a loop only with a lower Max-Forwards than noted or a Via of ours) and
  ``kemi.py:683-687`` (``_note_relayed`` overwrites the noted value at every pass, so
  even a hop that counts down once and then resets keeps it "not lower").
- Honest scope: on loopback pike never counts (the hop is 127.0.0.1); on separate hosts
  pike counts the hop's address and would ban it after its request density, unless the
  hop is a ``[limits] trusted`` peer (an SBC is the element that rewrites headers, and the
  one an operator lists as trusted).  A hop run by the attacker gains no factor over
  sending the requests itself (one request from it per transaction at H); the gain is
  the stranger's: one datagram, unbounded passes, through an element that is honest
  by its own rules.
- Fix (suggested): count the repeats of a key (``sht_inc`` on ``e2mloop``) and refuse
  the request when the same key comes back more than a few times within the 32 s
  whatever its Max-Forwards and Vias (an honest re-send after a timeout is one repeat,
  a loop is dozens a second); and keep the first noted Max-Forwards (do not overwrite
  it at each pass).

Control (passes unmarked): ``test_control_k2_the_same_hop_counting_max_forwards_down_is_482``
(review 114's hop, counting down: 2 transactions, "came back to us unchanged (a loop):
refused").

Tried and held (this review; run unless said read):

- Max-Forwards written by the hop as four digits with leading zeros (``0068``, valid
  ``1*DIGIT``; ``_max_forwards`` takes at most three digits): still refused at the
  second pass, 2 transactions, "came back to us unchanged (a loop)"
  (``test_held_k2_max_forwards_written_with_leading_zeros_is_still_refused``).
- Honest flows against the lower-Max-Forwards rule (read): a retransmission is absorbed
  by tm before ``relay``; a request sent again after 401/407 has a new CSeq; CANCEL and
  every ACK are relayed by ``t_relay`` directly (in-dialog ACKs too, at the node and at
  the front), never through ``relay``, so a 2xx's retransmitted ACKs through a front
  (whose address a node lists as an alias, so its Via is "ours") are not 482; a front's
  failover goes by ``t_relay`` in the failure route to another node (htable per node);
  a visited and a home proxy of ours each note on their own table; a spiral through
  the same proxy comes back with another Request-URI or Route (the key holds them).  A
  caller re-sending the same request with a new branch comes with its own Max-Forwards
  again (not lower) and no Via of ours: passed to the engine as before; only a re-send
  that reaches the proxy over a longer path than the first (RFC 3263 failover from a
  direct to an indirect route) would be 482, and no part of this lab does that.
- A replay from an upstream untrusted hop with a lower Max-Forwards (read): 482 before
  the engine instead of the engine's 403; it tells the hop only what it knows (it sent
  the first copy), and no counter moves (``e2m_refused_403`` counts the engine's
  refusals, a 482 is logged at info): a monitoring difference, not counted as a hole.
- The reply's Record-Route path (``moved_route_entries``, read and run): every read of
  a reply field there is inside its ``try``; a ``UnicodeDecodeError`` from the To tag
  (``$tt``, the no-Record-Route branch), the From/To URIs (``_dialog_parties`` gives
  None, no token fits: "no entry of ours"), the Vias (``_via_below_ours`` gives None: no
  entry's MAC fits) or ``$rm`` in ``record_routed_here`` becomes ``["?"]``, dropped.
  The hole there is the CSeq method's *case* (K1, ``test_review116_cseq_case_wire.py``).
  Contact is not read on that path.  A front returns ``[]`` by design (its nodes
  check).
- The phone's certificate client (read, with ``tests/unit/test_certservice_client.py``'s
  harness in mind): a service that refuses everything gets one follow and one fetch per
  AoR, then the failure is kept 300 s (no storm); a slow fetch is ended at
  ``FETCH_TIMEOUT`` (5 s) and fails the send for 300 s (as before the stop); a NOTIFY for
  a forgotten fetch is 481; a hop forging the 403 only downgrades following to fetching
  (a certificate kept 60 s, refetched at the next send), which the same hop could do
  worse by dropping the NOTIFYs; ``_follow_refused`` is bounded (``MAX_OUTCOMES``).

Untried: the K1 shape on a SUBSCRIBE 200 (``subscribe``) and on an early 183 with a To
tag; K2 with E2M on and on a cluster; the e2mloop memory per relayed request under a
flood (one entry of a 32-hex key and an int per relayed request for 32 s, like
``e2mbranch``: not measured); whether a 401/407 to the phone's follow SUBSCRIBE (from a
proxy that challenges it) is taken by ``_subscribe_answer`` as a refusal while pjsua
retries with credentials (``_publish_answer`` skips 401/407, ``_subscribe_answer`` does
not: read only).

Fixed (stop 39): the loop note keeps the first Max-Forwards and counts the passes
(``_note_relayed``); a request relayed twice already is a loop at its third coming
(``_came_back``).  The hole test failed on the code before the fix and passes with it
(marker removed).
"""

from __future__ import annotations

import collections
import hashlib
import re
import time

import pytest

from e2m_plugins import sip
from tests.kamailio.test_review114_loop_wire import (_Hop, _created, _message, _register,
                                                     _send_raw)

pytestmark = [pytest.mark.kamailio]


class _Hop116(_Hop):
    """Review 114's Via-hiding hop, with the Max-Forwards it sends written as ``mf``
    says: "down" one less (review 114's), "zeros" one less with leading zeros to four
    digits (``1*DIGIT``, RFC 3261 25.1), "reset" always 70."""

    def __init__(self, target_port, ruri, mf):
        self.mf = mf
        super().__init__(target_port, ruri, hide=True)

    def _run(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(65535)
            except Exception:  # noqa: BLE001 - timeout or closed
                if not self.running:
                    return
                continue
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
            written = {"down": str(forwards), "zeros": "%04d" % forwards,
                       "reset": "70"}[self.mf]
            branch = hashlib.sha256("\n".join(msg.get_all("Via")).encode()).hexdigest()[:16]
            onward = msg.remove("Via").replace("Max-Forwards", written)
            rest = onward.serialize().split(b"\r\n", 1)[1]
            via = f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-hop{branch}"
            out = f"{msg.method} {self.ruri} SIP/2.0\r\n{via}\r\n".encode() + rest
            self.sock.sendto(out, ("127.0.0.1", self.target))


def _through(proxy_factory, name, *, mf, e2m=False, wait=1.5):
    home = proxy_factory(name, e2m=e2m)
    hop = _Hop116(home.port, f"sip:dave@127.0.0.1:{home.port}", mf)
    try:
        bound = _register(home, "dave", "example.com", f"<sip:dave@127.0.0.1:{hop.port}>")
        assert bound is not None and bound.status == 200
        before = _created(home)
        mark = home.log_mark()
        answers = _send_raw(home.port, _message("dave", 1), timeout=3)
        time.sleep(wait)
        made = _created(home) - before
        time.sleep(1.0)
        later = _created(home) - before
        print("mf", mf, "e2m", e2m, "transactions at H", made, "a second later", later,
              "hop got", hop.got, "stranger got", answers)
        return made, later, hop.got, home.log_since(mark)
    finally:
        hop.close()


def _kinds(log):
    return collections.Counter(re.sub(r"[0-9]+", "N", ln.split("}", 1)[-1])[-90:]
                               for ln in log.splitlines())


def test_hole_k2_a_hop_hiding_the_vias_and_writing_max_forwards_afresh_loops_unbounded(
        proxy_factory):
    made, later, got, log = _through(proxy_factory, "r116-k2-reset", mf="reset")
    print("log kinds", _kinds(log).most_common(5))
    # secure: the same request back from where we sent it is refused at an early repeat
    assert made <= 3, (made, got)


def test_control_k2_the_same_hop_counting_max_forwards_down_is_482(proxy_factory):
    made, _, _, log = _through(proxy_factory, "r116-k2-down", mf="down")
    assert made <= 3, made
    assert "came back to us unchanged (a loop): refused" in log


def test_held_k2_max_forwards_written_with_leading_zeros_is_still_refused(proxy_factory):
    made, _, _, log = _through(proxy_factory, "r116-k2-zeros", mf="zeros")
    print("log kinds", _kinds(log).most_common(5))
    assert made <= 3, made
