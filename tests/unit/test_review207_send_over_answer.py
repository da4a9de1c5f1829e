"""Review 207: stop 52's lock in ``close_answered`` (commit 5d67bf0), attacked.

Honest break HB1: ``send_over`` still sends before it stores, outside the lock
--------------------------------------------------------------------------------

- Attacker: none needed (an honest TCP follower whose own connection closed just before
  its NOTIFY, so tm opened a new one to its port, where it listens with
  ``SO_REUSEPORT``); a subscriber doing so on purpose answers at once to hit the window.
- Messages: the NOTIFY over the new connection, the follower's 200 over it, read by
  another process before the sender stored the place.
- Effect observed: stop 52's race, in the other sender.  ``send_over`` calls ``send()``
  with no lock held, then looks the connection up, then takes the site's lock and
  stores the place.  The answer read in between takes the lock at once (nobody holds
  it), finds no place and closes nothing: ``closed == []``, the place then stored and
  held, and the connection lives until the sweep closes it ``CONNECT_LIFETIME`` = 4 s
  after the store (the test's clock: not closed at +3.9 s, closed at +4.0 s), one place
  of the address's two held for those 4 s, over the bound if need be.
- Code at fault: kamailio_app/cert_connects.py:167-184 (``send_over``: ``send()`` at
  line 173 before ``sht_lock`` at line 178); the fix at lines 206-215 only helps a
  sender that holds the lock across its send (``open_with``).
- Suggested fix: in ``send_over`` take the site's lock before ``send()`` and keep it
  to the store, as ``open_with`` does (the lookup after the send is a native route, no
  listing, so the hold is as short as ``open_with``'s shared-place branch).
- Test: ``test_hb1_an_answer_read_before_send_over_stored_the_place_closes_it``.

Controls
--------

- ``test_control_send_over_answer_after_the_store_closes_it``: the same answer read
  after ``send_over`` stored the place closes connection 41 and frees the place.
- ``test_control_open_with_answer_in_the_window_waits_and_closes``: stop 52's fix holds
  for ``open_with``: the answer thread read during ``send()`` is still blocked after
  0.3 s, and once the place is stored it closes 41 and frees the place.
- ``test_control_close_answered_in_the_sending_process_does_not_wedge``: with a lock
  recursive per process (Kamailio 5.6.3 ``ht_slot_lock``: ``locker_pid`` equal to
  ``my_pid()`` only bumps ``rec_lock_level``), an answer handled by the very process
  that holds the site's lock in ``open_with`` returns at once (under 1 s) and leaves
  the lock level at 0.

Tried and held
--------------

- (1) Wedge: ``ht_slot_lock`` is recursive per process (src/modules/htable/ht_api.c
  148-174 at 5.6.3), and ``close_answered`` holds no other lock when it takes the
  site's (the e2mnotify reads in ``on_reply`` are each locked and released inside
  ``sht_get``/``sht_rm``).  ``open_with`` holds e2mconnects' slot across ``send()``,
  which takes e2mnotify's slot inside ``tm:local-request``; no process takes them in the
  other order, so no cycle.  ``try/finally`` returns the lock on any exception.
- (2) Who reaches the lock: ``CertService.on_reply`` (kamailio_app/cert_route.py
  468-496) calls ``close_answered`` only for a NOTIFY 2xx/481 that tm matched to our
  transaction, whose Via branch is in e2mnotify with the same dialog ids, and only the
  first such answer (the branch is removed); UDP answers return before the lock.  An
  off-path sender knows no branch: it cannot make a reply take the lock.  A subscriber
  can make one lock per NOTIFY sent to it, each a single ``sht_get`` under the lock.
- The hold that now delays an answer is ``open_with``'s: one native lookup, at most
  one ``core.tcp_list`` listing (the shared-place branch whose connection is gone) and
  one ``t_uac_send`` (tcp_async: the connect is not waited for).  The same holds
  delayed workers' sends toward the site before this commit; the answer adds one waiter
  per NOTIFY, no new long hold.  Not measured on a live proxy in this review's time.
- (3) Other orders: an answer read between ``close_answered``'s two locks while
  ``open_with`` takes a new place: the new place's floor is at or above the answered
  connection's id, so the second lock does not free it (``mine`` needs ``conid >
  floor``).  An answer over UDP first then TCP: the first (UDP) one removes the branch
  and closes nothing; the TCP connection lives its 4 s, its bound (the subscriber could
  as well not answer).  The sweep: ``listed_ms`` is read before the listing and
  ``open_with`` stores ``taken`` after its send, so a place stored after the listing
  is not freed for want of a connection (and both run in the one timer process).
- HB1's fix checked out of tree (``send_over`` holding the lock from before ``send()``
  to the store): the HB1 test then closes 41 and frees the place, controls still pass.

Fixed (stop 52)
---------------
HB1: ``send_over`` now sends and stores under the site's lock, as ``open_with`` does, so
an answer read in between waits for the place and closes its connection.  The strict
xfail passed (XPASS) with the fix and its marker is gone.  The review's figures test,
which accepted the fixed outcome as well and so could not fail on it, is removed: the
figures above are from it, on 5d67bf0.
"""

from __future__ import annotations

import threading
import time

from kamailio_app.cert_connects import OpenedConnections
from tests.unit.test_cert_connects import LISTENER, STRANGER, Clock, _outbound
from tests.unit.test_stop52_cert_answer_before_place import LockingKsr

PORT, OLD, NEW = 7001, 30, 41


def _answer(ksr: LockingKsr, service: OpenedConnections, conid: int = NEW) -> None:
    ksr.answer_values({"$proto": "tcp", "$si": STRANGER, "$sp": PORT, "$conid": conid})
    service.close_answered()


def _send_over_with_answer(wait: float):
    """send_over toward a follow whose connection OLD closed: tm opens NEW, and the
    follower's answer is read by another process while send_over has yet to store."""
    ksr, clock = LockingKsr(), Clock()
    service = OpenedConnections(ksr, [LISTENER], clock=clock)
    readers: list[threading.Thread] = []

    def send():
        ksr.found[f"{STRANGER}:{PORT}"] = NEW
        ksr.listing = [_outbound(NEW, PORT)]
        reader = threading.Thread(target=_answer, args=(ksr, service))
        reader.start()
        reader.join(wait)
        readers.append(reader)

    service.send_over(STRANGER, PORT, OLD, send)
    for reader in readers:
        reader.join(5)
        assert not reader.is_alive()
    return ksr, clock, service


def test_hb1_an_answer_read_before_send_over_stored_the_place_closes_it():
    ksr, _clock, _service = _send_over_with_answer(wait=0.3)
    assert ksr.closed == [NEW], ksr.closed
    assert not ksr.items, ksr.items


def test_control_send_over_answer_after_the_store_closes_it():
    ksr, clock = LockingKsr(), Clock()
    service = OpenedConnections(ksr, [LISTENER], clock=clock)

    def send():
        ksr.found[f"{STRANGER}:{PORT}"] = NEW
        ksr.listing = [_outbound(NEW, PORT)]

    service.send_over(STRANGER, PORT, OLD, send)
    assert ksr.items                     # the new connection kept as a place
    _answer(ksr, service)
    assert ksr.closed == [NEW] and not ksr.items


def test_control_open_with_answer_in_the_window_waits_and_closes():
    ksr, clock = LockingKsr(), Clock()
    service = OpenedConnections(ksr, [LISTENER], clock=clock)
    blocked: list[bool] = []
    readers: list[threading.Thread] = []

    def send():
        ksr.listing = [_outbound(NEW, PORT)]
        reader = threading.Thread(target=_answer, args=(ksr, service))
        reader.start()
        reader.join(0.3)
        blocked.append(reader.is_alive())
        readers.append(reader)

    assert service.open_with(STRANGER, PORT, send)
    for reader in readers:
        reader.join(5)
        assert not reader.is_alive()
    assert blocked == [True]
    assert ksr.closed == [NEW] and not ksr.items


class RecursiveKsr(LockingKsr):
    """Slot locks recursive per process, as Kamailio 5.6.3's ht_slot_lock."""

    def __init__(self) -> None:
        super().__init__()
        self._rlock = threading.RLock()
        self.level = 0

    def sht_lock(self, table, key):
        self._rlock.acquire()
        self.level += 1

    def sht_unlock(self, table, key):
        self.level -= 1
        self._rlock.release()


def test_control_close_answered_in_the_sending_process_does_not_wedge():
    ksr, clock = RecursiveKsr(), Clock()
    service = OpenedConnections(ksr, [LISTENER], clock=clock)
    took: list[float] = []

    def send():
        ksr.listing = [_outbound(NEW, PORT)]
        started = time.monotonic()
        done = threading.Event()

        def same_process():
            _answer(ksr, service)
            done.set()
        # the same "process": run inline, under the lock open_with holds
        same_process()
        took.append(time.monotonic() - started)
        assert done.is_set()

    assert service.open_with(STRANGER, PORT, send)
    assert took and took[0] < 1.0
    assert ksr.level == 0
