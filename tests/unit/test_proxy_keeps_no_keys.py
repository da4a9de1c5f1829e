"""What a proxy keeps of a body it read never holds SRTP keys (stop 49, after review
175 K1: ``tests/unit/test_review175_archived_srtp_keys.py``), whatever carried them: a
plaintext SDP, a text with an offer pasted in, a gzip-coded part.  The SDP is kept
as the view a split would have given (every other line); any other part that holds
keys as one "withheld" line (review 176)."""

from __future__ import annotations

import gzip

from e2m_lab.flows import SRTP_OFFER
from e2m_plugins import mime
from e2m_plugins.srtp_keys import WITHHELD, without_keys

KEY = b"inline:WVNf"


def _part(content_type: str, body: bytes, **headers: str) -> mime.MimePart:
    extra = tuple((name.replace("_", "-"), value) for name, value in headers.items())
    return mime.MimePart((("Content-Type", content_type),) + extra, body)


def test_a_plain_sdp_is_kept_without_its_keying_lines_only():
    kept = without_keys(_part("application/sdp", SRTP_OFFER), SRTP_OFFER)
    assert KEY not in kept and b"a=crypto" not in kept
    assert [line for line in SRTP_OFFER.splitlines() if b"a=crypto" not in line] \
        == kept.splitlines()


def test_a_text_with_an_offer_pasted_in_is_withheld_whole():
    """Not cut line by line: a key beside a cut line survived, and the marker made the
    text larger (review 176 K1, K3)."""
    text = b"here it is:\r\n" + SRTP_OFFER + b"bye\r\n"
    assert without_keys(_part("text/plain", text), text) == WITHHELD


def test_a_gzip_coded_offer_is_withheld_whole():
    coded = gzip.compress(b"offer:\r\n" + SRTP_OFFER)
    part = _part("text/plain", coded, Content_Encoding="gzip")
    assert without_keys(part, coded) == WITHHELD


def test_control_a_text_without_keys_is_kept_as_it_is():
    text = "caf\u00e9, k=3 and a link ?k=clear+case".encode()
    assert without_keys(_part("text/plain;charset=utf-8", text), text) == text
