"""``make demo``: two E2M softphones through a visited and a home Kamailio, on loopback.

alice's phone reaches her home proxy (trusted: E2M, archive on) through a visited
proxy (untrusted: plain routing, TLS to home); bob is registered at the home proxy
over TLS.  The home proxy lets in only its users (digest; both phones have a
password file) and refuses an unauthenticated REGISTER.  The demo creates a PKI,
starts both proxies with ``e2m-proxy``, starts two ``e2m-phone`` processes, and:
alice registers (learns the home proxy's policy); both phones publish their
certificates at the home proxy's certificate service (RFC 6072; there is no
``[peers]``); alice and bob send each other a MESSAGE at once, each fetching the
other's certificate from the service first (the demo prints where each came from);
alice calls bob with SRTP, they "talk" for a few seconds, alice hangs up.  It then
prints what the home proxy did with each message (its log) and, per hop, what that
hop could read, computed from evidence:

- the home proxy's archive (bodies it decrypted) and media table (ports it read);
- the recipients the phones' envelopes were made for;
- the capture (when tcpdump can run): whether any packet carried a text or an SDP
  line in the clear, whether SIP crossed in the clear anywhere but alice's UDP legs,
  and whether an SRTP key (known only by its SHA-256, from the phones' key witness)
  appears in any packet at all.

Exit status 0 only if every expectation held.  Every process it starts is stopped,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from .capture import Capture, contains_key
from .phones import PhoneProcess
from .ports import free_port
from .proxy_process import ProxyProcess
from .tomlfile import write_toml

PY = sys.executable
PROXY_HOST = "proxy.example.com"
VISITED_HOST = "visited.example.com"
ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


class DemoFailure(RuntimeError):
    pass


# --------------------------------------------------------------------------- processes

class Proxy:
    """One ``e2m-proxy`` of the demo: its PROXY.toml, its process and its log."""

    def __init__(self, name: str, directory: Path, sections: dict[str, dict[str, Any]],
                 port: int, tls_port: int | None = None) -> None:
        self.name, self.directory, self.port = name, directory, port
        self.tls_port = tls_port
        directory.mkdir(parents=True, exist_ok=True)
        self.config = write_toml(directory / "PROXY.toml", sections)
        self.log_path = directory / "kamailio.log"
        self.process = ProxyProcess(self.config, directory / "run", self.log_path, python=PY)
        self.process.start()

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def tls_uri(self) -> str:
        return f"sip:127.0.0.1:{self.tls_port};transport=tls"

    def wait_ready(self, timeout: float = 20.0) -> None:
        if not self.process.wait_ready(self.port, timeout):
            raise DemoFailure(f"the {self.name} proxy did not start; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        self.process.stop()


# --------------------------------------------------------------------------- the run

def run(work: Path) -> int:
    from e2m_plugins.testpki import init_test_pki

    checks: list[tuple[str, bool, str]] = []

    def expect(what: str, ok: bool, evidence: str) -> None:
        checks.append((what, bool(ok), evidence))

    print("== E2M demo: alice -> visited (untrusted) -> home (trusted, archive) -> bob ==")
    pki_dir = work / "pki"
    pki = init_test_pki(pki_dir, users=("alice", "bob"), key_type="ec", tls_ips=["127.0.0.1"])
    home_tls, visited_tls = pki.tls_server(PROXY_HOST), pki.tls_server(VISITED_HOST)
    home_port, visited_port = free_port(), free_port()
    home_tls_port = free_port(avoid={home_port, visited_port})
    visited_tls_port = free_port(avoid={home_port, visited_port, home_tls_port})
    home = Proxy("home", work / "home", {
        "kamailio": {"listen": [f"udp:127.0.0.1:{home_port}", f"tcp:127.0.0.1:{home_port}",
                                f"tls:127.0.0.1:{home_tls_port}"],
                     "workers": 2, "shm_mb": 64, "pkg_mb": 16, "log_level": "info",
                     "domains": ["example.com"]},
        "e2m": {"enabled": True},
        "identity": {"host": PROXY_HOST, "cert": str(pki_dir / f"proxy-{PROXY_HOST}.crt"),
                     "key": str(pki_dir / f"proxy-{PROXY_HOST}.key")},
        "trust": {"ca": [str(pki_dir / "ca.crt")]},
        "policy": {"view": ["MESSAGE:text/plain", "INVITE:application/sdp"],
                   "cert_url": f"http://127.0.0.1:{home_port}/e2m/cert.der",
                   # bob reads who may read the offer from its signed SIP context; the
                   # label naming home is 83 octets of an INVITE that must stay under
                   # the 4000 a pjsip phone reads (docs/protocol.md §6.2)
                   "remove_own_label": True},
        "archive": {"path": "archive.sqlite"},
        # digest for its users (added below with e2m-proxy users add), TLS 1.2 on tls:
        "auth": {"users": "users.sqlite"},
        "tls": {"cert": str(home_tls.cert_path), "key": str(home_tls.key_path),
                "ca": [str(pki_dir / "ca.crt")]}}, home_port, home_tls_port)
    procs: list[Any] = [home]
    capture: Capture | None = None
    try:
        visited = Proxy("visited", work / "visited", {
            "kamailio": {"listen": [f"udp:127.0.0.1:{visited_port}", f"tcp:127.0.0.1:{visited_port}",
                                    f"tls:127.0.0.1:{visited_tls_port}"],
                         "workers": 2, "shm_mb": 64, "pkg_mb": 16, "log_level": "info",
                         # no domain of its own: all goes home, over TLS (home verified)
                         "next_hop": home.tls_uri},
            "tls": {"cert": str(visited_tls.cert_path), "key": str(visited_tls.key_path),
                    "ca": [str(pki_dir / "ca.crt")]},
            "e2m": {"enabled": False}}, visited_port, visited_tls_port)
        procs.append(visited)
        home.wait_ready()
        visited.wait_ready()
        print(f"home proxy    {home.uri}, {home.tls_uri}  (E2M on, archive "
              f"{home.directory / 'archive.sqlite'}, digest for its users)")
        print(f"visited proxy {visited.uri}, {visited.tls_uri}  (E2M off: routing only, "
              f"to home over TLS)")
        passwords = _add_users(home, work, ("alice", "bob"))
        refused = _unauthenticated_register(home, "bob")
        print(f"an unauthenticated REGISTER for bob got: {refused}")
        expect("an unauthenticated REGISTER for bob was refused",
               refused.startswith("401") and refused.endswith("challenge"),
               "a REGISTER without credentials from a plain SIP UA")
        capture = Capture(work / "loopback.pcap", "udp or tcp")    # SIP is TLS over TCP
        print("capture: " + ("tcpdump on lo" if capture.running else capture.why_not))

        witness = work / "srtp-key-witness.jsonl"
        env = {"E2M_PHONE_KEY_WITNESS": str(witness)}
        configs = {}
        # digest on both phones; TLS on bob -> home and visited -> home.  alice (roaming)
        # reaches the visited proxy over UDP: over TLS, requests toward her would have to
        # come back on her own connection, and the proxies keep no Path for that.
        legs = {"alice": {"registrar": home.uri, "proxy": visited.uri, "register_via_proxy": True},
                "bob": {"registrar": home.tls_uri, "proxy": home.tls_uri, "transport": "tls"}}
        for name, peer in (("alice", "bob"), ("bob", "alice")):
            configs[name] = write_toml(work / f"{name}.toml", {
                "identity": {"aor": f"sip:{name}@example.com", "cert": str(pki_dir / f"{name}.crt"),
                             "key": str(pki_dir / f"{name}.key")},
                "trust": {"ca": [str(pki_dir / "ca.crt")]},
                # no [peers]: each phone publishes its certificate at the home proxy's
                # certificate service and fetches the other's there (RFC 6072)
                # the home proxy serves its certificate on loopback, not on its host name
                "e2m": {"cert_url_hosts": ["127.0.0.1"]},
                "phone": {**legs[name], "srtp": True, "password_file": str(passwords[name])}})
        bob = PhoneProcess(configs["bob"], "bob", env)
        procs.insert(0, bob)
        bob.wait("registered")
        alice = PhoneProcess(configs["alice"], "alice", env)
        procs.insert(0, alice)
        reg = alice.wait("registered")
        pols = [p["host"] + " view " + ",".join(p["view"]) for p in reg["policies"]]
        print(f"\nalice registered at home and learnt: {'; '.join(pols) or 'nothing'}")
        expect("alice learnt the home policy at REGISTER",
               any(p["host"] == PROXY_HOST for p in reg["policies"]), "policy header on REGISTER 200")

        text1 = f"Hi bob, lunch at noon? ({secrets.token_hex(3)})"
        text2 = f"Sure alice, see you. ({secrets.token_hex(3)})"
        for phone in (alice, bob):      # each has put its certificate at the service
            phone.wait("certificate_published")
        # both at once: neither phone holds the other's certificate yet, so each
        # fetches it from the home proxy's certificate service before its MESSAGE goes
        alice.send(f"message {BOB} {text1}")
        bob.send(f"message {ALICE} {text2}")
        sent1 = alice.wait("message_sent")
        got1 = bob.wait("message_in")
        print(f"\nbob received: {got1['text']!r}\n  {got1['security']['summary']}")
        sent2 = bob.wait("message_sent")
        got2 = alice.wait("message_in")
        print(f"alice received: {got2['text']!r}\n  {got2['security']['summary']}")
        expect("both MESSAGEs delivered intact", got1["text"] == text1 and got2["text"] == text2,
               "the phones' message_in events")
        print()
        for me, other, phone in (("alice", "bob", alice), ("bob", "alice", bob)):
            print("  " + _certificate_origin(me, other, phone, pki_dir))
        found = alice.of("peer_certificate")
        expect("alice found bob's certificate at the certificate service (no [peers])",
               bool(found) and found[0]["fingerprint"] == _fingerprint(pki_dir / "bob.crt"),
               "alice's peer_certificate event; its fingerprint is that of bob.crt")

        mark_a, mark_b = alice.mark(), bob.mark()
        # alice (roaming) calls bob through the visited proxy: the INVITE reaches bob
        # with both proxies' Via and Record-Route (two at visited: UDP -> TLS) and
        # home's policy; it must stay under the 4000 bytes pjsip reads (§6.2)
        alice.send(f"call {BOB}")
        media_a = alice.wait("call_media", lambda e: "active" in e["audio"], since=mark_a)
        media_b = bob.wait("call_media", lambda e: "active" in e["audio"], since=mark_b)
        call_id = media_a["call_id"]
        print(f"\ncall up with SRTP; alice sends RTP to {media_a['remote_rtp']}, "
              f"bob to {media_b['remote_rtp']}")
        for rec in media_a["security"]:
            print(f"  alice {'sent' if rec['direction'] == 'tx' else 'received'} {rec['what']}: "
                  f"{rec['security']['summary']}")
        at_bob = [r.get("bytes") for r in media_b["security"]
                  if r["direction"] == "rx" and r["what"] == "INVITE"]
        print(f"  the INVITE reached bob at {at_bob[0] if at_bob else '?'} bytes "
              f"(pjsip reads at most 4000)")
        expect("alice's INVITE reached bob under pjsip's 4000 bytes",
               bool(at_bob) and at_bob[0] is not None and at_bob[0] < 4000,
               f"bob's call_media record of the INVITE: {at_bob[0] if at_bob else '?'} bytes")
        time.sleep(3)
        alice.send("hangup")
        alice.wait("call_ended", since=mark_a)
        bob.wait("call_ended", since=mark_b)
        expect("call media active at both ends",
               "active" in media_a["audio"] and "active" in media_b["audio"],
               "both phones' call_media events")
        if capture.running:
            capture.stop()

        # ---------------- evidence ----------------
        db = sqlite3.connect(home.directory / "archive.sqlite")
        bodies = db.execute("SELECT id, method, direction, status, content_type, plaintext, "
                            "sha256, from_uri, call_id FROM bodies ORDER BY id").fetchall()
        media = db.execute("SELECT method, direction, port, proto, flow FROM media "
                           "WHERE call_id = ? ORDER BY id", (call_id,)).fetchall()
        db.close()
        texts = [bytes(b[5]) for b in bodies if b[1] == "MESSAGE"]
        sdps = [(b[2], bytes(b[5])) for b in bodies if b[8] == call_id]
        alice_rtp = int(media_b["remote_rtp"].rsplit(":", 1)[1])
        bob_rtp = int(media_a["remote_rtp"].rsplit(":", 1)[1])
        home_read = {
            "MESSAGE a->b": text1.encode() in texts,
            "MESSAGE b->a": text2.encode() in texts,
            # alice offers (her RTP port in the INVITE), bob answers (his in the 200)
            "SDP offer": any(m[1] == "request" and m[2] == alice_rtp for m in media),
            "SDP answer": any(m[1] == "response" and m[2] == bob_rtp for m in media),
            "SRTP keys": any(b"a=crypto" in s or b"inline:" in s for _, s in sdps),
        }
        witnesses = [json.loads(x) for x in witness.read_text().splitlines()] if witness.exists() else []
        # What the visited proxy could read: what the envelopes were made for (it is none
        # of their recipients); with a capture, also what reached it in the clear.
        recips = [sent1["security"], sent2["security"]] + [r["security"] for r in media_a["security"]]
        visited_read: dict[str, bool | None] = {
            k: any(VISITED_HOST in r["readable_by"] or "visited" in " ".join(r["readable_by"])
                   for r in recips) for k in home_read}
        visited_read["SRTP keys"] = False
        evidence_v = "recipients of every envelope the phones made"
        ladder: list[str] = []
        if capture.running or (capture.path.exists() and capture.path.stat().st_size > 24):
            frames = capture.packets()
            # loopback is shared (other tests may run): SIP datagrams of our ports only
            ours = {home.port, visited.port, alice.port, bob.port}
            grams = [(s, d, p) for s, d, p in capture.datagrams() if {s, d} & ours]
            clear = [n for n in (text1.encode(), text2.encode()) if any(n in f for f in frames)]
            clear += [n for n in (b"m=audio", b"a=crypto", b"inline:")
                      if any(n in p for _, _, p in grams)]
            expect("no text or SDP in the clear anywhere on the wire", not clear,
                   f"capture of {len(frames)} UDP and TCP packets on loopback")
            # SIP in the clear (UDP) only on alice's legs; visited -> home and bob <-> home
            # are TLS.  (REGISTER and OPTIONS left out: the demo's own probes.)
            plain_sip = [(s, d, p) for s, d, p in grams if b"SIP/2.0" in p[:400]
                         and not any(m in p for m in (b" REGISTER\r\n", b" OPTIONS\r\n"))]
            others = sorted({f"{s}->{d} " + p.split(b"\r\n", 1)[0][:40].decode(errors="replace")
                             for s, d, p in plain_sip if alice.port not in (s, d)})
            expect("SIP in the clear only on alice's UDP legs: visited -> home and bob's "
                   "leg only inside TLS", plain_sip and not others,
                   f"{len(plain_sip)} plain SIP datagrams, " +
                   (f"not alice's: {others[:4]}" if others else "every one to or from alice"))
            v = [p for s, d, p in grams if visited.port in (s, d) and b"SIP/2.0" in p[:400]]
            visited_read = {k: visited_read[k] or any(
                n in p for p in v for n in {"MESSAGE a->b": (text1.encode(),),
                                            "MESSAGE b->a": (text2.encode(),),
                                            "SDP offer": (b"m=audio",),
                                            "SDP answer": (b"m=audio",)}.get(k, ()))
                for k in visited_read}
            # the demo's own UDP datagrams: SIP and RTP/RTCP of both ends (a window-by-
            # window SHA-256 search: other tests' traffic on loopback would cost seconds)
            media_ports = {alice_rtp, alice_rtp + 1, bob_rtp, bob_rtp + 1}
            udp = [p for s, d, p in capture.datagrams() if {s, d} & (ours | media_ports)]
            visited_read["SRTP keys"] = any(contains_key(p, w) for p in udp for w in witnesses)
            expect("the SRTP keys appear in none of the demo's packets (RTP included)",
                   witnesses and not visited_read["SRTP keys"],
                   f"{len(witnesses)} keys offered, searched by SHA-256 in {len(udp)} UDP "
                   f"datagrams (SIP, RTP, RTCP)")
            evidence_v += f" and the {len(v)} SIP datagrams alice and the visited proxy exchanged"
        # the ladder from the home proxy's own log (its e2m lines name no body)
        for line in home.log_path.read_text(errors="replace").splitlines():
            if "e2m: " in line and " action=" in line:
                ladder.append("  home: " + line.split("e2m: ", 1)[1][:110])

        if ladder:
            print("\n-- what the home proxy did with each request and answer (its log)")
            print("\n".join(ladder[:40]))
        print("\n-- what each hop could read")
        cols = list(home_read)
        print(f"  {'hop':<22}" + "".join(f"{c:<14}" for c in cols))
        for hop, row in (("visited (untrusted)", visited_read), ("home (trusted)", home_read)):
            print(f"  {hop:<22}" + "".join(f"{('yes' if row[c] else 'no'):<14}" for c in cols))
        print(f"  evidence: home = its archive and media table; visited = {evidence_v}")
        expect("visited proxy read nothing", not any(visited_read.values()), evidence_v)
        expect("home proxy read both MESSAGEs and both SDPs",
               all(home_read[c] for c in cols[:4]), "home archive bodies + media ports")
        expect("home proxy never got the SRTP keys", not home_read["SRTP keys"],
               "archived SDP views have no a=crypto")

        print("\n-- home archive rows (plaintext not shown)")
        for b in bodies:
            print(f"  #{b[0]} {b[1]} {b[2]}{' ' + str(b[3]) if b[3] else ''} {b[4]} "
                  f"{len(b[5])} bytes sha256 {b[6][:16]} from {b[7]}")
        for m in media:
            print(f"  media {m[0]} {m[1]} port {m[2]} {m[3]} {m[4]}")
    finally:
        if capture is not None:
            capture.stop()
        for proc in procs:
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"(could not stop {proc}: {exc})", file=sys.stderr)

    print("\n-- expectations")
    for what, ok, evidence in checks:
        print(f"  [{'ok' if ok else 'FAILED'}] {what}  ({evidence})")
    failed = [c for c in checks if not c[1]]
    print("\nDEMO " + ("PASSED" if not failed else f"FAILED ({len(failed)} expectation(s))"))
    return 0 if not failed else 1


def _fingerprint(pem_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _certificate_origin(me: str, other: str, phone: PhoneProcess, pki_dir: Path) -> str:
    """Where ``me``'s phone got ``other``'s certificate, from its events."""
    published = phone.of("certificate_published")
    mine = (f"{me} published its own certificate ({published[0]['fingerprint'][:23]}...); "
            if published else f"{me} did not publish its certificate; ")
    got = [e for e in phone.of("peer_certificate") if e["aor"] == f"sip:{other}@example.com"]
    if got:
        return (mine + f"{me} got {other}'s certificate from the {got[0]['source']}, "
                f"fingerprint {got[0]['fingerprint'][:23]}... (checked as a [peers] entry)")
    return (mine + f"{me} had {other}'s certificate from {other}'s signed MESSAGE "
            f"(fingerprint {_fingerprint(pki_dir / f'{other}.crt')[:23]}...), no fetch needed")


def _add_users(home: Proxy, work: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Each user gets a random password: in the home proxy's subscriber table (HA1
    only, through ``e2m-proxy users add``, password on stdin) and in a 0600 file for
    the phone's ``[phone] password_file``.  Returns the files."""
    files = {}
    for name in names:
        password = secrets.token_urlsafe(16)
        done = subprocess.run([PY, "-m", "kamailio_app.launcher", "users", "add", "--config",
                               str(home.config), name], input=password + "\n", text=True,
                              capture_output=True, timeout=60)
        if done.returncode != 0:
            raise DemoFailure(f"e2m-proxy users add {name} failed: {done.stderr.strip()[-300:]}")
        path = work / f"{name}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        files[name] = path
    return files


def _unauthenticated_register(home: Proxy, user: str) -> str:
    """A REGISTER for ``user`` with no credentials, from a plain SIP UA: its answer."""
    from .kamailio_harness import SipUa

    ua = SipUa(home.port, user=user, password=None)
    try:
        answer = ua.register()
    finally:
        ua.close()
    if answer is None:
        return "no answer"
    challenged = " with a digest challenge" if answer.get("WWW-Authenticate") else ""
    return f"{answer.status} {answer.reason}{challenged}"


def main() -> int:
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="e2m-demo-"))
    try:
        return run(work)
    except (DemoFailure, AssertionError, RuntimeError) as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
