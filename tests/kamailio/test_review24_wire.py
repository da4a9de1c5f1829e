"""Review 24: ids Kamailio and the core read differently (a Call-ID's trailing blanks).

Review 23 made the core refuse a Call-ID or tag that is not visible ASCII, so that the
keys the core keeps under a dialog's ids are always the keys kemi can name from
Kamailio's parse (``$ci``, ``$ft``, ``$tt``: a bare BYE is ended from those alone,
``end_dialog_unread`` -> ``ProxyEngine.end_unread``).  Both readers were compared
header by header on this Kamailio (5.6.3): tags agree wherever both accept them
(quoted, ``TAG=``, blanks around ``=``, a tag in the URI as well, commas, ``<>``),
and where they differ one of them refuses (a tag given twice, escapes in a quoted
tag: Kamailio drops the message).  The Call-ID does not: the core strips blanks at
the end of a header value (``_parse_header_line``: ``value.strip(" \\t")``), while
Kamailio's ``$ci`` keeps them: ``Call-ID: abc `` is ``abc`` to the core and ``abc ``
to kemi.  Both accept it (the core's visible-ASCII check runs on the stripped value).

So a call whose INVITE and in-dialog requests write the Call-ID with a trailing blank
(the caller's own UA, or an untrusted hop between the caller and the proxy that adds it
to each of her requests: the signed context binds the stripped Call-ID, so every check
passes) is record-routed with the token of ``abc `` (kemi reads ``$ci``), its keys are
kept and moved under ``abc`` (the core), and its BYE, whose token matches, ends the
dialog ``abc `` in which nothing was kept: the caller's key outlives the call for the
dialog's life (12 h), one per call, on her quota: review 23's effect, by another
spelling.  The hole test was a strict xfail on ``c62af60``; it passes since kemi reads
Kamailio's ids through ``dialog_route.dialog_ids``, blanks stripped as the core strips
them (the route token, ``dialog_routed_here``, a bare BYE's scope, the certificate
service's NOTIFY answers).
"""

from __future__ import annotations

import pytest

from e2m_plugins.keycache import short_lived_key
from tests.kamailio.test_review23_wire import call_and_hang_up

pytestmark = pytest.mark.kamailio


def _blank_added(request):
    """The untrusted hop: a blank appended to the Call-ID of each of alice's requests (the
    INVITE and the BYE; the ACK is not needed here)."""
    return request.replace("Call-ID", request.call_id + " ")


def test_hole_a_trailing_blank_in_the_call_id_keeps_the_callers_key_past_the_call(
        proxy_factory, pki):
    """Attacker: an untrusted hop between alice and the proxy (or a caller's own UA, an
    insider, writing its Call-IDs so).
    Attack: a space appended to the Call-ID header of alice's INVITE and of her BYE
    (headers only: her signed context binds the Call-ID, and the core, which strips a
    header value's trailing blanks, reads it unchanged, so every check passes).
    Effect: Kamailio's ``$ci`` keeps the blank.  The INVITE is record-routed with the
    token of ``abc `` and the BYE's token matches, so the BYE is routed and bob gets it
    and ends the call: nothing looks wrong.  But the core moved alice's offer key into the
    dialog ``abc`` when it read bob's 200, and the bare BYE is ended from Kamailio's ids
    (``end_dialog_unread``): the dialog ``abc `` holds nothing.  Alice's key stays in the
    key cache for the dialog's life (12 h), one per call, on her quota: what review 23
    fixed for a To tag that is not UTF-8.  (A hop could drop the BYE instead; then bob's
    side never ends and alice sees a timeout.  This one is silent.)
    Fix: one reader for the ids: refuse (400) a request whose ``$ci``/``$ft``/``$tt``
    are not what the core reads (``kemi.end_dialog_unread`` could compare them with
    ``message.call_id`` etc., or read the BYE with the core whenever it ends a dialog);
    or make the core refuse a Call-ID header with blanks around it (as ``$ci`` would
    show them), or strip ``$ci`` in kemi the way the core does (for the route token
    too, so the two agree)."""
    kept, got_bye, _bye_answer, left = call_and_hang_up(proxy_factory, pki, hop=_blank_added)
    assert kept > 0, "the offer kept no key: nothing to show"
    assert got_bye, "the BYE was not routed: nothing to show"
    assert all(short_lived_key(name) for name in left), \
        f"a dialog record outlived the call: {[n for n in left if not short_lived_key(n)]}"


def test_control_the_same_call_without_the_blank_ends_with_its_keys(proxy_factory, pki):
    """The same call, the Call-ID as alice wrote it: the BYE drops every key."""
    kept, got_bye, bye_answer, left = call_and_hang_up(proxy_factory, pki)
    assert kept > 0
    assert got_bye and bye_answer is not None and bye_answer.status == 200, bye_answer
    assert left == []
