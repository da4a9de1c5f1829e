"""SRTP keys never reach a proxy, nor the wire in the clear, wherever in a body they sit
(stop 49, after review 167: ``tests/unit/test_review167_srtp_keys_nested.py``).

Review 167 found keys in an SDP nested in a MESSAGE sealed for the chosen proxy (K1) and
a failure answer's keyed SDP sent as written (K2).  These are the same attack by other
roads: an SDP part under base64, a CPIM wrapper, a text a user pasted an offer into, an
INFO's SIP fragment, a multipart INVITE with a base64 SDP part.  Each is refused
(``PolicyError``), nothing is sent.  Controls: the same bodies with no proxy to read them
go to the peer alone; a text line ``k=3`` is no key; a whole SDP MESSAGE is still split."""

from __future__ import annotations

import base64

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, invite, known_proxy, message, ua_engine
from e2m_plugins.errors import PolicyError
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import init_test_pki

_B = "k49"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _alice(world, view=("MESSAGE:*",), **settings):
    proxies = (known_proxy(world, TRUSTED, view),) if view else ()
    return ua_engine(world, "alice", proxies=proxies, **settings)


def _base64_part() -> tuple[bytes, str]:
    body = (f"--{_B}\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--{_B}\r\n"
            "Content-Type: application/sdp\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ).encode() + base64.encodebytes(SRTP_OFFER) + f"\r\n--{_B}--\r\n".encode()
    return body, f"multipart/mixed;boundary={_B}"


def _cpim() -> tuple[bytes, str]:
    return (b"From: <sip:alice@example.com>\r\nTo: <sip:bob@example.com>\r\n\r\n"
            b"Content-Type: application/sdp\r\n\r\n" + SRTP_OFFER, "message/cpim")


def _pasted() -> tuple[bytes, str]:
    return b"my offer, as asked:\n" + SRTP_OFFER.replace(b"a=crypto:", b"A = Crypto:"), \
        "text/plain"


def _mikey() -> tuple[bytes, str]:
    return b"the old way:\r\nk=base64:c2VjcmV0\r\n", "text/plain"


BODIES = {"base64-part": _base64_part, "cpim": _cpim, "pasted-text": _pasted,
          "k-line": _mikey}


@pytest.mark.parametrize("shape", sorted(BODIES))
def test_keys_anywhere_in_a_message_for_a_proxy_are_refused(world, shape):
    body, ctype = BODIES[shape]()
    with pytest.raises(PolicyError, match="SRTP keys"):
        _alice(world).protect(message(world, body, content_type=ctype))


@pytest.mark.parametrize("shape", sorted(BODIES))
def test_control_the_same_bodies_with_no_proxy_go_to_bob_alone(world, shape):
    body, ctype = BODIES[shape]()
    protected = _alice(world, view=()).protect(message(world, body, content_type=ctype))
    assert protected.info.encrypted and protected.info.readable_by == ()
    assert b"inline:" not in protected.message.body and b"c2VjcmV0" not in protected.message.body


def test_an_infos_sip_fragment_with_keys_is_not_sent_in_the_clear(world):
    fragment = (b"INVITE sip:bob@example.com SIP/2.0\r\nContent-Type: application/sdp\r\n"
                b"Content-Length: %d\r\n\r\n" % len(SRTP_OFFER)) + SRTP_OFFER
    info = make_request("INFO", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), body=fragment, content_type="message/sipfrag")
    with pytest.raises(PolicyError, match="SRTP keys"):
        _alice(world).protect(info)


def test_a_multipart_invite_with_keys_in_a_base64_part_is_refused(world):
    body, ctype = _base64_part()
    with pytest.raises(PolicyError, match="SRTP keys"):
        _alice(world, view=()).protect(invite(world, call_id="k49-mp").with_body(body, ctype))


def test_control_with_e2m_not_required_a_body_goes_as_it_was(world):
    """``[e2m] require = false`` sends what it cannot protect as it was, SDES keys too
    (review 169 K8, accepted): the interop an operator chose over E2M."""
    body, ctype = _base64_part()
    sent = _alice(world, view=(), require_e2m=False).protect(
        invite(world, call_id="k49-mp2").with_body(body, ctype))
    assert not sent.info.encrypted and sent.message.body == body


def test_control_a_text_with_a_k_line_that_is_no_key_goes_to_the_proxy(world):
    protected = _alice(world).protect(message(world, b"k=3, as agreed\r\na=b\r\n"))
    assert protected.info.readable_by == (TRUSTED,)


def test_control_a_whole_sdp_message_is_still_split(world):
    protected = _alice(world).protect(message(world, SRTP_OFFER, content_type="application/sdp"))
    assert protected.info.split and protected.info.readable_by == (TRUSTED,)


def test_a_content_coding_the_engine_cannot_undo_counts_as_keys(world):
    """Stop 49 (after review 169 K4): a coding other than gzip or deflate cannot be
    looked into, so it is refused where a proxy would read it."""
    msg = message(world, b"\x1b\x03compressed?").add("Content-Encoding", "br")
    with pytest.raises(PolicyError, match="SRTP keys"):
        _alice(world).protect(msg)


def test_control_a_refer_notifys_status_fragment_is_sent(world):
    """The sipfrag pjsip sends in a REFER's NOTIFY (a status line alone) holds no keys."""
    notify = make_request("NOTIFY", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                          to_uri=world.aor("bob"), body=b"SIP/2.0 180 Ringing\r\n",
                          content_type="message/sipfrag;version=2.0")
    sent = _alice(world).protect(notify)
    assert sent.message.body == b"SIP/2.0 180 Ringing\r\n"


def test_control_a_chat_text_without_keys_in_any_coding_goes_to_the_proxy(world):
    import gzip
    text = "k=3; a=b; crypto is fun; inline: not a key".encode("utf-16")
    msg = message(world, text, content_type="text/plain;charset=utf-16")
    assert _alice(world).protect(msg).info.readable_by == (TRUSTED,)
    zipped = message(world, gzip.compress(b"hello")).add("Content-Encoding", "gzip")
    assert _alice(world).protect(zipped).info.readable_by == (TRUSTED,)


def test_a_charset_the_engine_does_not_know_counts_as_keys(world):
    """Stop 49 (after review 171 K4): a text's declared charset is decoded before the
    scan; one Python does not know cannot be read, so it is refused toward a proxy."""
    msg = message(world, b"hello", content_type="text/plain;charset=x-made-up")
    with pytest.raises(PolicyError, match="SRTP keys"):
        _alice(world).protect(msg)


def test_control_latin1_and_utf8_texts_go_to_the_proxy(world):
    for charset, text in (("iso-8859-1", "caf\u00e9 k=3".encode("latin-1")),
                          ("utf-8", "caf\u00e9 a=b".encode())):
        msg = message(world, text, content_type=f"text/plain;charset={charset}")
        assert _alice(world).protect(msg).info.readable_by == (TRUSTED,)


def test_a_crypto_line_without_its_colon_is_split_and_bob_gets_it_back(world):
    """Stop 49 (after review 173 K1): pjmedia reads ``a=crypto 1 ...`` as a crypto line;
    so does the split now, and bob's engine puts it back where it stood."""
    from e2m_lab.flows import SDP_VIEW
    spaced = SRTP_OFFER.replace(b"a=crypto:1 ", b"a=crypto 1 ")
    assert b"a=crypto 1 " in spaced
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    protected = alice.protect(invite(world, spaced, call_id="k49-spaced"))
    assert protected.info.split and b"inline:" not in protected.message.body
    assert bob.open(protected.message).message.body == spaced
