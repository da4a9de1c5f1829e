"""An eighty-eighth attacker's review (December 2026) of a77ae19: the
latest fixes attacked (the ``e2m-rr`` value as token + MAC of the caller's side,
``RouteTokens.param``/``keeps_callers_side``/``_comparable``/``_plain_entry``/
``routes_within_bounds``, ``kemi.moved_route_entries``/``record_routed_here``; the
archive uid by ``SeenBody.signed_at``; a front's settle); core half.  Wire half:
``tests/kamailio/test_review88_wire.py``.

Hole 1 (``test_hole_a_reply_with_no_record_route_is_not_asked_about``): attacker: an
**untrusted hop** on the callee's leg.  Message: bob's 200 to alice's INVITE (in the
proxy's transaction, no To tag in the request) with every Record-Route header taken out.
Effect: ``moved_route_entries`` returns ``[]`` at once (``count == 0``), before
``record_routed_here`` is asked, so the reply is relayed; alice's route set is empty and
her in-dialog requests go to the Contact (the hop's, if it rewrote it), never through our
TLS socket (review 81's effect).  Review 86's variant that puts the hop's entry in place
of ours is dropped; taking ours out and adding nothing is not.  At fault:
``kamailio_app/kemi.py`` line 895 (``if count == 0: return []``).  Fix: run the
``record_routed_here`` test for a reply with no Record-Route as well (for a 2xx, and a
1xx with a To tag; non-2xx finals carry none by right).

Hole 2 (``test_hole_the_mac_is_made_for_any_request_with_the_dialogs_ids``): attackers:
the **untrusted hop** on the callee's leg with any account (an **insider UA**; on an open
proxy, an **off-path sender**).  Messages: any INVITE to anyone with alice's Call-ID,
a From with alice's *tag* (any URI) and ``Record-Route: <sip:HOP;lr>``: the proxy writes
``param(Call-ID, tag, [<sip:HOP;lr>])`` on it (``kemi.record_route``), which the sender
reads at its UAS; in bob's 200 the hop swaps that value into our entries and appends its
own entry.  Effect: ``keeps_callers_side`` accepts it: alice's first hop is the hop.  At
fault: ``kamailio_app/dialog_route.py`` ``RouteTokens._side`` line 99 (the MAC covers
Call-ID, tag and the entries below only, all of which any sender chooses).  Fix: bind
what only alice's request carries and the reply brings back unchanged: its CSeq number
and the branch of the Via it reached us with (``[call_id, tag, cseq, branch, below]``;
on a reply: the CSeq and the second Via's branch), or the From URI (eve cannot pass
``route_auth`` as alice).

Controls: the honest reply is relayed; review 86's "ours out, the hop's in" is refused;
eve's entry carries the same token as alice's but another MAC; the hop's entry below
alice's own MAC is refused; a non-2xx final answer without Record-Route is relayed (a
fix must keep it).

Tried and held (read, or run here where named):
- ``_comparable``: blanks, case, ``lr=on``, parameter order, header parameters after
  ``>``, entries split across headers (``_entries`` flattens): a form that compares equal
  routes to the same place; ``%xx``, ``sips:``, a port, ``maddr``/``transport`` compare
  unequal (review 86's list).
- ``_plain_entry``: a comma inside ``<>`` is kept inside the one entry by
  ``split_header_list`` (as by pjsip's and Kamailio's name-addr parsers), and a second
  ``<`` or ``>`` is refused: no entry reads as two.
- our entry copied below the hop's: it vouches only for the entries below it.
- another dialog's MAC: the Call-ID and tag are in it.
- the archive uid: two different messages of one dialog share ``signed_at`` only with
  the same ids, and then the row's recorded fields (the text's digest, signer, cid)
  still differ; an unbound body sent again byte for byte is one row (documented).
  Copies read at two nodes compute the same ``signed_at``.  A hop's copy of bob's
  signed 200 wrapped in ``multipart/mixed`` (one part) is read as the same body (same
  uid); two copies of the part share a Content-ID (alice: ``MalformedError``); without
  Content-IDs alice's binding check fails (``BindingMismatchError``) and the proxy
  reads nothing: a drop at most, no second row (probed with review 86's ``world``).
- a front's ``_UNSETTLED`` claim: it caps a claim at 32 s until the node's 2xx, which
  is settled by ``$T_req($si)``/``$T_req($tu)`` (a retransmitted REGISTER is absorbed
  by tm; a late 2xx after the transaction ended is a stray with no ``$T_req``: the
  slot then lives 32 s while the binding lives an hour: an under-count of one source
  by a node slow past 32 s, not an attacker's lever; not run).

Fixed (stop 34): hole 1, a 2xx to an INVITE or SUBSCRIBE we record-routed with no
Record-Route at all is dropped (``moved_route_entries``: ``(no Record-Route)``); hole 2,
the MAC after our token also names the request's top Via as it reached us
(``dialog_route.via_key``: ``received`` and ``rport`` left out), which the reply
brings back below ours at whichever node it reaches; eve's INVITE with alice's ids
gets a MAC for her own Via only, and with alice's very Via it is the same transaction
to tm, a retransmission absorbed.  The models here now give alice's Via to the MAC and
to the check (tm's transaction id was tried first: it broke a cluster's stray replies,
which another node reads).  Both turned XPASS; the markers are gone.
"""

from __future__ import annotations

import sys
import types

import pytest

from kamailio_app.dialog_route import RouteTokens, dialog_parties, routes_within_bounds
from e2m_plugins.grammar import split_header_list
from e2m_plugins.sip import parse_address

ROUTES = RouteTokens(b"r" * 32)
PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To
CALL, TAG = "c88@example.com", "at88"
HOP = "<sip:203.0.113.66:5999;lr>"


def _ours(value: str, tls: bool = True) -> str:
    where = "10.0.0.1:5061;transport=tls" if tls else "10.0.0.1:5060"
    return f"<sip:{where};lr{value}>"


# stop 34's fix: the MAC names the request's top Via as it reached us (the reply
# brings it back below ours, with the received and rport we added)
ALICES_VIA = "SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK-a88;rport"
EVES_VIA = "SIP/2.0/UDP 198.51.100.5:5060;branch=z9hG4bK-e88"
ALICES = ROUTES.param(CALL, TAG, [], ALICES_VIA, parties=PARTIES)             # alice straight to us, TLS
EVES = ROUTES.param(CALL, TAG, [HOP], EVES_VIA, parties=PARTIES)              # eve's INVITE: alice's ids


def _is_myself(uri: str) -> bool:
    return uri.startswith("sip:10.0.0.1:")


def _relayed(reply: list[str]) -> bool:
    """``kemi.moved_route_entries`` as it decides for a reply carrying our entries."""
    if not routes_within_bounds(reply):
        return False
    ours = ROUTES.ours_in(CALL, TAG, reply, parties=PARTIES)
    return not [u for u in ours if not _is_myself(u)] and \
        (not ours or ROUTES.keeps_callers_side(
            CALL, TAG, reply, ALICES_VIA.replace(";rport", ";rport=40001;received=192.0.2.9"), parties=PARTIES))


def _first_hop(reply: list[str]) -> str:
    entries = [e for value in reply for e in split_header_list(value)]
    return parse_address(entries[-1]).uri


# -- hole 2: the MAC is made for anyone -----------------------------------------------

def test_control_the_honest_reply_is_relayed():
    assert _relayed([_ours(ALICES, tls=False), _ours(ALICES)])


def test_control_the_hops_entry_below_alices_own_mac_is_refused():
    assert not _relayed([_ours(ALICES, tls=False), _ours(ALICES), HOP])


def test_control_eves_entry_carries_alices_token_and_another_mac():
    assert EVES[:len(";e2m-rr=") + 16] == ALICES[:len(";e2m-rr=") + 16]
    assert EVES != ALICES


def test_hole_the_mac_is_made_for_any_request_with_the_dialogs_ids():
    reply = [_ours(EVES, tls=False), _ours(EVES), HOP]
    assert _first_hop(reply) == "sip:203.0.113.66:5999;lr"
    # secure: a MAC another request obtained does not vouch for alice's caller's side
    assert not _relayed(reply)


# -- hole 1: a reply with no Record-Route at all --------------------------------------

@pytest.fixture
def kemi_check(monkeypatch):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)

    def check(method: str, status: int, routes: list[str], request_to_tag: str = "",
              in_transaction: bool = True) -> list[str]:
        values: dict[str, object] = {"$hdrc(Record-Route)": len(routes), "$ci": CALL,
                                     "$ft": TAG, "$rm": method, "$rs": status,
                                     "$fu": "sip:alice@example.com",
                                     "$tu": "sip:bob@example.com",
                                     "$T_req($tt)": request_to_tag, "$hdrc(Via)": 2,
                                     # the honest INVITE came in over TLS, left over UDP
                                     # (our two entries; stop 38 holds ours to them)
                                     "$T_req($Ri)": "10.0.0.1", "$T_req($Rp)": 5061,
                                     "$T_req($pr)": "tls",
                                     "$(hdr(Via)[0])": "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKp",
                                     "$(hdr(Via)[1])": ALICES_VIA + "=40001"}
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


def test_control_ours_taken_out_and_the_hops_put_in_is_refused(kemi_check):
    assert kemi_check("INVITE", 200, [HOP]) == ["(no entry of ours)"]


def test_control_the_honest_200_passes_the_kemi_check(kemi_check):
    assert kemi_check("INVITE", 200, [_ours(ALICES, tls=False), _ours(ALICES)]) == []


def test_control_a_busy_answer_without_record_route_is_relayed(kemi_check):
    """A non-2xx final answer carries no Record-Route by right: a fix must keep it."""
    assert kemi_check("INVITE", 486, []) == []


def test_hole_a_reply_with_no_record_route_is_not_asked_about(kemi_check):
    # secure: a 200 to an INVITE we record-routed without our entry is dropped
    assert kemi_check("INVITE", 200, []) != []
