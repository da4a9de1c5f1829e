"""Review 121 (attacker's review of 2161459), wire: stop 40's cap on new certificate
subscriptions (``[certs] max_new_subscriptions_per_second``, ``CertService.
admits_new_subscription``, pipelimit before ``route_certs``) on a real Kamailio 5.6 E2M
proxy, with review 120 K5's set-up (``test_review120_fetch_flood_wire``: 32 MB of shared
memory, 48 addresses each under pike's rate, an honest MESSAGE every 4 s).

**Hole K1: refreshes bypass the cap** (``test_hole_k1_refreshes_from_many_addresses_take_the_shm``).
Attacker: an **off-path sender** (a stranger: no account; a certificate is public, RFC
6072, so anyone may follow one) with many addresses, each under pike's rate.

- Set-up: one E2M proxy (``shm_mb = 32``, [certs] on with the default
  ``max_new_subscriptions_per_second = 100``), dave registered (review 120's ``_start``).
- Messages: 48 addresses (127.4.1.1 ...) each open ONE follow (``SUBSCRIBE
  sip:bob@example.com``, ``Event: certificate``, ``Expires: 600``; 33 a second, under the
  cap) and answer its first NOTIFY 200 (confirmed).  Then each sends 10 in-dialog
  SUBSCRIBEs a second (Request-URI the 200's Contact, its To tag, CSeq + 1 each,
  ``Expires: 600``) for 20 s, 480 a second in all, never answering the NOTIFYs; alice
  sends dave a MESSAGE every 4 s.
- Observed (run): set-up 48 subscriptions; 4 s in, ``real_used`` 33.68 MB of 33.55 MB;
  9,600 refreshes sent, 4,412 answered 200 (each with a NOTIFY: 8,356 NOTIFY datagrams
  with retransmissions), 5,140 answered ``500``; **every one of alice's 4 MESSAGEs got
  500**; no address banned (``e2mban`` 0).  The same figures as review 120's K5 before
  its fix: the cap does not see these requests.
- Code at fault: the cap is asked for initial SUBSCRIBEs only (``kamailio_app/kemi.py:1052-1054``);
  an in-dialog SUBSCRIBE goes ``route_in_dialog`` -> ``route_certs(route_resubscribe)``
  (``kemi.py:1399-1402``) with no count; ``CertService.route_resubscribe``
  (``kamailio_app/cert_route.py:234-282``) makes a server transaction and, for every
  accepted refresh, a NOTIFY with the certificate (``:261``, ``:277``; RFC 6665 wants a
  NOTIFY after every accepted SUBSCRIBE), nothing limiting how often one dialog is
  refreshed.  One subscription per address suffices (the per-source bound, 20, and the
  per-AoR bound, 100, count subscriptions, not refreshes).
- Suggested fix: count every SUBSCRIBE the service serves, refreshes included, in the
  same pipe (or a second one) before ``route_certs``; and/or refuse a refresh of one
  dialog sooner than ``min_expires``/2 after the last accepted one (423 or a 200 with no
  new NOTIFY: RFC 6665 lets the notifier rate-limit), so one subscription cannot be
  turned into 10 NOTIFYs a second.

Control (unmarked): ``test_control_k1_the_same_addresses_fetching_are_capped``: the same
48 addresses at the same rate sending initial fetches (review 120's flood): 9,600 sent,
2,000 served (100 a second), 7,552 ``503``; ``real_used`` peaked at 17.5 MB; alice's 4
MESSAGEs all 200.  So the rate and the addresses are what the cap holds; the refresh's
path is the difference.

Tried and held (this review):

- The NOTIFY branch table (``e2mnotify`` under ``$via0(branch)``, read): an answer whose
  branch differs only in letter case may still match tm's transaction (tm reads the
  hash and label as hex; not run), but ``sht_get`` finds no item and ``on_reply`` returns
  (``sent_in`` None): fail-closed, it confirms or deletes nothing.  A reply with two
  ``branch`` parameters: tm and ``$via0(branch)`` read the same parsed field.
- In-dialog SUBSCRIBEs to dialogs we do not have (read): 481 at once, a server
  transaction and no NOTIFY; a refresh from another address than the subscription's:
  403 (``route_resubscribe``'s source check), so K1 needs the subscriber's own address.
- The cap itself (control above): 503 with ``Retry-After: 5``, stateless, counted in
  ``e2m_certs_busy``; the fetches past it cost nothing held.
- Phones on 503 (``tests/unit/test_review121_cert_busy.py``): no storm (two SUBSCRIBEs
  per busy second, then none); but see that module's honest break.
- The loop note's retransmission exemption (``kemi._resent``, ``_via_shape``, read, not
  run): a coming is exempt only with the first coming's Max-Forwards, Via count and
  whole bottom entry (branch included), and no Via of ours below the top one.  A hop
  that keeps Vias adds at least its own and ours (count grows, ours below the top); a
  Via-hiding hop (reviews 114/116) brings its own bottom entry with a branch derived
  from the incoming stack, whose top is our per-transaction branch, so another shape.
  An exempt loop needs a hiding hop that rewrites Max-Forwards afresh AND repeats one
  Via byte for byte; then its pass is tm's retransmission of the live transaction
  (absorbed) unless the hop waits past the transaction's end (tm's wait after the final
  answer, longer without one): a slow pass at most, by a hop built for it.  Comma-joined Via
  lines are split before counting; more than 16 lines give no shape (never exempt);
  a cluster front's Via is admitted on top only.
- ``end_failed_invite_notes`` (read, not run): it runs after ``failover`` (a front that
  fails over returns first) and only for INVITE; the branch note is cut to 32 s, the
  caller's target note removed only when not bound to a dialog ("|").  A late 2xx after
  the failure finds no caller's target and notes no dialog targets: the dialog's keys
  then go at their expiry rather than at its BYE (the designed fallback, no refusal).
  A hop that makes alice's INVITE fail (486) to cut her branch note gains nothing:
  her INVITE has ended, so a ``;e2mnr=`` mark minted for her Via afterwards answers no
  live transaction of hers.

Fixed (stop 40): renewals go through the same pipe as fetches and follows
(``CertService.admits_subscribe``, called in ``route_in_dialog`` too; the setting is now
``[certs] max_subscribes_per_second``).  The hole test failed on the code before the
fix and passes with it.
"""

from __future__ import annotations

import collections
import os
import socket
import time

import pytest

from e2m_plugins import sip
from e2m_lab.kamailio_harness import SipUa, make_response
from tests.kamailio.test_review120_fetch_flood_wire import _fetch, _start

pytestmark = [pytest.mark.kamailio]

SOURCES = 48
PER_SOURCE_RATE = 10      # a second per address: under pike's 30 per 2 s
FLOOD_SECONDS = 20.0
PROBE_EVERY = 4.0


def _subscribe(host, port, n, *, call_id, tag, cseq=1, ruri="sip:bob@example.com",
               to_tag=None, expires=600):
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    return (f"SUBSCRIBE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};rport;branch=z9hG4bK-r121-{os.getpid()}-{n}\r\n"
            f"From: <sip:m@elsewhere.example>;tag={tag}\r\nTo: {to}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} SUBSCRIBE\r\nMax-Forwards: 70\r\n"
            f"Event: certificate\r\nExpires: {expires}\r\nContact: <sip:{host}:{port}>\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def _drain(sock, stats, *, answer_notify):
    """Read what came; answer NOTIFYs 200 when ``answer_notify``; the SUBSCRIBE 200s."""
    oks = []
    try:
        while True:
            data, peer = sock.recvfrom(65535)
            if data.startswith(b"SIP/2.0"):
                stats[data[:11].decode("ascii", "replace")] += 1
                msg = sip.parse(data)
                if msg.status == 200 and msg.cseq[1] == "SUBSCRIBE":
                    oks.append(msg)
                continue
            stats["NOTIFY"] += 1
            if answer_notify:
                msg = sip.parse(data)
                sock.sendto(make_response(msg, 200, "OK").serialize(), peer)
    except OSError:
        pass
    return oks


def _sockets(prefix):
    socks = []
    for i in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"{prefix}.{1 + i // 250}.{i % 250 + 1}", 0))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _follow_one_each(proxy, socks):
    """Each address opens one subscription to bob's certificate (a stranger may: RFC
    6072) and confirms it (answers its NOTIFY 200).  Returns the dialogs to refresh."""
    stats = collections.Counter()
    dialogs = {}
    for i, sock in enumerate(socks):
        host, port = sock.getsockname()
        cid, tag = f"r121-{os.getpid()}-{i}", f"t{i}"
        sock.sendto(_subscribe(host, port, f"s{i}", call_id=cid, tag=tag),
                    ("127.0.0.1", proxy.port))
        dialogs[i] = {"call_id": cid, "tag": tag}
        time.sleep(0.03)                    # ~33 a second: under the 100 a second cap
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        for i, sock in enumerate(socks):
            for ok in _drain(sock, stats, answer_notify=True):
                dialogs[i]["to_tag"] = ok.to_tag
                dialogs[i]["ruri"] = ok.get("Contact").strip().lstrip("<").split(">")[0]
        time.sleep(0.05)
    return {i: d for i, d in dialogs.items() if "to_tag" in d}, stats


def _probe(proxy, honest, stats, started):
    ua = SipUa(proxy.port, user="alice", source="127.0.0.72", timeout=2.0)
    try:
        answer = ua.message("dave", f"probe {len(honest)}".encode())
    finally:
        ua.close()
    honest.append(None if answer is None else answer.status)
    print(round(time.monotonic() - started), "shm", proxy.shm()["real_used"], dict(stats),
          honest[-1], flush=True)


def _flood(proxy, socks, make):
    """Every address sends PER_SOURCE_RATE requests a second (``make(i, n, sock)``),
    never answering the NOTIFYs; alice sends dave a MESSAGE every PROBE_EVERY s."""
    stats: collections.Counter = collections.Counter()
    honest: list = []
    started = last = time.monotonic()
    n = 0
    while time.monotonic() - started < FLOOD_SECONDS:
        tick = time.monotonic()
        for i, sock in enumerate(socks):
            n += 1
            raw = make(i, n, sock)
            if raw is None:
                continue
            sock.sendto(raw, ("127.0.0.1", proxy.port))
            stats["sent"] += 1
            _drain(sock, stats, answer_notify=False)
        if time.monotonic() - last >= PROBE_EVERY:
            last = time.monotonic()
            _probe(proxy, honest, stats, started)
        left = 1.0 / PER_SOURCE_RATE - (time.monotonic() - tick)
        if left > 0:
            time.sleep(left)
    return stats, honest


def _refresher(dialogs):
    cseqs = collections.Counter()

    def make(i, n, sock):
        d = dialogs.get(i)
        if d is None:
            return None
        cseqs[i] += 1
        host, port = sock.getsockname()
        return _subscribe(host, port, n, call_id=d["call_id"], tag=d["tag"],
                          cseq=1 + cseqs[i], ruri=d["ruri"], to_tag=d["to_tag"])
    return make


def test_hole_k1_refreshes_from_many_addresses_take_the_shm(proxy_factory):
    proxy, dave = _start(proxy_factory, "r121-k1")
    socks = _sockets("127.4")
    try:
        dialogs, setup = _follow_one_each(proxy, socks)
        print("\nset-up:", len(dialogs), "subscriptions", dict(setup))
        assert len(dialogs) >= SOURCES - 2, setup
        stats, honest = _flood(proxy, socks, _refresher(dialogs))
        print(f"K1: {dict(stats)}, honest {honest}, bans {proxy.htable_items('e2mban')}, "
              f"shm {proxy.shm()}")
        assert proxy.htable_items("e2mban") == 0          # nobody over pike's rate
        assert stats["SIP/2.0 200"] > 1000                # the refreshes were served
        # secure: honest users are still served during a stranger's refreshes
        assert honest == [200] * len(honest)
    finally:
        for sock in socks:
            sock.close()
        dave.close()


def test_control_k1_the_same_addresses_fetching_are_capped(proxy_factory):
    """Control: the same addresses at the same rate with initial fetches (review 120's
    flood): the cap answers most 503 and alice is served."""
    proxy, dave = _start(proxy_factory, "r121-k1-ctl")
    socks = _sockets("127.4")
    try:
        def make(i, n, sock):
            host, port = sock.getsockname()
            return _fetch(n, host, port)
        stats, honest = _flood(proxy, socks, make)
        print(f"\ncontrol: {dict(stats)}, honest {honest}, shm {proxy.shm()}")
        assert proxy.htable_items("e2mban") == 0
        assert stats["SIP/2.0 503"] > 1000
        assert honest == [200] * len(honest) and len(honest) >= 4
    finally:
        for sock in socks:
            sock.close()
        dave.close()
