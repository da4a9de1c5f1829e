"""An eightieth attacker's review (December 2026) of 3653837: review 79's line-end fix
(``kemi._bare_line_ends`` in ``route_sanity`` and the core reply route,
``sip.parse(exact=True)``) attacked on a real Kamailio 5.6.3 (``home_proxy``: MESSAGE
text/plain viewed, SQLite archive, open registrar), with a raw TCP UA standing in for
a phone.  What a stock pjsip peer does with the bytes is applied to what reaches it
(``_pjsip_frames``: ``pjsip_find_msg`` ends a stream's head only at ``"\\n\\r\\n"``);
the real phone is in ``tests/pjsua/test_review80_phone.py``.

Hole (``test_hole_a_head_ending_in_a_bare_cr_is_relayed_unframable_to_a_tcp_ua``, and
the reply direction ``test_hole_a_reply_ending_in_a_bare_cr_reaches_a_tcp_caller``):
**a head whose blank line is a bare CR passes both checks and is relayed.**

- Attacker: an **off-path sender** (or any user) who knows alice's AoR, for the
  request; the **insider callee** (or an untrusted hop on its side), for the reply.
- Messages: one bodiless MESSAGE to alice over UDP whose every line ends in CRLF but
  whose last octet is a lone ``\\r`` in place of the blank line
  (``...Content-Length: 0\\r\\n\\r``); for the reply, bob's 200 to alice's TCP MESSAGE
  written the same way.  Kamailio's ``get_hdr_field`` takes a line starting with CR as
  the end of the head ("double crlf or lflf or crcr"), ``get_body`` skips the one CR,
  ``$bs`` is 0; ``_bare_line_ends`` counts LFs against CRLFs only (no LF here, so none
  is bare); the core's ``_parse_head`` strips a trailing CR from the last "line" and
  takes the empty rest as the blank line, and the ``exact`` check also counts LFs.
- Effect: the proxy relays the MESSAGE (with its own Via and policy header) down
  alice's TCP connection ending in ``\\r\\n\\r``: no ``\\n\\r\\n`` ends that head, so pjsip keeps
  reading and takes the next message on the connection for the rest of this one (its
  own first ``Content-Length: 0`` then cuts it) - review 79's wedge again, with one
  octet less.  The reply is relayed the same way (a bodiless 200 to MESSAGE is not read
  by the core, and the core reply route's check passes it).
- At fault: ``kamailio_app/kemi.py`` ``_bare_line_ends`` (``return raw.count(b"\\n")
  != raw.count(b"\\r\\n")``: a CR not followed by LF is never counted) and
  ``e2m_plugins/sip.py`` ``parse`` (``lines.count(b"\\n") != lines.count(b"\\r\\n")``,
  and ``_parse_head``'s ``if raw.endswith(b"\\r")`` on a last line with no LF).
- Fix: require the head, as Kamailio delimits it (``$ml - $bs`` octets), to end in
  ``\\r\\n\\r\\n`` and to hold no CR that is not followed by LF (``raw.count(b"\\r") ==
  raw.count(b"\\r\\n") == raw.count(b"\\n")`` and ``raw.endswith(b"\\r\\n\\r\\n")``); in
  ``parse(exact=True)`` refuse a head whose blank line is not CRLF.

Controls: the same messages with a CRLF blank line reach alice and are framed by the
pjsip rule (``test_control_*``); the LF-only forms stay refused (review 79's fix held).

Hole 2 (``test_hole_deregistrations_lock_a_shared_address_out``; the model and the
full account in ``tests/unit/test_review80.py``): **REGISTERs that bind nothing hold a
shared address's registration slots for an hour.**  Attacker: an off-path sender forging
(or a stranger sharing) an address S, the registrar open.  Messages: from S,
``registrations_per_source`` (3 here) REGISTERs for junk AoRs, each ``Expires: 0``: the
registrar binds nothing and answers 200.  Effect: bob's first REGISTER from S right after
is 403 "Too Many Registrations From This Address", though S has no live AoR; so is every
new phone behind S for ``MAX_EXPIRES`` (3600 s), renewable with 3 datagrams an hour.
At fault: ``kemi.count_registration`` claims a slot (``_claim_slot``, then
``sht_seti(... tag)``) before the registrar reads Contact/Expires, lifetime e2mregs'
autoexpire.  Fix: a REGISTER that binds nothing claims no slot and frees its pair's;
a slot lives as long as the granted binding.  Controls:
``test_control_an_open_registrar_binds_nothing_for_expires_0`` (the junk AoRs are not
bound: a MESSAGE to one is 404) and ``test_control_bob_registers_from_an_address_without_the_burst``.

Tried and held: a bare CR inside a header line (the core's ``_CTL`` refuses it, 400 for
a MESSAGE it reads); ``CR CR LF`` (the core's ``_CTL`` again: 400); a folded line (read
alike, pjsip unfolds too); leading keep-alive CRLFs before a UDP request (the core skips
them, so does Kamailio); the compact ``l:`` (review 79's controls); a head ending in
``\\r\\n\\r`` followed by a body (the core reads ``\\r<body>`` as a header line with a
control character: 400 for requests it reads).

Fixed (stop 33): see ``tests/unit/test_review80.py``; the three holes turned XPASS
on a real Kamailio and the markers are gone.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import pytest

from e2m_lab.kamailio_harness import build_request, udp_transaction
from tests.kamailio.test_review79_wire import (_stream, alice_over_tcp,  # noqa: F401
                                               callee)

pytestmark = pytest.mark.kamailio

_N = itertools.count()


def _pjsip_frames(stream: bytes) -> bool:
    """Whether a stock pjsip peer can end the head of the first message on ``stream``
    (``pjsip_find_msg``: the head ends at the first ``\\n\\r\\n``, nothing else)."""
    return b"\n\r\n" in stream


def _udp_message(to_user: str, port: int, *, blank: bytes) -> tuple[bytes, str]:
    """A bodiless MESSAGE to ``to_user`` as UDP bytes; its head's last line is
    followed by ``blank`` (``b"\\r\\n"``: well formed; ``b"\\r"``: the attack)."""
    n = next(_N)
    call_id = "r80-%d-%d@127.0.0.1" % (os.getpid(), n)
    lines = [b"MESSAGE sip:%s@example.com SIP/2.0" % to_user.encode(),
             b"Via: SIP/2.0/UDP 127.0.0.1:%d;rport;branch=z9hG4bK-r80-%d-%d"
             % (port, os.getpid(), n),
             b"From: <sip:mallory@example.com>;tag=r80m%d" % n,
             b"To: <sip:%s@example.com>" % to_user.encode(),
             b"Call-ID: " + call_id.encode(),
             b"CSeq: 1 MESSAGE", b"Max-Forwards: 70", b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n" + blank, call_id


def _send_to_alice(home_proxy, alice, *, blank: bytes) -> tuple[bytes, bytes]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(1.5)
    try:
        data, call_id = _udp_message(alice.user, udp.getsockname()[1], blank=blank)
        udp.sendto(data, ("127.0.0.1", home_proxy.port))
        time.sleep(1.0)
        stream = _stream(alice)
        try:
            answer = udp.recv(65535)
        except (socket.timeout, TimeoutError):
            answer = b""
    finally:
        udp.close()
    start = stream.find(b"MESSAGE sip:")
    return (stream[start:] if start >= 0 else b""), answer


def test_control_a_crlf_message_reaches_a_tcp_ua_framed(home_proxy, alice_over_tcp):  # noqa: F811
    relayed, _ = _send_to_alice(home_proxy, alice_over_tcp, blank=b"\r\n")
    assert relayed.startswith(b"MESSAGE sip:"), relayed
    assert _pjsip_frames(relayed)


def test_control_the_lf_only_form_is_still_refused(home_proxy, alice_over_tcp):  # noqa: F811
    """Review 79's fix held: the same MESSAGE whose blank line is a bare LF is 400."""
    relayed, answer = _send_to_alice(home_proxy, alice_over_tcp, blank=b"\n")
    assert answer.startswith(b"SIP/2.0 400"), answer
    assert relayed == b""


def test_hole_a_head_ending_in_a_bare_cr_is_relayed_unframable_to_a_tcp_ua(
        home_proxy, alice_over_tcp):  # noqa: F811
    relayed, answer = _send_to_alice(home_proxy, alice_over_tcp, blank=b"\r")
    print(f"\nmallory got {answer[:40]!r}; alice's stream: {relayed[-60:]!r}")
    assert relayed == b"" or _pjsip_frames(relayed), \
        "relayed to alice's TCP connection with no \\n\\r\\n ending its head"


def _answer(blank: bytes):
    def respond(request):
        lines = [b"SIP/2.0 200 OK"] + [("%s: %s" % (n, v)).encode() for n, v in request.headers
                                       if n.lower() in ("via", "from", "to", "call-id", "cseq")]
        return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n" + blank
    return respond


def _reply_run(home_proxy, callee, alice, blank: bytes) -> bytes:  # noqa: F811
    user, bob = callee
    bob.responder = _answer(blank)
    message = alice.build("MESSAGE", "sip:%s@example.com" % user,
                          headers=[("Content-Type", "text/plain")]).with_body(b"hi bob")
    alice.send(message.replace("Via", alice.via()))
    assert bob.wait_for(1, timeout=2)
    time.sleep(0.5)
    stream = _stream(alice, wait=0.5)
    start = stream.find(b"SIP/2.0 200")
    return stream[start:] if start >= 0 else b""


def test_control_a_crlf_reply_reaches_a_tcp_caller_framed(home_proxy, callee,  # noqa: F811
                                                          alice_over_tcp):  # noqa: F811
    relayed = _reply_run(home_proxy, callee, alice_over_tcp, b"\r\n")
    assert relayed.startswith(b"SIP/2.0 200") and _pjsip_frames(relayed), relayed


def test_hole_a_reply_ending_in_a_bare_cr_reaches_a_tcp_caller(home_proxy, callee,  # noqa: F811
                                                               alice_over_tcp):  # noqa: F811
    relayed = _reply_run(home_proxy, callee, alice_over_tcp, b"\r")
    print(f"\nalice's stream: {relayed[-60:]!r}")
    assert relayed == b"" or _pjsip_frames(relayed), \
        "bob's 200 reached alice's TCP connection with no \\n\\r\\n ending its head"


# -- registrations that bind nothing ------------------------------------------------

def _register(user: str, host: str, expires: int) -> bytes:
    return build_request("REGISTER", "sip:example.com", from_user=user, to_user=user,
                         headers=[("Contact", f"<sip:{user}@{host}:4444>;expires={expires}"),
                                  ("Expires", str(expires))])


@pytest.fixture
def capped(proxy_factory):
    return proxy_factory("r80-cap", e2m=False,
                         limits={"pike_requests": 0, "registrations_per_source": 3})


def _status(proxy, request: bytes, source: str):
    answer = udp_transaction(proxy.port, request, source=source)
    return answer.status if answer is not None else None


def test_control_bob_registers_from_an_address_without_the_burst(capped):
    assert _status(capped, _register("r80bob1", "127.0.0.81", 3600), "127.0.0.81") == 200


def test_control_an_open_registrar_binds_nothing_for_expires_0(capped):
    assert _status(capped, _register("r80junkx", "127.0.0.82", 0), "127.0.0.82") == 200
    message = build_request("MESSAGE", "sip:r80junkx@example.com", to_user="r80junkx",
                            body=b"hi", content_type="text/plain")
    assert _status(capped, message, "127.0.0.83") == 404      # nothing bound


def test_hole_deregistrations_lock_a_shared_address_out(capped):
    shared = "127.0.0.80"
    burst = [_status(capped, _register(f"r80junk{n}", shared, 0), shared) for n in range(3)]
    assert burst == [200] * 3
    bob = _status(capped, _register("r80bob", shared, 3600), shared)
    assert bob == 200, f"bob's first REGISTER from {shared} got {bob}, nothing bound there"


def test_a_refresh_keeps_its_slot_on_a_real_kamailio(capped):
    """The fix's refresh path on a real Kamailio (the slot's time left read as
    ``$shtex`` through a ``$var``): three AoRs fill the cap of 3 and each is refreshed
    with a shorter expiry; a refresh that did not find its own slot would need a
    fourth and get 403.  A fourth AoR is still refused, and the log holds no script
    error.  (The lifetimes themselves are the unit model's: no RPC shows an item's
    expiry.)"""
    shared = "127.0.0.84"
    mark = capped.log_mark()
    first = [_status(capped, _register(f"r80ref{n}", shared, 3600), shared) for n in range(3)]
    again = [_status(capped, _register(f"r80ref{n}", shared, 60), shared) for n in range(3)]
    assert first == again == [200] * 3
    assert _status(capped, _register("r80ref9", shared, 3600), shared) == 403
    log = capped.log_since(mark)
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]
