"""The endpoint's own duties: registration, digest retry through the hook,
answering by hand, the one-thread rule, and a clean interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.pjsua2
pj = pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from pjsua_hooks.endpoint import EndpointError, SipEndpoint  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def reply(peer, data: bytes, code: int, reason: str, headers=()) -> None:  # type: ignore[no-untyped-def]
    req = sip.parse(data)
    port = int(req.get("Via").split()[1].split(";")[0].rsplit(":", 1)[1])
    peer.send(sip.make_response(req, code, reason, headers).serialize(), port)


def test_register_and_unregister_at_a_registrar(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    ep: SipEndpoint = make_endpoint()
    t = ep.add_transport("udp")
    mark = ep.events.mark()
    acc = ep.add_account("alice", t, domain="example.com", registrar=udp_peer.uri("registrar"))
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    assert grams and grams[0].startswith(b"REGISTER ")
    req = sip.parse(grams[0])
    reply(udp_peer, grams[0], 200, "OK", [("Contact", f"{req.get('Contact')};expires=60")])
    reg = ep.events.wait("reg", source=acc.uri, since=mark)
    assert reg["code"] == 200 and reg["expiration"] > 0
    # close() un-registers first: answer that too, from another pump loop
    udp_peer.received.clear()
    acc.setRegistration(False)
    grams = udp_peer.collect(ep.pump, 2.0, until=bool)
    assert grams and b"REGISTER " in grams[0]
    reply(udp_peer, grams[0], 200, "OK")
    ep.events.wait("reg", source=acc.uri, since=reg.seq, where=lambda e: e["expiration"] <= 0)


def test_digest_retry_is_rewritten_again(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    # After a 407 pjsip reprints the request into the buffer our hook installed;
    # the hook must see (and rewrite) the new plaintext, not send it as is.
    seen: list[bytes] = []

    def on_tx(data: bytes) -> bytes | None:
        if not data.startswith(b"MESSAGE "):
            return None
        seen.append(data)
        msg = sip.parse(data)
        return msg.with_body(msg.body.upper()).serialize()

    ep: SipEndpoint = make_endpoint(hook=RawSipHook(on_tx=on_tx))
    acc = ep.add_account("alice", ep.add_transport("udp"), auth=("alice", "secret", "e2m"))
    mark = acc.send_message(udp_peer.uri("bob"), "quiet words")
    first = udp_peer.collect(ep.pump, 2.0, until=bool)[0]
    reply(udp_peer, first, 407, "Proxy Authentication Required",
          [("Proxy-Authenticate", 'Digest realm="e2m", nonce="n0nce", algorithm=MD5')])
    second = udp_peer.collect(ep.pump, 2.0, until=lambda g: len(g) >= 2)[1]
    assert b"Proxy-Authorization: Digest" in second
    assert first.endswith(b"QUIET WORDS") and second.endswith(b"QUIET WORDS")
    assert len(seen) == 2 and all(s.endswith(b"quiet words") for s in seen)
    reply(udp_peer, second, 200, "OK")
    assert ep.events.wait("message_status", source=acc.uri, since=mark)["code"] == 200


def test_answer_by_hand(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    ep: SipEndpoint = make_endpoint()
    ta, tb = ep.add_transport("udp"), ep.add_transport("udp")
    alice = ep.add_account("alice", ta)
    bob = ep.add_account("bob", tb, auto_answer=None)
    mark = ep.events.mark()
    alice.make_call(tb.uri("bob"))
    ep.events.wait("incoming_call", source=bob.uri, since=mark)
    ep.run_for(0.2)
    assert not bob.calls[0].confirmed
    bob.calls[0].respond(486, "Busy Here")
    ended = ep.events.wait("call_state", source=alice.uri, since=mark,
                           where=lambda e: e["state"] == pj.PJSIP_INV_STATE_DISCONNECTED)
    assert ended["code"] == 486


def test_only_the_owner_thread_may_call(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    ep: SipEndpoint = make_endpoint()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            ep.pump(10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert len(errors) == 1 and isinstance(errors[0], EndpointError)
    with pytest.raises(EndpointError):
        SipEndpoint().start()      # a second endpoint is refused, not an abort


def test_interpreter_exit_without_close_is_clean(tmp_path: Path) -> None:
    # The application forgets close() and still holds its Call objects: the
    # atexit handler must shut pjsua down without an assertion or abort.
    script = tmp_path / "forgetful.py"
    script.write_text(textwrap.dedent("""
        import pjsua2 as pj
        from pjsua_hooks.endpoint import SipEndpoint
        ep = SipEndpoint(require_e2m=True).start()
        ta, tb = ep.add_transport("tcp"), ep.add_transport("tcp")
        a, b = ep.add_account("alice", ta), ep.add_account("bob", tb)
        call = a.make_call(tb.uri("bob"))
        ep.events.wait_until(lambda: call.media_active, 5)
        mark = a.send_message(tb.uri("bob"), "bye")
        kept = (call, b.calls[0])
        print("media", call.media_active, flush=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "media True" in proc.stdout
    assert "Assertion" not in proc.stderr and "Fatal" not in proc.stderr
