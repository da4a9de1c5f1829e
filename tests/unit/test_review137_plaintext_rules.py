"""Review 137 (attacker's review of 9e484f3), area 2 at the engine.  Docstring completed
below.
"""

from __future__ import annotations

import base64

import pytest

from e2m_lab.flows import TRUSTED, message, proxy_engine
from e2m_plugins.testpki import init_test_pki

VIEW = ("MESSAGE:text/plain", "INVITE:application/sdp")     # the example home's [policy] view
PNG = bytes(range(256)) * 4                                  # a binary attachment, 1 KiB
TEXT = b"Here is the picture."


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _with_attachment(world, call_id: str, encoding: str):
    """A plaintext MESSAGE from a client that is not E2M: a text/plain part and a file,
    the file ``encoding``-transfer-encoded (MIME's usual base64, or binary)."""
    data = base64.encodebytes(PNG) if encoding == "base64" else PNG
    body = (b"--b137\r\nContent-Type: text/plain\r\n\r\n" + TEXT + b"\r\n"
            b"--b137\r\nContent-Type: image/png\r\nContent-Disposition: attachment; "
            b"filename=p.png\r\nContent-Transfer-Encoding: " + encoding.encode() +
            b"\r\n\r\n" + data + b"\r\n--b137--\r\n")
    return message(world, TEXT).with_body(body, "multipart/mixed;boundary=b137") \
        .replace("Call-ID", call_id)


@pytest.mark.xfail(strict=True, reason="review 137 honest break HB1: a plaintext MESSAGE "
                   "with a base64 file attachment is refused 415 under a MESSAGE view")
def test_a_plaintext_message_with_a_base64_attachment_is_forwarded(world):
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    verdict = proxy.inspect(_with_attachment(world, "hb1-b64@x", "base64"))
    assert verdict.action == "forward", verdict.to_json()


def test_control_the_same_attachment_sent_binary_is_forwarded_and_viewed(world):
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    verdict = proxy.inspect(_with_attachment(world, "hb1-bin@x", "binary"))
    assert verdict.action == "forward" and verdict.error is None, verdict.to_json()
    assert [s.content_type for s in verdict.seen] == ["text/plain", "image/png"]
