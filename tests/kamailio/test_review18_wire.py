"""An eighteenth attacker's review (December 2026) of a4bf6cf (keys go only with the message
that kept them), on a real Kamailio: the failure route's other half, the dispatcher front's
failover (``kemi.py`` ``ksr_failure_route`` -> ``failover``).

The key drops of a4bf6cf held (tests/unit/test_review18.py).  The failure route they run in
also fails a cluster over, and that marks a node down (``ds_mark_dst``) for anything the
front reads as "the node failed": a 503, or a branch timeout.  Both come from far past the
node: a callee's 503 is relayed unchanged by the node (tm), and a non-INVITE request to a
callee that never answers times out at the front (its fr_timer, 5 s, started before the
node's, and the node sends no 100 for a non-INVITE) before the node's own 408 arrives.  So
one request to a phone that answers 503, or that is silent, takes every node out of the
front, which then answers every caller ``503 No Node Available`` until a probe brings a
node back (``probe_interval``, 10 s by default).

``test_hole_*`` was a strict xfail (the attack succeeded on 633897a); it passes since the
front waits longer than a node's fr_timer and marks a node down only when it replied
nothing at all (``kemi.py`` ``route_dispatch``, ``failover``).  Its docstring names the
attacker (docs/threat-model.md), the attack, what it got and the fix.
``test_control_*`` is the same flow without the attack.
"""

from __future__ import annotations

import re
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import SipMessage, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
NODE_DOWN = r"URI: {uri}\s+FLAGS: I"
# Sent over about a second: whether the front's 5 s timer fires before a node's 408 arrives
# depends on where each falls in the two processes' timer ticks (1/16 s), so each MESSAGE
# wins a node's turn with a chance that is fixed per run; with 15 per node the test sees no
# node down in well under one run in a hundred.
MESSAGES = 30


def _front_and_nodes(proxy_factory, phone_port: int, bob_port: int):
    """Two e2m nodes (each with mallory's phone and bob's registered: in a cluster DMQ replicates
    the registration, here it is made on both), and a front for them whose probes come
    only every 600 s, so that what the failure route decides is what the test sees."""
    a = proxy_factory("node-a", e2m=True, view=SDP_VIEW)
    b = proxy_factory("node-b", e2m=True, view=SDP_VIEW)
    for node in (a, b):
        register_contact(node, "mallory", phone_port)
        register_contact(node, "bob", bob_port)
    front = proxy_factory("front", e2m=False, archive=False,
                          extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                                "probe_interval": 600}})
    return front, (a, b)


def _nodes_down(front, nodes) -> list[str]:
    listed = front.rpc("dispatcher.list")
    return [node.uri for node in nodes
            if re.search(NODE_DOWN.format(uri=re.escape(node.uri)), listed)]


def _someone_elses_message(front) -> SipMessage | None:
    carol = SipUa(front.port, user="carol", timeout=8)
    try:
        return carol.message("bob", b"hello bob")
    finally:
        carol.close()


def _final_answer(ua: SipUa, deadline: float) -> bool:
    """Whether ``ua`` got a final response before ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        message = ua.receive(left)
        if message is None:
            return False
        if not message.is_request and (message.status or 0) >= 200:
            return True
    return False


def _phone(answer_invite: int | None, answer_message: int | None) -> RawUas:
    def respond(request: SipMessage):
        if request.method == "INVITE":
            return None if answer_invite is None else make_response(request, answer_invite, "X")
        if request.method == "MESSAGE":
            return None if answer_message is None else make_response(request, answer_message, "X")
        return make_response(request, 200, "OK")
    return RawUas(respond)


def _mallorys_call_through_the_front(proxy_factory, status: int) -> tuple[int, int]:
    """mallory calls her own phone, which answers ``status``, through the front.  Returns
    the final status she got and how many INVITEs her phone saw; asserts that no node
    was taken out and that carol's MESSAGE to bob is then served."""
    phone, bobs = _phone(status, 200), _phone(200, 200)
    try:
        front, nodes = _front_and_nodes(proxy_factory, phone.port, bobs.port)
        ua = SipUa(front.port, user="mallory", timeout=8)
        try:
            final = ua.transact(ua.build("INVITE", "sip:mallory@example.com"))
        finally:
            ua.close()
        assert final is not None
        assert _nodes_down(front, nodes) == []
        answer = _someone_elses_message(front)
        assert answer is not None and answer.status == 200
        return final.status, [m.method for m in phone.received].count("INVITE")
    finally:
        phone.close()
        bobs.close()


def test_control_a_busy_callee_takes_no_node_out(proxy_factory):
    """mallory's phone answers 486: the front relays the failure and both nodes stay in."""
    assert _mallorys_call_through_the_front(proxy_factory, 486)[0] == 486


def test_control_a_callees_503_is_relayed_as_500_and_takes_no_node_out(proxy_factory):
    """Tried and held: mallory's phone answers 503.  The node's tm relays it as 500 (RFC
    3261 §16.7), so the front's ``failover`` (``t_check_status("503")``) never sees it:
    both nodes stay in (no failover: her phone saw one INVITE), the next caller is
    served."""
    assert _mallorys_call_through_the_front(proxy_factory, 503) == (500, 1)


def test_hole_a_message_to_a_silent_phone_takes_every_node_out_of_the_front(proxy_factory):
    """Off-path sender (a stranger's MESSAGE to one of our users is never challenged),
    given a user whose registered contact does not answer: a phone gone from its NAT
    binding, or an insider's contact pointed at nothing.  A MESSAGE (no 100 Trying
    for a non-INVITE) waits at the node for the silent phone; the front's fr_timer and
    the node's are both 5 s, the front's started first, and about one time in two it
    fires before the node's own 408 arrives (on a first try: node A marked down, then
    B 5 s later, the 408 to the sender).  ``failover`` sees ``t_branch_timeout`` and
    marks the node down (``ds_mark_dst``) though the node is well and relayed the
    request.  30 MESSAGEs in a second, and 11 s later the nodes are out: every caller of
    the domain gets ``503 No Node Available`` until a probe brings one back
    (``probe_interval``, 10 s by default; 600 here, so the test sees what the failure
    route decided).  A stranger keeps the domain down with about one MESSAGE a second.

    Fix: mark a node down only when the node itself did not reply (the Kamailio
    example's ``t_branch_timeout() and !t_branch_replied()``) with nodes sending 100
    Trying for every request they relay (``t_reply(100)`` before ``t_relay``), or a
    front fr_timer longer than the nodes' (their 408 then arrives first); leave
    liveness to the probes otherwise."""
    phone, bobs = _phone(180, None), _phone(200, 200)
    strangers: list[SipUa] = []
    try:
        front, nodes = _front_and_nodes(proxy_factory, phone.port, bobs.port)
        for n in range(MESSAGES):
            stranger = SipUa(front.port, user=f"stranger{n}", domain="elsewhere.example")
            strangers.append(stranger)
            message = stranger.build("MESSAGE", "sip:mallory@example.com",
                                     to="sip:mallory@example.com", body=b"are you there",
                                     content_type="text/plain")
            stranger.send(message.replace("Via", stranger.via()))
            time.sleep(0.035)
        # every sender's final answer (a node's 408 after its 5 s fr_timer, relayed; on
        # the code before, each node's turn and then the front's own 408): by then the
        # front's failure route has run for every MESSAGE
        deadline = time.monotonic() + 11.0     # two fr_timers and a margin
        unanswered = [s for s in strangers if not _final_answer(s, deadline)]
        assert not unanswered, f"{len(unanswered)} MESSAGEs unanswered after 11 s"
        down = _nodes_down(front, nodes)
        answer = _someone_elses_message(front)
        assert down == [], (f"nodes marked down by {MESSAGES} MESSAGEs to a silent phone: {down}; "
                            f"then carol's MESSAGE to bob: {answer.status if answer else None} "
                            f"{answer.reason if answer else ''}")
        assert answer is not None and answer.status == 200, \
            f"carol's MESSAGE to bob: {answer.status if answer else None} {answer.reason if answer else ''}"
    finally:
        for stranger in strangers:
            stranger.close()
        phone.close()
        bobs.close()
