"""MIME framing: S/MIME entities, inner entities, multipart/mixed, multipart/signed."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2m_plugins import mime
from e2m_plugins.cmsinput import load_cms_message
from e2m_plugins.cms.signed import sign, verify
from e2m_plugins.errors import (
    E2MError,
    LimitExceededError,
    MalformedError,
    SignatureInvalidError,
    UnsupportedAlgorithmError,
)
from e2m_plugins.mime import (
    MimeLimits,
    MimePart,
    body_part,
    encode_part,
    find_by_cid,
    inner_entity,
    is_cms,
    make_part,
    multipart_mixed,
    multipart_signed,
    parse_content_type,
    parse_entity,
    parse_multipart,
    parse_signed,
    smime_entity,
    smime_type_of,
    walk,
)

# A DER ContentInfo(envelopedData) head plus bytes that trip naive MIME code:
# a delimiter-looking "--", NUL bytes, CRLF and lone LF/CR.
ENVELOPED_OID = bytes.fromhex("06092a864886f70d010703")
NASTY_DER = (b"\x30\x82\x00\x20" + ENVELOPED_OID + b"\xa0\x0f\x00\r\n--\r\n--x\x00\n\r\x00--\r\n"
             + b"\x00" * 3)
SDP = b"v=0\r\no=alice 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"


def _content_info(oid: bytes) -> bytes:
    return b"\x30" + bytes([len(oid) + 2]) + oid + b"\xa0\x00"


# -- application/pkcs7-mime framing ------------------------------------------------

def test_smime_entity_framing_is_byte_exact() -> None:
    part = smime_entity(NASTY_DER, "enveloped-data")
    assert encode_part(part) == (
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: binary\r\n"
        b"Content-Disposition: attachment; handling=required; filename=smime.p7m\r\n"
        b"\r\n" + NASTY_DER)
    assert part.body == NASTY_DER and part.decoded() == NASTY_DER


@pytest.mark.parametrize("given_type,sent", [
    ("enveloped-data", "enveloped-data"),
    ("authEnveloped-data", "authEnveloped-data"),
    ("auth-enveloped-data", "authEnveloped-data"),
    ("AUTHENVELOPED-DATA", "authEnveloped-data"),
    ("signed-data", "signed-data"),
])
def test_smime_types(given_type: str, sent: str) -> None:
    part = smime_entity(NASTY_DER, given_type)
    assert part.header("Content-Type") == (
        f"application/pkcs7-mime; smime-type={sent}; name=smime.p7m")
    assert smime_type_of(part) == sent


def test_certs_only_and_content_id_and_optional() -> None:
    part = smime_entity(NASTY_DER, "certs-only", content_id="1234@atlanta.example.com",
                        handling="optional")
    assert part.headers == (
        ("Content-Type", "application/pkcs7-mime; smime-type=certs-only; name=smime.p7c"),
        ("Content-Transfer-Encoding", "binary"),
        ("Content-ID", "<1234@atlanta.example.com>"),
        ("Content-Disposition", "attachment; handling=optional; filename=smime.p7c"))
    assert part.content_id == "1234@atlanta.example.com"
    assert part.handling == "optional"


def test_smime_entity_base64_for_7bit_hops() -> None:
    part = smime_entity(NASTY_DER * 4, "enveloped-data", transfer_encoding="base64")
    assert part.header("content-transfer-encoding") == "base64"
    assert all(len(line) <= 76 for line in part.body.split(b"\r\n"))
    assert parse_entity(encode_part(part)).decoded() == NASTY_DER * 4


def test_builders_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        smime_entity(NASTY_DER, "whatever-data")
    with pytest.raises(ValueError):
        smime_entity(b"not der", "enveloped-data")
    with pytest.raises(ValueError):
        smime_entity(NASTY_DER, "enveloped-data", content_id="a b@c")
    with pytest.raises(ValueError):  # header injection
        make_part("text/plain", b"x", headers=[("X-A", "1\r\nX-B: 2")])


def test_receive_base64_x_pkcs7_quoted_case_insensitive_lf() -> None:
    b64 = base64.encodebytes(NASTY_DER)  # 76-column lines, LF ends
    entity = (b'content-type: Application/X-PKCS7-MIME; SMIME-Type="enveloped-data";\n'
              b'\tName="smime.p7m"\n'
              b"CONTENT-TRANSFER-ENCODING: Base64\n"
              b'content-disposition: Attachment; FileName="smime.p7m"; Handling=Required\n'
              b"content-id: 1234@atlanta.example.com\n\n" + b64)
    part = parse_entity(entity)
    assert is_cms(part)
    assert part.content_type.mime_type == "application/x-pkcs7-mime"
    assert part.content_type.param("name") == "smime.p7m"
    assert smime_type_of(part) == "enveloped-data"
    assert part.decoded() == NASTY_DER
    assert part.handling == "required"
    assert part.content_id == "1234@atlanta.example.com"


def test_receive_other_transfer_encodings() -> None:
    for cte in ("7bit", "8bit", "binary", "BINARY"):
        part = parse_entity(b"Content-Type: application/pkcs7-mime\r\n"
                            b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + NASTY_DER)
        assert part.decoded() == NASTY_DER
    with pytest.raises(UnsupportedAlgorithmError):
        parse_entity(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uue\r\n\r\nx")\
            .decoded()
    with pytest.raises(MalformedError):
        parse_entity(b"Content-Type: application/pkcs7-mime\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n!!!!").decoded()


def test_smime_type_inferred_from_der_when_missing() -> None:
    part = make_part("application/pkcs7-mime", _content_info(ENVELOPED_OID))
    assert smime_type_of(part) == "enveloped-data"
    auth = bytes.fromhex("060b2a864886f70d0109100117")
    assert smime_type_of(make_part("application/pkcs7-mime", _content_info(auth))) \
        == "authEnveloped-data"
    assert smime_type_of(make_part("application/sdp", SDP)) is None
    assert not is_cms(make_part("application/sdp", SDP))


def test_rfc3261_disposition_without_semicolon() -> None:
    # RFC 3261 §23.2's example omits the ";" before handling.
    part = parse_entity(b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
                        b"Content-Disposition: attachment; filename=smime.p7m handling=optional"
                        b"\r\n\r\n" + NASTY_DER)
    assert part.handling == "optional"
    assert part.disposition.param("filename") == "smime.p7m"


def test_content_type_params() -> None:
    ct = parse_content_type('multipart/signed; protocol="application/pkcs7-signature"; '
                            'micalg=sha-256; boundary="a;b c"')
    assert ct.mime_type == "multipart/signed"
    assert ct.param("boundary") == 'a;b c'
    assert str(ct) == ('multipart/signed; protocol="application/pkcs7-signature"; '
                       'micalg=sha-256; boundary="a;b c"')
    # an escape is refused: pjsip keeps a quoted value's backslashes (review 62)
    for bad in ("text", "text/", "/plain", 'text/plain; a="unterminated',
                "text/plain; a=1; A=2", 'multipart/mixed; boundary="a\\"b"',
                'multipart/mixed; boundary="r\\62"'):
        with pytest.raises(MalformedError):
            parse_content_type(bad)


def test_ambiguous_headers_are_malformed() -> None:
    with pytest.raises(MalformedError):
        parse_entity(b"Content-Type: text/plain\r\nContent-Type: application/sdp\r\n\r\nx")
    with pytest.raises(MalformedError):
        parse_entity(b"not a header line\r\n\r\nbody")


# -- inner entity -------------------------------------------------------------------

def test_inner_entity_round_trip() -> None:
    data = inner_entity("application/sdp", SDP)
    assert data == b"Content-Type: application/sdp\r\n\r\n" + SDP
    part = parse_entity(data)
    assert part.content_type.mime_type == "application/sdp"
    assert part.decoded() == SDP


def test_inner_entity_with_content_length_as_in_the_draft() -> None:
    data = inner_entity("application/sdp", SDP, content_length=True)
    assert data == (b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(SDP)
                    + SDP)
    assert parse_entity(data).body == SDP


def test_content_length_framing() -> None:
    head = b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    assert parse_entity(head + b"Hello\r\n").body == b"Hello"  # extra octets dropped
    with pytest.raises(MalformedError):
        parse_entity(head + b"Hi")
    with pytest.raises(MalformedError):
        parse_entity(b"Content-Type: text/plain\r\nContent-Length: \xc2\xb2\r\n\r\nx")


def test_inner_entity_binary_body_untouched() -> None:
    part = parse_entity(inner_entity("application/octet-stream", NASTY_DER))
    assert part.body == NASTY_DER


def test_parse_entity_limits() -> None:
    with pytest.raises(LimitExceededError):
        parse_entity(b"Content-Type: text/plain\r\n\r\n" + b"x" * 100, MimeLimits(max_bytes=50))
    with pytest.raises(LimitExceededError):
        parse_entity(b"".join(b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\nbody")
    with pytest.raises(MalformedError):
        parse_entity(b"")


def test_body_part_from_sip_headers() -> None:
    part = body_part([("c", "application/pkcs7-mime; smime-type=enveloped-data"),
                      ("Content-Length", "99"), ("Via", "SIP/2.0/UDP h"),
                      ("Content-Disposition", "attachment;handling=required")], NASTY_DER)
    assert part.headers == (("Content-Type", "application/pkcs7-mime; smime-type=enveloped-data"),
                            ("Content-Disposition", "attachment;handling=required"))
    assert smime_type_of(part) == "enveloped-data"


# -- multipart/mixed ------------------------------------------------------------------

def _flow_f_parts() -> tuple[MimePart, MimePart]:
    proxy = smime_entity(NASTY_DER, "enveloped-data", content_id="p1@atlanta.example.com",
                         handling="optional")
    uas = smime_entity(NASTY_DER[::-1].replace(b"\x00", b"\x30", 1) + b"\r\n",
                       "authEnveloped-data", content_id="<u1@atlanta.example.com>")
    return proxy, uas


def test_multipart_mixed_round_trip_binary_exact() -> None:
    proxy, uas = _flow_f_parts()
    body = multipart_mixed([proxy, uas])
    boundary = body.content_type.param("boundary")
    assert body.header("Content-Type") == f"multipart/mixed; boundary={boundary}"
    assert (b"--" + boundary.encode()) not in encode_part(proxy) + encode_part(uas)
    parsed = parse_multipart(body)
    assert parsed == [proxy, uas]  # headers and binary bodies byte for byte
    assert [p.handling for p in parsed] == ["optional", "required"]


@pytest.mark.parametrize("label", ["p1@atlanta.example.com", "<p1@atlanta.example.com>",
                                   '"p1@atlanta.example.com"', "p1@ATLANTA.example.com"])
def test_find_by_cid_with_or_without_brackets(label: str) -> None:
    proxy, uas = _flow_f_parts()
    sip_body = multipart_mixed([proxy, uas])
    found = find_by_cid(walk(sip_body), label)
    assert found == proxy and found.decoded() == NASTY_DER
    assert find_by_cid(walk(sip_body), "u1@atlanta.example.com") == uas
    assert find_by_cid(walk(sip_body), "P1@atlanta.example.com") is None  # local part exact


def test_unbracketed_content_id_from_the_draft() -> None:
    part = parse_entity(b"Content-Type: application/pkcs7-mime\r\n"
                        b"Content-ID: 1234@atlanta.example.com\r\n\r\n" + NASTY_DER)
    assert find_by_cid([part], "<1234@atlanta.example.com>") == part


def test_duplicate_content_ids_are_malformed() -> None:
    proxy, _ = _flow_f_parts()
    with pytest.raises(MalformedError):
        find_by_cid(walk(multipart_mixed([proxy, proxy])), "p1@atlanta.example.com")


def test_multipart_boundary_choice() -> None:
    proxy, uas = _flow_f_parts()
    fixed = multipart_mixed([proxy], boundary="boundary1")
    assert fixed.body.startswith(b"--boundary1\r\nContent-Type: application/pkcs7-mime")
    assert fixed.body.endswith(NASTY_DER + b"\r\n--boundary1--\r\n")
    with pytest.raises(ValueError):
        multipart_mixed([make_part("text/plain", b"a\r\n--boundary1\r\n")], boundary="boundary1")
    with pytest.raises(ValueError):
        multipart_mixed([])


def test_multipart_parse_tolerance() -> None:
    # Preamble, epilogue, LF line ends, transport padding, a part without headers,
    # a part whose own content ends in a line break, a compact Content-Type.
    body = (b"This is the preamble.\n--b1 \t\n"
            b"Content-Type: text/plain\n\nline one\nb1 is not a delimiter\n\n"
            b"--b1\r\n\r\nno headers here"
            b"\r\n--b1\r\nc: application/sdp\r\n\r\nv=0"
            b"\r\n--b1--  \r\nepilogue\r\n")
    part = body_part([("Content-Type", 'Multipart/Mixed; Boundary="b1"')], body)
    first, second, third = parse_multipart(part)
    assert first.content_type.mime_type == "text/plain"
    assert first.body == b"line one\nb1 is not a delimiter\n"
    assert second.headers == () and second.body == b"no headers here"
    assert second.content_type.mime_type == "text/plain"  # RFC 2045 default
    # pjsip reads a part's headers as SIP headers: ``c`` is Content-Type (review 59)
    assert third.content_type.mime_type == "application/sdp"


@pytest.mark.parametrize("body", [
    b"x--b1\r\n\r\nhidden\r\n--b1\r\n\r\nseen\r\n--b1--\r\n",     # mid-line, preamble
    b"--b1\r\n\r\none\r\n--b1x\r\n\r\ntwo\r\n--b1--\r\n",           # near miss
    b"--b1\r\n\r\none\r\nsee --b1 here\r\n--b1--\r\n",                  # in a part
    b"--b1\r\n\r\none\r\n--b1--\r\nepilogue\r\n--b1\r\nignored\r\n",  # epilogue
])
def test_multipart_boundary_outside_its_delimiters_is_refused(body: bytes) -> None:
    """RFC 2046 readers skip these; pjsip takes ``--boundary`` anywhere for a
    delimiter, so a part only it would see (a plaintext SDP) would pass every check
    (review 59)."""
    with pytest.raises(MalformedError, match="outside its delimiters"):
        parse_multipart(body_part([("Content-Type", "multipart/mixed; boundary=b1")], body))


@pytest.mark.parametrize("body,error", [
    (b"--b1\r\nContent-Type: text/plain\r\n\r\nx\r\n", MalformedError),  # no close
    (b"--b1--\r\n", MalformedError),                                      # no part
    (b"no delimiter at all", MalformedError),
    (b"".join(b"--b1\r\n\r\n%d\r\n" % i for i in range(17)) + b"--b1--", LimitExceededError),
])
def test_multipart_malformed(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_multipart(body_part([("Content-Type", "multipart/mixed; boundary=b1")], body))


@pytest.mark.parametrize("content_type", ["multipart/mixed", "multipart/mixed; boundary=",
                                          "multipart/mixed; boundary=" + "x" * 71,
                                          "multipart/mixed; boundary=\"a b \""])
def test_multipart_bad_boundary(content_type: str) -> None:
    with pytest.raises(MalformedError):
        parse_multipart(body_part([("Content-Type", content_type)], b"--x\r\n\r\n--x--"))


def test_walk_nested_and_depth_limit() -> None:
    proxy, uas = _flow_f_parts()
    inner = multipart_mixed([proxy])
    outer = multipart_mixed([inner, uas])
    assert list(walk(outer)) == [outer, inner, proxy, uas]
    deep = proxy
    for _ in range(5):
        deep = multipart_mixed([deep])
    with pytest.raises(LimitExceededError):
        list(walk(deep))
    assert len(list(walk(deep, MimeLimits(max_depth=5)))) == 6
    with pytest.raises(LimitExceededError):
        list(walk(outer, MimeLimits(max_total_parts=3)))


# -- multipart/signed ------------------------------------------------------------------

def _signed_message(pki, content: bytes) -> MimePart:
    alice = pki.user("alice")
    der = sign(content, alice.cert, alice.key, detached=True)
    return multipart_signed(content, der)


def test_multipart_signed_framing() -> None:
    part = multipart_signed(b"Content-Type: text/plain\r\n\r\nHi", NASTY_DER, boundary="boundary1")
    assert part.header("Content-Type") == (
        'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; '
        "boundary=boundary1")
    assert part.body == (
        b"--boundary1\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
        b"--boundary1\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: binary\r\n"
        b"Content-Disposition: attachment; handling=required; filename=smime.p7s\r\n\r\n"
        + NASTY_DER + b"\r\n--boundary1--\r\n")


def test_multipart_signed_round_trip_with_sign_and_verify(pki) -> None:
    content = inner_entity("text/plain", b"Hello. This is confidential.\r\n")
    message = _signed_message(pki, content)
    # The receiver sees the SIP headers and the body, as a proxy would.
    received = body_part([("Content-Type", message.header("Content-Type"))], message.body)
    assert [p.content_type.mime_type for p in walk(received)] == [
        "multipart/signed", "text/plain", "application/pkcs7-signature"]
    signed = parse_signed(received)
    assert signed.signed_bytes == content
    assert signed.micalg == "sha-256"
    assert signed.signed_part.decoded() == b"Hello. This is confidential.\r\n"
    result = verify(signed.signature, trust_anchors=[pki.ca.cert],
                    detached_content=signed.signed_bytes)
    assert result.content == content
    # The CMS layer's own reader agrees on what is signed.
    assert load_cms_message(encode_part(message)).detached_content == content


def test_multipart_signed_binary_part_encrypt_then_sign(pki) -> None:
    # RFC 3261 §23.2 order: the signed part is itself a binary envelope.
    content = encode_part(smime_entity(NASTY_DER, "enveloped-data"))
    signed = parse_signed(_signed_message(pki, content))
    assert signed.signed_bytes == content
    assert signed.signed_part.decoded() == NASTY_DER
    verify(signed.signature, trust_anchors=[pki.ca.cert], detached_content=signed.signed_bytes)


def test_multipart_signed_tampered(pki) -> None:
    message = _signed_message(pki, inner_entity("text/plain", b"pay 10"))
    tampered = MimePart(message.headers, message.body.replace(b"pay 10", b"pay 99"))
    signed = parse_signed(tampered)
    with pytest.raises(SignatureInvalidError):
        verify(signed.signature, trust_anchors=[pki.ca.cert], detached_content=signed.signed_bytes)


def test_multipart_signed_malformed() -> None:
    good = multipart_signed(b"Content-Type: text/plain\r\n\r\nHi", NASTY_DER, boundary="b")
    ct = good.header("Content-Type")
    with pytest.raises(UnsupportedAlgorithmError):
        parse_signed(MimePart((("Content-Type", ct.replace("pkcs7", "pgp")),), good.body))
    with pytest.raises(MalformedError):
        parse_signed(MimePart((("Content-Type", "multipart/signed; boundary=b"),), good.body))
    with pytest.raises(MalformedError):  # three parts
        parse_signed(MimePart(good.headers, b"--b\r\n\r\nx\r\n" + good.body))
    with pytest.raises(MalformedError):
        parse_signed(multipart_mixed([make_part("text/plain", b"x")]))
    wrong_sig = multipart_mixed([make_part("text/plain", b"x"), make_part("text/plain", b"0")],
                                boundary="b").body
    with pytest.raises(MalformedError):
        parse_signed(MimePart(good.headers, wrong_sig))


# -- properties -----------------------------------------------------------------------

_FUZZ = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
_mime_bytes = st.lists(st.sampled_from([
    b"--b1", b"--b1--", b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"\t", b";", b"=", b'"',
    b"Content-Type: ", b"multipart/mixed; boundary=b1", b"application/pkcs7-mime",
    b"Content-ID: <a@b>", b"Content-Transfer-Encoding: base64", b"Content-Length: 3",
    b"smime-type=enveloped-data", b"\x30\x03\x06\x01\x00", b"\xff\xfe", b"x"]),
    max_size=40).map(b"".join)
# Line-structured multipart bodies, so that many of them parse and nest.
_multipart_lines = st.lists(st.tuples(st.sampled_from([
    b"--b1", b"--b1--", b"--b1 \t", b"--b1x", b"", b"x", b"\x00--\xff",
    b"Content-Type: text/plain", b"Content-Type: multipart/mixed; boundary=b1",
    b"Content-Type: application/pkcs7-mime", b"Content-Type: application/pkcs7-signature",
    b"Content-Transfer-Encoding: base64", b"MAMGAQA=", b"Content-ID: <a@b>", b"Content-ID: a@b",
    b"Content-Disposition: attachment; handling=optional", b" folded"]),
    st.sampled_from([b"\r\n", b"\n"])), max_size=30).map(
        lambda lines: b"".join(text + end for text, end in lines))


@_FUZZ
@given(st.one_of(st.binary(max_size=300), _mime_bytes))
def test_parse_entity_raises_only_typed_errors(data: bytes) -> None:
    try:
        part = parse_entity(data)
        for child in walk(part):
            child.decoded()
            smime_type_of(child)
            find_by_cid([child], "a@b")
            if child.content_type.mime_type == "multipart/signed":
                parse_signed(child)
    except E2MError:
        pass


@_FUZZ
@given(st.one_of(_mime_bytes, _multipart_lines),
       st.sampled_from(["multipart/mixed; boundary=b1", "multipart/signed; "
                                     'protocol="application/pkcs7-signature"; boundary=b1']))
def test_multipart_parsers_raise_only_typed_errors(body: bytes, content_type: str) -> None:
    part = body_part([("Content-Type", content_type)], body)
    try:
        for child in walk(part):
            child.decoded()
            smime_type_of(child)
            find_by_cid([child], "a@b")
    except E2MError:
        pass
    try:
        parse_signed(part)
    except E2MError:
        pass


@_FUZZ
@given(st.text(max_size=80))
def test_header_value_parsers_raise_only_typed_errors(text: str) -> None:
    for parser in (parse_content_type, mime.parse_disposition, mime.parse_params):
        try:
            parser(text)
        except E2MError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=5))
def test_any_binary_parts_survive_multipart_mixed(bodies: list[bytes]) -> None:
    parts = [make_part("application/octet-stream", body, content_id=f"p{i}@h",
                       transfer_encoding="binary") for i, body in enumerate(bodies)]
    parsed = parse_multipart(multipart_mixed(parts))
    assert [p.decoded() for p in parsed] == bodies


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_signed_bytes_come_back_exactly(payload: bytes) -> None:
    content = b"Content-Type: application/octet-stream\r\n\r\n" + payload
    signed = parse_signed(multipart_signed(content, NASTY_DER))
    assert signed.signed_bytes == content
    assert signed.signed_part.body == payload
    assert signed.signature == NASTY_DER


def test_as_read_writes_a_body_again_as_it_was_read() -> None:
    """What the phone hands pjsip after the checks (reviews 59, 62): the parts we read,
    typed as we read them, under a fresh boundary; preamble, epilogue and a part's
    Content-Length gone; compact names written out; nested multiparts alike."""
    inner = (b"--in\r\nc: text/plain\r\n\r\ndeep\r\n--in--\r\n")
    body = (b"preamble --not a delimiter\r\n--b1\r\nc: text/plain;charset=utf-8\r\n"
            b"Content-Length: 2\r\n\r\nhello\r\n--b1\r\nContent-Type: multipart/mixed; "
            b"boundary=in\r\n\r\n" + inner + b"\r\n--b1--\r\nepilogue\r\n")
    part = body_part([("Content-Type", "multipart/mixed; boundary=b1")], body)
    again = mime.as_read(part)
    assert again.content_type.mime_type == "multipart/mixed"
    boundary = again.content_type.param("boundary")
    assert boundary != "b1" and boundary.startswith("e2m-")
    assert b"preamble" not in again.body and b"epilogue" not in again.body
    first, nested = parse_multipart(again)
    assert first.headers == (("Content-Type", "text/plain; charset=utf-8"),)
    assert first.body == b"hello"
    (deep,) = parse_multipart(nested)
    assert deep.content_type.mime_type == "text/plain" and deep.body == b"deep"
    assert mime.as_read(again).body.count(b"--e2m-") == again.body.count(b"--e2m-")
    leaf = body_part([("c", "application/sdp")], b"v=0\r\n")
    assert mime.as_read(leaf).headers == (("Content-Type", "application/sdp"),)
