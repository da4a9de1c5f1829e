"""A ninetieth attacker's review (December 2026) of ea4cf0c: the proxy's Record-Route
MAC and reply filter (stop 34's newest code: ``RouteTokens.param``/
``keeps_callers_side``/``via_key``, ``kemi.record_route``/``moved_route_entries``/
``_via_below_ours``/``_top_via``) attacked on a real Kamailio 5.6 (review 88's set-up:
alice over TLS, bob's UDP UAS behind a hop that rewrites his 200).  The core half:
``tests/unit/test_review90.py``.

Hole 1 (``test_hole_a_case_variant_of_alices_via_mints_the_mac_the_hop_needs``):
attackers: an **untrusted hop** on bob's leg with any account of ours (an **insider
UA**, eve; on an open proxy, with no account: an **off-path sender** that the hop
tells what to send).  Messages: alice's INVITE passes the hop, which reads her Call-ID,
From tag and top Via (below ours: ``SIP/2.0/TLS 127.0.90.x:p;rport;branch=z9hG4bK-ua..``).
eve sends the proxy her own INVITE to herself with that Call-ID, ``From:
<sip:eve@example.com>;tag=<alice's tag>``, ``Record-Route: <sip:HOP;lr>`` and as top Via
alice's Via with the *case* of its branch changed (``z9hG4bK-UA..``; after a 407, once
more with another case).  tm matches a request's branch octet by octet (``memcmp``): a
new transaction, not a retransmission of alice's; ``via_key`` folds the Via to one case:
the MAC the proxy writes on eve's INVITE (``param(Call-ID, tag, [<sip:HOP;lr>],
eve's Via)``) is the MAC of alice's Via.  In bob's 200 the hop puts that value in our
entries and appends ``<sip:HOP;lr>``.  Effect: relayed; alice's route set starts at
the hop over UDP (review 82/88's hole, back: her in-dialog requests and digest answers
go to it first).  At fault: ``kamailio_app/dialog_route.py`` ``via_key`` line 161
(``.lower()`` over the whole Via, branch included), against stop 34's premise that a
MAC for alice's Via can only be obtained with a request tm absorbs.  Fix: keep the
branch (and the sent-by) octet for octet in the key (lower-case only the protocol
name and the parameter names), so the key is at least as strict as tm's match; better,
bind what tm's match binds exactly (the branch, sent-by and transport as written).

Hole 2 (``test_hole_a_maddr_added_to_our_entry_passes_the_filter``): attacker: an
**untrusted hop** on bob's leg.  Message: bob's 200 with ``;maddr=127.0.0.2`` (or
``;maddr=hop.example.net``) added to both of our Record-Route entries, nothing else
changed.  Effect: relayed (routing and e2m): ``KSR.is_myself`` reads host, port and
transport only, and the MAC covers what lies below our entry, not the entry itself.
alice's route set starts at ``sip:127.0.0.1:TLS;transport=tls;...;maddr=127.0.0.2``;
pjsip sends to a route's maddr (``tests/pjsua/test_review90_phone.py``: her ACK reached
127.0.0.2), so her ACK, BYE and re-INVITEs go to the hop's address and never reach us.
At fault: ``kamailio_app/kemi.py`` line 944 (``is_myself`` the only test of our own
entry).  Fix: an entry carrying our token carries no ``maddr`` (no parameter but those
we write), or the entry's URI as written goes under the MAC.

Hole 3 (``test_hole_a_late_200_to_a_reinvite_is_dropped``): **nobody** (an honest flow
the filter breaks).  Messages: alice calls bob (UDP), both ACKed; alice's re-INVITE
along the route set gets bob's 200 (no Record-Route, RFC 3261 12.1.1); bob sends that
200 once more 6.5 s later (a UAS retransmits its 2xx until the ACK comes; here tm's
transaction has ended: a stray, as on a cluster every answer reaching the node that
did not forward the re-INVITE).  Effect: dropped, ``a 200 whose Record-Route names (no
Record-Route), not ours: dropped``; the initial INVITE's late 200 (with our entry) is
relayed (control).  Where the first 200s were lost, alice never gets it: the re-INVITE
fails and bob, with no ACK, ends the call.  At fault: ``kemi.py`` lines 919-926 with
``record_routed_here`` line 971 (a stray is taken for an answer to a request we
record-routed).  Fix: see the unit module (a mark of ours in our own Via on the
initial requests we record-route).

Hole 4 (``test_hole_a_183_with_every_record_route_taken_out_leads_the_early_dialog_past_us``):
attacker: an **untrusted hop** on bob's leg.  Message: bob's 183 with a To tag (an
early dialog) with every Record-Route taken out, its Contact the hop's; then bob's
untouched 200.  Effect: the 183 reaches alice (routing and e2m) with no Record-Route:
her early-dialog requests (PRACK, UPDATE) go to the hop's Contact over UDP, never
through our TLS socket, until the 200's route set replaces it.  At fault: ``kemi.py``
line 924 (only a 2xx is held to carry our entry).  Fix: a 1xx with a To tag too.

Controls: eve's case-variant INVITE is a new transaction to tm, record-routed with
alice's token (the oracle is live); with alice's exact Via it is absorbed (review 88's
premise, which holds for the Via octet for octet); a value minted with a Via that is
not a case variant of alice's is dropped (the hop needs the case fold, nothing else);
the untouched 200 leads alice to our TLS socket; our entry moved to the hop's host is
dropped (the filter is live in this set-up); the initial INVITE's 200 sent again after
the transaction reaches alice (the stray path is live); the untouched 183 starts
alice's early route set at our TLS socket.

Tried and held: see ``tests/unit/test_review90.py``.

Fixed (stop 35): as ``tests/unit/test_review90.py``'s docstring says.
"""

from __future__ import annotations

import re
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, parse_challenge, register_contact
from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.openssl]

from tests.kamailio.test_review88_wire import (  # noqa: E402
    HOP, HOP_ENTRY, _Callee, _route_set, _starts_at_our_tls, _with_value)
from tests.kamailio.test_review81_wire import _alice_tls  # noqa: E402

USERS = {"alice": "alice-R90-Pass", "bob": "bob-R90-Pass", "eve": "eve-R90-Pass"}
_VALUE = re.compile(r"e2m-rr=([0-9a-fA-F]{32})")
_BRANCH = re.compile(r"(branch=z9hG4bK)([^;,\s]*)", re.IGNORECASE)


def _variants(via: str) -> list[str]:
    """alice's Via with the case of its branch (after the magic cookie) changed."""
    match = _BRANCH.search(via)
    assert match, via
    tail = match.group(2)
    out = [tail.swapcase()] + [tail[:i] + c.swapcase() + tail[i + 1:]
                               for i, c in enumerate(tail) if c.isalpha()]
    return [via[:match.start(2)] + changed + via[match.end(2):]
            for changed in dict.fromkeys(out) if changed != tail]


class _Oracle:
    """eve and her UAS: ``mint(call_id, tag, vias)`` sends the proxy an INVITE to eve
    with alice's Call-ID and From tag, ``Record-Route: <sip:HOP;lr>``, and each of
    ``vias`` in turn as its top Via (a 407 answered with the next one); returns the
    ``e2m-rr`` value of the entries the proxy wrote on it (None: it never reached eve)."""

    def __init__(self, home, source: str, users: dict[str, str]) -> None:
        self.uas = RawUas()
        self.uas.responder = lambda request: make_response(request, 486, "Busy Here")
        register_contact(home, "eve", self.uas.port, password=users["eve"], source=source)
        self.ua = SipUa(home.port, user="eve", password=users["eve"], source=source)
        self.minted: list[str] = []
        self.answers: list[int] = []

    def mint(self, call_id: str, tag: str, vias: list[str]) -> str | None:
        invite = self.ua.build("INVITE", "sip:eve@example.com", to="sip:eve@example.com",
                               call_id=call_id, from_tag=tag,
                               headers=[("Record-Route", HOP_ENTRY)])
        for via in vias:
            request = invite.replace("Via", via)
            creds = self.ua.credentials("INVITE", "sip:eve@example.com")
            if creds is not None:
                request = request.replace(*creds)
            self.ua.send(request)
            answer = self._final(call_id, request.cseq[0])
            got = [m for m in self.uas.received
                   if m.method == "INVITE" and m.get("Call-ID") == call_id]
            if got:
                values = {v.lower() for r in got[-1].get_all("Record-Route")
                          for v in _VALUE.findall(r)}
                assert len(values) == 1, values
                self.minted.append(values.pop())
                return self.minted[-1]
            if answer is None or answer.status != 407:
                return None
            self.ua.challenge = ("Proxy-Authenticate",
                                 parse_challenge(answer.get("Proxy-Authenticate") or ""))
            self.ua.nc = 0
            self.ua.cseq = request.cseq[0] + 1
            invite = invite.replace("CSeq", f"{self.ua.cseq} INVITE")
        return None

    def _final(self, call_id: str, cseq: int) -> SipMessage | None:
        while True:
            message = self.ua.receive(3)
            if message is None:
                return None
            if message.is_request or message.get("Call-ID") != call_id \
                    or message.cseq[0] != cseq:
                continue
            if (message.status or 0) >= 200:
                self.answers.append(message.status)
                return message
            if self.uas.wait_for(1, method="INVITE", timeout=0.5):
                return message

    def close(self) -> None:
        self.ua.close()
        self.uas.close()


def _proxy(proxy_factory, name, e2m=False, auth=True):
    if not auth:
        return proxy_factory(name, e2m=e2m, tls=True, auth=False)
    return proxy_factory(name, e2m=e2m, tls=True, auth=True, users=USERS)


def _call(home, pki, bob_source, alice_source, rewrite):
    bob = _Callee(rewrite)
    register_contact(home, "bob", bob.uas.port, password=USERS["bob"], source=bob_source)
    ua = _alice_tls(home, pki, alice_source)
    ua.password = USERS["alice"]
    try:
        assert ua.register().status == 200
        mark = home.log_mark()
        ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                        timeout=6)
        return ok, home.log_since(mark), bob
    finally:
        ua.close()
        bob.close()


def _alices_via(invite: SipMessage) -> str:
    """The Via below ours in the INVITE bob got: alice's as it reached us, with the
    ``received`` and ``rport`` we added taken out again (as she wrote it)."""
    vias = [v for value in invite.get_all("Via") for v in value.split(",")]
    via = vias[1].strip()
    via = re.sub(r";received=[^;,]*", "", via)
    return re.sub(r";rport=\d+", ";rport", via)


def test_control_the_case_variant_invite_is_a_new_transaction_with_alices_token(
        proxy_factory, pki):
    home = _proxy(proxy_factory, "r90-via-ok")
    eve = _Oracle(home, "127.0.90.1", USERS)
    seen: dict[str, object] = {}

    def rewrite(invite, routes):
        values = {v.lower() for r in routes for v in _VALUE.findall(r)}
        seen["alice"] = values.pop()
        seen["via"] = _alices_via(invite)
        seen["variants"] = _variants(seen["via"])
        seen["eve"] = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "",
                               seen["variants"]) or ""
        return routes
    try:
        ok, _, _ = _call(home, pki, "127.0.90.2", "127.0.90.3", rewrite)
    finally:
        eve.close()
    assert ok is not None and ok.status == 200, ok
    assert len(seen["variants"]) >= 2, seen
    # since stop 35 (review 94's fix, reviews 94/95: a branch is matched in any case, as
    # a UA's stack does) eve's INVITE under alice's branch in other letters is refused
    # 482 at the door: it never gets alice's token, nor a MAC of its own
    assert not seen["eve"] and 482 in eve.answers, (seen["eve"], eve.answers)


def test_control_alices_exact_via_is_absorbed_by_tm(proxy_factory, pki):
    """Stop 34's premise, which holds for the Via as written: eve's INVITE with alice's
    very Via is taken by tm as alice's transaction and never reaches eve's UAS."""
    home = _proxy(proxy_factory, "r90-via-exact")
    eve = _Oracle(home, "127.0.90.10", USERS)
    seen: dict[str, object] = {}

    def rewrite(invite, routes):
        via = _alices_via(invite)
        seen["eve"] = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "", [via])
        return routes
    try:
        ok, _, _ = _call(home, pki, "127.0.90.11", "127.0.90.12", rewrite)
    finally:
        eve.close()
    assert ok is not None and ok.status == 200, ok
    assert seen["eve"] is None and not eve.uas.received, eve.uas.received


def test_a_doubled_branch_whose_last_is_alices_is_refused_482(proxy_factory, pki):
    """Stop 36: eve's INVITE under alice's Via with a fresh ``branch`` put before hers.
    Kamailio's tm and pjsip both key a transaction by a Via's *last* branch parameter,
    so the request is filed under alice's branch; the door read the first one and let
    it through (tm filed it under its own CSeq, and its answers went to alice's stack
    as her INVITE's: review 94's in-transaction form).  The door reads the branch tm
    reads (``$via0(branch)``)."""
    home = _proxy(proxy_factory, "r90-via-doubled")
    eve = _Oracle(home, "127.0.90.13", USERS)
    seen: dict[str, object] = {}

    def rewrite(invite, routes):
        via = _alices_via(invite)
        # one per attempt (the first is challenged 407): each a branch of its own first
        doubled = [_BRANCH.sub(lambda m: f"branch=z9hG4bK-eve36{n};" + m.group(0), via,
                               count=1) for n in "ab"]
        assert via not in doubled
        seen["eve"] = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "", doubled)
        return routes
    try:
        ok, _, _ = _call(home, pki, "127.0.90.14", "127.0.90.15", rewrite)
    finally:
        eve.close()
    assert ok is not None and ok.status == 200, ok
    assert seen["eve"] is None and not eve.uas.received, eve.uas.received
    assert 482 in eve.answers, eve.answers


def test_control_the_minted_value_with_a_via_that_is_no_case_variant_is_dropped(
        proxy_factory, pki):
    """eve's INVITE with another branch (not a case variant of alice's) gets a MAC that
    does not pass: the hop needs the case fold, nothing else."""
    home = _proxy(proxy_factory, "r90-via-other")
    eve = _Oracle(home, "127.0.90.4", USERS)

    def rewrite(invite, routes):
        via = _alices_via(invite)
        others = [_BRANCH.sub(lambda m: m.group(1) + "-eve90a", via),
                  _BRANCH.sub(lambda m: m.group(1) + "-eve90b", via)]
        value = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "", others)
        assert value is not None
        return _with_value(routes, value) + [HOP_ENTRY]
    try:
        ok, log, _ = _call(home, pki, "127.0.90.5", "127.0.90.6", rewrite)
    finally:
        eve.close()
    assert eve.minted
    assert ok is None or ok.status != 200, _route_set(ok)
    # since review 98 eve's token (her INVITE's From and To are hers) is not alice's
    # dialog's either: the 200 holds no entry of ours, as well as another MAC
    assert "not ours: dropped" in log


@pytest.mark.parametrize(("e2m", "auth"), [(False, True), (True, True), (False, False)],
                         ids=["routing", "e2m", "open"])
def test_hole_a_case_variant_of_alices_via_mints_the_mac_the_hop_needs(
        proxy_factory, pki, e2m, auth):
    home = _proxy(proxy_factory, "r90-via-hole", e2m, auth)
    eve = _Oracle(home, "127.0.90.7", USERS)

    def rewrite(invite, routes):
        value = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "",
                         _variants(_alices_via(invite)))
        if value is None:     # refused at the door (stop 35): the hop adds its entry anyway
            return routes + [HOP_ENTRY]
        return _with_value(routes, value) + [HOP_ENTRY]
    try:
        ok, _, bob = _call(home, pki, "127.0.90.8", "127.0.90.9", rewrite)
    finally:
        eve.close()
    assert not bob.uas.errors, bob.uas.errors
    # (since stop 35 eve's INVITE is refused 482 at the door: nothing minted, and the
    # 200 carries alice's own value, the hop's entry below it)
    assert not eve.minted and 482 in eve.answers, (eve.minted, eve.answers)
    # secure: a 200 that reaches alice starts her route set at our TLS socket
    assert ok is None or _starts_at_our_tls(home, ok), _route_set(ok)


# -- hole 2: ``maddr`` added to our own entry ---------------------------------------------

_MADDR = re.compile(r";maddr=([^;>]*)", re.IGNORECASE)


def _first_hop_is_our_tls(home, ok: SipMessage | None) -> bool:
    """The secure outcome: no 200 reached alice, or the first entry of her route set
    leads to our TLS socket: it names it, and no ``maddr`` sends her elsewhere (a SIP
    stack sends to a URI's maddr: ``tests/pjsua/test_review90_phone.py``)."""
    routes = _route_set(ok)
    if routes is None:
        return True
    if not routes or f":{home.tls_port};transport=tls" not in routes[0]:
        return False
    return all(m in ("127.0.0.1", "") for m in _MADDR.findall(routes[0]))


def _maddr_on_ours(address: str):
    def rewrite(invite, routes):
        return [r.replace(">", f";maddr={address}>") if _VALUE.search(r) else r
                for r in routes]
    return rewrite


def _host_moved(invite, routes):          # review 81's rewrite: our host to the hop's
    return [r.replace("127.0.0.1", "127.0.0.2") if "transport=tls" in r else r
            for r in routes]


def test_control_the_untouched_200_leads_alice_to_our_tls_socket(proxy_factory, pki):
    home = _proxy(proxy_factory, "r90-maddr-ok")
    ok, _, _ = _call(home, pki, "127.0.90.13", "127.0.90.14", lambda i, r: r)
    assert ok is not None and ok.status == 200, ok
    assert _first_hop_is_our_tls(home, ok), _route_set(ok)


def test_control_our_entry_moved_to_the_hops_host_is_dropped(proxy_factory, pki):
    home = _proxy(proxy_factory, "r90-maddr-moved")
    ok, log, _ = _call(home, pki, "127.0.90.15", "127.0.90.16", _host_moved)
    assert ok is None or ok.status != 200, _route_set(ok)
    assert "not ours: dropped" in log


@pytest.mark.parametrize("e2m", [False, True], ids=["routing", "e2m"])
@pytest.mark.parametrize("address", ["127.0.0.2", "hop.example.net"], ids=["ip", "name"])
def test_hole_a_maddr_added_to_our_entry_passes_the_filter(proxy_factory, pki, e2m, address):
    home = _proxy(proxy_factory, "r90-maddr-hole", e2m)
    ok, _, bob = _call(home, pki, "127.0.90.17", "127.0.90.18", _maddr_on_ours(address))
    assert not bob.uas.errors, bob.uas.errors
    # secure: a 200 that reaches alice leads her first to our TLS socket, nowhere else
    assert _first_hop_is_our_tls(home, ok), _route_set(ok)


# -- hole 3: a re-INVITE's 2xx that is a stray is dropped ----------------------------------

class _Bob:
    """bob's UAS (RFC 3261 12.1.1: Record-Route copied into the initial INVITE's 200 only,
    by ``make_response``); keeps each 200 it sent so it can send it again, as a UAS
    retransmits a 2xx until the ACK comes (RFC 3261 13.3.1.4)."""

    def __init__(self) -> None:
        self.uas = RawUas()
        self.sent: dict[str, bytes] = {}       # "initial" / "reinvite" -> the 200's octets
        self.uas.responder = self.respond

    def respond(self, request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE":
            return answer
        answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{self.uas.port}>")
        if request.to_tag is None:
            answer = answer.replace("To", f"{request.get('To')};tag=bt90")
            self.sent["initial"] = answer.serialize()
        else:
            self.sent["reinvite"] = answer.serialize()
        return answer

    def again(self, which: str, proxy_port: int) -> None:
        self.uas.sock.sendto(self.sent[which], ("127.0.0.1", proxy_port))

    def close(self) -> None:
        self.uas.close()


def _late_200(home, which: str, bob_source: str, alice_source: str):
    """alice calls bob (UDP), ACKs, sends a re-INVITE (hold) and ACKs its 200; bob then
    sends the ``which`` 200 once more after tm's transaction is over (wait timer: 5 s),
    as a UAS does whose ACK was lost.  Returns (whether that late 200 reached alice,
    the log)."""
    bob = _Bob()
    register_contact(home, "bob", bob.uas.port, password=USERS["bob"], source=bob_source)
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source=alice_source)
    try:
        assert ua.register().status == 200
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
        ok = ua.request(invite, timeout=5)
        assert ok is not None and ok.status == 200, ok
        sent = ua.sent[-1]
        routes = list(reversed(ok.get_all("Record-Route")))
        assert routes, "no Record-Route in the initial 200"
        target = (ok.get("Contact") or "").strip("<>")
        ids = dict(to="sip:bob@example.com", call_id=sent.get("Call-ID"),
                   from_tag=sent.from_tag, to_tag=ok.to_tag, routes=routes)
        ack = ua.build("ACK", target, cseq=sent.cseq[0], **ids)
        ua.send(ack.replace("Via", ua.via()))
        reinvite = ua.build("INVITE", target, **ids)
        again = ua.request(reinvite, timeout=5)
        assert again is not None and again.status == 200, again      # relayed in its transaction
        assert "reinvite" in bob.sent
        last = ua.sent[-1]
        ack = ua.build("ACK", target, cseq=last.cseq[0], **ids)
        ua.send(ack.replace("Via", ua.via()))
        time.sleep(6.5)                     # tm's wait timer (5 s) is over: a stray now
        mark = home.log_mark()
        bob.again(which, home.port)
        call_id = sent.get("Call-ID")
        cseq = (sent if which == "initial" else last).cseq[0]
        deadline = time.monotonic() + 2.0
        got = False
        while time.monotonic() < deadline and not got:
            message = ua.receive(max(0.05, deadline - time.monotonic()))
            if message is None:
                break
            got = (not message.is_request and message.status == 200
                   and message.get("Call-ID") == call_id and message.cseq[0] == cseq)
        return got, home.log_since(mark)
    finally:
        ua.close()
        bob.close()


def test_control_a_late_200_to_the_initial_invite_still_reaches_alice(proxy_factory, pki):
    """The stray path is live: the initial INVITE's 200, sent again after the
    transaction, carries our entry and its MAC and is relayed to alice."""
    home = _proxy(proxy_factory, "r90-late-initial")
    got, log = _late_200(home, "initial", "127.0.90.19", "127.0.90.20")
    assert got, log


def test_hole_a_late_200_to_a_reinvite_is_dropped(proxy_factory, pki):
    home = _proxy(proxy_factory, "r90-late-reinvite")
    got, log = _late_200(home, "reinvite", "127.0.90.21", "127.0.90.22")
    # secure (as for the initial INVITE's): a 2xx retransmitted by bob reaches alice
    assert got, [line for line in log.splitlines() if "dropped" in line]


# -- hole 4: an early dialog's 1xx with every Record-Route taken out ----------------------

class _EarlyCallee:
    """bob's UAS behind the hop: a 183 with a To tag (an early dialog, RFC 3261 12.1)
    sent first, then the 200; the hop takes every Record-Route out of the 183 and puts
    its own address in its Contact (review 88's hole 1, on a 1xx)."""

    def __init__(self, strip: bool) -> None:
        self.uas = RawUas()
        self.strip = strip
        self.uas.responder = self.respond

    def respond(self, request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE":
            return answer
        to = f"{request.get('To')};tag=bt90e"
        early = make_response(request, 183, "Session Progress").replace("To", to)
        early = early.add("Contact", f"<sip:bob@{HOP}>" if self.strip
                          else f"<sip:bob@127.0.0.1:{self.uas.port}>")
        if self.strip:
            early = early.remove("Record-Route")
        proxy = request.get("Via").split()[1].split(";")[0].rsplit(":", 1)
        self.uas.sock.sendto(early.serialize(), (proxy[0], int(proxy[1])))
        time.sleep(0.3)
        answer = answer.replace("To", to).add("Contact", f"<sip:bob@127.0.0.1:{self.uas.port}>")
        return answer

    def close(self) -> None:
        self.uas.close()


def _early(home, pki, strip: bool, bob_source: str, alice_source: str):
    """The 183 alice got (None: none) and her early route set from it."""
    bob = _EarlyCallee(strip)
    register_contact(home, "bob", bob.uas.port, password=USERS["bob"], source=bob_source)
    ua = _alice_tls(home, pki, alice_source)
    ua.password = USERS["alice"]
    try:
        assert ua.register().status == 200
        ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                   timeout=6)
        early = [m for m in ua.received if not m.is_request and m.status == 183]
        assert not bob.uas.errors, bob.uas.errors
        return (early[0] if early else None)
    finally:
        ua.close()
        bob.close()


def _early_route_starts_at_our_tls(home, early: SipMessage | None) -> bool:
    if early is None:
        return True
    entries = [e for value in early.get_all("Record-Route") for e in value.split(",")]
    return bool(entries) and f":{home.tls_port};transport=tls" in entries[-1]


def test_control_the_untouched_183_leads_alices_early_dialog_to_our_tls_socket(
        proxy_factory, pki):
    home = _proxy(proxy_factory, "r90-early-ok")
    early = _early(home, pki, False, "127.0.90.23", "127.0.90.24")
    assert early is not None and early.to_tag, early
    assert _early_route_starts_at_our_tls(home, early), early.get_all("Record-Route")


@pytest.mark.parametrize("e2m", [False, True], ids=["routing", "e2m"])
def test_hole_a_183_with_every_record_route_taken_out_leads_the_early_dialog_past_us(
        proxy_factory, pki, e2m):
    home = _proxy(proxy_factory, "r90-early-none", e2m)
    early = _early(home, pki, True, "127.0.90.25", "127.0.90.26")
    # secure: a 1xx creating an early dialog that reaches alice starts her route set at
    # our TLS socket (or is dropped)
    assert _early_route_starts_at_our_tls(home, early), (early.get_all("Record-Route"),
                                                         early.get("Contact"))
