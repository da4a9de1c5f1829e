"""A ninetieth attacker's review (December 2026) of ea4cf0c: the proxy's Record-Route
MAC and reply filter (stop 34's newest code: ``RouteTokens.param``/
``keeps_callers_side``/``via_key``/``_comparable``/``_plain_entry``/
``routes_within_bounds``; ``kemi.record_route``/``moved_route_entries``/
``_via_below_ours``/``record_routed_here``); core half.  Wire half (every hole run on a
real Kamailio 5.6): ``tests/kamailio/test_review90_wire.py``; pjsip's side:
``tests/pjsua/test_review90_phone.py``.

Hole 1 (``test_hole_a_case_variant_of_alices_via_gets_her_mac``): attackers: an
**untrusted hop** on the callee's leg with any account (an **insider UA**; on an open
proxy an **off-path sender** told what to send).  Messages: eve's INVITE with alice's
Call-ID, From tag, ``Record-Route: <sip:HOP;lr>`` and, as top Via, alice's Via (read
below ours in the INVITE the hop forwards) with its branch in another case
(``z9hG4bK-UA16X..`` for ``z9hG4bK-ua16x..``; a second case variant after the 407).
Kamailio's tm compares a branch, sent-by host and transport octet for octet: a new
transaction, relayed and record-routed with ``param(Call-ID, tag, [HOP], eve's Via)``;
``via_key`` lower-cases the whole Via, so that MAC is the one of alice's Via.  In bob's
200 the hop puts the value in our entries and appends ``<sip:HOP;lr>``.  Effect:
``keeps_callers_side`` passes, the 200 is relayed, alice's route set starts at the hop
(review 88's hole 2, back: her in-dialog requests and digest answers go to it first,
over UDP past our TLS socket).  At fault: ``kamailio_app/dialog_route.py`` line 161
(``via_key``: ``"".join(via.split()).lower()``), against stop 34's premise ("with
alice's very Via, eve's INVITE is alice's transaction to tm, absorbed").  Fix: keep the
branch value and the sent-by host octet for octet in the key (lower-case only the
protocol and the parameter names), i.e. no key equality that tm's match does not also
have; or refuse to record-route an initial request whose top Via branch equals,
case-folded, that of a live transaction.

Hole 2 (``test_hole_a_maddr_on_our_own_entry_is_vouched_for``): attacker: an
**untrusted hop** on the callee's leg.  Message: bob's 200 with ``;maddr=<hop>`` added
to our own Record-Route entries (nothing else changed).  Effect: the entry still names
our socket to ``KSR.is_myself`` (host, port, transport: maddr is not read), and the MAC
after our token covers only the entries *below* ours: relayed; pjsip sends to a route's
maddr (``tests/pjsua/test_review90_phone.py``), so alice's ACK, BYE and re-INVITEs go
to the hop's address, never reaching us (the service of a chosen proxy, the firewall
from SDP, the archive of in-dialog MESSAGEs and BYEs, all skipped; over UDP the hop gets
her digest answers to a challenge in our realm, review 81's effect).  At fault:
``kamailio_app/kemi.py`` ``moved_route_entries`` line 944 (``KSR.is_myself(uri)`` is
the only check of our own entry) with ``dialog_route.keeps_callers_side`` (the MAC
leaves the entry itself out).  Fix: an entry carrying our token must carry no ``maddr``
(better: no URI parameter but those we write: ``lr``, ``r2``, ``transport``, ``e2m-rr``,
and no user part or headers), or put the entry's own URI as we wrote it under the MAC.

Hole 3 (``test_hole_a_stray_2xx_to_a_reinvite_is_dropped``): attacker: **nobody** (an
honest flow the filter breaks).  Message: bob's 200 to alice's re-INVITE (hold, a
session-timer refresh) that matches no transaction at the node that reads it: on a
cluster, any such answer reaching the node that did not forward the re-INVITE (its Via
names the cluster's address; review 69's strays); on one proxy, bob's retransmission
after tm's wait timer (5 s) when alice's ACK was lost.  RFC 3261 12.1.1: a 2xx to a
request inside a dialog carries no Record-Route.  Effect: ``moved_route_entries`` takes
a stray for an answer to a request we record-routed (``record_routed_here`` returns
True with no transaction) and drops it as ``(no Record-Route)``: alice never gets the
200, the re-INVITE fails after 32 s and bob, with no ACK, ends the call.  Review 88's
tried-and-held note ("a re-INVITE's 200 carries no Record-Route and is never asked
about") no longer holds since stop 34's fix of review 88's hole 1.  At fault:
``kamailio_app/kemi.py`` lines 919-926 with ``record_routed_here`` line 971
(``return True`` for a stray).  Fix: tell an initial request's answer from an in-dialog
one without the transaction: e.g. a Via parameter of ours (under the route key, bound to
our branch) on the initial INVITEs and SUBSCRIBEs we record-route, which every answer
brings back in our Via; drop a Record-Route-less 2xx only when it carries that mark or
our branch was changed (the MAC fails: review 86's hop).

Hole 4 (``test_hole_an_early_dialogs_1xx_without_record_route_passes``): attacker: an
**untrusted hop** on the callee's leg.  Message: bob's 183 (a To tag: an early dialog,
RFC 3261 12.1) with every Record-Route taken out and its Contact rewritten to the hop.
Effect: relayed (routing and e2m, wire: ``test_hole_a_183_with_every_record_route_
taken_out_leads_the_early_dialog_past_us``); alice's early route set is empty, so her
requests inside the early dialog (PRACK for 100rel, UPDATE with a new offer, RFC 3262
and 3311) go to the hop's Contact, past our TLS socket and the SDP inspection a chosen
proxy does; the 2xx then replaces that route set (RFC 3261 13.2.2.4).  Review 88 named
"a 1xx with a To tag" in its fix; stop 34 held only a 2xx to it.  At fault:
``kamailio_app/kemi.py`` line 924 (``if 200 <= status < 300 and
self.record_routed_here()``).  Fix: the same for a 101-199 with a To tag
(``$tt`` set).

Controls: alice's own value passes and the hop's entry below it is refused; a Via
whose branch differs in anything but case gets another MAC; tm's match (modelled)
tells the case variant apart from alice's Via; our entry moved to the hop's host is
refused; an honest 200 with our entry untouched passes the kemi check in and out of a
transaction; a stray 2xx with our entry (the initial INVITE's) passes; a 1xx without
a To tag (and a 100) with no Record-Route passes.

Tried and held (read, or run where a control or the wire module says so):
- ``via_key`` other folds: blanks (tm reads host and port parsed, so no new
  transaction), parameter order (tm ignores it), ``received``/``rport`` added (tm
  matches it as alice's: absorbed): only case gives a new transaction with the same key.
- ``_comparable`` (entries below ours): ``%xx``, ``sips:``, an explicit default port,
  ``maddr``, ``transport``, IPv6 brackets, a user part all compare unequal (dropped);
  case, blanks, ``lr=on``, parameter order, header parameters fold only what routes
  alike; header folding and several values in one header vs several headers flatten
  the same (``_entries``); a comma inside a quoted header parameter stays in its entry
  (``split_header_list``), a quote anywhere is refused (``_plain_entry``).
- our entry rewritten to the hop's host, or its transport dropped: ``is_myself`` fails
  (wire control); a copy of our entry with the hop's between two of ours: the first hop
  is still ours and the hop sits on the leg it is on (review 86's note).
- old-format 32-hex tokens: their second half is no MAC: the reply is dropped (a
  route set of an old dialog is never re-sent in a 2xx; ``admits`` still routes it).
- a 3xx/4xx/6xx carrying Record-Route: checked as a 2xx; its route set is never used.
- forks with several 2xx: each is checked on its own, each with its MAC.
- the cluster: the key is derived on every node from the proxy key; a front has no
  engine and a random key: it never finds an entry of ours and ``record_routed_here``
  is False there, so no front drops a node's 200 (read).
- Contact-based routing: with our entries in place alice's requests follow them; a
  Contact rewritten by the hop is the remote target behind the route set (known).

Fixed (stop 35): (1) ``dialog_route.via_key`` folds only blanks, the protocol's and
the parameter names' case: the sent-by and every value (the branch) stay as written,
as tm compares them; (2) an entry carrying our token with anything we do not write
(a ``maddr``, any parameter but ``lr``, ``r2``, ``transport`` and ours, a user part,
URI headers) is taken as moved (``written_as_ours``); (3) the proxy marks its own Via
on an INVITE or SUBSCRIBE it relays in a dialog (``;e2mnr=``, a MAC of the Call-ID and
the Via below ours: ``kemi.mark_unrouted`` through core ``xavp_via_params`` and corex),
and a stray 2xx without Record-Route passes only with that mark; (4) a 1xx with a To
tag to a request we record-routed must carry our entry too.  The core models of
``moved_route_entries`` here follow the fixed check (``written_as_ours``; the stray
re-INVITE 2xx carries the mark, and without it is dropped).
"""

from __future__ import annotations

import re
import sys
import types

import pytest

from kamailio_app.dialog_route import (UNROUTED_MARK, RouteTokens, dialog_parties, routes_within_bounds,  # noqa: E501
                                       via_key, written_as_ours)

ROUTES = RouteTokens(b"q" * 32)
PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To
CALL, TAG = "c90@example.com", "at90"
HOP = "<sip:203.0.113.66:5999;lr>"
ALICES_VIA = "SIP/2.0/TLS 192.0.2.10:5061;rport;branch=z9hG4bK-ua16x2273"
EVES_VIA = "SIP/2.0/TLS 192.0.2.10:5061;rport;branch=z9hG4bK-UA16X2273"   # case only
OTHER_VIA = "SIP/2.0/TLS 192.0.2.10:5061;rport;branch=z9hG4bK-ua16x2274"  # one digit
REPLY_VIA = ALICES_VIA.replace(";rport", ";rport=40001;received=192.0.2.9")
ALICES = ROUTES.param(CALL, TAG, [], ALICES_VIA, parties=PARTIES)


def _ours(value: str, tls: bool = True, extra: str = "") -> str:
    where = "10.0.0.1:5061;transport=tls" if tls else "10.0.0.1:5060"
    return f"<sip:{where};r2=on;lr{value}{extra}>"


def _is_myself(uri: str) -> bool:
    """Kamailio's ``is_myself``: host, port and transport of the URI; maddr unread."""
    return uri.startswith("sip:10.0.0.1:")


def _relayed(reply: list[str], via: str = REPLY_VIA) -> bool:
    """``kemi.moved_route_entries`` as it decides for a reply carrying our entries."""
    if not routes_within_bounds(reply):
        return False
    ours = ROUTES.ours_in(CALL, TAG, reply, parties=PARTIES)
    return not [u for u in ours if not written_as_ours(u) or not _is_myself(u)] and \
        (not ours or ROUTES.keeps_callers_side(CALL, TAG, reply, via, parties=PARTIES))


_SENT_BY = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*(\w+)\s+([^;:\s]+)(?::(\d+))?", re.I)


def _tm_same_transaction(a: str, b: str) -> bool:
    """Kamailio tm's RFC 3261 request match (``t_lookup.c`` ``via_matching``): branch,
    sent-by host and transport compared octet for octet, the port as a number."""
    ma, mb = _SENT_BY.match(a), _SENT_BY.match(b)
    branch = re.compile(r";\s*branch\s*=\s*([^;,\s]+)", re.I)
    return (ma.group(2), ma.group(3) or "", ma.group(1)) == \
        (mb.group(2), mb.group(3) or "", mb.group(1)) and \
        branch.search(a).group(1) == branch.search(b).group(1)


# -- hole 1: a case variant of alice's Via --------------------------------------------

def test_control_alices_own_value_passes_and_the_hops_entry_below_it_does_not():
    assert _relayed([_ours(ALICES, tls=False), _ours(ALICES)])
    assert not _relayed([_ours(ALICES, tls=False), _ours(ALICES), HOP])


def test_control_another_branch_gets_another_mac():
    minted = ROUTES.param(CALL, TAG, [HOP], OTHER_VIA, parties=PARTIES)
    assert not _relayed([_ours(minted, tls=False), _ours(minted), HOP])


def test_control_tm_takes_the_case_variant_for_another_transaction():
    assert _tm_same_transaction(ALICES_VIA, ALICES_VIA.replace(";rport", ";rport=1"))
    assert not _tm_same_transaction(ALICES_VIA, EVES_VIA)
    # what the MAC takes: the same before stop 35 (the hole); now never looser than tm
    assert via_key(ALICES_VIA) != via_key(EVES_VIA)
    assert via_key(ALICES_VIA) == via_key(ALICES_VIA.replace(";rport", ";rport=1"))


def test_hole_a_case_variant_of_alices_via_gets_her_mac():
    minted = ROUTES.param(CALL, TAG, [HOP], EVES_VIA, parties=PARTIES)
    # secure: a MAC made for another transaction vouches for nothing in alice's 200
    assert not _relayed([_ours(minted, tls=False), _ours(minted), HOP])


# -- hole 2: maddr on our own entry ---------------------------------------------------

def test_control_our_entry_moved_to_the_hops_host_is_refused():
    moved = _ours(ALICES).replace("10.0.0.1", "203.0.113.66")
    assert not _relayed([_ours(ALICES, tls=False), moved])


def test_hole_a_maddr_on_our_own_entry_is_vouched_for():
    reply = [_ours(ALICES, tls=False, extra=";maddr=203.0.113.66"),
             _ours(ALICES, extra=";maddr=203.0.113.66")]
    # secure: an entry of ours that routes elsewhere (its maddr) is not vouched for
    assert not _relayed(reply)


# -- hole 3: a stray 2xx to a re-INVITE ------------------------------------------------

@pytest.fixture
def kemi_check(monkeypatch):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)

    def check(method: str, status: int, routes: list[str], request_to_tag: str = "",
              in_transaction: bool = True, reply_to_tag: str = "bt90",
              our_via: str = "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKp") -> list[str]:
        values: dict[str, object] = {"$hdrc(Record-Route)": len(routes), "$ci": CALL,
                                     "$ft": TAG, "$rm": method, "$rs": status,
                                     "$fu": "sip:alice@example.com",
                                     "$tu": "sip:bob@example.com",
                                     "$T_req($tt)": request_to_tag, "$hdrc(Via)": 2,
                                     # the honest INVITE came in over TLS, left over UDP
                                     # (our two entries; stop 38 holds ours to them)
                                     "$T_req($Ri)": "10.0.0.1", "$T_req($Rp)": 5061,
                                     "$T_req($pr)": "tls",
                                     "$tt": reply_to_tag,
                                     "$(hdr(Via)[0])": our_via,
                                     "$(hdr(Via)[1])": REPLY_VIA}
        for i, route in enumerate(routes):
            values["$(hdr(Record-Route)[%d])" % i] = route
        fake.pv = types.SimpleNamespace(get=values.get)
        fake.tm = types.SimpleNamespace(t_check_trans=lambda: 1 if in_transaction else -1)
        fake.is_myself = lambda uri: 1 if _is_myself(uri) else -1
        app = types.SimpleNamespace(routes=ROUTES,
                                    config=types.SimpleNamespace(dispatcher=None))
        node = types.SimpleNamespace(app=app)
        node.record_routed_here = lambda: kemi.kamailio.record_routed_here(node)
        return kemi.kamailio.moved_route_entries(node)
    yield check
    sys.modules.pop("kamailio_app.kemi", None)


def test_control_a_reinvites_2xx_in_its_transaction_passes(kemi_check):
    assert kemi_check("INVITE", 200, [], request_to_tag="bt90") == []


def test_control_a_stray_2xx_with_our_entry_passes(kemi_check):
    honest = [_ours(ALICES, tls=False), _ours(ALICES)]
    assert kemi_check("INVITE", 200, honest, in_transaction=False) == []
    assert kemi_check("INVITE", 200, honest) == []


def test_hole_a_stray_2xx_to_a_reinvite_is_dropped(kemi_check):
    # secure: an answer inside a dialog is relayed without Record-Route, stray or not
    # (fixed in stop 35: the proxy marks its Via on a request it relays in a dialog,
    # ``kemi.mark_unrouted``; the stray brings the mark back, bound to the Via below)
    mark = ROUTES.unrouted_mark(CALL, ALICES_VIA)
    marked = f"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKp;{UNROUTED_MARK}={mark}"
    assert kemi_check("INVITE", 200, [], in_transaction=False, our_via=marked) == []
    # without it, or with one made for another request's Via, it is an initial
    # INVITE's 2xx whose Record-Route was taken out (review 88)
    assert kemi_check("INVITE", 200, [], in_transaction=False) != []
    other = ROUTES.unrouted_mark(CALL, OTHER_VIA)
    assert kemi_check("INVITE", 200, [], in_transaction=False,
                      our_via=f"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKp;{UNROUTED_MARK}={other}") != []


# -- hole 4: a 1xx that creates an early dialog, with no Record-Route ----------------

def test_control_a_ringing_without_to_tag_or_record_route_passes(kemi_check):
    """A 1xx without a To tag creates no dialog: it needs no Record-Route (a fix must
    keep it); nor does a 100."""
    assert kemi_check("INVITE", 180, [], reply_to_tag="") == []
    assert kemi_check("INVITE", 100, [], reply_to_tag="") == []


def test_hole_an_early_dialogs_1xx_without_record_route_passes(kemi_check):
    # secure: a 1xx with a To tag to an INVITE we record-routed must carry our entry
    assert kemi_check("INVITE", 183, []) != []
