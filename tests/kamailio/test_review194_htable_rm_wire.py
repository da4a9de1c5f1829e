"""Review 194 (attacker's review of 63e6235: the KDMQ body shapes of ``dmq_bodies``).

Set-up: review 192's: a real Kamailio 5.6.3 ``lone_node`` (its one peer never runs);
the attacker sends UDP from that peer's DMQ address and port with ``peer_kdmq``.  Each
test gets a node of its own.  "Up" means the launcher alive and an honest node-list
KDMQ answered 200 within 5 s.

Hole K1: an htable regex removal carrying an integer passes; htable reads it as a pointer
-----------------------------------------------------------------------------------------
- Attacker: a [cluster] peer, or anyone who can send one UDP datagram from a peer's DMQ
  address:port.  No credentials.
- Messages: one ``KDMQ sip:htable@<node>`` body
  ``{"action":5,"htname":"e2mkeys","cname":"x","type":0,"intval":4096}`` (action 5 =
  HT_DMQ_RM_CELL_RE; 6 = RM_CELL_SW is the same), then the honest control.
- Effect observed: ``htable_body_ok`` passes it (``type`` 0 with ``intval`` and no
  ``strval`` is a well-formed integer value); ``ht_dmq_replay_action`` hands
  ``&val->s`` to ``ht_rm_cell_re`` whatever the type: ``int_str val`` is a union, so
  ``val.s.s`` is the integer 4096 as a pointer and ``val.s.len`` uninitialised stack.
  Observed on this run: answer ``500 Server Internal Error`` (``ht_rm_cell_re``
  returned -1, so the stack's ``len`` was <= 0 this time), node up, control 200.  No
  crash observed (1 datagram, 1 run); the body still reaches an uninitialised-pointer
  read that a different stack (another worker, another build) may turn into
  ``regcomp(0x1000)``: signal 11.  The secure answer is 400 before htable.
- Code at fault: ``kamailio_app/dmq_bodies.py`` ``htable_body_ok``/``_value_ok`` (the
  value's kind is not tied to the action); Kamailio 5.6.3
  ``src/modules/htable/ht_dmq.c:253`` (``int_str val`` uninitialised), ``:436-439``
  (``&val->s`` for RM_CELL_RE/SW), ``ht_api.c:1347-1350`` (``regcomp(sre->s)``).
- Suggested fix: actions 5 and 6 only with ``type`` having AVP_VAL_STR (2) and a
  non-empty ``strval`` (that is what ``ht_dmq_replicate_action`` writes for them); a
  regex that Python's ``re`` cannot compile is no proof, keep POSIX ERE failures to
  Kamailio (it logs and returns).
- Test: ``test_hole_an_integer_regex_removal_leaves_the_node_up``.

Honest break HB1: htable's own regex / prefix removal is refused
-----------------------------------------------------------------
- Attacker: none; a peer running ``sht_rm_name_re``/``sht_rm_value_re``/``sht_rm``
  on a replicated table (htable.c:400, 508, 518; api.c:120).
- Messages: what ``ht_dmq_replicate_action(HT_DMQ_RM_CELL_RE, &ht->name, NULL, ...)``
  writes: ``{"action":5,"htname":"e2mkeys","type":2,"strval":"^nomatch$","mode":0}``:
  no ``cname`` (cname is NULL for RM_CELL_RE/SW, ht_dmq.c:372-374).
- Effect observed: answer ``400 Bad Request`` (1 of 1).  ``htable_body_ok`` requires ``cname`` for every action but SYNC
  (dmq_bodies.py ``return "htname" in doc and "cname" in doc ...``): 400, the removal
  never reaches the other nodes, their tables keep cells the sender removed.
- Code at fault: ``kamailio_app/dmq_bodies.py`` ``htable_body_ok`` last line.
- Suggested fix: ``cname`` required for actions 2-4 only; for 5 and 6 absent (or
  allowed) with a string ``strval``.
- Test: ``test_honest_break_a_peers_regex_removal_is_taken``.

Controls
--------
- ``test_control_an_honest_set_cell_is_taken``: an honest SET_CELL (action 2, string
  value) from the peer's address is answered 200, the node stays up (passed).

Tried and held
--------------
- Read in the source, not run: dmq_usrloc ``multi`` with an empty member (refused:
  ``_contact_action_ok`` needs members); deep nesting (no member takes an object but
  ``cells``/``multi``, one level); NaN/Infinity and duplicate names refused.
Fixed (stop 50): ``htable_body_ok`` takes a removal by regex or prefix (actions 5, 6)
only with a string type and a non-empty ``strval``, and without a ``cname`` as htable
itself sends it; a cell's ``cname`` is required for actions 2 to 4 alone.  Both tests
failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import lone_node, peer_kdmq
from e2m_lab.kamailio_harness import ProxyHandle

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def node(pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    import secrets
    with lone_node(pki, tmp_path_factory.mktemp("review194-node"),
                   "r194" + secrets.token_hex(4)) as handle:
        yield handle


def _up(node: ProxyHandle) -> bool:
    honest = f"sip:127.0.0.1:{node.peer_port};status=active\r\n".encode()
    answers = peer_kdmq(node, "notification_peer", honest, wait=5.0)
    return node.alive() and any(b" 200 " in line for line in answers)


def _ht(node: ProxyHandle, doc: dict, wait: float = 2.0) -> list[bytes]:
    return peer_kdmq(node, "htable", json.dumps(doc, separators=(",", ":")).encode(),
                     wait=wait, content_type="application/json")


def test_control_an_honest_set_cell_is_taken(node):
    answers = _ht(node, {"action": 2, "htname": "e2mkeys", "cname": "r194", "type": 2,
                         "strval": "v", "mode": 0})
    assert answers and b" 200 " in answers[0], answers
    assert _up(node)


def test_hole_an_integer_regex_removal_leaves_the_node_up(node):
    answers = _ht(node, {"action": 5, "htname": "e2mkeys", "cname": "x", "type": 0,
                         "intval": 4096}, wait=1.0)
    time.sleep(1.0)
    assert _up(node) and answers and b" 400 " in answers[0], answers


def test_honest_break_a_peers_regex_removal_is_taken(node):
    answers = _ht(node, {"action": 5, "htname": "e2mkeys", "type": 2,
                         "strval": "^nomatch$", "mode": 0})
    assert answers and b" 200 " in answers[0], answers
