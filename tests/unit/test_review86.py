"""An eighty-sixth attacker's review (December 2026) of 39747f2: this stop's
fixes attacked (``RouteTokens.keeps_callers_side`` / ``kemi.callers_side_kept``,
``settle_registration``, ``bootstrap._identity`` digesting the body, ``sdp._has_control``
/ ``merge_keys``, the phone's records keyed by the handed octets); core half.  Wire
halves: ``tests/kamailio/test_review86_wire.py`` (routes) and
``tests/cluster/test_review86_cluster.py`` (a front's count).

Hole 1 (``test_hole_a_quoted_display_name_holding_our_entry_vouches_for_the_hops_uri``):
attacker: an **untrusted hop** on the callee's leg (it rewrites what it forwards).
Message: bob's 200 to alice's INVITE, our Record-Route entry (TLS socket, token) rewritten
as ``"<sip:OUR-TLS-SOCKET;transport=tls;lr;e2m-rr=TOKEN>" <sip:HOP;lr>``: the entry's
real URI is the hop's, our entry only quoted in its display name (a quoted-string may
hold ``<``, ``>`` and ``;``).  Effect: ``_carried`` (``_ENTRY.finditer`` over the whole
text, quotes unread) reports the quoted URI as the entry carrying our token, so
``moved_route_entries`` finds it names our socket (not moved); ``keeps_callers_side``
finds the token anywhere in the entry's text and the entries below it unchanged: the 200
is relayed.  Alice's stack reads the name-addr, URI ``sip:HOP;lr``: her route set starts
at the hop over UDP (review 81's hole 3, the one the token check was made for).  The same
quoting on an entry *below* ours (the caller's own proxy) passes ``_comparable``, which
also takes the first ``<...>`` (``test_hole_a_quoted_display_name_rewrites_the_callers_
own_proxy``).  At fault: ``kamailio_app/dialog_route.py`` ``_ENTRY = re.compile(r"<([^<>]*)>")``
used by ``_carried`` (``_ENTRY.finditer(text)``, line 154) and ``_comparable``
(``_ENTRY.search(text)``, line 130), and ``keeps_callers_side``'s ``_TOKEN.search(entry)``
over the whole entry (line 116).  Fix: read each entry as a name-addr
(``grammar.parse_address``: quoted display name skipped, escapes honoured) and use its
URI only, in ``_carried``, ``keeps_callers_side`` and ``_comparable``; or refuse (do not
vouch for) any entry with a display name, as no proxy writes one.

Hole 2 (``test_hole_re_encoded_copies_of_one_answer_are_many_rows``): attacker: bob, an
**insider callee** (or the **untrusted hop** on his leg).  Messages: bob's signed 200,
sealed for alice and the proxy (RFC 3185 CEK reuse), then copies of it whose body is
the same CMS object re-encoded: ``Content-Transfer-Encoding: base64`` with the lines
wrapped at another length each time (the SIP header is no part of the signature).
Effect: the proxy reads each copy as the same signed answer (``valid``, bob) and alice's
engine opens each to the same SDP (her stack absorbs them as retransmissions of one
200), but ``_identity`` now digests the body's octets: each copy is a new
``message_uid``, a new row in the archive, "bob answered" N times for one answer (review
61's hole, one answer one row, back through another door; on a cluster, at either node).
At fault: ``kamailio_app/bootstrap.py`` ``_identity`` (``hashlib.sha256(message.body)``).
Fix: digest what the signature covers, not the transfer encoding: the decoded
(``decoded_body``) octets of each part, or better the signed context's own time /
signature value (``SeenBody``), as review 84 suggested; copies then share a uid and two
signings never do.

Controls: the honest 200 (our entry untouched, the caller's proxy below it) is kept; a
hop's plain entry added below ours is refused; a byte copy of bob's answer is one row;
the base64 copy opens at alice to the same SDP and is read by the proxy as bob's valid
signature.

Hole 3 (a front's count never settles): ``tests/cluster/test_review86_cluster.py``.

Tried and held (read, or run where a control says so; the route ones in the wire module):
- ``settle_registration`` on a single proxy: a refused REGISTER (save fails) reads no
  AoR in usrloc (``reg_fetch_contacts`` -1) and frees the claim; a de-registration of
  an AoR bound from several sources keeps the slot for the others' bindings (an
  over-count of the sender's own address, no more than a forger could take with an
  honest hour); two workers: the slot's tag is checked before it is rewritten; an
  exception between ``save`` and the reply still sends the registrar's reply
  (``finally``), then ``ksr_request_route`` answers 500 as well (a second answer to
  one REGISTER, harmless to the UA, which takes the first): no attacker trigger found,
  every value read there was read by ``count_registration`` before.
- ``bootstrap._identity``: MESSAGE copies with other octets are refused 403 by the
  replay record within the window (review 84's control), on a cluster by the shared
  claims; only responses are open (hole 2).
- ``sdp._has_control`` / ``merge_keys``: U+2028, U+0085 and other non-ASCII separators
  are no line end to pjmedia (it scans for CR and LF octets) nor to ``parse_lines``
  (splits the octets on LF); a bare LF or CR inside the UTF8String is refused; a
  session-level ``k=`` line is put back in the session section, and the re-parse
  compares every non-keying line with the view's, so nothing moves past ``m=``; a
  1 KiB key line is within ``_KEYS_MAX_BYTES``.
- ``phone.py``: a copy on alice's branch before hers gets hers refused 482, which
  review 83 accepted as the secure outcome (a hop can drop it anyway: no worse);
  ``_rx_tsx``/``_rx_info`` go through ``_bounded_put_aged`` (``_MEMO`` entries, 64 s);
  ``E2MCall.initial`` shows a received INVITE's record only for the octets pjsua took.

Fixed (stop 34): hole 1, a Record-Route entry with anything but ``<URI>`` and its
parameters (a display name, a quote, a second ``<`` or ``>``) is not vouched for
(``dialog_route._plain_entry`` in ``routes_within_bounds``); hole 2, the archive's uid
no longer digests the body's octets but the times its bodies' signed contexts carry
(``SeenBody.signed_at``, ``bootstrap._identity``): re-encoded copies are one row, the
same words signed anew are two (review 84 still passes).  The core model ``_relayed``
now does what ``moved_route_entries`` does since the fix (``routes_within_bounds``,
and our entry's MAC of the caller's side instead of the request's Record-Route), and
our entries are written as ``record_route`` writes them (the MAC in ``e2m-rr``'s value).  All three
turned XPASS; the markers are gone.
"""

from __future__ import annotations

import base64

import pytest

from e2m_plugins.grammar import split_header_list
from e2m_plugins.sip import parse_address
from kamailio_app.dialog_route import RouteTokens, dialog_parties, routes_within_bounds

ROUTES = RouteTokens(b"r" * 32)
PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To
CALL, TAG = "c86@example.com", "at86"
TOKEN = ROUTES.token(CALL, TAG, parties=PARTIES)
CALLERS = "<sip:192.0.2.7:5061;transport=tls;lr>"
# stop 34: our entries carry, beside the token, a MAC of the Record-Route the request
# reached us with (here none: alice came straight to us), as record_route writes them
OURS_TLS_URI = f"sip:10.0.0.1:5061;transport=tls;lr{ROUTES.param(CALL, TAG, [], parties=PARTIES)}"
OURS_TLS = f"<{OURS_TLS_URI}>"
OURS_UDP = f"<sip:10.0.0.1:5060;lr{ROUTES.param(CALL, TAG, [], parties=PARTIES)}>"
HOP_URI = "sip:203.0.113.66:5999;lr"


def _is_myself(uri: str) -> bool:
    return uri.startswith("sip:10.0.0.1:")


def _relayed(reply: list[str]) -> bool:
    """kemi.moved_route_entries as it decides (its is_myself our 10.0.0.1 sockets): the
    reply goes on when it is read whole, our entries name our sockets and the caller's
    side is kept (stop 34: ``routes_within_bounds`` and the MAC, no request needed)."""
    if not routes_within_bounds(reply):
        return False
    ours = ROUTES.ours_in(CALL, TAG, reply, parties=PARTIES)
    moved = [uri for uri in ours if not _is_myself(uri)]
    return not moved and (not ours or ROUTES.keeps_callers_side(CALL, TAG, reply, parties=PARTIES))


def _callers_first_hop(reply: list[str]) -> str:
    """The URI alice's in-dialog requests go to first, as a SIP stack reads the list
    (name-addrs; RFC 3261 12.1.2: the route set is the Record-Route list reversed)."""
    entries = [e for value in reply for e in split_header_list(value)]
    return parse_address(entries[-1]).uri


def test_control_the_honest_reply_is_relayed_and_starts_at_our_tls_socket():
    reply = [OURS_UDP, OURS_TLS]
    assert _relayed(reply)
    assert _callers_first_hop(reply) == OURS_TLS_URI


def test_control_a_plain_hop_entry_below_ours_is_refused():
    assert not _relayed([OURS_UDP, OURS_TLS, f"<{HOP_URI}>"])


def test_control_a_quoted_display_name_is_read_as_one_entry_whose_uri_is_the_hops():
    """The attack's entry is a well-formed name-addr: one entry, the hop's URI."""
    entry = f'"{OURS_TLS}" <{HOP_URI}>'
    assert split_header_list(entry) == [entry]
    assert parse_address(entry).uri == HOP_URI


def test_hole_a_quoted_display_name_holding_our_entry_vouches_for_the_hops_uri():
    reply = [OURS_UDP, f'"{OURS_TLS}" <{HOP_URI}>']
    first = _callers_first_hop(reply)
    assert first == HOP_URI                      # what alice's stack will use
    # secure: a reply whose caller-side entry is not ours is not relayed
    assert not _relayed(reply), "relayed; alice's first hop: %s" % first


def test_hole_a_quoted_display_name_rewrites_the_callers_own_proxy():
    ours = f"<sip:10.0.0.1:5061;transport=tls;lr{ROUTES.param(CALL, TAG, [CALLERS], parties=PARTIES)}>"
    reply = [OURS_UDP, ours, f'"{CALLERS}" <{HOP_URI}>']
    assert _callers_first_hop(reply) == HOP_URI
    assert not _relayed(reply)


# -- hole 2: re-encoded copies of one answer ------------------------------------------

@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"),
                         key_type="ec")


class _Recorder:
    """An archive keeping what ``record`` was asked to store, by uid (review 61's)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple] = {}

    def record(self, bodies, media=(), *, uid=None, may_spool=True, share=None):
        self.rows.setdefault(uid, (bodies, media))
        return uid


def _answered(world):
    """alice's INVITE through the home proxy (views SDP) to bob, bob's sealed, signed 200:
    (proxy, alice, the 200)."""
    from e2m_lab.flows import (SDP_VIEW, TRUSTED, answer, apply_forward, invite,
                               known_proxy, proxy_engine, ua_engine)
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    chosen = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=chosen)
    bob = ua_engine(world, "bob", proxies=chosen)
    sent = alice.protect(invite(world, call_id="r86-answer@10.0.0.7")).message
    delivered = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    return proxy, alice, bob.protect(answer(delivered)).message


def _re_encoded(ok, width: int):
    """The same 200, its body (the same DER) sent base64, lines ``width`` long."""
    text = base64.b64encode(ok.body)
    lines = [text[i:i + width] for i in range(0, len(text), width)]
    return ok.replace("Content-Transfer-Encoding", "base64").with_body(b"\r\n".join(lines))


def _archive(world, copies):
    from types import SimpleNamespace
    from kamailio_app.bootstrap import ProxyApp
    store = _Recorder()
    app = ProxyApp(SimpleNamespace(archive=SimpleNamespace(fail_request_on_error=False)),
                   engine=None, archive=store, events=None)   # type: ignore[arg-type]
    proxy, alice, ok = _answered(world)
    shown = []
    for copy in copies(ok):
        verdict = proxy.inspect(copy)
        assert verdict.action == "forward"
        assert [(s.signature, s.signer) for s in verdict.seen] == \
            [("valid", world.aor("bob"))], verdict.seen
        # kemi at the node holding the transaction (a 2xx retransmission goes through tm)
        app.observe(copy, verdict, responder=world.aor("bob"), sent_to=world.aor("bob"),
                    share=world.aor("alice"))
        shown.append(alice.open(copy).message.body)
    return store, shown


def test_control_a_byte_copy_of_bobs_answer_is_one_row(world):
    store, shown = _archive(world, lambda ok: [ok, ok, ok])
    assert len(store.rows) == 1 and len(set(shown)) == 1


def test_control_a_re_encoded_copy_is_bobs_answer_to_proxy_and_alice(world):
    from e2m_lab.flows import SDP_ANSWER
    store, shown = _archive(world, lambda ok: [ok, _re_encoded(ok, 64)])
    assert shown == [SDP_ANSWER, SDP_ANSWER]


def test_hole_re_encoded_copies_of_one_answer_are_many_rows(world):
    store, shown = _archive(world, lambda ok: [ok] + [_re_encoded(ok, w)
                                                      for w in (64, 72, 76, 60, 48)])
    assert len(set(shown)) == 1                  # one answer, as alice reads it
    # secure: one answer, one row (today: six)
    assert len(store.rows) == 1, "%d rows for one answer" % len(store.rows)
