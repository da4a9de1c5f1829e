"""A ninety-fourth attacker's review (December 2026) of 13d9573: this stop's proxy fixes
(reviews 90, 91, 92) - a dialog's keys end at the BYE's 2xx; the Record-Route checks of
replies and the ``;e2mnr=`` mark on our Via of a request relayed inside a dialog; the
door's "Bad Record-Route" - fresh eyes, modelled on the core and on ``kamailio_app.kemi``
with a stand-in ``KSR`` (as ``tests/unit/test_review90.py`` does).  The same holes on a
real Kamailio: ``tests/kamailio/test_review94_wire.py`` (its docstring has the whole
report: attacker, messages, effect, code at fault, fix, and what held).

``test_hole_*`` xfail strictly on 13d9573 (their assertion is the secure behaviour);
``test_control_*`` pass.

Hole 1 (``test_hole_a_bye_answered_by_whoever_it_was_routed_to_ends_the_dialog``):
attacker: an **insider UA** (alice, hiding her call from the archive) or an **untrusted
hop** with the call's ids and route token.  Messages: in a live call read by the proxy,
a bare BYE with the dialog's ids and Route but a Request-URI of the attacker's own UAS,
which answers 200 (bob never sees the BYE; the call goes on).  Effect: tm's reply route
hands that 2xx to ``kemi.end_answered_dialog`` -> ``ProxyEngine.end_answered`` with the
BYE's ids: the dialog's keys go; the next re-INVITE under the dialog key is refused 496
and bob's answers go unread.  At fault: ``kemi.end_answered_dialog`` (kemi.py line 1292)
asks nothing of where the BYE went (``$T_req($ru)``).  Fix: end the keys only for a BYE
relayed to the dialog's other party (its remote target, kept with the dialog from the
INVITE's and the 2xx's Contact).

Hole 2 (``test_hole_a_mark_minted_by_another_transaction_vouches_for_alices_200``):
attacker: an **untrusted hop** on bob's leg.  Messages: an in-dialog INVITE of its own
under alice's Call-ID with her From tag as its To tag (the route token admits it), our
entries as Route, alice's own Via (or its own sent-by with alice's ``received``/``rport``)
as its top Via, and another CSeq (tm hashes by Call-ID and CSeq: a new transaction), so
``kemi.mark_unrouted`` writes ``;e2mnr=MAC(Call-ID, alice's Via)`` on our Via towards the
hop; then bob's 200 to alice's INVITE stripped of Record-Route, our branch changed (a
stray), the mark added.  Effect: ``record_routed_here`` takes it for a re-INVITE's late
2xx: relayed with no Record-Route, alice's dialog goes past the proxy.  At fault:
``RouteTokens.unrouted_mark`` (dialog_route.py) binds the Call-ID and a Via the request's
sender wrote, and ``via_key`` drops ``received``/``rport``.  Fix: make the mark from what
only we wrote and the stray brings back unchanged: our own Via's branch (a MAC of the
branch we generated, plus CSeq number and method), so no request of anyone else's can
make a mark that fits alice's transaction.

Fixed (stop 35): (1) a BYE's 2xx ends the dialog's keys only when the BYE went to the
dialog's other party: the proxy notes each dialog's two remote targets at its initial
INVITE's 2xx (the INVITE's Contact and the 2xx's, htable ``e2mtargets``:
``kemi.note_caller_target`` at the INVITE, ``note_dialog_targets`` at its 2xx, a
stray one too), and ``end_answered_dialog`` compares the BYE's
Request-URI as received (``$T_req($ou)``) with the target of the party it was not
from; (2) a request under an RFC 3261 branch (compared in any case, as pjsip does)
that another live request holds (another Call-ID, CSeq or method within 64 s, htable
``e2mbranch``: ``kemi._branch_taken``) is refused 482 at the door, so the hop's
in-dialog INVITE under alice's branch is never relayed nor marked.  The core models
here follow: the dialog's targets are noted first, and the mark holes assert the door.
"""

from __future__ import annotations

import sys
import re
import types

import pytest

from e2m_lab.flows import TRUSTED
from e2m_plugins.testpki import init_test_pki
from kamailio_app.dialog_route import UNROUTED_MARK, RouteTokens, dialog_parties, via_key

from tests.unit.test_review90 import _tm_same_transaction
from tests.unit.test_review92 import _call_through_the_proxy

ROUTES = RouteTokens(b"q" * 32)
CALL = "c94@example.com"
ALICES_VIA = "SIP/2.0/TLS 192.0.2.10:5061;rport;branch=z9hG4bK-ua94x1"
REPLY_VIA = ALICES_VIA.replace(";rport", ";rport=40001;received=192.0.2.9")
HOPS_VIA = "SIP/2.0/UDP 203.0.113.66:5999;rport;branch=z9hG4bK-hop94"
OUR_VIA = "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKp.0"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture
def fake_ksr(monkeypatch):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)
    yield fake, kemi
    sys.modules.pop("kamailio_app.kemi", None)


# -- hole 1: a BYE's 2xx from whoever the BYE was routed to ---------------------------------

def _fake_htable(fake) -> dict:
    table: dict = {}
    fake.htable = types.SimpleNamespace(
        sht_get=lambda name, key: table.get((name, key)),
        sht_sets=lambda name, key, value: table.__setitem__((name, key), value),
        sht_setxs=lambda name, key, value, ttl: table.__setitem__((name, key), value) or 1,
        sht_setex=lambda name, key, ttl: 1,
        sht_rm=lambda name, key: table.pop((name, key), None))
    fake.info = lambda text: None
    return table


def _ends(tags) -> dict:
    """$fu and $tu of an in-dialog request with ``tags`` (From, To) in alice's call with
    bob (her tag ``a1``): From bob when it comes from his side (the token binds the
    parties in the caller's order: review 99)."""
    alice, bob = "sip:alice@example.com", "sip:bob@example.com"
    return {"$fu": alice, "$tu": bob} if tags[0] == "a1" else {"$fu": bob, "$tu": alice}


def _our_entry(call_id: str) -> str:
    """Our Record-Route entry of alice's INVITE (tag ``a1``), as the 2xx brings it back
    and the dialog's Route carries it (review 96: the route set is noted beside the
    targets)."""
    parties = dialog_parties("sip:alice@example.com", "sip:bob@example.com")
    return f"<sip:127.0.0.1:5060;lr{ROUTES.param(call_id, 'a1', parties=parties)}>"


def _bye_request(fake, kemi, node, call_id: str, tags, dst: str = "") -> dict:
    """``kemi.note_bye_way`` in the request route after ``loose_route``, for a BYE with
    ``tags`` (From, To) whose Route is our entry (the token of alice's tag ``a1``) and,
    when ``dst``, one entry more, which ``loose_route`` made the destination ($du).
    Returns the AVPs it set (tm brings them to the reply route).  Since review 96 a
    BYE's 2xx ends keys only when this found the BYE going the dialog's way."""
    routes = [_our_entry(call_id)] + ([f"<{dst}>"] if dst else [])
    values = {**_ends(tags), "$rm": "BYE", "$ci": call_id, "$ft": tags[0], "$tt": tags[1], "$du": dst,
              "$hdrc(Route)": len(routes),
              **{f"$(hdr(Route)[{i}])": route for i, route in enumerate(routes)}}
    avps: dict = {}
    fake.pv = types.SimpleNamespace(get=values.get, seti=avps.__setitem__,
                                    sets=avps.__setitem__)
    kemi.kamailio.note_bye_way(node)
    return avps


def _end_answered(fake, kemi, proxy, status: int, ruri: str, tags=("a1", "b1")) -> None:
    """``kemi.end_answered_dialog`` in tm's reply route, for a 2xx/other to a BYE we
    relayed to ``ruri`` (the BYE's ids, ``$T_req``).  Since stop 35 the dialog's targets
    are noted at the INVITE's 2xx first (``note_dialog_targets``): alice's Contact
    ``sip:alice@127.0.0.1:5061``, bob's ``sip:bob@127.0.0.1:5062``."""
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=proxy, routes=ROUTES))
    if not getattr(fake, "htable", None):
        _fake_htable(fake)
        invite = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$ci": "r94-bye@x", "$ft": "a1",
                  "$hdr(Contact)": "<sip:alice@127.0.0.1:5061>"}
        fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
        kemi.kamailio.note_caller_target(node)
        invite_2xx = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$T_req($tt)": "", "$avp(e2m_target_mine)": invite.get("$avp(e2m_target_mine)"), "$ci": "r94-bye@x",
                      "$ft": "a1", "$tt": "b1", "$hdr(Contact)": "<sip:bob@127.0.0.1:5062>",
                      "$hdrc(Record-Route)": 1,
                      "$(hdr(Record-Route)[0])": _our_entry("r94-bye@x")}
        fake.pv = types.SimpleNamespace(get=invite_2xx.get, seti=invite_2xx.__setitem__)
        kemi.kamailio.note_dialog_targets(node)
    avps = _bye_request(fake, kemi, node, "r94-bye@x", tags)
    values = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "BYE", "$rs": status, "$T_req($ci)": "r94-bye@x",
              "$T_req($ft)": tags[0], "$T_req($tt)": tags[1], "$T_req($ou)": ruri,
              "$ru": ruri, **avps}
    fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)
    kemi.kamailio.end_answered_dialog(node)


def test_control_a_refused_bye_ends_nothing(world, fake_ksr):
    fake, kemi = fake_ksr
    proxy, _, _ = _call_through_the_proxy(world, "r94-bye@x")
    before = len(proxy.cache)
    assert before
    _end_answered(fake, kemi, proxy, 481, "sip:x@203.0.113.66:5999")
    assert len(proxy.cache) == before


def test_control_the_calls_own_bye_ends_its_keys(world, fake_ksr):
    """What a fix must keep: the BYE to bob's own contact, answered 200, ends the keys
    (from either side: the tags in either order)."""
    fake, kemi = fake_ksr
    # alice's BYE goes to bob's contact, bob's to alice's (fixed in stop 35: the target
    # of the other party, as the dialog's start named it)
    for tags, target in ((("a1", "b1"), "sip:bob@127.0.0.1:5062"),
                         (("b1", "a1"), "sip:alice@127.0.0.1:5061")):
        fake.htable = None
        proxy, _, _ = _call_through_the_proxy(world, "r94-bye@x")
        _end_answered(fake, kemi, proxy, 200, target, tags)
        assert len(proxy.cache) == 0


@pytest.mark.parametrize("tags", [("a1", "b1"), ("b1", "a1")], ids=["insider", "hop"])
def test_hole_a_bye_answered_by_whoever_it_was_routed_to_ends_the_dialog(
        world, fake_ksr, tags):
    fake, kemi = fake_ksr
    proxy, _, _ = _call_through_the_proxy(world, "r94-bye@x")
    before = len(proxy.cache)
    # the BYE went to the attacker's UAS (not bob's contact), which answered 200
    _end_answered(fake, kemi, proxy, 200, "sip:x@203.0.113.66:5999", tags)
    assert len(proxy.cache) == before, "the live call's keys went at a stranger's 200"


# -- hole 2: a mark minted for alice's Via by another transaction -------------------------

def _mint(fake, kemi, request_via: str, method: str = "INVITE") -> str:
    """What ``kemi.mark_unrouted`` writes on our Via for an in-dialog request whose top
    Via (as it reached us) is ``request_via``."""
    written: dict[str, str] = {}
    values = {"$rm": method, "$ci": CALL, "$ft": "hop94", "$tt": "at94",
              "$(hdr(Via)[0])": request_via}
    fake.pv = types.SimpleNamespace(get=values.get, sets=written.__setitem__)
    fake.corex = types.SimpleNamespace(via_add_xavp_params=lambda flag: 1)
    node = types.SimpleNamespace(app=types.SimpleNamespace(routes=ROUTES))
    kemi.kamailio.mark_unrouted(node)
    (value,) = written.values()
    return value


def _stray_2xx_dropped(fake, kemi, mark: str | None) -> bool:
    """``kemi.record_routed_here`` for a 200 to alice's initial INVITE with no
    Record-Route and our branch changed (no transaction), the mark on our Via."""
    our_via = OUR_VIA.replace("p.0", "p.x") + (f";{UNROUTED_MARK}={mark}" if mark else "")
    values = {"$rm": "INVITE", "$rs": 200, "$ci": CALL, "$hdrc(Via)": 2,
              "$(hdr(Via)[0])": our_via, "$(hdr(Via)[1])": REPLY_VIA}
    fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)
    fake.tm = types.SimpleNamespace(t_check_trans=lambda: -1)
    node = types.SimpleNamespace(app=types.SimpleNamespace(
        routes=ROUTES, config=types.SimpleNamespace(dispatcher=None)))
    return kemi.kamailio.record_routed_here(node)


def test_control_without_a_mark_or_with_one_for_another_via_the_stray_is_dropped(fake_ksr):
    fake, kemi = fake_ksr
    assert _stray_2xx_dropped(fake, kemi, None)
    assert _stray_2xx_dropped(fake, kemi, _mint(fake, kemi, HOPS_VIA))


def test_control_the_hops_request_is_another_transaction_to_tm():
    """tm hashes a request by Call-ID and CSeq number (``t_lookup_request``) and matches
    only in that bucket: alice's very Via under another CSeq is not her INVITE's
    retransmission (the wire test sees it relayed); with her own sent-by swapped for the
    hop's and her address in ``received``/``rport``, not even the Via matches."""
    assert (CALL, 51) != (CALL, 1)
    forged = HOPS_VIA.replace("hop94", "ua94x1") + ";received=192.0.2.9;rport=40001"
    assert not _tm_same_transaction(ALICES_VIA, forged.replace(";rport;", ";"))
    assert via_key(forged) != via_key(ALICES_VIA)


def _via0_branch(via: str) -> str | None:
    """Kamailio's ``$via0(branch)``: its Via parser keeps the last ``branch`` parameter."""
    found = re.findall(r";\s*branch\s*=\s*([^;,\s]*)", via, re.IGNORECASE)
    return found[-1] if found else None


def _door_refuses(fake, kemi, via: str, cseq: int) -> bool:
    """``kemi._branch_taken`` in ``route_new_transaction`` (stop 35): alice's INVITE
    (CSeq 1, her Via) noted first, then a request with ``via`` and ``cseq``."""
    _fake_htable(fake)
    for value in ((ALICES_VIA, 1), (via, cseq)):
        values = {"$ci": CALL, "$cs": value[1], "$rm": "INVITE", "$(hdr(Via)[0])": value[0],
                  "$via0(branch)": _via0_branch(value[0])}
        fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)
        note = kemi._branch_note()
        taken = kemi._branch_taken(note)
        kemi._note_branch(note)          # relayed (stop 39: noted only then, review 117)
    return taken


def test_hole_a_mark_minted_by_another_transaction_vouches_for_alices_200(fake_ksr):
    fake, kemi = fake_ksr
    # fixed (stop 35): the hop's INVITE with her Via under CSeq 51 is refused 482 at the
    # door, never relayed, so no mark is made for her Via; nor in other letters
    assert _door_refuses(fake, kemi, ALICES_VIA, 51)
    assert _door_refuses(fake, kemi, ALICES_VIA.replace("ua94x1", "UA94X1"), 51)
    assert not _door_refuses(fake, kemi, ALICES_VIA, 1)      # her own retransmission
    # stop 36: her branch last behind one of the hop's is hers to tm and pjsip
    doubled = ALICES_VIA.replace("branch=", "branch=z9hG4bK-hop36;branch=")
    assert _door_refuses(fake, kemi, doubled, 51)


def test_hole_a_mark_minted_for_the_hops_via_steers_a_stray_to_alices_address(fake_ksr):
    """The Via below ours in the stray names the hop's sent-by with alice's address in
    ``received`` and ``rport``: Kamailio sends a reply to ``received``/``rport`` (RFC 3581),
    the MAC never reads them.  The hop's own request needs nothing of alice's Via but the
    branch (pjsip matches the 200 by branch)."""
    fake, kemi = fake_ksr
    request_via = HOPS_VIA.replace("hop94", "ua94x1")
    minted = _mint(fake, kemi, request_via)
    steered = request_via.replace(";rport", ";rport=40001;received=192.0.2.9")
    our_via = OUR_VIA.replace("p.0", "p.x") + f";{UNROUTED_MARK}={minted}"
    values = {"$rm": "INVITE", "$rs": 200, "$ci": CALL, "$hdrc(Via)": 2,
              "$(hdr(Via)[0])": our_via, "$(hdr(Via)[1])": steered}
    fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)
    fake.tm = types.SimpleNamespace(t_check_trans=lambda: -1)
    node = types.SimpleNamespace(app=types.SimpleNamespace(
        routes=ROUTES, config=types.SimpleNamespace(dispatcher=None)))
    # fixed (stop 35) at the door: the hop's request carries alice's branch (what her
    # stack matches the 200 by), which her INVITE holds: refused 482, never marked
    assert _door_refuses(fake, kemi, request_via, 51)


def test_what_the_targets_keep_grows_only_with_the_invites_relayed(fake_ksr):
    """My own (stop 35): every forged stray 2xx to one's own record-routed INVITE, each
    with a made-up To tag, passes the Record-Route checks (the MAC binds no To tag); had
    each noted a dialog's targets for 12 h, one INVITE would keep as many as strays sent.
    Only the first 2xx of an INVITE the proxy relayed binds its dialog."""
    fake, kemi = fake_ksr
    table = _fake_htable(fake)
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=object()))
    invite = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$ci": "r94-grow@x", "$ft": "a1",
              "$hdr(Contact)": "<sip:alice@127.0.0.1:5061>"}
    fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
    kemi.kamailio.note_caller_target(node)
    for n in range(20):
        answer = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$ci": "r94-grow@x", "$ft": "a1",
                  "$tt": f"fork{n}", "$hdr(Contact)": f"<sip:x{n}@203.0.113.66:5999>"}
        fake.pv = types.SimpleNamespace(get=answer.get, seti=answer.__setitem__)
        kemi.kamailio.note_dialog_targets(node, stray=True)
    assert len(table) == 2                 # the caller's target and one dialog
    # a stray 2xx for a dialog whose INVITE the proxy never relayed notes nothing
    stranger = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$ci": "elsewhere@x", "$ft": "z1",
                "$tt": "z2", "$hdr(Contact)": "<sip:z@203.0.113.66:5999>"}
    fake.pv = types.SimpleNamespace(get=stranger.get, seti=stranger.__setitem__)
    kemi.kamailio.note_dialog_targets(node, stray=True)
    assert len(table) == 2
