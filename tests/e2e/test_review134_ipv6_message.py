"""Review 134, area 6 (write-up in ``tests/kamailio/test_review134_answer_sealed_part_wire.py``):
two e2m-phones on ``::1`` exchange a MESSAGE through the home proxy."""

from __future__ import annotations

import secrets
import sqlite3

import pytest

from e2m_lab.phones import write_ua
from e2m_lab.ports import free_port
from e2m_lab.pytest_fixtures import phone_group

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]


def _home(proxy_factory, name):
    port = free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:[::1]:{port}"]
    return proxy_factory(name, port=port, e2m=True, extra={"kamailio": {"listen": listen}})


def _message(request, tmp_path, pki, proxy_factory, host: str):
    home = _home(proxy_factory, f"r134-{'v6' if ':' in host else 'v4'}")
    registrar = f"sip:[{host}]:{home.port}" if ":" in host else f"sip:{host}:{home.port}"
    configs = {}
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        directory = tmp_path / name
        directory.mkdir()
        configs[name] = write_ua(directory, name, pki.directory, peer=peer,
                                 phone={"host": host, "registrar": registrar,
                                        "proxy": registrar, "register_via_proxy": False},
                                 e2m={"cert_url_hosts": ["127.0.0.1", "::1"]})
    text = "over v6 " + secrets.token_hex(6)
    with phone_group(request, [home]) as phones:
        bob = phones.start("bob", configs["bob"])
        alice = phones.start("alice", configs["alice"])
        alice.send(f"message sip:bob@example.com {text}")
        sent = alice.wait("message_sent", timeout=15)
        try:
            got = bob.wait("message_in", timeout=5)
        except Exception:  # noqa: BLE001 - reported below
            got = None
    with sqlite3.connect(home.archive_path) as db:
        archived = [bytes(r[0]) for r in db.execute(
            "SELECT plaintext FROM bodies WHERE method = 'MESSAGE'")]
    print(f"\n{host}: sent {{code: {sent.get('code')}, attempts: {sent.get('attempts')}}}; "
          f"bob got {bool(got and got.get('text') == text)}; archived "
          f"{sum(1 for a in archived if text.encode() in a)}")
    return sent, got, text, archived


def test_a_message_between_two_ipv6_phones_is_delivered_and_archived(request, tmp_path, pki,
                                                                   proxy_factory):
    sent, got, text, archived = _message(request, tmp_path, pki, proxy_factory, "::1")
    assert sent.get("code") == 200 and got is not None and got["text"] == text
    assert any(text.encode() in a for a in archived)


def test_control_the_same_on_ipv4(request, tmp_path, pki, proxy_factory):
    sent, got, text, archived = _message(request, tmp_path, pki, proxy_factory, "127.0.0.1")
    assert sent.get("code") == 200 and got is not None and got["text"] == text
    assert any(text.encode() in a for a in archived)
