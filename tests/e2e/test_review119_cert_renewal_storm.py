"""Review 119 (attacker's review of bc215c1), hole K1: a stranger who fills a peer's
places at the certificate service (review 115's attack) turns each phone that follows
that peer into a SUBSCRIBE storm at its next renewal: one SUBSCRIBE per tick of the
phone's loop (10 a second) until the subscription it renews ends.

Real Kamailio (``[auth]`` with alice, bob, carol; the certificate service with the
per-AoR bound 4 and the per-source bound 2, as review 115's module, so a few addresses
do what 5 do with the defaults 100 and 20) and real ``e2m-phone`` processes (pjsua2).
The unit-level twin is ``tests/unit/test_review119_cert_renewal.py``.

**Hole K1.  Attacker: an off-path stranger with a few addresses** (SUBSCRIBE needs no
credentials, RFC 6072 §6.6; he answers his NOTIFYs so his subscriptions are confirmed
and never evicted).  A hop on alice's leg can do the same by forging one 4xx/5xx to a
renewal.

Set-up: bob's phone registers and publishes; alice's phone (``cert_subscribe_expires =
30``, the phone's minimum is 10; the default 3600 only stretches the storm) sends bob an
encrypted MESSAGE, so she follows bob's certificate (SUBSCRIBE ``Expires: 30``, granted
30).  The stranger then fills bob's AoR (``CertClient`` from 127.0.115.x, review 115's
``_fill``): with alice's, 4 confirmed subscriptions.

Messages: at 80 % of the granted time (24 s) alice's phone renews (a new SUBSCRIBE,
``Expires: 30``); the service answers ``403 Too Many Subscriptions``
(``kamailio_app/cert_route.py``).  The phone answers that with another renewal at the next
tick, and so on.

Observed on bc215c1 (two runs printed, the module takes about 70 s): 58 ``cert_subscribe``
events for bob each time, 57 of them renewals (``Expires: 30``), in the ~6 s between the
renewal point and the subscription's end, i.e. a SUBSCRIBE every ~0.1 s; 57
``peer_certificate_failed`` events naming the proxy's 403, one per renewal.  With
the default ``cert_subscribe_expires = 3600`` the same storm runs for the last 720 s of
every followed peer's subscription: ~7,200 SUBSCRIBEs per phone per followed peer, and
every phone of the domain that follows bob does it at once; the proxy pays a digest-free
SUBSCRIBE parse, a table look-up and a 403 for each (and pike may then ban the phones'
own addresses).  The stranger keeps the storm going by holding 100 subscriptions from 5
addresses (the defaults).  The certificate alice holds is not lost (the current
subscription stays until its end, and a later send fetches it), so the effect is load,
not secrecy.

Code at fault: ``pjsua_hooks/certservice_client.py``:
- ``_subscribe_answer`` (``:426``) turns a refusal into "fetch next and remember the
  refusal for ``OUTCOME_MAX_AGE``" only when the refused subscription is the AoR's
  current one; a renewal is never current before its first NOTIFY (``_subscribe``,
  ``:290``, ``renew=True`` leaves ``_current`` alone), so its refusal only calls
  ``_fail`` and ends it;
- ``tick`` (``:226``) forgets the ended renewal, and the renewal loop (``:246-255``) sees
  the current subscription still due and no renewal pending, and renews again; neither
  ``_failures`` nor ``_follow_refused`` is read there.
- The phone ticks the client every 0.1 s (``pjsua_hooks/phone.py:1413``).

Suggested fix: treat a refused renewal like a refused follow: set
``_follow_refused[aor]`` (and skip renewals of an AoR whose follow was refused lately),
let the current subscription run to its end, then fetch when wanted; more generally,
never send a SUBSCRIBE for an AoR more than once per some seconds whatever the path
(a per-AoR send backoff in ``_subscribe``).

Control (unmarked): ``test_control_an_unfilled_peer_is_renewed_once``: the same phones
and set-up with carol, whose AoR nobody filled: over the same span alice's phone renews
carol exactly once (at most two SUBSCRIBEs) and still sends her an encrypted MESSAGE.

Tried and held (see also the loop and branch-note modules of this review):
- the first follow refused: one fetch (``Expires: 0``), then silence for 300 s (review
  115's fix, unit control in the twin module);
- a refused fetch fails the send with no storm (read; the existing
  ``tests/unit/test_certservice_client.py::test_a_refused_fetch_fails_the_send`` shows
  it);
- a 401/407 to a follow is left to pjsua and does not end it (read; the existing
  ``test_a_challenge_to_a_follow_is_left_to_pjsua``);
- after K1's storm the certificate is not lost for good: the subscription runs to its
  end, and the next send's ``want`` follows again (refused: one fetch) although
  ``failure`` is set (read: ``want`` does not ask ``failure``).

Untried: with phones on their own addresses (not 127.0.0.1, which pike never counts), two
followed peers storming at once send 20 SUBSCRIBEs a second, over pike's default 15 a
second (30 per 2 s): the proxy would then ban the phone's own address for 300 s
(computed, not run).

Fixed (stop 40): a refused renewal is remembered as a refused follow
(``CertServiceClient._subscribe_answer``: ``_follow_refused``, event
``cert_follow_refused``); the subscription it renews lives out its term, and ``tick``
sends no renewal while the refusal is remembered (300 s).  The hole test failed on the
code before the fix and passes with it; its set-up check also reads the new event (the
refusal used to be reported only as ``peer_certificate_failed``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.e2e.test_cert_discovery import USERS, send, ua
from tests.e2e.test_review115_cert_fill import PER_AOR, PER_SOURCE, _fill

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.slow]

BOB, CAROL = "sip:bob@example.com", "sip:carol@example.com"
EXPIRES = 30                 # alice's cert_subscribe_expires: renewal at 24 s


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("r119-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("r119-home"), pki=pki, e2m=True, auth=True,
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


def _follow(tmp_path: Path, pki: TestPKI, home: ProxyHandle, group: PhoneGroup, peer: str):
    """The peer's phone publishes; alice's phone sends it an encrypted MESSAGE (and so
    follows its certificate for EXPIRES s).  Returns (peer, alice, mark, followed_at)."""
    assert pki.directory is not None
    name = peer.split(":")[1].split("@")[0]
    callee = group.start(name, ua(tmp_path, name, pki.directory, home))
    assert callee.wait("certificate_published", timeout=10)["code"] == 200
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home,
                                    cert_subscribe_expires=EXPIRES))
    alice.wait("certificate_published", timeout=10)
    mark = alice.mark()
    sent = send(alice, peer, "first")
    assert sent["kind"] == "message_sent" and sent["security"]["encrypted"], sent
    return callee, alice, mark, time.monotonic()


def _subscribes(alice, peer: str, mark: int) -> list[dict]:
    return [e for e in alice.of("cert_subscribe", since=mark) if e.get("aor") == peer]


def _until_the_end(followed_at: float) -> None:
    """Past the subscription's end (EXPIRES) and a little more."""
    time.sleep(max(0.0, followed_at + EXPIRES + 3 - time.monotonic()))


def test_hole_a_refused_renewal_becomes_a_subscribe_storm(tmp_path, pki, home, group):
    bob, alice, mark, followed_at = _follow(tmp_path, pki, home, group, BOB)
    stranger = _fill(home, BOB)
    try:
        assert time.monotonic() - followed_at < EXPIRES * 0.8, "filled after the renewal"
        _until_the_end(followed_at)
        subscribes = _subscribes(alice, BOB, mark)
        # a refused follow is its own event since the fix (before it, a failure)
        refused = [e for e in alice.of("peer_certificate_failed", since=mark)
                   if e.get("aor") == BOB and "403" in e.get("reason", "")] + \
                  [e for e in alice.of("cert_follow_refused", since=mark)
                   if e.get("aor") == BOB and e.get("code") == 403]
        print("alice's SUBSCRIBEs for bob:", len(subscribes),
              "renewals:", sum(1 for e in subscribes if e.get("renew")),
              "refusals (403) seen:", len(refused))
        assert refused, "set-up: the service refused alice's renewal"
        # secure: the follow, one refused renewal, a fetch at most
        assert len(subscribes) <= 3, len(subscribes)
    finally:
        for one in stranger:
            one.close()


def test_control_an_unfilled_peer_is_renewed_once(tmp_path, pki, home, group):
    carol, alice, mark, followed_at = _follow(tmp_path, pki, home, group, CAROL)
    _until_the_end(followed_at)
    subscribes = _subscribes(alice, CAROL, mark)
    assert 2 <= len(subscribes) <= 3, subscribes            # the follow and its renewal
    assert sum(1 for e in subscribes if e.get("renew")) == 1
    again = send(alice, CAROL, "second")
    assert again["kind"] == "message_sent" and again["security"]["encrypted"], again
    assert carol.wait("message_in", lambda e: e["text"] == "second", timeout=5)
