"""A twentieth attacker's review (December 2026) of 383420b (the dispatcher front marks a
node down only when the node replied nothing at all, or answered 503 itself), on a real
Kamailio.

Review 18's hole is closed: a callee's 503 reaches the front as the node's 500 (tm, RFC 3261
§16.7), and a callee's silence as the node's own 408.  What is left of "the node answered
503 itself" is every 503 a node *chooses* to send for one request, and one of them is the
registrar's: a REGISTER that would give an AoR more than ``[limits] max_contacts`` contacts
is answered ``503 Too many registered contacts`` by the node's registrar (Kamailio
``registrar``, R_TOO_MANY; kamailio_app/README.md says so of ``max_contacts``).  Each node
answers it the same way (the AoR's contacts are replicated, and one REGISTER can carry all
the contacts itself), so the front marks every node down, one after the other, for one
REGISTER.

``test_hole_*`` was a strict xfail (the attack succeeds on 455fd33) and passes since a front
fails over only when a node replied nothing at all (``kemi.py`` ``failover``; review 21
showed that a callee can forge a node's ``Catching Up``); its docstring names the attacker (docs/threat-model.md), the attack, what it
got and the fix.  ``test_control_*`` is
the same flow without the attack.
"""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import SipUa
from tests.kamailio.test_review18_wire import (_front_and_nodes, _nodes_down, _phone,
                                               _someone_elses_message)

pytestmark = pytest.mark.kamailio

MAX_CONTACTS = 10      # kamailio_app/config.py: [limits] max_contacts default


def _register_through_the_front(front, user: str, contacts: int):
    """``user`` (a stranger's REGISTER: the test nodes run without [auth], the open
    registrar) registers ``contacts`` contacts in one REGISTER sent to the front.
    Returns the final answer."""
    ua = SipUa(front.port, user=user, timeout=20)
    try:
        register = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        value = ", ".join(f"<sip:{user}-{n}@127.0.0.1:{40000 + n}>" for n in range(contacts))
        return ua.request(register.replace("Contact", value), timeout=20)
    finally:
        ua.close()


def test_control_a_register_through_the_front_takes_no_node_out(proxy_factory):
    """A REGISTER of a new AoR with ``max_contacts`` contacts (at the limit): 200, both
    nodes stay in, carol's MESSAGE to bob is served."""
    phone, bobs = _phone(200, 200), _phone(200, 200)
    try:
        front, nodes = _front_and_nodes(proxy_factory, phone.port, bobs.port)
        answer = _register_through_the_front(front, "dave", MAX_CONTACTS)
        assert answer is not None and answer.status == 200, answer
        assert _nodes_down(front, nodes) == []
        served = _someone_elses_message(front)
        assert served is not None and served.status == 200
    finally:
        phone.close()
        bobs.close()


def test_hole_one_register_with_too_many_contacts_takes_every_node_out(proxy_factory):
    """Off-path sender where the registrar is open (no [auth]); with [auth], any user of the
    domain (an insider UA) for her own AoR.  She sends the front one REGISTER with
    ``max_contacts + 1`` Contact entries (or fills her AoR to ``max_contacts`` and adds
    one; here a new AoR, dave's, no registration needed before).  The node's registrar
    answers it ``503`` itself (R_TOO_MANY), and ``failover``
    reads "the node answered 503 itself" as "the node is down": ``ds_mark_dst`` on node A,
    the REGISTER goes to node B, which answers 503 too (same limit, and the AoR's contacts
    are replicated), and B is marked down as well; she gets ``500 Service Unavailable``
    (the front's tm turns the last 503 into 500).  The front then answers every caller of
    the domain ``503 No Node Available`` until a probe brings a node back
    (``probe_interval``: 10 s by default, 5 s in examples/cluster-front.toml; 600 s here so
    the test sees what the failure route decided).  One REGISTER per probe interval keeps
    the whole cluster down; unlike review 18's MESSAGEs it needs no silent phone and no
    timing luck.

    Fix: a 503 is a node's word that it is down only where nothing else in the node sends
    503 for one request: tell it apart (the sync gate's ``503 Catching Up`` with its
    ``Retry-After``, or a header only the node's own unavailability sets, e.g. checked with
    ``t_check_status`` and the reply's reason or a node-set header) or have the node answer
    R_TOO_MANY with another code (``registrar`` can't: answer over-limit REGISTERs in the
    script, 403, before ``save``, counting with ``registered``/``reg_fetch_contacts``); or
    leave liveness to the probes and fail over only on a timeout with no reply."""
    phone, bobs = _phone(200, 200), _phone(200, 200)
    try:
        front, nodes = _front_and_nodes(proxy_factory, phone.port, bobs.port)
        answer = _register_through_the_front(front, "dave", MAX_CONTACTS + 1)
        down = _nodes_down(front, nodes)
        served = _someone_elses_message(front)
        assert down == [], (
            f"one REGISTER with {MAX_CONTACTS + 1} contacts "
            f"(answered {answer.status if answer else None} {answer.reason if answer else ''}) "
            f"marked nodes down: {down}; then carol's MESSAGE to bob: "
            f"{served.status if served else None} {served.reason if served else ''}")
        assert served is not None and served.status == 200
    finally:
        phone.close()
        bobs.close()
