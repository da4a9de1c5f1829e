"""Review 127 (attacker's review of d2a6a56), wire: CEK reuse (RFC 3185 kekri under a
kept key) through a real Kamailio 5.6 E2M proxy that views INVITE and UPDATE SDP, across
forked 183s and 200s, a re-INVITE and an UPDATE, and stop 42's late-2xx window
(``ProxyEngine.end_attempt(answer_may_follow=True)``: a failed INVITE's offer keys live
``LATE_ANSWER_TTL``, 32 s, more) around CANCEL/200 races.  Never run on the wire by a
review before.

**No hole found here in the time given.**  Controls (unmarked, pass), each a real
``UAEngine`` for alice and two for bob (two devices, one certificate), raw UDP sockets
for the phones:

- ``test_control_forked_183s_then_200_then_reinvite_and_update_under_the_offer_key``:
  alice's keyed INVITE; bob's device 1 answers 183 (To tag f1) and device 2 183 (f2),
  both sealed under alice's offer key (kekri, ``key_reuse`` True); device 2's 200 (f2)
  too.  alice's re-INVITE in dialog f2 under the same key (``key_reuse`` True) is
  answered 200 (device 2's answer under the key), and device 2's UPDATE under the key
  reaches alice's phone and opens.  The proxy read and archived every one of those
  SDP bodies (INVITE, 183, 183, 200, re-INVITE, its 200, UPDATE: 7 archive rows).
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
ALICES_CONTACT = "sip:alice@127.0.0.1:5061"          # e2m_lab.flows.invite's Contact
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
        moved.bind(("127.0.0.1", 5061))           # alice's phone, where her Contact says
        moved.settimeout(0.2)
        self.phone.sock, old = moved, self.phone.sock
        time.sleep(0.3)
        old.close()
        self.alice_ua = SipUa(self.proxy.port, user="alice", timeout=5)
        register_contact(self.proxy, "bob", self.bob.port)
        self.alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, VIEW),))
        self.call_id = f"r127-cek-{name}-{time.monotonic_ns()}@x"
        self.request = invite(pki, call_id=self.call_id).replace("Via", self.alice_ua.via())
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
        lives = call.proxy.htable_lives()
        assert len(lives) == 2, lives          # the offer's early record, the dialog's
        if order == "after_487":
            assert min(lives) <= LATE_ANSWER_TTL + 1 and max(lives) > 3600, lives
        assert call.reinvite(got[-1]) == 200
        assert ("re-INVITE", True) in call.reuse
    finally:
        call.close()
