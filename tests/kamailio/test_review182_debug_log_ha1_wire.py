"""Review 182 (attacker's review of ea96db7/9f1ec56's LogCutter, at log_level = "debug").

Set-up: a real Kamailio per test (``proxy_factory``, ``e2m-proxy``), ``[kamailio]
log_level = "debug"``; the log searched is what the launcher writes after
``LogCutter`` (``proxy.log_since(0)``).

Hole K1: at debug, every digest check logs the user's HA1, and any sender picks the user
----------------------------------------------------------------------------------------
- Attacker: whoever reads the proxy's log (operator, log shipper, support bundle) of a
  proxy run at ``log_level = "debug"``, the level the launcher accepts; plus one REGISTER
  from anywhere naming the victim (no password, no capture: a wrong guess is enough).
- Messages: REGISTER as ``alice`` with password "guessed" -> 401 challenge -> REGISTER
  with an ``Authorization`` for ``alice`` -> 401.  (An honest REGISTER or MESSAGE of
  alice's logs it likewise: once per ``auth_check``.)
- Effect observed: the log holds ``<core> [db_row.c:64]: db_free_row(): free
  VAL_STRING[0] '8c330dccb1b208221ee575f81957e36e' at 0x...``, a record's FIRST line
  (LogCutter passes it: ``_QUOTING`` does not name it), where the quoted string is
  MD5(alice:example.com:alice-Secret-1), alice's HA1: 1 line per digest check (2 of 2
  checks in the probe, REGISTER and MESSAGE; 1 for the thief's single attempt).  HA1 is
  password-equivalent for HTTP/SIP digest (RFC 2617 s4.13): with it a log reader answers
  any nonce as alice (REGISTER her contact away, call as her) without ever learning or
  guessing the password; and, unlike review 180's oracle, nothing is left to guess.
  The auth_db row is read (and freed) before the response is compared, so the thief's
  wrong password does not stop it.
- Code at fault: Kamailio 5.6.3 ``src/lib/srdb1/db_row.c:64`` (``LM_DBG("free
  VAL_STRING[%d] '%s' at %p\\n", ...)``, every string column of every DB row freed,
  here auth_db's ``select ha1 from subscriber``, cfg ``password_column "ha1"``),
  passed by ``kamailio_app/launcher.py:411`` ``_QUOTING`` / ``LogCutter.process``
  (launcher.py:452-458: a first line not named in ``_QUOTING`` goes out whole).
  9f1ec56 cut ``auth_check_response()``'s "Our result" and "HA1 string calculated",
  but not the library that hands auth_db its row.
- Suggested fix: add ``b"[db_row.c"`` (and, for ``db_postgres``, ``b"[db_val.c"``:
  srdb1 ``db_str2val`` logs ``converting STRING [%s]`` / ``converting STR [%.*s]`` of
  every value read, db_val.c:140/160, read not run here) to ``_QUOTING``; the record is
  then cut at its first "[" after "(): ".  More robust: with auth on, refuse
  ``log_level = "debug"`` or lower the core's DB library below DEBUG
  (``modparam("debugger", "mod_level", "core=2")`` is coarse): a list of quoting
  records cannot be complete.
- Test: ``test_debug_log_holds_no_ha1_of_the_user_a_thief_names``.

Controls
--------
- ``test_info_log_holds_no_ha1``: the same thief's attempt at the default level (info):
  401, and neither the HA1 nor any ``db_free_row`` line is in the log.

Tried and held
--------------
- (a) app_python3's argument echo (``apy_kemi.c:266-402``, first lines) during an e2m
  MESSAGE sealed for bob and the viewing proxy (``view MESSAGE:*``), at debug: 2663 log
  lines, 200 OK, the archive kept the plaintext canary (1 row), the log none of it
  (``test_debug_log_holds_no_text_of_a_viewed_e2m_message``).  Every string argument
  seen: pv names (``$(mb{s.encode.base64})`` is a name: the value is returned, not
  logged), htable names and keys (hex digests), ``sht_setxs`` values (``e2mseen``,
  ``e2manswered``: status flags), ``append_to_reply`` of Proxy-Body-Policy; no long
  base64 but six 64-hex names.  Key-cache records go to the htable sealed
  (AES-GCM, a key made before fork or derived from the private key:
  keycache_htable.py:145), so htable's ``set value and expire ... val:`` (htable.c:1286)
  shows no CEK (read).  The 496 and certificate-service bodies passed through
  ``pv.sets("$var(e2m_body)", ...)`` are certificates (public; read).
- (c) the launcher's start-up output at debug (Listening on / Aliases, module loading):
  no password, no PROXY.toml secret, no seal key (the seal key is never a string in the
  cfg: ``bootstrap.cluster_seal_key`` derives it inside each worker).
- The HA1 with ``calculate_ha1`` and auth's "Our result" stay cut (9f1ec56).

Untried (time): db_postgres auth at debug (db_val.c "converting STRING", read only),
TLS session/key logging, DMQ's ``sending serialized data`` of replicated htables in a
cluster (values are sealed records and dialog targets: read only), kamcmd htable.dump.

Fixed (stop 50): as this review suggested, no list: ``LogCutter`` keeps of every DEBUG
record only its place and function name (``db_free_row():``), whatever it would quote.
The hole test failed on the code before the fix and passes with it.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import make_response

pytestmark = [pytest.mark.kamailio]

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
REALM = "example.com"


def _ha1(user: str) -> str:
    return hashlib.md5(f"{user}:{REALM}:{USERS[user]}".encode()).hexdigest()


def _thief(proxy) -> str:
    """One REGISTER as alice with a wrong password; the proxy's log after it."""
    thief = SipUa(proxy.port, user="alice", password="guessed", source="127.0.0.32")
    try:
        answer = thief.register()
        assert answer is not None and answer.status == 401
        assert any(m.get("Authorization") for m in thief.sent)
    finally:
        thief.close()
    time.sleep(0.5)             # the launcher drains Kamailio's log every 20 ms
    return proxy.log_since(0)


def test_debug_log_holds_no_ha1_of_the_user_a_thief_names(proxy_factory):
    proxy = proxy_factory("r182-ha1", e2m=False, auth=True, users=USERS, log_level="debug")
    log = _thief(proxy)
    ha1 = _ha1("alice")
    assert ha1 not in log, [line for line in log.splitlines() if ha1 in line]


def test_info_log_holds_no_ha1(proxy_factory):
    proxy = proxy_factory("r182-ha1-info", e2m=False, auth=True, users=USERS)
    log = _thief(proxy)
    assert _ha1("alice") not in log and "db_free_row" not in log


def test_debug_log_holds_no_text_of_a_viewed_e2m_message(proxy_factory, pki):
    proxy = proxy_factory("r182-msg", e2m=True, view=("MESSAGE:*",), log_level="debug")
    bob = RawUas(lambda request: make_response(request, 200, "OK"))
    ua = SipUa(proxy.port, user="alice", timeout=5)
    canary = "canary-" + secrets.token_hex(12)
    try:
        register_contact(proxy, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
        sealed = alice.protect(message(pki, canary.encode()).replace("Via", ua.via()))
        assert canary.encode() not in sealed.message.serialize()
        got = ua.transact(sealed.message)
        assert got is not None and got.status == 200
    finally:
        ua.close()
        bob.close()
    time.sleep(0.5)
    assert [bytes(row.plaintext) for row in proxy.archive_rows()] == [canary.encode()]
    log = proxy.log_since(0)
    assert "DEBUG:" in log and "apy_kemi" in log      # the echo was on
    assert canary not in log, [line for line in log.splitlines() if canary in line]
