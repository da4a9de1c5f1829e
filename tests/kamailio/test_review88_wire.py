"""An eighty-eighth attacker's review (December 2026) of a77ae19: the
stop-34 route fix (our ``e2m-rr`` value = a 64-bit token and a 64-bit MAC of the
caller's side, ``RouteTokens.param``/``keeps_callers_side``, ``_plain_entry``,
``kemi.moved_route_entries``/``record_routed_here``) attacked on a real Kamailio 5.6
(review 81/82/86's set-up: alice over TLS, bob's UDP UAS behind a hop that rewrites his
200).  The core half: ``tests/unit/test_review88.py``.

Hole 1 (``test_hole_a_200_with_every_record_route_taken_out_leads_alice_past_us``):
attacker: an **untrusted hop** on bob's UDP leg.  Message: bob's 200 to alice's INVITE
with *every* Record-Route header taken out (and, to show where she goes, its Contact
rewritten to the hop's own UDP address).  Effect: the proxy relays it; alice's route
set is empty, so her ACK, BYE, re-INVITEs (and the digest answer to a challenge the
hop makes for our realm, review 81) go straight to the Contact over UDP, never to our
TLS socket.  Review 86's "our entries taken out" variant is dropped only because the
hop put an entry of its own in their place: with none left, nothing is checked.  At
fault: ``kamailio_app/kemi.py`` ``moved_route_entries``, ``if count == 0: return []``
(line 895), which returns before ``record_routed_here`` (line 922) is asked.  Fix: ask
``record_routed_here`` for a reply with no Record-Route too (a 1xx with a To tag or a
2xx to an INVITE or SUBSCRIBE we record-routed must carry our entry; a 100, a
non-2xx final answer and a 1xx without a To tag need not, RFC 3261 12.1.1).

Hole 2 (``test_hole_an_insiders_invite_mints_the_mac_the_hop_needs``): attackers: an
**untrusted hop** on bob's leg with any account of ours (an **insider UA**, eve; on an
open proxy, with no account at all).  Messages: alice's INVITE passes the hop, which
learns its Call-ID and From tag; eve sends the proxy her own INVITE to herself with
that Call-ID, ``From: <sip:eve@example.com>;tag=<alice's tag>`` and ``Record-Route:
<sip:HOP;lr>``; the proxy record-routes it and eve's UAS receives our entry with
``e2m-rr = token(Call-ID, alice's tag) + MAC(Call-ID, alice's tag, [<sip:HOP;lr>])``.
In bob's 200 the hop puts that value in our entries and appends ``<sip:HOP;lr>`` below
them.  Effect: relayed; alice's route set starts at the hop (review 82's hole, back).
The MAC binds only the Call-ID, the From *tag* and the entries below, all of which the
request's sender chooses: the proxy signs, for any sender, any caller's side for any
dialog.  At fault: ``kamailio_app/dialog_route.py`` ``RouteTokens._side`` (line 99:
``json.dumps([call_id, tag, below])``) with ``kemi.record_route`` (line 606).  Fix:
bind what only alice's request has: her top Via branch and CSeq number (the reply
carries both back unchanged, stray or not: ``[call_id, tag, cseq, branch, below]``),
and/or the From URI (eve cannot use alice's identity past ``route_auth``).

Both holes are run on a routing proxy (``e2m=False``, as reviews 81-86) and with the
E2M engine on (``e2m=True``): the same outcome.  Hole 2 also on an open proxy (no
``[auth]``, ``open``): eve is then any off-path sender, no account needed.

Controls: the untouched 200 leads alice to the TLS socket; review 86's variant (ours
taken out, the hop's entry in) is still dropped; eve's INVITE is record-routed with
the same token as alice's call (the oracle is live); the hop's entry added below ours
with alice's own MAC is still dropped.

Tried and held (run where a control says so, else read; core ones in the unit module):
- entries split across headers, commas inside ``<>``, blanks, case, ``lr=on``: the MAC
  is over ``_entries`` of all headers, compared as ``_comparable``; every rewrite that
  routes elsewhere compares unequal (review 86's list holds).
- header parameters after ``>``: ignored by ``_comparable`` and by routing alike.
- our entry copied (a spiral's "any entry will do"): a copy vouches only for what lies
  below it, i.e. for what its MAC was made over.
- another dialog's MAC: its Call-ID is in the MAC (``test_another_dialogs_token...``).
- a 1xx with a To tag: the same check runs on every reply that carries any
  Record-Route; hole 1 works on it too.
- ``record_routed_here`` on a stray: a 2xx retransmitted after tm's transaction ended
  carries the same Record-Route (our entry) and is checked by the MAC; a re-INVITE's
  200 carries no Record-Route and is never asked about (``count == 0``), so no
  legitimate stray seen dropped.
- a SUBSCRIBE's dialog made by a NOTIFY ahead of the 200 (RFC 6665): the NOTIFY is
  an in-dialog request, admitted by its Route token, and its Record-Route is not
  checked; a hop could start the subscriber's route set there.  Not run: our phone
  sends no in-dialog SUBSCRIBE (``Account.sendRequest``), a lead for a stack that does.
- the old 128-bit tokens: ``_TOKEN`` takes the first 16 hex digits as the token, the
  same bits as the new token: ``admits`` routes them.

Fixed (stop 34): as ``tests/unit/test_review88.py`` says (a 2xx we record-routed with no
Record-Route is dropped; the caller's-side MAC names the request's top Via).  Both
holes turned XPASS in every configuration; the markers are gone.
"""

from __future__ import annotations

import re
import threading

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.grammar import split_header_list
from e2m_plugins.sip import SipMessage, make_response, parse_address

pytestmark = [pytest.mark.kamailio, pytest.mark.openssl]

from tests.kamailio.test_review81_wire import _alice_tls  # noqa: E402

USERS = {"alice": "alice-R88-Pass", "bob": "bob-R88-Pass", "eve": "eve-R88-Pass"}
HOP = "127.0.0.1:5999"            # the hop's own UDP address (nothing needs to listen)
HOP_ENTRY = f"<sip:{HOP};lr>"
_VALUE = re.compile(r"e2m-rr=([0-9a-fA-F]{32})")


def _route_set(ok: SipMessage | None) -> list[str] | None:
    """alice's route set from the 200 she got (RFC 3261 12.1.2: the Record-Route list
    reversed, read as name-addrs); None when no 200 reached her."""
    if ok is None or ok.status != 200:
        return None
    entries = [e for value in ok.get_all("Record-Route") for e in split_header_list(value)]
    return [parse_address(e).uri for e in reversed(entries)]


def _starts_at_our_tls(home, ok: SipMessage | None) -> bool:
    """The secure outcome: no 200 reached alice, or her first hop is our TLS socket."""
    routes = _route_set(ok)
    return routes is None or (bool(routes) and f":{home.tls_port};transport=tls" in routes[0])


class _Callee:
    """bob's UAS behind the hop: the hop applies ``rewrite(invite, routes)`` (the 200's
    Record-Route list, top first) and may rewrite the Contact to itself."""

    def __init__(self, rewrite, contact_to_hop: bool = False) -> None:
        self.uas = RawUas()
        self.rewrite, self.contact_to_hop = rewrite, contact_to_hop
        self._lock = threading.Lock()
        self._answers: dict[str, SipMessage] = {}
        self.uas.responder = self.respond

    def respond(self, request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE":
            return answer
        with self._lock:           # retransmissions get the same answer
            key = request.get("Call-ID") or ""
            if key not in self._answers:
                answer = answer.replace("To", f"{request.get('To')};tag=bt88")
                contact = HOP if self.contact_to_hop else f"127.0.0.1:{self.uas.port}"
                answer = answer.add("Contact", f"<sip:bob@{contact}>")
                answer = answer.remove("Record-Route")     # the hop's version instead
                for route in self.rewrite(request, list(request.get_all("Record-Route"))):
                    answer = answer.add("Record-Route", route)
                self._answers[key] = answer
            return self._answers[key]

    def close(self) -> None:
        self.uas.close()


def _call(home, pki, bob_source, alice_source, rewrite, contact_to_hop=False):
    bob = _Callee(rewrite, contact_to_hop)
    register_contact(home, "bob", bob.uas.port, password=USERS["bob"], source=bob_source)
    ua = _alice_tls(home, pki, alice_source)
    ua.password = USERS["alice"]
    try:
        assert ua.register().status == 200
        mark = home.log_mark()
        ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                        timeout=5)
        return ok, home.log_since(mark), bob
    finally:
        ua.close()
        bob.close()


def _proxy(proxy_factory, name, e2m=False, auth=True):
    if not auth:        # the open proxy: eve needs no account (an off-path sender)
        return proxy_factory(name, e2m=e2m, tls=True, auth=False)
    return proxy_factory(name, e2m=e2m, tls=True, auth=True, users=USERS)


# -- hole 1: every Record-Route taken out ----------------------------------------------

def _untouched(invite, routes):
    return routes


def _none(invite, routes):
    return []


def _hops_instead(invite, routes):      # review 86's variant: ours out, the hop's in
    return [HOP_ENTRY]


def test_control_the_untouched_200_leads_alice_to_the_tls_socket(proxy_factory, pki):
    home = _proxy(proxy_factory, "r88-rr-ok")
    ok, _, _ = _call(home, pki, "127.0.88.1", "127.0.88.2", _untouched)
    routes = _route_set(ok)
    assert routes and f":{home.tls_port};transport=tls" in routes[0], ok


def test_control_ours_taken_out_and_the_hops_put_in_is_dropped(proxy_factory, pki):
    home = _proxy(proxy_factory, "r88-rr-hops")
    ok, log, _ = _call(home, pki, "127.0.88.3", "127.0.88.4", _hops_instead)
    assert ok is None or ok.status != 200, ok
    assert "(no entry of ours), not ours: dropped" in log


@pytest.mark.parametrize("e2m", [False, True], ids=["routing", "e2m"])
def test_hole_a_200_with_every_record_route_taken_out_leads_alice_past_us(proxy_factory,
                                                                           pki, e2m):
    home = _proxy(proxy_factory, "r88-rr-none", e2m)
    ok, _, _ = _call(home, pki, "127.0.88.5", "127.0.88.6", _none, contact_to_hop=True)
    # secure: a 200 that reaches alice starts her route set at our TLS socket
    assert _starts_at_our_tls(home, ok), (_route_set(ok), ok.get("Contact") if ok else None)


# -- hole 2: the proxy mints the caller's-side MAC for anyone ---------------------------

class _Oracle:
    """eve (an account of ours) and her UAS: ``mint(call_id, tag)`` sends the proxy an
    INVITE to eve with alice's Call-ID and From tag and ``Record-Route: <sip:HOP;lr>``,
    and returns the ``e2m-rr`` value of the entries the proxy wrote on it."""

    def __init__(self, home, source: str) -> None:
        self.home = home
        self.uas = RawUas()
        self.uas.responder = lambda request: make_response(request, 486, "Busy Here")
        register_contact(home, "eve", self.uas.port, password=USERS["eve"], source=source)
        self.ua = SipUa(home.port, user="eve", password=USERS["eve"], source=source)
        self.minted: list[str] = []

    def mint(self, call_id: str, tag: str) -> str | None:
        invite = self.ua.build("INVITE", "sip:eve@example.com", to="sip:eve@example.com",
                               call_id=call_id, from_tag=tag,
                               headers=[("Record-Route", HOP_ENTRY)])
        self.ua.request(invite, timeout=3)
        got = [m for m in self.uas.wait_for(1, method="INVITE", timeout=3)
               if m.get("Call-ID") == call_id]
        if not got:
            return None
        values = {v.lower() for r in got[-1].get_all("Record-Route") for v in _VALUE.findall(r)}
        assert len(values) == 1, values
        self.minted.append(values.pop())
        return self.minted[-1]

    def close(self) -> None:
        self.ua.close()
        self.uas.close()


def _with_value(routes: list[str], value: str) -> list[str]:
    return [_VALUE.sub(f"e2m-rr={value}", r) for r in routes]


def test_control_an_insiders_invite_is_record_routed_with_alices_token(proxy_factory, pki):
    """The oracle is live: eve's INVITE with alice's Call-ID and From tag reaches eve
    with our entry.  Since review 98 its token (first 16 hex digits) is no longer that
    of alice's call: the token binds the dialog's From and To AoRs, and eve's INVITE is
    From and To eve (From alice would need alice's credentials)."""
    home = _proxy(proxy_factory, "r88-rr-oracle-ok")
    eve = _Oracle(home, "127.0.88.7")
    seen: dict[str, str] = {}

    def rewrite(invite, routes):
        values = {v.lower() for r in routes for v in _VALUE.findall(r)}
        seen["alice"] = values.pop()
        seen["eve"] = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "") or ""
        return routes
    try:
        ok, _, _ = _call(home, pki, "127.0.88.8", "127.0.88.9", rewrite)
    finally:
        eve.close()
    assert ok is not None and ok.status == 200, ok
    assert seen["eve"] and seen["eve"][:16] != seen["alice"][:16]   # another dialog's token
    assert seen["eve"][16:] != seen["alice"][16:]          # another caller's side


def test_control_the_hops_entry_below_ours_with_alices_own_mac_is_dropped(proxy_factory, pki):
    home = _proxy(proxy_factory, "r88-rr-added")
    ok, log, _ = _call(home, pki, "127.0.88.10", "127.0.88.11",
                       lambda invite, routes: routes + [HOP_ENTRY])
    assert ok is None or ok.status != 200, ok
    assert "caller's side of ours), not ours: dropped" in log


@pytest.mark.parametrize(("e2m", "auth"), [(False, True), (True, True), (False, False)],
                         ids=["routing", "e2m", "open"])
def test_hole_an_insiders_invite_mints_the_mac_the_hop_needs(proxy_factory, pki, e2m, auth):
    home = _proxy(proxy_factory, "r88-rr-oracle", e2m, auth)
    eve = _Oracle(home, "127.0.88.12")

    def rewrite(invite, routes):
        value = eve.mint(invite.get("Call-ID") or "", invite.from_tag or "")
        assert value is not None
        return _with_value(routes, value) + [HOP_ENTRY]
    try:
        ok, log, bob = _call(home, pki, "127.0.88.13", "127.0.88.14", rewrite)
    finally:
        eve.close()
    assert not bob.uas.errors, bob.uas.errors
    assert eve.minted, "eve's INVITE was not record-routed"
    # secure: a 200 that reaches alice starts her route set at our TLS socket
    assert _starts_at_our_tls(home, ok), _route_set(ok)
