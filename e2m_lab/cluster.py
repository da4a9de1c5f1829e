"""Two home nodes of one domain on Kamailio DMQ and one PostgreSQL, and phones for
them, for the cluster tests (tests/cluster/test_dmq_cluster.py) and ``make
demo-cluster`` (e2m_lab/demo_cluster.py).

Nodes A and B share [identity] (a UA encrypts for the domain's proxy certificate),
the PostgreSQL archive and users, and replicate registrations (dmq_usrloc) and the
key cache, dialog key index and replay record (htable dmqreplicate).  Both advertise
the domain's floating address (``ADVERTISE``, where nothing listens here) in Via and
Record-Route, so a response or in-dialog request reaching either one is theirs.

The phones are the core's UA engines on plain UDP sockets (not pjsua2): ``Alice``
sends each request to the node (or front) a caller names, ``Bob`` is a UDP peer whose
answers his engine protects, reusing the offer's CEK, so a node reads an answer only
with the key kept from the offer.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from e2m_plugins.sip import SipMessage, make_request, make_response, parse

from .flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, known_proxy, ua_engine
from .kamailio_harness import ProxyHandle, RawUas, SipUa, parse_address_uri, start_proxy
from .ports import free_port

__all__ = ["VIEW", "ADVERTISE", "REPLICATION", "Cluster", "start_cluster", "wait_until",
           "captured_kdmq", "forged_kdmq",
           "stat", "counters", "dmq_port", "contacts", "htable_dump", "Bob", "register_bob",
           "Alice", "answers"]

VIEW = ("INVITE:application/sdp",)
ADVERTISE = "127.0.0.66:5066"     # the domain's (floating) address: nothing listens there
REPLICATION = 3.0          # seconds a change may take to reach the other node


# --------------------------------------------------------------------------- the cluster

@dataclass
class Cluster:
    a: ProxyHandle
    b: ProxyHandle

    @property
    def nodes(self) -> tuple[ProxyHandle, ProxyHandle]:
        return self.a, self.b


def _node_settings(db_url: str, own_dmq: int, peer_dmq: int, front: int | None) -> dict:
    carrier = {"front": f"127.0.0.1:{front}"} if front else {"advertise": ADVERTISE}
    # sync_quiet_ms 300: a peer's dump chunks come back to back over loopback, so 300 ms
    # without one ends its sync as surely as the default 1 s a real network needs, and
    # each cluster start (about a hundred in the suite) is ready 0.7 s sooner
    return {"db_url": db_url, "view": VIEW,
            "extra": {"cluster": {"dmq_address": f"sip:127.0.0.1:{own_dmq}",
                                  "peers": [f"sip:127.0.0.1:{peer_dmq}"],
                                  "sync_quiet_ms": 300, **carrier}}}


def start_cluster(proxy_factory: Callable[..., ProxyHandle], db_url: str,
                  kamailio: dict | None = None, front: int | None = None,
                  cluster: dict | None = None, both: dict | None = None,
                  ports: tuple[int, int] | None = None,
                  dmq_ports: tuple[int, int] | None = None, **settings_a: Any) -> Cluster:
    """Nodes A and B on ``db_url``, started together; ``kamailio`` and ``cluster``:
    extra [kamailio] and [cluster] keys for both; ``both``: more proxy settings for
    both (``archive=False``).  ``front``: the port of the dispatcher front (on
    127.0.0.1) both nodes sit behind ([cluster] front), else both advertise the
    floating ``ADVERTISE``.  ``ports``/``dmq_ports``: the nodes' SIP and DMQ ports
    (free ones by default).  ``settings_a``: more proxy settings for node A (``auth``
    and ``users``: the users go into the shared database once), ``auth`` for B too."""
    if dmq_ports is None:
        first = free_port()
        dmq_ports = (first, free_port(avoid={first}))
    dmq_a, dmq_b = dmq_ports
    settings = [_node_settings(db_url, dmq_a, dmq_b, front),
                _node_settings(db_url, dmq_b, dmq_a, front)]
    for n, one in enumerate(settings):
        if kamailio:
            one["extra"]["kamailio"] = dict(kamailio)
        one["extra"]["cluster"].update(cluster or {})
        one.update(both or {})
        if ports is not None:
            one["port"] = ports[n]
        if settings_a.get("auth"):
            one["auth"] = settings_a["auth"]
    # Both at once: a node started alone waits out its sync gate's
    # sync_unreachable_after (6 s) for a peer that is not there yet; started together,
    # each syncs with the other within a second or two.
    with ThreadPoolExecutor(max_workers=2) as pool:
        started_a = pool.submit(proxy_factory, "node-a", **{**settings_a, **settings[0]})
        started_b = pool.submit(proxy_factory, "node-b", **settings[1])
        a, b = started_a.result(), started_b.result()
    nodes = Cluster(a, b)
    # DMQ's own view (the e2m_dmq_peers_up counter follows it only every 5 s)
    wait_dmq_up(nodes.nodes)
    return nodes


@contextmanager
def lone_node(pki: Any, where: Path, name: str) -> Iterator[ProxyHandle]:
    """A [cluster] node (its own private PostgreSQL) whose one peer never runs: what a
    KDMQ from a peer's address does to a node, with no peer to answer it.  The handle
    gets ``dmq_port`` (the node's DMQ port) and ``peer_port`` (the peer's)."""
    from .postgres import PostgresServer
    server = PostgresServer().start()
    try:
        own = free_port()
        peer = free_port(avoid={own})
        node = start_proxy(where, pki=pki, e2m=True, db_url=server.create_database(name),
                           extra={"cluster": {"dmq_address": f"sip:127.0.0.1:{own}",
                                              "peers": [f"sip:127.0.0.1:{peer}"],
                                              "sync_wait": 1, "sync_unreachable_after": 1}})
        try:
            node.dmq_port = own
            node.peer_port = peer
            yield node
        finally:
            node.stop()
    finally:
        server.stop()


def peer_kdmq(node: ProxyHandle, user: str, body: bytes, wait: float = 3.0,
              content_length: int | None = None,
              content_type: str = "text/plain") -> list[bytes]:
    """One KDMQ to ``user``@ a ``lone_node``'s DMQ socket from its peer's DMQ address and
    port (what a peer, or a forged source on the DMQ network, sends); the status lines
    of the final answers within ``wait`` s (a KDMQ of the node's own is skipped)."""
    length = len(body) if content_length is None else content_length
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", node.peer_port))
    answers = []
    try:
        sock.sendto((f"KDMQ sip:{user}@127.0.0.1:{node.dmq_port} SIP/2.0\r\n"
                     f"Via: SIP/2.0/UDP 127.0.0.1:{node.peer_port};"
                     f"branch=z9hG4bK-peer{secrets.token_hex(6)}\r\n"
                     f"From: <sip:127.0.0.1:{node.peer_port}>;tag=p{secrets.token_hex(3)}\r\n"
                     f"To: <sip:{user}@127.0.0.1:{node.dmq_port}>\r\n"
                     f"Call-ID: peer-{secrets.token_hex(8)}\r\nCSeq: 1 KDMQ\r\n"
                     f"Max-Forwards: 1\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n").encode() + body,
                    ("127.0.0.1", node.dmq_port))
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                answer = sock.recv(65535)
            except (socket.timeout, ConnectionRefusedError):
                break
            if not answer.startswith(b"SIP/2.0 ") or answer.startswith(b"SIP/2.0 1"):
                continue
            answers.append(answer.split(b"\r\n", 1)[0])
            break
    finally:
        sock.close()
    return answers


def wait_dmq_up(nodes: tuple[ProxyHandle, ...], restart_after: float = 10.0) -> float:
    """Wait (``DMQ_UP_WAIT``) until every node's DMQ lists another as active.

    A node whose own start-up notification ended in a 408 (the peer, still starting
    under load, answered too late) keeps that peer "pending" until DMQ's next ping, 60 s
    later, even when the peer's notification reached it meanwhile (the 408 came after).
    So after ``restart_after`` seconds, each node no other node lists as active is
    started again: its new notification finds the others up.  On a timeout the
    assertion shows each node's ``dmq.list_nodes``."""
    def unseen() -> list[ProxyHandle]:
        return [n for n in nodes
                if not any(dmq_peer_lists(other, n) for other in nodes if other is not n)]

    started = time.monotonic()
    try:
        wait_until(lambda: not unseen(), restart_after, "DMQ peers up on every node")
    except AssertionError:
        for node in unseen():
            node.stop()
            assert node.start(), f"{node.name} did not start again"
        try:
            wait_until(lambda: not unseen(), DMQ_UP_WAIT, "DMQ peers up on every node")
        except AssertionError as missed:
            views = "\n".join(f"{n.name}: {n.rpc('dmq.list_nodes')}" for n in nodes)
            raise AssertionError(f"{missed} (after a restart)\n{views}") from None
    return time.monotonic() - started


def captured_kdmq(nodes: Cluster, pcap: Any) -> bytes:
    """A genuine htable replication as it reached B's DMQ socket: A writes
    ``probe-from-a`` into ``e2mseen`` and the KDMQ carrying it is captured (``pcap``:
    the capture file's path).  Raises ``LookupError`` when tcpdump cannot capture."""
    from .capture import Capture, tcpdump_command
    if tcpdump_command() is None:
        raise LookupError("tcpdump cannot capture here")
    a, b = nodes.nodes
    capture = Capture(pcap, bpf=f"udp and dst port {dmq_port(b)}")
    try:
        a.rpc("htable.setxs", "e2mseen", "probe-from-a", "1", "60")
        wait_until(lambda: htable_dump(b, "e2mseen").get("probe-from-a") == "1", REPLICATION,
                   "the peer's write on B")
        time.sleep(0.3)
    finally:
        capture.stop()
    genuine = [p for _, _, p in capture.datagrams()
               if p.startswith(b"KDMQ ") and b"probe-from-a" in p]
    if not genuine:
        raise AssertionError("no KDMQ captured")
    return genuine[0]


def forged_kdmq(genuine: bytes, name: bytes, via: str) -> bytes:
    """``captured_kdmq``'s message for another record name of the same length (its
    Content-Length holds), with its own Via and Call-ID."""
    assert len(name) == len(b"probe-from-a")
    out = genuine.replace(b"probe-from-a", name)
    out = re.sub(rb"(?im)^Via:[^\r\n]*", via.encode(), out, count=1)
    return re.sub(rb"(?im)^(Call-ID:\s*)\S+", rb"\1stranger-" + name, out)


# seconds two fresh nodes may take to see each other's DMQ (15 s was missed twice in a
# loaded CI run of the whole suite; a wait, not a measure)
DMQ_UP_WAIT = 30


def dmq_peer_active(node: ProxyHandle) -> bool:
    """Whether ``node``'s DMQ lists another node as active (``dmq.list_nodes``)."""
    text = node.rpc("dmq.list_nodes")
    return any("status: active" in entry and "local: 0" in entry
               for entry in text.split("}"))


def dmq_peer_lists(node: ProxyHandle, peer: ProxyHandle) -> bool:
    """Whether ``node``'s DMQ lists ``peer`` (by its DMQ port) as active."""
    port = f"port: {dmq_port(peer)}"
    return any("status: active" in entry and "local: 0" in entry and port in entry
               for entry in node.rpc("dmq.list_nodes").split("}"))


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def stat(node: ProxyHandle, name: str) -> int:
    text = node.rpc("stats.get_statistics", name)
    match = re.search(rf"{name} = (-?\d+)", text)
    assert match, text
    return int(match.group(1))


def dmq_port(node: ProxyHandle) -> int:
    from kamailio_app.config import load_app_config
    return load_app_config(node.config_path).cluster.dmq_address.port


def contacts(node: ProxyHandle, aor: str) -> list[str]:
    """The contacts usrloc holds for ``aor`` on ``node`` (ul.lookup)."""
    text = node.rpc("ul.lookup", "location", aor)
    return re.findall(r"Address:\s*(\S+)", text)


# --------------------------------------------------------------------------- bob

class Bob(RawUas):
    """bob's phone: answers an INVITE with a 200 carrying his SDP answer, protected
    by his engine, to the node that sent it.  ``answer_to``: the 200 to a new dialog
    goes to that node's port instead (the domain's floating address moved there) and
    the sender gets a 180 (its tm then waits instead of retransmitting).
    ``before_answer``: called once, before the next 200 to an INVITE goes out.  200 to
    anything else."""

    def __init__(self, pki: Any) -> None:
        self.engine = ua_engine(pki, "bob")
        self.answer_to: int | None = None
        self.before_answer: Callable[[], None] | None = None
        super().__init__(self._respond)

    def _respond(self, request: SipMessage) -> SipMessage | None:
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        opened = self.engine.open(request).message
        # a fresh tag per dialog, as a real phone makes (RFC 3261 §19.3): the engine
        # tells bob's dialogs apart by it
        reply = answer(opened, SDP_ANSWER, to_tag=secrets.token_hex(4)).replace(
            "Contact", f"<sip:bob@127.0.0.1:{self.port}>")
        protected = self.engine.protect(reply).message
        if self.before_answer is not None:
            hook, self.before_answer = self.before_answer, None
            hook()
        if self.answer_to is None or request.to_tag is not None:
            return protected
        ringing = make_response(request, 180, "Ringing")
        if request.to_tag is None:
            ringing = ringing.replace("To", protected.get("To") or "")
        target, self.answer_to = self.answer_to, None
        self.sock.sendto(protected.serialize(), ("127.0.0.1", target))
        return ringing


def register_bob(node: ProxyHandle, bob: Bob) -> None:
    ua = SipUa(node.port, user="bob")
    try:
        request = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        reply = ua.request(request.replace("Contact", f"<sip:bob@127.0.0.1:{bob.port}>"))
        assert reply is not None and reply.status == 200
    finally:
        ua.close()


# --------------------------------------------------------------------------- alice

class Alice:
    """alice's phone: her UA engine on one UDP socket, sending each request to the
    node a test names (the response may come back from any node)."""

    def __init__(self, pki: Any) -> None:
        self.pki = pki
        self.engine = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, VIEW),))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = f"cl-{secrets.token_hex(6)}@127.0.0.1"
        self.from_tag = secrets.token_hex(4)
        self.cseq = 0
        self.to_tag: str | None = None
        self.routes: list[str] = []
        self.target = ""
        self.sent_bodies: list[bytes] = []
        self.last_invite: SipMessage | None = None     # the protected INVITE, as sent

    def close(self) -> None:
        self.sock.close()

    def _via(self) -> str:
        return (f"SIP/2.0/UDP 127.0.0.1:{self.port};rport;"
                f"branch=z9hG4bK-{secrets.token_hex(6)}")

    def transact(self, node: ProxyHandle, request: SipMessage, timeout: float = 8.0, *,
                 keep_via: bool = False) -> SipMessage | None:
        """``request`` to ``node`` and its final answer.  Its Via is made here unless
        ``keep_via``: a request the engine protected keeps the Via it was protected with
        (the engine knows its answers by their branch, as a phone's are)."""
        if not keep_via:
            request = request.replace("Via", self._via())
        self.sock.sendto(request.serialize(), ("127.0.0.1", node.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65535)
            except (socket.timeout, TimeoutError):
                return None
            reply = parse(data)
            if reply.is_request or reply.cseq != request.cseq \
                    or reply.get("Call-ID") != request.get("Call-ID"):
                continue
            if (reply.status or 0) >= 200:
                return reply
        return None

    def _in_dialog(self, method: str, body: bytes = b"", cseq: int | None = None) -> SipMessage:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        headers = [("Route", r) for r in self.routes]
        headers.append(("Contact", f"<sip:alice@127.0.0.1:{self.port}>"))
        return make_request(method, self.target, from_uri=self.pki.aor("alice"),
                            to_uri=self.pki.aor("bob"), call_id=self.call_id, cseq=cseq,
                            from_tag=self.from_tag, to_tag=self.to_tag, extra_headers=headers,
                            body=body, content_type="application/sdp" if body else None)

    def call(self, node: ProxyHandle) -> SipMessage | None:
        """INVITE with an encrypted offer (readable by the domain's proxy) to ``node``."""
        self.cseq += 1
        request = invite(self.pki, call_id=self.call_id, from_tag=self.from_tag,
                         cseq=self.cseq).replace("Contact", f"<sip:alice@127.0.0.1:{self.port}>")
        protected = self.engine.protect(request.replace("Via", self._via())).message
        assert SDP_OFFER not in protected.body
        self.sent_bodies.append(protected.body)
        self.last_invite = protected
        reply = self.transact(node, protected, keep_via=True)
        if reply is not None and reply.status == 200:
            self.to_tag = reply.to_tag
            self.routes = list(reversed(reply.get_all("Record-Route")))
            self.target = parse_address_uri(reply.get("Contact") or "")
        return reply

    def ack(self, node: ProxyHandle) -> None:
        ack = self._in_dialog("ACK", cseq=self.cseq).replace("Via", self._via())
        self.sock.sendto(ack.serialize(), ("127.0.0.1", node.port))

    def reinvite(self, node: ProxyHandle) -> SipMessage | None:
        request = self._in_dialog("INVITE", SDP_OFFER.replace(b"49170", b"49180"))
        protected = self.engine.protect(request.replace("Via", self._via())).message
        assert b"49180" not in protected.body
        reply = self.transact(node, protected, keep_via=True)
        if reply is not None and reply.status == 200:
            self.ack(node)
        return reply

    def bye(self, node: ProxyHandle) -> SipMessage | None:
        return self.transact(node, self._in_dialog("BYE"))

    def open(self, reply: SipMessage) -> bytes:
        return self.engine.open(reply).message.body


def htable_dump(node: ProxyHandle, table: str = "e2mkeys") -> dict[str, str]:
    """Name -> value of every item (key-cache values are sealed: no CEK is shown)."""
    text = node.rpc("htable.dump", table)
    return dict(re.findall(r"name:\s*(\S+)\s+value:\s*(\S+)", text))


def answers(node: ProxyHandle, call_id: str) -> list:
    return [r for r in node.archive_rows() if r.call_id == call_id and r.direction == "response"]


def counters(node: ProxyHandle) -> dict[str, int]:
    text = node.rpc("stats.get_statistics", "script:")
    return {name: int(value) for name, value in re.findall(r"(e2m_\w+) = (-?\d+)", text)}
