"""MESSAGE through the raw hook: identity, round trips, body rewrites both ways,
fail-closed sending and incoming rejections, on real pjsua2 over loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.pjsua2
pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from e2m_plugins.errors import UndecipherableError  # noqa: E402
from e2m_plugins.sip_errors import answer_for  # noqa: E402
from pjsua_hooks.endpoint import SendBlocked, SipEndpoint  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook, RxReject  # noqa: E402

PLAIN = b"e2m-marker"
WIRE = b"E2M-MARKER-AS-IT-CROSSED-THE-WIRE"


def swap_body(data: bytes, old: bytes, new: bytes) -> bytes | None:
    """``data`` with ``old`` replaced by ``new`` in the body, Content-Length fixed."""
    msg = sip.parse(data)
    if old not in msg.body:
        return None
    return msg.with_body(msg.body.replace(old, new)).serialize()


def is_message(data: bytes) -> bool:
    return data.startswith(b"MESSAGE ")


def two_phones(make_endpoint, hook: RawSipHook, kind: str = "udp"):  # type: ignore[no-untyped-def]
    ep: SipEndpoint = make_endpoint(hook=hook, require_e2m=True)
    ta, tb = ep.add_transport(kind), ep.add_transport(kind)
    return ep, ep.add_account("alice", ta), ep.add_account("bob", tb), tb.uri("bob")


def answer_ok(peer, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Answer a request a UdpPeer received with 200, so no transaction stays pending."""
    req = sip.parse(data)
    port = int(req.get("Via").split()[1].split(";")[0].rsplit(":", 1)[1])
    peer.send(sip.make_response(req, 200, "OK").serialize(), port)


def raw_message(peer, to_port: int, body: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """A MESSAGE a bare socket sends to a phone on ``to_port``."""
    return (f"MESSAGE sip:bob@127.0.0.1:{to_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};rport;branch=z9hG4bK-raw{id(body)}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:raw@127.0.0.1:{peer.port}>;tag=raw1\r\n"
            f"To: <sip:bob@127.0.0.1:{to_port}>\r\n"
            f"Call-ID: raw-{id(body)}@127.0.0.1\r\n"
            "CSeq: 1 MESSAGE\r\n"
            "Content-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_message_with_identity_hook(make_endpoint, kind: str) -> None:  # type: ignore[no-untyped-def]
    seen: dict[str, list[bytes]] = {"tx": [], "rx": []}
    hook = RawSipHook(on_tx=lambda d: seen["tx"].append(d),  # type: ignore[func-returns-value]
                      on_rx=lambda d: seen["rx"].append(d))  # type: ignore[func-returns-value]
    ep, alice, bob, bob_uri = two_phones(make_endpoint, hook, kind)
    mark = alice.send_message(bob_uri, "hello bob " + PLAIN.decode())
    got = ep.events.wait("message", source=bob.uri, since=mark)
    assert got["body"] == b"hello bob " + PLAIN and got["content_type"] == "text/plain"
    status = ep.events.wait("message_status", source=alice.uri, since=mark)
    assert status["code"] == 200
    assert any(is_message(d) and PLAIN in d for d in seen["tx"])
    assert any(is_message(d) and PLAIN in d for d in seen["rx"])
    assert any(d.startswith(b"SIP/2.0 200") and b"MESSAGE" in d for d in seen["tx"])
    assert any(d.startswith(b"SIP/2.0 200") and b"MESSAGE" in d for d in seen["rx"])
    assert not hook.errors and hook.counts["tx_rewritten"] == 0


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_message_survives_parse_serialize_round_trip(make_endpoint, direction: str) -> None:  # type: ignore[no-untyped-def]
    # The UA engine will work on e2m_plugins.sip objects: parse -> serialize must
    # give bytes pjsip accepts.  pjsua pads Content-Length, so the serialized
    # form differs from what pjsua printed and the rewrite (and on rx, the
    # re-parse) really happens.  One direction at a time: otherwise the
    # receiver would get already-normalised bytes.
    def round_trip(data: bytes) -> bytes:
        return sip.parse(data).serialize()

    hook = RawSipHook(**{f"on_{direction}": round_trip})
    ep, alice, bob, bob_uri = two_phones(make_endpoint, hook)
    mark = alice.send_message(bob_uri, "round trip")
    assert ep.events.wait("message", source=bob.uri, since=mark)["body"] == b"round trip"
    assert ep.events.wait("message_status", source=alice.uri, since=mark)["code"] == 200
    assert hook.counts[f"{direction}_rewritten"] >= 2     # the MESSAGE and its 200
    assert not hook.errors


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_body_rewritten_on_the_way_out_and_back(make_endpoint, kind: str) -> None:  # type: ignore[no-untyped-def]
    arrived: list[bytes] = []

    def on_rx(data: bytes) -> bytes | None:
        arrived.append(data)   # what the transport delivered, before our rewrite
        return swap_body(data, WIRE, PLAIN) if is_message(data) else None

    hook = RawSipHook(on_tx=lambda d: swap_body(d, PLAIN, WIRE) if is_message(d) else None,
                      on_rx=on_rx)
    ep, alice, bob, bob_uri = two_phones(make_endpoint, hook, kind)
    text = "a " + PLAIN.decode() + " in a body"
    mark = alice.send_message(bob_uri, text)
    got = ep.events.wait("message", source=bob.uri, since=mark)
    # pjsua on bob's side saw the restored text, with a consistent length
    assert got["body"] == text.encode()
    assert WIRE not in got["whole_msg"] and f"Content-Length: {len(text)}".encode() in got["whole_msg"]
    # the wire carried the rewritten form only
    wire = [d for d in arrived if is_message(d)]
    assert wire and all(WIRE in d and PLAIN not in d for d in wire)
    assert ep.events.wait("message_status", source=alice.uri, since=mark)["code"] == 200
    assert hook.counts["tx_rewritten"] >= 1 and hook.counts["rx_rewritten"] >= 1
    assert not hook.errors


def test_outgoing_rewrite_on_the_wire_and_retransmitted_unchanged(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    calls: list[bytes] = []

    def on_tx(data: bytes) -> bytes | None:
        if is_message(data):
            calls.append(data)
            return swap_body(data, PLAIN, WIRE)
        return None

    ep, alice, _bob, _ = two_phones(make_endpoint, RawSipHook(on_tx=on_tx))
    mark = alice.send_message(udp_peer.uri("raw"), "to a bare socket " + PLAIN.decode())
    # no answer yet: pjsip retransmits after T1 (500 ms)
    grams = udp_peer.collect(ep.pump, 3.0, until=lambda g: len(g) >= 2)
    assert len(grams) >= 2 and grams[0] == grams[1]
    assert WIRE in grams[0] and PLAIN not in grams[0]
    assert len(calls) == 1                       # one rewrite per transaction
    assert ep.hook.counts["tx_retransmitted"] >= 1
    answer_ok(udp_peer, grams[0])
    assert ep.events.wait("message_status", source=alice.uri, since=mark)["code"] == 200


def test_incoming_rewrite_from_a_bare_socket(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    hook = RawSipHook(on_rx=lambda d: swap_body(d, WIRE, PLAIN) if is_message(d) else None)
    ep, _alice, bob, _ = two_phones(make_endpoint, hook)
    bob_port = int(bob.uri.rsplit(":", 1)[1])
    mark = ep.events.mark()
    udp_peer.send(raw_message(udp_peer, bob_port, b"wire says " + WIRE), bob_port)
    got = ep.events.wait("message", source=bob.uri, since=mark)
    assert got["body"] == b"wire says " + PLAIN
    answers = udp_peer.collect(ep.pump, 2.0, until=lambda g: any(x.startswith(b"SIP/2.0 200") for x in g))
    assert any(a.startswith(b"SIP/2.0 200") for a in answers)   # routed back via restamped Via


def test_tx_callback_that_raises_sends_nothing(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    def on_tx(data: bytes) -> bytes | None:
        if is_message(data):
            raise UndecipherableError("no certificate for the peer")
        return None

    hook = RawSipHook(on_tx=on_tx)
    ep, alice, _bob, _ = two_phones(make_endpoint, hook)
    mark = ep.events.mark()
    with pytest.raises(SendBlocked) as info:
        alice.send_message(udp_peer.uri("raw"), "must never leave " + PLAIN.decode())
    assert "UndecipherableError" in str(info.value)
    assert info.value.hook_failure.direction == "tx" and info.value.hook_failure.blocked
    assert isinstance(info.value.hook_failure.exception, UndecipherableError)
    assert udp_peer.collect(ep.pump, 1.0) == []          # nothing on the wire
    status = ep.events.wait("message_status", source=alice.uri, since=mark)
    assert status["code"] >= 500
    # the endpoint is still healthy: without the failing callback it sends
    hook.on_tx = None
    mark = alice.send_message(udp_peer.uri("raw"), "now allowed")
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    assert len(grams) == 1 and b"now allowed" in grams[0]
    answer_ok(udp_peer, grams[0])
    assert ep.events.wait("message_status", source=alice.uri, since=mark)["code"] == 200


def test_tx_callback_with_bad_framing_is_refused(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    # Changing the body without fixing Content-Length would put a broken
    # message on the wire: the hook refuses it instead.
    hook = RawSipHook(on_tx=lambda d: d + b"extra" if is_message(d) else None)
    ep, alice, _bob, _ = two_phones(make_endpoint, hook)
    with pytest.raises(SendBlocked) as info:
        alice.send_message(udp_peer.uri("raw"), "x")
    assert "Content-Length" in info.value.hook_failure.detail
    assert udp_peer.collect(ep.pump, 0.7) == []


def test_rx_reject_answers_with_its_code_and_drops(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    cert = bytes(range(48))   # stands in for a DER certificate

    def on_rx(data: bytes) -> bytes | None:
        if is_message(data):
            raise RxReject.from_answer(answer_for(UndecipherableError(), "ua"),
                                       certificate_der=cert, detail="cannot open")
        return None

    ep, _alice, bob, _ = two_phones(make_endpoint, RawSipHook(on_rx=on_rx))
    bob_port = int(bob.uri.rsplit(":", 1)[1])
    mark = ep.events.mark()
    udp_peer.send(raw_message(udp_peer, bob_port, b"ciphertext we cannot open"), bob_port)
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    assert len(grams) == 1
    resp = sip.parse(grams[0])
    assert (resp.status, resp.reason) == (493, "Undecipherable")
    assert resp.get("Content-Type") == "application/pkix-cert" and resp.body == cert
    assert resp.call_id.startswith("raw-")
    assert ep.events.find("message", since=mark) == []   # never reached the application
    err = ep.hook.errors[-1]
    assert (err.direction, err.kind, err.blocked) == ("rx", "reject", True)


def test_rx_reject_from_a_response_built_above(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    # The UA engine builds whole responses (UAEngine.refusal); the hook sends
    # pjsip's stateless answer with that response's code, headers and body.
    def on_rx(data: bytes) -> bytes | None:
        if is_message(data):
            resp = sip.make_response(sip.parse(data), 493, "Undecipherable",
                                     [("Warning", '399 bob "no key"')], b"DER", "application/pkix-cert")
            raise RxReject.from_response(resp)
        return None

    ep, _alice, bob, _ = two_phones(make_endpoint, RawSipHook(on_rx=on_rx))
    bob_port = int(bob.uri.rsplit(":", 1)[1])
    udp_peer.send(raw_message(udp_peer, bob_port, b"sealed"), bob_port)
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    resp = sip.parse(grams[0])
    assert (resp.status, resp.get("Warning"), resp.body) == (493, '399 bob "no key"', b"DER")
    assert len(resp.get_all("Via")) == 1 and len(resp.get_all("Content-Type")) == 1


def test_rx_reject_with_warning_header(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    def on_rx(data: bytes) -> bytes | None:
        if is_message(data):
            raise RxReject(488, "Not Acceptable Here", headers=[("Warning", '399 bob "plaintext refused"')])
        return None

    ep, _alice, bob, _ = two_phones(make_endpoint, RawSipHook(on_rx=on_rx))
    bob_port = int(bob.uri.rsplit(":", 1)[1])
    udp_peer.send(raw_message(udp_peer, bob_port, b"plain"), bob_port)
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    resp = sip.parse(grams[0])
    assert resp.status == 488 and resp.get("Warning") == '399 bob "plaintext refused"'


@pytest.mark.parametrize("failure", ["exception", "longer", "drop"])
def test_rx_failures_never_deliver(make_endpoint, udp_peer, failure: str) -> None:  # type: ignore[no-untyped-def]
    def on_rx(data: bytes) -> bytes | None:
        if not is_message(data):
            return None
        if failure == "exception":
            raise ValueError("engine bug")
        if failure == "drop":
            raise RxReject(None, detail="the engine answers itself")
        return swap_body(data, b"x", b"xxxxxxxx")     # longer than what arrived

    ep, _alice, bob, _ = two_phones(make_endpoint, RawSipHook(on_rx=on_rx))
    bob_port = int(bob.uri.rsplit(":", 1)[1])
    mark = ep.events.mark()
    udp_peer.send(raw_message(udp_peer, bob_port, b"x marks"), bob_port)
    grams = udp_peer.collect(ep.pump, 0.8)
    assert ep.events.find("message", since=mark) == []
    if failure == "drop":
        assert grams == []
    else:
        assert len(grams) == 1 and sip.parse(grams[0]).status == 500
    assert ep.hook.errors[-1].direction == "rx" and ep.hook.errors[-1].blocked
    if failure == "longer":
        assert "longer" in ep.hook.errors[-1].detail


def test_response_the_rx_callback_refuses_is_not_delivered(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    def on_rx(data: bytes) -> bytes | None:
        if data.startswith(b"SIP/2.0 200") and b" MESSAGE\r\n" in data:
            raise ValueError("cannot open the answer")
        return None

    ep, alice, bob, bob_uri = two_phones(make_endpoint, RawSipHook(on_rx=on_rx))
    mark = alice.send_message(bob_uri, "hi")
    ep.events.wait("message", source=bob.uri, since=mark)
    ep.run_for(0.8)
    # the refused 200 never reached pjsua; the transaction is still pending and
    # the endpoint must still shut down cleanly around it (fixture teardown)
    assert ep.events.find("message_status", since=mark) == []
    assert any(e.direction == "rx" and e.kind == "callback" for e in ep.hook.errors)
