"""Review 168: an insider (or anyone) posing as alice by a From on the proxy's own address.

Real Kamailio 5.6.3 with ``[auth]`` (alice, bob, carol in auth_db) and the archive on;
bob registered at 127.0.0.20; every sender writes from its own 127.0.2.x address.

Hole K1: a From naming alice at the proxy's own address, with a port, needs no password
- Attacker: carol (an insider, though no account is needed at all: no credentials are
  sent), or any stranger who can reach the proxy.
- Messages: ``MESSAGE sip:bob@example.com`` with ``From: <sip:alice@127.0.0.1:1>`` (the
  proxy's own IP address, any port but its listener's), or
  ``From: <sip:alice@[::ffff:127.0.0.1]:PORT>`` (its own address and port in the
  IPv4-mapped spelling ``canonical_ip`` reads as 127.0.0.1), a plaintext body.
- Effect observed (184a0a2): 200, no 407; bob received the MESSAGE with that From, and the
  archive row reads ``from_uri = sip:alice@127.0.0.1:1`` (resp. the mapped form),
  ``signer`` None.  The same From without a port, ``<sip:alice@127.0.0.1>``, gets 407
  and needs alice's password: the engine, the archive and every UA's signer check read
  both as the one AoR ``sip:alice@127.0.0.1`` (``uri.identity_of`` drops the port), so
  the proxy books under alice's identity at its own address a message it never
  authenticated.  The docstring of ``from_ours`` states the very rule broken here ("the
  engine, every UA's signer check and the archive read ``sip:carol@example.com.`` as
  carol: such a request must carry carol's credentials").
- Code at fault: ``kamailio_app/kemi.py:1523`` ``from_ours`` (``KSR.is_myself_furi()``
  compares host AND port, so a port not ours makes the From a stranger's; the fallback
  compares the host with ``local_names``, the domains and identity host alone, not the
  listen addresses, and never in ``canonical_ip`` form); its caller
  ``route_auth`` (``kemi.py:1438``) then lets the request pass toward our domain unasked.
- Suggested fix: decide "ours" on the identity the engine and archive use: the From's
  host (``canonical_ip`` for an address, ``host_key`` for a name) among the domains,
  the identity host and every listen/advertised address, whatever the port; such a
  request needs its user's credentials (or a 403 for a From on our address that names
  no user of ours).
- Test: ``test_a_from_on_our_own_address_with_a_port_needs_alices_password`` (two
  spellings, strict xfail).

Controls (unmarked, pass on 184a0a2)
- ``test_control_carol_as_alice_in_our_domain_is_forbidden``: carol's credentials with
  ``From: <sip:alice@example.com>``: 403, nothing reaches bob, no archive row.
- ``test_control_our_address_without_a_port_is_challenged``: ``<sip:alice@127.0.0.1>``
  without credentials: 407, nothing delivered.
- ``test_control_a_display_name_does_not_rename_the_archive_row``: carol's credentials,
  ``From: "alice" <sip:carol@example.com>``: 200 and the row's ``from_uri`` is
  ``sip:carol@example.com`` (the display name goes to bob unchanged, as SIP has it).

Tried and held (probe on 184a0a2, carol's credentials where "creds")
- ``sip:alice@example.com:1``, ``sip:alice@proxy.example.com``, ``sips:alice@EXAMPLE.COM.``,
  ``SIP:alice@example.com``, ``sip:%61lice@example.com``, ``;maddr=1.2.3.4``, a space
  before ``>``: 407 without credentials (403 with carol's), nothing delivered.
- ``sip:alice@example%2ecom``: 400.
- creds ``<sip:carol;x=alice@example.com;user=phone>`` (Kamailio's phone2tel cuts the user
  at ``;`` so auth_db sees carol): 200, archived as that URI, i.e. the AoR
  ``carol;x=alice``, never alice; a signed part would fail ``check_signed_by``.
- creds ``<sip:carol@example.com>;x=<sip:alice@example.com>`` and the unquoted display
  name ``sip:alice@example.com <sip:carol@example.org>``: archived as carol's URI.
- ``tel:alice``, ``tel:+15551234;phone-context=example.com``, ``sip:alice@127.1``,
  ``sip:alice@2130706433``, ``sip:alice@0x7f.0.0.1``, ``sip:alice@localhost:PORT``: relayed
  without credentials (200), archived as written; none is an AoR the engine reads as one
  of ours (``identity_of`` gives another host or None), so these name a stranger, not
  alice: not counted as holes.
- Not reached in this review's time: CPIM From, two-signer multipart, captured signed
  body re-sent by carol, in-dialog requests, REGISTER for alice with carol's credentials
  (``tests/kamailio/test_auth_wire.py`` covers the last).

Fixed (stop 49): ``from_ours`` (``kamailio_app/kemi.py``) also takes a From whose host is
one of our addresses or aliases on any port (``KSR.is_myself`` on the bare host, which
compares no port; an address in ``canonical_ip`` form, so the IPv4-mapped spellings are
127.0.0.1): such a request needs its user's credentials.  Three more spellings (``sips:``,
``;transport=``, the mapped form in hex) and carol's own credentials (403) are tested.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, RawUas, SipUa, registered_uas, start_proxy
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review168"), pki=pki, e2m=True, auth=True,
                        users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.20") as uas:
        yield uas


_sources = iter(range(1, 250))


def _send_as(home: ProxyHandle, from_value: str, text: bytes, *, password: str | None):
    """carol's UA sends a MESSAGE to bob with ``from_value`` as its From (its own tag);
    with ``password``, answering the 407 as carol."""
    ua = SipUa(home.port, user="carol", password=password,
               source="127.0.2.%d" % next(_sources))
    try:
        request = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                           body=text, content_type="text/plain")
        request = request.replace("From", "%s;tag=r168-%d" % (from_value, time.monotonic_ns()))
        return ua.request(request)
    finally:
        ua.close()


def _delivered(bob: RawUas, text: bytes, timeout: float = 1.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [m.get("From") or "" for m in bob.received if m.body == text]
        if got:
            return got
        time.sleep(0.05)
    return []


def _rows(home: ProxyHandle, text: bytes) -> list[tuple[str | None, str | None]]:
    return [(r.from_uri, r.signer) for r in home.archive_rows() if r.plaintext == text]


@pytest.mark.parametrize("from_value", ["<sip:alice@127.0.0.1:1>",
                                        "<sip:alice@[::ffff:127.0.0.1]:{port}>",
                                        # stop 49: the same hole by other spellings
                                        "<sips:alice@127.0.0.1:1>",
                                        "<sip:alice@127.0.0.1:7;transport=tcp>",
                                        "<sip:alice@[::FFFF:7f00:1]:1>"],
                         ids=["another-port", "mapped-v6-our-port", "sips", "transport",
                              "mapped-v6-hex"])
def test_a_from_on_our_own_address_with_a_port_needs_alices_password(home, bob, from_value):
    text = b"review168 K1 " + from_value.encode()
    answer = _send_as(home, from_value.format(port=home.port), text, password=None)
    assert answer is not None
    delivered, rows = _delivered(bob, text), _rows(home, text)
    # secure: challenged (or refused), nothing relayed, nothing archived under alice
    assert answer.status in (401, 403, 407), (answer.status, delivered, rows)
    assert delivered == [] and rows == []


def test_carol_as_alice_on_our_address_with_a_port_is_forbidden(home, bob):
    """Stop 49: with the From now ours, carol's own credentials do not fit alice (403)."""
    text = b"review168 carol as alice@127.0.0.1:1"
    answer = _send_as(home, "<sip:alice@127.0.0.1:1>", text, password=USERS["carol"])
    assert answer is not None and answer.status == 403
    assert _delivered(bob, text, 0.5) == [] and _rows(home, text) == []


def test_control_carol_as_alice_in_our_domain_is_forbidden(home, bob):
    text = b"review168 control: carol as alice@example.com"
    answer = _send_as(home, "<sip:alice@example.com>", text, password=USERS["carol"])
    assert answer is not None and answer.status == 403
    assert _delivered(bob, text, 0.5) == [] and _rows(home, text) == []


def test_control_our_address_without_a_port_is_challenged(home, bob):
    text = b"review168 control: alice@127.0.0.1 without credentials"
    answer = _send_as(home, "<sip:alice@127.0.0.1>", text, password=None)
    assert answer is not None and answer.status == 407
    assert _delivered(bob, text, 0.5) == [] and _rows(home, text) == []


def test_control_a_display_name_does_not_rename_the_archive_row(home, bob):
    text = b"review168 control: display name alice"
    answer = _send_as(home, '"alice" <sip:carol@example.com>', text, password=USERS["carol"])
    assert answer is not None and answer.status == 200
    assert _delivered(bob, text)
    assert _rows(home, text) == [("sip:carol@example.com", None)]
