"""Review 144 (attacker's review of aa004e9), on the wire: the answer paths no review had
run against a stock caller.  Real Kamailio (``proxy_factory``, E2M on, ``view =
INVITE:application/sdp``, SQLite archive); a stock pjsua2 2.15.1 caller (no E2M hook,
the proxy as its outbound proxy); bob a ``RawUas`` registered at the proxy, whose
answers a thread sends (so he can send 183s, a 200 and in-dialog requests of his own).
The engine-level half (ACK bodies under a ``verify`` rule) is
``tests/unit/test_review144_ack_verify.py``.

No hole was confirmed in these areas.  Every test here is a control and passes
unmarked; what each shows is below, with the figures seen.

Controls (unmarked, pass)
-------------------------

- ``test_control_callee_reinvite_without_sdp_hidden_ack_is_dropped`` (the insider
  callee's form of review 141 K1): bob answers the stock caller's INVITE 200 with
  ``127.0.0.1:40510`` (recorded), then sends his own re-INVITE *without SDP* along the
  route set (Request-URI her Contact, Route her INVITE's Record-Route); her pjsip offers
  in its 200 (read and recorded as an ``INVITE`` response row, her own RTP port); bob's
  ACK carries review 141's two media-level ``c=`` lines (``127.0.0.1`` then
  ``127.0.0.9``).  Seen: the proxy drops the ACK (``ACK from 127.0.0.1 with a body the
  view refuses (MalformedError): dropped``), her pjsip repeats its 200 (read 4 times in
  the 6 s run: the first and 3 retransmissions, each relayed to bob) and her stream
  never leaves ``127.0.0.1:40510`` (``rtp`` list ``['127.0.0.1:40510']``).  The ACK path is the same one whichever party sends it
  (``route_in_dialog`` -> ``inspect_only`` -> ``readable_ack``).
- ``test_control_callee_reinvite_without_sdp_clean_ack_is_recorded_as_taken``: the same
  with a plain answer on ``127.0.0.9:40512``: her stream moves there
  (``['127.0.0.1:40510', '127.0.0.9:40512']``) and the archive has the row
  ``(ACK, request, 127.0.0.9, 40512)``: the set-up is live and the ACK is read.
- ``test_control_reliable_183_answer_then_another_sdp_in_the_200`` (offer in the
  INVITE, answer in a reliable 183 ``Require: 100rel``/``RSeq: 1`` on
  ``127.0.0.1:40502``, PRACK, then a 200 carrying a *different* SDP on
  ``127.0.0.9:40504``, same To tag): pjsua2 2.15.1 keeps the 183's answer (``rtp``
  ``['127.0.0.1:40502']``, CONFIRMED; pjsip ignores SDP in the 2xx once a reliable 18x
  completed the exchange on that To tag).  The proxy records both (rows ``(INVITE,
  response, 127.0.0.1, 40502)`` and ``(INVITE, response, 127.0.0.9, 40504)``): every
  address the caller took is recorded; the archive also holds one it never used.
- ``test_control_two_reliable_183s_with_different_sdp``: RSeq 1 on ``127.0.0.1:40506``,
  RSeq 2 on ``127.0.0.9:40508`` (both PRACKed), a bodiless 200: the caller keeps the
  first (``['127.0.0.1:40506']``), the proxy records both.  Same conclusion.
- ``test_control_a_reply_relabelled_with_another_method_is_not_taken``: bob answers the
  INVITE with a 200 whose CSeq method is ``MESSAGE`` (body: SDP on ``127.0.0.9:40500``).
  bob sends it 3 times, 0.5 s apart.  Seen: tm does not match it to the INVITE (it
  goes on retransmitting the INVITE to bob: 3 copies reached him) and the proxy reads it under its own method
  (``e2m: MESSAGE response 200 action=forward seen=- media=0``: the ``INVITE:`` rule does
  not cover MESSAGE, so the SDP is skipped, not recorded) and forwards it statelessly
  as a stray reply; the stock caller never takes it (pjsip's transaction key holds the
  CSeq method, RFC 3261 17.1.3): it stays ``CALLING`` with no stream.  With a raw
  caller the same 200 arrived for ``MESSAGE``, ``OPTIONS``, ``BYE`` and ``CANCEL``
  labels (3 copies each, ``seen=-``, no row).  Not a hole for an RFC 3261 caller (a stack
  that matched responses by branch alone would take an unread answer; none was run).

Tried and held (run on the wire or in the engine; scratch probes not kept unless named)
---------------------------------------------------------------------------------------

- ACK bodies under ``[policy] verify = INVITE:application/sdp`` (engine, see the unit
  module): a plaintext unsigned ACK answer is refused as a response would be
  (``SignatureRequiredError``, ``response_refused`` True: ``readable_ack`` drops it); an
  answer sealed for bob and the proxy but signed by carol is refused by bob's engine,
  strict or not (``UntrustedSignerError``); one sealed for bob and the proxy with no
  signature and no SIP context is refused by a default phone (``require_signature``).
  Observation, not claimed as a hole: that last ACK is opened by the proxy, refused
  (``SignatureRequiredError``), and **relayed unrecorded** (``response_refused`` False:
  it is sealed whole), and a phone with ``[e2m] require_signature = false`` takes its
  SDP.  The caller reaches the same end through the documented limit (an answer
  sealed for bob alone, signed and bound, is relayed and taken by any phone), so it
  gains nothing new; but the proxy did read this one, and could at least record it
  (review 134's suggestion for responses).  Through a verifying proxy a *stock*
  callee cannot be called at all: its plaintext 200 offer is dropped
  (``SignatureRequiredError`` on keyless content), as review 135 noted.
- The callee's re-INVITE form (above): held by review 141's fix.
- A 200 after a reliable 183, and repeated reliable 183s (above): the record is a
  superset of what pjsua2 takes.
- A reply re-labelled with another CSeq method (above): tm does not match it, the
  view skips it, pjsip drops it.

Not run (time): the certificate-service flood over TCP and TLS (per-source 20, per-site
100 for an IPv6 /56, total 10,000, the 100/s SUBSCRIBE pipe).  Read only: the pipe
counts every SUBSCRIBE before a transaction, so any stranger above 100/s (7 addresses
at pike's 15/s) keeps the service at 503 for everyone (review 120's documented row);
confirmed follows hold their places to their expiry (review 115's row); with
``SITE_PREFIX = 56`` and ``SITE_SHARES = 5`` a single /48 (RFC 6177's usual end-site
allocation) holds 256 x 100 places, more than the 10,000 total: the "many addresses"
class the docs already name, not measured here.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, parse_address_uri, register_contact
from e2m_lab.stock_caller import PRELUDE, RTP_CALL, script_result
from e2m_plugins.sip import RequestLine, SipMessage, make_response, parse

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def sdp(address: str, port: int, version: int = 1) -> bytes:
    return (f"v=0\r\no=bob 1 {version} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 {address}\r\n"
            f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


# review 128's two media-level c= lines: the view refuses it, pjmedia keeps the last
TWO_C = sdp("127.0.0.1", 40512, 3) + b"c=IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.9\r\n"
MOVED = sdp("127.0.0.9", 40512, 3)

# A stock pjsua2 caller: argv PROXY_PORT, "100rel" (PJSUA_100REL_MANDATORY) or "plain",
# seconds to run; prints every remote RTP address its stream names and its last state.
_CALLER = PRELUDE.replace(
    "acc = pj.Account()",
    'acfg.callConfig.prackUse = pj.PJSUA_100REL_MANDATORY if sys.argv[2] == "100rel" '
    'else pj.PJSUA_100REL_NOT_USED\nacc = pj.Account()') + RTP_CALL + r'''
call = RtpCall(acc)
call.makeCall("sip:bob@example.com", pj.CallOpParam(True))
deadline = time.time() + float(sys.argv[3])
def _state():
    try:
        return call.getInfo().stateText
    except Exception:
        return "GONE"
while time.time() < deadline:
    ep.libHandleEvents(50)
result["state"] = _state()
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
'''


class _Bob(RawUas):
    """A RawUas that also keeps the responses it gets (to its own re-INVITE)."""

    def __init__(self) -> None:
        self.responses: list[SipMessage] = []
        super().__init__()

    def _handle(self, data: bytes) -> bytes | None:
        try:
            message = parse(data)
        except Exception:  # noqa: BLE001 - RawUas keeps it in .raw
            message = None
        if message is not None and not message.is_request:
            self.responses.append(message)
        return super()._handle(data)


def _response(request: SipMessage, code: int, reason: str, contact: str, tag: str,
              body: bytes = b"", cseq: str | None = None,
              more: tuple[tuple[str, str], ...] = ()) -> SipMessage:
    """bob's answer with his To tag ``tag`` (the same on every answer of the call)."""
    out = make_response(request, code, reason, [("Contact", contact), *more], body=body,
                        content_type="application/sdp" if body else None)
    out = out.replace("To", f"{request.get('To')};tag={tag}")
    return out.replace("CSeq", cseq) if cseq else out


def _call(proxy_factory, tmp_path, name: str, plan, *, prack: str = "plain",
          seconds: float = 4.0):
    """The stock caller calls bob through the proxy; bob's ``plan(invite, bob, send,
    contact)`` runs in a thread at the first INVITE (later copies of it are left
    unanswered).  Returns (what pjsip took, media rows, e2m log lines, bob)."""
    pytest.importorskip("pjsua2")
    (tmp_path / "caller.py").write_text(_CALLER)
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    mark = proxy.log_mark()
    bob = _Bob()
    started: list[str] = []

    def send(message) -> None:
        data = message.serialize() if isinstance(message, SipMessage) else message
        bob.sock.sendto(data, ("127.0.0.1", proxy.port))

    def responder(request: SipMessage):
        if request.method != "INVITE" or request.to_tag:
            return make_response(request, 200, "OK")
        if request.call_id not in started:
            started.append(request.call_id)
            contact = f"<sip:bob@127.0.0.1:{bob.port}>"
            threading.Thread(target=plan, args=(request, bob, send, contact),
                             daemon=True).start()
        return None

    bob.responder = responder
    try:
        register_contact(proxy, "bob", bob.port, source="127.0.0.144")
        out = subprocess.run([sys.executable, str(tmp_path / "caller.py"), str(proxy.port),
                              prack, str(seconds)], capture_output=True, timeout=40)
        got = script_result(out.stdout, out.stderr)
        time.sleep(0.3)
        rows = [(r["method"], r["direction"], r["address"], r["port"])
                for r in proxy.media_rows()]
        log = [ln[ln.index("e2m"):] for ln in proxy.log_since(mark).splitlines()
               if "e2m" in ln and "INVITE request" not in ln]
        print(f"\n{name}: caller {got}\n rows {rows}\n bob got "
              f"{[(m.method, m.get('CSeq')) for m in bob.received]}\n log "
              + "\n  ".join(log))
        return got, rows, log, bob
    finally:
        bob.close()


def _taken_is_recorded(got, rows) -> bool:
    recorded = {f"{address}:{port}" for _, _, address, port in rows}
    return all(rtp in recorded for rtp in got.get("rtp", []))


# -- the callee re-INVITEs the stock caller without SDP -----------------------------------

def _reinvite_plan(ack_body: bytes):
    def plan(invite: SipMessage, bob: _Bob, send, contact: str) -> None:
        ok = _response(invite, 200, "OK", contact, "b144", sdp("127.0.0.1", 40510))
        send(ok)
        time.sleep(1.2)                       # her ACK, then the call is up
        route = list(invite.get_all("Record-Route"))   # the callee's route set, in order
        target = parse_address_uri(invite.get("Contact") or "")

        def request(method: str, branch: str, body: bytes = b"") -> bytes:
            hs = [("Via", f"SIP/2.0/UDP 127.0.0.1:{bob.port};rport;branch=z9hG4bK-{branch}"),
                  ("From", ok.get("To") or ""), ("To", invite.get("From") or ""),
                  ("Call-ID", invite.call_id), ("CSeq", f"101 {method}"),
                  ("Max-Forwards", "70"), *(("Route", r) for r in route)]
            if method != "ACK":
                hs.append(("Contact", contact))
            if body:
                hs.append(("Content-Type", "application/sdp"))
            return SipMessage(RequestLine(method, target), tuple(hs), body).serialize()

        send(request("INVITE", "r144-reinvite"))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(
                r.cseq == (101, "INVITE") and (r.status or 0) >= 200 for r in bob.responses):
            time.sleep(0.05)
        send(request("ACK", "r144-ack", ack_body))
    return plan


def _her_offers(bob: _Bob) -> list[SipMessage]:
    return [r for r in bob.responses if r.cseq == (101, "INVITE") and r.status == 200]


def test_control_callee_reinvite_without_sdp_hidden_ack_is_dropped(proxy_factory, tmp_path):
    got, rows, log, bob = _call(proxy_factory, tmp_path, "r144rd", _reinvite_plan(TWO_C),
                                seconds=6.0)
    offers = _her_offers(bob)
    assert offers and b"m=audio" in offers[0].body, "the stock caller offers in its 200"
    assert got.get("state") == "CONFIRMED", got
    # the hidden answer never reached her: her stream stays where the recorded 200 put it
    assert got.get("rtp") == ["127.0.0.1:40510"], got
    assert _taken_is_recorded(got, rows), (got, rows)
    assert any("a body the view refuses" in line and "dropped" in line for line in log), log
    # she repeats her 200 while no ACK comes (each ACK she draws is dropped the same way)
    assert len(offers) >= 2, [r.get("CSeq") for r in bob.responses]


def test_control_callee_reinvite_without_sdp_clean_ack_is_recorded_as_taken(proxy_factory,
                                                                           tmp_path):
    got, rows, log, bob = _call(proxy_factory, tmp_path, "r144rc", _reinvite_plan(MOVED),
                                seconds=6.0)
    assert _her_offers(bob), "the stock caller offers in its 200"
    assert got.get("rtp") == ["127.0.0.1:40510", "127.0.0.9:40512"], got
    assert ("ACK", "request", "127.0.0.9", 40512) in rows, rows
    assert _taken_is_recorded(got, rows), (got, rows)


# -- answers after a reliable 183 ---------------------------------------------------------

_RELIABLE = (("Require", "100rel"),)


def _reliable_then_200(invite: SipMessage, bob: _Bob, send, contact: str) -> None:
    send(_response(invite, 183, "Session Progress", contact, "b144",
                   sdp("127.0.0.1", 40502), more=(*_RELIABLE, ("RSeq", "1"))))
    time.sleep(1.0)                                   # her PRACK (bob answers it 200)
    send(_response(invite, 200, "OK", contact, "b144", sdp("127.0.0.9", 40504, 2)))


def _two_reliable(invite: SipMessage, bob: _Bob, send, contact: str) -> None:
    send(_response(invite, 183, "Session Progress", contact, "b144",
                   sdp("127.0.0.1", 40506), more=(*_RELIABLE, ("RSeq", "1"))))
    time.sleep(0.8)
    send(_response(invite, 183, "Session Progress", contact, "b144",
                   sdp("127.0.0.9", 40508, 2), more=(*_RELIABLE, ("RSeq", "2"))))
    time.sleep(0.8)
    send(_response(invite, 200, "OK", contact, "b144"))


def test_control_reliable_183_answer_then_another_sdp_in_the_200(proxy_factory, tmp_path):
    got, rows, log, bob = _call(proxy_factory, tmp_path, "r144p2", _reliable_then_200,
                                prack="100rel")
    assert got.get("state") == "CONFIRMED", got
    assert bob.wait_for(1, method="PRACK"), "the reliable 183 was PRACKed through the proxy"
    assert got.get("rtp") == ["127.0.0.1:40502"], got        # pjsip keeps the 183's answer
    assert _taken_is_recorded(got, rows), (got, rows)
    assert ("INVITE", "response", "127.0.0.9", 40504) in rows, rows   # recorded, unused


def test_control_two_reliable_183s_with_different_sdp(proxy_factory, tmp_path):
    got, rows, log, bob = _call(proxy_factory, tmp_path, "r144p3", _two_reliable,
                                prack="100rel")
    assert got.get("state") == "CONFIRMED", got
    assert len(bob.wait_for(2, method="PRACK")) == 2
    assert got.get("rtp") == ["127.0.0.1:40506"], got
    assert _taken_is_recorded(got, rows), (got, rows)
    assert ("INVITE", "response", "127.0.0.9", 40508) in rows, rows


# -- a reply re-labelled with another CSeq method ----------------------------------------

def _relabelled(invite: SipMessage, bob: _Bob, send, contact: str) -> None:
    for _ in range(3):
        send(_response(invite, 200, "OK", contact, "b144", sdp("127.0.0.9", 40500),
                       cseq=f"{invite.cseq[0]} MESSAGE"))
        time.sleep(0.5)


def test_control_a_reply_relabelled_with_another_method_is_not_taken(proxy_factory, tmp_path):
    got, rows, log, bob = _call(proxy_factory, tmp_path, "r144rl", _relabelled, seconds=3.0)
    assert got.get("state") != "CONFIRMED" and not got.get("rtp"), got
    # read under its own method: the INVITE rule does not cover MESSAGE, nothing recorded
    assert any("MESSAGE response 200 action=forward seen=- media=0" in line for line in log), log
    assert not [row for row in rows if row[2] == "127.0.0.9"], rows
    # tm did not take it for the INVITE's answer: the INVITE went on being retransmitted
    assert len(bob.wait_for(2, method="INVITE")) >= 2
