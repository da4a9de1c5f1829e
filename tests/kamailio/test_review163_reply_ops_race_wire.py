"""Review 163 (attacker's review of fe86571): ways round the reply budget of review 161
(``kemi._reading_left`` / ``_spend_reply_ops``: a branch's replies spend at most 64
public-key operations, a transaction's 128) and round the ACK loop key, by counts.

Set-up: review 158's counting proxy (``_COUNTING_KEMI``: every body the engine reads is
logged with the public-key operations it spent), started here with the product's default
4 workers (``[kamailio] workers``, ``kamailio_app/config.py:99``; the harness's default
is 2); bob's contacts (``_BurstContacts``) answer alice's one INVITE with bodied 183s
carrying review 158's 32-operation body labelled for the proxy (``_layered_entity``),
each with a header of its own.  An honest reading costs 2-3 operations (measured in
process with ``e2m_lab.flows``: alice's signed and encrypted INVITE 3, bob's protected
200 2).

Hole K1: two workers read a transaction's replies at once, on a budget not yet spent
------------------------------------------------------------------------------------

- Attacker: an insider callee (any of our users, or any callee our user calls: one
  branch), as in review 161 K2; nothing else needed but sending the replies back to
  back.
- Messages: one INVITE (the caller's); the callee's 16 bodied 183s per branch sent
  back to back, not 60 ms apart.
- Effect observed: one branch, three INVITEs: **4-5 readings, 128-160 operations per
  INVITE** against the branch's 64 (three runs: 160/128/160, 128/160/160, 128/128/128);
  four branches: **5-7 readings, 160-224 operations** against the transaction's 128
  (every INVITE of every run).  The
  highest figures are the caps plus three readings of 32: one for each other worker,
  so the bound is cap + (workers - 1) x 32 (``workers`` may be up to 64: 2,080 per
  branch, what review 161 K2 measured before the fix).  The same replies 60 ms apart
  spend 64 exactly (control).
- Code at fault: ``kamailio_app/kemi.py:769-781`` (``_reading_left`` reads what was
  spent, ``sht_get``, and gives the reading ``cap - spent`` without reserving it) and
  ``kemi.py:784-798`` / ``:2577-2581`` (``_spend_reply_ops`` adds what the reading
  spent after it ran, ~15 ms later): the lock makes the addition atomic, not the check
  and the spending.
- Suggested fix: reserve before the reading: under the item's lock (or with
  ``sht_inc``-style arithmetic on the ``o:`` items) add the reading's whole budget
  (``left``) to the branch and transaction totals, refusing when that passes a cap, and
  give back ``left - public_key_ops`` once it has run.  Concurrent readings then share
  the cap instead of each seeing it whole.
- Tests: ``test_hole_k1_a_burst_on_one_branch_spends_past_its_64_operations`` and
  ``test_hole_k1_a_burst_on_four_branches_spends_past_the_transactions_128`` (strict
  xfail: every INVITE's replies within 64 and 128; observed up to 160 and 224).

Hole K2: replies relayed by a trusted peer are read without any budget
----------------------------------------------------------------------

- Attacker: whoever answers a call behind a ``[limits] trusted`` peer (a peer domain's
  proxy, a gateway, an SBC in front of phones: README "addresses and networks never
  limited (peer proxies, gateways)"), i.e. any user of that peer domain our user
  calls, or one of ours whose contact is behind it.
- Messages: one INVITE to bob, whose contact is on the trusted peer's address
  (127.0.1.80); 40 bodied 183s from there, 60 ms apart (no race needed).
- Effect observed: **40 readings, 1,280 public-key operations for one INVITE**, no
  drop, no e2mreplyreads item: 20x the branch's 64, 10x the transaction's 128, and no
  upper bound but the transaction's life (fr_inv_timer) and the callee's send rate.
  The reading caps of reviews 153-157 are skipped the same way.
- Code at fault: ``kamailio_app/kemi.py:2359`` (``ksr_reply_route``: the reply limits
  run only ``if ... not self.exempt_source()``) with ``kemi.py:1274-1277``
  (``exempt_source``: our own addresses and every trusted peer).  Exemption from pike's
  *rate* is what a trusted peer needs (it carries many users); the per-transaction
  *cost* caps bound what one callee's answers make us spend, whoever relays them.
- Suggested fix: apply ``_reading_left`` to every reply of one of our transactions,
  exempt source or not (keep only pike's rate out for trusted peers); an honest call's
  replies fit the caps whatever hop relays them.
- Test: ``test_hole_k2_replies_through_a_trusted_peer_are_read_without_a_budget``
  (strict xfail: at most 16 readings and 64 operations; observed 40 and 1,280).

Controls
--------

- ``test_control_k1_the_same_replies_60_ms_apart_spend_the_branchs_64``: 16 bodied
  183s 60 ms apart on one branch (untrusted source): 2 readings, 64 operations, the
  first drop logged once: review 161's budget holds one reply at a time, on 4 workers.
- ``test_control_honest_ack_copies_half_a_second_apart_all_reach_the_callee``: an
  honest caller's ACK sent 4 times 0.5 s apart (one per 2xx copy): bob gets all 4, no
  loop drop (since review 161 every copy has one loop key; ``_resent`` takes them).

Tried and held
--------------

- A reading refused by ``response_refused`` spends and is counted
  (``_spend_reply_ops`` runs before the refusal check, kemi.py:2577-2583); a reading
  given less than it needs fails ``LimitExceededError`` with what it spent counted.
- The tm route's reading without the core route's: ``route_reply`` calls
  ``read_reply`` again only when the core route raised, and then uses the same
  ``_reply_ops`` (same ``$mi``), so it is counted too.  An exception inside
  ``_reading_left`` would leave the reply uncounted, but its inputs ($T ids, htable
  ints, a CSeq method tm matched byte for byte, ``t_reply_matching``) gave none.
- Strays: a reply matching no transaction is read with a message's 32 and counted by
  pike as a request (review 70), not by this budget: per address the same as a
  stranger's MESSAGE with that body (review 158), by design.
- Re-keying: the keys are tm's hash index and label and ``$T_branch_idx`` after
  ``t_check_trans`` (Kamailio 5.6.3 ``tm/tm.c:2469-2473`` sets the branch index for a
  reply); a spelling of the Via cannot give a branch a second count (review 155).  A
  new INVITE is a new budget: 128 per pike-counted INVITE, the documented price.
- Honest calls: readings of 2-3 operations, so a branch's 16-reading cap binds before
  its 64 operations (16 x 3 = 48); a transaction's 128 fit 42-64 honest readings, and
  an honest forked call (4 forks with a 183 each, one 200 and its ~10 retransmissions
  until the ACK: ~15 readings, ~45 operations) stays far below.  A 200 is dropped for
  operations only after ~21 honest 183s on its branch, past the 16-reading cap that
  drops it first anyway (reviews 153-157's trade-off, unchanged); the budget only
  overspends under K1, never refuses an honest reply early.  (Arithmetic from the
  measured per-reading costs, not a wire run.)
- htable cost: one INVITE adds 5 e2mreplyreads items on one branch (2 counts, 2 ``o:``,
  1 ``w:``) and 9-11 on four branches (review 161's fix: about twice the counts'
  items), each expiring 40 s after its last update (``autoexpire=40;updateexpire=1``);
  bounded by 3 x (branches + 1) per transaction, and none for a transaction whose
  replies need no reading.  Held.
- ACK loop key (no Route): copies of one ACK have always had one key (their Route is
  the same), so review 161 changed nothing for them; 4 copies 50 ms apart (faster than
  any retransmission): bob got 2, 2 dropped as a loop, harmless (the first copies went
  on; a real copy comes T1 apart or more, control above).  An ACK whose Request-URI
  changes per pass (strict routing entries) gets a key per pass but still carries our
  Via when it comes back through an RFC 3261 hop (``_came_back`` with no note asks
  ``_carries_our_via``), and a hop of the attacker's own that hides our Via and
  rewrites the URI is only the attacker sending from that hop's address, under pike
  (read, not run; review 158's visited-and-home loop test covers the honest hop).
- Spirals: ``relay`` refuses an initial request that carries our Via with no loop note
  (``_came_back(None, ...)`` is ``_carries_our_via()``), so no dialog passes home twice
  and no ACK of one can; ``make demo``'s visited -> home path passes home once (read).

Fixed (stop 48), each hole test no longer marked (each failed on fe86571):
- K1: a reading reserves what it may spend before it runs, one item at a time under
  its lock (``kemi._reserve_ops``: the branch's, then the transaction's), at most
  ``REPLY_READING_OPS`` (16), and gives back what it did not spend
  (``_settle_reply_ops``; all of it when the reply was dropped before its reading,
  from ``ksr_reply_route``'s ``finally``).  Bursts now stay at 64 a branch and 128 a
  transaction.
- K2: the per-transaction caps apply whatever the source; ``exempt_source`` spares a
  reply only from pike's count of strays.
The tests' ``contacts.invites`` checks became "at least": with the 183s refused unread,
tm sends the INVITE again as to a callee that sent no provisional answer.  The K1
control now reads four replies of 16 (refused) for the branch's 64.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from e2m_lab.kamailio_harness import SipUa
from e2m_plugins import sip
from e2m_lab.kamailio_harness import start_proxy
from tests.kamailio.test_review158_ack_cost_wire import (
    _COUNTING_KEMI, USERS, _ack, _Bob, _layered_entity, _reads, _settled)

pytestmark = [pytest.mark.kamailio]


@pytest.fixture(scope="module")
def home(pki, tmp_path_factory):
    """Review 158's counting proxy with the product's default 4 workers."""
    where = tmp_path_factory.mktemp("review163-home")
    script = where / "counting_kemi.py"
    script.write_text(_COUNTING_KEMI)
    proxy = start_proxy(where, pki=pki, e2m=True, auth=True, users=USERS,
                        extra={"kamailio": {"kemi_script": str(script), "workers": 4}})
    yield proxy
    proxy.stop()


class _BurstContacts:
    """bob's ``n`` contacts on ``address`` (ports of their own), each answering an
    INVITE with ``replies`` 183s carrying ``entity``, each with a header of its own (no
    copy of another); the contacts wait until every branch has its INVITE (``arm``
    before each call), then send ``gap`` seconds apart (0: back to back), then nothing."""

    def __init__(self, home, address: str, n: int, replies: int, entity,
                 gap: float = 0.0) -> None:
        self.home, self.address, self.replies, self.entity, self.gap = \
            home, address, replies, entity, gap
        self.socks, self.invites, self._stop, self._threads = [], 0, False, []
        self._lock = threading.Lock()
        self.arm()
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((address, 0))
            s.settimeout(0.2)
            self.socks.append(s)
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            t.start()
            self._threads.append(t)
        self._register(600)

    def arm(self) -> None:
        self._go, self._waiting = threading.Event(), 0

    def _register(self, expires: int) -> None:
        for s in self.socks:
            ua = SipUa(self.home.port, user="bob", password=USERS["bob"], source=self.address)
            try:
                reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", str(expires))])
                port = s.getsockname()[1]
                answer = ua.request(reg.replace("Contact", f"<sip:bob@{self.address}:{port}>"))
                assert answer is not None and answer.status == 200, answer
            finally:
                ua.close()

    def _serve(self, s) -> None:
        ctype, label, body = self.entity
        while not self._stop:
            try:
                data, peer = s.recvfrom(65535)
                msg = sip.parse(data)
            except (socket.timeout, OSError):
                continue
            except Exception:  # noqa: BLE001
                continue
            if not msg.is_request or msg.method != "INVITE":
                continue
            port = s.getsockname()[1]
            raws = []
            for i in range(self.replies):
                reply = sip.make_response(msg, 183, "Session Progress", [
                    ("Contact", f"<sip:bob@{self.address}:{port}>"),
                    ("Content-Type", ctype), ("Proxy-Required-Body", label)])
                reply = sip.SipMessage(reply.start_line, reply.headers, body)
                raws.append(reply.serialize().replace(b"\r\nTo: ", b"\r\nX-N: %d\r\nTo: " % i, 1))
            with self._lock:
                self.invites += 1
                self._waiting += 1
                go = self._go
                if self._waiting == len(self.socks):
                    go.set()
            go.wait(5)
            for raw in raws:
                s.sendto(raw, peer)
                if self.gap:
                    time.sleep(self.gap)

    def close(self) -> None:
        try:
            self._register(0)
        finally:
            self._stop = True
            for t in self._threads:
                t.join(timeout=2)
            for s in self.socks:
                s.close()


def _one_invite(home, source: str, contacts: _BurstContacts) -> tuple[int, int, str, int]:
    """alice's one INVITE to bob: (replies read, their public-key operations, the log,
    the e2mreplyreads items it added)."""
    contacts.arm()
    items = home.htable_items(_REPLY_READS)
    mark = home.log_mark()
    alice = SipUa(home.port, user="alice", password=USERS["alice"], source=source)
    try:
        alice.request(alice.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                      timeout=3)
    finally:
        alice.close()
    _settled(home, mark, "r158: body read INVITE", 20, 2)
    log = home.log_since(mark)
    reads, ops = _reads(log, "INVITE")
    # (the INVITE's own reading: no body, 0 operations)
    return reads - 1, ops, log, home.htable_items(_REPLY_READS) - items


_REPLY_READS = "e2mreplyreads"
_CALLS = 3     # INVITEs per hole test: the race must show in one (it did in every run)


@pytest.mark.slow   # ~15 s: three INVITEs
@pytest.mark.serial  # a burst: run alone, as measured
def test_hole_k1_a_burst_on_one_branch_spends_past_its_64_operations(home, pki):
    contacts = _BurstContacts(home, "127.0.1.63", 1, 16, _layered_entity(pki))
    try:
        calls = [_one_invite(home, "127.0.1.64", contacts) for _ in range(_CALLS)]
        seen = [c[:2] for c in calls]
        print(f"\n16 bodied 183s back to back on one branch, {_CALLS} INVITEs: "
              f"(readings, operations) {seen}; e2mreplyreads items added "
              f"{[c[3] for c in calls]}")
        # (at least: tm sends it again while the 183s are refused unread)
        assert contacts.invites >= _CALLS, contacts.invites
        assert all(ops <= 64 for _, ops in seen), seen
    finally:
        contacts.close()


@pytest.mark.slow   # ~15 s: three INVITEs
@pytest.mark.serial  # a burst: run alone, as measured
def test_hole_k1_a_burst_on_four_branches_spends_past_the_transactions_128(home, pki):
    contacts = _BurstContacts(home, "127.0.1.65", 4, 16, _layered_entity(pki))
    try:
        calls = [_one_invite(home, "127.0.1.66", contacts) for _ in range(_CALLS)]
        seen = [c[:2] for c in calls]
        print(f"\n4 x 16 bodied 183s back to back, {_CALLS} INVITEs: (readings, operations) "
              f"{seen}; e2mreplyreads items added {[c[3] for c in calls]}")
        # (at least: tm sends it again while the 183s are refused unread)
        assert contacts.invites >= 4 * _CALLS, contacts.invites
        assert all(ops <= 128 for _, ops in seen), seen
    finally:
        contacts.close()


def test_control_k1_the_same_replies_60_ms_apart_spend_the_branchs_64(home, pki):
    """One at a time, the budget holds: 2 readings of 32, the other 14 dropped unread,
    the first drop logged (review 161's control, on 4 workers)."""
    contacts = _BurstContacts(home, "127.0.1.67", 1, 16, _layered_entity(pki), gap=0.06)
    try:
        reads, ops, log, items = _one_invite(home, "127.0.1.68", contacts)
        print(f"\n16 bodied 183s 60 ms apart: {reads} readings, {ops} operations; "
              f"e2mreplyreads items added {items}")
        # (since the fix a reply's reading may spend 16: four readings, refused at 16)
        assert (reads, ops) == (4, 64), (reads, ops)
        assert log.count("64 of 64 public-key operations of one branch spent: dropped "
                         "unread") == 1, log[-3000:]
    finally:
        contacts.close()


def test_control_honest_ack_copies_half_a_second_apart_all_reach_the_callee(home):
    """An honest caller sends its ACK again for each copy of the 2xx (T1 apart and
    more): since review 161 every copy has one loop key (no Route, no Via in it), and
    all of them still go on (``_resent``: same Max-Forwards and Via shape, 400 ms)."""
    bob = _Bob(home)
    dave = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.1.69")
    try:
        invite = dave.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
        ok = dave.transact(invite)
        assert ok is not None and ok.status == 200, ok
        raw = _ack(dave, invite, ok).serialize()
        mark = home.log_mark()
        for _ in range(4):
            dave.sock.sendto(raw, ("127.0.0.1", home.port))
            time.sleep(0.5)
        got = bob.wait("ACK", 4, timeout=5)
        log = home.log_since(mark)
        print(f"\n4 copies of one ACK 0.5 s apart: bob got {got}; "
              f"loop drops {log.count('came back to us unchanged (a loop)')}")
        assert got == 4 and "came back to us unchanged" not in log, (got, log[-2000:])
    finally:
        dave.close()
        bob.close()


_PEER = "127.0.1.80"     # a [limits] trusted peer: a gateway or peer proxy in front of bob


@pytest.fixture(scope="module")
def peered(pki, tmp_path_factory):
    """The counting home proxy with one trusted peer (``[limits] trusted``: the product's
    setting for peer proxies and gateways)."""
    where = tmp_path_factory.mktemp("review163-peered")
    script = where / "counting_kemi.py"
    script.write_text(_COUNTING_KEMI)
    proxy = start_proxy(where, pki=pki, e2m=True, auth=True, users=USERS,
                        limits={"trusted": [_PEER]},
                        extra={"kamailio": {"kemi_script": str(script), "workers": 4}})
    yield proxy
    proxy.stop()


def test_hole_k2_replies_through_a_trusted_peer_are_read_without_a_budget(peered, pki):
    contacts = _BurstContacts(peered, _PEER, 1, 40, _layered_entity(pki), gap=0.06)
    try:
        reads, ops, log, items = _one_invite(peered, "127.0.1.81", contacts)
        print(f"\n40 bodied 183s 60 ms apart through the trusted peer {_PEER}: {reads} "
              f"readings, {ops} public-key operations; e2mreplyreads items added {items}; "
              f"drops logged {log.count('dropped unread')}")
        # (at least: tm sends it again while the 183s are refused unread)
        assert contacts.invites >= 1, contacts.invites
        assert reads <= 16 and ops <= 64, (reads, ops)
    finally:
        contacts.close()
