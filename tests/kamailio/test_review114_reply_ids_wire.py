"""Review 114 (an attacker's review of 3bc1fa2), wire: the reply's Record-Route check
(``moved_route_entries``, stop 39's ``callers_side_entry``) against a 2xx whose
Call-ID or From tag is not UTF-8, on a real Kamailio 5.6.3 with a real pjsua2 caller.

Hole K1 (``test_hole_k1_*``): **untrusted hop** on the callee's leg (or the callee,
an **insider UA**).

- Set-up: one proxy (plain, ``e2m=False``; and with E2M on), bob a raw UAS
  registered at it; alice calls (or subscribes to) bob through it.  Her caller is a
  stock pjsua2 2.15.1 endpoint (outbound proxy = the proxy, loose route) for INVITE,
  the lab's ``SipUa`` for SUBSCRIBE.
- Messages: bob's 200 carries the proxy's Record-Route entry moved to the hop's
  address (127.0.0.1:<hop port>, the ``e2m-rr`` token untouched: the very rewrite the
  check exists for, reviews 81, 82) and, in the same 200, either one octet 0xff at the
  end of the Call-ID, or the From tag written quoted with one octet 0xff inside
  (``;tag="<alice's tag>\\xff"``).
- Effect (seen): the proxy logs nothing and relays the 200 with the moved entry;
  pjsua takes it (CALLING, CONNECTING 200, CONFIRMED 200) and sends its ACK and its
  BYE to the hop (hop got ``['ACK', 'BYE']``), past the proxy.  The same 200 without
  the octet is dropped ("a 200 whose Record-Route names 1 address(es), not ours:
  dropped", 3-4 retransmissions from bob, nothing at the hop).  With E2M on, a 200
  with an SDP answer is still read by the engine and dropped (``MalformedError:
  Call-ID is not visible ASCII``), but a body-less one (the 200 to a SUBSCRIBE, the
  proxy record-routes SUBSCRIBE; the 200 to an INVITE without an offer) is not read,
  and it reaches alice with the moved entry the same way (seen with SipUa for
  SUBSCRIBE and INVITE).  pjsip parses a Call-ID up to the line end and a quoted
  parameter value whole, and matches a response to its transaction by the Via branch,
  so neither octet troubles it; an unquoted 0xff in the From tag is a pjsip syntax
  error (the 200 is dropped by pjsua: tried, held for pjsua).  The same holds for
  an early dialog: a 183 with a To tag, our entry moved to the hop and 0xff at the end
  of the Call-ID reaches alice with the moved entry (E2M on, SipUa), where the same 183
  with clean ids is dropped: her PRACK/UPDATE would follow it.
- At fault: ``kamailio_app/kemi.py:1375-1379`` (``moved_route_entries``): the reply's own
  Call-ID and From tag (``$ci``, ``$ft``) are read, and a UnicodeDecodeError returns
  ``[]``, i.e. "nothing moved", with the comment "ids we never made a token for (the
  core refuses them)".  The core refuses them in *requests*; a reply's ids are the
  callee's to write (tm matches a reply by its Via branch), so the hop chooses to skip
  the check.  ``note_dialog_targets`` fails on the same octet (logged
  ``dialog targets failed: UnicodeDecodeError at dialog_route.py:59``) and is caught.
- Fix: in the reply routes take the dialog's ids from the transaction's request
  (``dialog_ids(KSR, of_request=True)``: ``$T_req($ci)``/``$T_req($ft)``, which the
  door held to UTF-8), or fail closed: a reply to a request we record-routed whose ids
  cannot be read is dropped like one whose Record-Route cannot be read (review 85);
  a stray one likewise.

Controls (pass unmarked): the same moved entry with clean ids is dropped (pjsua:
nothing at the hop; SipUa over SUBSCRIBE with E2M on: no 200; the early 183: none); the octet with the
entry untouched: the call is set up through the proxy (the octet alone breaks
nothing, so the hole is the skipped check); with E2M on, an INVITE whose 200 carries
an SDP answer and the 0xff Call-ID is dropped by the engine.

Other hole of this review: ``tests/kamailio/test_review114_loop_wire.py`` (K2: a loop
through a hop that hides the Via stack is missed).

Tried and held (for the whole review; run unless said read):

- The same octet in the 200's To tag: the moved entry is dropped (seen: "not ours:
  dropped", 4 INVITEs from bob); ``$tt`` is not read before the check.  An unquoted
  0xff in the From tag: the proxy relays the moved entry too (seen with SipUa), but
  pjsua drops the 200 as a syntax error ("PJSIP syntax error exception when parsing
  'From' header"), so the quoted form is the one a stock phone takes.  SIPp as the
  caller: it sends ACK and BYE to its remote address whatever the route set says, so
  it shows nothing either way (not used).
- With E2M on, a 200 with an SDP answer and the octet is read by the engine and
  dropped (``MalformedError: Call-ID is not visible ASCII``; control above).
- Loop detection (``test_review114_loop_wire.py``): octets in the stranger's Call-ID
  or From tag are 400 at the door before any relay; a binding whose contact holds
  0xff is a 400 REGISTER; forks in the loop bounded by max_contacts squared (21-22
  transactions for 10 bindings each way); a hop that keeps the Vias: 482 at the third
  pass.  Read: Via spellings (our Via is written by Kamailio from the socket or its
  advertised address; ``is_myself`` reads both; a loop's Via of ours sits at most one
  entry per hop below the top, so 16 entries need a 16-hop loop); a key change per
  pass needs a Route the stranger may not preload past us with ``[auth]`` (403 Route
  Not Allowed; without ``[auth]`` the proxy is an open relay, warned at start), or a
  CSeq/tag change that only a B2BUA makes (Max-Forwards is then its own); honest flows:
  a spiral comes back with another Request-URI or Route (review 112's spiral passes,
  its control runs), a retransmission is absorbed by tm before ``relay``, a request
  sent again after 401/407 has a new CSeq, CANCEL and ACK never reach ``relay``
  (tm, or ``t_relay`` directly), a front's failover goes by ``t_relay`` in the failure
  route to another node (htable per node); two branches of one fork meeting at the
  same target again are 482 at the proxy instead of 482 (Merged Request) at the UAS.
  ``e2mloop`` memory: one entry per relayed request for 32 s, like ``e2mbranch`` (64 s)
  already; not measured.
- ``callers_side_entry`` (read): a copy of our entry put below it by the hop has the
  same MAC as the original only if nothing was below (then it is an exact copy
  facing the caller: harmless); swapping the r2 pair puts the callee's entry lowest,
  where it is held to ``$T_req``'s socket and dropped; in a spiral, changing the other
  pass's entry breaks this pass's MAC (they are below it), and taking this pass's
  entry out leaves no entry whose MAC fits (dropped); an entry copied from another
  dialog carries another token.  A hop between the two passes can move the second
  pass's entry (which faces that hop) to another of our sockets after the second
  pass checked it: only that hop's own leg is affected.
- ``_remove_headers`` / ``inspect_only`` (read): the policy and label names have no
  compact form, and Kamailio finds ``$hdr`` by name case-insensitively with blanks
  before the colon, as ``canonical_name`` does; log lines go through ``as_utf8``, so a
  surrogate in a content type logs rather than raises; an honest ACK is dropped only
  when the header iterator itself fails.

Fixed (stop 39): ``moved_route_entries`` takes a Call-ID or From tag that is not UTF-8 in
a reply with Record-Route for a moved entry (fail closed: no request of ours had such
ids, the door refuses them): the reply is dropped.  Every hole test failed on the code
before the fix and passes with it (markers removed).  The control "the octet alone
sets up" became "the octet alone gets the 200 dropped" (such a reply is now refused
whatever its entries), and the SDP-answer control reads the new drop line.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_lab.stock_caller import PRELUDE
from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio]

_VALUE = re.compile(r"e2m-rr=")

# A stock pjsua2 caller (no E2M hooks): INVITE sip:bob@example.com through the proxy as
# its outbound proxy, the call held 4 s, then hung up; prints each call state.
_CALLER = PRELUDE + r'''
class C(pj.Call):
    def onCallState(self, prm):
        ci = self.getInfo()
        print("STATE %s %s" % (ci.stateText, ci.lastStatusCode), flush=True)

call = C(acc)
call.makeCall("sip:bob@example.com", pj.CallOpParam(True))
end = time.time() + 4
while time.time() < end:
    ep.libHandleEvents(20)
try:
    call.hangup(pj.CallOpParam(True))
except Exception:
    pass
end = time.time() + 1
while time.time() < end:
    ep.libHandleEvents(20)
ep.libDestroy()
'''


def _callee(hop_port, *, octet_in=None):
    """bob's UAS: his 200 to the initial INVITE or SUBSCRIBE carries our Record-Route
    entry moved to 127.0.0.1:``hop_port`` (token kept; None: untouched) and an SDP
    answer when the INVITE had an offer; with ``octet_in`` one octet 0xff: at the end
    of the Call-ID ("call-id"), inside a quoted From tag ("quoted-from-tag"), at the
    end of the unquoted From tag ("from-tag").  200 to anything else."""
    uas = RawUas()

    def respond(request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method not in ("INVITE", "SUBSCRIBE") or request.to_tag:
            return answer
        if request.body:
            answer = make_response(request, 200, "OK", body=SDP_ANSWER,
                                   content_type="application/sdp")
        answer = answer.replace("To", f"{request.get('To')};tag=bt114")
        answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
        if request.method == "SUBSCRIBE":
            answer = answer.add("Expires", "60")
        answer = answer.remove("Record-Route")
        for route in request.get_all("Record-Route"):
            if hop_port is not None and _VALUE.search(route):
                route = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{hop_port}", route)
            answer = answer.add("Record-Route", route)
        raw = answer.serialize()
        tag = (request.from_tag or "").encode()
        if octet_in == "from-tag":
            raw = raw.replace(b";tag=" + tag, b";tag=" + tag + b"\xff", 1)
        elif octet_in == "quoted-from-tag":
            raw = raw.replace(b";tag=" + tag, b';tag="' + tag + b'\xff"', 1)
        elif octet_in == "call-id":
            cid = request.get("Call-ID").encode()
            raw = raw.replace(b"Call-ID: " + cid, b"Call-ID: " + cid + b"\xff", 1)
        return raw
    uas.responder = respond
    return uas


def _pjsua_call(proxy_factory, tmp_path: Path, name, *, moved, octet_in, e2m=False):
    """(pjsua's call states, what the hop got, what bob got, the proxy's drop lines)."""
    home = proxy_factory(name, e2m=e2m)
    hop = RawUas()
    bob = _callee(hop.port if moved else None, octet_in=octet_in)
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
        drops = [ln for ln in home.log_since(mark).splitlines() if "dropped" in ln]
        print("pjsua states", states, "hop got", [m.method for m in hop.received],
              "bob got", [m.method for m in bob.received], "proxy dropped", drops[:2])
        return states, [m.method for m in hop.received], \
            [m.method for m in bob.received], drops
    finally:
        bob.close()
        hop.close()


def _subscribe(proxy_factory, name, *, octet_in):
    """E2M on; alice (SipUa) SUBSCRIBEs to bob, whose 200 has our entry moved to the
    hop: (the Record-Route of each final answer alice got, the hop's port)."""
    home = proxy_factory(name, e2m=True)
    hop = RawUas()
    bob = _callee(hop.port, octet_in=octet_in)
    register_contact(home, "bob", bob.port, source="127.0.0.141")
    ua = SipUa(home.port, user="alice", source="127.0.0.143")
    try:
        request = ua.build("SUBSCRIBE", "sip:bob@example.com", to="sip:bob@example.com",
                           headers=[("Event", "presence"), ("Expires", "60"),
                                    ("Contact", "<sip:alice@127.0.0.143:5060>")])
        ua.send(request.replace("Via", ua.via()))
        time.sleep(2.0)
        finals = []
        while True:
            message = ua.receive(0.2)
            if message is None:
                break
            if (message.status or 0) >= 200:
                finals.append(message.get_all("Record-Route"))
        print("alice's final answers (Record-Route)", finals, "hop", hop.port)
        return finals, hop.port
    finally:
        ua.close()
        bob.close()
        hop.close()


@pytest.mark.pjsua2
def test_hole_k1_a_call_id_octet_lets_a_moved_entry_take_the_callers_ack_and_bye(
        proxy_factory, tmp_path):
    states, hop_got, _, _ = _pjsua_call(proxy_factory, tmp_path, "r114-k1-cid",
                                        moved=True, octet_in="call-id")
    # secure: no in-dialog request of alice's reaches the hop past the proxy
    assert hop_got == [], states


@pytest.mark.pjsua2
def test_hole_k1_a_quoted_from_tag_octet_lets_a_moved_entry_take_the_callers_ack_and_bye(
        proxy_factory, tmp_path):
    states, hop_got, _, _ = _pjsua_call(proxy_factory, tmp_path, "r114-k1-qft",
                                        moved=True, octet_in="quoted-from-tag")
    assert hop_got == [], states


def test_hole_k1_e2m_on_a_subscribes_200_with_a_call_id_octet_carries_the_moved_entry(
        proxy_factory):
    finals, hop_port = _subscribe(proxy_factory, "r114-k1-sub", octet_in="call-id")
    assert not any(f"127.0.0.1:{hop_port};" in r for routes in finals for r in routes), finals


@pytest.mark.pjsua2
def test_control_k1_the_moved_entry_with_clean_ids_is_dropped(proxy_factory, tmp_path):
    states, hop_got, bob_got, drops = _pjsua_call(proxy_factory, tmp_path, "r114-k1-c1",
                                                  moved=True, octet_in=None)
    assert hop_got == []
    assert any("not ours: dropped" in ln for ln in drops), drops
    assert "CONFIRMED 200" not in states


@pytest.mark.pjsua2
def test_control_k1_the_call_id_octet_alone_gets_the_200_dropped(proxy_factory, tmp_path):
    """The octet alone, our entry untouched: on d038d44 pjsua confirmed the call (it
    takes such a 200) and its ACK and BYE went through the proxy to bob.  Since stop
    39's fix a reply with our entry and ids no request of ours had is dropped whatever
    its entries say (fail closed): the call is not confirmed, nothing reaches the hop."""
    states, hop_got, _, drops = _pjsua_call(proxy_factory, tmp_path, "r114-k1-c2",
                                            moved=False, octet_in="call-id")
    assert "CONFIRMED 200" not in states, states
    assert hop_got == []
    assert any("not UTF-8" in ln for ln in drops), drops


@pytest.mark.pjsua2
def test_control_k1_e2m_on_an_sdp_answer_with_the_octet_is_read_and_dropped(proxy_factory,
                                                                           tmp_path):
    states, hop_got, _, drops = _pjsua_call(proxy_factory, tmp_path, "r114-k1-c3",
                                            moved=True, octet_in="call-id", e2m=True)
    assert hop_got == []
    # dropped by the Record-Route check since stop 39 (before: by the read, which
    # cannot take such a Call-ID)
    assert any("dropped" in ln and "Call-ID" in ln for ln in drops), drops


def test_control_k1_e2m_on_a_subscribes_moved_200_with_clean_ids_is_dropped(proxy_factory):
    finals, hop_port = _subscribe(proxy_factory, "r114-k1-c4", octet_in=None)
    assert finals == [], finals


def _early_callee(hop_port, *, octet):
    """bob's UAS: a 183 with a To tag (an early dialog) whose Record-Route has our
    entry moved to the hop, with one octet 0xff at the end of the Call-ID when
    ``octet``; no final answer (the test ends first)."""
    uas = RawUas()

    def respond(request: SipMessage):
        if request.method != "INVITE" or request.to_tag:
            return make_response(request, 200, "OK")
        early = make_response(request, 183, "Session Progress")
        early = early.replace("To", f"{request.get('To')};tag=bt114e")
        early = early.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
        early = early.remove("Record-Route")
        for route in request.get_all("Record-Route"):
            if _VALUE.search(route):
                route = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{hop_port}", route)
            early = early.add("Record-Route", route)
        raw = early.serialize()
        if octet:
            cid = request.get("Call-ID").encode()
            raw = raw.replace(b"Call-ID: " + cid, b"Call-ID: " + cid + b"\xff", 1)
        return raw
    uas.responder = respond
    return uas


def _early(proxy_factory, name, *, octet):
    """E2M on; alice's INVITE (no body) to bob, whose 183 makes an early dialog:
    the Record-Route of each 183 alice got, and the hop's port."""
    home = proxy_factory(name, e2m=True)
    hop = RawUas()
    bob = _early_callee(hop.port, octet=octet)
    register_contact(home, "bob", bob.port, source="127.0.0.141")
    ua = SipUa(home.port, user="alice", source="127.0.0.144")
    try:
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
        ua.send(invite.replace("Via", ua.via()))
        time.sleep(1.5)
        early = []
        while True:
            message = ua.receive(0.2)
            if message is None:
                break
            if message.status == 183:
                early.append(message.get_all("Record-Route"))
        print("183s alice got (Record-Route)", early, "hop", hop.port)
        return early, hop.port
    finally:
        ua.close()
        bob.close()
        hop.close()


def test_hole_k1_an_early_183_with_a_call_id_octet_carries_the_moved_entry(proxy_factory):
    early, hop_port = _early(proxy_factory, "r114-k1-183", octet=True)
    assert not any(f"127.0.0.1:{hop_port};" in r for routes in early for r in routes), early


def test_control_k1_an_early_183_with_the_moved_entry_and_clean_ids_is_dropped(
        proxy_factory):
    early, _ = _early(proxy_factory, "r114-k1-183c", octet=False)
    assert early == [], early
