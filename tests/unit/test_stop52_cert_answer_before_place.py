"""Stop 52: a NOTIFY's answer that is read before its sender stored the place still
closes the connection and frees the place.

Honest break found in stop 52 (stop 47's wire test failed in a run beside a bench)
---------------------------------------------------------------------------------

- Who: an honest UDP follower of a large certificate, sent over a TCP connection the
  certificate service opens (``cert_connects.OpenedConnections.open_with``).
- Effect observed: ``test_stop47_cert_answer_closes_wire`` read ``{'told': True,
  'closed_after': 4.01, 'place_held': True}``: the follower answered 200 at once, and the
  connection lived to ``CONNECT_LIFETIME``, its place held, as before stop 47's fix.
- Code at fault: ``open_with`` sends the NOTIFY and then stores its place, both under the
  site's lock.  The answer is read in another process, and ``close_answered`` looked for
  the place without that lock: an answer that came in before the sender stored the place
  (the sender descheduled between the two, on a loaded machine) found no place, closed
  nothing, and no later answer would.
- Fix: ``close_answered`` reads the places under the site's lock, so an answer that
  overtook the store waits for it.  The listing that follows stays outside the lock.

The test runs the answer in a thread while the sender's ``send`` is under way, with
real locks, as two Kamailio processes would.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from kamailio_app.cert_connects import OpenedConnections
from tests.unit.test_cert_connects import LISTENER, STRANGER, Clock, FakeKsr, _outbound


class LockingKsr(FakeKsr):
    """FakeKsr whose htable locks block, one per key, as Kamailio's slot locks do
    between processes; the answer's own KSR values live in its thread."""

    def __init__(self) -> None:
        super().__init__()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._local = threading.local()

    def sht_lock(self, table, key):
        self._locks[key].acquire()

    def sht_unlock(self, table, key):
        self._locks[key].release()

    def get(self, name):
        own = getattr(self._local, "vars", None)
        if own is not None and name in own:
            return own[name]
        return super().get(name)

    def answer_values(self, values: dict[str, object]) -> None:
        self._local.vars = dict(values)

    def tcp_close_connection(self):
        self.closed.append(self.get("$conid"))

    def exec(self, command):
        super().exec(command)
        own = getattr(self._local, "vars", None)
        if own is not None:
            own["$jsonrpl(body)"] = self.vars["$jsonrpl(body)"]


def _answer_while_sending(wait: float) -> tuple[LockingKsr, list[int]]:
    ksr = LockingKsr()
    service = OpenedConnections(ksr, [LISTENER], clock=Clock())
    port, conid = 7001, 41

    def answer():
        # the follower's 200 over the new connection, read by another worker
        ksr.answer_values({"$proto": "tcp", "$si": STRANGER, "$sp": port, "$conid": conid})
        service.close_answered()

    def send():
        # the NOTIFY goes out and opens connection 41; its answer is back and read
        # while this worker has yet to store the place
        ksr.listing = [_outbound(conid, port)]
        reader = threading.Thread(target=answer)
        reader.start()
        reader.join(wait)
        sent.append(reader)

    sent: list[threading.Thread] = []
    assert service.open_with(STRANGER, port, send)
    for reader in sent:
        reader.join(5)
        assert not reader.is_alive()
    return ksr, ksr.closed


def test_an_answer_read_before_the_place_was_stored_closes_its_connection():
    ksr, closed = _answer_while_sending(wait=0.3)
    assert closed == [41], closed
    # and the place is free for the next NOTIFY toward that address
    assert not ksr.items, ksr.items


def test_control_an_answer_after_the_store_closes_it_too():
    ksr = LockingKsr()
    service = OpenedConnections(ksr, [LISTENER], clock=Clock())
    assert service.open_with(STRANGER, 7001, lambda: None)
    ksr.listing = [_outbound(41, 7001)]
    ksr.answer_values({"$proto": "tcp", "$si": STRANGER, "$sp": 7001, "$conid": 41})
    service.close_answered()
    assert ksr.closed == [41] and not ksr.items
