"""A ninety-ninth attacker's review (December 2026) of af54be7: stop 36's proxy fixes
(reviews 96 and 98), fresh eyes: the core half.  The wire half, with the effects on a
real Kamailio (archive rows in another user's name), the messages and the lists of what
held: ``tests/kamailio/test_review99_wire.py``.

Hole 1, the token half (``test_hole_the_callers_tag_admits_the_parties_swapped``):
**off-path sender** or **insider UA**.  ``dialog_parties`` sorts the From and To AoRs
(dialog_route.py:92, ``first, second = sorted(named)``) so that the callee's requests
(From and To swapped, and its tags with them) carry the caller's token; and ``admits``
(dialog_route.py:191-203) takes the token of *any* of the request's tags with that
sorted pair.  So a request of the caller's (the caller's tag in From) written "From
bob, To eve" fits the token eve's INVITE to bob was given: the dialog's ACK, never
challenged, is read and archived under bob's From.  Fix: bind the order to the tag: the
token over (caller's AoR, callee's AoR); a request whose From tag is the caller's tag
is admitted only as From caller / To callee, one whose To tag is it only as From callee
/ To caller.  (The wire form with the tags swapped too, an ACK "from bob's side" when
bob sent no re-INVITE, needs the ACK tied to an INVITE the proxy relayed: see the wire
module.)

Hole 2 (``test_hole_targets_outlive_the_keys_that_justified_them``): **insider UA**
(mallory, her own password and certificate).  Review 96 hole 4's fix notes a dialog's
targets in ``e2mtargets`` for 12 h only when the engine holds keys for the dialog at
its 2xx (``kemi.note_dialog_targets``, kemi.py:1531-1548: ``_holds_keys`` then
``sht_setxs(..., _DIALOG_TARGET)``), but nothing ties the entries to those keys after
that: the keys live under mallory's keeper quota (``MemoryKeyCache``/``HtableKeyCache``:
past it her oldest key goes) or a lifetime she asks for, the targets 12 h whatever
becomes of them.  Messages: INVITEs from mallory (digest proved) to her own UAS, each
body a signed envelope for the proxy offering a CEK to keep (RFC 3185 reuse; her own
certificate), each answered 200; no ACK, no BYE.  Effect: each call's key pushes her
oldest out (the cache holds 4 of 40 in the model; the product's quota on the wire),
yet every call keeps its two ``e2mtargets`` entries 12 h: the table grows with the
calls again (review 96 measured 0.45 KiB a call, past ``shm_mb`` 256 at pike's rate
from one address in 12 h), exactly the state hole 4 was to bound.  Fix: keep a
dialog's targets in its key-cache record (its TTL, its keeper's quota: an evicted or
expired key takes them along, as review 96 proposed first), or give the entry the
dialog key's own remaining lifetime and drop it in the cache's eviction; and cap
``e2mtargets`` per caller (digest user, else source address).

Finding 3 (``test_hole_dialog_parties_refuses_a_bare_uri_with_a_user_flag``): an
honest flow broken, no attacker: ``dialog_parties`` (dialog_route.py:81) reads the bare
URI Kamailio's ``$fu``/``$tu`` give with ``parse_address``, as a name-addr, so a user
part holding ``;npdi`` (RFC 4694) is a malformed header parameter: None, and the
gateway's INVITE is 400 at ``record_route`` though the door and the core read it (wire:
``test_hole_a_gateways_number_portability_flag_is_refused_400``).  Fix: the scheme from
the URI text, or ``parse_address("<" + uri + ">")``.

Controls: the honest forms are admitted (the caller's requests; the callee's, tags and
URIs swapped; AoR spellings the core reads alike); review 98's "From alice" is refused.

Control of hole 2: calls within the quota keep their targets (a BYE can end them);
keyless calls keep none (review 96 hole 4's fix holds as far as it goes).

Tried and held: ``%61``-escaped users, host case, ports, ``user=phone``, ``sips:``,
display names and URI parameters all read by ``identity_of`` as the engine and the
archive read them (one party); ``tel:`` with parameters in other case (one party);
``tel:`` vs ``sip:...;user=phone`` (two parties: refused, as the stacks keep From and To
as written, an honest UA never switches); the BYE-way helpers: ``;r2`` added by a hop to
our entry leaves a Route past it that matches only if ``loose_route`` chose its first
entry (``same_route_uri``), a destination elsewhere is not the dialog's way.

Fixed (stop 36): hole 1, the token binds the parties in the caller's order
(``RouteTokens.side``: a request with the caller's tag in From must be From the caller,
one with it in To From the callee), so form ``uris`` fits no token; a callee-side ACK
(form ``tags``: the shape of an ACK after a re-INVITE of the callee's, which the proxy
cannot tie to a challenged request) is read but archived under no one, and so is any
CANCEL (hole 2: tm matches a CANCEL to its INVITE whatever its From says; it is never
challenged and carries no offer or answer).  Finding 3: ``dialog_parties`` reads a bare
URI (``$fu``) as a URI, its ``;npdi`` user part included.  Hole 3 was left a known
limit that stop (a strict xfail).

Fixed (stop 37): hole 3 (here "hole 2"), a keyed dialog's targets go with its keys: the
shared key cache tells ``dialog_targets.forgetter`` of each scope whose record it
removed (``HtableKeyCache(gone=...)``: its last key spent or expired at a sweep, the
keeper's quota, the cache's bound, a BYE), which removes that dialog's two entries; and
they are kept no longer than ``[kamailio] keycache_expire`` (``kemi._targets_life``).
The model now runs the shared cache as ``bootstrap`` builds it (it ran
``MemoryKeyCache``, which no Kamailio uses); with ``gone`` left out the hole test fails
as before (checked).
"""

from __future__ import annotations

import types

import pytest

from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import DialogScope
from e2m_plugins.proxy import ProxyEngine
from kamailio_app.dialog_route import (RouteTokens, dialog_parties, double_rr_entry,
                                       route_set_digest, same_route_uri)
from kamailio_app.dialog_targets import forgetter
from kamailio_app.keycache_htable import HtableKeyCache

from tests.unit.test_review94 import fake_ksr  # noqa: F401  (a fixture)

ROUTES = RouteTokens(b"r" * 32)
CALL, EVE_TAG, BOB_TAG = "c99@example.com", "et99", "bt99"
EVE, BOB, ALICE = "sip:eve@other.example.net", "sip:bob@example.com", "sip:alice@example.com"
ROUTE = f"<sip:10.0.0.1:5060;lr{ROUTES.param(CALL, EVE_TAG, [], parties=dialog_parties(EVE, BOB))}>"


def _admits(from_uri: str, to_uri: str, from_tag: str, to_tag: str) -> bool:
    """Whether the proxy routes an in-dialog request so written (``kemi.dialog_routed_here``
    passes the request's own From and To and both its tags)."""
    return ROUTES.admits(CALL, (from_tag, to_tag), [ROUTE], parties=dialog_parties(from_uri, to_uri))


def test_control_the_honest_forms_are_admitted_and_review_98_holds() -> None:
    assert _admits(EVE, BOB, EVE_TAG, BOB_TAG)                 # eve's ACK, re-INVITE
    assert _admits(BOB, EVE, BOB_TAG, EVE_TAG)                 # bob's BYE, re-INVITE
    assert _admits(f"<{EVE}:5060;transport=udp>", "sip:b%6Fb@EXAMPLE.com;user=phone",
                   EVE_TAG, BOB_TAG)                           # spellings the core reads alike
    assert _admits("sips:bob@example.com", EVE, BOB_TAG, EVE_TAG)
    assert not _admits(ALICE, BOB, EVE_TAG, BOB_TAG)           # review 98's fix
    assert not _admits(EVE, ALICE, EVE_TAG, BOB_TAG)
    assert not _admits(BOB, ALICE, BOB_TAG, EVE_TAG)


def test_hole_the_callers_tag_admits_the_parties_swapped() -> None:
    # eve's own ACK (her tag in From, bob's in To) with only the URIs swapped
    assert not _admits(BOB, EVE, EVE_TAG, BOB_TAG)


def test_control_tel_parties() -> None:
    """A call to a number: the number in other case or with its parameters so spelled is
    one party; a sip: URI with user=phone is another (refused, as written)."""
    route = f"<sip:10.0.0.1;lr{ROUTES.param(CALL, EVE_TAG, [], parties=dialog_parties(EVE, 'tel:+1555;phone-context=Example.com'))}>"
    assert ROUTES.admits(CALL, (BOB_TAG, EVE_TAG), [route],
                         parties=dialog_parties("TEL:+1555;Phone-Context=example.COM", EVE))
    assert not ROUTES.admits(CALL, (BOB_TAG, EVE_TAG), [route],
                             parties=dialog_parties("sip:+1555@example.com;user=phone", EVE))


def test_control_bye_way_helpers_follow_what_loose_route_chose() -> None:
    """``;r2`` a hop adds to our entry: the rest past both entries is compared, and its
    first must be the destination loose_route set; a destination elsewhere is not the
    dialog's way; digests of the same entries written in other case are equal."""
    ours = ROUTE[:-1] + ";r2>"
    assert double_rr_entry(ours) and not double_rr_entry(ROUTE)
    side = route_set_digest(["<sip:p2.example.net;lr>"])
    assert route_set_digest(["<SIP:P2.example.net;LR>"]) == side
    assert same_route_uri("<sip:p2.example.net;lr>", "sip:p2.example.net;lr")
    assert not same_route_uri("<sip:p2.example.net;lr>", "sip:hop.example.net;lr")
    assert not same_route_uri("<sip:p2.example.net;lr>", "")


# -- hole 2: a dialog's 12 h targets outlive the keys that justified them ------------------

MALLORY = "sip:mallory@example.com"
_DIALOG_TARGET = 43200


def _keyed_calls(fake, kemi, calls: int, *, keep: bool = True):
    """``calls`` calls record-routed and answered 200, each keeping one key in its
    dialog's scope under mallory's quota of 4 (as her keyed INVITE's offer, moved into
    the dialog at the 2xx, does), through ``note_caller_target`` and
    ``note_dialog_targets`` with an engine that asks the key cache
    (``ProxyEngine.holds_dialog_keys``): the shared one, built as ``bootstrap`` builds
    it (``gone``: ``dialog_targets.forgetter``), sweeping at every put.  Returns
    ({e2mtargets key: TTL} as last set, the key cache)."""
    cache = HtableKeyCache(MemoryHtable(), max_per_keeper=4, sweep_every=1,
                           gone=forgetter(fake))
    ttls: dict = {}
    table: dict = {}
    fake.htable = types.SimpleNamespace(
        sht_get=lambda name, key: table.get((name, key)),
        sht_setxs=lambda name, key, value, ttl: (table.__setitem__((name, key), value),
                                                 ttls.__setitem__(key, ttl), 1)[-1],
        sht_setex=lambda name, key, ttl: (ttls.__setitem__(key, ttl), 1)[-1],
        sht_rm=lambda name, key: (table.pop((name, key), None), ttls.pop(key, None)))
    holder = types.SimpleNamespace(cache=cache)
    engine = types.SimpleNamespace(
        dialog_keys_life=lambda c, t, o: ProxyEngine.dialog_keys_life(holder, c, t, o))
    node = types.SimpleNamespace(app=types.SimpleNamespace(engine=engine))
    for i in range(calls):
        call_id, tag, other = f"r99-{i}@x", f"m{i}", f"u{i}"
        invite = {"$fu": MALLORY, "$tu": "sip:mallory2@example.com", "$rm": "INVITE",
                  "$ci": call_id, "$ft": tag, "$hdr(Contact)": "<sip:m@203.0.113.9:5060>"}
        fake.pv = types.SimpleNamespace(get=invite.get, seti=invite.__setitem__)
        kemi.kamailio.note_caller_target(node)
        if keep:
            cache.put(DialogScope(call_id, tag, other), b"ref-%d" % i, b"k" * 16,
                      keeper=MALLORY)
        ok = {**invite, "$rs": 200, "$T_req($tt)": "", "$tt": other,
              "$hdr(Contact)": "<sip:sink@203.0.113.9:5999>"}
        fake.pv = types.SimpleNamespace(get=ok.get, seti=ok.__setitem__)
        kemi.kamailio.note_dialog_targets(node)
    cache.sweep()
    return ttls, cache


def _twelve_hours(ttls: dict) -> int:
    return sum(1 for key, ttl in ttls.items() if key.startswith("d") and ttl == _DIALOG_TARGET)


def test_control_keyed_calls_within_the_quota_keep_their_targets(fake_ksr):
    """The set-up: a call whose keys the proxy holds keeps its targets 12 h (a BYE can
    end them); a keyless one none (review 96 hole 4's fix)."""
    fake, kemi = fake_ksr
    assert _twelve_hours(_keyed_calls(fake, kemi, 4)[0]) == 4
    assert _twelve_hours(_keyed_calls(fake, kemi, 4, keep=False)[0]) == 0


def test_hole_targets_outlive_the_keys_that_justified_them(fake_ksr):
    fake, kemi = fake_ksr
    ttls, cache = _keyed_calls(fake, kemi, 40)
    held = sum(1 for i in range(40) if cache.holds_scope(DialogScope(f"r99-{i}@x", f"m{i}",
                                                                     f"u{i}")))
    assert held == 4                      # the key cache kept its bound
    assert _twelve_hours(ttls) <= held, \
        f"{_twelve_hours(ttls)} dialogs keep 12 h targets, {held} hold a key"


# -- finding 3: a gateway's number-portability flag refused (honest flow) ------------------

NPDI = "sip:+15551234;npdi@gw.example.net;user=phone"      # RFC 4694 in the user part


def test_control_the_door_and_the_core_read_a_user_part_with_npdi():
    """The door (``_ends_readable``: the From header as a name-addr) and the core read it:
    one AoR, user ``+15551234;npdi``; the bracketed form names the parties."""
    from e2m_plugins.sip import parse_address
    from e2m_plugins.uri import identity_of
    assert identity_of(parse_address(f"<{NPDI}>;tag=g1").uri) is not None
    assert dialog_parties(f"<{NPDI}>", BOB) is not None


def test_hole_dialog_parties_refuses_a_bare_uri_with_a_user_flag():
    # what kemi._dialog_parties passes: $fu / $tu, the URI without brackets
    assert dialog_parties(NPDI, BOB) is not None
