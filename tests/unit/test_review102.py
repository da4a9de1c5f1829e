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
