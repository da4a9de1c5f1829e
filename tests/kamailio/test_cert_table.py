"""The certificate service's tables (kamailio_app.cert_table), its PROXY.toml section
and ``e2m-proxy certs`` on a database file, without Kamailio."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import certservice as cs
from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import TestPKI
from kamailio_app.cert_table import (CertDatabase, CertTableError, PublicationTable,
                                     SubscriptionLimits, SubscriptionRefused, SubscriptionTable)
from kamailio_app.config import AppConfigError, parse_app_config

ROOT = Path(__file__).resolve().parents[2]
BOB = "sip:bob@example.com"


@pytest.fixture
def tables(tmp_path: Path):
    db = CertDatabase(tmp_path / "certs.sqlite")
    yield PublicationTable(db), SubscriptionTable(db)
    db.close()


def _publish(pki: TestPKI, store, body: bytes | None, *, etag=None, expires=None, now=None):
    headers = [("Event", "certificate")]
    if etag:
        headers.append(("SIP-If-Match", etag))
    if expires is not None:
        headers.append(("Expires", str(expires)))
    request = make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB, extra_headers=headers,
                           body=body or b"", content_type=cs.CONTENT_TYPE if body else None)
    return cs.publish(request, authenticated=BOB, store=store, anchors=[pki.ca.cert],
                      now=now or time.time())


def _subscription(n: int, *, source: str = "192.0.2.1", aor: str = BOB, expires: float = 1e10):
    request = make_request("SUBSCRIBE", aor, from_uri="sip:alice@example.com", to_uri=aor,
                           call_id=f"c{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", "<sip:alice@192.0.2.1:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(source, 5062), contact="sip:x:1",
                       event_id=None, expires=expires)


def test_the_core_decides_on_the_sql_store(tables, pki):
    publications, _ = tables
    der = pki.user("bob", "ec").cert.public_bytes(Encoding.DER)
    first = _publish(pki, publications, der)
    assert (first.code, first.changed) == (200, "published")
    stored = publications.current(BOB)
    assert stored is not None and stored.der == der and stored.published_by == BOB
    etag = dict(first.headers)["SIP-ETag"]
    assert _publish(pki, publications, None, etag="stale").code == 412
    refreshed = _publish(pki, publications, None, etag=etag, expires=600)
    assert refreshed.changed == "refreshed" and publications.current(BOB).etag != etag
    assert [p.aor for p in publications.all()] == [BOB]
    assert publications.lapsed(time.time() + 601, 10) == [BOB]
    assert publications.remove_lapsed(BOB, time.time()) is False      # not yet
    assert publications.remove(BOB) and publications.current(BOB) is None


def test_the_file_is_private_and_never_a_symlink(tmp_path):
    db = CertDatabase(tmp_path / "certs.sqlite")
    db.ensure_schema()
    assert stat.S_IMODE(os.stat(tmp_path / "certs.sqlite").st_mode) == 0o600
    db.close()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.sqlite")
    with pytest.raises(CertTableError):
        CertDatabase(tmp_path / "link.sqlite").ensure_schema()
    assert not (tmp_path / "elsewhere").exists()


def test_subscriptions_are_bounded(tables):
    _, subs = tables
    limits = SubscriptionLimits(per_aor=3, per_source=2, total=4)
    assert subs.add(_subscription(1), limits, 0.0) == 1
    assert subs.add(_subscription(2), limits, 0.0) == 1
    with pytest.raises(SubscriptionRefused, match="source"):
        subs.add(_subscription(3), limits, 0.0)
    assert subs.add(_subscription(1), limits, 5.0) == 2          # the same dialog again
    subs.add(_subscription(4, source="192.0.2.2"), limits, 0.0)
    with pytest.raises(SubscriptionRefused, match="AoR"):
        subs.add(_subscription(5, source="192.0.2.3"), limits, 0.0)
    subs.add(_subscription(6, source="192.0.2.3", aor="sip:carol@example.com"), limits, 0.0)
    with pytest.raises(SubscriptionRefused, match="proxy"):
        subs.add(_subscription(7, source="192.0.2.4", aor="sip:dave@example.com"), limits, 0.0)
    assert subs.count() == 4 and subs.count(BOB) == 3


def test_changes_are_coalesced_and_claimed_once(tables):
    _, subs = tables
    sub = _subscription(1)
    subs.add(sub, SubscriptionLimits(), 100.0)
    assert subs.claim_due(110.0, 60, 10) == []                   # nothing changed
    assert subs.changed(BOB) == 1 and subs.changed(BOB) == 1     # two changes ...
    assert subs.claim_due(130.0, 60, 10) == []                   # ... within the interval
    [(claimed, cseq)] = subs.claim_due(160.0, 60, 10)            # ... one NOTIFY
    assert claimed == sub and cseq == 2
    assert subs.claim_due(500.0, 60, 10) == []                   # claimed: not twice
    refreshed = subs.refreshed(sub, 501.0)
    assert refreshed == 3
    assert subs.remove(sub) == 4 and subs.remove(sub) is None


def test_lapsed_subscriptions_get_their_last_cseq(tables):
    _, subs = tables
    subs.add(_subscription(1, expires=50.0), SubscriptionLimits(), 0.0)
    subs.add(_subscription(2, expires=500.0), SubscriptionLimits(), 0.0)
    [(gone, cseq)] = subs.claim_lapsed(100.0, 10)
    assert gone.call_id == "c1" and cseq == 2 and subs.count() == 1
    assert subs.forget_dialog("c2", "l2", "f2") == 1 and subs.count() == 0


def test_a_write_that_fails_leaves_nothing(tables, pki):
    publications, subs = tables
    der = pki.user("bob", "ec").cert.public_bytes(Encoding.DER)
    with pytest.raises(RuntimeError):
        with publications.locked():
            _publish(pki, publications, der)
            subs.changed(BOB)
            raise RuntimeError("the worker fails half-way")
    assert publications.current(BOB) is None


# -- PROXY.toml [certs] ---------------------------------------------------------------------

def _config(tmp_path: Path, **sections):
    data = {"kamailio": {"listen": ["udp:127.0.0.1:5070"]}, **sections}
    return parse_app_config(data, tmp_path / "PROXY.toml")


def test_certs_defaults_and_mistakes(tmp_path):
    certs = _config(tmp_path).certs
    assert certs is not None and certs.path == tmp_path / "certs.sqlite"
    assert (certs.notify_interval, certs.default_subscribe_expires,
            certs.max_subscribe_expires, certs.min_expires) == (60, 86400, 86400, 60)
    assert _config(tmp_path, e2m={"enabled": False}).certs is None
    assert _config(tmp_path, certs={"enabled": False}).certs is None
    capped = _config(tmp_path, certs={"max_subscribe_expires": 600}).certs
    assert capped.default_subscribe_expires == 600
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, e2m={"enabled": False},
                certs={"enabled": True, "notify_interval": 0, "colour": "red"})
    text = str(caught.value)
    assert "[certs] colour: unknown setting" in text and "[e2m] enabled" in text
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, certs={"path": "nowhere/certs.sqlite", "notify_interval": 0,
                                 "default_publish_expires": 30})
    text = str(caught.value)
    assert "does not exist" in text and "notify_interval" in text
    assert "default_publish_expires" in text


# -- e2m-proxy certs, without a proxy -------------------------------------------------------

def test_the_certs_command_on_its_own(tmp_path, pki):
    config = tmp_path / "PROXY.toml"
    config.write_text('[kamailio]\nlisten = ["udp:127.0.0.1:5070"]\n[certs]\n')

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "certs", args[0],
                               "--config", str(config), *args[1:]], capture_output=True,
                              text=True, timeout=30, cwd=ROOT)

    assert "no certificates published" in run("list").stdout
    db = CertDatabase(tmp_path / "certs.sqlite")
    der = pki.user("bob", "ec").cert.public_bytes(Encoding.DER)
    _publish(pki, PublicationTable(db), der)
    SubscriptionTable(db).add(_subscription(1), SubscriptionLimits(), time.time())
    db.close()
    shown = run("show", "bob@example.com", "--out", str(tmp_path / "bob.der"))
    assert shown.returncode == 0 and "followers      1" in shown.stdout
    assert (tmp_path / "bob.der").read_bytes() == der
    assert run("show", "not an aor").returncode == 2
    removed = run("remove", BOB)
    assert removed.returncode == 0 and "1 follower(s)" in removed.stdout
    assert run("remove", BOB).returncode == 1
    db = CertDatabase(tmp_path / "certs.sqlite")
    [(owed, _)] = SubscriptionTable(db).claim_due(time.time() + 3600, 60, 10)
    assert owed.aor == BOB                             # the proxy's timer will tell alice
