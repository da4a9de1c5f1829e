"""Review 98 hole 1, the token half: the Record-Route token binds the dialog's two
parties (the From and To AoRs of its initial request, as the core reads them, sorted),
so an in-dialog request (an ACK above all, never challenged) written with another From
or To carries no token of its own and is not routed (``kemi.dialog_routed_here``).
Wire half: ``tests/kamailio/test_review98_wire.py``."""

from __future__ import annotations

from kamailio_app.dialog_route import PARAM, RouteTokens, carries_a_token, dialog_parties

ROUTES = RouteTokens(b"n" * 32)
CALL, ALICE_TAG, BOB_TAG = "c98@example.com", "mt98", "bt98"
MALLORY, BOB, ALICE = "sip:mallory@example.com", "sip:bob@example.com", "sip:alice@example.com"


def _route(parties) -> str:
    """Our Record-Route entry as ``kemi.record_route`` writes it for mallory's INVITE."""
    return f"<sip:10.0.0.1:5060;lr{ROUTES.param(CALL, ALICE_TAG, [], parties=parties)}>"


ROUTE = _route(dialog_parties(MALLORY, BOB))


def test_the_same_dialog_from_either_side_is_admitted() -> None:
    # the caller's requests: From mallory, To bob, her tag in From
    assert ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE],
                         parties=dialog_parties(MALLORY, BOB))
    # the callee's: From bob, To mallory, her tag in To
    assert ROUTES.admits(CALL, (BOB_TAG, ALICE_TAG), [ROUTE],
                         parties=dialog_parties(BOB, MALLORY))
    # as the core reads an AoR: display form, case of the host, a port or parameters
    assert ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE],
                         parties=dialog_parties("<sip:mallory@EXAMPLE.com:5061;transport=tls>",
                                                "sip:bob@example.com;user=phone"))
    # the caller's tag names the parties in the caller's order (review 99)
    assert ROUTES.ours_in(CALL, ALICE_TAG, [ROUTE], parties=dialog_parties(MALLORY, BOB))
    assert not ROUTES.ours_in(CALL, ALICE_TAG, [ROUTE], parties=dialog_parties(BOB, MALLORY))
    # the parameter keeps its size on the wire
    assert len(ROUTES.param(CALL, ALICE_TAG, [], parties=dialog_parties(MALLORY, BOB))) \
        == len(f";{PARAM}=") + 32


def test_another_pair_of_aors_is_refused() -> None:
    # mallory's ACK written From alice in her own dialog with bob
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE],
                             parties=dialog_parties(ALICE, BOB))
    # ... or To someone else, or another user of the same domain on either side
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE],
                             parties=dialog_parties(MALLORY, ALICE))
    assert not ROUTES.admits(CALL, (BOB_TAG, ALICE_TAG), [ROUTE],
                             parties=dialog_parties(BOB, ALICE))
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE],
                             parties=dialog_parties("sip:mallory@other.example.net", BOB))
    # the parties cannot be traded for the tags or the Call-ID
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [_route(dialog_parties(ALICE, BOB))],
                             parties=dialog_parties(MALLORY, BOB))
    assert not ROUTES.ours_in(CALL, ALICE_TAG, [ROUTE], parties=dialog_parties(ALICE, BOB))
    assert not ROUTES.keeps_callers_side(CALL, ALICE_TAG, [ROUTE],
                                         parties=dialog_parties(ALICE, BOB))
    # it is still one of our tokens (kemi drops such an ACK rather than hand it to tm)
    assert carries_a_token([ROUTE]) and not carries_a_token(["<sip:10.0.0.1;lr>"])


def test_an_unreadable_from_or_to_is_refused() -> None:
    for from_uri, to_uri in ((f'{ALICE};x="y"', BOB), (MALLORY, ""), (None, BOB),
                             ("sip:alice:pw@example.com", BOB),
                             (MALLORY, "sip:bob@example.com;x=1;x=2")):
        parties = dialog_parties(from_uri, to_uri)
        assert parties is None, (from_uri, to_uri)
        assert ROUTES.token(CALL, ALICE_TAG, parties=parties) is None
        assert ROUTES.param(CALL, ALICE_TAG, [], parties=parties) is None   # no token made
        assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [ROUTE], parties=parties)
        assert not ROUTES.ours_in(CALL, ALICE_TAG, [ROUTE], parties=parties)
        assert not ROUTES.keeps_callers_side(CALL, ALICE_TAG, [ROUTE], parties=parties)


def test_a_call_to_a_number_is_routed_and_bound_to_it() -> None:
    """A To of another scheme (``tel:``, a call to a number) names its party as written
    (case folded): the call is record-routed and its in-dialog requests from either side
    are admitted, another number's are not (stop 36)."""
    number = "tel:+15551234"
    route = _route(dialog_parties(MALLORY, number))
    assert ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [route],
                         parties=dialog_parties(MALLORY, "TEL:+15551234"))
    assert ROUTES.admits(CALL, (BOB_TAG, ALICE_TAG), [route],
                         parties=dialog_parties(number, MALLORY))
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [route],
                             parties=dialog_parties(MALLORY, "tel:+15559999"))
    assert not ROUTES.admits(CALL, (ALICE_TAG, BOB_TAG), [route],
                             parties=dialog_parties(ALICE, number))
