"""Review 200 (attacker's review of c6d4dea, ``KsrHtable._held``), wire: on a real
Kamailio 5.6.3, a write under a slot lock reuses the value ``sht_get`` gave under that
lock to decide whether ``put_expiring`` sets the item's expiry again (stop 46's
``sht_setxs`` bug).  Review 196 checked it on a model only.

No hole found in the time given (about 15 minutes): no item of ``e2mkeys`` or
``e2mseen`` was left without an expiry or with one past its bound, and no honest call
broke.

Controls
--------

- ``test_control_mixed_calls_two_uas_at_once_all_items_expire``: one proxy (single
  node, ``proxy_factory``); two callers at once (two threads, two phone addresses),
  each running keyed calls under CEK reuse (kekri answers): forked 183s then 200 then a
  re-INVITE under the offer key; a CANCEL/200 race; a plain 200 then a re-INVITE; then
  alice's BYE after the plain call's re-INVITE (the others left without a BYE: the
  dialog's key keeps its 12 h).  Three rounds per caller: 18 calls in about 6 s.  Afterwards every item's life in
  ``e2mkeys`` (<= 12 h + 5 s) and ``e2mseen`` (<= 1 h) is read with
  ``proxy.htable_lives``: none is ``inf``, none past its bound, and every call got its
  200, its re-INVITE's 200 (and the BYE its 200).  Run on f4bcb16: 18 calls in 6.4 s,
  ``e2mkeys`` 24 items (36 before the BYEs were added: the BYEs end 12), longest
  43199 s; ``e2mseen`` 108 items, longest 332 s; none
  ``inf``.

Not done in the time: the two-node DMQ cluster run (``tests/cluster``); the DMQ race
below is from reading the code only.

Tried and held (reading Kamailio 5.6.3's htable at tag 5.6.3, with the run above)
-------------------------------------------------------------------------------

- A DMQ peer's replicated write landing between our locked ``sht_get`` and our
  ``sht_setxs``: ``ht_dmq_replay_action`` (``src/modules/htable/ht_dmq.c``) applies
  ``HT_DMQ_SET_CELL`` with ``ht_set_cell(..., mode)``, and ``ki_ht_setxs``
  (``htable.c:1292``) replicates it with ``mode`` 1, so the peer's apply takes the same
  slot lock (``ht_set_cell_ex``, ``ht_api.c:490``, ``if(mode) ht_slot_lock``); the
  expiry action (``ht_set_cell_expire``, ``ht_api.c:704``) and removals lock too.  The
  DMQ worker is another process, and the slot lock is recursive only for the process
  holding it (``locker_pid``, ``ht_api.c:148-160``), so the peer's write waits for our
  unlock: the value held under the lock cannot change under us.
- The htable timer (``ht_timer``) expires items under the same slot lock
  (``ht_api.c:1163-1171``): no expiry under our lock.  An item expired but not yet
  collected reads as None, which ``put_expiring`` treats as "set the expiry again".
- Nested locks of the same name: ``unlock`` pops the name, the outer hold then reads
  again (safe, one read more).  Two names in one slot: each has its own ``_held`` entry.
"""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from tests.kamailio import test_review127_cek_reuse_wire as r127

pytestmark = pytest.mark.kamailio

KEYS_BOUND = 12 * 3600 + 5
SEEN_BOUND = 3600


class _SharedCall(r127._Call):
    """``r127._Call`` on a proxy of its own choosing, alice's phone at ``phone``."""

    def __init__(self, proxy, pki, name: str, phone: tuple[str, int], bob) -> None:
        self.pki = pki
        self.proxy = proxy
        self.devices = {"f1": ua_engine(pki, "bob"), "f2": ua_engine(pki, "bob")}
        self.reuse = []
        self.bob = bob
        contact = f"sip:alice@{phone[0]}:{phone[1]}"
        self.contact = contact
        self.phone = RawUas(lambda request: r127.make_response(request, 200, "OK"))
        moved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        moved.bind(phone)
        moved.settimeout(0.2)
        self.phone.sock, old = moved, self.phone.sock
        time.sleep(0.3)
        old.close()
        self.alice_ua = SipUa(self.proxy.port, user="alice", timeout=5)
        self.alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, r127.VIEW),))
        self.call_id = f"r200-{name}-{time.monotonic_ns()}@x"
        self.request = invite(pki, call_id=self.call_id).replace(
            "Via", self.alice_ua.via()).replace("Contact", f"<{contact}>")
        self.alice_ua.send(self.alice.protect(self.request).message)
        self.delivered = None

    def close(self) -> None:
        self.alice_ua.close()
        self.phone.close()


class _Bob:
    """bob's phone shared by calls: routes each INVITE to the call that sent it."""

    def __init__(self) -> None:
        self.calls: dict[str, _SharedCall] = {}
        self.lock = threading.Lock()
        self.raw = RawUas(self._answer)
        self.port = self.raw.port
        self.sock = self.raw.sock
        self.invites: dict[str, list] = {}

    def _answer(self, request):
        call = self.calls.get(request.call_id)
        if request.method == "INVITE" and not request.to_tag:
            with self.lock:
                self.invites.setdefault(request.call_id, []).append(request)
            return r127.make_response(request, 180, "Ringing")
        if request.method == "INVITE" and call is not None:
            return r127._Call._bobs_phone(call, request)
        return r127.make_response(request, 200, "OK")

    def wait_invite(self, call_id: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = self.invites.get(call_id)
            if got:
                return got[0]
            time.sleep(0.05)
        raise AssertionError(f"no INVITE for {call_id}")

    def close(self) -> None:
        self.raw.close()


def _one_call(proxy, pki, bob, name, phone, kind, results):
    call = _SharedCall(proxy, pki, name, phone, bob)
    bob.calls[call.call_id] = call
    try:
        call.delivered = bob.wait_invite(call.call_id)
        if kind == "fork":
            call.answer("f1", 183)
            time.sleep(0.2)
            call.answer("f2", 183)
            time.sleep(0.2)
            call.answer("f2", 200)
        elif kind == "cancel-race":
            call.answer("f1", 183)
            time.sleep(0.2)
            cancel = r127.make_request(
                "CANCEL", call.request.request_uri, from_uri=pki.aor("alice"),
                to_uri=pki.aor("bob"), call_id=call.call_id, cseq=1,
                from_tag=call.request.from_tag or "", body=b"")
            call.alice_ua.send(cancel.replace("Via", call.request.get("Via")))
            call.answer("f2", 200)              # crosses the CANCEL
            time.sleep(0.2)
            call.answer("f1", 487)
        else:
            call.answer("f2", 200)
        got = call.until_200()
        ok = got[-1] if got and got[-1].status == 200 else None
        status = call.reinvite(ok) if ok is not None else 0
        if ok is not None and kind == "plain":      # this one ends with alice's BYE
            bye = r127.make_request(
                "BYE", f"sip:bob@127.0.0.1:{bob.port}", from_uri=pki.aor("alice"),
                to_uri=pki.aor("bob"), call_id=call.call_id, cseq=3,
                from_tag=call.request.from_tag or "", to_tag=ok.to_tag, body=b"")
            for route in reversed(ok.get_all("Record-Route")):
                bye = bye.add("Route", route)
            reply = call.alice_ua.transact(bye.replace("Via", call.alice_ua.via()))
            status = status if reply is not None and reply.status == 200 else -1
        results.append((name, kind, ok is not None, status))
    except Exception as exc:  # noqa: BLE001 - reported in the assertion
        results.append((name, kind, False, repr(exc)))
    finally:
        call.close()


def _caller(proxy, pki, bob, who, phone, results):
    for round_ in range(3):
        for kind in ("fork", "cancel-race", "plain"):
            _one_call(proxy, pki, bob, f"{who}-{round_}-{kind}", phone, kind, results)


def test_control_mixed_calls_two_uas_at_once_all_items_expire(proxy_factory, pki):
    proxy = proxy_factory("r200-lives", e2m=True, view=r127.VIEW)
    bob = _Bob()
    try:
        register_contact(proxy, "bob", bob.port)
        results: list = []
        threads = [threading.Thread(target=_caller,
                                    args=(proxy, pki, bob, who, phone, results))
                   for who, phone in (("a", ("127.0.200.61", 5061)),
                                      ("b", ("127.0.200.62", 5061)))]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=50)
        took = time.monotonic() - started
        assert len(results) == 18, (took, results)
        assert all(ok and status == 200 for _, _, ok, status in results), results
        time.sleep(0.5)
        keys = proxy.htable_lives("e2mkeys")
        seen = proxy.htable_lives("e2mseen")
        assert keys and seen, (keys, seen)
        never = [n for n, v in {**keys, **seen}.items() if v == math.inf]
        assert not never, never
        assert max(keys.values()) <= KEYS_BOUND, sorted(keys.values())[-5:]
        assert max(seen.values()) <= SEEN_BOUND, sorted(seen.values())[-5:]
        print(f"r200: {len(results)} calls in {took:.1f}s; e2mkeys {len(keys)} items "
              f"max {max(keys.values()):.0f}s; e2mseen {len(seen)} max "
              f"{max(seen.values()):.0f}s")
    finally:
        bob.close()
