"""A hundred-and-first attacker's review (December 2026) of 640725e: stop 36's dialog
rules on a cluster, behind a front, and with stock clients; the core half.  The wire
half, with the effect on a real Kamailio (an archive row in alice's name):
``tests/kamailio/test_review101_wire.py``.

Hole 1 (``test_hole_the_callees_copy_of_alices_ack_is_archived_as_the_callers``):
**insider UA** as the callee (mallory, or any remote UA alice calls).  The archive
decision for an in-dialog ACK is ``routed_side() == 0`` (kamailio_app/kemi.py:1109,
``inspect_only(archive=self.routed_side() == 0)``; ``routed_side`` kemi.py:1211-1217,
``RouteTokens.side`` dialog_route.py:202-217).  The caller's side of the token is
(Call-ID, caller's tag, From caller, To callee): every input is in the INVITE the callee
received, the token itself in its Record-Route.  So the callee's ACK written as the
caller's (From alice with her tag, To mallory with hers, Route our entry, any body) is
side 0 exactly as alice's own, and ``inspect_only`` archives it under ``from_uri`` alice
(signature none).  Messages: alice's INVITE to mallory (digest proved), mallory's 200,
then mallory's ACK as above, sent from her own address.  Effect: a body alice never
wrote archived in her name.  Fix: the token cannot tell the caller from the callee (both
hold it); archive an ACK under its From only when a verified signature binds it to that
From, or when it comes from the caller's own top Via sent-by / source as noted at her
INVITE (``note_caller_target`` could keep a digest of them), else under no one.

Controls: alice's own ACK is side 0 (archived as hers), the callee's ACK in its own
form (From mallory, tags swapped) side 1 (archived under no one: review 99's fix), an
ACK "From alice" in mallory's own dialog fits no token (review 98's fix).

Tried and held (code read, or run here):
- the door and the token's parties on stock clients' From/To forms: quoted display
  names with ``\\"`` and ``\\\\`` escapes, an unquoted multi-word display name, UTF-8
  display names, ``<sip:...;transport=udp>`` and ``;maddr=``/``?Subject=`` in the URI,
  IPv6 hosts in brackets (``[2001:db8::1]:5060``, ``[::ffff:127.0.0.1]``), ``sips:``,
  a bare ``sip:`` addr-spec with ``;tag=``, a user-less ``sip:127.0.0.1:5060`` (SIPp
  and sipsak forms), ``tel:``, a quoted tag value: the door's ``parse_address`` +
  ``parse_uri`` and ``dialog_parties`` agree (either both read it or both refuse);
  ``test_control_stock_client_from_forms_pass_the_door_and_get_a_token``.
  Not a stock flow, noted only: ``sip:alice:pw@example.com`` (a password, NOT
  RECOMMENDED by RFC 3261 §19.1.1) passes the door but ``dialog_parties`` gives None,
  so such an INVITE is 400 at ``record_route``;
- very long tags: the token and the target names are HMACs/digests, any length;
- a callee that re-INVITEs: its requests are side 1 (From callee, tags swapped), the
  2xx to its re-INVITE has no entry of ours (ours_in with the callee's tag finds none)
  and ``record_routed_here`` is false for it (a To tag): not dropped;
- a double Record-Route (``r2``, UDP->TLS) and the front's entry (``record_route_
  advertised_address``): ``note_dialog_targets`` takes the callee's side above the first
  of ours, ``note_bye_way`` drops both of ours (``double_rr_entry``); a node behind the
  front removes the front's entry as its alias, so ``$du`` is the next route-set entry
  or none, as on a single proxy; the token is keyed alike on every node (same key
  derivation), so node B admits node A's dialogs;
- the BYE's way on node B: ``_dialog_peer`` reads the DMQ-replicated ``e2mtargets``;
  before replication (DMQ delay) or after a restart without sync the BYE's 2xx ends
  nothing and the keys go at their expiry (fail safe, the known limit of review 94's row);
- ``e2mbranch`` per node: the known limit of review 94's row, not re-reported.

Fixed (stop 37): an ACK's bodies are archived from either side (nothing it carries is
lost), and an archive row names the ACK's From only for a body that From signed for this
very ACK (``SeenBody.bound``: a signed SIP context checked against it); any other names
no one (``bootstrap.body_records``).  The token's sides stay what they are (no longer an
archive decision).  The hole tests failed on the product code before (checked) and pass;
the controls now assert an unsigned ACK body archived naming no one, and alice's signed
one named hers.
"""

from __future__ import annotations

import types

import pytest

from e2m_plugins.sip import parse_address
from e2m_plugins.uri import parse_uri
from kamailio_app.dialog_route import RouteTokens, dialog_parties

from tests.unit.test_review94 import fake_ksr  # noqa: F401  (a fixture)

ROUTES = RouteTokens(b"r" * 32)
CALL = "c101@127.0.0.205"
ALICE, MALLORY = "sip:alice@example.com", "sip:mallory@example.com"
ALICES_TAG, MALLORYS_TAG = "a101", "m101"


def _our_entry() -> str:
    """Our Record-Route entry of alice's INVITE to mallory (what mallory received)."""
    parties = dialog_parties(ALICE, MALLORY)
    return f"<sip:127.0.0.1:5060;lr{ROUTES.param(CALL, ALICES_TAG, parties=parties)}>"


def _side(fake, kemi, *, fu: str, tu: str, ft: str, tt: str, si: str):
    """``routed_side`` of an in-dialog ACK (what review 99's fix archived on: side 0
    under its From), the ACK's From/To URIs and tags as given, its Route our entry,
    sent from ``si``."""
    values = {"$ci": CALL, "$ft": ft, "$tt": tt, "$fu": fu, "$tu": tu, "$si": si,
              "$rm": "ACK", "$hdrc(Route)": 1, "$(hdr(Route)[0])": _our_entry()}
    fake.pv = types.SimpleNamespace(get=values.get)
    node = types.SimpleNamespace(app=types.SimpleNamespace(routes=ROUTES),
                                 route_values=lambda: kemi.kamailio.route_values(node))
    return kemi.kamailio.routed_side(node)


def test_control_the_token_gives_the_sides_and_review_98_holds(fake_ksr):
    """The set-up: alice's ACK is side 0 to the token, mallory's own (From her, tags
    swapped) side 1; "From alice" with other parties fits no token (review 98)."""
    fake, kemi = fake_ksr
    assert _side(fake, kemi, fu=ALICE, tu=MALLORY, ft=ALICES_TAG, tt=MALLORYS_TAG,
                 si="127.0.0.205") == 0
    assert _side(fake, kemi, fu=MALLORY, tu=ALICE, ft=MALLORYS_TAG, tt=ALICES_TAG,
                 si="127.0.0.206") == 1
    assert _side(fake, kemi, fu=ALICE, tu="sip:bob@example.com", ft=ALICES_TAG,
                 tt=MALLORYS_TAG, si="127.0.0.206") is None


def _ack_rows(*, bound: bool, method: str = "ACK"):
    """The archive rows ``bootstrap.body_records`` makes for one viewed body of a request
    "From alice" (the callee's copy looks exactly like hers), ``bound``: signed by its
    From for this very request (``SeenBody.bound``)."""
    from e2m_plugins.proxy import SeenBody
    from e2m_plugins.sip import make_request
    from kamailio_app.bootstrap import body_records
    request = make_request(method, "sip:mallory@127.0.0.1:5099", from_uri=ALICE,
                           to_uri=MALLORY, call_id=CALL, cseq=1, from_tag=ALICES_TAG,
                           to_tag=MALLORYS_TAG if method == "ACK" else None)
    seen = [SeenBody(None, "text/plain", b"alice: I approve the transfer", False,
                     "valid" if bound else "none", ALICE if bound else None, bound=bound)]
    return body_records(request, seen)


def test_control_a_bound_ack_body_and_a_challenged_request_name_their_from():
    assert [r.from_uri for r in _ack_rows(bound=True)] == [ALICE]
    # a MESSAGE "From alice" reaches the archive only after her digest (the door)
    assert [r.from_uri for r in _ack_rows(bound=False, method="MESSAGE")] == [ALICE]


def test_hole_the_callees_copy_of_alices_ack_is_archived_as_the_callers():
    # mallory, from her own address, writes the ACK exactly as alice's: the token cannot
    # tell (side 0 above), so only the body's own binding may name a sender
    rows = _ack_rows(bound=False)
    assert rows and all(row.from_uri is None for row in rows), \
        "the callee's ACK written as alice's is archived under alice's From"


STOCK_FROMS = [
    '"Alice \\"A\\" Smith" <sip:alice@example.com>;tag=1',
    'Alice Smith <sip:alice@example.com>;tag=1',
    '"\u00c5lice" <sip:alice@example.com>;tag=1',
    '<sip:alice@[2001:db8::1]:5060;transport=udp>;tag=1',
    '<sip:alice@[::ffff:127.0.0.1]>;tag=1',
    '<sips:alice@example.com>;tag=1',
    'sip:alice@example.com;tag=1',
    '"a\\\\" <sip:alice@example.com>;tag=1',
    '<sip:alice@example.com;maddr=192.0.2.1;lr>;tag=1',
    '<sip:alice@example.com?Subject=hi>;tag=1',
    'sipp <sip:sipp@127.0.0.1:5061>;tag=1',
    '<sip:127.0.0.1:5060>;tag=1',
    '<tel:+15551234;phone-context=example.com>;tag=1',
    '<sip:alice@example.com>;tag="q"',
    "<sip:alice@example.com>;tag=" + "t" * 900,
]


@pytest.mark.parametrize("value", STOCK_FROMS)
def test_control_stock_client_from_forms_pass_the_door_and_get_a_token(value):
    """The door (``kemi._ends_readable``: ``parse_address`` then ``parse_uri`` for
    sip/sips) and the token's parties (``dialog_parties`` of the bare URI, as ``$fu``)
    agree on every legal form a stock client writes: no honest INVITE passes the door
    and is then refused 400 at ``record_route``."""
    uri = parse_address(value).uri
    if uri.partition(":")[0].lower() in ("sip", "sips"):
        parse_uri(uri)
    parties = dialog_parties(uri, "sip:bob@example.com")
    assert parties is not None
    assert ROUTES.token(CALL, "t" * 900, parties=parties) is not None
