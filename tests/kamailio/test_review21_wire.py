"""A twenty-first attacker's review (December 2026) of 6ba91e7 (a dispatcher front fails
over on a node's 503 only when its reason phrase is the sync gate's ``Catching Up``), on a
real Kamailio.

What held: a callee's ``503 Catching Up`` that the node relays is turned into 500 by the
node's tm (RFC 3261 §16.7, ``remap_503_500``), so the front never sees it (control below);
the registrar's 503 has another reason phrase (review 20).

What did not: the node's tm is not the only thing that sends a response up.  A response
that matches none of the node's transactions is forwarded *statelessly* by Kamailio's core
along its Via headers (nothing in ``ksr_reply_route`` drops it; with ``[cluster]``
``route_stray_reply`` even reads it and says so), unchanged: no 503->500 remap.  The
callee of any request a node relays sees the whole Via stack, the front's branch
included.  Answering with the node's own (top) Via branch changed makes the node's tm
miss, the core strips the top Via (the node's address: "myself") and sends the response
to the front, whose tm matches its own branch and runs ``failover`` on a final
``503 Catching Up``: the node is marked down although it is well.

``test_hole_*`` was a strict xfail (the attack succeeds on 84373f5) and passes since a front
fails over only when a node replied nothing at all: no reply's content counts, and the
probes take a catching-up node out (``kemi.py`` ``failover``).  Its docstring names the
attacker (docs/threat-model.md), the attack, what it got and the fix.  ``test_control_*``
are the same flow without the attack.
"""

from __future__ import annotations

import re

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa
from e2m_plugins.sip import SipMessage, make_response
from kamailio_app.sync_gate import CATCHING_UP
from tests.kamailio.test_review18_wire import _front_and_nodes, _nodes_down, _phone, \
    _someone_elses_message

pytestmark = pytest.mark.kamailio

_BRANCH = re.compile(r"(;\s*branch=)([^;,\s]+)", re.IGNORECASE)


def _with_top_branch_changed(response: SipMessage) -> SipMessage:
    """``response`` with the branch of its top Via (the node's) changed: the node's tm
    finds no transaction for it, every other Via (the front's) untouched."""
    headers, done = [], False
    for name, value in response.headers:
        if not done and name.lower() in ("via", "v"):
            value, n = _BRANCH.subn(lambda m: m.group(1) + m.group(2) + "x", value, count=1)
            assert n == 1, value
            done = True
        headers.append((name, value))
    return SipMessage(response.start_line, tuple(headers), response.body)


def _catching_up_phone(*, forge_branch: bool) -> RawUas:
    """mallory's phone: every MESSAGE and INVITE answered ``503 Catching Up`` (the sync
    gate's reason phrase), with the node's Via branch changed when ``forge_branch``."""
    def respond(request: SipMessage):
        if request.method in ("MESSAGE", "INVITE"):
            answer = make_response(request, 503, CATCHING_UP, [("Retry-After", "2")])
            return _with_top_branch_changed(answer) if forge_branch else answer
        return make_response(request, 200, "OK")
    return RawUas(respond)


def _request_to_mallory_through_the_front(proxy_factory, forge_branch: bool,
                                          method: str = "MESSAGE"):
    """One ``method`` request (MESSAGE or INVITE) to mallory through the front, from a
    stranger (never challenged), her phone answering as ``_catching_up_phone``.  Returns
    (the sender's final status, the nodes marked down, carol's MESSAGE to bob then as
    (status, reason), how many nodes the phone got the request from)."""
    phone, bobs = _catching_up_phone(forge_branch=forge_branch), _phone(200, 200)
    try:
        front, nodes = _front_and_nodes(proxy_factory, phone.port, bobs.port)
        stranger = SipUa(front.port, user="stranger", domain="elsewhere.example", timeout=10)
        try:
            body = ({"body": b"ping", "content_type": "text/plain"}
                    if method == "MESSAGE" else {})
            message = stranger.build(method, "sip:mallory@example.com",
                                     to="sip:mallory@example.com", **body)
            final = stranger.transact(message, timeout=10)
        finally:
            stranger.close()
        down = _nodes_down(front, nodes)
        served = _someone_elses_message(front)
        seen = len({m.via_branch() for m in phone.received if m.method == method})
        return (final.status if final else None, down,
                (served.status, served.reason) if served else None, seen)
    finally:
        phone.close()
        bobs.close()


def test_control_a_callees_catching_up_503_is_relayed_as_500_and_takes_no_node_out(proxy_factory):
    """Tried and held: mallory's phone answers ``503 Catching Up`` to the node's own
    transaction.  The node's tm relays it as 500 (RFC 3261 §16.7), so the front's
    ``failover`` never sees a 503: no node out, one node saw the MESSAGE, carol is
    served."""
    final, down, served, seen = _request_to_mallory_through_the_front(proxy_factory, False)
    assert final == 500
    assert down == []
    assert seen == 1
    assert served is not None and served[0] == 200


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_callees_503_catching_up_past_the_nodes_tm_takes_every_node_out(proxy_factory,
                                                                                method):
    """Insider UA (mallory's own contact; any callee a node relays to: a remote domain's UA
    one of our users calls; an off-path sender where the proxy relays for anyone or the
    registrar is open, as here: a stranger's MESSAGE to mallory, her contact his socket).
    Her phone answers every request a node relays ``503 Catching Up`` with the node's Via
    branch changed (``;branch=<node's>x``), every other Via as received: the front's branch
    is in the request she got.  The node's tm matches no transaction, so Kamailio's core
    forwards the response statelessly along the next Via, unchanged, to the front (no
    503->500 remap: that is tm's); the front's tm matches its own branch, and ``failover``
    sees its node's ``503 Catching Up``: ``ds_mark_dst`` on node A, the request goes to
    node B, which relays it to the same phone and is marked down the same way.  Then
    every caller of the domain gets ``503 No Node Available`` until a probe brings a node
    back (``probe_interval``: 10 s by default; 600 s here so that the test sees what the
    failure route decided).  One MESSAGE (or INVITE) per probe interval keeps the cluster
    down, review 20's effect by another road; it needs no silent phone and no timing.

    Fix: "node down" must be something only the node can say.  A response the node
    forwards statelessly (no transaction of its own) is written end to end by the callee,
    status, reason phrase and headers alike, so either the node never forwards a stray
    final 503 as it is (``ksr_reply_route``: ``KSR.x.drop()`` when ``t_check_trans`` misses
    and ``$rs`` is 503; the request's own node then times out into its 408, which marks
    nothing), or the gate's 503 carries what a callee cannot forge (a header with a MAC,
    under a key the front and nodes share, over the front's branch, added by
    ``KsrSyncGate.refuses`` and checked in ``failover``), or liveness is left to the
    probes (OPTIONS is gated too) and the front fails over only when a node replied
    nothing at all."""
    final, down, served, seen = _request_to_mallory_through_the_front(proxy_factory, True, method)
    assert down == [], (
        f"one {method} to a phone answering a forged '503 {CATCHING_UP}' "
        f"(sender got {final}; the phone saw it from {seen} nodes) marked nodes down: "
        f"{down}; then carol's MESSAGE to bob: {served}")
    assert served is not None and served[0] == 200
