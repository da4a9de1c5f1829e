"""The home proxy restarts in the middle of a call between two e2m-phone processes.

Its shared memory, so the CEK it kept from the INVITE, is gone.  The next re-INVITE
under that key gets a 496; the phone learns from it, asks for the same hold again,
now encrypted for the proxy's own certificate, and the call goes on.  A module of
its own: the restart also drops the registrations the other e2e tests rely on.
"""

from __future__ import annotations

import sqlite3

import pytest

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

BOB = "sip:bob@example.com"


def test_a_home_proxy_restart_mid_call_is_healed_by_its_496(ua_config, phones, proxies):
    home, _ = proxies
    bob = phones.start("bob", ua_config("bob", peer="alice"))
    alice = phones.start("alice", ua_config("alice", peer="bob", via_visited=True))
    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"])
    bob.wait("call_state", lambda e: e["state"] == "CONFIRMED")    # the ACK is through
    call_id = media["call_id"]

    home.stop()
    assert home.start(), "the home proxy did not come back"

    mark = alice.mark()
    alice.send("hold")
    answer = alice.wait("e2m_answer", since=mark)
    assert (answer["code"], answer["action"]) == (496, "retry"), answer
    retried = alice.wait("call_update_retried", since=mark)
    assert retried["update"] == "hold" and retried["call_id"] == call_id
    alice.wait("call_media", lambda e: "local_hold" in e["audio"], since=mark)

    mark = alice.mark()
    alice.send("unhold")
    alice.wait("call_media", lambda e: "active" in e["audio"], since=mark)
    assert not [e for e in alice.events if e["kind"] in ("call_update_failed", "call_ended")]

    mark = alice.mark()
    alice.send("hangup")
    alice.wait("call_ended", since=mark)
    bob.wait("call_ended")

    # The restarted proxy read the retried hold and the unhold (its archive survived
    # the restart; the key cache did not).
    with sqlite3.connect(home.archive_path) as db:
        flows = [r[0] for r in db.execute(
            "SELECT flow FROM media WHERE call_id = ? AND method = 'INVITE' "
            "AND direction = 'request' ORDER BY id", (call_id,))]
    assert "sendonly" in flows and flows[-1] == "sendrecv", flows
