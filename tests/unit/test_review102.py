"""A fifty-...th attacker's review (December 2026) of 640725e: the archive's completeness,
as an insider hiding from it (an insider UA who wants bob to read a body the archive
never holds, or holds with other text or under another name).  Core checks: alice's
real UA engine, the home proxy's engine (``view = MESSAGE:text/plain,
INVITE:application/sdp``, the deployed default), the archive rows it would write
(``bootstrap.body_records``) and bob's engine, which hands pjsua what it shows.

The hole is on the phone (``tests/pjsua/test_review102_phone.py``): an insider's
MESSAGE sent straight to bob's UDP phone is shown as "encrypted for us and
proxy.example.com; signed by carol (trusted)" and the archive never holds it.

What held (the first two are the controls here: the archive row's text is the very
octets bob's engine hands pjsua, under the sender's name, or the proxy refuses):

- text with a BOM, a NUL, a bare CR and a ``charset=utf-16`` parameter;
- a ``multipart/mixed`` MESSAGE of two text parts as alice's engine sends it: 496 at the
  proxy (every part of a method it views must open), nothing passes unread;
- read in the code, not run: a MESSAGE whose text part for the proxy is ``handling=optional`` beside a part
  sealed for bob alone: 496 (a method the proxy views opens every part);
- a nested ``multipart/mixed`` wrapping the S/MIME part: bob's engine hands pjsua the
  ciphertext as it is, nothing readable is shown (not a hiding place).

Also read, not kept as tests: the spool (``archive_spool.py``) keeps each message's rows
under its uid and replays them as stored (no row is re-attributed; ``ON CONFLICT`` only
fills an empty ``from_uri``/``request_uri``); SDP ports and port counts are at most five
digits (``sdp._MEDIA``), so no value overflows an INTEGER column (PostgreSQL would refuse
the row for good: lost); INFO, NOTIFY and other methods the policy does not name are
forwarded unread, but pjsua shows no body of theirs; a response the proxy cannot open is
forwarded unread by design (protocol.md §7), an ACK likewise (threat model "Still open").

Fixed (stop 37): the phone's rule and its helper are tested at the end of this module
(``test_fixed_*``: ``ProxySource`` with IPv4, IPv6 in other spellings, a wrong port,
TCP/TLS without the port, host-name proxies; ``E2MPhone._through_home``'s 403).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, proxy_engine, ua_engine
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from kamailio_app.bootstrap import body_records

VIEW = ("MESSAGE:text/plain", "INVITE:application/sdp")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review102-unit"), proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "carol"), key_type="ec")


def _through(pki: TestPKI, content_type: str, text: bytes):
    """alice's MESSAGE to bob through the home proxy: (verdict, rows, what bob's engine
    hands pjsua)."""
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, VIEW),))
    bob = ua_engine(pki, "bob")
    proxy = proxy_engine(pki, TRUSTED, view=VIEW)
    plain = sip.make_request("MESSAGE", pki.aor("bob"), from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), body=text, content_type=content_type)
    wire = alice.protect(plain).message
    verdict = proxy.inspect(wire)
    rows = body_records(wire, verdict.seen)
    opened = bob.open(wire)
    return verdict, rows, opened.message


@pytest.mark.parametrize("content_type, text", [
    ("text/plain", b"\xef\xbb\xbfPay \x00 to IBAN\rXX00 3333"),
    ("text/plain;charset=utf-16", "Pay to IBAN XX00 4444".encode("utf-16")),
])
def test_control_odd_text_is_archived_as_bob_is_handed_it(pki, content_type, text):
    verdict, rows, handed = _through(pki, content_type, text)
    assert verdict.action == "forward"
    (row,) = rows
    assert row.plaintext == handed.body == text
    assert row.from_uri == pki.aor("alice") and row.signature == "valid"


def test_control_a_multipart_message_never_passes_unread(pki):
    """alice's engine given a ``multipart/mixed`` of two text parts: what it sends is
    answered 496 by the proxy (every part of a method it views must open): nothing of
    it reaches bob unread."""
    inner = (b"--b1\r\nContent-Type: text/plain\r\n\r\ndecoy\r\n"
             b"--b1\r\nContent-Type: text/plain\r\n\r\nreal text XX00 5555\r\n--b1--\r\n")
    verdict, rows, _handed = _through(pki, "multipart/mixed;boundary=b1", inner)
    assert (verdict.action, verdict.code, rows) == ("reply", 496, [])


# ------------------------------------------------------------------ fixed (stop 37)
# The phone's one answer to "is this our proxy" (``pjsua_hooks/proxysource.py``), asked by
# ``E2MPhone._through_home`` (requests) and ``CertServiceClient._from_proxy`` (NOTIFYs).

from collections import deque  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from pjsua_hooks.proxysource import ProxySource, canonical_ip, proxy_address  # noqa: E402


def _names(table: dict[str, list[str]]):
    looked: list[str] = []

    def resolve(name: str) -> list[str]:
        looked.append(name)
        return table.get(name, [])
    return resolve, looked


@pytest.mark.parametrize("spelling, canonical", [
    ("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("0:0:0:0:0:0:0:1", "::1"),
    ("2001:DB8:0:0::7", "2001:db8::7"), ("[2001:0db8::0007]", "2001:db8::7"),
    ("::ffff:127.0.0.1", "127.0.0.1"), ("[::FFFF:7f00:1]", "127.0.0.1"),
    ("proxy.example.com", None), ("", None), ("127.1", None)])
def test_fixed_addresses_are_compared_in_one_spelling(spelling, canonical):
    assert canonical_ip(spelling) == canonical


def test_fixed_proxy_address_reads_the_uri_and_its_default_port():
    assert proxy_address("sip:127.0.0.1:5070;lr") == ("127.0.0.1", 5070)
    assert proxy_address("sip:[2001:db8::7];lr") == ("2001:db8::7", 5060)
    assert proxy_address("sips:proxy.example.com;lr") == ("proxy.example.com", 5061)
    assert proxy_address("sip:proxy.example.com;transport=tls;lr", tls=True) == \
        ("proxy.example.com", 5061)
    assert proxy_address("not a uri") is None


def test_fixed_ipv4_source_must_be_the_proxy_address_and_port_over_udp():
    home = ProxySource.of_uris(["sip:127.0.0.1:5070;lr"], udp=True)
    assert home is not None
    assert home.matches(("127.0.0.1", 5070))
    assert home.matches(("::ffff:127.0.0.1", 5070))          # a dual-stack socket's form
    assert not home.matches(("127.0.0.1", 5071))               # wrong port: carol's socket
    assert not home.matches(("127.0.0.2", 5070))
    assert not home.matches(None) and not home.matches(("garbage", 5070))


def test_fixed_ipv6_in_other_spellings():
    home = ProxySource([("2001:DB8:0:0:0:0:0:7", 5070)], udp=True)
    for spelling in ("2001:db8::7", "[2001:db8::7]", "2001:0db8:0000::0007"):
        assert home.matches((spelling, 5070)), spelling
    assert not home.matches(("2001:db8::8", 5070))
    assert not home.matches(("2001:db8::7", 5060))


def test_fixed_over_tcp_and_tls_the_port_is_not_compared():
    home = ProxySource([("127.0.0.1", 5061)], udp=False)
    assert home.matches(("127.0.0.1", 40123))          # a connection the proxy opened
    assert not home.matches(("127.0.0.9", 5061))


def test_fixed_a_host_name_proxy_is_resolved_once_when_built():
    resolve, looked = _names({"proxy.example.com": ["192.0.2.10", "2001:db8::10"]})
    home = ProxySource.of_uris(["sip:proxy.example.com:5070;lr", "sip:proxy.example.com:5070"],
                               udp=True, resolve=resolve)
    assert home is not None
    assert looked == ["proxy.example.com", "proxy.example.com"]
    assert home.matches(("192.0.2.10", 5070)) and home.matches(("[2001:DB8::10]", 5070))
    assert not home.matches(("192.0.2.10", 5060))
    assert not home.matches(("proxy.example.com", 5070))      # a source is an address
    assert looked == ["proxy.example.com", "proxy.example.com"]   # never in the hook


def test_fixed_a_name_that_does_not_resolve_matches_nothing():
    resolve, _ = _names({})
    home = ProxySource.of_uris(["sip:nowhere.invalid;lr"], resolve=resolve)
    assert home is not None and not home.addresses
    assert not home.matches(("127.0.0.1", 5060))


def test_fixed_proxy_and_registrar_are_both_the_home():
    home = ProxySource.of_uris(["sip:127.0.0.1:5071;lr", "sip:127.0.0.1:5070"], udp=True)
    assert home is not None
    assert home.matches(("127.0.0.1", 5071)) and home.matches(("127.0.0.1", 5070))
    assert not home.matches(("127.0.0.1", 5072))


def test_fixed_the_certificate_client_asks_the_same_helper(pki):
    from pjsua_hooks.certservice_client import CertServiceClient

    engine = ua_engine(pki, "bob")
    resolve, _ = _names({"proxy.example.com": ["::1"]})
    source = ProxySource([("proxy.example.com", 5070)], udp=True, resolve=resolve)
    client = CertServiceClient(engine, engine.config.certificate, send_subscribe=lambda *a: None,
                               contact=lambda: "sip:bob@127.0.0.1:5080", proxy_source=source)
    assert client._from_proxy(("0:0::1", 5070)) and not client._from_proxy(("::1", 5071))
    legacy = CertServiceClient(engine, engine.config.certificate,
                               send_subscribe=lambda *a: None,
                               contact=lambda: "sip:bob@127.0.0.1:5080",
                               proxy_address=("127.0.0.1", 5070), udp=True)
    assert legacy._from_proxy(("::ffff:127.0.0.1", 5070))
    assert not legacy._from_proxy(("127.0.0.1", 5071))


def _bare_phone(home: ProxySource | None, source: tuple[str, int] | None, *,
                tcp: bool = False):
    from pjsua_hooks.phone import E2MPhone

    phone = E2MPhone.__new__(E2MPhone)          # the rule only, no pjsua
    phone._home_source = home
    phone.hook = SimpleNamespace(rx_source=source, rx_over_tcp=tcp)
    phone.transport = None
    phone.counts = {"requests_not_via_proxy": 0}
    phone._pending_errors = deque()
    return phone


def _carols(pki: TestPKI) -> sip.SipMessage:
    return sip.make_request("MESSAGE", "sip:bob@127.0.0.1:5080", from_uri=pki.aor("carol"),
                            to_uri=pki.aor("bob"), body=b"hi", content_type="text/plain")


def test_fixed_the_phone_refuses_a_request_not_from_its_proxy_403(pki):
    from pjsua_hooks.rawhook import RxReject

    home = ProxySource([("127.0.0.1", 5070)], udp=True)
    phone = _bare_phone(home, ("127.0.0.1", 40000))
    with pytest.raises(RxReject) as refused:
        phone._through_home(_carols(pki))
    assert refused.value.code == 403
    assert "home proxy" in dict(refused.value.headers)["Warning"]
    assert phone.counts["requests_not_via_proxy"] == 1
    (event,) = phone._pending_errors
    assert event["kind"] == "request_refused" and event["source"] == "127.0.0.1:40000"
    # from the proxy: taken on; a response: never this rule's
    _bare_phone(home, ("127.0.0.1", 5070))._through_home(_carols(pki))
    answer = sip.make_response(_carols(pki), 200, "OK")
    _bare_phone(home, ("127.0.0.1", 40000))._through_home(answer)
    # no outbound proxy (peer to peer): unchanged, from anyone
    _bare_phone(None, ("127.0.0.1", 40000))._through_home(_carols(pki))
    # no source known: refused (fail closed)
    with pytest.raises(RxReject):
        _bare_phone(home, None)._through_home(_carols(pki))


def test_fixed_a_clusters_nodes_are_home_sources_when_configured(pki, tmp_path):
    """Behind a cluster's front the nodes relay to the phone from their own addresses:
    ``[phone] home_sources`` (SIP URIs) adds them to the proxy and registrar; anything
    but a list of SIP URIs is a config error (make demo-cluster's phones use it)."""
    import pytest as _pytest
    from e2m_lab.phones import write_ua
    from e2m_plugins.config import ConfigError
    from pjsua_hooks.phone import load_phone_config
    nodes = ["sip:127.0.0.1:5081", "sip:127.0.0.1:5082"]
    path = write_ua(tmp_path, "alice", pki.directory, peer=None, phone={
        "registrar": "sip:127.0.0.1:5080", "proxy": "sip:127.0.0.1:5080",
        "home_sources": nodes})
    _, settings = load_phone_config(path)
    assert settings.home_sources == tuple(nodes)
    home = ProxySource.of_uris(["sip:127.0.0.1:5080", *settings.home_sources], udp=True)
    assert home.matches(("127.0.0.1", 5082)) and not home.matches(("127.0.0.1", 5083))
    (tmp_path / "bad").mkdir()
    bad = write_ua(tmp_path / "bad", "alice", pki.directory, peer=None, phone={
        "registrar": "sip:127.0.0.1:5080", "home_sources": ["127.0.0.1:5081"]})
    with _pytest.raises(ConfigError, match="home_sources"):
        load_phone_config(bad)
