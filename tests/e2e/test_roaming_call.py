"""A roaming user can call (the demo's topology, issue: INVITE over pjsip's 4000 bytes).

alice reaches her home proxy through a visited one (UDP to visited, TLS visited ->
home); bob is registered at home over TLS; home has digest for its users, E2M and the
archive.  alice's INVITE reaches bob with both proxies' Via, three Record-Route (two
at visited, where UDP turns into TLS), home's policy and label, and one envelope for
bob and home whose SRTP keys travel sealed for bob alone.  pjsip drops a message over
PJSIP_MAX_PKT_LEN (4000) before any module sees it, so bob would never see the call
(4,120 bytes measured before the trimming in docs/protocol.md §6.2).

Real Kamailio (``e2m-proxy``), real ``e2m-phone`` processes; the size is bob's own
record of the INVITE it received (``call_media`` security records carry ``bytes``).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.phones import write_ua
from e2m_lab.pytest_fixtures import PhoneGroup, home_and_visited, phone_group

from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
PROXY_HOST = "proxy.example.com"
VISITED_HOST = "visited.example.com"
PJSIP_MAX_PKT_LEN = 4000          # what the pinned pjsua2 wheel reads per message
PASSWORDS = {"alice": "al-" + secrets.token_urlsafe(12), "bob": "bo-" + secrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("roaming-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture(scope="module")
def proxies(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ProxyHandle, ProxyHandle]]:
    """(home, visited) as in ``make demo``, with the product's defaults otherwise
    (home keeps its label toward bob: the larger INVITE)."""
    # visited has no domain of its own: everything goes home, over TLS (home's name
    # verified)
    with home_and_visited(
            lambda: start_proxy(tmp_path_factory.mktemp("home"), pki=pki, e2m=True,
                                auth=True, users=dict(PASSWORDS), tls=True),
            lambda home: start_proxy(tmp_path_factory.mktemp("visited"), pki=pki, e2m=False,
                                     tls={"host": VISITED_HOST}, next_hop=home.tls_uri,
                                     domains=())) as both:
        yield both


@pytest.fixture
def phones(request: pytest.FixtureRequest,
           proxies: tuple[ProxyHandle, ProxyHandle]) -> Iterator[PhoneGroup]:
    with phone_group(request, proxies) as group:
        yield group



def _ua(directory: Path, pki: TestPKI, name: str, peer: str, phone: dict[str, Any]) -> Path:
    """UA.toml with digest (a 0600 password file next to it) and SRTP."""
    directory = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "password"
    secret.write_text(PASSWORDS[name] + "\n")
    secret.chmod(0o600)
    assert pki.directory is not None
    return write_ua(directory, name, pki.directory, peer=peer,
                    phone={"srtp": True, "password_file": "password", **phone},
                    e2m={"cert_url_hosts": ["127.0.0.1"]})


def test_roaming_call_through_visited_and_home_reaches_bob_and_is_answered(
        tmp_path, pki, proxies, phones):
    home, visited = proxies
    bob = phones.start("bob", _ua(tmp_path, pki, "bob", "alice", {
        "registrar": home.tls_uri, "proxy": home.tls_uri, "transport": "tls",
        "register_via_proxy": False}))
    # alice roams: UDP to the visited proxy, which registers her at home as well
    alice = phones.start("alice", _ua(tmp_path, pki, "alice", "bob", {
        "registrar": home.uri, "proxy": visited.uri, "register_via_proxy": True}))

    mark_a, mark_b = alice.mark(), bob.mark()
    alice.send(f"call {BOB}")
    try:
        media_b = bob.wait("call_media", lambda e: "active" in e["audio"], since=mark_b,
                           timeout=20)
    except AssertionError as exc:
        # alice's own size warning says how large her INVITE left (before the proxies)
        sent = [w["detail"] for w in alice.of("warning", since=mark_a)
                if w.get("error") == "SizeWarning" and w.get("message") == "INVITE"]
        what = sent[-1] if sent else "no size warning from alice"
        raise AssertionError(f"the INVITE never reached bob ({what}; pjsip drops a message "
                             f"over {PJSIP_MAX_PKT_LEN}): {exc}") from None
    media_a = alice.wait("call_media", lambda e: "active" in e["audio"], since=mark_a)

    # the size bob's pjsip received, all Via, Record-Route, policy and label included
    (at_bob,) = [r["bytes"] for r in media_b["security"]
                 if r["direction"] == "rx" and r["what"] == "INVITE"]
    assert isinstance(at_bob, int) and 0 < at_bob < PJSIP_MAX_PKT_LEN, (
        f"the INVITE reached bob at {at_bob} bytes; pjsip reads at most {PJSIP_MAX_PKT_LEN}")
    print(f"\nINVITE at bob: {at_bob} bytes")

    # the trimming weakened nothing: signed, encrypted for bob and home only, the
    # SRTP keys for bob alone, and bob answered under a key only the two of them hold
    # the last attempt: the first one drew home's 407 (digest) and was sent again
    offer = [r for r in media_a["security"] if r["direction"] == "tx" and r["what"] == "INVITE"][-1]
    sec = offer["security"]
    assert sec["signed"] and sec["encrypted"] and sec["split"], sec
    assert sorted(sec["readable_by"]) == [PROXY_HOST], sec
    assert VISITED_HOST not in str(sec)
    (got,) = [r for r in media_b["security"] if r["direction"] == "rx" and r["what"] == "INVITE"]
    assert got["security"]["trusted"] and got["security"]["peer"] == "sip:alice@example.com"
    assert got["security"]["split"] and got["security"]["readable_by"] == [PROXY_HOST]
    assert "active" in media_a["audio"] and "active" in media_b["audio"]

    alice.send("hangup")
    alice.wait("call_ended", since=mark_a)
    bob.wait("call_ended", since=mark_b)
    # home read the offer and the answer (media rows), never the SRTP keys
    assert home.archive_path is not None
    with sqlite3.connect(home.archive_path) as db:
        rows = db.execute("SELECT direction FROM media WHERE call_id = ? ORDER BY id",
                          (media_a["call_id"],)).fetchall()
        sdps = [bytes(r[0]) for r in db.execute(
            "SELECT plaintext FROM bodies WHERE call_id = ?", (media_a["call_id"],))]
    assert [r[0] for r in rows] == ["request", "response"], rows
    assert sdps and not any(b"a=crypto" in s or b"inline:" in s for s in sdps)
