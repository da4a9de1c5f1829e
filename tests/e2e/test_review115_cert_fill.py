"""Review 115 (attacker's review of 3bc1fa2), hole 1: the certificate service's per-AoR
bound, filled by a stranger, denies a real ``e2m-phone`` a peer's certificate while
he holds the places.

Real Kamailio (``[auth]`` with alice, bob, carol; the certificate service; per-AoR bound
4 and per-source bound 2 instead of the defaults 100 and 20: a few addresses do
here what 5 do with the defaults) and real ``e2m-phone`` processes (pjsua2).

**Hole 1.  Attacker: an off-path stranger with a few real addresses** (SUBSCRIBE needs
no credentials, RFC 6072 §6.6; he answers the NOTIFYs, so his subscriptions are
confirmed and never evicted).  Set-up: bob's phone registers and publishes his
certificate.  The stranger (``CertClient``, no password) sends ``SUBSCRIBE
sip:bob@example.com`` (``Event: certificate``, ``Expires: 3600``) from 127.0.115.x, at
most 2 per address, and answers each NOTIFY 200, until bob's AoR holds 4 confirmed
subscriptions (the bound; a subscription whose first NOTIFY answer confirmed nothing is
evicted by the next SUBSCRIBE from its address, so the stranger simply sends one more).
Then alice's phone (no ``[peers]``) sends bob a MESSAGE.  Observed on 3bc1fa2: alice's
phone asks to follow bob (``Expires: 3600``, ``CertServiceClient._subscribe``,
``pjsua_hooks/certservice_client.py:280``), gets ``403 Too Many Subscriptions``
(``kamailio_app/cert_route.py:197``; the bound ``cert_table.py:357-379`` evicts only
unconfirmed ones), records the failure (``_subscribe_answer``,
``certservice_client.py:398-405``) and never fetches (``Expires: 0``), which the service
still serves (the control below; ``test_certservice_attacks.py::
test_real_subscribers_at_many_addresses_fill_one_aors_followers`` says "an honest
subscriber can still get the certificate; it only cannot follow it": the product's own
phone does not).  The send fails closed: ``message_failed``, "not sent: no usable
certificate for sip:bob@example.com: the certificate service answered 403 Too Many
Subscriptions"; the next try (after ``OUTCOME_MAX_AGE`` = 300 s) asks to follow again.
Effect: no phone of the product without bob in ``[peers]`` can send bob an encrypted
MESSAGE or call him for as long as the stranger keeps 100 subscriptions from 5
addresses (the defaults; no credentials needed).  The xfail asserts the secure
behaviour: the MESSAGE goes encrypted for bob and he reads it.  Suggested fix: on a
403 (or 5xx) to a follow, the client fetches once (``Expires: 0``), keeps the
certificate for a short time and asks to follow again later; and/or the service
bounds subscriptions per subscribing user (From AoR, authenticated) rather than
letting strangers use up an AoR's places.

Controls (unmarked):

- ``test_control_the_fetch_is_still_served_while_the_aor_is_full``: with bob's AoR full,
  a fetch (``Expires: 0``) from another address gets 200 and bob's certificate byte-exact
  in its NOTIFY: the service side holds, what fails is the phone's choice.
- ``test_control_without_the_fill_alice_sends_bob_an_encrypted_message``: the same
  phones, no fill (carol's AoR, which nobody filled): alice's MESSAGE to carol goes
  encrypted, her certificate fetched from the service.

Fixed (stop 39): the phone replaces a refused follow with one fetch (``Expires: 0``),
keeps what it brings ``TERMINATED_CACHE`` s, and for ``OUTCOME_MAX_AGE`` s fetches that
peer rather than following it (``CertServiceClient._subscribe_answer``, ``tick``); the
send waits for the fetch.  The hole test failed on the code before the fix and passes
with it (marker removed).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certclient import CertClient
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group
from kamailio_app.cert_table import UNCONFIRMED
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.e2e.test_cert_discovery import USERS, send, ua

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.slow]

BOB, CAROL = "sip:bob@example.com", "sip:carol@example.com"
PER_AOR, PER_SOURCE = 4, 2
_sources = iter(range(2, 250))


def _source() -> str:
    return f"127.0.115.{next(_sources)}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("r115-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("r115-home"), pki=pki, e2m=True, auth=True,
                        users=USERS, extra={"certs": {
                            "notify_interval": 2, "min_expires": 2,
                            "max_subscriptions_per_aor": PER_AOR,
                            "max_subscriptions_per_source": PER_SOURCE}})
    yield proxy
    proxy.stop()


@pytest.fixture
def group(request: pytest.FixtureRequest, home: ProxyHandle) -> Iterator[PhoneGroup]:
    env = {name: {"E2M_PHONE_PASSWORD": password} for name, password in USERS.items()}
    with phone_group(request, [home], env) as made:
        yield made


def _confirmed(home: ProxyHandle, aor: str) -> int:
    """Confirmed subscriptions to ``aor`` (the service's table; the set-up's check only)."""
    db = sqlite3.connect(home.directory / "certs.sqlite")
    try:
        return db.execute("SELECT count(*) FROM cert_subscriptions WHERE aor = ? AND "
                          "(pending & ?) = 0", (aor, UNCONFIRMED)).fetchone()[0]
    finally:
        db.close()


def _fill(home: ProxyHandle, aor: str) -> list[CertClient]:
    """The stranger: confirmed subscriptions to ``aor`` from a few addresses (at most
    PER_SOURCE each), every NOTIFY answered 200, until the AoR holds PER_AOR of them.
    (The first NOTIFY of a subscription sometimes reaches ``CertClient`` while it waits
    for the SUBSCRIBE's answer and its 200 confirms nothing; that one is then
    evicted by the next SUBSCRIBE from its address, which the stranger just sends.)"""
    made: list[CertClient] = []
    for _ in range(12):
        if _confirmed(home, aor) >= PER_AOR:
            break
        one = CertClient(home.port, "mallory", source=_source())
        made.append(one)
        for _ in range(4):
            answer, _ = one.subscribe(aor, 3600)
            assert answer is not None and answer.status in (200, 403), answer
            one.quiet(1.2)          # past EVICTABLE_AFTER: an unconfirmed one makes room
            if _confirmed(home, aor) >= PER_AOR:
                break
    assert _confirmed(home, aor) >= PER_AOR
    return made


def _phones(tmp_path: Path, pki: TestPKI, home: ProxyHandle, group: PhoneGroup, peer: str):
    assert pki.directory is not None
    name = peer.split(":")[1].split("@")[0]
    callee = group.start(name, ua(tmp_path, name, pki.directory, home))
    assert callee.wait("certificate_published", timeout=10)["code"] == 200
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home))
    alice.wait("certificate_published", timeout=10)
    return callee, alice


def test_control_the_fetch_is_still_served_while_the_aor_is_full(tmp_path, pki, home, group):
    bob, _ = _phones(tmp_path, pki, home, group, BOB)
    stranger = _fill(home, BOB)
    honest = CertClient(home.port, "alice", source=_source())
    try:
        assert honest.subscribe(BOB, 3600)[0].status == 403          # full
        answer, _ = honest.subscribe(BOB, 0)
        assert answer is not None and answer.status == 200, answer
        [notify] = honest.wait_notifies(1)
        assert notify.body == pki.user("bob").cert.public_bytes(Encoding.DER)
    finally:
        honest.close()
        for one in stranger:
            one.close()


def test_control_without_the_fill_alice_sends_bob_an_encrypted_message(tmp_path, pki, home,
                                                                        group):
    carol, alice = _phones(tmp_path, pki, home, group, CAROL)
    sent = send(alice, CAROL, "hello-carol")
    assert sent["kind"] == "message_sent", sent
    assert sent["security"]["encrypted"] and sent["security"]["peer"] == CAROL
    assert carol.wait("message_in", lambda e: e["text"] == "hello-carol")["security"][
        "encrypted"]


def test_hole_a_stranger_filling_bobs_followers_denies_alices_phone_his_certificate(
        tmp_path, pki, home, group):
    bob, alice = _phones(tmp_path, pki, home, group, BOB)
    stranger = _fill(home, BOB)
    try:
        sent = send(alice, BOB, "hello-bob")
        print({k: sent.get(k) for k in ("kind", "reason")})
        assert sent["kind"] == "message_sent", sent
        assert sent["security"]["encrypted"] and sent["security"]["peer"] == BOB
        assert bob.wait("message_in", lambda e: e["text"] == "hello-bob", timeout=5)
    finally:
        for one in stranger:
            one.close()
