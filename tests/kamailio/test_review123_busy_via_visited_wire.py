"""Review 123 (attacker's review of 487265c), wire: the certificate service's SUBSCRIBE
cap (``[certs] max_subscribes_per_second``, ``CertService.admits_subscribe``: 503 with
``Retry-After: 2``) as a phone behind a visited proxy (deployment example #3, ``make
demo``'s topology) gets it, and the phone's busy retry (``pjsua_hooks``
``_retry_after``, ``_BUSY``, ``BUSY_RETRIES``) that stop 40 built for it.  The phone's
half, with the real ``CertServiceClient``, is ``tests/unit/test_review123_busy_500.py``.

**Honest break HB5: behind a visited proxy the service's "busy, try again in 2 s"
arrives as "500 Server Internal Error" without Retry-After; the phone takes it for a
failure: one busy second fails the send and marks bob's service failed for 300 s**
(review 121 HB1, fixed by stop 40 for phones that reach the home directly only).  No
attacker needed (load past the cap); a stranger keeping the service at its rate (the
residual in ``docs/threat-model.md``) makes it every time.

- Set-up: the home proxy (E2M on, ``[certs] max_subscribes_per_second = 2`` so that a
  handful of SUBSCRIBEs passes it; the product's default is 100) and a visited proxy in
  front of it (``e2m = false``, ``next_hop`` the home), both the product's own
  (``start_proxy``), as ``test_review122_visited_follows_wire.py`` builds them.
- Messages: six fetches (``SUBSCRIBE sip:peer<n>@example.com``, ``Event: certificate``,
  ``Expires: 0``) in a row, straight to the home, then through the visited proxy.
- Observed on 487265c (two runs): straight: 200, 200, then ``503`` with
  ``Retry-After: 2`` for the other four; **through the visited proxy: 200, 200, then
  ``500`` with no Retry-After** for the other four.  The client (unit module): a 500
  without Retry-After is no "not now" (``_BUSY`` needs a readable Retry-After,
  ``pjsua_hooks/certservice_client.py:447-455``), so a follow counts as refused (the
  fetch in its place gets the same 500) and the fetch as failed: with the service busy
  for one second, the send fails ("the certificate service answered 500 Server
  Internal Error") after 2 SUBSCRIBEs, remembered ``OUTCOME_MAX_AGE`` (300 s); answered
  503 Retry-After directly, the same second is waited out (control).
- Why: Kamailio's tm remaps a final 503 from downstream to a locally made 500
  (``remap_503_500``, on by default, RFC 3261 16.7 step 6), which carries none of the
  503's headers; the cfg template (``kamailio_app/templates/kamailio.cfg.tmpl``) keeps
  the default, and the service chose 503 (``kamailio_app/cert_route.py:179-192``).
- Suggested fix: answer past the cap with a code no proxy rewrites and the phone already
  takes as "not now": ``480 Temporarily Unavailable`` with ``Retry-After`` (RFC 3261
  21.4.18 allows it; ``_BUSY`` has 480); or set ``remap_503_500`` to 0 in the template
  for a proxy that relays (the front has its own reasons to see a node's 503); and let
  the phone treat a 500 without Retry-After from its certificate service as busy once.

Control (unmarked, pass): ``test_control_hb5_straight_to_the_home_busy_is_503_retry_after_2``:
the cap and its 503 ``Retry-After: 2`` live (two served, four 503).

Fixed (stop 41), HB5, at both ends: our proxy's failure route (armed for every relayed
request now) answers a downstream 503 that has a Retry-After with a 500 carrying it
(``relay_retry_after``: delta-seconds only, six digits at most), which RFC 3261 16.7
allows; and the phone takes a 500 or 503 without Retry-After to its certificate
SUBSCRIBE as "busy" too, waiting 2 s (``_BARE_BUSY_WAIT``; at most twice, as before), for
visited proxies that are not ours.  Both hole tests failed on the code before the fix (a
``git stash`` of ``kamailio_app`` and ``pjsua_hooks``) and pass with it; the markers are off.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.kamailio_harness import start_proxy

pytestmark = pytest.mark.kamailio


@pytest.fixture
def proxies(pki, tmp_path):
    home = start_proxy(tmp_path / "home", pki=pki, e2m=True,
                       extra={"certs": {"max_subscribes_per_second": 2}})
    try:
        visited = start_proxy(tmp_path / "visited", pki=None, e2m=False, next_hop=home.uri)
        try:
            yield home, visited
        finally:
            visited.stop()
    finally:
        home.stop()


def _fetches(port, source, count):
    client = CertClient(port, "alice", source=source)
    try:
        out = []
        for n in range(count):
            answer, _ = client.subscribe(f"sip:peer{n}@example.com", 0)
            out.append(None if answer is None else (answer.status, answer.get("Retry-After")))
        return out
    finally:
        client.close()


def test_hole_hb5_behind_a_visited_proxy_busy_says_when_to_try_again(proxies):
    home, visited = proxies
    out = _fetches(visited.port, "127.0.123.32", 6)
    print(f"\nthrough the visited proxy: {out}")
    refused = [a for a in out if a is not None and a[0] >= 300]
    assert refused, out
    # secure for the phone: a "not now" it can act on (480, 500 or 503 with Retry-After)
    assert all(code in (480, 500, 503) and after for code, after in refused), out


def test_control_hb5_straight_to_the_home_busy_is_503_retry_after_2(proxies):
    home, _ = proxies
    out = _fetches(home.port, "127.0.123.31", 6)
    print(f"\nstraight to the home: {out}")
    assert out[:2] == [(200, None)] * 2
    assert set(out[2:]) == {(503, "2")}
