"""Review 160, phone: hole K1 of ``tests/unit/test_review160_fake_dialog_policies.py``
on a real ``e2m-phone listen`` (pjsua2): see that module for the findings, figures and
what held.

Set-up: the stranger lab of ``tests/e2e/test_phone_stranger.py`` (bob's phone with no
home, a UDP stranger on 127.0.0.1, an HTTP server on 127.0.0.1 counting connections),
as review 159's ``test_review159_invite_policies_phone.py``.  The stranger's From is
``sip:mallory@127.0.0.1``, so 127.0.0.1 is a proxy host the phone accepts for her.

- ``test_hole_k1_a_strangers_request_with_a_made_up_to_tag_fetches_nothing`` (strict
  xfail): one bodiless INFO with a To tag of no dialog of the phone's, one
  ``Proxy-Body-Policy`` with a ``cert-url`` on the test's server: pjsua answers 481,
  and the phone still opens an HTTP connection to the URL (1 within 2.5 s).
- ``test_control_k1_the_same_info_without_a_to_tag_fetches_nothing``: the same INFO
  without a To tag (a stranger's out-of-dialog request) fetches nothing.

Fixed (stop 48): an in-dialog request teaches policies only when its To tag is ours in
an INVITE dialog we are in, under its Call-ID and between its parties
(``UAEngine._in_our_dialog``): the INFO here, answered 481, fetches nothing.  The hole
test, no longer marked, failed on fa4a16f and passes.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_phone_stranger import (Lab, assert_serving, lab, pki,  # noqa: F401
                                           policy)

pytestmark = [pytest.mark.pjsua2]

MALLORY = "<sip:mallory@127.0.0.1>;tag=m160"


def _wait_hits(server, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while server.connections == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return server.connections


def _info(lab: Lab, to: str) -> tuple[int | None, int]:
    server = lab.server("silent")
    bob = lab.phone(phone={"fetch_timeout": 2.0})
    stranger = lab.stranger(bob)
    _, call_id = stranger.request("INFO", from_=MALLORY, to=to,
                                  headers=[policy("127.0.0.1", server.url(),
                                                  view="INVITE:*")])
    status = stranger.final(call_id, timeout=3.0)
    connections = _wait_hits(server, 2.5)
    assert_serving(bob, stranger, "after the stranger's INFO")
    return status, connections


def test_hole_k1_a_strangers_request_with_a_made_up_to_tag_fetches_nothing(lab: Lab):
    status, connections = _info(lab, "<sip:bob@example.com>;tag=nosuchdialog")
    assert connections == 0, (f"an INFO in no dialog (answered {status}) made the phone "
                              f"open {connections} connection(s) to the URL it named")


def test_control_k1_the_same_info_without_a_to_tag_fetches_nothing(lab: Lab):
    status, connections = _info(lab, "<sip:bob@example.com>")
    assert connections == 0, f"answered {status}, {connections} connection(s)"
