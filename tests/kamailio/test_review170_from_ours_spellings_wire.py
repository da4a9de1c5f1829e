"""Review 170: attacking review 168's fix (``from_ours`` takes a From on any of our
addresses or aliases, on any port and in any address spelling).

Real Kamailio 5.6.3 with ``[auth]`` (alice, bob, carol in auth_db), the archive on, and
listeners udp/tcp 127.0.0.1:P, tls 127.0.0.1:T and udp [::1]:P; ``[limits] trusted``
127.0.4.0/24; bob registered at 127.0.0.20.  Every request below is a MESSAGE to
``sip:bob@example.com`` sent without credentials, each from its own 127.0.x.y address.

No hole and no honest break was found in the time (about 20 minutes).

Controls (unmarked, pass on e14655e)
- ``test_a_from_on_our_address_in_any_spelling_is_challenged`` (10 spellings): the
  address with a trailing dot (``<sip:alice@127.0.0.1.:1>``, ``<sip:alice@127.0.0.1.>``,
  ``127.0.0.1.:P``, with ``;x=1`` in the user and ``;user=phone``, and the addr-spec form
  without angle brackets), the IPv6 listener (``[::1]:1``, ``[0:0:0::0001]:1``, ``[::1]``
  without a port), the TLS listener's port with ``;transport=tls``: each 407, nothing
  relayed to bob, no archive row.  (A trailing dot was the likeliest gap: ``host_key``
  drops it so the engine reads ``sip:alice@127.0.0.1``; Kamailio's ``check_self`` holds
  too, each gets 407.)
- ``test_compact_from_on_our_address_is_challenged``: ``f: <sip:alice@127.0.0.1.:1>``:
  407, nothing relayed.
- ``test_two_from_headers_never_pass_as_the_second``: ``From: <sip:alice@127.0.0.1:1>``
  then ``From: <sip:dave@example.org>`` (a stranger toward our domain if either parser
  read the second; the core refuses a second From): no answer within 3 s (dropped),
  nothing relayed, no row; the other order (dave first) likewise (probe).
- Compact ``f:``/``F:``/``f :`` with ``<sip:dave@example.org>``: 200 and relayed (probe),
  so the compact form is read, and ``f: <sip:alice@127.0.0.1:1>``: 407.
- ``test_trusted_peer_relaying_a_foreign_user_still_passes``: from the trusted
  127.0.4.1, ``From: <sip:dave@example.org>``: 200, relayed to bob (the honest flow the
  change could have broken still works).
- ``test_trusted_peer_relaying_a_from_on_our_address_is_challenged``: from the trusted
  127.0.4.2, ``From: <sip:dave@127.0.0.1:PEERPORT>`` (a peer proxy sharing our IP, its
  own port): 407.  By design, not an honest break: the engine and the archive read it
  as ``sip:dave@127.0.0.1``, one of our AoRs; ``route_auth`` exempts no trusted peer,
  and outside a loopback lab no foreign domain names its users by our address.
- ``test_keepalive_to_the_proxy_from_our_address_is_answered``: OPTIONS to
  ``sip:127.0.0.1:P`` (no user), ``From: <sip:sipp@127.0.0.1:5061>`` (what stock SIPp
  writes): 200 (``route_options_self`` comes before ``route_auth``), so a dispatcher
  front's probes and a monitor's keepalives are not challenged.

Tried and held (probe on e14655e, no credentials)
- 407 for every spelling listed under Controls, also ``<sip:alice@127.0.0.1:1>``,
  ``<sip:alice@[::ffff:127.0.0.1]:1>``, ``<sip:alice@EXAMPLE.COM.:1>``,
  ``<sip:alice@proxy.example.com.:9>`` (the identity host with a dot and a port).
- ``<sip:alice@127.000.000.001:1>`` and ``<sip:alice@localhost.:1>``: 200, relayed and
  archived as written, but ``identity_of`` reads them as ``sip:alice@127.000.000.001``
  and ``sip:alice@localhost``, hosts that are not ours to the engine, the archive or any
  UA's signer check (``ipaddress`` refuses leading zeros, ``host_key`` resolves no
  name): a stranger's AoR, not alice's; not counted.
- A zone in an IPv6 reference (``[::1%lo]``): ``identity_of`` refuses it (None).
- By code reading (Kamailio 5.6.3 ``core/kemi.c`` ``sr_kemi_core_is_myself``,
  ``core/socket_info.c`` ``grep_sock_info``): ``is_myself`` on a bare host passes port 0
  and proto 0, so every listener, advertised address (``useinfo``) and alias counts on
  any port and transport.  KDMQ is routed (``route_dmq``) before ``route_auth``, and a
  dispatcher's OPTIONS probe names no user: neither reaches the new check.
- Display-name quoting (``\\"`` inside a quoted name) and ``,`` in From: Kamailio's
  ``parse_addr_spec`` and ``sip._address_split`` split them alike (code reading).
- Not reached in the time: a cluster with ``advertise``/``front`` names spelled with a
  trailing dot (``_local_hosts`` holds only the domains and identity host, so
  ``sip:alice@<front name>.:1`` rests on ``is_myself`` alone, whose alias compare is
  byte-exact: worth a look), the certificate service's NOTIFYs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import (PROXY_HOST, ProxyHandle, RawUas, SipUa, registered_uas,
                                      start_proxy)
from e2m_lab.ports import free_port
from tests.kamailio.test_review168_from_our_address_wire import _delivered as delivered_to
from tests.kamailio.test_review168_from_our_address_wire import _rows
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    port = free_port()
    tls = free_port(avoid={port})
    server = pki.tls_server(PROXY_HOST)
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"tls:127.0.0.1:{tls}",
              f"udp:[::1]:{port}"]
    proxy = start_proxy(
        tmp_path_factory.mktemp("review170"), pki=pki, e2m=True, auth=True, users=USERS,
        port=port, limits={"trusted": ["127.0.4.0/24"]},
        extra={"kamailio": {"listen": listen},
               "tls": {"cert": str(server.cert_path), "key": str(server.key_path),
                       "ca": [str(pki.directory / "ca.crt")]}})
    proxy.r170_tls_port = tls        # type: ignore[attr-defined]
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.20") as uas:
        yield uas


_sources = iter(range(1, 250))


def _message(home: ProxyHandle, from_value: str, text: bytes, *, source: str | None = None,
             raw_edit=None):
    """A MESSAGE to bob with ``from_value`` as its From, no credentials (a 407 is not
    answered); ``raw_edit`` rewrites the octets before they go."""
    ua = SipUa(home.port, user="carol", password=None,
               source=source or "127.0.5.%d" % next(_sources))
    try:
        request = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                           body=text, content_type="text/plain")
        request = request.replace("From", "%s;tag=r170-%d" % (from_value, time.monotonic_ns()))
        if raw_edit is None:
            return ua.request(request)
        ua.send(raw_edit(request.replace("Via", ua.via()).serialize()))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            answer = ua.receive(timeout=0.5)
            if answer is not None and answer.status >= 200:
                return answer
        return None
    finally:
        ua.close()


def _delivered(bob: RawUas, text: bytes, timeout: float = 0.7) -> list[str]:
    return delivered_to(bob, text, timeout)


SPELLINGS = ["<sip:alice@127.0.0.1.:1>", "<sip:alice@127.0.0.1.>", "<sip:alice@127.0.0.1.:{port}>",
             "<sip:alice;x=1@127.0.0.1.:1>", "<sip:alice@127.0.0.1.:1;user=phone>",
             "sip:alice@127.0.0.1.:1", "<sip:alice@[::1]:1>", "<sip:alice@[0:0:0::0001]:1>",
             "<sip:alice@[::1]>", "<sip:alice@127.0.0.1:{tls};transport=tls>"]


@pytest.mark.parametrize("from_value", SPELLINGS,
                         ids=["dot-port", "dot", "dot-our-port", "dot-user-param",
                              "dot-user-phone", "dot-addr-spec", "v6-listener",
                              "v6-leading-zeros", "v6-no-port", "tls-listener"])
def test_a_from_on_our_address_in_any_spelling_is_challenged(home, bob, from_value):
    from_value = from_value.format(port=home.port, tls=home.r170_tls_port)
    text = b"review170 spelling " + from_value.encode()
    answer = _message(home, from_value, text)
    assert answer is not None
    assert answer.status == 407, answer.status
    assert _delivered(bob, text) == [] and _rows(home, text) == []


def test_compact_from_on_our_address_is_challenged(home, bob):
    text = b"review170 compact f:"
    answer = _message(home, "<sip:alice@127.0.0.1.:1>", text,
                      raw_edit=lambda raw: raw.replace(b"\r\nFrom:", b"\r\nf:", 1))
    assert answer is not None and answer.status == 407, answer
    assert _delivered(bob, text) == [] and _rows(home, text) == []


def test_two_from_headers_never_pass_as_the_second(home, bob):
    """alice's From on our address first, a stranger's second: dropped."""
    text = b"review170 two From headers"

    def second_from(raw: bytes) -> bytes:
        return raw.replace(b"\r\nFrom:", b"\r\nFrom: <sip:alice@127.0.0.1:1>;tag=r170b"
                           b"\r\nFrom:", 1)

    answer = _message(home, "<sip:dave@example.org>", text, raw_edit=second_from)
    assert answer is None or answer.status >= 300, answer.status
    assert _delivered(bob, text) == [] and _rows(home, text) == []


def test_trusted_peer_relaying_a_foreign_user_still_passes(home, bob):
    text = b"review170 trusted peer, foreign user"
    answer = _message(home, "<sip:dave@example.org>", text, source="127.0.4.1")
    assert answer is not None and answer.status == 200, answer
    assert _delivered(bob, text)


def test_trusted_peer_relaying_a_from_on_our_address_is_challenged(home, bob):
    text = b"review170 trusted peer, From on our IP"
    answer = _message(home, "<sip:dave@127.0.0.1:%d>" % free_port(avoid={home.port}), text,
                      source="127.0.4.2")
    assert answer is not None and answer.status == 407, answer
    assert _delivered(bob, text) == [] and _rows(home, text) == []


def test_keepalive_to_the_proxy_from_our_address_is_answered(home):
    ua = SipUa(home.port, user="sipp", password=None, source="127.0.5.250")
    try:
        request = ua.build("OPTIONS", "sip:127.0.0.1:%d" % home.port, to="sip:127.0.0.1")
        request = request.replace("From", "<sip:sipp@127.0.0.1:5061>;tag=r170k")
        answer = ua.request(request)
    finally:
        ua.close()
    assert answer is not None and answer.status == 200, answer
