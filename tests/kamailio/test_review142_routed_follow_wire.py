"""Review 142 (attacker's review of 3ccf964): the certificate service's follow (RFC 6072)
when it is routed (a Record-Route set, review 136 K2's ``in_dialog_hop``) over TCP, TLS and
IPv6, on real Kamailio 5.6.

Set-up (all tests): a real home proxy (``start_proxy``: E2M, ``[auth]``, ``[certs]
notify_interval = 2``) listening on 127.0.0.1 and [::1] over UDP, TCP and TLS, and a real
visited proxy (``e2m = false``, the product's own routing: ``KSR.rr.record_route`` with
its ``e2m-rr`` token) whose ``next_hop`` is the home over TCP on 127.0.0.1 (``[tcp]``) or
over TLS on [::1] (``[tls-ipv6]``).  bob publishes his certificate; carol
(``CertClient`` at 127.0.142.x, UDP to the visited proxy) follows it; the visited proxy
double-record-routes (UDP in, TCP/TLS out), so the home keeps the route set
``<sip:127.0.0.1:V;transport=tcp;r2=on;lr;e2m-rr=...>, <sip:127.0.0.1:V;r2=on;lr;...>``
(or ``<sip:[::1]:VT;transport=tls;...>`` first) and its first entry as ``next_hop``;
carol answers the first NOTIFY, so the follow is confirmed (``pending`` 0).

Hole K1: an initial SUBSCRIBE whose tm To tag collides with a follow's renews that follow
------------------------------------------------------------------------------------------

- Attacker: an **off-path sender** who knows the follow's dialog ids (Call-ID, From
  tag, the service's To tag: the attacker of review 134 K3 and 136 K2) and sends one UDP
  datagram with the first hop's source address, from any port.  Nothing else: tm's To
  tag for a SUBSCRIBE without one is a per-instance MD5 (the same in every answer) and
  two CRC-16s, one over the top Via's host, port and branch, one over its port, host and
  the Call-ID (Kamailio 5.6 ``calc_crc_suffix``).  Both are forged offline in well under a
  second by choosing the Via host and branch (``colliding_via`` below; checked against
  this Kamailio by ``test_control_the_collision_is_worked_out_right``).
- Messages: ``SUBSCRIBE sip:bob@example.com`` with carol's Call-ID and From (tag), no To
  tag, ``Via: SIP/2.0/UDP h<4 chars>.invalid:5060;rport;branch=z9hG4bK<3-4 chars>``,
  ``Record-Route: <sip:HOP:ANYPORT;lr>`` (the hop's address, the forger's port),
  ``Expires: 600``, over UDP from HOP:ANYPORT to the home.
- Observed, both chains: ``200`` with carol's very To tag (the 200 went to the forger,
  and so did the NOTIFY, twice with tm's retransmission); the row goes from
  ``next_hop sip:127.0.0.1:56159;transport=tcp;r2=on;lr;e2m-rr=...`` (2 routes) to
  ``sip:127.0.0.1:43207;lr`` (1 route, the forger's) and stays confirmed (``pending`` 0,
  so probation never drops it); on IPv6 ``sip:[::1]:53187;transport=tls;...`` to
  ``sip:[::1]:52477;lr``.  bob then replaces his certificate: carol is told **0** times in
  5 s (the NOTIFY goes to the forger's port); her next honest refresh through the
  visited proxy is ``481`` (``in_dialog_hop``: a TCP/TLS request for a UDP hop), so her
  follow is gone until she subscribes anew, and for that whole refresh interval (600 s
  here; an e2m-phone follows for ``subscribe_expires``) a replaced or withdrawn
  certificate is not told.  The same datagram carrying the dialog's To tag (a refresh) is
  481 and changes nothing (control): the forgery goes round review 134 K3 / 136 K2's
  port and transport rules through the initial-SUBSCRIBE path.
- Second effect (same datagram, other headers): Request-URI ``sip:alice@example.com``
  (To still bob), and as its one Record-Route the visited proxy's own UDP entry copied
  from carol's route set (``<sip:127.0.0.1:V;r2=on;lr;e2m-rr=...>``, on [::1] for the
  IPv6 chain).  The row's ``aor`` becomes ``sip:alice@example.com`` and its next hop the
  visited proxy's UDP socket; carol, in her follow of **bob** (NOTIFY ``From:
  <sip:bob@example.com>;tag=<the dialog's>``), is delivered **alice's certificate** through
  the visited proxy (1 NOTIFY), and is told 0 times of bob's own replacement.  An
  e2m-phone refuses a certificate whose SAN URI is not the AoR
  (``pjsua_hooks/certservice_client.py``, read, not run on a phone here): bob's
  certificate is then "refused" there, a denial of the follow.
- Code at fault: ``kamailio_app/cert_route.py:226-233`` (``route_subscribe`` takes tm's
  To tag, ``$ltt(t)``, a function of the Via an initial SUBSCRIBE's sender chooses, as
  the new subscription's local tag) with ``kamailio_app/cert_table.py:357`` and ``:373``
  (``SubscriptionTable.add``: ``ON CONFLICT ... DO UPDATE`` renews the existing row's
  ``aor``, ``local_uri``, ``remote_uri``, ``remote_target``, ``route_set``, ``next_hop``,
  ``contact`` and ``expires`` from the new request, keeping its confirmed bits); the only
  check is ``:365``, the same source **address** (docs/protocol.md §11, the table's
  "initial SUBSCRIBE naming an existing subscription ... only from there too"), and
  ``notifier.open_dialog`` checks only that the Record-Route names that address.
- Suggested fix: an initial SUBSCRIBE never updates a row it collides with: answer it
  as ``SubscriptionTaken`` (403) or with a fresh random local tag (a To tag the service
  draws itself, not tm's CRC, e.g. ``t_reply`` with a tag from ``strong random``), and
  let only in-dialog requests refresh, through ``in_dialog_hop``; at the very least the
  renewal must pass ``in_dialog_hop`` for the peer and keep ``aor``, the URIs and the
  route set.  (The PostgreSQL table, ``cert_table_pg.py``, shares ``add``: same fix.)
- Tests: ``test_a_forged_initial_subscribe_does_not_move_a_routed_follow[tcp|tls-ipv6]``
  and ``test_a_forged_initial_subscribe_does_not_swap_what_a_follow_follows[tcp|tls-ipv6]``
  (strict xfails).

Controls (unmarked, pass, both chains)
--------------------------------------

- ``test_control_the_same_datagram_inside_the_dialog_is_481``: the forger's refresh
  (with the dialog's To tag) from the hop's address over UDP: 481, row unchanged, carol
  told of bob's change once.
- ``test_control_honest_refresh_and_unsubscribe_through_the_hop``: carol's refresh
  through the record-routing visited proxy (TCP on 127.0.0.1, TLS on [::1] to the home):
  200 and its NOTIFY; bob's change told once; her unsubscribe 200, the row gone, a final
  ``terminated`` NOTIFY.
- ``test_control_a_forged_initial_subscribe_without_the_collision_is_another_dialog``:
  the same forged SUBSCRIBE with an ordinary Via: another To tag, a new subscription of
  its own; carol's row untouched.
- ``test_control_the_collision_is_worked_out_right``: a fetch with a Via forged for a
  chosen tag (prefix from one answer, suffix ``c0ffee42``) draws exactly that tag.

Tried and held
--------------

- Honest breaks, run (scratch, four chains through a real record-routing Kamailio: TCP and
  TLS on 127.0.0.1, TCP and TLS on [::1]): follow, refresh (200, NOTIFY) and unsubscribe
  (200, final NOTIFY, row gone) all work; the home keeps the TCP/TLS entry of Kamailio's
  double Record-Route as the next hop and takes the refreshes over the visited proxy's
  (new or reused) connections from its address.  No 481/403 seen for honest followers.
- Off-path in-dialog requests over UDP against a TCP/TLS routed follow: 481, row kept
  (control above); the stream rule needs a connection from the hop's address.
- A forged initial SUBSCRIBE with a Via that does not collide: a separate, unconfirmed
  dialog (control above), dropped on probation if never answered.
- ``maddr`` in a Record-Route: this Kamailio is built without ``HONOR_MADDR``
  (``kamailio -V`` flags), so ``t_uac_send`` goes to the host (review 137's result; not
  re-run).

Not tried (time): the SUBSCRIBE flood over TCP/TLS against the per-source (20),
per-site (100, IPv6 /56) and total (10,000) bounds on the wire (read: a TCP stranger
answers its own NOTIFYs and so holds its 20 per address confirmed for up to
``max_subscribe_expires``; bounded by count and age); a Record-Route without ``lr``
(strict routing) through a real hop; two record-routing hops in a row; ``sips:`` hops on
the wire; the K1 forgery against a direct (unrouted) UDP or TCP follow (read: the same
``add`` path, so the same effect is expected, not run) and against the PostgreSQL table.

Fixed (stop 45): ``SubscriptionTable.add`` renews a subscription named by a first
SUBSCRIBE only when that SUBSCRIBE is a copy of the one that made it (the same source
address, AoR, URIs, Contact, route set and next hop: a retransmission whose 200 was
lost); anything else is ``SubscriptionTaken``, 403, and the row stays.  The four hole
tests failed on the code before (the follow moved, the AoR swapped) and pass with it.
The same rule on both back ends, and for a direct follow (another port is another next
hop): ``tests/unit/test_cert_table_copies.py``,
``tests/cluster/test_cert_probation_pg.py``.
"""

from __future__ import annotations

import itertools
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from e2m_lab.certclient import CertClient, Dialog
from e2m_lab.kamailio_harness import PROXY_HOST, ProxyHandle, start_proxy
from e2m_lab.ports import free_port
from e2m_plugins.sip import SipMessage, parse
from e2m_plugins.testpki import TestPKI, issue_user
from tests.kamailio.test_review133_cert_refresh_wire import BOB, USERS, der_of
from tests.kamailio.test_review93_wire import _CCITT

pytestmark = pytest.mark.kamailio

INTERVAL = 2                      # [certs] notify_interval of the home


# -- tm's To tag, worked out from what a subscriber's dialog shows ------------------------
# Kamailio 5.6 (src/core/tags.h calc_crc_suffix): tm's To tag is a per-instance MD5 (the
# same in every answer), "-", then two reflected CRC-16/CCITT values (init 0xFFFF, final
# NOT), each written least significant nibble first: one over the top Via's host, port
# and branch, one over its port, host and the Call-ID.  Checked against a live Kamailio
# (five fetches, all eight digits equal).

_T = _CCITT                   # review 93's table: reflected CRC-16/CCITT (0x8408)
_ROW_OF_TOP = {t >> 8: i for i, t in enumerate(_T)}
_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyz"


def _run(state: int, data: bytes) -> int:
    for b in data:
        state = (state >> 8) ^ _T[(state ^ b) & 0xFF]
    return state


def _run_back(state: int, data: bytes) -> int:
    for b in reversed(data):
        i = _ROW_OF_TOP[state >> 8]
        state = (((state ^ _T[i]) << 8) & 0xFF00) | ((i ^ b) & 0xFF)
    return state


def _register(half: str) -> int:
    return ~int(half[::-1], 16) & 0xFFFF


def _chars(state: int, want: int) -> str:
    for n in range(1, 6):
        for combo in itertools.product(_ALPHABET, repeat=n):
            if _run(state, combo) == want:
                return bytes(combo).decode()
    raise AssertionError("no collision found")


def colliding_via(to_tag: str, call_id: str, port: int = 5060) -> tuple[str, str]:
    """A top Via (host, branch) with which an initial SUBSCRIBE of ``call_id`` gets
    tm's To tag ``to_tag``: 2 x 16 bits, found offline in well under a second."""
    suffix = to_tag.rsplit("-", 1)[1]
    p = str(port).encode()
    tail = b".invalid" + call_id.encode()
    host = "h" + _chars(_run(0xFFFF, p + b"h"), _run_back(_register(suffix[4:8]), tail)) \
        + ".invalid"
    branch = "z9hG4bK" + _chars(_run(0xFFFF, host.encode() + p + b"z9hG4bK"),
                                _register(suffix[:4]))
    return host, branch


# -- the chain: carol -> visited (Kamailio, record-routes) -> home (certs) ---------------------

@dataclass
class Chain:
    name: str
    home: ProxyHandle
    visited: ProxyHandle
    hop_ip: str                   # the visited proxy's address as the home sees it


def _tls(pki: TestPKI) -> dict:
    server = pki.tls_server(PROXY_HOST)
    return {"cert": str(server.cert_path), "key": str(server.key_path),
            "ca": [str(pki.directory / "ca.crt")]}


def _listen(port: int, tls_port: int) -> list[str]:
    return [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"tls:127.0.0.1:{tls_port}",
            f"udp:[::1]:{port}", f"tcp:[::1]:{port}", f"tls:[::1]:{tls_port}"]


@pytest.fixture(scope="module", params=["tcp", "tls-ipv6"])
def chain(request, pki: TestPKI, tmp_path_factory) -> Iterator[Chain]:
    """The home (E2M, ``[certs]``, listening on 127.0.0.1 and [::1], UDP, TCP and TLS) and
    a visited proxy (``e2m = false``) whose ``next_hop`` is the home over TCP on 127.0.0.1,
    or over TLS on [::1].  Phones reach the visited proxy over UDP; it record-routes twice
    (UDP in, TCP/TLS out: Kamailio's double Record-Route)."""
    ports = []
    while len(ports) < 4:
        port = free_port(avoid=ports)
        ports.append(port)
    hp, ht, vp, vt = ports
    home = start_proxy(tmp_path_factory.mktemp("r142-home"), pki=pki, e2m=True, auth=True,
                       users=USERS, port=hp,
                       extra={"kamailio": {"listen": _listen(hp, ht)}, "tls": _tls(pki),
                              "certs": {"notify_interval": INTERVAL, "min_expires": 2}})
    if request.param == "tcp":
        next_hop, hop_ip = f"sip:127.0.0.1:{hp};transport=tcp", "127.0.0.1"
    else:
        next_hop, hop_ip = f"sip:[::1]:{ht};transport=tls", "::1"
    try:
        visited = start_proxy(tmp_path_factory.mktemp("r142-visited"), pki=pki, e2m=False,
                              port=vp, next_hop=next_hop,
                              extra={"kamailio": {"listen": _listen(vp, vt)}, "tls": _tls(pki)})
    except BaseException:
        home.stop()
        raise
    yield Chain(request.param, home, visited, hop_ip)
    visited.stop()
    home.stop()


_sources = iter(range(10, 250))


@pytest.fixture
def made(chain: Chain) -> Iterator[list]:
    things: list = []
    yield things
    for thing in things:
        thing.close()
    with sqlite3.connect(chain.home.directory / "certs.sqlite") as conn:
        conn.execute("DELETE FROM cert_subscriptions")
        conn.execute("DELETE FROM cert_publications")


def rows(chain: Chain, call_id: str) -> list[tuple]:
    with sqlite3.connect(chain.home.directory / "certs.sqlite") as conn:
        return conn.execute("SELECT next_hop, route_set, aor, pending FROM cert_subscriptions "
                            "WHERE call_id = ?", (call_id,)).fetchall()


def publish(chain: Chain, made: list, der: bytes) -> None:
    bob = CertClient(chain.home.port, "bob", password=USERS["bob"],
                     source=f"127.0.142.{next(_sources)}")
    made.append(bob)
    answer = bob.publish(der)
    assert answer is not None and answer.status == 200, answer


def follow(chain: Chain, made: list, pki: TestPKI) -> tuple[CertClient, Dialog]:
    """bob's certificate published; carol follows it through the visited proxy (UDP to
    it, TCP or TLS from it to the home) and answers its first NOTIFY: confirmed."""
    publish(chain, made, der_of(pki.user("bob", "ec")))
    carol = CertClient(chain.visited.port, "carol", source=f"127.0.142.{next(_sources)}")
    made.append(carol)
    answer, dialog = carol.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(answer.get_all("Record-Route")) == 2, answer.get_all("Record-Route")
    assert len(carol.wait_notifies(1, timeout=3.0)) == 1
    time.sleep(0.3)                                  # her 200 confirms it
    [(hop, _, _, pending)] = rows(chain, dialog.call_id)
    assert pending == 0 and (";transport=tcp;" in hop if chain.name == "tcp"
                             else hop.startswith("sip:[::1]:") and ";transport=tls;" in hop)
    return carol, dialog


class Stranger:
    """A UDP socket at the hop's address (any port): what an off-path sender forges."""

    def __init__(self, chain: Chain) -> None:
        family = socket.AF_INET6 if ":" in chain.hop_ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((chain.hop_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.host = f"[{chain.hop_ip}]" if ":" in chain.hop_ip else chain.hop_ip
        self.home = (chain.hop_ip, chain.home.port)
        self.got: list[SipMessage] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, request: str) -> int | None:
        """Send; the final status it drew (what came back is in ``got``)."""
        self.sock.sendto(request.encode(), self.home)
        status = None
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                message = parse(self.sock.recvfrom(65535)[0])
            except (socket.timeout, TimeoutError):
                break
            self.got.append(message)
            if not message.is_request and (message.status or 0) >= 200:
                status = message.status
        return status

    def subscribe(self, dialog: Dialog, from_header: str, *, via: tuple[str, str],
                  to_tag: str | None, expires: int = 600) -> int | None:
        """A SUBSCRIBE in carol's dialog's ids (Call-ID, From tag; ``to_tag`` or none)
        whose Record-Route names this socket, the hop's address at another port."""
        host, branch = via
        request_uri = dialog.target if to_tag else BOB
        to = f"<{BOB}>" + (f";tag={to_tag}" if to_tag else "")
        return self.send("\r\n".join([
            f"SUBSCRIBE {request_uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:5060;rport;branch={branch}", "Max-Forwards: 70",
            f"From: {from_header}", f"To: {to}", f"Call-ID: {dialog.call_id}",
            "CSeq: 77 SUBSCRIBE", f"Record-Route: <sip:{self.host}:{self.port};lr>",
            "Event: certificate", f"Expires: {expires}", "Accept: application/pkix-cert",
            f"Contact: <sip:m@{self.host}:{self.port}>", "Content-Length: 0", "", ""]))


@pytest.fixture
def stranger(chain: Chain, made: list) -> Stranger:
    one = Stranger(chain)
    made.append(one)
    return one


def _after_change(chain: Chain, made: list, pki: TestPKI, carol: CertClient) -> int:
    """bob replaces his certificate; how many NOTIFYs carol gets for it."""
    before = len(carol.notifies)
    publish(chain, made, der_of(issue_user(pki.ca, BOB, "ec")))
    carol.quiet(INTERVAL + 3.0)
    return len(carol.notifies) - before


# -- hole K1 -------------------------------------------------------------------------------

def test_a_forged_initial_subscribe_does_not_move_a_routed_follow(chain, made, pki, stranger):
    carol, dialog = follow(chain, made, pki)
    before = rows(chain, dialog.call_id)
    via = colliding_via(dialog.to_tag, dialog.call_id)
    status = stranger.subscribe(dialog, carol.subscribes[0].get("From"), via=via, to_tag=None)
    after = rows(chain, dialog.call_id)
    tags = {m.to_tag for m in stranger.got if not m.is_request}
    notifies = [m for m in stranger.got if m.is_request and m.method == "NOTIFY"]
    told = _after_change(chain, made, pki, carol)
    answer, _ = carol.subscribe(BOB, 600, dialog=dialog)
    print(f"\n{chain.name}: forged initial SUBSCRIBE from {stranger.host}:{stranger.port}: "
          f"{status}, To tag {tags} (carol's {dialog.to_tag}); NOTIFYs to the forger: "
          f"{len(notifies)}; row {before} -> {after}; carol told of the change: {told}; "
          f"her refresh: {answer.status if answer else None}")
    assert after == before
    assert told == 1 and answer is not None and answer.status == 200


def test_a_forged_initial_subscribe_does_not_swap_what_a_follow_follows(
        chain, made, pki, stranger):
    """The same forgery naming another AoR in its Request-URI (alice's, To still bob's) and,
    as its one Record-Route, the visited proxy's own UDP entry from carol's route set
    (on [::1] for the IPv6 chain): the row now follows alice, and its NOTIFYs, still in
    carol's dialog with bob (From bob), reach her through the visited proxy."""
    carol, dialog = follow(chain, made, pki)
    alice = CertClient(chain.home.port, "alice", password=USERS["alice"],
                       source=f"127.0.142.{next(_sources)}")
    made.append(alice)
    alice_der = der_of(pki.user("alice", "ec"))
    answer = alice.publish(alice_der)
    assert answer is not None and answer.status == 200, answer
    before = rows(chain, dialog.call_id)
    udp_entry = dialog.routes[0].strip("<>")          # the visited proxy's UDP side
    if ":" in chain.hop_ip:
        udp_entry = udp_entry.replace("127.0.0.1", "[::1]")
    host, branch = colliding_via(dialog.to_tag, dialog.call_id)
    status = stranger.send("\r\n".join([
        "SUBSCRIBE sip:alice@example.com SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:5060;rport;branch={branch}", "Max-Forwards: 70",
        f"From: {carol.subscribes[0].get('From')}", f"To: <{BOB}>",
        f"Call-ID: {dialog.call_id}", "CSeq: 77 SUBSCRIBE", f"Record-Route: <{udp_entry}>",
        "Event: certificate", "Expires: 600", "Accept: application/pkix-cert",
        f"Contact: {carol.ua.contact}", "Content-Length: 0", "", ""]))
    after = rows(chain, dialog.call_id)
    got = carol.quiet(3.0)
    alices = [n for n in got if n.body == alice_der]
    told = _after_change(chain, made, pki, carol)
    print(f"\n{chain.name}: forged SUBSCRIBE for alice in carol's dialog: {status}; row "
          f"{before} -> {after}; NOTIFYs to carol with alice's certificate: {len(alices)} "
          f"(From {alices[0].get('From') if alices else '-'}); told of bob's change: {told}")
    assert after == before
    assert not alices and told == 1


# -- controls ------------------------------------------------------------------------------

def test_control_the_same_datagram_inside_the_dialog_is_481(chain, made, pki, stranger):
    """Review 136 K2's rule, live on this chain: the forger's request carrying the
    dialog's To tag (a refresh) from the hop's address over UDP is 481, the row stays,
    and carol still hears of bob's new certificate."""
    carol, dialog = follow(chain, made, pki)
    before = rows(chain, dialog.call_id)
    status = stranger.subscribe(dialog, carol.subscribes[0].get("From"),
                                via=("h.invalid", "z9hG4bKr142c"), to_tag=dialog.to_tag)
    assert status == 481 and rows(chain, dialog.call_id) == before
    assert _after_change(chain, made, pki, carol) == 1


def test_control_honest_refresh_and_unsubscribe_through_the_hop(chain, made, pki):
    """carol's refresh through the visited proxy (TCP, or TLS on IPv6, from it to the
    home) is 200 with its NOTIFY; bob's change reaches her; her unsubscribe ends it."""
    carol, dialog = follow(chain, made, pki)
    answer, _ = carol.subscribe(BOB, 600, dialog=dialog)
    assert answer is not None and answer.status == 200, answer
    assert len(carol.wait_notifies(2, timeout=3.0)) == 2
    assert _after_change(chain, made, pki, carol) == 1
    answer, _ = carol.subscribe(BOB, 0, dialog=dialog)
    assert answer is not None and answer.status == 200, answer
    assert rows(chain, dialog.call_id) == []
    last = carol.wait_notifies(4, timeout=3.0)[-1]
    assert (last.get("Subscription-State") or "").startswith("terminated")


def test_control_a_forged_initial_subscribe_without_the_collision_is_another_dialog(
        chain, made, pki, stranger):
    """The same forged SUBSCRIBE with an ordinary Via: tm gives it another To tag, so it
    is a new (unconfirmed) subscription of its own; carol's row is untouched."""
    carol, dialog = follow(chain, made, pki)
    before = rows(chain, dialog.call_id)
    status = stranger.subscribe(dialog, carol.subscribes[0].get("From"),
                                via=("h.invalid", "z9hG4bKr142plain"), to_tag=None)
    tags = {m.to_tag for m in stranger.got if not m.is_request}
    assert status == 200 and dialog.to_tag not in tags
    assert before[0] in rows(chain, dialog.call_id)


def test_control_the_collision_is_worked_out_right(chain, made, stranger):
    """The helper's To tag arithmetic, against this Kamailio: a fetch (Expires: 0, kept
    nowhere) sent with a Via forged for a chosen tag draws exactly that tag."""
    first = stranger.send("\r\n".join([
        f"SUBSCRIBE {BOB} SIP/2.0",
        "Via: SIP/2.0/UDP h.invalid:5060;rport;branch=z9hG4bKr142probe", "Max-Forwards: 70",
        "From: <sip:x@example.net>;tag=probe", f"To: <{BOB}>", "Call-ID: r142-probe-1",
        "CSeq: 1 SUBSCRIBE", "Event: certificate", "Expires: 0",
        f"Contact: <sip:m@{stranger.host}:{stranger.port}>", "Content-Length: 0", "", ""]))
    assert first == 200
    [tag] = {m.to_tag for m in stranger.got if not m.is_request}
    prefix = tag.rsplit("-", 1)[0]
    wanted = prefix + "-" + "c0ffee42"
    host, branch = colliding_via(wanted, "r142-probe-2")
    stranger.got.clear()
    second = stranger.send("\r\n".join([
        f"SUBSCRIBE {BOB} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:5060;rport;branch={branch}", "Max-Forwards: 70",
        "From: <sip:x@example.net>;tag=probe2", f"To: <{BOB}>", "Call-ID: r142-probe-2",
        "CSeq: 1 SUBSCRIBE", "Event: certificate", "Expires: 0",
        f"Contact: <sip:m@{stranger.host}:{stranger.port}>", "Content-Length: 0", "", ""]))
    assert second == 200
    assert {m.to_tag for m in stranger.got if not m.is_request} == {wanted}
