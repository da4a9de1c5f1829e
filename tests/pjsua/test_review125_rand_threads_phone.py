"""Review 125: the ``rand()`` callback of ``pjsua_hooks.strong_rand`` (stop 41) is only
ever entered on the phone's own thread, on a real pjsua2 phone (tried and held).

Why it matters: the callback is Python, so a pjsip thread entering it must take the
GIL; a pjsip thread that holds a pjsip lock while it waits for the GIL, and the main
thread inside a pjsua2 call (holding the GIL) that waits for that lock, would wedge the
phone.  The probe: ``strong_rand.secrets`` is replaced by a recorder of the calling
thread (``_strong_rand`` looks it up at each call), the phone is started with
``require_e2m``, alice calls bob inside it, 3 s of media run over the null device, and
the call is ended.  Observed: tens of thousands of calls during start (libInit and
the self-test: 48,751 in the ad hoc run), about 14 a second during media and 40 at
hang-up, all on the main thread (``threadCnt = 0``, ``mainThreadOnly``; the media
thread draws no ``rand()``).  Both tests pass; they guard the property.
"""

from __future__ import annotations

import collections
import secrets as _secrets
import threading

import pytest

pytestmark = pytest.mark.pjsua2
pj = pytest.importorskip("pjsua2")

from pjsua_hooks import strong_rand  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402


class _Recorder:
    def __init__(self) -> None:
        self.threads: collections.Counter[str] = collections.Counter()

    def randbits(self, n: int) -> int:
        here = threading.current_thread()
        self.threads["main" if here is threading.main_thread() else here.name] += 1
        return _secrets.randbits(n)


def test_control_rand_callback_runs_on_the_phones_thread_only(make_endpoint, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    recorder = _Recorder()
    monkeypatch.setattr(strong_rand, "secrets", recorder)
    ep = make_endpoint(hook=RawSipHook(), require_e2m=True)
    ta, tb = ep.add_transport("udp"), ep.add_transport("udp")
    alice, bob = ep.add_account("alice", ta), ep.add_account("bob", tb)
    ev = ep.events
    started = recorder.threads["main"]
    call = alice.make_call(tb.uri("bob"))
    ev.wait("incoming_call", source=bob.uri)
    assert ev.wait_until(lambda: call.media_active and bob.calls[0].media_active, 5)
    ep.run_for(3.0)
    mark = ev.mark()
    call.end()
    ev.wait("call_state", source=alice.uri, since=mark,
            where=lambda e: e["state"] == pj.PJSIP_INV_STATE_DISCONNECTED)
    assert started > 0 and recorder.threads["main"] > started   # the callback is in use
    assert set(recorder.threads) == {"main"}, dict(recorder.threads)


def test_control_the_started_phone_passed_the_random_gate_check(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    ep = make_endpoint(hook=RawSipHook(), require_e2m=True)
    done = strong_rand.installed()
    assert done is not None and done.slots
    checks = {name: ok for name, ok, _ in ep.gate_result.checks}
    assert checks.get("random") is True, ep.gate_result.checks
