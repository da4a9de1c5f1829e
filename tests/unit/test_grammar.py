"""One grammar for SIP and MIME header parameters, tokens and quoting."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins import grammar as g
from e2m_plugins import headers as h
from e2m_plugins import mime, sip
from e2m_plugins.errors import E2MError, MalformedError


# -- repeated parameters ----------------------------------------------------

@pytest.mark.parametrize("text", ["a=1;a=2", "a=1; A=2", "lr;lr", "tag=x;tag=x", 'a="1";a=1'])
def test_repeated_sip_parameter_is_malformed(text: str) -> None:
    with pytest.raises(MalformedError):
        g.parse_params(text)
    with pytest.raises(MalformedError):
        sip.parse_address(f"<sip:bob@b>;{text}")


def test_repeated_from_tag_fails_closed() -> None:
    msg = sip.make_request("MESSAGE", "sip:bob@b", from_uri="sip:alice@a", to_uri="sip:bob@b",
                           from_tag="one")
    msg = msg.replace("From", "<sip:alice@a>;tag=one;tag=two")
    with pytest.raises(MalformedError):
        _ = msg.from_tag


def test_the_list_form_keeps_repeats_for_the_caller() -> None:
    assert g.parse_param_list("cid=a;CID=b") == [("cid", "a"), ("cid", "b")]
    [label] = h.parse_proxy_required_body("ss1.example.com;cid=a@x;cid=b@x")
    assert label.cids == ("a@x", "b@x")
    with pytest.raises(MalformedError):   # any other label parameter only once
        h.parse_proxy_required_body("ss1.example.com;cid=a@x;x-p=1;x-p=2")
    with pytest.raises(MalformedError):   # an unknown policy parameter too
        h.PolicyHeader.parse('ss1.example.com;view="MESSAGE:*";x-p=1;X-P=1')


@pytest.mark.parametrize("value", [
    "text/plain; charset=us-ascii; charset=utf-8",
    "text/plain; CHARSET=a; charset=a",
    "multipart/mixed; boundary=abc; boundary*=utf-8''xyz",    # RFC 2231 form of the same name
    "multipart/mixed; boundary*0=ab; boundary=xyz",
])
def test_repeated_mime_parameter_is_malformed(value: str) -> None:
    with pytest.raises(MalformedError):
        mime.parse_content_type(value)


def test_rfc2231_forms_alone_are_kept_undecoded() -> None:
    ct = mime.parse_content_type("application/pkcs7-mime; name*0=smime; name*1=.p7m")
    assert ct.params == (("name*0", "smime"), ("name*1", ".p7m"))
    assert ct.param("name") is None
    with pytest.raises(MalformedError):     # SIP has no RFC 2231: '*' is just a token char
        g.parse_params("a=1;a*=2", g.MIME)
    assert g.parse_params("a=1;a*=2", g.SIP) == {"a": "1", "a*": "2"}


# -- bare parameters --------------------------------------------------------

def test_bare_parameter_is_none_in_both_dialects() -> None:
    assert g.parse_params(";lr;transport=tcp") == {"lr": None, "transport": "tcp"}
    assert sip.parse_address("<sip:p.example.com>;lr").params == {"lr": None}
    disposition = mime.parse_disposition("attachment; x-flag; handling=optional")
    assert disposition.params == (("x-flag", None), ("handling", "optional"))
    assert disposition.param("x-flag") is None and disposition.handling == "optional"
    assert mime.parse_params("x-flag") == (("x-flag", None),)


def test_bare_parameter_is_written_back_bare() -> None:
    disposition = mime.parse_disposition("attachment; x-flag; handling=optional")
    assert str(disposition) == "attachment; x-flag; handling=optional"
    assert mime.parse_disposition(str(disposition)) == disposition
    label = h.BodyLabel("ss1.example.com", (), {"x-flag": None})
    assert h.format_proxy_required_body(label) == "ss1.example.com;x-flag"


def test_empty_values() -> None:
    # name="" is an empty string; "name=" with nothing after it is malformed (both dialects).
    assert g.parse_params('a=""') == {"a": ""}
    assert mime.parse_params('a=""') == (("a", ""),)
    for dialect in (g.SIP, g.MIME):
        for bad in ("a=", "a= ;b=1", "a=;"):
            with pytest.raises(MalformedError):
                g.parse_params(bad, dialect)


def test_separators_differ_by_dialect_only_where_the_rfcs_do() -> None:
    # RFC 3261 §23.2's Content-Disposition example has no ';' before handling.
    assert g.parse_params("filename=smime.p7m handling=optional", g.MIME) == {
        "filename": "smime.p7m", "handling": "optional"}
    with pytest.raises(MalformedError):
        g.parse_params("filename=smime.p7m handling=optional", g.SIP)
    for dialect in (g.SIP, g.MIME):   # without any white space, never
        with pytest.raises(MalformedError):
            g.parse_params('a="x"y', dialect)
        assert g.parse_params(' ; a = "x" ;; b ', dialect) == {"a": "x", "b": None}


def test_token_sets_differ_as_in_the_rfcs() -> None:
    for name in ("a#b", "a{b}", "a|b", "a^b", "a$b", "a&b"):   # RFC 2045 token, not RFC 3261
        assert g.MIME.is_token(name) and not g.SIP.is_token(name)
        assert g.parse_params(f"{name}=1", g.MIME) == {name: "1"}
        with pytest.raises(MalformedError):
            g.parse_params(f"{name}=1", g.SIP)
    for name in ("a/b", "a@b", "a:b", "a[b", "a?b", "a(b", "a,b", "a b", "é"):
        assert not g.MIME.is_token(name) and not g.SIP.is_token(name)
    assert g.quote_if_needed("a{b}", g.MIME) == "a{b}"
    assert g.quote_if_needed("a{b}", g.SIP) == '"a{b}"'


# -- quoting ------------------------------------------------------------------

def test_quoting_helpers() -> None:
    assert g.quote_string('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert g.unquote_string(' "a \\"b\\" \\\\c" ') == 'a "b" \\c'
    assert g.unquote_string('""') == ""
    for bad in ('"a', 'a"', '"a"b"', '"a\\"', "", '"'):
        with pytest.raises(MalformedError):
            g.unquote_string(bad)
    for bad in ("a\r", "a\nb", "\x00"):
        with pytest.raises(ValueError):
            g.quote_string(bad)
    with pytest.raises(ValueError):
        g.format_param("bad name", "x")


_quotable = st.text(st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
                    max_size=30)
_names = st.from_regex(r"[a-z0-9\-.!%_+`'~]{1,10}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(_quotable)
def test_quote_unquote_round_trip(text: str) -> None:
    assert g.unquote_string(g.quote_string(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, st.one_of(st.none(), _quotable), max_size=4),
       st.sampled_from([g.SIP, g.MIME]), st.booleans())
def test_format_parse_round_trip(params: dict, dialect: g.Dialect, force_quote: bool) -> None:
    text = ";".join(g.format_param(n, v, dialect, force_quote) for n, v in params.items())
    assert g.parse_params(text, dialect) == params
    ctype = mime.ContentType("text/plain", tuple(params.items()))
    if "\\" in str(ctype):    # an escaped quote or backslash: pjsip keeps escapes (review 62)
        with pytest.raises(MalformedError):
            mime.parse_content_type(str(ctype))
    else:
        assert mime.parse_content_type(str(ctype)) == ctype


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.sampled_from([g.SIP, g.MIME]))
def test_parsers_raise_only_typed_errors(text: str, dialect: g.Dialect) -> None:
    for parser in (lambda t: g.parse_params(t, dialect), g.unquote_string, g.split_header_list):
        try:
            parser(text)
        except E2MError:
            pass


# -- bounded work ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '"' + "\\a" * 40000,              # an escaped quoted string that never closes
    "a=" + '"' + "x" * 80000,
    ";a" * 40000,                     # many bare parameters (SIP: duplicates)
    "a " * 40000,                     # MIME: many space-separated bare parameters
    "a=" + "b" * 80000 + '"',
])
def test_pathological_parameters_take_linear_time(text: str) -> None:
    start = time.perf_counter()
    for dialect in (g.SIP, g.MIME):
        for parse in (g.parse_params, g.parse_param_list):
            try:
                parse(text, dialect)
            except MalformedError:
                pass
    try:
        g.unquote_string(text)
    except MalformedError:
        pass
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("value,seconds", [
    ("2", 2), (" 120 (busy) ", 120), ("3600;duration=60", 3600),
    ("99999999 (forged)", 999999), ("", None), (None, None), ("soon", None), ("-5", None),
])
def test_retry_after_seconds(value, seconds):
    from e2m_plugins.grammar import retry_after_seconds
    assert retry_after_seconds(value) == seconds
