"""Review 112 (an attacker's review of d038d44), wire: review 107's relay loop between
two proxies, on real Kamailio 5.6.3 (two plain proxies on 127.0.0.1).

Hole K2 (``test_hole_k2_bindings_at_two_proxies_naming_each_other_loop_seventy_times``):

- Attacker: an insider UA with an account at two proxies (or anyone where the
  registrars are open, as here) sets the trap once; then any off-path sender springs
  it (a request to a registered user is never challenged).
- Set-up: home proxy H (domain example.com) and a second proxy V (domain
  example.net), both the product (``e2m=False``; the README has a visited proxy listed
  in the home's ``[limits] trusted``, so pike does not count it either).  dave
  REGISTERs at H ``Contact: <sip:dave@127.0.0.1:V>`` and at V
  ``Contact: <sip:dave@127.0.0.1:H>``.  Each REGISTER names the *other* proxy, so
  ``_contact_naming_us`` (``kamailio_app/kemi.py:343-366``) lets both through (200,
  200), and neither ``onsend_route`` (``kamailio_app/templates/kamailio.cfg.tmpl:349-354``:
  only this proxy's own SIP ports) stops a send to the other proxy.
- Messages: one stranger's ``MESSAGE sip:dave@example.com`` to H.
- Effect (seen): H relays to V, V (Request-URI ``sip:dave@127.0.0.1:V``, ours, lookup
  ``dave``) relays back to H, and so on: 70 transactions (tm ``created``, both
  proxies) for one datagram, the stranger answered 483.  The threat model's row for
  review 107 says "a binding naming another node of the cluster makes one extra pass";
  with a second binding pointing back, it is 70 (see
  ``tests/cluster/test_review112_cluster_loop.py`` for the cluster and its burst).
- At fault: review 107's fix stops only a loop through the proxy itself (REGISTER rule
  and ``onsend_route`` both about our own sockets); nothing detects a request coming
  back (RFC 3261 16.3 step 4, loop detection; Kamailio does not do it).
- Fix: loop detection as RFC 3261 16.3/16.6 has it: put a MAC of the Request-URI,
  From tag, Call-ID and CSeq in our Via's branch or a Via parameter, and answer 482 to
  a request that carries one of our Vias with the MAC of its present fields (here the
  Request-URI alternates ``dave@H`` / ``dave@V``: the fourth pass is caught; a spiral
  has another Request-URI and passes).  A Via count bound (each of our Vias at most
  twice) would also do.

Controls (pass unmarked): ``test_control_k2_a_binding_naming_the_other_proxy_alone_is_two_passes``
(erin's binding at H names V, V has none: one transaction at H, 404 from V: the set-up
alone does not loop); ``test_control_k2_a_binding_naming_the_proxy_itself_is_refused``
(review 107's rule live: 403 Contact Names This Proxy).

Tried and held: see ``tests/kamailio/test_review112_spiral.py``.

Fixed (stop 39): loop detection (``kemi._came_back``, htable ``e2mloop``): each request
relayed is noted for 32 s by a digest of its Request-URI as received, tags, Call-ID,
CSeq, method and Route; the same request coming back is 482 before anything reads it.
Here V refuses the fourth pass (3 transactions).  The hole test failed on the code
before the fix and passes with it (marker removed).
"""

from __future__ import annotations

import re
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, build_request, udp_transaction
from e2m_plugins import sip

pytestmark = [pytest.mark.kamailio]


def _created(node) -> int:
    found = re.search(r"created:\s*(\d+)", node.rpc("tm.stats"))
    assert found
    return int(found.group(1))


def _register(node, user, domain, contact):
    ua = SipUa(node.port, user=user, domain=domain, source="127.0.0.60")
    try:
        reg = ua.build("REGISTER", f"sip:{domain}", headers=[("Expires", "600")])
        return ua.request(reg.replace("Contact", contact))
    finally:
        ua.close()


def _strangers_message(node, user, n):
    msg = sip.parse(build_request("MESSAGE", f"sip:{user}@example.com", to_user=user,
                                  body=b"hi", content_type="text/plain"))
    msg = msg.replace("From", f"<sip:someone{n}@elsewhere.example.org>;tag=x{n}")
    return udp_transaction(node.port, msg, source="127.0.0.61", timeout=10)


def _proxies(proxy_factory, name):
    home = proxy_factory(name + "-h", e2m=False)
    other = proxy_factory(name + "-v", e2m=False, domains=("example.net",))
    return home, other


def _passes(home, other, user, n):
    before = _created(home) + _created(other)
    reply = _strangers_message(home, user, n)
    time.sleep(1.0)
    return _created(home) + _created(other) - before, reply and reply.status


def test_hole_k2_bindings_at_two_proxies_naming_each_other_loop_seventy_times(proxy_factory):
    home, other = _proxies(proxy_factory, "r112-pp")
    first = _register(home, "dave", "example.com", f"<sip:dave@127.0.0.1:{other.port}>")
    second = _register(other, "dave", "example.net", f"<sip:dave@127.0.0.1:{home.port}>")
    statuses = (first and first.status, second and second.status)
    if 403 in statuses:
        return          # secure too: the trap cannot be set
    assert statuses == (200, 200)
    made, answer = _passes(home, other, "dave", 1)
    print("transactions (both proxies):", made, "stranger answered", answer)
    # secure: the request is not sent round between the two (at most a pass or two back)
    assert made <= 4, (made, answer)


def test_control_k2_a_binding_naming_the_other_proxy_alone_is_two_passes(proxy_factory):
    home, other = _proxies(proxy_factory, "r112-pp1")
    bound = _register(home, "erin", "example.com", f"<sip:erin@127.0.0.1:{other.port}>")
    assert bound is not None and bound.status == 200
    made, answer = _passes(home, other, "erin", 2)
    assert made <= 2 and answer == 404, (made, answer)


def test_control_k2_a_binding_naming_the_proxy_itself_is_refused(proxy_factory):
    home, _ = _proxies(proxy_factory, "r112-pp2")
    refused = _register(home, "fred", "example.com", f"<sip:fred@127.0.0.1:{home.port}>")
    assert refused is not None and refused.status == 403
    assert refused.reason == "Contact Names This Proxy"
