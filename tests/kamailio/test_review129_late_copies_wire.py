"""Review 129 (attacker's review of 4129b80), wire: stop 42's answer memory for late
copies (``kamailio_app/late_copies.py``, htable ``e2manswered``, ``Verdict.replay_key``)
on a real Kamailio 5.6 E2M proxy viewing INVITE SDP and MESSAGE bodies.

**Hole K1 (honest break turned silent loss): an older sender's request in a second
forked dialog is answered 200 by the proxy and never delivered.**  Attacker: nobody
(an honest caller whose UA predates ``e2m-sip-to-tag``, which the product still reads:
docs/protocol.md section 2, ``tests/conftest.py`` ``older_senders``).

- Set-up: a real Kamailio 5.6 E2M proxy (view ``INVITE:application/sdp``,
  ``MESSAGE:*``); bob registered, his two devices (f1, f2) are ``UAEngine``s behind one
  raw UDP socket; alice is a ``UAEngine`` signing as an older sender (no To tag bound),
  talking over a raw UDP socket (review 127's ``_Call``).
- Messages: alice's keyed INVITE; device f1 answers 200 (To tag f1), then device f2
  answers 200 (To tag f2): two dialogs (forking, RFC 3261 13.2.2.4; tm relays both
  2xx).  alice then sends one signed, sealed MESSAGE in each dialog, each with the
  dialog's route set, both ``CSeq: 2 MESSAGE`` (pjsip's forked dialogs both start
  from the INVITE's CSeq), different texts.
- Observed: f1's MESSAGE 200, delivered once; **f2's MESSAGE answered ``200 OK`` by the
  proxy itself, delivered 0 times** (``{'f1': (200, 1), 'f2': (200, 0)}``; the log says
  "a late copy of one answered 200").  On the code before the memory (``fa39dc1~1``,
  the same test run there) f2's MESSAGE got ``403`` and 0 deliveries: a known, visible
  failure for older senders (review 20: "none for an older sender's: as before") that
  the memory now turns into a silent loss: alice's phone shows the message delivered.
- Code at fault: an older sender's body binds no To tag, so the request's replay key
  (``e2m_plugins/proxy.py:714``, ``SipContext.replay_key`` ``sipcontext.py:159-170``)
  is the same for both dialogs; the second is refused as a replay, and
  ``kamailio_app/kemi.py:2061-2069`` gives any ``ReplayError`` whose key is in
  ``e2manswered`` the remembered 2xx (``late_copies.remembered_answer``), though this
  "copy" is another message.
- Suggested fix: answer from memory only a copy that is the same message on the wire,
  not just the same replay key: keep with the answer what the sender cannot change
  between its retransmissions but does between dialogs (the To tag, lower-cased, and
  the Request-URI; or a digest of the whole signed body) and compare it; or give the
  memory only to bodies that bind a To tag (a new sender's).  Either way a second
  fork's request then gets the 403 it got before (or, better, its record includes the
  message's own To tag when the body binds none, as a response's does).

Controls (unmarked, pass):

- ``test_control_k1_new_senders_messages_in_both_forks_are_delivered``: the same flow
  with a new sender (To tag bound): both MESSAGEs 200 and delivered once each, no
  late-copy answer logged.
- ``test_control_k1_older_senders_message_in_the_second_fork_alone_is_delivered``: the
  older sender's MESSAGE in dialog f2 alone: 200, delivered (the set-up is sound: it is
  the shared replay key that loses it).
- ``tests/cluster/test_review129_late_copies_cluster.py``: the memory on a two-node
  cluster (DMQ-replicated ``e2manswered``, replay claims in PostgreSQL).

Tried and held (wire runs or the code):

- An untrusted hop replaying alice's signed MESSAGE (own Via, own address) within the
  32 s: answered 200 by the proxy, relayed nowhere (``test_late_copies_wire``, run;
  another Request-URI by reading the code: the check comes before any routing).  The
  key binds Call-ID, From tag, CSeq, method, both AoRs and,
  for a new sender, the To tag, all under alice's signature, ``check_context``).
- Another user's message: the key is only reached through a body signed by its From
  (``check_signed_by``) that passes the replay check as that very message; an insider
  cannot write a context naming alice's ids.  An off-path sender holds no copy.
- Two new-sender messages sharing a key: To tag bound (control above), CSeq and
  method in the key; ACK, CANCEL and INVITE never noted (``late_copies._NOT_KEPT``).
  A request with several signed parts: each part's context must match the message
  (``check_context``) and every signer be the From, so only the To-tag binding could
  differ between parts, which only the sender can make (and gains nothing).
- A refused request's late copy is refused again (review 123's module); a failure is
  never remembered (``remember_answer`` keeps 2xx only); the reason phrase is bounded
  printable ASCII (64), the key 32 hex digits.
- Shared memory: an entry needs a recorded request that got a 2xx; it lives 32 s,
  less than the same request's ``e2mseen`` record (window + 32 s): the new table adds
  at most a fraction of what the replay table already holds.
- Reflection: the stateless 200 goes to the copy's Via, smaller than the signed
  request that asks for it (no amplification); pike's limits come first.

Fixed (stop 42), K1: the answer is kept under ``late_copies.answer_key``, the replay key
with the request's To tag and Request-URI as received, so the second fork's MESSAGE
(another To tag) is not a late copy of the first: it is refused 403 by the replay
check, as before the memory.  On the code before the fix: f2 answered 200, delivered 0.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import make_request, make_response
from tests.kamailio.test_review127_cek_reuse_wire import _Call

pytestmark = pytest.mark.kamailio

VIEW = ("INVITE:application/sdp", "MESSAGE:*")
# alice's phone at an address of this module's own: modules that bind 5061 on
# 127.0.0.1 run side by side in the suite (e2m_lab.flows.invite's Contact, moved here)
ALICES_PHONE = ("127.0.129.61", 5061)
ALICES_CONTACT = f"sip:alice@{ALICES_PHONE[0]}:{ALICES_PHONE[1]}"


class _ForkedCall(_Call):
    """review 127's call (alice's keyed INVITE, bob's two devices f1/f2, raw sockets),
    at a proxy that also views MESSAGE bodies (so it records them for the replay check
    and keeps their 2xx in ``e2manswered``)."""

    def __init__(self, proxy_factory, pki, name: str) -> None:   # noqa: D107
        self.pki = pki
        self.proxy = proxy_factory(name, e2m=True, view=VIEW)
        self.devices = {"f1": ua_engine(pki, "bob"), "f2": ua_engine(pki, "bob")}
        self.reuse = []
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
        self.call_id = f"r129-{name}-{time.monotonic_ns()}@x"
        self.request = invite(pki, call_id=self.call_id).replace(
            "Via", self.alice_ua.via()).replace("Contact", f"<{ALICES_CONTACT}>")
        self.alice_ua.send(self.alice.protect(self.request).message)
        (self.delivered,) = self.bob.wait_for(1, method="INVITE")

    def two_200s(self, tags=("f1", "f2")) -> dict:
        """Each device in ``tags`` answers 200 (each its own dialog: forking, RFC 3261
        13.2.2.4); alice's engine opens each 200 she gets.  {tag: 200}."""
        for tag in tags:
            self.answer(tag, 200)
            time.sleep(0.3)
        got: dict = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(got) < len(tags):
            message = self.alice_ua.receive(timeout=1)
            if message is None or message.is_request or message.cseq[1] != "INVITE" \
                    or message.status != 200 or message.to_tag in got:
                continue
            self.alice.open(message)
            got[message.to_tag] = message
        return got

    def message_in(self, ok, text: bytes, *, cseq: int = 2):
        """alice's MESSAGE inside the dialog of the 200 ``ok`` (its To tag, its route
        set), protected by her engine; (final status alice got, delivered copies)."""
        plain = make_request("MESSAGE", f"sip:bob@127.0.0.1:{self.bob.port}",
                             from_uri=self.pki.aor("alice"), to_uri=self.pki.aor("bob"),
                             call_id=self.call_id, cseq=cseq,
                             from_tag=self.request.from_tag or "", to_tag=ok.to_tag,
                             body=text, content_type="text/plain",
                             extra_headers=[("Contact", f"<{ALICES_CONTACT}>")])
        message = self.alice.protect(plain).message
        for route in reversed(ok.get_all("Record-Route")):
            message = message.add("Route", route)
        reply = self.alice_ua.transact(message.replace("Via", self.alice_ua.via()))
        time.sleep(0.5)
        return reply.status if reply is not None else 0

    def delivered_messages(self, tag: str) -> int:
        return sum(1 for m in self.bob.received
                   if m.method == "MESSAGE" and (m.to_tag or "").lower() == tag)


def _forked_messages(proxy_factory, pki, name: str, tags=("f1", "f2")):
    """bob's two devices answer alice's INVITE 200 each; alice then sends one MESSAGE in
    each dialog (both CSeq 2: pjsip's forked dialogs start from the INVITE's CSeq).
    Returns {tag: (status alice got, copies bob's device got)} and whether the proxy
    logged a late-copy answer."""
    call = _ForkedCall(proxy_factory, pki, name)
    try:
        oks = call.two_200s()
        assert sorted(oks) == ["f1", "f2"], sorted(oks)
        mark = call.proxy.log_mark()
        outcome = {}
        for tag in tags:
            status = call.message_in(oks[tag], b"to the device that answered " +
                                     tag.encode())
            outcome[tag] = (status, call.delivered_messages(tag))
        late = call.proxy.wait_log("a late copy of one answered", mark, timeout=1)
        return outcome, bool(late)
    finally:
        call.close()


# -- honest break: an older sender's request in a second fork, answered and lost ---------

def test_hole_k1_older_senders_message_in_second_fork_is_answered_200_and_lost(
        proxy_factory, pki, older_senders):
    outcome, late = _forked_messages(proxy_factory, pki, "r129-k1")
    assert outcome["f1"] == (200, 1), outcome
    status, delivered = outcome["f2"]
    # the secure behaviour: a 2xx only for a message that reached someone; a message
    # the proxy will not deliver is refused (as before stop 42: 403), never answered 200
    assert delivered == 1 or status >= 300, (outcome, late)


def test_control_k1_new_senders_messages_in_both_forks_are_delivered(proxy_factory, pki):
    outcome, late = _forked_messages(proxy_factory, pki, "r129-k1-new")
    assert outcome == {"f1": (200, 1), "f2": (200, 1)}, outcome
    assert not late


def test_control_k1_older_senders_message_in_the_second_fork_alone_is_delivered(
        proxy_factory, pki, older_senders):
    outcome, late = _forked_messages(proxy_factory, pki, "r129-k1-alone", tags=("f2",))
    assert outcome == {"f2": (200, 1)}, outcome
    assert not late
