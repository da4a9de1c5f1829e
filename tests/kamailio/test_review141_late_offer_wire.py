"""Review 141 (attacker's review of 3ccf964): the view's rules on the wire in the
offer/answer flows no review had run: reliable provisional responses and PRACK (RFC
3262), UPDATE in early and confirmed dialogs (RFC 3311), and the late offer (an INVITE
or re-INVITE without SDP: the offer in the 200, the answer in the ACK).  Real Kamailio
(``proxy_factory``, E2M on, ``view = INVITE:application/sdp``, SQLite archive), a stock
pjsua2 2.15.1 callee (no E2M hook, registered at the proxy) and, for the honest flows,
a stock pjsua2 caller (review 133's set-up, ``PJSUA_CALL_NO_SDP_OFFER`` for a late
offer, ``PJSUA_100REL_MANDATORY`` for 100rel).  The insider is a raw UDP caller.

Hole K1: a late offer's ACK answer that the view refuses reaches a stock callee, and its media is not recorded
----------------------------------------------------------------------------------------------------------------

- Attacker: an **insider UA** caller (any user who can call through the home proxy;
  no credentials are asked of an ACK) hiding where the call's media goes from the
  archive and the firewall view.  The same works for an **untrusted hop** on the
  caller's side of the proxy (it rewrites the ACK's body), and for an insider callee
  against a stock caller when he sends the re-INVITE without SDP (the ACK is then
  his).
- Set-up: alice (raw) INVITEs bob (stock pjsua2) through the proxy **without SDP**; bob's
  pjsip offers in its 200 (``127.0.0.1:4000``, read and recorded: 1 ``INVITE`` response
  row); alice's ACK goes along the Record-Route (with the proxy's route token) and
  carries the answer, ``m=audio 40408``, written so that only the stock stack reads it
  as sent, as in reviews 128, 135 and 136:
  (a) two media-level ``c=`` lines, ``127.0.0.1`` then ``127.0.0.9`` (pjmedia keeps the
  last); (b) ``Content-Transfer-Encoding: quoted-printable`` with ``a=label:x=`` before a
  media-level ``c=IN IP4 127.0.0.9`` (pjsip ignores the header); (c) the SDP on
  ``127.0.0.9`` inside a ``multipart/alternative`` (pjsip finds it there); and (d)
  the same as (a) in the ACK of a re-INVITE without SDP in the confirmed call (the first
  ACK answered plainly on ``127.0.0.1:40408``, recorded).
- Observed (each case, run several times): the proxy logs ``e2m: ACK request
  action=reply seen=- media=0 code=400 error=MalformedError`` ((a), (d)) or ``code=415
  error=UnsupportedMediaTypeError`` ((b), (c)), counts it (``e2m_acks_unread`` +1), and
  **relays the ACK** (``inspect_only`` ignores the verdict); no ``ACK`` media row and no
  ``e2m media: ACK`` line.  The stock callee is ``CONFIRMED`` with its stream's remote
  RTP **127.0.0.9:40408**; the archive's only rows are bob's own offer
  (``127.0.0.1:4000``) and, in (d), the first answer ``127.0.0.1:40408``: the archive
  names an address the media left.  The same SDP in an UPDATE in that call is answered
  400 and bob's stream stays on ``127.0.0.1:40408`` (control), so the ACK is the one
  door left for an answer the view refuses: responses are dropped since review 133 K3,
  requests refused.
- Code at fault: ``kamailio_app/kemi.py:1514-1524`` (``route_in_dialog``: an ACK is
  relayed unless ``inspect_only`` returns False) and ``kemi.py:2143-2176``
  (``inspect_only``: a verdict that is not ``forward`` is counted at 2162-2163 and the
  ACK goes on; nothing is archived at 2165 because a refused verdict has no ``seen``).
  ``docs/threat-model.md:705`` and ``docs/protocol.md:509`` accept this as "an ACK
  cannot be refused" for a body the proxy "cannot open", and review 133 called the late
  offer's case "forwarded by design"; but these ACKs are not sealed: they are plaintext
  the proxy opened and refused, which is review 133 K3's argument for responses (a
  stock peer reads only plaintext, so the only way to hide from the view is a spelling
  only the stack reads; the sealed case stays the documented limit).
- Suggested fix: drop (do not relay) an in-dialog ACK whose reading is refused the way
  a response is: ``MalformedError``/``LimitExceededError``, or any refusal while some
  part is readable without a key (``ProxyEngine.response_refused`` applied to the ACK's
  reading, ``_keyless_content``), still counted and logged.  An ACK cannot be answered
  but it can be dropped: the UAS retransmits its 2xx, the caller's stack repeats the
  same ACK, and the call ends at the UAS's timer (64*T1) with a BYE, exactly as when
  the core reply route drops a refused 2xx.  Keep relaying a body sealed whole for
  others (the documented limit), and update the two doc passages.
- Test: ``test_hole_late_offer_ack_answer_the_view_refuses[...]`` (4, strict xfail):
  secure means every address the stock callee's stream takes is a recorded row's (or
  the ACK never reached it); it also asserts the documented counter (+1) is live.

Controls (unmarked, pass)
-------------------------

- ``test_control_a_clean_late_offer_ack_is_recorded_as_taken``: the same ACK with a
  plain answer on ``127.0.0.9:40408``: the callee takes it, the archive has the row
  ``(ACK, 127.0.0.9, 40408)``, ``e2m_acks_unread`` +0 (the ACK path and the counter are
  live).
- ``test_control_the_same_sdp_in_an_update_is_refused``: after a plain ACK, an UPDATE
  (RFC 3311, confirmed dialog) offering (a)'s SDP: 400, bob's stream stays on the
  recorded ``127.0.0.1:40408``.
- ``test_control_honest_stock_flows_are_recorded_as_taken[late-plain|early-100rel]``:
  stock pjsua2 to stock pjsua2 through the proxy: a late offer (200 offer, ACK answer:
  rows ``INVITE`` response and ``ACK`` request), and an early offer answered in a
  reliable 183 (``Require: 100rel``, PRACK, 200): both CONFIRMED, every remote RTP
  address either side took is a recorded row (no honest break found there).

Tried and held (run on the wire with raw UAs and the real proxy, scratch scripts not
kept unless named above)
--------------------------------------------------------------------------------------

- Reliable 183 (``Require: 100rel``, ``RSeq: 1``) carrying the two-``c=`` answer to an
  INVITE offer: dropped in the core reply route (``a INVITE 183 that must be read and
  cannot be (MalformedError ...): dropped``, each retransmission), the caller gets only
  the 100; a clean one is read and recorded (``INVITE response 183`` row).
- Late offer with 100rel: INVITE without SDP, clean offer in a reliable 183 (recorded),
  PRACK carrying the two-``c=`` answer: 400, bob never gets the PRACK.
- The 200 to a PRACK carrying the two-``c=`` SDP: dropped in the core reply route (4
  retransmissions, 4 drops); the PRACK itself (no body) relayed.
- Early UPDATE (in the early dialog of a reliable 183) offering the two-``c=`` SDP: 400,
  not relayed.
- The ACK past the proxy's checks: (1) no Route header at all (Request-URI bob's
  Contact, within tm's wait after the 200: ``route_in_dialog``'s last branch asks
  ``t_check_trans``), (2) a Route naming the proxy without the route token, (3) the
  body after ``Content-Length: 0`` in the datagram: none reached the callee (it stayed
  ``CONNECTING``, its 200 retransmitted and re-read).  So the routed ACK is the only
  door, and it is read.
- An honest stock late-offer call and a 100rel early-offer call (the controls).
- Read in the code: ``Rule.covers`` takes UPDATE, PRACK and ACK under ``INVITE:``
  (``headers.py:316-323``); every response with a body is read in the core reply route
  (``read_reply``, ``response_needs_reading``: any body), whatever its status or CSeq
  method; a request is refused before it is relayed.  (Not run: a reply re-labelled
  with another CSeq method; review 113 noted tm matches only the request's method.)

Seen, not isolated: a stock pjsua2 2.15.1 caller placing a late-offer call with
``PJSUA_100REL_MANDATORY`` to a stock pjsua2 callee that answers 183 first aborts on
``pjmedia/endpoint.c:939 pjmedia_endpt_create_base_sdp: Assertion "Invalid address
family"`` when the reliable 183's offer arrives.  Its cause (pjsip's own, or something
in the relayed 183) was not determined (a direct run without the proxy could not be
set up in the time: ``makeCall`` without an outbound proxy raised); the raw run of the
same flow above held, and the case is left out of the honest controls.

Fixed (stop 45): an in-dialog ACK with a body is read as a response is
(``kemi.readable_ack``: ``check_readable``, then ``read_response`` and
``response_refused``); one the core cannot take apart, or whose body the view refuses
while some part is readable without a key, is dropped (logged, counted in
``e2m_acks_unread``).  The callee repeats its 200, each ACK it draws is dropped too, and
it ends the call at its timer, as with a dropped 2xx since review 133 K3.  A body sealed
whole for others still goes on (the documented limit).  The four hole tests failed on
the code before (``--runxfail``; the callee took 127.0.0.9) and pass with it; their last
assertion, that the callee's stream is CONFIRMED, was the reviewer's precondition and
is now the opposite: the first ACK never reached it.  Review 113 K3's ACKs the core
cannot parse are dropped by the same rule (that module's tests changed with it).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from e2m_lab.kamailio_harness import build_request, register_contact, parse_address_uri
from e2m_lab.stock_caller import ENDPOINT, PRELUDE, RTP_CALL, announced_port, script_result
from e2m_plugins.sip import RequestLine, SipMessage, parse
from tests.kamailio.test_review113_policy_wire import _e2m_stats

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
_HEAD = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
_M = b"m=audio 40408 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
CLEAN = _HEAD + _M
# the answer on 127.0.0.9, written plainly: the view reads it, pjmedia takes it
MOVED = CLEAN.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.9")
# review 128's two media-level c= lines: the view refuses it, pjmedia keeps the last
TWO_C = CLEAN + b"c=IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.9\r\n"
# review 136 K1's soft line break under Content-Transfer-Encoding: quoted-printable
QP_SOFT_BREAK = CLEAN + b"a=label:x=\r\nc=IN IP4 127.0.0.9\r\n"
# review 135 K2: the SDP inside a multipart/alternative (pjsip finds it there)
_ALT = "r141alt"
ALTERNATIVE = (f"--{_ALT}\r\nContent-Type: application/sdp\r\n\r\n".encode() + MOVED
               + f"--{_ALT}--\r\n".encode())

# A stock pjsua2 callee (no E2M hook): prints its SIP port, answers the first call 200
# (to an INVITE without SDP: pjsip offers in the 200 and takes the answer from the ACK),
# and prints every remote RTP address its stream names, one per media state, until
# the deadline.
_STOCK_CALLEE = ENDPOINT + r'''
print("PORT " + ep.transportGetInfo(transport_id).localName.rsplit(":", 1)[1], flush=True)
acfg = pj.AccountConfig()
acfg.idUri = "sip:bob@example.com"
acfg.sipConfig.transportId = transport_id
acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
early = len(sys.argv) > 2 and sys.argv[2] == "100rel"
if early:
    acfg.callConfig.prackUse = pj.PJSUA_100REL_MANDATORY
''' + RTP_CALL + r'''
calls = []
class Call(RtpCall):
    def onCallState(self, prm):
        try:
            result["state"] = self.getInfo().stateText
        except Exception:
            pass
class Account(pj.Account):
    def onIncomingCall(self, prm):
        call = Call(self, prm.callId)
        calls.append(call)
        result["incoming"] = result.get("incoming", 0) + 1
        op = pj.CallOpParam()
        op.statusCode = 183 if early else 200
        try:
            call.answer(op)
        except Exception as exc:
            result["answer_error"] = repr(exc)
        result["answered_at"] = time.time()
acc = Account()
acc.create(acfg)
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    ep.libHandleEvents(50)
    if early and calls and "final" not in result and time.time() > result["answered_at"] + 1.0:
        result["final"] = True
        op = pj.CallOpParam()
        op.statusCode = 200
        try:
            calls[0].answer(op)
        except Exception as exc:
            result["answer_error"] = repr(exc)
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''


class _Caller:
    """An insider caller on a raw UDP socket (no E2M, plaintext), talking to the proxy."""

    def __init__(self, proxy_port: int) -> None:
        self.proxy_port = proxy_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.3)
        self.port = self.sock.getsockname()[1]
        self.n = 0

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.proxy_port))

    def final(self, cseq: str, timeout: float = 5.0) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = parse(self.sock.recvfrom(65535)[0])
            except (socket.timeout, Exception):   # noqa: BLE001 - keep listening
                continue
            if message.is_request:
                continue
            if " ".join(map(str, message.cseq)) == cseq and (message.status or 0) >= 200:
                return message
        return None

    def in_dialog(self, method: str, ok: SipMessage, invite: SipMessage, cseq: int, *,
                  body: bytes = b"", content_type: str | None = None,
                  headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        """``method`` in the dialog the INVITE's 200 ``ok`` made: Request-URI its
        Contact, Route its Record-Route reversed (RFC 3261 12.2.1.1)."""
        self.n += 1
        hs = [("Via", f"SIP/2.0/UDP 127.0.0.1:{self.port};rport;"
                      f"branch=z9hG4bK-r141-{method.lower()}{self.n}-{cseq}"),
              ("From", invite.get("From") or ""), ("To", ok.get("To") or ""),
              ("Call-ID", invite.get("Call-ID") or ""), ("CSeq", f"{cseq} {method}"),
              ("Max-Forwards", "70")]
        hs += [("Route", r) for r in reversed(ok.get_all("Record-Route"))]
        if method != "ACK":
            hs.append(("Contact", f"<sip:alice@127.0.0.1:{self.port}>"))
        hs += list(headers)
        if content_type:
            hs.append(("Content-Type", content_type))
        target = parse_address_uri(ok.get("Contact") or "")
        return SipMessage(RequestLine(method, target), tuple(hs), body).serialize()

    def close(self) -> None:
        self.sock.close()


def _late_offer_call(proxy_factory, tmp_path, name: str, ack_body: bytes, *,
                     ack_type: str = "application/sdp",
                     ack_headers: tuple[tuple[str, str], ...] = (),
                     update: bytes | None = None, verify: tuple[str, ...] = (),
                     reinvite: bool = False):
    """The insider caller INVITEs bob (a stock pjsua2 callee registered at a proxy
    viewing INVITE SDP) with no SDP; bob's 200 offers; the caller's ACK carries
    ``ack_body``; then, with ``update``, an UPDATE offering that SDP in the confirmed
    dialog.  With ``reinvite`` the first ACK answers plainly (``CLEAN``) and a re-INVITE
    without SDP follows: bob's 200 offers again and its ACK carries ``ack_body``.  Returns (what bob's pjsip took, the proxy's media rows, its log lines,
    the UPDATE's final status); ``_late_offer_call.unread`` is how much the proxy's
    ``e2m_acks_unread`` grew."""
    pytest.importorskip("pjsua2")
    script = tmp_path / "stock_callee.py"
    script.write_text(_STOCK_CALLEE)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW, verify=verify)
    mark, before = proxy.log_mark(), _e2m_stats(proxy)
    callee = subprocess.Popen([sys.executable, str(script),
                               "7" if update or reinvite else "5"],
                              stdout=subprocess.PIPE)
    caller = _Caller(proxy.port)
    update_status = None
    try:
        register_contact(proxy, "bob", announced_port(callee), source="127.0.0.141")
        raw = build_request("INVITE", "sip:bob@example.com",
                            headers=[("Contact", f"<sip:alice@127.0.0.1:{caller.port}>")],
                            local_port=caller.port)
        invite = parse(raw)
        caller.send(raw)
        ok = caller.final("1 INVITE")
        assert ok is not None and ok.status == 200, ok
        assert b"m=audio" in ok.body, "the stock callee offers in its 200"
        if reinvite:
            caller.send(caller.in_dialog("ACK", ok, invite, 1, body=CLEAN,
                                         content_type="application/sdp"))
            time.sleep(1.0)
            caller.send(caller.in_dialog("INVITE", ok, invite, 2))
            again = caller.final("2 INVITE")
            assert again is not None and again.status == 200, again
            # (the route set is the dialog's: the first 200's Record-Route)
            caller.send(caller.in_dialog("ACK", ok, invite, 2, body=ack_body,
                                         content_type=ack_type, headers=ack_headers))
        else:
            caller.send(caller.in_dialog("ACK", ok, invite, 1, body=ack_body,
                                         content_type=ack_type, headers=ack_headers))
        if update is not None:
            time.sleep(1.0)
            caller.send(caller.in_dialog("UPDATE", ok, invite, 2, body=update,
                                         content_type="application/sdp"))
            answer = caller.final("2 UPDATE")
            update_status = answer.status if answer is not None else None
        out, _ = callee.communicate(timeout=20)
    finally:
        caller.close()
        if callee.poll() is None:
            callee.kill()
            callee.wait()
    got = script_result(out)
    time.sleep(0.3)
    rows = [(r["method"], r["address"], r["port"]) for r in proxy.media_rows()]
    log = [ln[ln.index("e2m"):] for ln in proxy.log_since(mark).splitlines()
           if re.search(r"e2m( media)?: (ACK|UPDATE|INVITE)", ln)]
    after = _e2m_stats(proxy)
    _late_offer_call.unread = after.get("e2m_acks_unread", 0) - before.get("e2m_acks_unread", 0)
    print(f"\n{name}: callee {got}; media rows {rows}; update {update_status}; "
          f"acks_unread +{_late_offer_call.unread}; log {log}")
    return got, rows, log, update_status


def _taken_is_recorded(got, rows) -> bool:
    """Every address the callee's stream took is one the proxy recorded (or none)."""
    recorded = {f"{address}:{port}" for _, address, port in rows}
    return all(rtp in recorded for rtp in got.get("rtp", []))


HIDDEN_ACKS = {
    "two c= lines": dict(ack_body=TWO_C),
    "quoted-printable": dict(ack_body=QP_SOFT_BREAK,
                             ack_headers=(("Content-Transfer-Encoding", "quoted-printable"),)),
    "multipart/alternative": dict(ack_body=ALTERNATIVE,
                                  ack_type=f"multipart/alternative;boundary={_ALT}"),
    "two c= lines, re-INVITE": dict(ack_body=TWO_C.replace(b"o=alice 1 1", b"o=alice 1 2"),
                                    reinvite=True),
}


@pytest.mark.parametrize("case", list(HIDDEN_ACKS))
def test_hole_late_offer_ack_answer_the_view_refuses(proxy_factory, tmp_path, case):
    """Secure: every address the stock callee's stream takes from the ACK is one the
    proxy recorded (or the ACK never reached it)."""
    got, rows, log, _ = _late_offer_call(proxy_factory, tmp_path,
                                         f"r141a{list(HIDDEN_ACKS).index(case)}",
                                         **HIDDEN_ACKS[case])
    # the documented mitigation is live: the ACK is counted as unread
    assert _late_offer_call.unread == 1, log
    assert _taken_is_recorded(got, rows), (got, rows, log)
    # not taken at all: the proxy dropped the ACK, and the callee of a new call still
    # waits for one (it repeats its 200; each ACK it draws is dropped the same way)
    assert any("a body the view refuses" in line and "dropped" in line for line in log), log
    if not HIDDEN_ACKS[case].get("reinvite"):
        assert got.get("state") != "CONFIRMED" and not got.get("rtp"), got


def test_control_a_clean_late_offer_ack_is_recorded_as_taken(proxy_factory, tmp_path):
    got, rows, log, _ = _late_offer_call(proxy_factory, tmp_path, "r141ac", MOVED)
    assert got.get("rtp") == ["127.0.0.9:40408"], got
    assert ("ACK", "127.0.0.9", 40408) in rows, rows
    assert _late_offer_call.unread == 0


def test_control_the_same_sdp_in_an_update_is_refused(proxy_factory, tmp_path):
    got, rows, log, status = _late_offer_call(
        proxy_factory, tmp_path, "r141au", CLEAN,
        update=TWO_C.replace(b"o=alice 1 1", b"o=alice 1 2").replace(b"40408", b"40410"))
    assert status == 400, (status, log)
    assert got.get("rtp") == ["127.0.0.1:40408"], got


# -- honest stock-to-stock flows ------------------------------------------------------

# A stock pjsua2 caller (review 133's set-up: alice through the proxy as her outbound
# proxy); argv: PROXY_PORT, "late" (no SDP in the INVITE: PJSUA_CALL_NO_SDP_OFFER) or
# "early", "100rel" or "plain"; prints every remote RTP address its stream names.
_STOCK_CALLER = PRELUDE.replace(
    "acc = pj.Account()",
    'if sys.argv[3] == "100rel":\n    acfg.callConfig.prackUse = pj.PJSUA_100REL_MANDATORY\n'
    'acc = pj.Account()') + RTP_CALL + r"""
call = RtpCall(acc)
op = pj.CallOpParam(True)
if sys.argv[2] == "late":
    op.opt.flag |= pj.PJSUA_CALL_NO_SDP_OFFER
call.makeCall("sip:bob@example.com", op)
deadline = time.time() + 5
def _state():
    try:
        return call.getInfo().stateText
    except Exception:
        return "GONE"
while time.time() < deadline and _state() not in ("CONFIRMED", "GONE"):
    ep.libHandleEvents(50)
ep.libHandleEvents(300)
result["state"] = _state()
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
"""


def _stock_to_stock(proxy_factory, tmp_path, name: str, offer: str, prack: str):
    pytest.importorskip("pjsua2")
    (tmp_path / "callee.py").write_text(_STOCK_CALLEE)
    (tmp_path / "caller.py").write_text(_STOCK_CALLER)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    mark = proxy.log_mark()
    callee = subprocess.Popen([sys.executable, str(tmp_path / "callee.py"), "7", prack],
                              stdout=subprocess.PIPE)
    try:
        register_contact(proxy, "bob", announced_port(callee), source="127.0.0.141")
        out = subprocess.run([sys.executable, str(tmp_path / "caller.py"), str(proxy.port),
                              offer, prack], capture_output=True, timeout=20)
        back, _ = callee.communicate(timeout=20)
    finally:
        if callee.poll() is None:
            callee.kill()
            callee.wait()
    results = [script_result(text, out.stderr) for text in (out.stdout, back)]
    time.sleep(0.3)
    rows = [(r["method"], r["address"], r["port"]) for r in proxy.media_rows()]
    log = [ln[ln.index("e2m"):] for ln in proxy.log_since(mark).splitlines()
           if re.search(r"e2m( media)?: (ACK|PRACK|UPDATE|INVITE)", ln)]
    print(f"\n{name}: caller {results[0]}; callee {results[1]}; rows {rows}; log {log}")
    return results[0], results[1], rows, log


@pytest.mark.parametrize("offer,prack", [("late", "plain"), ("early", "100rel")])
def test_control_honest_stock_flows_are_recorded_as_taken(proxy_factory, tmp_path, offer, prack):
    caller, callee, rows, log = _stock_to_stock(proxy_factory, tmp_path,
                                                f"r141h{offer[0]}{prack[0]}", offer, prack)
    assert caller.get("state") == "CONFIRMED", (caller, callee, log)
    assert caller["rtp"] and callee["rtp"], (caller, callee)
    assert _taken_is_recorded(caller, rows) and _taken_is_recorded(callee, rows), \
        (caller, callee, rows)
