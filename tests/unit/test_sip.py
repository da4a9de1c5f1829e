"""The raw SIP message model: parsing, header access, serialisation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins import grammar, sip
from e2m_plugins.errors import E2MError, LimitExceededError, MalformedError

MESSAGE = (
    b"MESSAGE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP ss1.atlanta.example.com;branch=z9hG4bK2d4790.1\r\n"
    b"Via: SIP/2.0/TCP client.atlanta.example.com:5060;branch=z9hG4bK74bf9\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: Alice <sip:alice@atlanta.example.com>;tag=9fxced76sl\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"Call-ID: 3848276298220188511@atlanta.example.com\r\n"
    b"CSeq: 1 MESSAGE\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)

RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP client.atlanta.example.com;branch=z9hG4bK74bf9\r\n"
    b"From: <sip:alice@atlanta.example.com>;tag=abc\r\n"
    b"To: sip:bob@biloxi.example.com;tag=xyz\r\n"
    b"Call-ID: c1\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"\r\n"
)


def test_request_round_trip_is_byte_exact() -> None:
    msg = sip.parse(MESSAGE)
    assert msg.is_request
    assert msg.method == "MESSAGE"
    assert msg.request_uri == "sip:bob@biloxi.example.com"
    assert msg.status is None and msg.reason is None
    assert msg.body == b"hello"
    assert msg.serialize() == MESSAGE


def test_response_start_line_and_cseq_method() -> None:
    msg = sip.parse(RESPONSE)
    assert not msg.is_request
    assert (msg.status, msg.reason) == (200, "OK")
    assert msg.method == "INVITE"
    assert msg.cseq == (7, "INVITE")
    assert msg.request_uri is None
    # no Content-Length on input: one is added on output
    assert msg.serialize().endswith(b"CSeq: 7 INVITE\r\nContent-Length: 0\r\n\r\n")


def test_reason_phrase_with_spaces_and_empty() -> None:
    assert sip.parse(b"SIP/2.0 496 Proxy Indeciperable x\r\n\r\n").reason == \
        "Proxy Indeciperable x"
    assert sip.parse(b"SIP/2.0 180 \r\n\r\n").reason == ""
    assert sip.parse(b"SIP/2.0 180\r\n\r\n").reason == ""


def test_dialog_helpers() -> None:
    msg = sip.parse(RESPONSE)
    assert msg.call_id == "c1"
    assert msg.from_tag == "abc"
    assert msg.to_tag == "xyz"  # addr-spec form: ;tag is a header parameter
    assert msg.dialog_id() == ("c1", "abc", "xyz")
    assert msg.dialog_id(as_uas=True) == ("c1", "xyz", "abc")
    assert sip.parse(MESSAGE).to_tag is None


SINGLE = ("from", "to", "call-id", "cseq")


@pytest.mark.parametrize("compact, long", sorted(
    (c, n) for c, n in sip.COMPACT_FORMS.items() if n != "content-length" and n not in SINGLE))
def test_compact_forms_map_on_lookup(compact: str, long: str) -> None:
    msg = sip.parse(b"OPTIONS sip:x SIP/2.0\r\n" + compact.encode() + b": v1\r\n"
                    + long.title().encode() + b": v2\r\n\r\n")
    assert msg.get(long) == "v1"
    assert msg.get(compact.upper()) == "v1"
    assert msg.get_all(long.upper()) == ["v1", "v2"]


@pytest.mark.parametrize("first, second", [
    ("From", "f"), ("To", "t"), ("Call-ID", "i"), ("CSeq", "cseq"), ("f", "From")])
def test_a_header_sip_allows_once_twice_is_malformed(first: str, second: str) -> None:
    """Review 54: the core would read the first copy, pjsip the last."""
    data = (b"OPTIONS sip:x SIP/2.0\r\n" + first.encode() + b": <sip:a@x>;tag=1\r\n"
            + second.encode() + b": <sip:b@x>;tag=2\r\n\r\n")
    with pytest.raises(sip.MalformedError):
        sip.parse(data)
    lenient = sip.parse(data.replace(second.encode() + b":", b"X-" + second.encode() + b":"))
    assert lenient.get(first) == "<sip:a@x>;tag=1"


def test_a_message_made_with_a_second_from_fails_its_check() -> None:
    msg = sip.parse(REQUEST_FOR_SINGLE)
    msg.check_unambiguous()
    twice = sip.SipMessage(msg.start_line, msg.headers + (("f", "<sip:alice@x>;tag=9"),), msg.body)
    with pytest.raises(sip.MalformedError):
        twice.check_unambiguous()


REQUEST_FOR_SINGLE = (b"MESSAGE sip:bob@x SIP/2.0\r\nFrom: <sip:carol@x>;tag=1\r\n"
                      b"To: <sip:bob@x>\r\nCall-ID: c1\r\nCSeq: 1 MESSAGE\r\n\r\n")


def test_compact_content_length_frames_the_body() -> None:
    msg = sip.parse(b"OPTIONS sip:x SIP/2.0\r\nl: 2\r\n\r\nabc")
    assert msg.body == b"ab" and msg.get("Content-Length") == "2"


def test_folding_and_bare_lf_and_keepalives() -> None:
    raw = (b"\r\n\n"
           b"INVITE sip:bob@b SIP/2.0\n"
           b"Subject: one\n"
           b"  two\r\n"
           b"\tthree\n"
           b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\n"
           b"\n"
           b"body")
    msg = sip.parse(raw)
    assert msg.get("s") == "one two three"
    assert msg.body == b"body"
    assert b"\r\nSubject: one two three\r\n" in msg.serialize()


def test_multiple_instances_keep_order_and_commas_are_not_split() -> None:
    raw = (b"INVITE sip:b SIP/2.0\r\nVia: a, b\r\nX: 1\r\nv: c\r\n\r\n")
    msg = sip.parse(raw)
    assert msg.get_all("Via") == ["a, b", "c"]
    assert msg.get("via") == "a, b"
    assert msg.headers == (("Via", "a, b"), ("X", "1"), ("v", "c"))


def test_header_edits_return_new_messages() -> None:
    msg = sip.parse(MESSAGE)
    top = msg.insert("Via", "SIP/2.0/UDP p;branch=z9hG4bKnew")
    assert top.headers[0] == ("Via", "SIP/2.0/UDP p;branch=z9hG4bKnew")
    assert msg.get_all("Via") != top.get_all("Via")  # original untouched
    assert top.add("X-A", "1").headers[-1] == ("X-A", "1")
    assert top.remove("v").get_all("Via") == []
    only = top.remove("Via", where=lambda v: "ss1." in v)
    assert len(only.get_all("Via")) == 2
    rep = top.replace("Via", "one")
    assert rep.get_all("Via") == ["one"] and rep.headers[0] == ("Via", "one")
    assert msg.replace("X-New", "n").get("x-new") == "n"


def test_header_injection_is_refused() -> None:
    msg = sip.parse(MESSAGE)
    with pytest.raises(ValueError):
        msg.add("X", "a\r\nVia: evil")
    with pytest.raises(ValueError):
        msg.add("Bad Name", "a")


def test_with_body_rewrites_content_length_and_type() -> None:
    msg = sip.parse(MESSAGE)
    body = bytes(range(256)) + b"\x00\r\n\r\n\x00"
    new = msg.with_body(body, "application/pkcs7-mime; smime-type=enveloped-data")
    assert new.get("Content-Type").startswith("application/pkcs7-mime")
    assert new.get("Content-Length") == str(len(body))
    wire = new.serialize()
    assert wire.endswith(b"\r\n\r\n" + body)
    again = sip.parse(wire)
    assert again.body == body  # NUL and CRLF inside the body kept byte-exact
    empty = msg.with_body(b"")
    assert empty.get("Content-Type") is None
    assert empty.serialize().endswith(b"Content-Length: 0\r\n\r\n")


def test_serialize_rewrites_stale_content_length() -> None:
    msg = sip.parse(MESSAGE).replace("l", "999").add("Content-Length", "3")
    wire = msg.serialize()
    assert wire.count(b"Content-Length") == 1
    assert b"Content-Length: 5\r\n" in wire
    built = sip.SipMessage(sip.RequestLine("MESSAGE", "sip:x"), (("To", "<sip:x>"),), b"abc")
    assert built.serialize() == (b"MESSAGE sip:x SIP/2.0\r\nTo: <sip:x>\r\n"
                                 b"Content-Length: 3\r\n\r\nabc")


def test_trailing_bytes_after_content_length_are_dropped() -> None:
    msg = sip.parse(MESSAGE + b"garbage")
    assert msg.body == b"hello"


def test_content_length_beyond_data_is_malformed() -> None:
    with pytest.raises(MalformedError):
        sip.parse(MESSAGE[:-1])


@pytest.mark.parametrize("raw", [
    b"",
    b"\r\n\r\n",
    b"INVITE sip:x\r\n\r\n",
    b"INVITE sip:x SIP/2.0 extra\r\n\r\n",
    b"INV@TE sip:x SIP/2.0\r\n\r\n",
    b"INVITE sip:x HTTP/1.1\r\n\r\n",
    b"SIP/2.0 99 Too low\r\n\r\n",
    b"SIP/2.0 2000 OK\r\n\r\n",
    b"SIP/x 200 OK\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nNoColon\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\n: empty name\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\n continuation first\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nX: a\x00b\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nX: a\rb\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nContent-Length: abc\r\n\r\n",
    b"INVITE sip:x SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab",
    b"INVITE sip:x SIP/2.0\r\nContent-Length: 99999999999\r\n\r\n",
    "SIP/2.0 \u00b2\u00b2\u00b2 OK\r\n\r\n".encode(),
    "M sip:x SIP/2.0\r\nl: \u00b2\r\n\r\n".encode(),
])
def test_malformed_messages(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        sip.parse(raw)


def test_bad_cseq_is_malformed() -> None:
    for cseq in ("\u00b2 INVITE", "1", "x INVITE", "1 IN VITE", "12345678901 INVITE"):
        msg = sip.parse(b"M sip:x SIP/2.0\r\nCSeq: " + cseq.encode() + b"\r\n\r\n")
        with pytest.raises(MalformedError):
            msg.cseq
    with pytest.raises(MalformedError):
        sip.parse(b"SIP/2.0 200 OK\r\n\r\n").method  # a response needs its CSeq


def test_equal_duplicate_content_length_is_accepted() -> None:
    assert sip.parse(b"M sip:x SIP/2.0\r\nl: 2\r\nContent-Length: 2\r\n\r\nab").body == b"ab"


def test_limits() -> None:
    many = b"M sip:x SIP/2.0\r\n" + b"X: y\r\n" * 11 + b"\r\n"
    with pytest.raises(LimitExceededError):
        sip.parse(many, max_headers=10)
    assert len(sip.parse(many, max_headers=11).headers) == 11
    with pytest.raises(LimitExceededError):
        sip.parse(b"M sip:x SIP/2.0\r\nX: " + b"a" * 100 + b"\r\n\r\n", max_line=50)
    with pytest.raises(LimitExceededError):  # folding cannot dodge the line limit
        sip.parse(b"M sip:x SIP/2.0\r\nX: a\r\n" + b" " + b"b" * 30 + b"\r\n" * 1
                  + b" " + b"c" * 30 + b"\r\n\r\n", max_line=50)
    with pytest.raises(LimitExceededError):
        sip.parse(MESSAGE, max_size=len(MESSAGE) - 1)


def test_non_utf8_header_octets_round_trip() -> None:
    raw = b"M sip:x SIP/2.0\r\nSubject: caf\xe9 \xff\r\nContent-Length: 0\r\n\r\n"
    assert sip.parse(raw).serialize() == raw


def test_repr_does_not_show_the_body() -> None:
    assert "secret" not in repr(sip.parse(MESSAGE.replace(b"hello", b"secre")))
    assert "hello" not in repr(sip.parse(MESSAGE))


def test_frame_length_for_streams() -> None:
    two = b"\r\n" + MESSAGE + MESSAGE
    n = sip.frame_length(two)
    assert n == len(MESSAGE) + 2
    assert sip.parse(two[:n]).body == b"hello"
    assert sip.frame_length(two[n:]) == len(MESSAGE)
    for cut in (0, 1, 5, 60, len(MESSAGE) - 1):
        assert sip.frame_length(MESSAGE[:cut]) is None
    assert sip.frame_length(b"\r\n\r\n") is None
    with pytest.raises(MalformedError):
        sip.frame_length(RESPONSE)  # no Content-Length on a stream
    with pytest.raises(LimitExceededError):
        sip.frame_length(b"M sip:x SIP/2.0\r\n" + b"X: y\r\n" * 50, max_size=100)


def test_make_response_copies_dialog_headers_and_adds_to_tag() -> None:
    req = sip.parse(MESSAGE)
    resp = sip.make_response(req, 496, "Proxy Indecipherable",
                             [("Warning", '380 ss1.atlanta.example.com '
                                          '"Required to view \'text/plain\'"')],
                             b"\x30\x82\x00\x00", "application/pkix-cert")
    assert (resp.status, resp.reason) == (496, "Proxy Indecipherable")
    assert resp.get_all("Via") == req.get_all("Via")
    for name in ("From", "Call-ID", "CSeq"):
        assert resp.get(name) == req.get(name)
    assert resp.get("To").startswith(req.get("To") + ";tag=")
    assert resp.to_tag and resp.to_tag != req.to_tag
    assert resp.method == "MESSAGE"
    assert resp.get("Content-Type") == "application/pkix-cert"
    again = sip.parse(resp.serialize())
    assert again.body == b"\x30\x82\x00\x00"
    assert again.get("Content-Length") == "4"


def test_make_response_keeps_existing_to_tag_and_100_has_none() -> None:
    req = sip.parse(MESSAGE)
    assert sip.make_response(req, 100, "Trying").to_tag is None
    tagged = req.replace("To", "<sip:bob@b>;tag=t1")
    assert sip.make_response(tagged, 495, "Signature Required").to_tag == "t1"
    assert sip.make_response(req, 495, "Signature Required").serialize().endswith(
        b"Content-Length: 0\r\n\r\n")


def test_make_response_errors() -> None:
    req = sip.parse(MESSAGE)
    with pytest.raises(ValueError):
        sip.make_response(sip.parse(RESPONSE), 400, "Bad")
    with pytest.raises(ValueError):
        sip.make_response(req, 700, "Bad")
    with pytest.raises(ValueError):
        sip.make_response(req, 400, "Bad\r\nX: y")
    with pytest.raises(MalformedError):
        sip.make_response(req.remove("CSeq"), 400, "Bad")


# -- value helpers ---------------------------------------------------------

def test_split_header_list() -> None:
    assert grammar.split_header_list('a, "b,c" , <sip:x,y>;p=1,, d') == \
        ['a', '"b,c"', '<sip:x,y>;p=1', 'd']
    assert grammar.split_header_list(r'"a\",b", c') == [r'"a\",b"', 'c']
    assert grammar.split_header_list("") == []
    for bad in ('"open, x', '<sip:x, y', '"esc\\'):
        with pytest.raises(MalformedError):
            grammar.split_header_list(bad)


def test_parse_params() -> None:
    assert grammar.parse_params(';a=b;C;d="x;y \\"q\\"";e=[2001:db8::1]') == {
        "a": "b", "c": None, "d": 'x;y "q"', "e": "[2001:db8::1]"}
    assert grammar.parse_param_list("cid=1;cid=2") == [("cid", "1"), ("cid", "2")]
    assert grammar.parse_params("") == {}
    # A repeated parameter used to be "first wins"; two values for one name is an
    # ambiguity (the proxy and the UA could read different ones), so now it is refused.
    for bad in (";a=", ";a=b c", ';a="x', ";=b", ";a b=c", ';a="x"y', "a=1; a=2", "a;A=1"):
        with pytest.raises(MalformedError):
            grammar.parse_params(bad)


def test_parse_address_forms() -> None:
    a = sip.parse_address('"Alice \\"A\\"; <x>" <sip:alice@a;lr>;tag=1;x')
    assert a == ('Alice "A"; <x>', "sip:alice@a;lr", {"tag": "1", "x": None})
    assert sip.parse_address("Bob <sip:b>") == ("Bob", "sip:b", {})
    assert sip.parse_address("sip:b;tag=2") == (None, "sip:b", {"tag": "2"})
    with pytest.raises(MalformedError):
        sip.parse_address("<sip:b")


def test_quote_string_round_trip() -> None:
    text = 'a "b" \\c'
    assert grammar.unquote_string(grammar.quote_string(text)) == text
    with pytest.raises(ValueError):
        grammar.quote_string("a\nb")


# -- properties ------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_parse_raises_only_typed_errors(data: bytes) -> None:
    try:
        sip.parse(data)
    except E2MError:
        pass
    try:
        sip.frame_length(data)
    except E2MError:
        pass


_head_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                     max_size=30)
_prefixes = st.sampled_from([b"INVITE sip:a@b SIP/2.0\r\n", b"SIP/2.0 200 OK\r\n",
                             b"M sip:x SIP/2.0\nl: 3\n"])


@settings(max_examples=150, deadline=None)
@given(_prefixes, st.lists(_head_text, max_size=6), st.binary(max_size=40))
def test_mutated_heads_raise_only_typed_errors(prefix: bytes, lines: list[str],
                                               body: bytes) -> None:
    data = prefix + b"\r\n".join(s.encode() for s in lines) + b"\r\n\r\n" + body
    try:
        sip.parse(data)
    except E2MError:
        pass


_names = st.text(alphabet="ABCXYZabcxyz-0", min_size=2, max_size=12).map(lambda n: "X" + n)
_values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                  min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_names, _values), max_size=10), st.binary(max_size=200))
def test_serialize_parse_round_trip(headers: list[tuple[str, str]], body: bytes) -> None:
    msg = sip.SipMessage(sip.RequestLine("MESSAGE", "sip:bob@b"), tuple(headers), body)
    again = sip.parse(msg.serialize())
    assert again.start_line == msg.start_line
    assert again.headers[:-1] == msg.headers
    assert again.headers[-1] == ("Content-Length", str(len(body)))
    assert again.body == body


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_value_helpers_raise_only_typed_errors(text: str) -> None:
    for helper in (grammar.split_header_list, grammar.parse_params, sip.parse_address,
                   grammar.unquote_string):
        try:
            helper(text)
        except E2MError:
            pass


# -- the plain-head fast path agrees with the general parser ------------------

def _general_head(data: bytes):
    try:
        return sip._parse_head(data, sip.DEFAULT_MAX_HEADERS, sip.DEFAULT_MAX_LINE)
    except E2MError as exc:
        return type(exc)


_line_bits = st.sampled_from(["Via: SIP/2.0/UDP h;branch=z9hG4bK1", "X-A :  v ", "X-B:\tt\tab\t",
                              " folded", "\tfolded", "bad line", "Bad Name: v", ":novalue",
                              "X-C: caf\u00e9", "X-D: a\rb", "X-E: a\x00b", "X-F:", "",
                              "Content-Length: 2", "l: 2"])


@settings(max_examples=300, deadline=None)
@given(_prefixes, st.lists(_line_bits, max_size=8), st.sampled_from(["\r\n", "\n"]),
       st.binary(max_size=8))
def test_plain_head_fast_path_agrees_with_the_general_parser(prefix: bytes, lines: list[str],
                                                             eol: str, tail: bytes) -> None:
    data = prefix + eol.join(lines).encode() + b"\r\n\r\n" + tail
    fast = sip._parse_plain_head(data, sip.DEFAULT_MAX_HEADERS, sip.DEFAULT_MAX_LINE)
    if fast is not None:     # when it answers, it answers what the general parser says
        assert fast == _general_head(data)


_head_soup = st.lists(st.sampled_from([b"X", b"a", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00",
                                        b"\xc3\xa9", b"\xff", b";", b"-"]), max_size=40)


@settings(max_examples=400, deadline=None)
@given(_prefixes, _head_soup)
def test_plain_head_fast_path_agrees_on_arbitrary_head_bytes(prefix: bytes, soup: list[bytes]) -> None:
    data = prefix + b"".join(soup) + b"\r\n\r\nbody"
    fast = sip._parse_plain_head(data, sip.DEFAULT_MAX_HEADERS, sip.DEFAULT_MAX_LINE)
    if fast is not None:
        assert fast == _general_head(data)


def test_plain_head_fast_path_takes_the_common_message_and_leaves_the_rest() -> None:
    fast = sip._parse_plain_head(MESSAGE, sip.DEFAULT_MAX_HEADERS, sip.DEFAULT_MAX_LINE)
    assert fast is not None and fast == _general_head(MESSAGE)
    folded = MESSAGE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards:\r\n 70\r\n")
    bare_lf = MESSAGE.replace(b"CSeq: 1 MESSAGE\r\n", b"CSeq: 1 MESSAGE\n")
    for other in (folded, bare_lf, b"\r\n" + MESSAGE.replace(b"To:", b"T o:")):
        assert sip._parse_plain_head(other, sip.DEFAULT_MAX_HEADERS, sip.DEFAULT_MAX_LINE) is None
    assert sip.parse(folded).get("Max-Forwards") == "70"
    with pytest.raises(MalformedError):
        sip.parse(MESSAGE.replace(b"To:", b"T o:"))


@pytest.mark.parametrize("via,expected", [
    ("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1", ("UDP", "127.0.0.1", 5060)),
    ("SIP / 2.0 / TLS [::1]:5061 ;rport", ("TLS", "[::1]", 5061)),
    ("sip/2.0/tcp example.com", ("TCP", "example.com", None)),
])
def test_via_sent_by_reads_the_transport_and_sent_by(via, expected):
    """One reading of a Via's sent-by for the proxy's loop check and the phone's RFC 2543
    request key (stop 39: each had its own)."""
    assert sip.via_sent_by(via) == expected


@pytest.mark.parametrize("via", [";branch=x", "SIP/2.0/UDP", " ", "SIP/2.0/UDP [::1"])
def test_via_sent_by_without_one_is_malformed(via):
    with pytest.raises(MalformedError):
        sip.via_sent_by(via)
