"""Review 116 (an attacker's review of 4587037), wire: the reply's Record-Route check
(``kemi.moved_route_entries`` / ``record_routed_here``) against a 2xx whose CSeq method
is written in another case, on a real Kamailio 5.6.3 with a real pjsua2 2.15.1 caller.

Hole K1 (``test_hole_k1_*``): **untrusted hop** on the callee's leg (or the callee, an
**insider UA**).

- Set-up: one proxy (plain, ``e2m=False``; and with E2M on), bob a raw UAS registered at
  it; alice (stock pjsua2, the proxy as loose-routing outbound proxy) calls bob.
- Messages: bob's 200 to the INVITE has ``CSeq: <n> invite`` (the method in lower
  case, everything else as RFC 3261 says) and either *every* Record-Route taken out
  (review 88's hole 1 shape) or our entry taken out and the hop's own
  ``<sip:127.0.0.1:HOP;lr>`` put in (review 86's shape); its Contact names the hop.
- Effect (seen): the proxy logs nothing and relays the 200 (Kamailio parses method
  names case-insensitively, so tm matches it to the INVITE transaction); pjsua takes it
  too (CALLING, CONNECTING 200, CONFIRMED 200, DISCONNECTED 200) and its ACK (4 copies,
  one per 200 retransmission) and its BYE go to the hop, past the proxy.  Same with E2M
  on: the engine even reads the SDP answer ("e2m: invite response 200 action=forward"),
  but the route set is not checked.  The same 200 with ``INVITE`` as sent is dropped
  ("a 200 whose Record-Route names (no Record-Route) / (no entry of ours), not ours:
  dropped"; pjsua ends 487 after its CANCEL, nothing at the hop).
- At fault: ``kamailio_app/kemi.py:1449`` (``record_routed_here``: ``$rm`` compared
  case-sensitively with ``("INVITE", "SUBSCRIBE")``), asked by ``moved_route_entries``
  at ``kemi.py:1388-1394`` (no Record-Route) and ``kemi.py:1437`` (no entry of ours).
  The method of a reply is the callee's to write; the transaction's request is not.
- Fix (suggested): take the method from the transaction's request (``$T_req($rm)``,
  which the door held) when there is one, or compare ``$rm.upper()``; and for a stray,
  refuse a CSeq method that is not written as one of ours (tm and pjsip both fold it).

Controls (pass unmarked): the same 200s with ``INVITE`` as sent are dropped (both
shapes); a lower-case method with our entry kept and bob's own Contact is an honest
call (confirmed, ACK and BYE reach bob through the proxy, nothing dropped): the case
alone breaks nothing, the hole is the skipped check.

Tried and held: see ``tests/kamailio/test_review116_loop_wire.py`` (the whole review's
list).

Fixed (stop 39): every reply check reads the CSeq method upper-cased (``kemi._cseq_method``),
as tm and pjsip match it.  The hole tests failed on the code before the fix and pass
with it (markers removed).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.kamailio_harness import RawUas, register_contact
from e2m_plugins.sip import SipMessage, make_response
from tests.kamailio.test_review114_reply_ids_wire import _CALLER

pytestmark = [pytest.mark.kamailio]

_VALUE = re.compile(r"e2m-rr=")


def _callee(hop_port, *, method_as=None, strip="all", contact_hop=True):
    """bob's UAS: his 200 to the initial INVITE or SUBSCRIBE with Contact = the hop
    (127.0.0.1:``hop_port``) and Record-Route per ``strip``: "all" (none left),
    "ours" (ours out, the hop's own in), None (as received).  ``method_as``: the
    CSeq method written so (e.g. "invite")."""
    uas = RawUas()

    def respond(request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method not in ("INVITE", "SUBSCRIBE") or request.to_tag:
            return answer
        if request.body:
            answer = make_response(request, 200, "OK", body=SDP_ANSWER,
                                   content_type="application/sdp")
        answer = answer.replace("To", f"{request.get('To')};tag=bt116")
        answer = answer.add("Contact", f"<sip:bob@127.0.0.1:"
                                       f"{hop_port if contact_hop else uas.port}>")
        if request.method == "SUBSCRIBE":
            answer = answer.add("Expires", "60")
        answer = answer.remove("Record-Route")
        if strip is None:
            for route in request.get_all("Record-Route"):
                answer = answer.add("Record-Route", route)
        elif strip == "ours":
            answer = answer.add("Record-Route", f"<sip:127.0.0.1:{hop_port};lr>")
        raw = answer.serialize()
        if method_as is not None:
            cseq = request.get("CSeq").encode()
            number, method = cseq.split(None, 1)
            raw = raw.replace(b"CSeq: " + cseq, b"CSeq: " + number + b" " + method_as.encode(), 1)
        return raw
    uas.responder = respond
    return uas


def _pjsua_call(proxy_factory, tmp_path: Path, name, *, method_as, strip, e2m=False,
                contact_hop=True):
    home = proxy_factory(name, e2m=e2m)
    hop = RawUas()
    bob = _callee(hop.port, method_as=method_as, strip=strip, contact_hop=contact_hop)
    register_contact(home, "bob", bob.port, source="127.0.0.141")
    script = tmp_path / "caller.py"
    script.write_text(_CALLER)
    mark = home.log_mark()
    try:
        done = subprocess.run([sys.executable, str(script), str(home.port)],
                              capture_output=True, timeout=60, text=True, errors="replace")
        time.sleep(0.5)
        states = [ln.split(None, 1)[1] for ln in done.stdout.splitlines()
                  if ln.startswith("STATE ")]
        log = home.log_since(mark)
        drops = [ln for ln in log.splitlines() if "dropped" in ln]
        print("pjsua states", states, "hop got", [m.method for m in hop.received],
              "bob got", [m.method for m in bob.received], "proxy dropped", drops[:2])
        return states, [m.method for m in hop.received], \
            [m.method for m in bob.received], drops
    finally:
        bob.close()
        hop.close()


@pytest.mark.pjsua2
@pytest.mark.parametrize("strip", ["all", "ours"])
def test_hole_k1_a_lower_case_cseq_method_takes_the_callers_ack_and_bye_past_us(
        proxy_factory, tmp_path, strip):
    states, hop_got, _, _ = _pjsua_call(proxy_factory, tmp_path, f"r116-k1-{strip}",
                                        method_as="invite", strip=strip)
    # secure: the 200 without our entry is dropped, nothing of alice's reaches the hop
    assert hop_got == [], states
    assert "CONFIRMED 200" not in states, states


@pytest.mark.pjsua2
def test_hole_k1_e2m_on_a_lower_case_cseq_method_takes_the_callers_ack_and_bye_past_us(
        proxy_factory, tmp_path):
    states, hop_got, _, _ = _pjsua_call(proxy_factory, tmp_path, "r116-k1-e2m",
                                        method_as="invite", strip="all", e2m=True)
    assert hop_got == [], states


@pytest.mark.pjsua2
@pytest.mark.parametrize("strip", ["all", "ours"])
def test_control_k1_the_same_200_with_its_method_as_sent_is_dropped(proxy_factory, tmp_path,
                                                                    strip):
    states, hop_got, _, drops = _pjsua_call(proxy_factory, tmp_path, f"r116-k1c-{strip}",
                                            method_as=None, strip=strip)
    assert hop_got == []
    assert "CONFIRMED 200" not in states, states
    assert any("not ours: dropped" in ln for ln in drops), drops


@pytest.mark.pjsua2
def test_control_k1_a_lower_case_method_with_our_entry_kept_is_an_honest_call(
        proxy_factory, tmp_path):
    """The case alone breaks nothing: bob's 200 keeps our entry (his own Contact): the
    call is confirmed and alice's ACK and BYE reach bob through the proxy."""
    states, hop_got, bob_got, drops = _pjsua_call(
        proxy_factory, tmp_path, "r116-k1c-honest", method_as="invite", strip=None,
        contact_hop=False)
    assert "CONFIRMED 200" in states, states
    assert "ACK" in bob_got and "BYE" in bob_got, bob_got
    assert hop_got == [] and drops == []
