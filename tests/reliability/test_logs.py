"""No secret in any log, at the highest log levels used: the flows are driven with two
``e2m-phone`` processes (pjsua2) through the visited and the home Kamailio, then every
log is searched for the plaintexts, the SDP lines, the SRTP keys, the CEKs and the
private keys.

* Kamailio (both proxies): ``log_level = "debug"`` (Kamailio debug=3, the highest level
  the launcher accepts), its whole stderr log.
* The phones: ``[phone] log_level = 6`` (pjsua's most verbose console level; whole SIP
  messages stay off, as shipped) and Python logging at DEBUG on stderr.  ``e2m-phone``
  has no switch of its own to turn its Python log on, so the test gives it a
  ``sitecustomize`` on PYTHONPATH that calls ``logging.basicConfig(level=DEBUG)``.
  The phones' JSON event stream on stdout is their application interface (it hands
  the received text to the application by design) and is not a log.
* The ``e2m`` tools: stdout and stderr of ``cms inspect``, ``cms decrypt --out``,
  ``sip inspect``, ``archive list`` and ``archive show`` (without ``--out``).

Flows: MESSAGE both ways; a call with SRTP and a split SDP whose answer goes under the
reused CEK, hold and unhold (re-INVITEs), hangup; 496 discovery (a phone that ignores
policy headers); hostile input (garbage DER, a plaintext MESSAGE a phone refuses).

CEKs: every envelope on the wire is taken from a loopback capture and opened in the
test with the keys of bob, alice and the proxy (``want_cek=True``), kekri envelopes
with the CEKs found before them; SRTP keys: the phones' key witnesses (SHA-256 of
each key, ``E2M_PHONE_KEY_WITNESS``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from e2m_lab.kamailio_harness import start_proxy
from e2m_lab.phones import run_phone, write_ua
from e2m_lab.capture import Capture, key_witnesses, read_pcap
from e2m_lab.phones import PhoneProcess
from e2m_lab.wire import find_secrets, secret_forms, transact

from e2m_plugins import mime
from e2m_plugins.body import message_body, top_parts
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.recipients import CertificateKey, reuse_kek
from e2m_plugins.errors import E2MError
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.sip import make_request, parse
from e2m_plugins.cmsinput import load_cms_message

# tcpdump: the CEKs on the wire are collected from a loopback capture
pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.tcpdump]

ROOT = Path(__file__).resolve().parents[2]
BOB = "sip:bob@example.com"
ALICE = "sip:alice@example.com"
PROXY_HOST = "proxy.example.com"
SITE = "import logging, sys\nlogging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"


PHONE_LOG_LEVEL = int(os.environ.get("E2M_LOG_TEST_PHONE_LEVEL", 6))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("logs")
    pki = init_test_pki(tmp_path / "pki", users=("alice", "bob"), key_type="ec")
    started = []
    try:
        home = start_proxy(tmp_path / "home", pki=pki, e2m=True, log_level="debug")
        started.append(home)
        visited = start_proxy(tmp_path / "visited", pki=None, e2m=False, next_hop=home.uri,
                              log_level="debug")
        started.append(visited)
        yield pki, home, visited
    finally:
        for proxy in started:
            proxy.stop()


def _ua(tmp_path: Path, pki, name: str, home, visited, *, via_visited: bool,
        e2m: dict | None = None) -> Path:
    directory = tmp_path / f"ua-{name}-{secrets.token_hex(2)}"
    directory.mkdir()
    phone = {"proxy": visited.uri if via_visited else home.uri, "registrar": home.uri,
             "register_via_proxy": False, "srtp": True, "log_level": PHONE_LOG_LEVEL}
    return write_ua(directory, name, pki.directory, peer="bob" if name == "alice" else "alice",
                    phone=phone, e2m={"cert_url_hosts": ["127.0.0.1"], **(e2m or {})})


def _cms_parts(message) -> list[bytes]:
    """The DER of every CMS part of a SIP message's body."""
    out = []
    try:
        body = message_body(message)
        if body is None:
            return out
        for part in top_parts(body):
            try:
                out.append(load_cms_message(mime.encode_part(part)).der)
            except E2MError:
                continue
    except E2MError:
        pass
    return out


def _sip_messages(frames: list[bytes]) -> list:
    out = []
    for frame in frames:
        match = re.search(rb"(?:MESSAGE|INVITE|ACK|BYE|SIP/2\.0) ", frame)
        if not match:
            continue
        try:
            out.append(parse(frame[match.start():]))
        except E2MError:
            continue
    return out


def _ceks(frames: list[bytes], keys: list[CertificateKey]) -> list[bytes]:
    """Every CEK of every envelope captured, opened with the UAs' and the proxy's keys,
    and (kekri) with the CEKs found earlier."""
    found: list[bytes] = []
    shared = []
    envelopes = [der for m in _sip_messages(frames) for der in _cms_parts(m)]
    for _ in range(3):                       # kekri envelopes need an earlier CEK
        for der in envelopes:
            try:
                opened = open_envelope(der, [*keys, *shared], want_cek=True)
            except E2MError:
                continue
            if opened.cek and opened.cek not in found:
                found.append(opened.cek)
                if opened.cek_reference:
                    shared.append(reuse_kek(opened.cek, opened.cek_reference))
    return found


def _private_key_forms(path: Path) -> dict[str, bytes]:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key(path.read_bytes(), None)
    der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    pem_lines = [line for line in path.read_bytes().splitlines() if line and not line.startswith(b"-----")]
    forms = {f"{path.name} DER hex": der.hex().encode(), f"{path.name} DER HEX": der.hex().upper().encode(),
             f"{path.name} DER base64": base64.b64encode(der)[:48]}
    public = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for i, line in enumerate(pem_lines):
        # A line that holds public material only (an EC key file ends with its public
        # point) also appears in the certificate the proxy sends in every 496: not a leak.
        if len(line) >= 24 and base64.b64decode(line + b"=" * (-len(line) % 4)) not in public:
            forms[f"{path.name} PEM line {i}"] = line
    return forms


def _srtp_keys_in(blob: bytes, witnesses: list[dict]) -> list[str]:
    """Witnessed SRTP keys whose base64 form appears in ``blob`` (only the hash is known)."""
    hits = []
    for w in witnesses:
        length = w.get("b64_len")
        if not length:
            continue
        for token in set(re.findall(rb"[A-Za-z0-9+/=]{%d}" % length, blob)):
            if hashlib.sha256(token).hexdigest() == w["b64_sha256"]:
                hits.append(f"SRTP key (b64 sha256 {w['b64_sha256'][:12]})")
        for token in set(re.findall(rb"[A-Za-z0-9+/]{%d,}" % length, blob)):   # inside longer runs
            for i in range(len(token) - length + 1):
                if hashlib.sha256(token[i:i + length]).hexdigest() == w["b64_sha256"]:
                    hits.append(f"SRTP key inside a longer token (sha256 {w['b64_sha256'][:12]})")
                    break
    return hits


@pytest.fixture(scope="module")
def run(world, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Drive every flow once; return the logs and the secrets, by kind."""
    pki, home, visited = world
    tmp_path = tmp_path_factory.mktemp("flows")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    witness_file = tmp_path / "srtp-keys.jsonl"
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "E2M_PHONE_KEY_WITNESS": str(witness_file)}
    texts = {name: f"{name} secret {secrets.token_hex(8)}".encode()
             for name in ("to bob", "to alice", "discovered", "hostile plaintext")}
    capture = Capture(tmp_path / "wire.pcap", f"udp port {home.port} or udp port {visited.port}")
    phones: list[PhoneProcess] = []
    tool_output: list[bytes] = []
    try:
        bob = PhoneProcess(_ua(tmp_path, pki, "bob", home, visited, via_visited=False), "bob", env)
        phones.append(bob)
        bob.wait("started", timeout=20)
        bob.wait("registered", timeout=10)
        alice = PhoneProcess(_ua(tmp_path, pki, "alice", home, visited, via_visited=True), "alice", env)
        phones.append(alice)
        alice.wait("started", timeout=20)
        alice.wait("registered", timeout=10)

        # MESSAGE both ways
        alice.send(f"message {BOB} {texts['to bob'].decode()}")
        assert alice.wait("message_sent")["code"] == 200
        assert bob.wait("message_in")["text"].encode() == texts["to bob"]
        bob.send(f"message {ALICE} {texts['to alice'].decode()}")
        assert bob.wait("message_sent")["code"] == 200
        assert alice.wait("message_in")["text"].encode() == texts["to alice"]

        # a call: SRTP, split SDP, answer under the reused CEK; hold/unhold; hangup
        alice.send(f"call {BOB}")
        media = alice.wait("call_media", lambda e: "active" in e["audio"], timeout=15)
        offer, answer = media["security"][:2]
        assert offer["security"]["split"] and answer["security"]["key_reuse"]
        mark = alice.mark()
        alice.send("hold")
        alice.wait("call_media", lambda e: "local_hold" in e["audio"], since=mark, timeout=15)
        alice.send("unhold")
        alice.wait("call_media", lambda e: "active" in e["audio"], since=mark, timeout=15)
        alice.send("hangup")
        alice.wait("call_ended", timeout=15)

        # 496 discovery: a phone that does not learn policies from headers
        config = _ua(tmp_path, pki, "alice", home, visited, via_visited=True,
                     e2m={"accept_policy_headers": False})
        discovery = run_phone(config, "message", BOB, texts["discovered"].decode(), env=env)
        assert discovery.rc == 0, discovery.stderr[-2000:]
        assert [e["code"] for e in discovery.of("e2m_answer")] == [496]
        assert bob.wait("message_in", lambda e: e["text"].encode() == texts["discovered"])
        phone_logs = {"phone discovery run stderr": discovery.stderr.encode()}

        # hostile input at the home proxy: garbage DER, and a plaintext MESSAGE the
        # proxy forwards and bob's phone refuses (488)
        garbage = make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB,
                               body=b"\x30\x80" + texts["hostile plaintext"],
                               content_type="application/pkcs7-mime; smime-type=enveloped-data")
        got = transact(home.port, garbage.add("Proxy-Required-Body", PROXY_HOST), timeout=5)
        assert got is not None and got.status == 400
        plain = make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB,
                             body=texts["hostile plaintext"], content_type="text/plain")
        refused = transact(home.port, plain, timeout=8)
        assert refused is not None and refused.status in (403, 488), refused
        time.sleep(0.5)
    finally:
        for phone in phones:
            phone.stop()
        capture.stop()

    # e2m tools on what the run produced
    frames = read_pcap(capture.path)
    envelope = next(der for m in _sip_messages(frames) if m.method == "MESSAGE"
                    for der in _cms_parts(m))
    (tmp_path / "env.der").write_bytes(envelope)
    proxy_cred = pki.proxy(PROXY_HOST)
    some_message = next(m for m in _sip_messages(frames) if m.method == "MESSAGE" and _cms_parts(m))
    (tmp_path / "msg.sip").write_bytes(some_message.serialize())
    e2m = [sys.executable, "-m", "e2m_plugins.cli"]
    commands = [
        [*e2m, "cms", "inspect", "--in", str(tmp_path / "env.der")],
        [*e2m, "cms", "decrypt", "--recip", str(proxy_cred.cert_path), "--key", str(proxy_cred.key_path),
         "--in", str(tmp_path / "env.der"), "--out", str(tmp_path / "decrypted.txt")],
        [*e2m, "sip", "inspect", "--proxy", str(home.config_path), "--in", str(tmp_path / "msg.sip")],
        [*e2m, "archive", "list", "--config", str(home.config_path)],
        [*e2m, "archive", "show", "1", "--config", str(home.config_path)],
        [*e2m, "archive", "show", "1", "--config", str(home.config_path), "--json"],
    ]
    for command in commands:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=60)
        tool_output.append(b" ".join(c.encode() for c in command[2:5]) + b"\n" + done.stdout + done.stderr)
    decrypted = (tmp_path / "decrypted.txt").read_bytes()       # the tool's --out: by design
    assert texts["to bob"] in decrypted or texts["to alice"] in decrypted

    # what to look for
    keys = [CertificateKey(pki.user(n).cert, pki.user(n).key) for n in ("alice", "bob")]
    keys.append(CertificateKey(proxy_cred.cert, proxy_cred.key))
    ceks = _ceks(frames, keys)
    assert len(ceks) >= 4, f"only {len(ceks)} CEKs recovered from the capture"
    groups: dict[str, dict[str, bytes]] = {"plaintext": {}, "cek": {}, "private key": {}}
    for name, text in texts.items():
        groups["plaintext"][f"text {name!r}"] = text
    groups["plaintext"].update({"SDP m=audio line": b"m=audio ", "a=crypto line": b"a=crypto",
                                "a=crypto inline": b"inline:"})
    groups["private key"]["PEM private key header"] = b"PRIVATE KEY-----"
    for i, cek in enumerate(ceks):
        for form, value in secret_forms(cek).items():
            groups["cek"][f"CEK {i} {form}"] = value
    for path in (proxy_cred.key_path, pki.user("alice").key_path, pki.user("bob").key_path):
        groups["private key"].update(_private_key_forms(path))
    witnesses = key_witnesses(witness_file)
    assert witnesses, "the phones wrote no SRTP key witness (was SRTP negotiated?)"

    logs = {f"Kamailio {home.name}": home.log_since(0).encode(),
            f"Kamailio {visited.name}": visited.log_since(0).encode()}
    for phone in phones:
        logs[f"phone {phone.name} stderr"] = phone.stderr_path.read_bytes()
    logs.update(phone_logs)
    for i, blob in enumerate(tool_output):
        logs[f"tool output {i}: {blob.splitlines()[0].decode(errors='replace')}"] = blob
    # The logs are really at their verbose levels (the test is not vacuous).
    assert b"DEBUG:" in logs[f"Kamailio {home.name}"] and b"DEBUG:" in logs[f"Kamailio {visited.name}"]
    assert any(b"pjsua" in blob for name, blob in logs.items() if name.startswith("phone"))

    sizes = {name: len(blob) for name, blob in logs.items()}
    print(f"\nlogs searched (bytes): {sizes}\n{len(ceks)} CEKs, {len(witnesses)} SRTP keys, "
          f"{sum(len(g) for g in groups.values())} secret forms; phone log level {PHONE_LOG_LEVEL}")
    return {"logs": logs, "groups": groups, "witnesses": witnesses}


def _leaks(run: dict, where: str, kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """Names of the secrets of ``kinds`` found in the logs whose name starts with ``where``."""
    out = {}
    for name, blob in run["logs"].items():
        if not name.startswith(where):
            continue
        hits = []
        for kind in kinds:
            if kind == "srtp key":
                hits += _srtp_keys_in(blob, run["witnesses"])
            else:
                for secret in find_secrets(blob, run["groups"][kind]):
                    needle = run["groups"][kind][secret]
                    line = next(l for l in blob.splitlines() if needle in l)
                    shown = line.replace(needle, f"<{secret}>".encode())[:160].decode(errors="replace")
                    hits.append(f"{secret} in: {shown}")
        if hits:
            out[name] = sorted(set(hits))
    return out


def test_kamailio_debug_logs_hold_no_plaintext_sdp_srtp_key_or_private_key(run):
    assert not _leaks(run, "Kamailio", ("plaintext", "srtp key", "private key"))


def test_kamailio_debug_logs_hold_no_cek(run):
    assert not _leaks(run, "Kamailio", ("cek",))


def test_phone_logs_hold_no_cek_or_private_key(run):
    assert not _leaks(run, "phone", ("cek", "private key"))


def test_phone_logs_hold_no_plaintext_or_srtp_key(run):
    assert not _leaks(run, "phone", ("plaintext", "srtp key"))


def test_tool_outputs_hold_no_secret(run):
    assert not _leaks(run, "tool", ("plaintext", "cek", "private key", "srtp key"))
