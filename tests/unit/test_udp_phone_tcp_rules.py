"""Stop 43 (review 132 HB2), unit: the rules a UDP phone applies to what reaches it over
the TCP listener it now opens at its UDP port (RFC 3261 18.2.1).  The listener itself,
its guard and a stranger's seat: ``tests/e2e/test_udp_phone_tcp_listener.py``; the
large certificate NOTIFY it exists for: ``tests/e2e/test_review132_large_cert_notify.py``.

- ``ProxySource.matches(source, tcp=True)``: the proxy's address at any port (it connects
  from a port of its choosing), never another address; datagrams keep the port rule.
- The certificate client takes a NOTIFY over TCP from the proxy's address at another
  port, and still answers 481 to one from another address, or to a datagram from
  another port (review 123's control).
- ``FirstCopy``: a MESSAGE taken over a stream is never "retransmitted" (pjsip ends its
  transaction with the answer), whichever way its copy comes; datagrams as before.
- ``[phone] udp_tcp_listener``: on by default, a bool, only for a UDP phone; such a
  phone's listener accepts by default even with a registrar.
"""

from __future__ import annotations

import pytest

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_lab.phones import write_ua
from e2m_plugins import sip
from e2m_plugins.config import ConfigError
from e2m_plugins.testpki import init_test_pki
from pjsua_hooks.firstcopy import Duplicate, FirstCopy
from pjsua_hooks.phone import PhoneSettings, load_phone_config
from pjsua_hooks.proxysource import ProxySource
from tests.unit.test_certservice_client import BOB, answer, der, notify_for, subscribe_to_bob
from tests.unit.test_review102 import _bare_phone, _carols

PROXY_CONNECTION = (PROXY[0], 40123)     # the proxy's address, a port it chose
STRANGER = ("127.0.0.2", PROXY[1])       # another address, even at the proxy's port


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_test_pki(tmp_path_factory.mktemp("udp-tcp-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


# --------------------------------------------------------------------------- ProxySource

def test_over_tcp_a_udp_phone_compares_the_proxys_address_alone():
    home = ProxySource.of_uris(["sip:127.0.0.1:5070;lr"], udp=True)
    assert home.matches(("127.0.0.1", 5070))
    assert not home.matches(("127.0.0.1", 40123))              # a datagram: port too
    assert home.matches(("127.0.0.1", 40123), tcp=True)
    assert home.matches(("::ffff:127.0.0.1", 40123), tcp=True)  # one spelling
    assert not home.matches(("127.0.0.2", 5070), tcp=True)
    assert not home.matches(None, tcp=True)
    assert not home.matches(("not-an-address", 5070), tcp=True)


def test_a_request_over_tcp_is_the_homes_from_its_address_at_any_port(pki):
    """``E2MPhone._through_home`` on a UDP phone, as review 102's units drive it."""
    from pjsua_hooks.rawhook import RxReject

    home = ProxySource([("127.0.0.1", 5070)], udp=True)
    _bare_phone(home, ("127.0.0.1", 40123), tcp=True)._through_home(_carols(pki))
    for source, tcp in ((("127.0.0.2", 40123), True), (("127.0.0.2", 5070), True),
                        (("127.0.0.1", 40123), False)):
        phone = _bare_phone(home, source, tcp=tcp)
        with pytest.raises(RxReject) as refused:
            phone._through_home(_carols(pki))
        assert refused.value.code == 403, (source, tcp)
        assert phone.counts["requests_not_via_proxy"] == 1


# --------------------------------------------------------------------------- certificate NOTIFYs

def _following(pki):
    """alice follows bob through PROXY (UDP, as the phone builds it); bob's withdrawal,
    ready to send."""
    made = subscriber(pki)
    engine, client = made.engine, made.client
    out = subscribe_to_bob(engine, client, made.sent)
    ok = sip.make_response(out, 200, "OK", extra_headers=[("Expires", "3600")])
    assert client.on_rx(ok, PROXY) is True
    assert answer(client, notify_for(out, der(pki, "bob"), to_tag=ok.to_tag)) == 200
    withdrawal = notify_for(out, b"", to_tag=ok.to_tag).replace("CSeq", "2 NOTIFY")
    return engine, client, withdrawal


def _tcp_answer(client, notify, source) -> int:
    from pjsua_hooks.certservice_client import NotifyAnswer

    with pytest.raises(NotifyAnswer) as caught:
        client.on_rx(notify, source, tcp=True)
    return caught.value.code


def test_a_notify_over_tcp_from_the_proxys_address_at_another_port_is_taken(pki):
    engine, client, withdrawal = _following(pki)
    assert _tcp_answer(client, withdrawal, PROXY_CONNECTION) == 200
    assert engine.certs.user(BOB) is None


def test_a_notify_over_tcp_from_another_address_is_still_refused(pki):
    engine, client, withdrawal = _following(pki)
    assert _tcp_answer(client, withdrawal, STRANGER) == 481
    assert engine.certs.user(BOB) is not None


def test_a_datagram_notify_from_the_proxys_address_at_another_port_is_still_refused(pki):
    engine, client, withdrawal = _following(pki)
    assert answer(client, withdrawal, PROXY_CONNECTION) == 481
    assert engine.certs.user(BOB) is not None


# --------------------------------------------------------------------------- FirstCopy

def _message() -> sip.SipMessage:
    return sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", call_id="tcp@x", cseq=1,
                            from_tag="a1", body=b"hi", content_type="text/plain")


@pytest.mark.parametrize("copy_over_tcp", [True, False])
def test_a_message_taken_over_tcp_on_a_udp_phone_has_no_retransmission(copy_over_tcp):
    seen = FirstCopy(max_age=332.0)                 # a UDP phone
    message = _message()
    seen.check(message, message, True, reliable=True)
    with pytest.raises(Duplicate):
        seen.check(message, message, True, reliable=copy_over_tcp)


def test_a_message_taken_over_udp_still_has_its_retransmissions():
    seen = FirstCopy(max_age=332.0)
    message = _message()
    seen.check(message, message, True)
    seen.check(message, message, True)              # pjsip's UDP transaction absorbs it
    seen.check(message, message, True, reliable=True)   # same branch: that transaction
    assert seen.absorbed == 0


# --------------------------------------------------------------------------- settings

def test_the_listener_is_on_by_default_for_a_udp_phone_only():
    assert PhoneSettings().tcp_beside_udp is True
    assert PhoneSettings(udp_tcp_listener=False).tcp_beside_udp is False
    assert PhoneSettings(transport="tcp").tcp_beside_udp is False
    assert PhoneSettings(transport="tls").tcp_beside_udp is False
    registrar = "sip:127.0.0.1:5080"
    assert PhoneSettings(registrar=registrar).accepts_tcp is True
    assert PhoneSettings(registrar=registrar, transport="tcp").accepts_tcp is False
    assert PhoneSettings(registrar=registrar, tcp_accept=False).accepts_tcp is False


def test_udp_tcp_listener_is_read_from_ua_toml(pki, tmp_path):
    path = write_ua(tmp_path, "alice", pki.directory, peer=None,
                    phone={"udp_tcp_listener": False})
    assert load_phone_config(path)[1].udp_tcp_listener is False
    (tmp_path / "bad").mkdir()
    bad = write_ua(tmp_path / "bad", "alice", pki.directory, peer=None,
                   phone={"udp_tcp_listener": "yes"})
    with pytest.raises(ConfigError, match="udp_tcp_listener"):
        load_phone_config(bad)
