"""`e2m demo`: who can read what, shown with the CMS core alone.

This is a CMS-level demonstration: no SIP is sent, no Kamailio or phone is
started (those arrive with the proxy and softphone work).  It plays the
deployment of the E2M draft in memory: alice encrypts for bob and for her
trusted home proxy, an untrusted visited proxy sees only ciphertext, bob
answers under the reused CEK so the home proxy reads the answer too, and a
signed MESSAGE is verified by the home proxy.  It exits 0 only when every
expectation held.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

from . import Group
from ..cms import CertificateKey, KeyAgreeRecipient, KeyTransRecipient, open_envelope, reuse_kek, seal
from ..cms import oids
from ..layers import open_message
from ..cms.signed import sign
from ..errors import E2MError
from ..testpki import init_test_pki

HOME = "home.example.com"
VISITED = "visited.example.net"
OFFER = (b"Content-Type: application/sdp\r\n\r\nv=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"
         b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n")
ANSWER = (b"Content-Type: application/sdp\r\n\r\nv=0\r\no=bob 2 2 IN IP4 127.0.0.1\r\ns=-\r\n"
          b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\n")
IM = b"Content-Type: text/plain\r\n\r\nLunch at noon?"


@dataclass
class Check:
    step: str
    party: str
    expected: str
    observed: str

    @property
    def held(self) -> bool:
        return self.expected == self.observed


def _try_open(data: bytes, keys: list) -> tuple[str, object | None]:
    try:
        opened = open_envelope(data, keys, want_cek=True)
    except E2MError as exc:
        return f"cannot read ({type(exc).__name__})", None
    return "reads it", opened


def run_demo() -> list[Check]:
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="e2m-demo-") as tmp:
        pki = init_test_pki(tmp, domain="example.com", proxy_hosts=(), users=("alice", "bob"))
        alice, bob = pki.user("alice"), pki.user("bob")
        home = pki.proxy(HOME, "x25519")
        visited = pki.proxy(VISITED, "ec")
        keys = {
            "bob": [CertificateKey(bob.cert, bob.key)],
            f"home proxy {HOME}": [CertificateKey(home.cert, home.key)],
            f"visited proxy {VISITED}": [CertificateKey(visited.cert, visited.key)],
        }
        readers = {"bob": "reads it", f"home proxy {HOME}": "reads it"}

        offer = seal(OFFER, [KeyTransRecipient(bob.cert), KeyAgreeRecipient(home.cert)],
                     cek_reference=b"dialog-1")
        opened_by: dict[str, object] = {}
        for party, party_keys in keys.items():
            observed, opened = _try_open(offer.der, party_keys)
            opened_by[party] = opened
            checks.append(Check("INVITE offer (SDP)", party, readers.get(party, "cannot read (NoMatchingRecipientError)"), observed))

        # Bob answers under the CEK of the offer (RFC 3185): the home proxy,
        # which kept that CEK, reads the answer without being a new recipient.
        at_bob = opened_by["bob"]
        answer = seal(ANSWER, [reuse_kek(at_bob.cek, at_bob.cek_reference)])  # type: ignore[union-attr]
        at_home = opened_by[f"home proxy {HOME}"]
        home_view = [reuse_kek(at_home.cek, at_home.cek_reference)]  # type: ignore[union-attr]
        alice_view = [reuse_kek(offer.cek, b"dialog-1")]
        for party, party_keys in ((f"home proxy {HOME}", home_view), ("alice", alice_view),
                                  (f"visited proxy {VISITED}", keys[f"visited proxy {VISITED}"])):
            observed, _ = _try_open(answer.der, party_keys)
            expected = "cannot read (NoMatchingRecipientError)" if "visited" in party else "reads it"
            checks.append(Check("200 OK answer (CEK reuse)", party, expected, observed))

        # A MESSAGE signed by alice, then encrypted for bob and the home proxy.
        im = seal(sign(IM, alice.cert, alice.key), [KeyTransRecipient(bob.cert), KeyAgreeRecipient(home.cert)],
                  content_type=oids.SIGNED_DATA)
        for party, party_keys in keys.items():
            try:
                result = open_message(im.der, keys=party_keys, trust_anchors=[pki.ca.cert])
                signer = result.signatures[0].signers[0].identities.uris[0]
                observed = f"reads it, signed by {signer}"
            except E2MError as exc:
                observed = f"cannot read ({type(exc).__name__})"
            expected = (f"reads it, signed by {pki.aor('alice')}" if party in readers
                        else "cannot read (NoMatchingRecipientError)")
            checks.append(Check("MESSAGE (sign-then-encrypt)", party, expected, observed))
        leaked = [name for name, text, blob in (("offer", b"m=audio", offer.der), ("answer", b"m=audio", answer.der),
                                                ("MESSAGE", b"Lunch at noon", im.der)) if text in blob]
        checks.append(Check("on the wire", "every envelope", "no plaintext in the bytes",
                            "no plaintext in the bytes" if not leaked else f"PLAINTEXT in {', '.join(leaked)}"))
    return checks


def main(args: argparse.Namespace) -> int:
    print("E2M demonstration at the CMS level: no SIP traffic, no Kamailio, no phones yet.")
    print("alice -> visited proxy (untrusted) -> home proxy (trusted) -> bob\n")
    checks = run_demo()
    width = max(len(c.party) for c in checks)
    step = None
    for check in checks:
        if check.step != step:
            step = check.step
            print(f"{step}")
        mark = "ok  " if check.held else "FAIL"
        print(f"  {mark} {check.party:<{width}}  {check.observed}")
    failed = [c for c in checks if not c.held]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} expectations held")
    return 0 if not failed else 1


def _add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cms", help="who can read what, at the CMS level (no SIP yet)")
    parser.set_defaults(handler=main)


GROUP = Group("demo", "demonstrations", _add_commands)
