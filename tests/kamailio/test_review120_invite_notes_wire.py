"""Review 120 (December 2026) of bc215c1, on a real Kamailio 5.6 E2M proxy: the notes
each relayed request leaves (``e2mbranch`` / ``e2minvbranch``, ``e2mloop``,
``e2mtargets``) under a flood of relayed INVITEs from many addresses, each under pike.

Hole K1 (``test_hole_k1_relayed_invite_notes_fill_the_shm``): an **off-path sender** (a
stranger: From in another domain, so no digest is asked, even with [auth]; or a
registered insider) makes a proxy run out of shared memory with INVITEs it relays to a
registered user; honest requests then get 500.

- Set-up: one E2M proxy (``proxy_factory``, open registrar, ``shm_mb = 32``, the
  smallest the config takes, as in review 117), carol registered behind a UAS that
  answers every INVITE ``486`` at once (byte-level, to keep up), dave registered behind
  a RawUas answering 200.
- Messages: 48 addresses (127.2.0.1 ...) each send 5 INVITEs a second to
  ``sip:carol@example.com`` (no body, a new Call-ID, tag and branch each) and ACK each
  486: 10 requests a second per address, under pike's 30 per 2 s (7 INVITEs + 7 ACKs a
  second per address was banned: tried).  240 relayed INVITEs a second.  Once the
  flooder has had 100 ``500`` answers, alice sends dave 30 MESSAGEs (one every 0.5 s)
  while the flood goes on.
- Observed (first run, 20 honest MESSAGEs then; the figures of the 5 s trace): tm's
  transactions reach their plateau within 5 s (``real_used`` 23.5 MB of 33.55 MB, from
  3.26 MB at rest) and stay there; the notes then pile up: at 70 s ``e2minvbranch``
  16,826 items (222 s each), ``e2mtargets`` 16,848 (the caller's target, 64 s, noted for
  every relayed INVITE even when answered 486), ``e2mloop`` 10,442 (32 s);
  ``real_used`` 31.8 MB and the first ``500`` (log: ``new_t(): out of mem``,
  ``t_newtran(): new_t failed`` at ``kemi.py ... new_transaction <- relay``,
  ``build_cell(): could not allocate shared memory``, ``fake_req(): failed to clone the
  request``); 4 of alice's 20 MESSAGEs got ``500``.  Second run, the module as
  committed (30 honest MESSAGEs): 5 of 30 got ``500``, the flooder 492 ``500`` of 22,848.  A flood at 200/s for 170 s (probe)
  filled it at 130 s.  Measured per relayed INVITE after tm let go (1,000 INVITEs, quiet
  10 s): about 600 octets of notes (``e2minvbranch`` + ``e2mtargets`` + ``e2mloop``),
  held 222/64/32 s: about 66 KB of shm per INVITE-a-second at steady state, against tm's
  about 84 KB; so at this rate the notes, not tm, push the proxy over (tm alone: about
  20 MB, which fits).  No address was banned.  At the product default (256 MB) about
  1,700 relayed INVITEs a second would be needed (not reachable on this 2-core box).
- At fault: ``kamailio_app/kemi.py:666-673`` (``_note_branch``, called in ``relay`` at
  line 1789: an INVITE's note for 222 s, htable ``e2minvbranch=>...autoexpire=222``,
  ``kamailio.cfg.tmpl:174``), ``kemi.py:1809-1823`` (``note_caller_target``: 64 s for
  every record-routed INVITE, answered or not) and ``_note_relayed`` (``e2mloop``,
  32 s); none has a count bound, and htable has none.  Review 117 moved the branch note
  from the door to the relay; review 118 made the INVITE's 3.5 times longer-lived.  The
  threat model (review 117/118 rows) states the per-note cost but not that it exceeds
  tm's own at a sustained rate.
- Fix (suggested): drop an INVITE's branch note and caller-target note when its
  transaction ends with a final answer (``ksr_onreply_route`` / failure route on a
  final non-2xx: the 222 s are needed only while it may still ring or take a late 2xx),
  or keep them in one table with a count cap (a shared counter per time slot) past
  which new INVITEs are answered 503 with Retry-After rather than left un-noted.

Control ``test_control_k1_the_same_flood_for_20_s_leaves_honest_users_served`` (passes):
the same flood, same proxy, for 20 s (tm at its plateau, the notes young: 4,848 items):
no 500 to the flooder, every INVITE reached carol and was answered 486, every honest
MESSAGE delivered (20 of 20, then 30 of 30), nobody banned.

Tried and held (this review): ``e2mtargets``' 12-hour ``d`` entries are written only at
a 2xx for a dialog whose keys the cache holds (review 99), so a plain INVITE answered
200 by a colluding callee leaves only the 64 s caller note (read, not run).

Big, split and unfinished TCP replies from a callee (probe, run once, not kept as a
test): bob registered over TCP; alice's MESSAGEs to him through the proxy.  A 40,712
octet 200 (40 ``X-Pad`` headers of 1,000 octets) reached alice whole over UDP (200);
a 200 written in 7-octet segments 10 ms apart reached her (200); a 200 of which bob
sent only the first half and then nothing: alice got 408 at fr_timer, and a MESSAGE
to dave sent meanwhile was delivered at once (no worker held by the stalled read).
bob's next, complete 200 on the same connection was read as the rest of the half one
(``parse_via(): parse error``, ``bad header field``) and lost: alice 408 -- harm to
bob's own connection only, which a callee can always do to itself.

Fixed (stop 40): an INVITE whose transaction fails (``ksr_failure_route``, now armed for
every relayed INVITE) keeps its branch note 32 s more instead of 222 s, and its caller's
target note, for a dialog that did not come, is removed
(``kemi.kamailio.end_failed_invite_notes``); a 486'd INVITE now leaves the 32 s loop note
and a 32 s branch note.  The hole test failed on the code before the fix and passes
with it.  It then ran its flood for 257 s (no 500 came to end it), so it now floods for
60 s and also asserts the note tables' size then: ``e2minvbranch`` no larger than
``e2mloop`` (32 s; htable lets both go at its 20 s sweeps) and ``e2mtargets`` no more than
a second's INVITEs (before the fix: every INVITE of the last 222 and 64 s).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, make_response, register_contact

pytestmark = [pytest.mark.kamailio]

SOURCES = 48            # 127.2.x.y: each one a stranger of its own
PER_SOURCE_RATE = 5     # INVITEs a second per address; with their ACKs 10 requests a
                        # second, under pike's 30 per 2 s (an INVITE and ACK each at 7/s: banned)
FLOOD_LIMIT = 240.0     # seconds at most
HONEST = 30             # honest MESSAGEs sent once the flood has filled shm
NOTES_AFTER = 60.0      # s of flood after which a failed INVITE's notes (32 s, swept by
                        # htable's 20 s timer) have been let go at least once (stop 40)

_TO = re.compile(rb"\r\n(?:To|t)\s*:[^\r]*", re.I)
_CALL_ID = re.compile(rb"\r\n(?:Call-ID|i)\s*:\s*([^\r]*)", re.I)


class BusyUas:
    """carol's phone: answers every INVITE 486 at once (byte level, to keep up)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.invites = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            if not data.startswith(b"INVITE "):
                continue
            self.invites += 1
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
            keep = [h for h in head if h.split(b":", 1)[0].strip().lower()
                    in (b"via", b"v", b"from", b"f", b"to", b"t", b"call-id", b"i", b"cseq")]
            keep = [h + b";tag=busy" if h.split(b":", 1)[0].strip().lower() in (b"to", b"t")
                    else h for h in keep]
            try:
                self.sock.sendto(b"SIP/2.0 486 Busy Here\r\n" + b"\r\n".join(keep)
                                 + b"\r\nContent-Length: 0\r\n\r\n", addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def _invite(n: int, host: str, port: int) -> tuple[bytes, str, str]:
    """A stranger's INVITE to carol (From another domain: no digest asked), no body."""
    branch, call_id = f"z9hG4bK-r120-{os.getpid()}-{n}", f"r120-{os.getpid()}-{n}@{host}"
    return (f"INVITE sip:carol@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};rport;branch={branch}\r\n"
            f"From: <sip:mallory{n}@elsewhere.example>;tag=m{n}\r\n"
            f"To: <sip:carol@example.com>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Max-Forwards: 70\r\nContact: <sip:mallory@{host}:{port}>\r\n"
            f"Content-Length: 0\r\n\r\n").encode(), branch, call_id


def _ack(answer: bytes, n: int, host: str, port: int, branch: str, call_id: str) -> bytes:
    """The ACK of a non-2xx final answer (same branch, the answer's To)."""
    to = _TO.search(answer)
    return (f"ACK sip:carol@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};rport;branch={branch}\r\n"
            f"From: <sip:mallory{n}@elsewhere.example>;tag=m{n}\r\n").encode() \
        + (to.group(0)[2:] if to else b"To: <sip:carol@example.com>") \
        + (f"\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
           f"Content-Length: 0\r\n\r\n").encode()


def _flood(port: int, stop: threading.Event, stats: dict[str, int]) -> None:
    """SOURCES addresses, each PER_SOURCE_RATE INVITEs a second (a new branch and
    Call-ID each), every final answer ACKed, until ``stop``."""
    socks = []
    for i in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.2.{i // 250}.{i % 250 + 1}", 0))
        sock.setblocking(False)
        socks.append(sock)
    sent: dict[str, tuple[int, str]] = {}
    n = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            for sock in socks:
                host, sport = sock.getsockname()
                n += 1
                data, branch, call_id = _invite(n, host, sport)
                try:
                    sock.sendto(data, ("127.0.0.1", port))
                    stats["sent"] += 1
                    sent[call_id] = (n, branch)
                except OSError:
                    pass
                try:
                    while True:
                        answer = sock.recv(65535)
                        code = answer[8:11].decode("ascii", "replace")
                        stats[code] = stats.get(code, 0) + 1
                        found = _CALL_ID.search(answer)
                        if code >= "300" and found and found.group(1).decode() in sent:
                            m, br = sent.pop(found.group(1).decode())
                            sock.sendto(_ack(answer, m, host, sport, br, found.group(1).decode()),
                                        ("127.0.0.1", port))
                except OSError:
                    pass
            left = 1.0 / PER_SOURCE_RATE - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)
    finally:
        for sock in socks:
            sock.close()


def _honest(proxy, dave: RawUas, count: int, tag: str) -> list[int | None]:
    """alice's MESSAGEs to dave (200 from his phone), one every 0.5 s."""
    statuses = []
    for i in range(count):
        ua = SipUa(proxy.port, user="alice", source=f"127.0.0.{80 + i % 40}", timeout=3.0)
        try:
            answer = ua.message("dave", f"{tag} {i}".encode())
        finally:
            ua.close()
        statuses.append(None if answer is None else answer.status)
        time.sleep(0.5)
    return statuses


def _figures(proxy) -> dict[str, int]:
    shm = proxy.shm()
    return {"e2minvbranch": proxy.htable_items("e2minvbranch"),
            "e2mtargets": proxy.htable_items("e2mtargets"),
            "e2mloop": proxy.htable_items("e2mloop"),
            "shm_real_used": shm["real_used"], "shm_total": shm["total"]}


def _start(proxy_factory, name: str):
    proxy = proxy_factory(name, e2m=True, extra={"kamailio": {"shm_mb": 32}})
    carol = BusyUas()
    dave = RawUas()
    dave.responder = lambda request: make_response(request, 200, "OK")
    register_contact(proxy, "carol", carol.port, source="127.0.0.71")
    register_contact(proxy, "dave", dave.port, source="127.0.0.75")
    return proxy, carol, dave


def _start_flood(proxy, until):
    """Start the flood; return once ``until(seconds, stats)`` (checked every 5 s) says so,
    the flood still running: (stats, trace, stop event, thread)."""
    stats = {"sent": 0}
    stop = threading.Event()
    flooder = threading.Thread(target=_flood, args=(proxy.port, stop, stats))
    started = time.monotonic()
    flooder.start()
    trace = []
    try:
        while not until(time.monotonic() - started, stats):
            time.sleep(5)
            trace.append((round(time.monotonic() - started), _figures(proxy)))
            print(trace[-1], {k: v for k, v in stats.items()}, flush=True)
    except BaseException:
        stop.set()
        flooder.join()
        raise
    return stats, trace, stop, flooder


def _stop(stop: threading.Event, flooder: threading.Thread) -> None:
    stop.set()
    flooder.join()


def test_hole_k1_relayed_invite_notes_fill_the_shm(proxy_factory):
    proxy, carol, dave = _start(proxy_factory, "k1")
    try:
        assert _honest(proxy, dave, 1, "before") == [200]

        def full(seconds, stats):
            # stop 40: the fixed notes plateau after 32 s, so 60 s tell (before the fix
            # this ran until 100 answers 500, at about 70 s, or FLOOD_LIMIT: 257 s)
            return seconds >= NOTES_AFTER or stats.get("500", 0) >= 100

        stats, trace, stop, flooder = _start_flood(proxy, full)
        try:
            notes = _figures(proxy)
            statuses = _honest(proxy, dave, HONEST, "during")
        finally:
            _stop(stop, flooder)
        print(f"\nK1: flood {stats}, carol got {carol.invites} INVITEs, honest {statuses}, "
              f"bans {proxy.htable_items('e2mban')}, notes at {NOTES_AFTER:.0f} s {notes}")
        assert proxy.htable_items("e2mban") == 0          # nobody over pike's rate
        # secure: a failed INVITE's branch note goes with its loop note (32 s, both swept
        # by htable's timer: before the fix it stayed 222 s), and its caller's target,
        # noted for no dialog, goes at once (before: 64 s)...
        rate = SOURCES * PER_SOURCE_RATE
        assert notes["e2minvbranch"] <= notes["e2mloop"] + 2 * rate, notes
        assert notes["e2mtargets"] <= rate, notes
        # ...and the stranger's flood at a rate the proxy relays leaves honest users served
        assert stats.get("500", 0) == 0, stats
        assert statuses == [200] * HONEST
    finally:
        carol.close()
        dave.close()


def test_control_k1_the_same_flood_for_20_s_leaves_honest_users_served(proxy_factory):
    """Control: the same flood, rate and proxy, for 20 s only: tm's transactions have
    reached their plateau, the notes are young; every INVITE reached carol and was
    answered 486, none 500, and alice's MESSAGEs are delivered."""
    proxy, carol, dave = _start(proxy_factory, "k1-control")
    try:
        stats, trace, stop, flooder = _start_flood(proxy, lambda seconds, stats: seconds >= 20)
        try:
            statuses = _honest(proxy, dave, HONEST, "during")
        finally:
            _stop(stop, flooder)
        print(f"\ncontrol: flood {stats}, carol got {carol.invites}, honest {statuses}")
        assert stats.get("500", 0) == 0 and stats.get("486", 0) > 4000
        assert trace[-1][1]["e2minvbranch"] > 4000
        assert proxy.htable_items("e2mban") == 0
        assert statuses == [200] * HONEST
    finally:
        carol.close()
        dave.close()
