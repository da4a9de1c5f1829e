"""A fifty-...th attacker's review (December 2026) of 3724e89: stop 37's fixes, fresh eyes:
hole 1 on a real Kamailio 5.6 (the core half, the report and what held:
``tests/unit/test_review104.py``).

An **insider UA** (here alice's UA engine with her certificate: the proxy runs without
``[auth]``, as review 96's wire tests; with it, any user of ours) calls her own UAS
(``RawUas``, bob's engine's keys) twice under one Call-ID and From tag: call 1 keyed
(her offer's key, the 200 sealed under it on To tag t0), ended by her BYE along the
route set (the proxy ends its keys and its ``e2mtargets`` entries); call 2 a new keyed
INVITE (CSeq 3) under the same Call-ID and tag, answered 200 on To tag t1 under the new
offer key, never ended.  The early dialog's first fork slot is t0's, so t1's key is kept
for ``EARLY_DIALOG_TTL`` (200 s) as a later fork's, and ``note_dialog_targets`` writes
both of call 2's entries for 12 h.

``test_control_a_second_keyed_call_under_one_call_id_is_relayed_and_noted`` (fast): the
set-up on the wire: call 1's BYE leaves no key-cache record and no entry; call 2 is
relayed, answered 200 and read, and the proxy holds its key and both entries.

``test_hole_a_later_forks_targets_stay_when_its_key_expired`` (slow: 215 s, run only
with ``E2M_REVIEW104_SLOW=1``): after the key's 200 s and the htable's timer (10 s), the
record is gone and nothing removed the entries.  Run once on 3724e89 (222.8 s, failed at
the secure assertion, so XFAIL under its marker): ``{'keys_call1': 2, 'targets_call1': 2,
'targets_after_bye': 0, 'keys_call2': 2, 'targets_call2': 2, 'keys_later': 0,
'targets_later': 2}``: the key cache empty, call 2's two entries still there (for 12 h).

Fixed (stop 37): call 2's entries expire with its 200 s key; the hole test reads the
entry's expiry from ``htable.get`` (199 s left, not 12 h) instead of waiting 215 s, and
``E2M_REVIEW104_SLOW=1`` still waits it out and counts what is left.  It failed on the
code before (checked) and passes.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, answer_under_offer_key, register_contact
from e2m_plugins.proxy import EARLY_DIALOG_TTL
from e2m_plugins.sip import make_request
from kamailio_app.dialog_targets import dialog_name
from tests.kamailio.test_review94_wire import SDP_VIEW, _bobs_phone

pytestmark = pytest.mark.kamailio

SLOW = os.environ.get("E2M_REVIEW104_SLOW") == "1"


def _call(proxy, pki, alice, alice_ua, bob, bob_engine, call_id: str, cseq: int, to_tag: str):
    """alice's keyed INVITE (tag a1, ``cseq``) through the proxy, answered 200 on
    ``to_tag`` under her offer key; returns the 200 as alice got it."""
    offer = alice.protect(invite(pki, call_id=call_id, cseq=cseq).replace("Via", alice_ua.via()))
    alice_ua.send(offer.message)
    delivered = [m for m in bob.wait_for(cseq, method="INVITE") if m.cseq[0] == cseq]
    if not delivered:
        delivered = [m for m in bob.wait_for(2, method="INVITE") if m.cseq[0] == cseq]
    assert delivered, "the INVITE did not reach the UAS"
    answer_under_offer_key(proxy, bob_engine, bob, delivered[-1], to_tag=to_tag)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = alice_ua.receive(timeout=1)
        if got is not None and not got.is_request and got.status == 200 \
                and got.cseq[0] == cseq:
            alice_ua.send(make_request("ACK", f"sip:bob@127.0.0.1:{bob.port}",
                                       from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                                       call_id=call_id, cseq=cseq, from_tag="a1",
                                       to_tag=got.to_tag or "").replace("Via", alice_ua.via())
                          .add("Route", (got.get_all("Record-Route") or [""])[-1]))
            return got
    raise AssertionError("the 200 did not reach alice")


def _two_calls(proxy_factory, pki, name: str, wait: float = 0.0) -> dict[str, int]:
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(_bobs_phone)
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)
    out: dict[str, int] = {}
    try:
        register_contact(proxy, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        call_id = f"review104-{time.monotonic_ns()}@x"
        got = _call(proxy, pki, alice, alice_ua, bob, bob_engine, call_id, 1, "t0")
        time.sleep(0.3)
        out["keys_call1"] = proxy.htable_items()
        out["targets_call1"] = proxy.htable_items("e2mtargets")
        bye = make_request("BYE", f"sip:bob@127.0.0.1:{bob.port}", from_uri=pki.aor("alice"),
                           to_uri=pki.aor("bob"), call_id=call_id, cseq=2, from_tag="a1",
                           to_tag=got.to_tag or "")
        for route in reversed(got.get_all("Record-Route")):
            bye = bye.add("Route", route)
        reply = alice_ua.transact(bye.replace("Via", alice_ua.via()))
        assert reply is not None and reply.status == 200, reply
        time.sleep(0.3)
        out["targets_after_bye"] = proxy.htable_items("e2mtargets")
        # her UAS is hers: a fresh engine (one that remembers no ended call of the tag)
        _call(proxy, pki, alice, alice_ua, bob, ua_engine(pki, "bob"), call_id, 3, "t1")
        time.sleep(0.3)
        out["keys_call2"] = proxy.htable_items()
        out["targets_call2"] = proxy.htable_items("e2mtargets")
        out["logged_200"] = int(bool(proxy.wait_log("e2m: INVITE response 200", timeout=1)))
        out["targets_left_s"] = _seconds_left(proxy, dialog_name(call_id, "a1", "t1"))
        if wait:
            time.sleep(wait)
            out["keys_later"] = proxy.htable_items()
            out["targets_later"] = proxy.htable_items("e2mtargets")
        return out
    finally:
        alice_ua.close()
        bob.close()


def test_control_a_second_keyed_call_under_one_call_id_is_relayed_and_noted(proxy_factory,
                                                                              pki):
    out = _two_calls(proxy_factory, pki, "r104-ctl")
    print(out)
    assert out["targets_call1"] == 2 and out["keys_call1"] >= 1, out
    assert out["targets_after_bye"] == 0, out          # the BYE took them (gone)
    assert out["keys_call2"] >= 1, out                 # call 2's key is held ...
    assert out["targets_call2"] == 2, out              # ... and its targets noted (12 h)


def test_hole_a_later_forks_targets_stay_when_its_key_expired(proxy_factory, pki):
    """Fixed (stop 37): the entries of call 2 (a later fork, its key kept 200 s) now
    expire with that key (``ProxyEngine.dialog_keys_life``), read from the htable's own
    expiry of the entry (``htable.get``) instead of waiting 215 s for it;
    ``E2M_REVIEW104_SLOW=1`` also waits it out and counts what is left."""
    out = _two_calls(proxy_factory, pki, "r104-slow", wait=215.0 if SLOW else 0.0)
    print(out)
    assert out["targets_call2"] == 2, out
    assert out["targets_left_s"] <= EARLY_DIALOG_TTL + 5, out      # not 12 h
    if SLOW:
        assert out["keys_later"] == 0, out             # every key has gone by now
        assert out["targets_later"] == 0, out          # secure: the entries with them


def _seconds_left(proxy, name: str) -> float:
    """Seconds until the htable drops ``e2mtargets`` item ``name`` (``htable.get``
    prints its expiry in local time, to the second)."""
    text = proxy.rpc("htable.get", "e2mtargets", name)
    found = re.search(r"expire:\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
    assert found, text[:300]
    return time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) - time.time()
