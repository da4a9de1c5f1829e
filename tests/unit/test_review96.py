"""A ninety-sixth attacker's review (December 2026) of d91b4b5: stop 35's newest proxy
fixes (reviews 94, 95) - a BYE's 2xx ends a dialog's keys only when its Request-URI is
the other party's remote target (htable ``e2mtargets``: ``kemi.note_caller_target``,
``note_dialog_targets``, ``end_answered_dialog``); a request under an RFC 3261 branch
another live request holds is refused 482 (``kemi._branch_taken``, htable
``e2mbranch``); the ``;e2mnr=`` Via mark; the door's 400 Bad Record-Route - fresh eyes,
modelled here on ``kamailio_app.kemi`` with a stand-in ``KSR`` (as
``tests/unit/test_review94.py`` does).  The same holes on a real Kamailio 5.6:
``tests/kamailio/test_review96_wire.py``.

``test_hole_*`` xfail strictly on d91b4b5 (their assertion is the secure behaviour);
``test_control_*`` pass and show the set-up is sound.

Hole 1 (``test_hole_a_bye_to_the_target_sent_elsewhere_ends_the_dialog``; wire:
``test_hole_a_bye_to_the_peers_target_routed_past_us_ends_the_live_calls_keys``).
Attacker: an **untrusted hop** on either leg (it read alice's INVITE - her Contact, our
Record-Route entry with its token - and the 200's To tag); no credentials, even with
``[auth]``: the BYE's From is a URI not ours, in a dialog (``route_auth``).  Also an
**insider UA** (alice herself, hiding bob's later answers from the archive).
Messages: in alice's live call with bob (bob's 200 read under her offer key, the
dialog's keys held: 2 records), a bare ``BYE sip:alice@127.0.0.1:5061`` (alice's own
Contact: the very target review 94's fix wants for a BYE from bob's side) with From
``sip:anyone@hop.example.net;tag=<bob's tag>``, To alice's tag, ``Route: <our entry>,
<sip:x@hop;lr>``.  ``loose_route`` takes ours off and relays the BYE to the next Route
entry, the hop's UAS, which answers 200; alice and bob never see it.  Effect:
``end_answered_dialog`` compares the Request-URI as received (``$T_req($ou)``) with the
noted target, equal, and ends the dialog's keys (2 -> 0); alice's next re-INVITE under
the dialog key gets 496 from her own proxy, bob's answers go unread (no archive row, no
media line) - review 94's hole 1 back.  At fault: ``kamailio_app/kemi.py`` line 1444
(``if _target(KSR.pv.get("$T_req($ou)"), contact=False) != peer``): the Request-URI is
where a BYE says it goes, not where it went; ``route_in_dialog`` (``loose_route`` line
991, relayed line 1013) relays an in-dialog request along any Route past ours.  Fix:
end the keys only when the BYE went where the target names: its destination as
relayed (``$T_req($du)`` empty, or the next Route entry being one the dialog's route
set had - note the route set beyond us on each side at the 2xx with the targets, and
compare the BYE's remaining Route with the other side's), else nothing.

Hole 2 (``test_hole_a_display_name_holding_a_uri_is_read_as_the_target``; wire:
``test_hole_a_display_name_holding_a_uri_is_noted_as_the_target``).  Attacker: an
**insider UA** (alice, the caller; or bob, the callee, with his 2xx's Contact), or an
untrusted hop on her leg.  Messages: alice's INVITE with ``Contact: "<sip:x@hop>"
<sip:alice@127.0.0.1:5061>`` (a quoted display name may hold ``<`` and ``>``, RFC 3261
25.1); every SIP stack (Kamailio, pjsip, bob's phone) takes ``sip:alice@...:5061`` as
her target, but ``_target`` cuts at the first ``<``, inside the quotes, and notes
``sip:x@hop``.  Then the hop form's BYE (From bob's tag, a URI not ours) with
``Request-URI sip:x@hop`` and only our Route entry: relayed to the hop's UAS, 200 there.
Effect: the noted target matches, the live call's keys go (2 -> 0), alice's re-INVITE
gets 496; and bob's own honest BYE (to her real Contact) would end nothing, so the keys
outlive the call by 12 h.  At fault: ``kemi._target`` line 427 (``entry.index("<")``
ignores quoted strings).  Fix: parse the Contact as a name-addr with the core's
parser (``e2m_plugins`` ``parse_address``, which skips the quoted display name), or
take the target as Kamailio reads it (``$(ct{tobody.uri})``/``$ct`` parsed by
``parse_contact``).

Hole 3 (``test_hole_a_decoy_branch_first_hides_alices_branch_from_the_door``; wire:
``test_hole_a_decoy_branch_first_gets_a_mark_for_alices_transaction``).  Attacker: an
**untrusted hop** on bob's leg (it sees alice's INVITE as we relay it: her Via below
ours, our Record-Route entry with the token and her From tag).  Messages: review 94's
hole 2 with one change: the hop's in-dialog INVITE (alice's Call-ID, her From tag as To
tag, our entry as Route, CSeq 51) carries alice's Via with a branch of its own put
before hers - ``...;rport;branch=z9hG4bK-decoy96;branch=<alice's>``.  The door reads the
first ``branch`` (a new one: noted, not refused), the proxy relays the INVITE and writes
``;e2mnr=MAC(Call-ID, that Via)`` on its own Via; then bob's 200 stripped of
Record-Route, our branch changed (a stray), the mark added and the same doubled Via as
the Via below ours.  pjsip's parser keeps the *last* ``branch`` of a Via
(``int_parse_via_param`` sets ``branch_param`` for each), so alice's stack reads her own
INVITE's branch.  Effect: ``record_routed_here`` takes the stray for a re-INVITE's late
2xx and relays it: alice's route set is empty, her dialog goes to the hop's Contact
past the proxy (review 88's hole back; seen on the wire with bob's 200 reaching her).
Variants the door reads the same way: a quoted generic parameter holding
``;branch=z9hG4bK...`` before hers (the door splits on every ``;``), and an empty
``branch=`` first (the door sees no RFC 3261 branch, pjsip skips an empty one).  At
fault: ``kemi._branch_taken`` lines 449-451 (the first ``branch``, a naive split on
``;``).  Fix: refuse (400) a Via entry with more than one ``branch`` parameter, or an
empty one, at the door (RFC 3261 allows one), and read the parameters with the core's
quoted-string aware parser; the mark should name our own branch (review 94's advice).

Hole 4 (``test_hole_a_keyless_call_keeps_its_targets_12_hours``; wire:
``test_hole_every_keyless_call_keeps_two_targets_for_12_hours``).  Attacker: an
**insider UA** (any user of ours, digest proved), or anyone at all when the proxy runs
without ``[auth]``.  Messages: plain-SDP INVITEs from one address, one per second or
faster (pike's default allows 30 requests per 2 s), each with a new Call-ID and From
tag, to the attacker's own UAS, which answers each 200 (Record-Route copied back); no
ACK, no BYE.  Effect: every such call holds no key at the proxy (nothing a BYE would
ever end), yet leaves two ``e2mtargets`` entries for 12 h (``note_caller_target`` then
``note_dialog_targets``: ``_DIALOG_TARGET`` 43200 s), with no per-user or per-source
bound (the key cache's quotas do not cover this table): 20 calls, 40 entries, on the
wire.  Measured on the wire (300 such calls, pike off, after tm's transactions ended):
about 0.2 KiB of shared memory per entry, about 0.45 KiB per call; at pike's default
rate (15 INVITEs/s from one address) the table holds 648,000 calls after 12 h, some
290 MB: past the default ``[kamailio] shm_mb`` 256 from a single address (two
addresses: half the time), after which tm cannot open a transaction and every call
through the proxy fails.  At fault: ``kamailio_app/kemi.py`` ``note_dialog_targets``
lines 1412-1415 (``sht_setxs(..., _DIALOG_TARGET)`` for every first 2xx) and
``note_caller_target`` line 1388; the cfg's ``e2mtargets`` has no size bound.  Fix:
keep a dialog's targets with its keys, not beside them - in the key cache's dialog
record (its TTL and its keeper's quota), or note them only when the engine holds keys
for the dialog (and again when a re-INVITE puts keys there), so a keyless call keeps
only the 64 s caller entry; and cap what one caller (digest user, else source
address) may hold in ``e2mtargets``, as ``e2mregs`` caps registrations.

What held (run here or on the wire, or read):

- review 94's own forms: a BYE to the attacker's UAS as Request-URI ends nothing (wire
  ``test_control_review_94s_form_ends_nothing``), a non-2xx there neither; alice's
  very Via under another CSeq is 482 (``test_control_alices_branch_as_written_is_refused_482``);
- a BYE whose Request-URI carries ``;maddr=<hop>`` (same user, host and port as the
  target: ``_target`` ignores parameters): Kamailio 5.6 sent it to the host, not to
  maddr (408, nothing at the hop); ``;transport=tcp`` reaches the same host and port;
- sipsak (``-T``, ``-F``, OPTIONS, REGISTER with digest) and SIPp's stock scenarios make
  a new branch per CSeq: no honest 482 (``test_stock_clients_wire.py`` passes); SIPp's
  ``[branch]`` is predictable (pid, call number, message index), but an off-path
  sender must still beat the client's request to the door and learn nothing of a real
  phone's (pjsip: random GUIDs);
- ``e2mbranch`` grows per request, not per call, but each entry goes in 64 s, within
  pike's rate (as tm's transactions do: a known limit); an unanswered INVITE's caller
  target lasts 64 s; a stray 2xx can make it 12 h only with our Record-Route entry,
  whose MAC the caller gets only when the INVITE was relayed (hole 4 is the cheaper
  way to the same);
- a hop racing a forged first 2xx (another To tag) binds the INVITE's one dialog, so
  the real dialog's BYE ends nothing and its keys go at their expiry: the stated "a
  later fork's keys expire" limit, not reported again;
- not testable as a fix of hole 1 and noted for the fixers: a hop on the leg *towards*
  the target can answer the BYE itself (200) and never pass it on; no Request-URI or
  Route check tells that 2xx from the target's own.  Only an answer the proxy can
  attribute (over the target's own TLS connection, or signed) would;
- on a cluster (``tests/cluster/test_review96_cluster.py``, run): the targets noted at
  node A are on node B within moments (DMQ), and the call's own BYE through B ends the
  keys and the targets on both nodes;
- ``_target``'s compare folds scheme and host case (``host_key``) and drops URI
  parameters, so a Contact in odd case or with ``;ob``/``;transport`` matches the
  BYE that pjsip sends to it.

Fixed (stop 36): hole 1.  Beside the targets (the same ``e2mtargets`` records, the same
lifetimes, replicated over DMQ as before) the proxy notes each side of the dialog's route
set as a digest of its URIs as written, case folded: the caller's, the Record-Route the
INVITE reached us with (``note_caller_target``), the callee's, the 2xx's entries above
ours, reversed (``note_dialog_targets``).  In the request route, after ``loose_route``,
``kemi.note_bye_way`` marks a BYE as going the dialog's way (``$avp(e2m_bye_way)``, which
tm keeps for the reply route) only when the Route past the one or two entries
``loose_route`` took off (ours, with our token; a double Record-Route's ``r2``) is the
other party's side and its next hop (``$du``) is the first of those, or there are none
and no destination is set; ``end_answered_dialog`` ends keys only with that mark and
the Request-URI check as before.  An entry the checks cannot read is not the dialog's
way (keys left to their expiry).  The hop's BYE here carries a Route entry past ours
that alice's side never had: its 200 ends nothing.  The unit model now runs the BYE's
request route (``test_review94._bye_request``) and gives the 2xx our Record-Route
entry.  (Hole 4 is fixed too: a dialog's targets are kept 12 h only when the engine
holds keys for it, ``ProxyEngine.holds_dialog_keys``, asked once the 2xx was read; a
keyless call's 64 s caller entry goes at its 2xx.)  Not fixed: a hop on the leg toward
the target answering the BYE itself (above).

Fixed (stop 36): hole 2, ``kemi._target`` reads the Contact with the core's name-addr
parser (``parse_address``), which skips a quoted display name; hole 3, the door reads
the branch tm reads (``$via0(branch)``, a Via's last ``branch`` parameter, as pjsip
reads it), so the decoy, quoted and empty forms are all refused 482 (the unit model's
stand-in Kamailio answers ``$via0(branch)`` as Kamailio's Via parser does).  Since
review 98's fix the hop's in-dialog requests are written From bob (the token binds the
dialog's parties).
"""

from __future__ import annotations

import re
import types

import pytest

from e2m_plugins.testpki import init_test_pki
from e2m_lab.flows import TRUSTED

from tests.unit.test_review92 import _call_through_the_proxy
from tests.unit.test_review94 import (ROUTES, _bye_request, _fake_htable, _our_entry,  # noqa: F401
                                      _via0_branch, _ends, fake_ksr)  # fake_ksr: a fixture

ALICES_TARGET = "sip:alice@127.0.0.1:5061"
BOBS_TARGET = "sip:bob@127.0.0.1:5062"
HOP_UAS = "sip:x@203.0.113.66:5999"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")




# -- hole 1: a BYE with the right Request-URI, relayed elsewhere ------------------------------

def _bye_answered(fake, kemi, proxy, *, ruri: str, dst: str, caller_contact: str
                  = f"<{ALICES_TARGET}>", tags=("b1", "a1")) -> None:
    """The dialog's targets noted (alice's INVITE, bob's 2xx), then a 200 to a BYE we
    relayed with Request-URI ``ruri`` to ``dst`` ($du: the next Route entry after ours;
    "" when it followed its Request-URI).  ``tags``: (From, To) of the BYE."""
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=proxy, routes=ROUTES))
    _fake_htable(fake)
    invite = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$ci": "r96-bye@x", "$ft": "a1",
              "$hdr(Contact)": caller_contact}
    fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
    kemi.kamailio.note_caller_target(node)
    ok = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$T_req($tt)": "", "$avp(e2m_target_mine)": invite.get("$avp(e2m_target_mine)"), "$ci": "r96-bye@x", "$ft": "a1",
          "$tt": "b1", "$hdr(Contact)": f"<{BOBS_TARGET}>", "$hdrc(Record-Route)": 1,
          "$(hdr(Record-Route)[0])": _our_entry("r96-bye@x")}
    fake.pv = types.SimpleNamespace(get=ok.get, seti=ok.__setitem__)
    kemi.kamailio.note_dialog_targets(node)
    avps = _bye_request(fake, kemi, node, "r96-bye@x", tags, dst)    # the request route
    bye = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "BYE", "$rs": 200, "$T_req($ci)": "r96-bye@x", "$T_req($ft)": tags[0],
           "$T_req($tt)": tags[1], "$T_req($ou)": ruri, "$T_req($ru)": ruri,
           "$T_req($du)": dst, "$ru": ruri, "$du": dst, **avps}
    fake.pv = types.SimpleNamespace(get=bye.get, seti=bye.__setitem__)
    kemi.kamailio.end_answered_dialog(node)


def test_control_bobs_bye_to_alices_target_ends_the_keys(world, fake_ksr):
    """The honest BYE from bob's side goes where alice's target names (no Route past
    ours) and its 200 ends the dialog's keys: what a fix must keep."""
    fake, kemi = fake_ksr
    proxy, _, _ = _call_through_the_proxy(world, "r96-bye@x")
    assert len(proxy.cache)
    _bye_answered(fake, kemi, proxy, ruri=ALICES_TARGET, dst="")
    assert len(proxy.cache) == 0


def test_control_a_bye_to_the_hops_uas_as_request_uri_ends_nothing(world, fake_ksr):
    fake, kemi = fake_ksr
    proxy, _, _ = _call_through_the_proxy(world, "r96-bye@x")
    before = len(proxy.cache)
    _bye_answered(fake, kemi, proxy, ruri=HOP_UAS, dst="")
    assert len(proxy.cache) == before


def test_hole_a_bye_to_the_target_sent_elsewhere_ends_the_dialog(world, fake_ksr):
    fake, kemi = fake_ksr
    proxy, _, _ = _call_through_the_proxy(world, "r96-bye@x")
    before = len(proxy.cache)
    _bye_answered(fake, kemi, proxy, ruri=ALICES_TARGET, dst="sip:x@203.0.113.66:5999;lr")
    assert len(proxy.cache) == before, "the live call's keys went at the hop's 200"


def _goes_the_dialogs_way(fake, kemi, *, invite_rr=(), ok_rr=(), bye_tags=("b1", "a1"),
                          route=(), du="") -> bool:
    """Stop 36: the route set noted at alice's INVITE (``invite_rr``: the Record-Route it
    reached us with) and bob's 2xx (``ok_rr``, ours in it), then ``kemi.note_bye_way``
    for a BYE with ``bye_tags`` whose Route is ``route`` and whose destination after
    ``loose_route`` is ``du``: whether it is marked as going the dialog's way."""
    _fake_htable(fake)
    engine = types.SimpleNamespace(holds_dialog_keys=lambda *ids: True)
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=engine, routes=ROUTES))

    def headers(name, values):
        return {f"$hdrc({name})": len(values),
                **{f"$(hdr({name})[{i}])": v for i, v in enumerate(values)}}
    invite = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$ci": "r96-way@x", "$ft": "a1",
              "$hdr(Contact)": f"<{ALICES_TARGET}>", **headers("Record-Route", list(invite_rr))}
    fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
    kemi.kamailio.note_caller_target(node)
    ok = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$T_req($tt)": "", "$avp(e2m_target_mine)": invite.get("$avp(e2m_target_mine)"), "$ci": "r96-way@x", "$ft": "a1",
          "$tt": "b1", "$hdr(Contact)": f"<{BOBS_TARGET}>", **headers("Record-Route", list(ok_rr))}
    fake.pv = types.SimpleNamespace(get=ok.get, seti=ok.__setitem__)
    kemi.kamailio.note_dialog_targets(node)
    bye = {**_ends(bye_tags), "$rm": "BYE", "$ci": "r96-way@x", "$ft": bye_tags[0], "$tt": bye_tags[1], "$du": du,
           **headers("Route", list(route))}
    avps: dict = {}
    fake.pv = types.SimpleNamespace(get=bye.get, seti=avps.__setitem__)
    kemi.kamailio.note_bye_way(node)
    return bool(avps)


OURS = _our_entry("r96-way@x")
P0 = "<sip:p0.example.net;lr>"          # a proxy on alice's side (her outbound proxy)
P2 = "<sip:p2.example.net;lr>"          # a proxy on bob's side (his domain's)


def test_control_honest_byes_go_the_dialogs_way(fake_ksr):
    """Stop 36: what the fix must keep: the plain call either way; a proxy before ours on
    alice's side and one after ours on bob's (a chain), in the order each side's route
    set has them, the URIs as a UA may reprint them; a double Record-Route (ours twice,
    ``r2``), which ``loose_route`` takes off whole."""
    fake, kemi = fake_ksr
    assert _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], route=[OURS])
    assert _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], bye_tags=("a1", "b1"), route=[OURS])
    chain = dict(invite_rr=[P0], ok_rr=[f"{P2}, {OURS}", P0])
    assert _goes_the_dialogs_way(fake, kemi, **chain, route=[OURS, P0],
                                 du="sip:p0.example.net;lr")                  # bob's BYE
    assert _goes_the_dialogs_way(fake, kemi, **chain, bye_tags=("a1", "b1"),
                                 route=[f"{OURS}, <SIP:P2.example.net;LR>"],
                                 du="SIP:P2.example.net;LR")                  # alice's
    first, second = (OURS.replace(";lr", f";{t};r2=on;lr") for t in ("transport=tcp", "x=1"))
    double = dict(ok_rr=[second, first])
    assert _goes_the_dialogs_way(fake, kemi, **double, bye_tags=("a1", "b1"),
                                 route=[first, second])


def test_control_byes_past_the_route_set_go_nowhere_marked(fake_ksr):
    """Stop 36: a Route entry past ours the dialog's side never had, one left out, the
    sides swapped, or a destination other than the next entry: not the dialog's way."""
    fake, kemi = fake_ksr
    hop = f"<{HOP_UAS};lr>"
    chain = dict(invite_rr=[P0], ok_rr=[P2, OURS, P0])
    assert not _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], route=[OURS, hop],
                                     du=HOP_UAS + ";lr")
    assert not _goes_the_dialogs_way(fake, kemi, **chain, route=[OURS, P0, hop],
                                     du="sip:p0.example.net;lr")
    assert not _goes_the_dialogs_way(fake, kemi, **chain, route=[OURS])
    assert not _goes_the_dialogs_way(fake, kemi, **chain, route=[OURS, P2],
                                     du="sip:p2.example.net;lr")        # bob's BYE to bob's side
    assert not _goes_the_dialogs_way(fake, kemi, **chain, route=[OURS, P0], du=HOP_UAS)
    assert not _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], route=[OURS], du=HOP_UAS)
    # our entry with r2 put on by the sender: loose_route takes the next entry off too;
    # marked only when nothing is left and no destination set (it goes to the target)
    r2 = OURS.replace(";lr", ";r2=on;lr")
    assert _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], route=[r2, hop])
    assert not _goes_the_dialogs_way(fake, kemi, ok_rr=[OURS], route=[r2, hop],
                                     du=HOP_UAS + ";lr")
    # a 2xx without our entry: the callee's side unread, alice's BYE ends nothing
    assert not _goes_the_dialogs_way(fake, kemi, ok_rr=[P2], bye_tags=("a1", "b1"),
                                     route=[OURS, P2], du="sip:p2.example.net;lr")


# -- hole 2: a display name holding a URI ------------------------------------------------

def test_control_display_names_keep_the_target(fake_ksr):
    """A plain display name, one with a comma or an escaped quote, and a bare addr-spec
    with parameters all name alice's target, as every stack reads them."""
    _, kemi = fake_ksr
    want = kemi._target(f"<{ALICES_TARGET}>")
    assert want == kemi._target(ALICES_TARGET, contact=False)
    for contact in (f'"alice" <{ALICES_TARGET}>', f'"Smith, Alice" <{ALICES_TARGET};ob>',
                    f'"a \\"b\\" c" <{ALICES_TARGET}>', f"{ALICES_TARGET};expires=60",
                    f"<SIP:alice@127.0.0.1:5061;transport=udp>"):
        assert kemi._target(contact) == want, contact


def test_hole_a_display_name_holding_a_uri_is_read_as_the_target(world, fake_ksr):
    fake, kemi = fake_ksr
    odd = f'"<{HOP_UAS}>" <{ALICES_TARGET}>'
    proxy, _, _ = _call_through_the_proxy(world, "r96-bye@x")
    before = len(proxy.cache)
    _bye_answered(fake, kemi, proxy, ruri=HOP_UAS, dst="", caller_contact=odd)
    assert kemi._target(odd) == kemi._target(f"<{ALICES_TARGET}>"), "another target noted"
    assert len(proxy.cache) == before, "the live call's keys went at the hop's 200"


# -- hole 3: the door reads the first branch, the stacks the last ----------------------------

CALL = "c96@example.com"
ALICES_VIA = "SIP/2.0/TLS 192.0.2.10:5061;rport;branch=z9hG4bK-ua96x1"


def _door_refuses(fake, kemi, via: str, cseq: int) -> bool:
    """``kemi._branch_taken``: alice's INVITE (CSeq 1, her Via) noted first, then the
    hop's INVITE with ``via`` and ``cseq``."""
    _fake_htable(fake)
    taken = False
    for value in ((ALICES_VIA, 1), (via, cseq)):
        values = {"$ci": CALL, "$cs": value[1], "$rm": "INVITE", "$(hdr(Via)[0])": value[0],
                  "$via0(branch)": _via0_branch(value[0])}
        fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)
        note = kemi._branch_note()
        taken = kemi._branch_taken(note)
        kemi._note_branch(note)          # relayed (stop 39: noted only then, review 117)
    return taken


def _stack_branch(via: str) -> str:
    """The branch a Via names to pjsip (and Kamailio's own parser): the last non-empty
    ``branch`` parameter, quoted strings skipped."""
    params = re.sub(r'"(?:[^"\\]|\\.)*"', '""', via).split(";")[1:]
    found = [v.strip() for n, _, v in (p.partition("=") for p in params)
             if n.strip().lower() == "branch" and v.strip()]
    return found[-1]


VARIANTS = {
    "decoy-first": ALICES_VIA.replace(";branch=", ";branch=z9hG4bK-decoy96;branch="),
    "quoted-param": ALICES_VIA.replace(";branch=", ';x="a;branch=z9hG4bK-decoy96";branch='),
    "empty-first": ALICES_VIA.replace(";branch=", ";branch=;branch="),
}


def test_control_alices_via_as_written_is_refused(fake_ksr):
    fake, kemi = fake_ksr
    assert _door_refuses(fake, kemi, ALICES_VIA, 51)
    assert _door_refuses(fake, kemi, ALICES_VIA.replace("ua96x1", "UA96X1"), 51)
    assert not _door_refuses(fake, kemi, ALICES_VIA, 1)      # her own retransmission
    for via in VARIANTS.values():                           # each names her branch
        assert _stack_branch(via) == "z9hG4bK-ua96x1", via


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hole_a_decoy_branch_first_hides_alices_branch_from_the_door(fake_ksr, variant):
    fake, kemi = fake_ksr
    assert _door_refuses(fake, kemi, VARIANTS[variant], 51), \
        "the hop's INVITE naming alice's branch to her stack passes the door"


# -- hole 4: 12 h of targets for a call that holds no key ----------------------------------

def _ttls(fake, kemi, answered: bool) -> dict:
    """The e2mtargets entries and their lifetimes after a plain INVITE we record-routed
    (and, ``answered``, its first 2xx), with an engine whose key cache holds nothing."""
    ttls: dict = {}
    table: dict = {}
    fake.htable = types.SimpleNamespace(
        sht_get=lambda name, key: table.get((name, key)),
        sht_setxs=lambda name, key, value, ttl: (table.__setitem__((name, key), value),
                                                 ttls.__setitem__(key, ttl), 1)[-1],
        sht_setex=lambda name, key, ttl: (ttls.__setitem__(key, ttl), 1)[-1],
        sht_rm=lambda name, key: table.pop((name, key), None))
    # stop 36: the engine says whether it holds the dialog's keys (here: none)
    engine = types.SimpleNamespace(holds_dialog_keys=lambda call_id, tag, other: False)
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=engine))
    invite = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$ci": "r96-grow@x", "$ft": "e1",
              "$hdr(Contact)": "<sip:eve@203.0.113.7:5060>"}
    fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
    kemi.kamailio.note_caller_target(node)
    if answered:
        ok = {"$fu": "sip:alice@example.com", "$tu": "sip:bob@example.com", "$rm": "INVITE", "$rs": 200, "$T_req($tt)": "", "$avp(e2m_target_mine)": invite.get("$avp(e2m_target_mine)"), "$ci": "r96-grow@x",
              "$ft": "e1", "$tt": "s1", "$hdr(Contact)": "<sip:sink@203.0.113.7:5999>"}
        fake.pv = types.SimpleNamespace(get=ok.get, seti=ok.__setitem__)
        kemi.kamailio.note_dialog_targets(node)
    return ttls


def test_control_an_unanswered_invite_keeps_its_target_64_seconds(fake_ksr):
    fake, kemi = fake_ksr
    assert sorted(_ttls(fake, kemi, answered=False).values()) == [64]


def test_hole_a_keyless_call_keeps_its_targets_12_hours(fake_ksr):
    fake, kemi = fake_ksr
    ttls = _ttls(fake, kemi, answered=True)
    # stop 36: only the caller's 64 s entry was ever set, and it goes at the keyless
    # 2xx (nothing for a BYE to end; the wire test counts no entry left), so the
    # review's "the caller's and the dialog's" count (2) is now 1
    assert len(ttls) == 1                                # the caller's only
    assert max(ttls.values()) <= 64, f"targets kept {max(ttls.values())} s for a dialog " \
                                     "holding no key"
