"""Review 143 (attacker's review of aa004e9, the changes ``3ccf964..aa004e9``).

No hole was confirmed in this stop's changes: every test in the review 143 modules is a
control (unmarked, passing) that pins a rule working or an honest flow going through.
This docstring is the review's full account; the unit-level controls are in
``tests/unit/test_review143_memo_keys.py`` (certificate keys, head reader,
``lazy_property``), ``tests/unit/test_review143_ack_reading.py`` (honest E2M ACKs read
as responses) and ``tests/unit/test_review143_subscription_copies.py`` (the copy rule).

Set-up here: review 141's wire fixture (``_late_offer_call``): real Kamailio
(``proxy_factory``, E2M, ``view = INVITE:application/sdp``, SQLite archive), a stock
pjsua2 2.15.1 callee (bob, no E2M hook), an insider raw UDP caller (alice) who INVITEs
without SDP; bob offers in his 200 (``127.0.0.1:4000``, recorded) and alice's ACK carries
the answer on ``127.0.0.9:40408``, spelt as each test says.

Controls (unmarked, pass)
-------------------------

- ``test_control_an_ack_answer_without_content_type_moves_nothing``: the answer with no
  ``Content-Type`` (the view reads the body as ``text/plain``: ``seen=text/plain/114B``,
  no media row, ``e2m_acks_unread`` +0, relayed).  pjsip takes no SDP from it either:
  bob is ``CONFIRMED`` with **no** remote RTP address at all.  So a body the view does
  not take for SDP is not one the stock callee does.
- ``test_control_an_ack_answer_as_another_type_moves_nothing``: ``application/x-sdp``:
  read, not SDP to the view (``seen=application/x-sdp``), relayed; pjsip takes nothing
  and ends the call (``DISCONNECTED``, no RTP address).
- ``test_control_an_ack_answer_under_any_disposition_is_recorded``:
  ``Content-Disposition: render`` (RFC 3261 says an SDP is ``session``): the view reads
  and records it all the same (``ACK 127.0.0.9:40408``), and bob takes that address.

Holes: none confirmed.  Honest breaks: none found.

Tried and held
--------------

1. Review 141's fix (``kemi.readable_ack``, ``inspect_only``), honest ACKs:
   - The UA engine's late-offer ACKs (``ua_engine``/``proxy_engine`` of ``e2m_lab.flows``,
     the ACK built as ``test_flows_wire`` builds it) read as ``readable_ack`` reads
     them (``check_readable``, ``read_response``, ``response_refused``): alice knowing
     the proxy's view (sealed for bob and the proxy: read, 1 media line, not refused),
     alice not knowing it (sealed for bob only: ``ProxyCannotDecryptError``, not
     refused: the documented relay), a ``verify``-only proxy (read), ``view`` and
     ``verify`` together, an explicit ``ACK:application/sdp`` rule, and an SRTP offer
     (``split_sdp``, the keys' part sealed for bob only): none is dropped and bob opens
     each (``tests/unit/test_review143_ack_reading.py``).  The product phone
     (``pjsua_hooks``) never sends an INVITE without SDP (``make_call`` has no such
     option) and refuses a plaintext SDP with ``require_e2m``, so a late-offer ACK from
     an E2M phone comes only from an engine UA like the above.
   - ``read_response`` on an ACK reads with ``_read_body(message, "ACK")``, the very
     reading ``inspect`` then repeats for the request; the replay check
     (``_first_sighting``) is not in it, so a retransmitted ACK (each 2xx
     retransmission draws one) is read alike and relayed (its ``inspect`` verdict is
     the replay, counted, as before).  A bodyless ACK with a ``Proxy-Body-Policy``
     header: no body, ``_SKIPPED``, relayed.
   - A cluster front relays in-dialog ACKs unread (``route_in_dialog`` with a
     dispatcher); the node reads.  A body sealed with a key the node does not hold is
     sealed: relayed, counted.
   - A fuzz of 20,000 ACK bodies (SDP lines, nested multiparts, odd types, encodings,
     dispositions, a ``Proxy-Required-Body``) through ``check_readable``,
     ``read_response``, ``response_refused`` and ``inspect``: nothing raised but
     ``E2MError`` (an exception of another kind would make ``inspect_only`` relay the
     ACK unread: none found).
2. Review 141's fix, refused answers that might still reach a stock callee: every
   spelling tried is either read and recorded or refused and dropped: upper case type,
   ``;level=2``, blanks around ``/``, ``application/sdp;``, a tab, ``Content-Encoding:
   gzip`` (read as is, as pjsip reads it), ``multipart/mixed`` with ``BOUNDARY=`` in
   upper case, two SDP parts (both recorded); refused: nested multiparts,
   ``multipart/related``, base64, comments, lists of types.  Not SDP to either side: no
   ``Content-Type``, ``application/x-sdp``, ``application/sdp+xml`` (the controls).
3. ``SubscriptionTable.add`` (review 142's fix): an honest retransmission of a first
   SUBSCRIBE is a byte copy (same Via, hence same To tag; tm absorbs it while its
   transaction lives, then it reaches ``add`` and renews); a retry on a new transaction
   (a phone's, or a visited proxy's after its own transaction ended) has a new branch,
   hence another To tag: another dialog, never "not a copy".  The e2m-rr token of a
   visited proxy is an HMAC of the dialog's ids, the same in every copy.  The columns
   compared are all TEXT on both back ends (``route_set`` a JSON text), so a copy
   compares equal on PostgreSQL too.  A forger's exact copy may still change
   ``Expires`` (shorten the follow to ``min_expires``, or, over UDP with a held
   certificate, make it a fetch that ends once answered): but it must come from the
   subscription's own next hop (address, port, transport, route set), from where an
   in-dialog refresh or unsubscribe (whose To tag is in every NOTIFY) already does as
   much (``test_review143_subscription_copies.py`` shows both ends).  One nuance, seen
   at the table and not made a hole: for a follow with a route set the copy rule
   compares the source *address* and the Record-Route's next hop, not the source port,
   while an in-dialog request of a UDP routed follow must come from the port its
   Record-Route names (review 136 K2).  A copy (carol's own route set, e2m-rr token
   and Contact) sent from port 41000 of the hop's address, with ``Expires`` 160, was
   taken (CSeq 1 then 2, ``expires`` 160.0, ``next_hop`` still
   ``sip:192.0.2.77:5070;lr``).  The sender must know the whole SUBSCRIBE (the hop's
   token included), and what it gains is an earlier end: at the lapse the final NOTIFY
   goes through the hop to carol, whose phone forgets the follow and follows again at
   its next tick (``CertServiceClient.tick``, ``_follow_peers_in_use``), so no
   replacement goes untold for longer than that; not run on the wire.  A fetch
   (``Expires: 0``, not held) naming the follow is never written to the table and its
   one NOTIFY follows its own next hop, i.e. the sender's.  A race of two first
   SUBSCRIBEs on PostgreSQL (both SELECT empty, the second's upsert wins) needs the
   dialog's ids before the honest request is handled: an on-path hop, which can
   rewrite that request anyway.
4. ``certificate_key`` and its memos, ``_HEADER_LINES``, ``lazy_property``: see
   ``tests/unit/test_review143_memo_keys.py`` (non-DER spellings refused by
   cryptography 51.0.1, so a read certificate's bytes are its encoding; bounded table;
   head reader differential and linear; no ``__slots__`` class, pure properties).

Untried: an E2M late offer on the wire through a cluster (front and node, DMQ lag for a
reused CEK); the ``rtcp``/direction summary rules inside a late-offer ACK on the wire;
TLS ACKs above 49,149 octets (``_message_octets`` slices).

Left as it is (stop 45): the copy rule holds a routed follow to its source address, not
its port (the port a subscription was opened from is not stored: review 137 HB2's
column).  An exact copy, route token included, from another port of the hop's address
can only set the follow's expiry, so at worst end it early; its subscriber is told
(the final NOTIFY goes through the hop) and subscribes again.
"""

from __future__ import annotations

import pytest

from tests.kamailio.test_review141_late_offer_wire import (MOVED, _late_offer_call,
                                                           _taken_is_recorded)

pytestmark = pytest.mark.kamailio


def test_control_an_ack_answer_without_content_type_moves_nothing(proxy_factory, tmp_path):
    got, rows, log, _ = _late_offer_call(proxy_factory, tmp_path, "r143nc", MOVED,
                                         ack_type=None)
    assert ("ACK", "127.0.0.9", 40408) not in rows, rows
    assert got.get("rtp") == [] and _taken_is_recorded(got, rows), (got, rows, log)
    assert _late_offer_call.unread == 0, log


def test_control_an_ack_answer_as_another_type_moves_nothing(proxy_factory, tmp_path):
    got, rows, log, _ = _late_offer_call(proxy_factory, tmp_path, "r143xs", MOVED,
                                         ack_type="application/x-sdp")
    assert got.get("rtp") == [] and _taken_is_recorded(got, rows), (got, rows, log)
    assert got.get("state") != "CONFIRMED", got
    assert _late_offer_call.unread == 0, log


def test_control_an_ack_answer_under_any_disposition_is_recorded(proxy_factory, tmp_path):
    got, rows, log, _ = _late_offer_call(proxy_factory, tmp_path, "r143rd", MOVED,
                                         ack_headers=(("Content-Disposition", "render"),))
    assert ("ACK", "127.0.0.9", 40408) in rows, rows
    assert got.get("rtp") == ["127.0.0.9:40408"] and _taken_is_recorded(got, rows), got
    assert _late_offer_call.unread == 0, log
