"""A sixty-sixth attacker's review (December 2026) of 2fcd1c5: today's fixes, attacked;
here on a real Kamailio.  The core's side (and holes 1 and 2) is
``tests/unit/test_review66.py``.

Hole 3, on the wire (``test_hole_an_answer_with_its_part_repeated_is_relayed_unread``):

- Attacker: an **untrusted hop** between bob and the home proxy, or bob himself (an
  **insider UA** who wants his answers out of the archive).
- Messages: alice's plain MESSAGE to bob through the proxy (which views ``MESSAGE:*``
  and archives what it reads); bob's 200 carries a receipt as a ``multipart/mixed`` of
  two copies of one part (the same Content-ID), as a hop makes of any answer by
  repeating its part.
- Effect (seen): ``sip.parse`` takes the response, so review 64's ``read_reply`` lets it
  go on to tm's reply route; there the engine refuses the body (``MalformedError`` "two
  body parts share a Content-ID") and ``route_reply`` forwards it unread, as a body it
  has no key for: alice gets the 200 and the receipt is in no archive row.  Alice's
  phone's engine accepts such a body (unit test: bob's E2M 200 so repeated is read by
  alice, never by her proxy), so the chosen proxy misses what the caller reads.
- At fault: ``kamailio_app/kemi.py`` ``route_reply`` (a verdict with ``error`` goes on)
  with ``e2m_plugins/proxy.py`` ``_targets`` refusing what ``ua.py`` ``_open`` takes.
  Fix: drop in the core reply route a response the engine must read and finds
  malformed (not only what ``sip.parse`` refuses), and let the UA refuse it too.

What held: see the module docstring of ``tests/unit/test_review66.py``.

Fixed (stop 31): a copy of a stored message fills what the stored row lacks (an
answer's sender and Request-URI), never changes what it holds (the archive's insert);
two top parts with one Content-ID are malformed for the UA as for the proxy
(``body.top_parts``), and a key counts one use a message however many parts it opened
(``PendingUses.spend``, the proxy's ``_spend``); a response the engine must read and
cannot take apart (``ProxyEngine.check_readable``: headers, ids, MIME framing, top
parts) is dropped in Kamailio's core reply route.
"""

from __future__ import annotations

import pytest

from e2m_plugins import mime
from e2m_plugins.sip import make_response, parse
from tests.kamailio.test_review57_wire import receipt_exchange

pytestmark = pytest.mark.kamailio

_RECEIPT = mime.MimePart((("Content-Type", "text/plain"), ("Content-ID", "<r66@bob>")),
                         b"receipt")


def _answer_with(proxy_factory, copies: int):
    """bob answers alice's plain MESSAGE with a 200 whose body is a multipart/mixed of
    ``copies`` copies of one text part (``receipt_exchange``'s returns)."""
    body = mime.multipart_mixed([_RECEIPT] * copies)

    def responder(request):
        return make_response(request, 200, "OK", body=body.body,
                             content_type=str(body.content_type)).serialize()
    return receipt_exchange(proxy_factory, "r66a", responder, bob_at="127.0.0.66",
                            alice_at="127.0.0.67")


def test_control_a_receipt_in_a_multipart_is_archived(proxy_factory):
    """bob's receipt as one part of a multipart/mixed: read, archived beside alice's
    text, delivered (the hop's form is well formed up to the repeated part)."""
    answers, rows, _ = _answer_with(proxy_factory, 1)
    assert len(answers) == 1 and b"receipt" in parse(answers[0]).body
    assert b"hello bob" in rows and b"receipt" in rows


def test_hole_an_answer_with_its_part_repeated_is_relayed_unread(proxy_factory):
    """Secure: an answer the proxy delivers is one it read (and archived), or it is not
    delivered (dropped, as review 64's unreadable answers)."""
    answers, rows, log = _answer_with(proxy_factory, 2)
    delivered = [parse(a) for a in answers]            # alice's own core reads it
    assert not delivered or b"receipt" in rows, (len(delivered), rows, log[-800:])
