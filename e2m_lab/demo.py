"""``make demo``: two E2M softphones through a visited and a home Kamailio, on loopback.

alice's phone reaches her home proxy (trusted: E2M, archive on) through a visited
proxy (untrusted: plain routing); bob is registered at the home proxy.  The demo
creates a PKI, starts both proxies with ``e2m-proxy``, starts two ``e2m-phone``
processes, and: alice registers (learns the home proxy's policy), sends bob a
MESSAGE, bob replies, alice calls bob with SRTP, they "talk" for a few seconds,
alice hangs up.  It then prints a ladder (from a loopback capture when tcpdump can
run) and, per hop, what that hop could read, computed from evidence:

- the home proxy's archive (bodies it decrypted) and media table (ports it read);
- the capture: whether any packet through a hop carried a text or an SDP line in
  the clear, and whether an SRTP key (known only by its SHA-256, from the phones'
  key witness) appears in any packet at all;
- without a capture: the recipients the phones' envelopes were made for.

Exit status 0 only if every expectation held.  Every process it starts is stopped,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import sqlite3
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
ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


class DemoFailure(RuntimeError):
    pass


# --------------------------------------------------------------------------- processes

class Proxy:
    """One ``e2m-proxy`` of the demo: its PROXY.toml, its process and its log."""

    def __init__(self, name: str, directory: Path, sections: dict[str, dict[str, Any]],
                 port: int) -> None:
        self.name, self.directory, self.port = name, directory, port
        directory.mkdir(parents=True, exist_ok=True)
        self.config = write_toml(directory / "PROXY.toml", sections)
        self.log_path = directory / "kamailio.log"
        self.process = ProxyProcess(self.config, directory / "run", self.log_path, python=PY)
        self.process.start()

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

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
    init_test_pki(pki_dir, users=("alice", "bob"), key_type="ec")
    home_port, visited_port = free_port(), free_port()
    home = Proxy("home", work / "home", {
        "kamailio": {"listen": [f"udp:127.0.0.1:{home_port}", f"tcp:127.0.0.1:{home_port}"],
                     "workers": 2, "shm_mb": 64, "pkg_mb": 16, "log_level": "info",
                     "domains": ["example.com"]},
        "e2m": {"enabled": True},
        "identity": {"host": PROXY_HOST, "cert": str(pki_dir / f"proxy-{PROXY_HOST}.crt"),
                     "key": str(pki_dir / f"proxy-{PROXY_HOST}.key")},
        "trust": {"ca": [str(pki_dir / "ca.crt")]},
        "policy": {"view": ["MESSAGE:text/plain", "INVITE:application/sdp"],
                   "cert_url": f"http://127.0.0.1:{home_port}/e2m/cert.der"},
        "archive": {"path": "archive.sqlite"}}, home_port)
    procs: list[Any] = [home]
    capture: Capture | None = None
    try:
        visited = Proxy("visited", work / "visited", {
            "kamailio": {"listen": [f"udp:127.0.0.1:{visited_port}", f"tcp:127.0.0.1:{visited_port}"],
                         "workers": 2, "shm_mb": 64, "pkg_mb": 16, "log_level": "info",
                         "next_hop": home.uri},   # no domain of its own: all goes home
            "e2m": {"enabled": False}}, visited_port)
        procs.append(visited)
        home.wait_ready()
        visited.wait_ready()
        print(f"home proxy    {home.uri}  (E2M on, archive {home.directory / 'archive.sqlite'})")
        print(f"visited proxy {visited.uri}  (E2M off: routing only)")
        capture = Capture(work / "loopback.pcap")
        print("capture: " + ("tcpdump on lo" if capture.running else capture.why_not))

        witness = work / "srtp-key-witness.jsonl"
        env = {"E2M_PHONE_KEY_WITNESS": str(witness)}
        configs = {}
        for name, peer, proxy in (("alice", "bob", visited.uri), ("bob", "alice", home.uri)):
            configs[name] = write_toml(work / f"{name}.toml", {
                "identity": {"aor": f"sip:{name}@example.com", "cert": str(pki_dir / f"{name}.crt"),
                             "key": str(pki_dir / f"{name}.key")},
                "trust": {"ca": [str(pki_dir / "ca.crt")]},
                "peers": {f"sip:{peer}@example.com": str(pki_dir / f"{peer}.crt")},
                # the home proxy serves its certificate on loopback, not on its host name
                "e2m": {"cert_url_hosts": ["127.0.0.1"]},
                "phone": {"registrar": home.uri, "proxy": proxy, "register_via_proxy": name == "alice",
                          "srtp": True}})
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
        alice.send(f"message {BOB} {text1}")
        sent1 = alice.wait("message_sent")
        got1 = bob.wait("message_in")
        print(f"\nbob received: {got1['text']!r}\n  {got1['security']['summary']}")
        bob.send(f"message {ALICE} {text2}")
        sent2 = bob.wait("message_sent")
        got2 = alice.wait("message_in")
        print(f"alice received: {got2['text']!r}\n  {got2['security']['summary']}")
        expect("both MESSAGEs delivered intact", got1["text"] == text1 and got2["text"] == text2,
               "the phones' message_in events")

        mark_a, mark_b = alice.mark(), bob.mark()
        alice.send(f"call {BOB}")
        media_a = alice.wait("call_media", lambda e: "active" in e["audio"], since=mark_a)
        media_b = bob.wait("call_media", lambda e: "active" in e["audio"], since=mark_b)
        call_id = media_a["call_id"]
        print(f"\ncall up with SRTP; alice sends RTP to {media_a['remote_rtp']}, "
              f"bob to {media_b['remote_rtp']}")
        for rec in media_a["security"]:
            print(f"  alice {'sent' if rec['direction'] == 'tx' else 'received'} {rec['what']}: "
                  f"{rec['security']['summary']}")
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
            "SDP offer": any(m[1] == "request" and m[2] == alice_rtp for m in media),
            "SDP answer": any(m[1] == "response" and m[2] == bob_rtp for m in media),
            "SRTP keys": any(b"a=crypto" in s or b"inline:" in s for _, s in sdps),
        }
        witnesses = [json.loads(x) for x in witness.read_text().splitlines()] if witness.exists() else []
        visited_read: dict[str, bool | None]
        ladder: list[str] = []
        if capture.running or (capture.path.exists() and capture.path.stat().st_size > 24):
            grams = capture.datagrams()
            names = {alice.port: "alice", bob.port: "bob", home.port: "home", visited.port: "visited"}

            def through(port: int) -> list[bytes]:
                return [p for s, d, p in grams if port in (s, d) and b"SIP/2.0" in p[:400]]

            def clear(payloads: list[bytes], needle: bytes) -> bool:
                return any(needle in p for p in payloads)

            v, h = through(visited.port), through(home.port)
            visited_read = {"MESSAGE a->b": clear(v, text1.encode()), "MESSAGE b->a": clear(v, text2.encode()),
                            "SDP offer": clear(v, b"m=audio"), "SDP answer": clear(v, b"m=audio"),
                            "SRTP keys": any(contains_key(p, w) for _, _, p in grams for w in witnesses)}
            leaked_home = clear(h, text1.encode()) or clear(h, text2.encode()) or clear(h, b"m=audio")
            expect("no text or SDP in the clear on the home proxy's legs", not leaked_home, "capture")
            expect("the SRTP keys appear in no packet at all (RTP included)",
                   witnesses and not visited_read["SRTP keys"],
                   f"{len(witnesses)} keys offered, searched by SHA-256 in {len(grams)} datagrams")
            seen: set[bytes] = set()
            for s, d, p in grams:
                if s not in names or d not in names or b"SIP/2.0" not in p[:400] or p in seen:
                    continue
                seen.add(p)
                first = p.split(b"\r\n", 1)[0].decode(errors="replace")
                method = first.split()[0] if not first.startswith("SIP/2.0") else \
                    " ".join(first.split()[1:3]) + " (" + _cseq_method(p) + ")"
                if method in ("REGISTER", "OPTIONS") or "REGISTER" in method:
                    continue
                body = b"[encrypted body]" if b"application/pkcs7-mime" in p or b"multipart/mixed" in p \
                    else b""
                ladder.append(f"  {names[s]:>7} -> {names[d]:<7} {method} {body.decode()}")
            evidence_v = "capture of every datagram through the visited proxy"
        else:
            visited_read = {k: None for k in home_read}
            recips = [sent1["security"], sent2["security"]] + [r["security"] for r in media_a["security"]]
            for key in visited_read:
                visited_read[key] = any("visited" in " ".join(r["readable_by"]) for r in recips)
            evidence_v = "recipients of every envelope the phones made (no capture)"

        if ladder:
            print("\n-- ladder (from the loopback capture; retransmissions, REGISTER and OPTIONS left out)")
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


def _cseq_method(payload: bytes) -> str:
    for line in payload.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"cseq:"):
            return line.split()[-1].decode(errors="replace")
    return "?"


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
