"""Review 159, phone: the policies a stranger's INVITE plants (see
``tests/unit/test_review159_learned_policies.py`` for the findings, their figures and
what held).  This module shows hole K2 on a real ``e2m-phone listen`` (pjsua2): one
bodiless INVITE from a sender the phone knows nothing of, which the phone refuses, makes
it open an HTTP connection to a URL of that sender's choice (1 connection within 2.5 s,
the INVITE answered 403); read, not run: again after each 30 s cool-down for as long as
the planted policy lives (up to ``max_policy_expires``, 86,400 s).

Set-up: the stranger lab (``tests/e2e/test_phone_stranger.py``): bob's phone
with no home (so no home gate; with a home the same INVITE comes through the home
proxy, which removes only policy values naming itself, ``proxy.py:_policies_in_our_name``),
a UDP stranger on 127.0.0.1 and an HTTP server on 127.0.0.1 counting connections.  No
``[e2m] accept_proxies``: the stranger's From is ``sip:mallory@127.0.0.1``, so its own
domain, 127.0.0.1, is a proxy host the phone accepts for it (``ua.py:accepts_proxy``).

- ``test_hole_k2_a_strangers_refused_invite_makes_the_phone_fetch_its_cert_url`` (strict
  xfail): the INVITE is answered with a final failure (403, no checked certificate of
  the caller) and the HTTP server still gets the phone's GET.
- ``test_control_k2_the_same_policy_in_a_strangers_options_fetches_nothing``: the same
  header in an OPTIONS teaches nothing (issue 12): no connection.
- ``test_control_k2_the_server_is_fetched_when_the_registrar_announces_it``: the same
  policy in the 200 to bob's own REGISTER is fetched (the harness can see a fetch).

Fixed (stop 48): an initial INVITE's policies wait for the phone's answer
(``UAEngine._park_invite_policies``): taken when it rings or answers, dropped when it
refuses (the 403 here), so nothing is fetched.  The hole test, no longer marked, failed
on 384cc70 and passes.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_phone_stranger import (Lab, assert_serving, lab, pki,  # noqa: F401
                                           policy)

pytestmark = [pytest.mark.pjsua2]

MALLORY = "<sip:mallory@127.0.0.1>;tag=m159"


def _wait_hits(server, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while server.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.connections


def test_hole_k2_a_strangers_refused_invite_makes_the_phone_fetch_its_cert_url(lab: Lab):
    server = lab.server("silent")
    bob = lab.phone(phone={"fetch_timeout": 2.0})
    stranger = lab.stranger(bob)
    _, call_id = stranger.request("INVITE", from_=MALLORY,
                                  headers=[policy("127.0.0.1", server.url(),
                                                  view="INVITE:*")])
    status = stranger.final(call_id, timeout=3.0)
    assert status is not None and status >= 400, f"the INVITE was answered {status}"
    connections = _wait_hits(server, 2.5)
    assert_serving(bob, stranger, "after the stranger's INVITE")
    assert connections == 0, (f"a refused ({status}) stranger's INVITE made the phone open "
                              f"{connections} connection(s) to the URL it named")


def test_control_k2_the_same_policy_in_a_strangers_options_fetches_nothing(lab: Lab):
    server = lab.server("silent")
    bob = lab.phone(phone={"fetch_timeout": 2.0})
    stranger = lab.stranger(bob)
    stranger.request("OPTIONS", from_=MALLORY,
                     headers=[policy("127.0.0.1", server.url(), view="INVITE:*")])
    connections = _wait_hits(server, 2.5)
    assert_serving(bob, stranger, "after the stranger's OPTIONS")
    assert connections == 0


def test_control_k2_the_server_is_fetched_when_the_registrar_announces_it(lab: Lab):
    server = lab.server("silent")
    registrar = lab.registrar([policy("127.0.0.1", server.url(), view="INVITE:*")])
    bob = lab.phone(phone={"fetch_timeout": 2.0, "registrar": registrar.uri},
                    e2m={"accept_proxies": ["127.0.0.1"]})
    stranger = lab.stranger(bob)
    assert _wait_hits(server, 4.0) >= 1
    assert_serving(bob, stranger, "after the registrar's policy")
