"""Review 133 (attacker's review of 55c3915), area 2: the SDP spellings reviews 128-131
found in an INVITE offer, placed instead in the callee's answer.  Real Kamailio
(``proxy_factory``, E2M on, ``view = INVITE:application/sdp``), a stock pjsua2 2.15.1
caller (review 69's script: no E2M hook, through the proxy) and bob a ``RawUas``
registered at the proxy.

Hole K3: an answer SDP the view refuses is relayed, unrecorded, and the caller uses it
----------------------------------------------------------------------------------------

- Attacker: an **insider UA** callee (bob, registered behind the home proxy) hiding
  where his call's media goes from the archive and the firewall view; the same from an
  **untrusted hop** between bob and the proxy.  (Review 69's hole 1 and 2, by another
  door.)
- Messages: the stock caller's INVITE (plaintext SDP, recorded: 1 offer row); bob's
  200 with a true Content-Length and a plaintext SDP answer, ``m=audio 40404 RTP/AVP 0``
  with session ``c=IN IP4 127.0.0.1`` plus one of: a media-level ``c=IN IP4 127.0.0.1``
  then ``c=IN IP4 127.0.0.9`` (review 128's two ``c=``); session ``c=IN IP4
  127.0.0.011`` (review 130's inet_aton form); ``a=sendonly:x`` (review 131 K1);
  ``a=rtcp 40409 IN IP4 127.0.0.9`` (review 131 K2).
- Observed (each of the 4): the proxy logs ``e2m: INVITE response 200 action=forward
  seen=- media=0 error=MalformedError`` and relays the 200; **0 media rows** for the
  answer; the stock caller's call is ``CONFIRMED`` with remote RTP
  **127.0.0.9:40404** (two ``c=``, inet_aton form: the address only pjmedia's reading
  names) or 127.0.0.1:40404 (the other two: the direction and RTCP pjmedia takes are
  recorded nowhere).  The same SDP in the INVITE offer is answered 400 and reaches
  nobody (control).
- Code at fault: ``e2m_plugins/proxy.py:283-286`` (``inspect``: any ``E2MError`` on a
  response, the SDP summary's ``MalformedError`` from ``sdp.py:378-425`` included,
  becomes ``forward`` with an ``error``); ``kamailio_app/kemi.py:2370-2390``
  (``read_reply``, the core reply route's check, the only place a final reply can be
  dropped) asks only ``ProxyEngine.check_readable`` (``proxy.py:466-475``: headers,
  ids, MIME framing), so a reply the view will refuse passes it; ``route_reply``
  (``kemi.py:2392-2416``, tm's onreply route) then reads it and records nothing.
  ``docs/threat-model.md`` accepts answers "forwarded unread" because "the callee could
  always send answers we cannot read", which holds for an E2M caller (he can seal the
  answer for her alone), not for a stock caller, who reads only plaintext: there the
  only way to hide is a spelling only the stack reads, which review 69 fixed for a
  Content-Length and a stray branch by dropping the reply in the core reply route.
- Fix: make the core reply route's check cover the view's plaintext checks: in
  ``check_readable`` (or a ``check_viewable`` beside it), for a response whose CSeq
  method a ``view``/``verify`` rule covers, run ``media_summary`` on each plaintext
  ``application/sdp`` part (and the rest of what ``_view`` refuses without a key), so
  ``ksr_reply_route`` drops it as it drops review 64's and 69's; for a sealed answer
  (and for the multipart case below, whose junk part fails only when opened) the same
  refusal needs the engine's reading itself in the core reply route (``read_reply``
  already parses the reply there), dropping any answer whose reading raises, as a
  request's is answered 400/496.
- Tests: ``test_answer_sdp_the_view_refuses_is_not_relayed_unrecorded[...]`` (4, strict
  xfail) and the re-INVITE one below: secure means a relayed answer's media is a
  recorded row's.
- No spelling needed (run): bob's 200 as ``multipart/mixed`` of a plain SDP naming
  ``c=IN IP4 127.0.0.9`` and an ``optional`` ``application/pkcs7-mime`` part of five
  junk octets: ``INVITE response 200 ... media=0 error=MalformedError``, 0 answer rows,
  the stock caller (pjsip finds the SDP part of a multipart body) CONFIRMED on
  **127.0.0.9:40404**
  (``test_plain_answer_sdp_beside_an_unopenable_part_is_not_relayed_unrecorded``,
  strict xfail).  So the door is any ``E2MError`` in an answer's reading, not the SDP
  summary alone.
- Run, held for the media the call ends with: an unreliable 183 with the two-``c=``
  answer, then a 200 with the clean one (same ``o=`` version): the 183 is relayed
  unrecorded (``INVITE response 183 ... media=0 error=MalformedError``), the 200
  recorded (``127.0.0.1``, 40404), and the stock caller's stream names
  127.0.0.1:40404 both at its first media state and once CONFIRMED (whether pjsip
  used the 183's SDP for early media at all was not examined):
  ``test_held_an_early_answer_the_view_refuses_is_superseded_by_the_recorded_200``.
- Mid-dialog (run): the stock caller, CONFIRMED with bob's clean answer (row
  ``127.0.0.1:40404``), re-INVITEs him; bob's 200 (``o=`` version 2) carries the
  two-``c=`` answer: logged ``INVITE response 200 ... media=0 error=MalformedError``,
  relayed; the caller's second media state names **127.0.0.9:40404** and the call stays
  CONFIRMED, while the archive's only answer row still says 127.0.0.1:40404: the
  archive now names an address the media left
  (``test_reinvite_answer_the_view_refuses_moves_the_media_unrecorded``, strict xfail;
  control ``test_control_a_clean_reinvite_answer_is_recorded``: the clean re-answer on
  port 40406 is recorded and taken).  The same with an UPDATE (RFC 3311) instead of
  the re-INVITE: ``UPDATE response 200 ... media=0 error=MalformedError``, the caller
  on 127.0.0.9:40404, the archive's answer row still 127.0.0.1:40404
  (``test_update_answer_the_view_refuses_moves_the_media_unrecorded``, strict xfail).
  Not run, the same code path: a reliable 183, a PRACK's 2xx.  An ACK carrying
  such an answer (late offer) is forwarded by design, counted in ``e2m_acks_unread``
  (the documented limit of review 113).

Controls (unmarked, pass):

- ``test_control_a_clean_answer_is_recorded_as_the_caller_takes_it``: the same call
  with a clean answer: CONFIRMED, remote RTP 127.0.0.1:40404, answer row
  ``(127.0.0.1, 40404)`` (the set-up is live).
- ``test_control_the_same_sdp_in_an_offer_is_refused[...]`` (4): each SDP in a
  plaintext INVITE to registered bob: 400, bob gets nothing.

Tried and held, area 2 (read in the code): the view is one function for every
message (``_view`` -> ``media_summary``), so a re-INVITE, an UPDATE and a PRACK with
these spellings are refused 400 as the INVITE is (``Rule.covers`` takes UPDATE, PRACK
and ACK under ``INVITE:``); ``a= sendonly`` (blank after ``a=``, which
pjmedia skips) is refused (the token name is empty); ``rtcp-mux``/``rtcp-fb`` are not
taken for ``rtcp``; a MIME type in capitals is lower-cased before ``application/sdp``
is compared.

Fixed (stop 43), K3: the core reply route now reads the body of every response the
engine must read (``ProxyEngine.read_response``: the opening, policy, signer and SDP
checks of ``_view``, keeping, spending and recording nothing) and drops one whose
reading raises ``MalformedError`` or ``LimitExceededError``
(``proxy.REFUSED_RESPONSE_ERRORS``), as it drops review 64's and 69's; tm's reply route
then applies that same reading with the transaction's caller (``inspect(reading=)``),
so the body is read once.  A body sealed for others, or a signature only the caller
can judge, is relayed with its error as before.  On the code before, all 7 hole tests
failed; now each 200 is logged ``a INVITE 200 that must be read and cannot be
(MalformedError: ...): dropped``, the stock caller is not CONFIRMED (or, re-INVITEd,
stays on the recorded 127.0.0.1:40404) and bob's re-offer is retransmitted to him.  The
script now tolerates a call that is gone (``getInfo`` raises once the INVITE failed).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from e2m_lab.kamailio_harness import build_request, registered_uas
from e2m_lab.stock_caller import PRELUDE, script_result
from e2m_plugins.sip import make_response, parse
from tests.kamailio.test_review69_wire import _STOCK_CALLER

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
_HEAD = b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
_M = b"m=audio 40404 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
CLEAN = _HEAD + _M
# spellings reviews 128-131 found in an offer, here in bob's answer
HIDDEN = {
    "two c= in the media section": _HEAD + _M + b"c=IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.9\r\n",
    "c= in an inet_aton form": _HEAD.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.011")
    + _M,
    "a=sendonly:x": _HEAD + _M + b"a=sendonly:x\r\n",
    "a=rtcp with white space": _HEAD + _M + b"a=rtcp 40409 IN IP4 127.0.0.9\r\n",
}


# review 69's stock caller, which also reads the stream once the call is CONFIRMED
# (a call whose 200 the proxy dropped may be gone by then: getInfo raises)
_STOCK_CALLER_FINAL = _STOCK_CALLER.replace(
    'try:\n    result["state"] = call.getInfo().stateText',
    'def _state():\n'
    '    try:\n        return call.getInfo().stateText\n'
    '    except Exception:\n        return "GONE"\n'
    'while time.time() < deadline + 2 and _state() not in ("CONFIRMED", "GONE"):\n'
    '    ep.libHandleEvents(50)\n'
    'try:\n    result["final_rtp"] = call.getStreamInfo(0).remoteRtpAddress\n'
    'except Exception as exc:\n    result["final_error"] = repr(exc)\n'
    'try:\n    result["state"] = call.getInfo().stateText')


def _stock_call(proxy_factory, tmp_path, sdp: bytes, name: str, early: bytes | None = None,
                content_type: str = "application/sdp",
                headers: tuple[tuple[str, str], ...] = ()):
    """A stock pjsua2 caller (review 69's script, no E2M hook) calls bob (a RawUas)
    through a proxy viewing INVITE SDP; bob answers 200 with ``sdp`` (plaintext, a true
    Content-Length) and ``headers``.  Returns (what pjsip negotiated, the proxy's media
    rows for responses, its rows for requests, the log)."""
    pytest.importorskip("pjsua2")
    script = tmp_path / "stock_caller.py"
    script.write_text(_STOCK_CALLER_FINAL)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    mark = proxy.log_mark()
    state: dict = {}

    def responder(request):
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        extra = [("Record-Route", rr) for rr in request.get_all("Record-Route")]
        extra.append(("Contact", f"<sip:bob@127.0.0.1:{state['port']}>"))
        if early is not None:     # an unreliable 183 with early media first
            ringing = make_response(request, 183, "Session Progress", extra, body=early,
                                    content_type="application/sdp")
            state["uas"].sock.sendto(ringing.serialize(), ("127.0.0.1", proxy.port))
            time.sleep(0.5)
        extra.extend(headers)
        return make_response(request, 200, "OK", extra, body=sdp, content_type=content_type)
    with registered_uas(proxy, "bob", None, "127.0.0.133", responder=responder) as bob:
        state["port"], state["uas"] = bob.port, bob
        out = subprocess.run([sys.executable, str(script), str(proxy.port)],
                             capture_output=True, timeout=20)
        got = script_result(out.stdout, out.stderr)
        assert bob.wait_for(1, method="INVITE")
        time.sleep(0.3)
        answers = [row for row in proxy.media_rows() if row["direction"] != "request"]
        requests = [row for row in proxy.media_rows() if row["direction"] == "request"]
        return got, answers, requests, proxy.log_since(mark)


@pytest.mark.parametrize("case", list(HIDDEN))
def test_answer_sdp_the_view_refuses_is_not_relayed_unrecorded(proxy_factory, tmp_path, case):
    """Secure: the media a stock caller takes from an answer the proxy relayed is media
    the proxy recorded for that answer (or the answer is not relayed)."""
    got, answers, requests, log = _stock_call(proxy_factory, tmp_path, HIDDEN[case],
                                              f"r133a{list(HIDDEN).index(case)}")
    refused = [ln for ln in log.splitlines() if "INVITE response 200" in ln]
    print(f"\n{case}: caller {got}; answer rows {[(r['address'], r['port'], r['flow'] if 'flow' in r else r.get('direction_attr')) for r in answers]}; "
          f"offer rows {len(requests)}; log {refused[-1][-200:] if refused else '-'}")
    taken = got.get("remote_rtp")
    relayed = got.get("state") == "CONFIRMED"
    assert not relayed or any(f"{row['address']}:{row['port']}" == taken for row in answers), \
        (got, answers)


# bob's clean SDP (on 127.0.0.9) beside a part the proxy cannot open, in multipart/mixed
_BOUNDARY = "r133b"
MIXED = (f"--{_BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n".encode()
         + CLEAN.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.9")
         + f"\r\n--{_BOUNDARY}\r\nContent-Type: application/pkcs7-mime; "
           f"smime-type=enveloped-data\r\nContent-Disposition: attachment;handling=optional"
           f"\r\n\r\n".encode() + b"\x30\x03\x02\x01\x00" + f"\r\n--{_BOUNDARY}--\r\n".encode())


def test_plain_answer_sdp_beside_an_unopenable_part_is_not_relayed_unrecorded(
        proxy_factory, tmp_path):
    """No odd spelling at all: bob's 200 is multipart/mixed, a plain SDP on 127.0.0.9
    and an ``optional`` S/MIME part of five octets of junk.  Secure as above."""
    got, answers, _, log = _stock_call(proxy_factory, tmp_path, MIXED, "r133mx",
                                       content_type=f"multipart/mixed;boundary={_BOUNDARY}")
    seen = [ln[ln.index("e2m: INVITE response"):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln]
    print(f"\nmixed: caller {got}; answer rows {[(r['address'], r['port']) for r in answers]}; "
          f"log {seen}")
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_held_an_early_answer_the_view_refuses_is_superseded_by_the_recorded_200(
        proxy_factory, tmp_path):
    """Tried and held: the same with early media: bob's unreliable 183 carries the
    two-``c=`` answer (pjmedia would take 127.0.0.9), his 200 the clean one (127.0.0.1),
    same ``o=`` version.  The 183 is relayed unrecorded (K3's door), but the stock caller
    ends CONFIRMED with the 200's address, which the proxy recorded."""
    got, answers, _, log = _stock_call(proxy_factory, tmp_path, CLEAN, "r133e",
                                       early=HIDDEN["two c= in the media section"])
    seen = [ln[ln.index("e2m: INVITE response"):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln]
    print(f"\nearly: caller {got}; answer rows {[(r['address'], r['port']) for r in answers]}; "
          f"log {seen}")
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_control_a_clean_answer_is_recorded_as_the_caller_takes_it(proxy_factory, tmp_path):
    got, answers, requests, _ = _stock_call(proxy_factory, tmp_path, CLEAN, "r133c")
    assert got.get("state") == "CONFIRMED" and got.get("remote_rtp") == "127.0.0.1:40404", got
    assert [(row["address"], row["port"]) for row in answers] == [("127.0.0.1", 40404)]
    assert len(requests) == 1


@pytest.mark.parametrize("case", list(HIDDEN))
def test_control_the_same_sdp_in_an_offer_is_refused(proxy_factory, case):
    """The rule working nearby: the same SDP in a plaintext INVITE offer is answered
    400 by the viewing proxy (reviews 128-131), never relayed."""
    proxy = proxy_factory(f"r133o{list(HIDDEN).index(case)}", e2m=True, view=SDP_VIEW)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3.0)
    with registered_uas(proxy, "bob", None, "127.0.0.134") as bob:
        try:
            raw = build_request("INVITE", "sip:bob@example.com", body=HIDDEN[case],
                                content_type="application/sdp",
                                headers=[("Contact", "<sip:alice@127.0.0.1:9>")],
                                local_port=sock.getsockname()[1])
            sock.sendto(raw, ("127.0.0.1", proxy.port))
            status = None
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                reply = parse(sock.recvfrom(65535)[0])
                if (reply.status or 0) >= 200:
                    status = reply.status
                    break
            assert status == 400, status
            assert not bob.wait_for(1, timeout=0.5, method="INVITE")
        finally:
            sock.close()


# -- the 2xx to a re-INVITE ------------------------------------------------------------

# A stock pjsua2 caller: calls bob through the proxy, then (CONFIRMED) re-INVITEs him
# and prints the remote RTP address before and after the re-INVITE's answer.
_REINVITING_CALLER = PRELUDE + r'''
result = {"media_states": 0}
class Call(pj.Call):
    def onCallMediaState(self, prm):
        result["media_states"] += 1
        try:
            result["rtp_%d" % result["media_states"]] = self.getStreamInfo(0).remoteRtpAddress
        except Exception as exc:
            result["error"] = repr(exc)
call = Call(acc)
call.makeCall("sip:bob@example.com", pj.CallOpParam(True))
deadline = time.time() + 4
while time.time() < deadline and call.getInfo().stateText != "CONFIRMED":
    ep.libHandleEvents(50)
result["first_state"] = call.getInfo().stateText
if result["first_state"] == "CONFIRMED":
    ep.libHandleEvents(200)
    if sys.argv[2] == "update":
        call.update(pj.CallOpParam(True))
    else:
        call.reinvite(pj.CallOpParam(True))
    deadline = time.time() + 4
    while time.time() < deadline and result["media_states"] < 2:
        ep.libHandleEvents(50)
    ep.libHandleEvents(300)
    try:
        result["after_reinvite"] = call.getStreamInfo(0).remoteRtpAddress
        result["state"] = call.getInfo().stateText
    except Exception as exc:
        result["error2"] = repr(exc)
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''


def _reinvited_call(proxy_factory, tmp_path, reanswer: bytes, name: str,
                    method: str = "INVITE", content_type: str = "application/sdp"):
    pytest.importorskip("pjsua2")
    script = tmp_path / "reinviting_caller.py"
    script.write_text(_REINVITING_CALLER)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    mark = proxy.log_mark()
    state: dict = {}

    def responder(request):
        if request.method not in ("INVITE", "UPDATE"):
            return make_response(request, 200, "OK")
        contact = [("Contact", f"<sip:bob@127.0.0.1:{state['port']}>")]
        if request.to_tag is None:
            return make_response(request, 200, "OK", contact, body=CLEAN,
                                 content_type="application/sdp")
        return make_response(request, 200, "OK", contact,
                             body=reanswer.replace(b"o=bob 1 1", b"o=bob 1 2"),
                             content_type=content_type)
    with registered_uas(proxy, "bob", None, "127.0.0.135", responder=responder) as bob:
        state["port"] = bob.port
        out = subprocess.run([sys.executable, str(script), str(proxy.port),
                              method.lower()], capture_output=True, timeout=25)
        got = script_result(out.stdout, out.stderr)
        invites = bob.wait_for(1, method="INVITE") + bob.wait_for(1, method=method) \
            if method != "INVITE" else bob.wait_for(2, method="INVITE")
        time.sleep(0.3)
        answers = [row for row in proxy.media_rows() if row["direction"] != "request"]
        log = proxy.log_since(mark)
        seen = [ln[ln.index("e2m: "):] for ln in log.splitlines()
                if "e2m: INVITE" in ln or "e2m: UPDATE" in ln]
        return got, answers, len(invites), seen


def test_reinvite_answer_the_view_refuses_moves_the_media_unrecorded(proxy_factory, tmp_path):
    """Mid-dialog: the stock caller re-INVITEs bob; bob's 200 carries the two-``c=``
    answer.  Secure: the address the caller sends to after it is one the proxy
    recorded (or the answer is not relayed)."""
    got, answers, invites, seen = _reinvited_call(
        proxy_factory, tmp_path, HIDDEN["two c= in the media section"], "r133r")
    print(f"\nre-INVITE: caller {got}; INVITEs at bob {invites}; answer rows "
          f"{[(r['address'], r['port']) for r in answers]}; log {seen}")
    # the re-offer reached bob (more than once when its 200 was dropped: the caller
    # retransmits it)
    assert invites >= 2 and got.get("first_state") == "CONFIRMED", got
    taken = got.get("after_reinvite")
    assert any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_update_answer_the_view_refuses_moves_the_media_unrecorded(proxy_factory, tmp_path):
    """The same with an UPDATE (RFC 3311) for the new offer instead of a re-INVITE."""
    got, answers, invites, seen = _reinvited_call(
        proxy_factory, tmp_path, HIDDEN["two c= in the media section"], "r133u",
        method="UPDATE")
    print(f"\nUPDATE: caller {got}; requests at bob {invites}; answer rows "
          f"{[(r['address'], r['port']) for r in answers]}; log {seen}")
    # the re-offer reached bob (more than once when its 200 was dropped: the caller
    # retransmits it)
    assert invites >= 2 and got.get("first_state") == "CONFIRMED", got
    taken = got.get("after_reinvite")
    assert any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_control_a_clean_reinvite_answer_is_recorded(proxy_factory, tmp_path):
    got, answers, invites, _ = _reinvited_call(proxy_factory, tmp_path,
                                               CLEAN.replace(b"40404", b"40406"), "r133rc")
    assert invites == 2 and got.get("after_reinvite") == "127.0.0.1:40406", got
    assert ("127.0.0.1", 40406) in [(row["address"], row["port"]) for row in answers]
