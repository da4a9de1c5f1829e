"""Review 123 (attacker's review of 487265c), wire: honest break HB3 of stop 40's fix of
review 122 K1: the certificate service now counts an IPv6 source by its /64
(``SubscriptionTable.add`` with ``tcp_sweep.share_key``), and a /64 is a LAN, not a line.

**Honest break HB3: two phones on one IPv6 LAN (one /64, each phone its own global
address, no NAT) share one per-source bound of 20 follows.**  No attacker.

- Set-up: a real Kamailio 5.6 E2M proxy with ``[certs]`` at the product's bounds (20
  per source, 100 per AoR, 10,000 in all), listening on ``[::1]`` too, in a network
  namespace of its own (``unshare -n``) where ``2001:db8:123:1::/64`` and
  ``2001:db8:123:2::/64`` are routed to loopback (review 122's wire harness and its
  ``_Peer``: a raw subscriber that answers every NOTIFY 200).
- Messages: phone A at ``2001:db8:123:1::a`` follows twelve peers
  (``SUBSCRIBE sip:peer<n>@example.com``, ``Event: certificate``, ``Expires: 3600``),
  then phone B at ``2001:db8:123:1::b`` (same LAN) follows twelve others, then phone C
  at ``2001:db8:123:2::c`` (another LAN) twelve more.
- Observed on 487265c: A 12 of 12; **B 8 of 12, then 403 for the last four**; C 12
  of 12.  An e2m-phone follows up to 64 peers (``pjsua_hooks/certservice_client.py``,
  ``MAX_FOLLOWED``); a refused follow falls back to fetches and is not tried again for
  300 s, so for those peers the phone hears nothing when a certificate is replaced or
  withdrawn (review 107's reason to follow).  SLAAC gives every host of an office or
  home LAN an address in one /64 (RFC 4291, RFC 4862): the LAN's phones together get
  20 follows, where before stop 40 each had 20.  Review 122 HB1 saw the same for users
  behind one visited proxy and noted it for one IPv4 NAT address; an IPv6 LAN has no
  shared address, the /64 rule makes one.
- Code at fault: ``kamailio_app/cert_table.py:338`` (``sub = replace(sub,
  source=share_key(sub.source))``) and ``_check_bounds`` (``:366-372``), which
  counts ``source = ?`` against ``max_subscriptions_per_source``; ``share_key`` is
  ``kamailio_app/tcp_sweep.py:52-63``.
- Suggested fix: two tiers: the per-address bound as before (20 per exact address), and
  a per-/64 bound several times larger (e.g. ``max_subscriptions_per_source`` x 10 by
  default, its own key) that still stops review 122's stranger well below the total;
  or count authenticated subscribers by their AoR rather than their address.

Control (unmarked, pass): ``test_control_hb3_a_phone_on_another_lan_follows_twelve``:
the LAN's first phone and a phone in another /64 each get twelve of twelve (the bound
is per /64, and works).

Tried and held (per-source bound and exemption, run):
``tests/cluster/test_review123_front_follows.py`` (follows through a cluster's front are
exempt, but never confirmed and dropped on probation).

Fixed (stop 41), HB3: a subscription's source is kept as ``"<site> <address>"``
(``cert_table.subscription_source``) and counted twice: each address
``max_subscriptions_per_source`` (20), its site (``sources.site_of``, an IPv6 /56) five
times that (``per_site``, 100), so an office's phones each have their 20 and one line
still cannot fill the service (100 of the default 10,000).  The hole test failed on the
code before the fix (a ``git stash`` of ``kamailio_app``) and passes with it; the marker
is off.  Review 122's tests now assert the per-site figure.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from e2m_lab import netns

from e2m_lab.ports import free_port
from tests.kamailio.test_review122_certservice_wire import _Peer

pytestmark = pytest.mark.kamailio

INSIDE = netns.inside("R123")
OUT = netns.result_path("R123")
LAN = "2001:db8:123:1::"          # one office LAN: one /64, each phone its own address
ELSEWHERE = "2001:db8:123:2::"    # another LAN
PEERS = 12                        # peers each phone follows (an e2m-phone follows up to 64)


@pytest.fixture(scope="module")
def netns_run(tmp_path_factory) -> dict:
    return netns.run_inner(__file__, "test_inner_phones_on_one_lan", "R123", tmp_path_factory,
                           timeout=300)


def test_hole_hb3_two_phones_on_one_ipv6_lan_follow_twelve_each(netns_run):
    r = netns_run
    assert r["lan_a"].count(200) == PEERS and r["lan_b"].count(200) == PEERS, r


def test_control_hb3_a_phone_on_another_lan_follows_twelve(netns_run):
    r = netns_run
    assert r["lan_a"].count(200) == PEERS           # the first phone of the LAN: all kept
    assert r["elsewhere"].count(200) == PEERS, r    # another /64: its own bound


def _netns_up() -> None:
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "-6", "route", "add", "local", f"{LAN}/64", "dev", "lo", "table", "local"],
                ["ip", "-6", "route", "add", "local", f"{ELSEWHERE}/64", "dev", "lo", "table",
                 "local"]):
        subprocess.run(cmd, check=True, capture_output=True)


def _follows(phone: _Peer, port: int, first: int) -> list:
    codes = []
    for n in range(first, first + PEERS):
        codes.append(phone.subscribe(port, f"sip:peer{n}@example.com", n))
        time.sleep(0.05)
    return codes


@pytest.mark.skipif(not INSIDE, reason="the inner half, run by the outer tests in a netns")
def test_inner_phones_on_one_lan(proxy_factory):
    _netns_up()
    port = free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:[::1]:{port}"]
    proxy = proxy_factory("r123", port=port, extra={"kamailio": {"listen": listen}})
    result = {"lan_a": _follows(_Peer(f"{LAN}a"), proxy.port, 0)}
    time.sleep(1.0)
    phone_b = _Peer(f"{LAN}b")
    result["lan_b"] = _follows(phone_b, proxy.port, 100)
    result["lan_b_reason"] = phone_b.reason
    time.sleep(1.0)
    result["elsewhere"] = _follows(_Peer(f"{ELSEWHERE}c"), proxy.port, 200)
    Path(OUT).write_text(json.dumps(result))
