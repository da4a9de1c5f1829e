"""A sixty-fourth attacker's review (December 2026) of ef7ffd6: differential parsing,
round two (core vs pjsip, core vs Kamailio); here on a real Kamailio.  The core's side
is ``tests/unit/test_review64.py``.

Hole (``test_hole_what_the_core_refuses_in_the_proxys_own_via_keeps_an_answer_out_of_the_archive``):

- Attacker: an **insider UA** (bob, registered behind the home proxy, who wants his
  answers out of the archive), or an **untrusted hop** between bob and the proxy.
- Messages: alice's plain MESSAGE to bob through the proxy (which views ``MESSAGE:*``
  and archives what it reads); bob's 200 carries a text body (a receipt) and, in the
  top Via - the proxy's own, which Kamailio strips before relaying - an extra parameter
  ``;x=a&b`` (or ``;x=a<0x01>b``, a control octet).
- Effect (seen): the proxy's core refuses the whole response (``sip.parse`` ->
  ``_check_unambiguous``: an ``&`` outside quotes in a typed header, review 62's rule;
  ``_take_line``: a control character in the header section),
  ``route_reply`` raises outside its own ``try`` and the reply goes on unread;
  Kamailio matches the transaction by the branch, strips its Via and relays the rest:
  alice gets a clean 200 (her own core reads it), and the receipt is in no archive row.
  The same as review 57's second To, but through a header that only the proxy sees.
- At fault: ``kamailio_app/kemi.py`` ``route_reply`` (an unreadable response is relayed,
  and a response is unreadable for a header the next hop never gets) with
  ``e2m_plugins/sip.py`` ``_check_unambiguous`` (applied to the proxy's own Via).  Fix:
  drop (``return 0`` / ``drop()``) a response the core cannot read when the proxy views
  its method, as review 57 does for a second To; or read a response without the Via
  Kamailio will remove (check ``&`` after stripping the top Via).

What held: see the module docstring of ``tests/unit/test_review64.py``.

Fixed (stop 31): the proxy reads a response that must be read in Kamailio's core reply
route (``kamailio.read_reply``, kept for tm's reply route), and drops one the core
refuses there, as review 57's second To: never relayed unread.  Review 30's over-long
To tag answer is dropped the same way now (``tests/kamailio/test_review30_wire.py``).
"""

from __future__ import annotations

import pytest

from e2m_plugins.sip import make_response, parse
from tests.kamailio.test_review57_wire import receipt_exchange

pytestmark = pytest.mark.kamailio


def _answer_with(proxy_factory, via_param: str | None):
    """bob answers alice's plain MESSAGE with a 200 carrying a text body (a receipt),
    ``via_param`` appended to the top Via (the proxy's) (``receipt_exchange``'s
    returns)."""
    def responder(request):
        reply = make_response(request, 200, "OK", body=b"receipt", content_type="text/plain")
        if via_param is not None:
            vias = reply.get_all("Via")
            wire = reply.serialize()
            return wire.replace(vias[0].encode(), (vias[0] + via_param).encode(), 1)
        return reply.serialize()
    return receipt_exchange(proxy_factory, "r64a", responder, bob_at="127.0.0.64",
                            alice_at="127.0.0.65")


def test_control_a_receipt_with_a_plain_extra_via_parameter_is_archived(proxy_factory):
    """bob's receipt with an ordinary extra parameter in the proxy's Via (``;x=ab``):
    read, archived beside alice's text, delivered."""
    answers, rows, _ = _answer_with(proxy_factory, ";x=ab")
    assert len(answers) == 1 and parse(answers[0]).body == b"receipt"
    assert b"hello bob" in rows and b"receipt" in rows


@pytest.mark.parametrize("via_param", [";x=a&b", ";x=a\x01b"])
def test_hole_what_the_core_refuses_in_the_proxys_own_via_keeps_an_answer_out_of_the_archive(
        proxy_factory, via_param):
    """Secure: an answer the proxy delivers is one it read (and archived), or it is not
    delivered (dropped, as review 57's second To)."""
    answers, rows, log = _answer_with(proxy_factory, via_param)
    delivered = [parse(a) for a in answers]            # alice's own core reads it
    assert not delivered or b"receipt" in rows, (len(delivered), rows, log[-600:])
    # the fix: dropped in the core reply route, and said so
    assert not delivered and b"receipt" not in rows
    assert "that must be read and cannot be" in log and "dropped" in log
