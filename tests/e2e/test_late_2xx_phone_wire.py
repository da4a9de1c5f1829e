"""Review 129 HB1 on the wire: a real ``e2m-phone`` (alice) calls bob through a real
Kamailio E2M home proxy (viewing INVITE SDP, record-routing); bob's two devices are
``UAEngine``s behind one raw UDP socket registered as bob's contact.  Device 1 rings and
answers 486; 0.5 s later device 2 answers 200 under alice's offer key, which tm relays
as a late 2xx (RFC 3261 16.7).  alice's phone ACKs that 2xx and BYEs the call itself
(``pjsua_hooks/late_2xx.py``): both reach bob through the home proxy (its Record-Route
taken as route set), and the proxy lets them through (bodiless in-dialog requests).
The same set-up with a socket in place of Kamailio: ``tests/pjsua/
test_review129_late_2xx_phone.py``.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import ua_engine
from e2m_lab.kamailio_harness import RawUas, answer_under_offer_key, register_contact
from e2m_plugins.sip import make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

BOB = "sip:bob@example.com"


def _bobs_phone(request):
    if request.method == "INVITE":
        return None          # the devices answer by hand below
    return make_response(request, 200, "OK")      # the BYE (and anything else): 200


def test_a_late_2xx_through_the_home_proxy_is_acked_and_ended_by_the_phone(
        ua_config, phones, proxies, e2e_pki):
    home, _ = proxies
    bob = RawUas(_bobs_phone)
    try:
        register_contact(home, "bob", bob.port)
        alice = phones.start("alice", ua_config("alice", peer="bob"))
        alice.wait("registered", timeout=10)
        devices = {"f1": ua_engine(e2e_pki, "bob", peers=("alice",)),
                   "f2": ua_engine(e2e_pki, "bob", peers=("alice",))}
        alice.send(f"call {BOB}")
        (delivered,) = bob.wait_for(1, method="INVITE", timeout=10)
        assert delivered.get_all("Record-Route"), "the home proxy record-routes"
        opened = devices["f1"].open(delivered).message
        for status, reason in ((180, "Ringing"), (486, "Busy Here")):
            reply = make_response(delivered, status, reason)
            reply = reply.replace("To", f"{delivered.get('To')};tag=f1")
            bob.sock.sendto(reply.serialize(), ("127.0.0.1", home.port))
            time.sleep(0.2)
        assert opened.body
        alice.wait("call_ended", timeout=5)
        time.sleep(0.5)
        mark = alice.mark()
        answer_under_offer_key(home, devices["f2"], bob, delivered, to_tag="f2")
        acks = [m for m in bob.wait_for(1, method="ACK", timeout=5) if m.to_tag == "f2"]
        byes = bob.wait_for(1, method="BYE", timeout=5)
        time.sleep(2.0)                  # no retransmission once bob answered 200
        late = alice.of("late_answer", since=mark)
        assert [e["sent"] for e in late] == [["ACK", "BYE"]], alice.events[-10:]
        assert len(acks) == 1 and len(bob.wait_for(2, method="BYE", timeout=0.1)) == 1, \
            [(m.method, m.to_tag) for m in bob.received]
        (ack,), (bye,) = acks, byes
        for request in (ack, bye):
            # through the home proxy: its Via on top, alice's (pjsip's) below
            vias = request.get_all("Via")
            assert len(vias) >= 2 and f":{home.port}" in vias[0], vias
            assert request.request_uri == f"sip:bob@127.0.0.1:{bob.port}"
            assert request.to_tag == "f2" and request.from_tag == delivered.from_tag
        assert ack.cseq == (delivered.cseq[0], "ACK")
        assert bye.cseq == (delivered.cseq[0] + 1, "BYE")
        assert not alice.of("error", since=mark), alice.of("error")
        assert not [e for e in alice.of("call_state", since=mark)
                    if str(e.get("state", "")).upper().endswith("CONFIRMED")]
    finally:
        bob.close()
