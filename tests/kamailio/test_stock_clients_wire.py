"""Issue 14: stock SIP clients, not only our own, authenticate at the home proxy.

``sipsak`` with ``-a`` (its own digest) registers and sends a MESSAGE; a SIPp scenario
with ``[authentication]`` registers and makes a call (INVITE and BYE challenged, ACKs
not).  The proxy's users are added with ``e2m-proxy users add``.  The digest ``uri``
must be the Request-URI (reviews 67, 68, 70): SIPp's one ``-auth_uri`` names the
INVITE's target, so its BYE to the callee's contact is answered 400, as the scenario
expects.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from e2m_lab.kamailio_harness import RawUas
from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

USERS = {"alice": "alice-Stock-1", "bob": "bob-Stock-2"}

needs_sipsak = pytest.mark.skipif(shutil.which("sipsak") is None,
                                  reason="sipsak is not installed (Debian package sipsak)")


def _answering(uas: RawUas):
    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE":
            answer = answer.replace("To", f"{request.get('To')};tag=s1")
            answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
        return answer
    return respond


def _sipsak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sipsak", *args], capture_output=True, text=True, timeout=30)


@needs_sipsak
def test_sipsak_registers_and_sends_a_message_with_digest(proxy_factory, raw_uas, tmp_path):
    proxy = proxy_factory("sipsak", e2m=False, auth=True, users=USERS)
    port = str(proxy.port)
    # bob's phone: sipsak registers its contact (usrloc mode)
    registered = _sipsak("-U", "-C", f"sip:bob@127.0.0.1:{raw_uas.port}",
                         "-s", "sip:bob@127.0.0.1", "-r", port, "-u", "bob",
                         "-a", USERS["bob"], "-x", "600")
    assert registered.returncode == 0, registered.stdout[-1500:] + registered.stderr[-500:]
    refused = _sipsak("-U", "-C", "sip:bob@127.0.0.1:9", "-s", "sip:bob@127.0.0.1", "-r", port,
                      "-u", "bob", "-a", "not-the-password")
    assert refused.returncode != 0
    # sipsak's own MESSAGE mode (-M) crashes in Debian's 0.9.8.1 (sipsak issues 93, 95,
    # 97), so it sends the MESSAGE in its "shoot" mode from a file, as operators script it
    message = tmp_path / "message.sip"
    message.write_bytes(b"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\n"
                        b"From: <sip:alice@example.com>;tag=sk1\r\nTo: <sip:bob@127.0.0.1>\r\n"
                        b"Call-ID: sipsak-message@127.0.0.1\r\nCSeq: 1 MESSAGE\r\n"
                        b"Max-Forwards: 70\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 17\r\n\r\nhello from sipsak")
    sent = _sipsak("-f", str(message), "-s", "sip:bob@127.0.0.1", "-r", port, "-u", "alice",
                   "-a", USERS["alice"], "-vv")
    assert sent.returncode == 0, sent.stdout[-1500:] + sent.stderr[-500:]
    assert "authorizing" in sent.stdout and "200 OK" in sent.stdout
    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    assert got.body.startswith(b"hello from sipsak")
    assert got.get("Proxy-Authorization") is None


def test_sipp_with_authentication_registers_and_calls(proxy_factory, sipp, raw_uas):
    proxy = proxy_factory("sipp-auth", e2m=True, auth=True, users=USERS)
    raw_uas.responder = _answering(raw_uas)
    registered = sipp.uac("uac_register_auth.xml", proxy.port,
                          keys={"user": "bob", "contact_port": raw_uas.port},
                          extra_args=["-au", "bob", "-ap", USERS["bob"]])
    assert registered.rc == 0, registered.output[-1500:]
    wrong = sipp.uac("uac_register_auth.xml", proxy.port,
                     keys={"user": "bob", "contact_port": 9},
                     extra_args=["-au", "bob", "-ap", "guess"], timeout=4)
    assert wrong.rc != 0                      # the second REGISTER gets 401 again
    # the digest uri must be the INVITE's Request-URI (RFC 3261 §22.4; review 68):
    # SIPp's default, the proxy's address, binds no target and is refused (400)
    bare = sipp.uac("uac_call_auth.xml", proxy.port,
                    keys={"from_user": "alice", "to_user": "bob"},
                    extra_args=["-au", "alice", "-ap", USERS["alice"]], timeout=4)
    assert bare.rc != 0 and not raw_uas.received
    call = sipp.uac("uac_call_auth.xml", proxy.port,
                    keys={"from_user": "alice", "to_user": "bob"},
                    extra_args=["-au", "alice", "-ap", USERS["alice"],
                                "-auth_uri", "bob@example.com"])
    assert call.rc == 0, call.output[-1500:]
    # its BYE's credentials name the INVITE's target, not the contact it goes to: 400
    methods = [m.method for m in raw_uas.received]
    assert methods == ["INVITE", "ACK"]
    assert all(m.get("Proxy-Authorization") is None for m in raw_uas.received)
