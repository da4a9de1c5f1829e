"""Review 122 (attacker's review of 2161459), on a real Kamailio 5.6 E2M proxy with its
certificate service: follow SUBSCRIBEs from many addresses of one IPv6 /64.

The unit form of hole K1, with the reasoning, the code at fault and the fix, is
``tests/unit/test_review122_subscriptions_per_64.py``; this module shows it end to end.

Set-up: the test runs its inner half in a fresh network namespace (``unshare -n``, root
only; skipped elsewhere) so it can give loopback a whole /64 without touching the
machine: ``ip -6 route add local 2001:db8:122::/64 dev lo table local`` (the stranger's line) and
``2001:db8:999::/64`` (an honest phone's).  One E2M proxy (``proxy_factory``, open
registrar, ``[certs]`` on) listening on ``udp:127.0.0.1:P``, ``tcp:127.0.0.1:P`` and
``udp:[::1]:P``, with ``[certs] max_subscriptions = 50`` (the product's 10,000 scaled
down; the per-source bound is the product's 20, pike and the new-subscription rate are
the product's).

Hole K1 on the wire (``test_hole_k1_wire_one_64_fills_the_service_honest_follow_403``):

- Messages: an honest follow ``SUBSCRIBE sip:bob@example.com`` (``Event: certificate``,
  ``Expires: 3600``) from ``[2001:db8:999::10]``: 200 and a NOTIFY, answered.  Then the
  stranger, from ``2001:db8:122::1``, ``::2``, ``::3`` in turn, sends follows to
  ``sip:u<n>@example.com`` (new Call-ID, tag and branch each; 21 from ``::1``, 20 from each
  of the others), each about 20 ms apart, and answers every NOTIFY 200.  Then a second
  honest follow from ``[2001:db8:999::11]``.
- Observed (two runs, the same figures): the honest follow 200; ``::1``: 20 kept, its
  21st ``403 Too Many Subscriptions`` (the per-source bound); ``::2``: 20 kept; ``::3``:
  9 kept, 11 refused (the service is full: 1 honest + 49 of the /64); the second honest
  follow ``403 Too Many Subscriptions``.  Every SUBSCRIBE was answered (no ban, no
  503); the stranger answered 49 NOTIFYs 200, so none of his places was on probation.
  The /64 held 49 places where the per-source rule meant it to hold 20.

Controls (unmarked, pass): ``test_control_k1_wire_first_honest_follow_and_per_address_bound``
(the first honest follow 200; one address's 21st follow 403: the bound works per
address, pike let the stranger through, and the service answered every SUBSCRIBE).

Tried and held (this review)
----------------------------

- pjsua2's Call-IDs, tags and Via branches (the brief's first target).  Measured on the
  pinned wheel in a real pjsua2 endpoint: ``pj_generate_unique_string`` is pjlib's
  ``guid_simple`` over glibc ``rand()`` (the ``.so`` imports ``rand``/``srand`` and no
  uuid library): each identifier is 8 consecutive ``rand()`` outputs, 4 characters each
  (``"0-9aAbB...zZ-."[byte & 63]``); after ``srand(777)`` in the phone's process its next
  MESSAGE carried From tag = outputs 0-7, Call-ID = 8-15, CSeq = ``output 16 & 0xffff``,
  Via branch = ``z9hG4bKPj`` + outputs 17-24, exactly as modelled.  pjsua seeds
  ``rand()`` once from a 32-bit hash of host name, address, time of day (ms) and pid.
  So every MESSAGE a phone sends hands its recipient (an insider UA) 25 consecutive
  partial outputs of a non-cryptographic generator, and a certificate NOTIFY is matched
  by Call-ID and our From tag alone before the first one (``certservice_client.py:453-467``;
  an empty NOTIFY then marks the peer's current certificate withdrawn for good,
  ``e2m_plugins/ua.py:630-645``).  Not shown: a prediction of the next Call-ID/tag from
  what an attacker sees (the low bit and two bits per byte are hidden, and the seed
  search is 2^32 glibc ``srandom`` runs plus an unknown offset).  No hole is claimed;
  it is listed as untried for a later review, with the suggested hardening (pjsua's
  ``pj_create_random_string`` over ``RAND_bytes``, or the hook rewriting Call-ID and
  tags of what the phone originates) in the report.
- NOTIFY fan-out (read, not measured here): a replaced certificate marks its followers
  (``changed``), bounded per AoR (100) and sent by the timer at most ``BATCH`` (100) a
  tick, one per subscription per ``notify_interval``; replacements in between coalesce.
- Guessing the branch of a NOTIFY sent to someone else (to confirm a forged
  subscription from one's own address, which ``on_reply`` would take: it checks tm's
  match and the ``e2mnotify`` note, not the reply's source).  Run: tm's local branch is
  ``z9hG4bK<hash>.<label>000...0.0``; six fetches under one Call-ID (so one hash bucket)
  got six unrelated 32-bit labels (``241beea2``, ``7c69c352``, ``cff59af7``, ...): no
  sequence to follow.  Held.
- A TLS connection that sent one whole OPTIONS (404) and then trickles a partial
  MESSAGE, a byte every 2 s, with ``tcp_idle_timeout = 5``: still open after 25 s (Kamailio
  5.6 has no per-message read timeout; any byte is traffic), and an honest TLS client
  from another address was served meanwhile.  That is review 28's "spoke once, then
  keep-alives" and is bounded the same way (``tcp_connections_per_source``, the table;
  the read buffer is allocated per connection anyway): no new cost.  Stalled readers
  on the proxy's writes (``tcp_wq_max``, Kamailio's send timeout) were read, not run.
- A cluster's certificate service (run, see ``tests/cluster/test_review122_cert_split_cluster.py``
  for the honest break found there).  Also seen: in an ``advertise`` cluster a node's
  NOTIFY carries the advertised address as its only Via (``SIP/2.0/UDP
  127.0.0.66:5066;branch=...``), so its 200 or 481 confirms or ends something only if it
  comes back to that node (its tm transaction and ``e2mnotify`` note are its own).
  Behind a front the service is documented as unusable for phones
  (``kamailio_app/README.md``, ``front``).

Fixed (stop 40): ``SubscriptionTable.add`` keeps a subscription's source as it is
counted, ``tcp_sweep.share_key`` (an IPv6 address's /64, as the TCP connection shares
are counted since review 29); a refresh must come from the same /64.  The hole test
failed on the code before the fix and passes with it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from e2m_lab import netns

from e2m_lab.ports import free_port
from e2m_plugins.sip import make_response, parse

pytestmark = pytest.mark.kamailio

INSIDE = netns.inside("R122")
OUT = netns.result_path("R122")
STRANGER = "2001:db8:122::"
HONEST = "2001:db8:999::"
TOTAL = 200             # stop 41: above the stranger's site's 100 (5 addresses of 20);
                        # at 50, one site could take every place it had
IPV6_FREEBIND = 78      # linux/in6.h (the route below makes the /64 local anyway)


# ----------------------------------------------------------------------------- outer half

@pytest.fixture(scope="module")
def netns_run(tmp_path_factory) -> dict:
    return netns.run_inner(__file__, "test_inner_k1_flood_from_one_64", "R122", tmp_path_factory,
                           timeout=300)


def test_hole_k1_wire_one_64_fills_the_service_honest_follow_403(netns_run):
    r = netns_run
    # secure: each address 20 places, and the next honest follow is kept.  Since stop 41
    # the /64's site holds SITE_SHARES (5) addresses' worth, 100 of the default 10,000
    # (review 123 HB3: an office LAN's phones shared 20), so this test's total is 200
    assert all(t.get("200", 0) <= 20 for t in r["per_address"].values()), r
    assert r["honest_after"] == 200, r


def test_control_k1_wire_first_honest_follow_and_per_address_bound(netns_run):
    r = netns_run
    assert r["honest_before"] == 200
    assert r["per_address"]["1"] == {"200": 20, "403": 1}, r
    assert r["notifies_answered"] >= r["stranger_kept"], r    # each kept one confirmed
    assert r["unanswered"] == 0, r      # no SUBSCRIBE dropped: no ban, no rate limit


# ----------------------------------------------------------------------------- inner half

class _Peer:
    """A UDP socket on one address of a /64 routed to loopback, that answers NOTIFYs."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        self.sock.bind((address, 0))
        self.port = self.sock.getsockname()[1]
        self.notifies = 0
        self.reason = ""

    def subscribe(self, proxy_port: int, aor: str, n: int) -> int | None:
        """One follow; its final status (NOTIFYs met meanwhile answered 200)."""
        call_id = f"r122-{self.address}-{n}"
        request = "\r\n".join([
            f"SUBSCRIBE {aor} SIP/2.0",
            f"Via: SIP/2.0/UDP [{self.address}]:{self.port};rport;branch=z9hG4bKr122{n}x"
            f"{self.address.replace(':', '')}",
            f"From: <sip:x@example.net>;tag=t{n}", f"To: <{aor}>", f"Call-ID: {call_id}",
            "CSeq: 1 SUBSCRIBE", "Max-Forwards: 70", "Event: certificate",
            "Accept: application/pkix-cert", "Expires: 3600",
            f"Contact: <sip:x@[{self.address}]:{self.port}>", "Content-Length: 0", "", ""])
        self.sock.sendto(request.encode(), ("::1", proxy_port))
        status = None
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            message = parse(data)
            if message.is_request and message.method == "NOTIFY":
                self.sock.sendto(make_response(message, 200, "OK").serialize(), source)
                self.notifies += 1
                if message.call_id == call_id and status is not None:
                    break
            elif not message.is_request and message.call_id == call_id \
                    and (message.status or 0) >= 200:
                status = message.status
                self.reason = message.reason or ""
                if status >= 300:
                    break
        return status


def _netns_up() -> None:
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "-6", "route", "add", "local", f"{STRANGER}/64", "dev", "lo", "table", "local"],
                ["ip", "-6", "route", "add", "local", f"{HONEST}/64", "dev", "lo", "table", "local"]):
        subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.skipif(not INSIDE, reason="the inner half, run by the outer tests in a netns")
def test_inner_k1_flood_from_one_64(proxy_factory):
    _netns_up()
    port = free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:[::1]:{port}"]
    proxy = proxy_factory("r122", port=port, extra={"kamailio": {"listen": listen},
                                                    "certs": {"max_subscriptions": TOTAL}})
    result: dict = {}
    honest = _Peer(f"{HONEST}10")
    result["honest_before"] = honest.subscribe(proxy.port, "sip:bob@example.com", 1)
    per_address: dict[str, dict[str, int]] = {}
    kept = n = 0
    unanswered = notifies = 0
    for a, count in ((1, 21), (2, 20), (3, 20)):
        peer = _Peer(f"{STRANGER}{a:x}")
        tally: dict[str, int] = {}
        for _ in range(count):
            n += 1
            status = peer.subscribe(proxy.port, f"sip:u{n}@example.com", n)
            if status is None:
                unanswered += 1
            tally[str(status)] = tally.get(str(status), 0) + 1
            kept += status == 200
            time.sleep(0.02)
        per_address[str(a)] = tally
        time.sleep(1.0)     # each address well under pike's 30 a 2 s
        notifies += peer.notifies
    result.update(per_address=per_address, stranger_kept=kept, unanswered=unanswered,
                  notifies_answered=notifies)
    time.sleep(1.5)
    later = _Peer(f"{HONEST}11")
    result["honest_after"] = later.subscribe(proxy.port, "sip:bob@example.com", 2)
    result["honest_after_reason"] = later.reason
    Path(OUT).write_text(json.dumps(result))
