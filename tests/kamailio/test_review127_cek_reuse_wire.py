"""Review 127 (attacker's review of d2a6a56), wire: CEK reuse (RFC 3185 kekri under a
kept key) through a real Kamailio 5.6 E2M proxy that views INVITE and UPDATE SDP, across
forked 183s and 200s, a re-INVITE and an UPDATE, and stop 42's late-2xx window
(``ProxyEngine.end_attempt(answer_may_follow=True)``: a failed INVITE's offer keys live
``LATE_ANSWER_TTL``, 32 s, more) around CANCEL/200 races.  Never run on the wire by a
review before.

**Honest break HB1: the late 2xx stop 42 lets the proxy read is refused by the caller's
own UA: the product's engine dropped her offer key at the INVITE's failure answer.**
No attacker (review 125 HB2's flow, with alice's engine seeing what her phone sees).

- Set-up: a real Kamailio 5.6 E2M proxy viewing INVITE SDP, bob registered; alice's
  ``UAEngine`` (the one ``pjsua_hooks`` runs) offers a key in her INVITE (CEK reuse on,
  the default); bob's device 1 and device 2 are ``UAEngine``s with bob's certificate.
- Messages: alice's keyed INVITE; device 1 answers 486 (To tag f1), which tm relays to
  alice as the INVITE's final answer; 0.5 s later device 2 answers 200 (To tag f2) under
  her offer key (kekri), which tm relays as a late 2xx (RFC 3261 16.7).  alice's engine
  opens each response as it arrives, as the e2m-phone's hook does for every message.
- Observed: alice got 100, 180, 486, 486 (tm's retransmission: the raw UA sends no
  ACK), 200.  The proxy read and archived the 200 (an
  ``INVITE response`` archive row: stop 42's window works), but **alice's engine raised
  ``NoMatchingRecipientError`` on the 200**.  Without the 486 the same 200 opens
  (control).  The e2m-phone drops a response it cannot open (``pjsua_hooks/phone.py:
  689-692`` -> ``_refuse`` ``:934-943``, ``RxReject(None)``), so pjsip never sees the
  200 and never ACKs it (a UAS whose 2xx gets no ACK within 64*T1 ends the dialog,
  RFC 3261 13.3.1.4: not run here with a real pjsua).  So
  for the product's own phones the late-2xx call review 125 HB2 asked for still fails,
  at the caller's end (the HB2 test passes only because its alice never opens the 486).
  The same with the everyday trigger (``tm-408-crossing``): nobody answers for tm's
  ``fr_inv_timer`` (30 s), tm answers alice 408 and CANCELs bob, whose device 2 picks
  up just then: alice got the 408, then the 200 (read and archived by the proxy),
  and her engine raised ``NoMatchingRecipientError`` again (run: 37 s for both).
- Code at fault: ``e2m_plugins/ua.py:931`` (``_open``: a failure answer that
  ``_ends_dialog`` (``:1017``) says ends the INVITE attempt runs ``_end_dialog``
  (``:1044``), which forgets the attempt's keys, her offered key included, for opening
  as well as sending).
- Suggested fix: at an INVITE's failure answer, retire the offer's keys for sending but
  keep them for opening ``LATE_ANSWER_TTL`` (32 s) more, as the engine already does for
  keys retired after a 496 ("still accepted for opening until they age out"); the
  proxy and the caller then agree on the window.  (Untried: what pjsip does with the
  late 2xx once it gets it, ACK and BYE or a call.)

Controls (unmarked, pass), each a real
``UAEngine`` for alice and two for bob (two devices, one certificate), raw UDP sockets
for the phones:

- ``test_control_forked_183s_then_200_then_reinvite_and_update_under_the_offer_key``:
  alice's keyed INVITE; bob's device 1 answers 183 (To tag f1) and device 2 183 (f2),
  both sealed under alice's offer key (kekri, ``key_reuse`` True); device 2's 200 (f2)
  too.  alice's re-INVITE in dialog f2 under the same key (``key_reuse`` True) is
  answered 200 (device 2's answer under the key), and device 2's UPDATE under the key
  reaches alice's phone and opens.  The proxy read and archived every one of those
  SDP bodies (INVITE, 183, 183, 200, re-INVITE, its 200, UPDATE: 7 archive rows).
- ``test_control_hb1_the_same_200_without_a_failure_opens``: the same flow without the
  486: alice opens device 2's 200 under her key (the set-up is sound).
- ``test_control_cancel_200_race``: alice CANCELs while device 1 rings with a 183
  under her key; device 2's 200 crosses the CANCEL (``before_487``), or comes after
  device 1's 487 (``after_487``, tm's late 2xx, RFC 3261 16.7).  Either way the 200 is
  read, the proxy keeps the key for the confirmed dialog and alice's re-INVITE under it
  gets 200.  With the 487 first, the offer's early record lives at most 33 s (one
  second for the dump's rounding), the dialog's for the dialog's life.

Tried and held (reasoning on the code, with the runs above):

- ``KeyCache.expire_within`` only shortens (``min`` with the entry's own expiry); a put
  under a live name never replaces it (so a copy of the offer cannot restore the 200 s
  or a full life); only names the failed request itself kept afresh are cut, in that
  request's own early scope, and names are bound to the dialog's two AoRs: a third
  party's INVITE failing under alice's Call-ID and tag cuts none of hers.
- A stranger's late 2xx: tm relays only a 2xx matching its branch (an off-path sender
  cannot), and without the offer's CEK nobody (an untrusted hop) can seal one the key
  opens, so no key moves into a confirmed dialog; the callee, who holds the CEK, gets a
  normal call by answering after its own 486 (the intended path; forks still bounded
  by ``MAX_FORKS``).  The known open point (the caller-target note goes at the failure,
  so such a call's BYE ends no key) was not reported again.
- Quota: a failed attempt now holds its keeper's quota 32 s instead of 0, less than an
  INVITE left ringing already holds (``EARLY_DIALOG_TTL``, 200 s, or until tm's 408).
- Honest UAs: the product's own UA drops its offered key on any failure answer
  (docs/protocol.md section 2) and keys a retry (digest, 422, 3xx, 49x) afresh, so a
  retry under the same Call-ID and tag never names a key the failure cut.

Fixed (stop 42), HB1: at the failure answer to a dialog-creating INVITE, the UA's
``_open`` ends the attempt with ``DialogKeys.end_dialog(linger=TRANSACTION_LIFETIME)``:
its keys are retired (never reused to send) and open 32 s more (``open_until``); a 408
or 481 inside a dialog still ends it at once.  On the code before both parametrisations
raised ``NoMatchingRecipientError``; now alice opens the late 200.  Unit half:
``tests/unit/test_late_answer_ua.py``.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact, udp_transaction
from e2m_plugins.proxy import LATE_ANSWER_TTL
from e2m_plugins.sip import make_request, make_response

pytestmark = pytest.mark.kamailio

VIEW = ("INVITE:application/sdp", "UPDATE:application/sdp")
# alice's phone at an address of this module's own: modules that bind 5061 on
# 127.0.0.1 run side by side in the suite (e2m_lab.flows.invite's Contact, moved here)
ALICES_PHONE = ("127.0.127.61", 5061)
ALICES_CONTACT = f"sip:alice@{ALICES_PHONE[0]}:{ALICES_PHONE[1]}"
ALICES_NEW_SDP = SDP_ANSWER.replace(b"o=bob", b"o=alice").replace(b"49172", b"49176")


class _Call:
    """alice's keyed INVITE to bob (two devices) through ``proxy``; what happened."""

    def __init__(self, proxy_factory, pki, name: str) -> None:
        self.pki = pki
        self.proxy = proxy_factory(name, e2m=True, view=VIEW)
        self.devices = {"f1": ua_engine(pki, "bob"), "f2": ua_engine(pki, "bob")}
        self.reuse: list[tuple[str, bool]] = []
        self.bob = RawUas(self._bobs_phone)
        self.phone = RawUas(lambda request: make_response(request, 200, "OK"))
        moved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        moved.bind(ALICES_PHONE)           # alice's phone, where her Contact says
        moved.settimeout(0.2)
        self.phone.sock, old = moved, self.phone.sock
        time.sleep(0.3)
        old.close()
        self.alice_ua = SipUa(self.proxy.port, user="alice", timeout=5)
        register_contact(self.proxy, "bob", self.bob.port)
        self.alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, VIEW),))
        self.call_id = f"r127-cek-{name}-{time.monotonic_ns()}@x"
        self.request = invite(pki, call_id=self.call_id).replace(
            "Via", self.alice_ua.via()).replace("Contact", f"<{ALICES_CONTACT}>")
        self.alice_ua.send(self.alice.protect(self.request).message)
        (self.delivered,) = self.bob.wait_for(1, method="INVITE")

    def close(self) -> None:
        self.alice_ua.close()
        self.bob.close()
        self.phone.close()

    def _bobs_phone(self, request):
        if request.method == "INVITE" and not request.to_tag:
            return make_response(request, 180, "Ringing")
        if request.method == "INVITE":              # a re-INVITE: device 2 answers it
            engine = self.devices["f2"]
            reply = make_response(engine.open(request).message, 200, "OK",
                                  [("Contact", f"<sip:bob@127.0.0.1:{self.bob.port}>")],
                                  SDP_ANSWER, "application/sdp")
            protected = engine.protect(reply)
            self.reuse.append(("re-INVITE 200", protected.info.key_reuse))
            return protected.message
        return make_response(request, 200, "OK")

    def answer(self, tag: str, status: int) -> None:
        """Device ``tag`` answers the INVITE ``status`` (with SDP under the offer key,
        but a failure, sent bare)."""
        engine = self.devices[tag]
        opened = engine.open(self.delivered).message
        if status >= 300:
            reply = make_response(self.delivered, status, "Request Terminated")
            reply = reply.replace("To", f"{self.delivered.get('To')};tag={tag}")
            self.bob.sock.sendto(reply.serialize(), ("127.0.0.1", self.proxy.port))
            return
        reply = make_response(opened, status, "OK" if status == 200 else "Session Progress",
                              [("Contact", f"<sip:bob@127.0.0.1:{self.bob.port}>")],
                              SDP_ANSWER, "application/sdp")
        reply = reply.replace("To", f"{opened.get('To')};tag={tag}")
        protected = engine.protect(reply)
        self.reuse.append((f"{status} {tag}", protected.info.key_reuse))
        self.bob.sock.sendto(protected.message.serialize(), ("127.0.0.1", self.proxy.port))

    def cancel(self) -> None:
        cancel = make_request("CANCEL", self.request.request_uri,
                              from_uri=self.pki.aor("alice"), to_uri=self.pki.aor("bob"),
                              call_id=self.call_id, cseq=1,
                              from_tag=self.request.from_tag or "", body=b"")
        cancel = cancel.replace("Via", self.request.get("Via"))
        self.alice_ua.send(cancel)
        assert self.bob.wait_for(1, method="CANCEL"), "the CANCEL did not reach bob"

    def until_200(self) -> list:
        """Responses alice gets until the INVITE's 200 (each opened by her engine)."""
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self.alice_ua.receive(timeout=1)
            if message is None or message.is_request:
                continue
            if message.cseq[1] == "INVITE":
                got.append(message)
                if message.body:
                    self.alice.open(message)
                if message.status == 200:
                    break
        return got

    def reinvite(self, ok) -> int:
        plain = make_request("INVITE", f"sip:bob@127.0.0.1:{self.bob.port}",
                             from_uri=self.pki.aor("alice"), to_uri=self.pki.aor("bob"),
                             call_id=self.call_id, cseq=2, from_tag=self.request.from_tag or "",
                             to_tag=ok.to_tag, body=ALICES_NEW_SDP,
                             content_type="application/sdp",
                             extra_headers=[("Contact", f"<{ALICES_CONTACT}>")])
        protected = self.alice.protect(plain)
        self.reuse.append(("re-INVITE", protected.info.key_reuse))
        message = protected.message
        for route in reversed(ok.get_all("Record-Route")):
            message = message.add("Route", route)
        reply = self.alice_ua.transact(message.replace("Via", self.alice_ua.via()))
        if reply is not None and reply.status == 200:
            self.alice.open(reply)
        return reply.status if reply is not None else 0

    def update_from_bob(self, ok) -> tuple[int, bool]:
        plain = make_request("UPDATE", ALICES_CONTACT, from_uri=self.pki.aor("bob"),
                             to_uri=self.pki.aor("alice"), call_id=self.call_id, cseq=7,
                             from_tag=ok.to_tag or "", to_tag=ok.from_tag or "",
                             body=SDP_ANSWER, content_type="application/sdp",
                             extra_headers=[("Contact", f"<sip:bob@127.0.0.1:{self.bob.port}>")])
        protected = self.devices["f2"].protect(plain)
        self.reuse.append(("UPDATE", protected.info.key_reuse))
        message = protected.message
        for route in ok.get_all("Record-Route"):
            message = message.add("Route", route)
        reply = udp_transaction(self.proxy.port, message, timeout=5)
        arrived = self.phone.wait_for(1, timeout=2, method="UPDATE")
        opened = bool(arrived) and self.alice.open(arrived[0]).message.body == SDP_ANSWER
        return (reply.status if reply is not None else 0), opened

    def archived(self) -> list[tuple[str, str]]:
        return sorted((row.method, row.direction) for row in self.proxy.archive_rows()
                      if row.call_id == self.call_id)


def test_control_forked_183s_then_200_then_reinvite_and_update_under_the_offer_key(
        proxy_factory, pki):
    call = _Call(proxy_factory, pki, "r127-fork")
    try:
        call.answer("f1", 183)
        time.sleep(0.3)
        call.answer("f2", 183)
        time.sleep(0.3)
        call.answer("f2", 200)
        got = call.until_200()
        assert [(m.status, m.to_tag) for m in got if m.status >= 183] == \
            [(183, "f1"), (183, "f2"), (200, "f2")]
        ok = got[-1]
        assert call.reinvite(ok) == 200
        assert call.update_from_bob(ok) == (200, True)
        # every body went under alice's offer key (kekri), none under a certificate
        assert call.reuse == [("183 f1", True), ("183 f2", True), ("200 f2", True),
                              ("re-INVITE", True), ("re-INVITE 200", True),
                              ("UPDATE", True)], call.reuse
        time.sleep(0.5)
        archived = call.archived()
        assert len(archived) == 7, archived
        assert ("UPDATE", "request") in archived
    finally:
        call.close()


@pytest.mark.parametrize("order", ["before_487", "after_487"])
def test_control_cancel_200_race(proxy_factory, pki, order):
    call = _Call(proxy_factory, pki, f"r127-race-{order}")
    try:
        call.answer("f1", 183)
        time.sleep(0.3)
        call.cancel()
        if order == "before_487":
            call.answer("f2", 200)              # crosses the CANCEL
            time.sleep(0.3)
            call.answer("f1", 487)
        else:
            call.answer("f1", 487)              # the INVITE fails: failure route
            time.sleep(0.5)
            call.answer("f2", 200)              # tm's late 2xx
        got = call.until_200()
        assert got and got[-1].status == 200, [(m.status, m.to_tag) for m in got]
        time.sleep(0.3)
        lives = list(call.proxy.htable_lives().values())
        assert len(lives) == 2, lives          # the offer's early record, the dialog's
        if order == "after_487":
            assert min(lives) <= LATE_ANSWER_TTL + 1 and max(lives) > 3600, lives
        assert call.reinvite(got[-1]) == 200
        assert ("re-INVITE", True) in call.reuse
    finally:
        call.close()


# -- honest break HB1: the caller's own UA cannot open the late 2xx ---------------------

def _late_answer(proxy_factory, pki, name: str, *, failure: int | None) -> tuple[list, str]:
    """alice's keyed INVITE; bob's device 1 answers ``failure`` (tm relays it to alice as
    the INVITE's final answer), then device 2's 200 under her offer key (tm's late 2xx).
    alice's engine opens every response she gets, as the e2m-phone's hook does
    (``pjsua_hooks/phone.py`` ``_on_rx``: ``engine.open`` on each message, a response
    that fails dropped).  Returns (statuses alice got, what opening the 200 gave), after
    checking the proxy read and archived the 200."""
    call = _Call(proxy_factory, pki, name)
    try:
        if failure == 408:
            # nobody answers: tm's fr_inv_timer (30 s) ends the INVITE with its own 408
            # and CANCELs bob, whose device 2 picks up just then (the 200 crosses)
            assert call.bob.wait_for(1, timeout=40, method="CANCEL"), "tm sent no CANCEL"
        elif failure is not None:
            call.answer("f1", failure)
            time.sleep(0.5)
        call.answer("f2", 200)
        statuses, outcome = [], "no 200"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = call.alice_ua.receive(timeout=1)
            if message is None or message.is_request or message.cseq[1] != "INVITE":
                continue
            statuses.append(message.status)
            try:
                opened = call.alice.open(message)
            except Exception as exc:  # noqa: BLE001 - the outcome is the finding
                if message.status == 200:
                    outcome = type(exc).__name__
                    break
                raise
            if message.status == 200:
                outcome = "opened" if opened.message.body == SDP_ANSWER else "wrong body"
                break
        time.sleep(0.3)
        archived = call.archived()
        assert ("INVITE", "response") in archived, archived     # the proxy read the 200
        return statuses, outcome
    finally:
        call.close()


@pytest.mark.parametrize("failure", [486, 408], ids=["another-forks-486", "tm-408-crossing"])
def test_honest_break_hb1_the_caller_opens_a_late_2xx_under_her_offer_key(proxy_factory,
                                                                          pki, failure):
    statuses, outcome = _late_answer(proxy_factory, pki, f"r127-hb1-{failure}",
                                     failure=failure)
    assert failure in statuses and statuses[-1] == 200, statuses
    assert outcome == "opened", outcome


def test_control_hb1_the_same_200_without_a_failure_opens(proxy_factory, pki):
    statuses, outcome = _late_answer(proxy_factory, pki, "r127-hb1-c", failure=None)
    assert statuses[-1] == 200 and 486 not in statuses, statuses
    assert outcome == "opened", outcome
