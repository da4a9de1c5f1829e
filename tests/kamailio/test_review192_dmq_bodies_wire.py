"""Review 192 (attacker's review of ca598b9: review 190's node-list check, and its
neighbours on the DMQ socket).

Set-up: a real Kamailio 5.6.3 through ``start_proxy``, a ``[cluster]`` node with its own
PostgreSQL whose one configured peer never runs (review 190's ``lone_node``); the
attacker sends UDP from that peer's DMQ address and port (the peer down, or a forged
source on the DMQ network: UDP proves no source).  Each hole test gets a node of its
own, since a hole leaves it wedged or dead.  "DMQ answers" is judged by an honest
node-list KDMQ (``sip:<peer>;status=active\\r\\n``) sent afterwards: 200 within 5 s.

Hole K1: a node list without its last newline passes the check; dmq eats its last octet
----------------------------------------------------------------------------------------
- Attacker: a [cluster] peer, or anyone who can send one UDP datagram from a peer's DMQ
  address:port.  No credentials.
- Messages: one ``KDMQ sip:notification_peer@<node's DMQ socket>`` whose body is the
  honest line ``sip:127.0.0.1:<peer port>;status=active`` with no newline after it
  (Content-Length exact), then the honest control.
- Effect observed: ``node_list_ok`` passes it (a last line may lack its newline), but
  Kamailio 5.6.3's ``extract_node_list`` takes ``match - tmp - 1`` octets of a line also
  when no newline ends it (``match = end``): it reads ``status=activ``, which
  ``set_dmq_node_params`` refuses (logged: ``ERROR: dmq [dmqnode.c:130]:
  set_dmq_node_params(): invalid status parameter: activ``), and returns with the node
  list's lock held, review 190's K2: the honest KDMQ after it got no answer in 5 s
  (0 answers; the control on a fresh node: 200 in well under a second).
- Code at fault: ``kamailio_app/dmq_nodes.py:26-28`` (an unterminated last line is
  taken); Kamailio 5.6.3 ``src/modules/dmq/notification_peer.c:400`` (the length) and
  ``:405-406`` (return with the lock held).
- Suggested fix: require every line, the last one too, to end with ``\\r\\n`` (or
  ``\\n``) as dmq's ``build_notification_body`` writes them; refuse a body whose last
  octet is not ``\\n``.
- Test: ``test_hole_a_node_list_without_its_last_newline_leaves_dmq_answering``.

Hole K2: dmq reads Content-Length octets, the check reads ``$rb`` (the whole datagram)
------------------------------------------------------------------------------------
- Attacker: as K1.
- Messages: one node-list KDMQ whose datagram carries the honest line with its CRLF but
  whose ``Content-Length`` stops before the CRLF, then the honest control.
- Effect observed: ``$rb`` is ``get_body`` to the end of the buffer (pv_core.c
  ``pv_get_msg_body``: ``msg->buf + msg->len - s.s``), so the check sees the whole honest
  line and passes; dmq reads ``Content-Length`` octets (``body.len = content_length``),
  the line less its last octet (no newline in what it reads), ``status=activ``: lock
  held, the honest control got no answer in 5 s (0 answers).  A Content-Length of 8
  (``sip:127``) held by luck: ``resolvehost("127")`` takes it as 0.0.0.127, a pending
  node is added, no wedge (tried, 200 after it).  A Content-Length longer than the
  datagram makes dmq read past the message into the receive buffer (not tried).
- Code at fault: ``kamailio_app/kemi.py:1191-1192`` (``$rb``); Kamailio 5.6.3
  ``notification_peer.c:383-384``.
- Suggested fix: refuse a KDMQ whose Content-Length is missing or differs from
  ``$bs``/``len($rb)`` (before any DMQ peer sees it: htable and dmq_usrloc read it too).
- Test: ``test_hole_a_short_content_length_leaves_dmq_answering``.

Hole K3: a KDMQ to htable whose JSON object is empty kills the node
--------------------------------------------------------------------
- Attacker: as K1.
- Messages: one ``KDMQ sip:htable@<node's DMQ socket>`` with body ``{}``, then the
  honest control.
- Effect observed: ``route_dmq`` hands any htable KDMQ from a peer's address to dmq;
  htable's ``ht_dmq_handle_msg`` reads ``jdoc.root->child->string`` with no child: a
  NULL dereference in the DMQ worker, Kamailio's main process then stops every process:
  the node is gone: ``ALERT: <core> [main.c:774]: handle_sigs(): child process <pid>
  exited by a signal 11``, the launcher down (``alive()`` False), 0 answers to the
  control in 5 s, 1 datagram.  ``{"htname":1}`` (``strlen`` of a NULL ``valuestring``) is the same kind.
- Code at fault: ``kamailio_app/kemi.py:1190-1200`` (only ``notification_peer`` bodies
  are checked); Kamailio 5.6.3 ``src/modules/htable/ht_dmq.c:294`` (and 303-313).
- Suggested fix: check htable KDMQ bodies too before ``handle_message``: a JSON object
  with at least one member, every member one htable writes (``action``, ``htname``,
  ``cname``, ``type``, ``mode`` and ``strval`` or ``intval``; or ``cells`` an array of
  such objects), string members strings, numbers numbers; else 400.
- Test: ``test_hole_an_empty_htable_kdmq_leaves_the_node_up``.

Hole K4: the same for dmq_usrloc
--------------------------------
- Attacker: as K1.
- Messages: one ``KDMQ sip:usrloc@<node's DMQ socket>`` with body ``{}``, then the
  honest control.
- Effect observed: dmq_usrloc's ``usrloc_dmq_handle_msg`` does
  ``strcmp(jdoc.root->child->string, "multi")`` with no child: the node dies as in K3
  (the same ALERT, signal 11; launcher down; 0 answers in 5 s).
- Code at fault: ``kamailio_app/kemi.py:1190-1200``; Kamailio 5.6.3
  ``src/modules/dmq_usrloc/usrloc_sync.c:512`` (and 342-378, ``strlen`` of a non-string).
- Suggested fix: as K3, for dmq_usrloc's shape (``action`` and the contact's members,
  or ``multi`` an object of such).
- Test: ``test_hole_an_empty_usrloc_kdmq_leaves_the_node_up``.

Controls
--------
- ``test_control_an_honest_node_list_is_answered``: the honest node list from the
  peer's address gets its 200 (so K1/K2's silence is not the harness's).
- ``test_control_a_node_list_with_a_nul_is_refused``: an honest line, then a NUL and a
  second line dmq would refuse: app_python3 hands ``$rb`` over with the NUL (the string
  has its length), the check refuses it (400) and DMQ goes on answering.

Tried and held
--------------
- ``\\r`` as the last octet with no ``\\n`` (dmq drops the ``\\r``, reads ``active``): fine.
- Statuses: only the four dmq knows pass the regex; ``;transport=udp`` and a port with
  leading zeros pass the check and make dmq add a second node for the same peer
  (``cmp_dmq_node`` compares strings), not a wedge (read in the source, not run).
- Honest flows (read, not run): every peer listed by IP (config.py:970 demands an IP
  ``dmq_address``), ``peers_dns`` resolved to IPs by dmq's ``multi_notify``
  (``get_dmq_host_list`` writes IP URIs), IPv6 hosts keep their brackets in
  ``build_node_str`` and match ``\\[...\\]``.  A ``peers`` entry given as a DNS name
  (config accepts it) puts ``sip:<name>:<port>`` in the other node's pings, which the
  check answers 400; dmq ignores a 400 to a ping (``notification_resp_callback_f``
  handles 200 and 408 only), so the node stays active: a warning per ping, not a break.

Fixed (stop 50): ``route_dmq`` hands a peer's KDMQ to its module only when its body is
exactly Content-Length long (K2) and of the shape that module's own peers write
(``kamailio_app/dmq_bodies``): a node list whose every line ends in a newline (K1); an
htable action or sync, a dmq_usrloc contact action or ``multi``, every member a known
one of its type and the ones the module reads without looking there (K3, K4); to
any other DMQ target, nothing.  Otherwise 400 and a warning that quotes nothing.  The
hole tests failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import peer_kdmq
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_plugins.testpki import TestPKI

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def pg() -> Iterator:
    from e2m_lab.postgres import PostgresServer
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def node(pg, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """A [cluster] node whose one peer never runs (a node of its own per test)."""
    from e2m_lab.ports import free_port
    own = free_port()
    peer = free_port(avoid={own})
    handle = start_proxy(tmp_path_factory.mktemp("review192-node"), pki=pki, e2m=True,
                         db_url=pg.create_database("r192" + secrets.token_hex(4)),
                         extra={"cluster": {"dmq_address": f"sip:127.0.0.1:{own}",
                                            "peers": [f"sip:127.0.0.1:{peer}"],
                                            "sync_wait": 1, "sync_unreachable_after": 1}})
    try:
        handle.dmq_port = own
        handle.peer_port = peer
        yield handle
    finally:
        handle.stop()


def _honest(node: ProxyHandle) -> bytes:
    return f"sip:127.0.0.1:{node.peer_port};status=active\r\n".encode()


def _answers_honestly(node: ProxyHandle) -> list[bytes]:
    return peer_kdmq(node, "notification_peer", _honest(node), wait=5.0)


def test_control_an_honest_node_list_is_answered(node):
    answers = _answers_honestly(node)
    assert any(b" 200 " in line for line in answers), answers


def test_control_a_node_list_with_a_nul_is_refused(node):
    body = _honest(node) + b"\x00\nsip:127.0.0.1:1;status=bogus\r\n"
    answers = peer_kdmq(node, "notification_peer", body, wait=2.0)
    assert answers and b" 400 " in answers[0], answers
    answers = _answers_honestly(node)
    assert any(b" 200 " in line for line in answers), answers


def test_hole_a_node_list_without_its_last_newline_leaves_dmq_answering(node):
    body = _honest(node).rstrip(b"\r\n")
    peer_kdmq(node, "notification_peer", body, wait=1.0)
    answers = _answers_honestly(node)
    assert any(b" 200 " in line for line in answers), answers


def test_hole_a_short_content_length_leaves_dmq_answering(node):
    body = _honest(node)             # its CRLF in the datagram, not in Content-Length
    peer_kdmq(node, "notification_peer", body, wait=1.0, content_length=len(body) - 2)
    answers = _answers_honestly(node)
    assert any(b" 200 " in line for line in answers), answers


def test_hole_an_empty_htable_kdmq_leaves_the_node_up(node):
    peer_kdmq(node, "htable", b"{}", wait=1.0, content_type="application/json")
    time.sleep(1.0)
    answers = _answers_honestly(node)
    assert node.alive() and any(b" 200 " in line for line in answers), answers


def test_hole_an_empty_usrloc_kdmq_leaves_the_node_up(node):
    peer_kdmq(node, "usrloc", b"{}", wait=1.0, content_type="application/json")
    time.sleep(1.0)
    answers = _answers_honestly(node)
    assert node.alive() and any(b" 200 " in line for line in answers), answers
