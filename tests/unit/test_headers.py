"""Proxy-Required-Body, Warning 380 and Proxy-Body-Policy grammar."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins import headers as h
from e2m_plugins import sip
from e2m_plugins.errors import E2MError, MalformedError

SS1 = "ss1.atlanta.example.com"
CID = "1234@atlanta.example.com"


# -- Proxy-Required-Body ---------------------------------------------------

@pytest.mark.parametrize("value", [
    f'{SS1};cid="{CID}"',              # the draft's ABNF
    f"{SS1};cid={CID}",                # the draft's examples: unquoted
    f"{SS1}; cid={CID}",               # ... after unfolding
    f"{SS1};cid=<{CID}>",              # RFC 2045 msg-id brackets
    f'{SS1};cid="<{CID}>"',            # quoted and bracketed
    f'{SS1} ; CID = "{CID}" ',         # SWS around SEMI/EQUAL, name case
    f"SS1.Atlanta.Example.COM;cid={CID}",
])
def test_single_label_forms(value: str) -> None:
    [label] = h.parse_proxy_required_body(value)
    assert label.is_for(SS1)
    assert label.cids == (CID,)
    assert not label.whole_body


def test_folded_draft_example_through_the_sip_parser() -> None:
    raw = (b"MESSAGE sip:bob@biloxi.example.com SIP/2.0\r\n"
           b"Proxy-Required-Body: ss1.atlanta.example.com;\r\n"
           b"                     cid=1234@atlanta.example.com\r\n"
           b"Content-Length: 0\r\n\r\n")
    values = sip.parse(raw).get_all("Proxy-Required-Body")
    assert h.parse_proxy_required_bodies(values) == [h.BodyLabel(SS1, (CID,))]


def test_comma_list_of_cids_for_one_proxy() -> None:
    [label] = h.parse_proxy_required_body(f'{SS1};cid="a@x", cid="b@x",cid=<c@x>')
    assert label.cids == ("a@x", "b@x", "c@x")  # outer body first, order kept


def test_several_cid_params_in_one_label() -> None:
    [label] = h.parse_proxy_required_body(f"{SS1};cid=a@x;cid=b@x;x-extra=1")
    assert label.cids == ("a@x", "b@x")
    assert label.params == {"x-extra": "1"}


def test_comma_list_of_proxies_in_one_value() -> None:
    labels = h.parse_proxy_required_body(
        f'{SS1};cid="a@x", cid=b@x, fw.example.net;cid=c@x, 192.0.2.7, [2001:DB8::1];cid=d@x')
    assert [(lab.proxy_host, lab.cids) for lab in labels] == [
        (SS1, ("a@x", "b@x")), ("fw.example.net", ("c@x",)), ("192.0.2.7", ()),
        ("[2001:DB8::1]", ("d@x",))]
    assert labels[3].is_for("[2001:db8:0::1]")
    assert labels[2].whole_body


def test_no_cid_means_whole_body() -> None:
    [label] = h.parse_proxy_required_body("logger.example.com")
    assert label.whole_body and label.cids == ()


def test_duplicate_labels_merge_for_one_host() -> None:
    labels = h.parse_proxy_required_bodies([
        f"{SS1};cid=a@x", "other.example.com;cid=z@x", f"{SS1.upper()};cid=<a@x>",
        f"{SS1};cid=b@x"])
    merged = h.labels_for(labels, SS1 + ".")
    assert merged is not None and merged.cids == ("a@x", "b@x")
    assert h.labels_for(labels, "nobody.example.com") is None
    whole = h.labels_for(labels + [h.BodyLabel(SS1)], SS1)
    assert whole is not None and whole.whole_body


@pytest.mark.parametrize("value", [
    "",
    ",",
    'cid="a@x"',                    # a cid list with no proxy before it
    ";cid=a@x",                     # no host
    "ss1.example.com:5060;cid=a@x",  # no port in required-proxy
    "sip:ss1.example.com;cid=a@x",
    "ss1 example;cid=a@x",
    "ss1.example.com;cid",          # cid without a value
    'ss1.example.com;cid=""',
    "ss1.example.com;cid=<>",
    'ss1.example.com;cid="a b@x"',
    'ss1.example.com;cid="a@x',     # unterminated quote
    "[2001:db8::zz];cid=a@x",
    "[fe80::1%eth0];cid=a@x",
    "-bad-.example.com",
])
def test_malformed_labels(value: str) -> None:
    with pytest.raises(MalformedError):
        h.parse_proxy_required_body(value)


def test_format_one_cid_per_header_in_abnf_form() -> None:
    label = h.BodyLabel(SS1, ("<a@x>", "b@x"), {"x-n": "v 1"})
    assert label.cids == ("a@x", "b@x")
    assert h.format_labels([label, h.BodyLabel("logger.example.com")]) == [
        f'{SS1};cid="a@x";x-n="v 1"', f'{SS1};cid="b@x";x-n="v 1"', "logger.example.com"]
    assert h.format_proxy_required_body(h.BodyLabel(SS1, (CID,))) == f'{SS1};cid="{CID}"'
    with pytest.raises(ValueError):
        h.format_proxy_required_body(label)
    with pytest.raises(MalformedError):
        h.BodyLabel(SS1, (), {"cid": "a@x"})


def test_format_survives_a_generic_comma_splitter() -> None:
    # A parser that joins instances with commas must still give us every label.
    joined = ", ".join(h.format_labels([h.BodyLabel(SS1, ("a@x", "b@x")),
                                        h.BodyLabel("fw.example.net", ("c@x",))]))
    labels = h.parse_proxy_required_body(joined)
    assert [lab.cids for lab in labels] == [("a@x",), ("b@x",), ("c@x",)]


# -- Warning ---------------------------------------------------------------

def test_content_type_warning_matches_the_draft_text() -> None:
    assert h.content_type_warning(SS1, "text/plain") == \
        f"380 {SS1} \"Required to view 'text/plain'\""
    assert h.content_type_warning(SS1, "application/SDP", code=399) == \
        f"399 {SS1} \"Required to view 'application/sdp'\""
    with pytest.raises(ValueError):
        h.content_type_warning(SS1, "text/plain; charset=utf-8")


def test_parse_content_type_warnings() -> None:
    values = [
        f"380 {SS1} \"Required to view 'application/sdp'\", "
        "380 sips.example.com \"SIPS Not Allowed\"",  # RFC 5630 meaning: not ours
        '399 fw.example.net:5061 "Required to view \'text/plain\'"',
        'garbage "unterminated',
        "380 p.example.com \"required to view  'Text/Plain' \"",
    ]
    assert h.parse_content_type_warnings(values) == [
        (SS1, "application/sdp"), ("p.example.com", "text/plain")]
    assert h.parse_content_type_warnings(values, code=399) == [
        ("fw.example.net:5061", "text/plain")]
    assert h.parse_content_type_warnings([]) == []


def test_warning_round_trip_with_escapes() -> None:
    ws = [h.WarningValue(380, SS1, 'a "quoted" \\ text, with comma'),
          h.WarningValue(399, "[2001:db8::1]:5060", "")]
    assert h.parse_warnings(h.format_warning(ws)) == ws
    assert h.WarningValue(7, "x", "y").format() == '007 x "y"'


@pytest.mark.parametrize("value", ["38 x \"y\"", "380 x y", "380 \"y\"", "3800 x \"y\""])
def test_malformed_warnings(value: str) -> None:
    with pytest.raises(MalformedError):
        h.parse_warnings(value)


# -- Proxy-Body-Policy -----------------------------------------------------

FP = hashlib.sha256(b"certificate DER").digest()
POLICY = (f'proxy.example.com;view="MESSAGE:*,INVITE:application/sdp";verify="";'
          f'cert-fp="sha256:{FP.hex()}";cert-url="http://proxy.example.com/e2m/cert.der";'
          "expires=3600")


def test_policy_parse_example() -> None:
    p = h.PolicyHeader.parse(POLICY)
    assert p.host == "proxy.example.com"
    assert p.view == (h.Rule("MESSAGE", "*"), h.Rule("INVITE", "application/sdp"))
    assert p.verify == ()
    assert p.cert_fingerprint == FP
    assert p.cert_url == "http://proxy.example.com/e2m/cert.der"
    assert p.expires == 3600
    assert p.extensions == {}
    assert h.PolicyHeader.parse(p.format()) == p
    # empty verify is omitted on output
    assert 'verify' not in p.format()


def test_policy_doc_examples_parse() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    lines = [ln.split(":", 1)[1].strip() for ln in doc.splitlines()
             if ln.startswith("Proxy-Body-Policy: ")]
    policies = h.parse_policy_headers(lines)
    assert len(policies) == 3
    assert policies[0].cert_fingerprint is not None
    assert all(h.PolicyHeader.parse(p.format()) == p for p in policies)


def test_policy_matching() -> None:
    p = h.PolicyHeader("fw.example.net",
                       view=(h.Rule("INVITE", "application/sdp"), h.Rule("*", "text/*")),
                       verify=(h.Rule("MESSAGE", "*"),))
    assert p.view_matches("INVITE", "Application/SDP; charset=x")
    # a rule for INVITE is about its session: the offers and answers of UPDATE, PRACK
    # and ACK too (else a UA moves the media past the proxy), nothing else
    for method in ("UPDATE", "PRACK", "ACK"):
        assert p.view_matches(method, "application/sdp")
    for method in ("BYE", "OPTIONS", "MESSAGE", "INFO"):
        assert not p.view_matches(method, "application/sdp")
    # a standard method in any case is that method (Kamailio and pjsip read it so)
    assert p.view_matches("update", "application/sdp") and p.view_matches("Invite", "application/sdp")
    assert p.view_matches("UPDATE", "text/html")
    assert not p.view_matches("invite", "image/png")
    assert p.verify_matches("MESSAGE", "message/cpim")
    assert not p.verify_matches("MESSAGE", None)  # no body, nothing to verify
    assert p.verify_matches("message", "text/plain")      # read as MESSAGE downstream
    x = h.PolicyHeader("fw.example.net", view=(h.Rule("FOO", "*"),))
    assert x.view_matches("FOO", "text/plain") and not x.view_matches("foo", "text/plain")


def test_policy_lenient_forms() -> None:
    p = h.PolicyHeader.parse(
        'FW.example.net ; VIEW = " INVITE : application/sdp , BYE:* " ; '
        f'cert-fp="SHA256:{":".join(f"{b:02X}" for b in FP)}";cert-url="HTTPS://fw.example.net:8443/c";'
        'expires="60";x-later="a,b;c";flag')
    assert p.view == (h.Rule("INVITE", "application/sdp"), h.Rule("BYE", "*"))
    assert p.cert_fingerprint == FP
    assert p.expires == 60
    assert p.extensions == {"x-later": "a,b;c", "flag": None}
    assert p.is_for("fw.EXAMPLE.net")
    assert h.PolicyHeader.parse(p.format()) == p


def test_policies_from_several_values_and_a_joined_value() -> None:
    a = h.PolicyHeader("a.example.com", view=(h.Rule("MESSAGE", "*"), h.Rule("INVITE", "*")))
    b = h.PolicyHeader("b.example.com", verify=(h.Rule("*", "*"),), expires=0)
    joined = f"{a.format()}, {b.format()}"
    assert h.parse_policy_headers(joined) == [a, b]
    assert h.parse_policy_headers([a.format(), b.format()]) == [a, b]
    assert h.policy_for([a, b], "B.example.com") == b
    assert h.policy_for([a, b], "c.example.com") is None
    with pytest.raises(MalformedError):
        h.PolicyHeader.parse(joined)


@pytest.mark.parametrize("value", [
    "",
    ';view="MESSAGE:*"',                               # missing host
    'sip:proxy.example.com;view="MESSAGE:*"',
    'proxy.example.com;view="MESSAGE"',                # rule without a type
    'proxy.example.com;view="MESSAGE:text"',
    'proxy.example.com;view="MESSAGE:*/plain"',
    'proxy.example.com;view="MESSAGE:text/pl*"',
    'proxy.example.com;view="MES SAGE:text/plain"',
    'proxy.example.com;view=":text/plain"',
    "proxy.example.com;view",
    'proxy.example.com;view="INVITE:*";view="MESSAGE:*"',  # duplicate known param
    'proxy.example.com;cert-fp="sha1:00"',
    'proxy.example.com;cert-fp="sha256:abcd"',
    f'proxy.example.com;cert-fp="{FP.hex()}"',
    f'proxy.example.com;cert-fp="sha256:{FP.hex()[:2]}:{FP.hex()[2:]}"',
    f'proxy.example.com;cert-fp="sha256:{FP.hex()}00"',
    'proxy.example.com;cert-url="ftp://proxy.example.com/c"',
    'proxy.example.com;cert-url="file:///etc/passwd"',
    'proxy.example.com;cert-url="https://"',
    'proxy.example.com;cert-url="http://x.example.com:99999/"',
    'proxy.example.com;cert-url="not a url"',
    "proxy.example.com;expires=-1",
    "proxy.example.com;expires=99999999999",
    "proxy.example.com;expires=\u00b2",
    'proxy.example.com;view="MESSAGE:*',               # unterminated quote
])
def test_policy_rejections(value: str) -> None:
    with pytest.raises(MalformedError):
        h.PolicyHeader.parse(value)


def test_policy_constructor_validates() -> None:
    with pytest.raises(MalformedError):
        h.PolicyHeader("p.example.com", cert_fingerprint=b"short")
    with pytest.raises(MalformedError):
        h.PolicyHeader("p.example.com", cert_url="gopher://p.example.com/")
    with pytest.raises(MalformedError):
        h.PolicyHeader("p.example.com", extensions={"view": "x"})
    with pytest.raises(MalformedError):
        h.Rule("INVITE", "application")


# -- properties ------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
_tokens = st.from_regex(r"[A-Za-z0-9\-.!%_+`'~]{1,10}", fullmatch=True)
_param_names = _tokens.map(str.lower).filter(lambda n: n not in ("cid",) + h._KNOWN)
_param_values = st.one_of(st.none(), _tokens,
                          st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                                  max_size=12))
_cids = st.from_regex(r"[A-Za-z0-9.$_+-]{1,12}@[a-z0-9.]{1,12}", fullmatch=True)
_params = st.dictionaries(_param_names, _param_values, max_size=3)


@settings(max_examples=50, deadline=None)
@given(_hosts, st.lists(_cids, max_size=1), _params)
def test_single_cid_labels_round_trip(host: str, cids: list[str],
                                      params: dict[str, str | None]) -> None:
    label = h.BodyLabel(host, tuple(cids), params)
    assert h.parse_proxy_required_body(h.format_proxy_required_body(label)) == [label]


@settings(max_examples=50, deadline=None)
@given(_hosts, st.lists(_cids, min_size=1, max_size=4, unique=True), _params)
def test_multi_cid_labels_round_trip_through_several_headers(
        host: str, cids: list[str], params: dict[str, str | None]) -> None:
    label = h.BodyLabel(host, tuple(cids), params)
    values = h.format_labels([label])
    assert len(values) == len(cids)
    assert h.labels_for(h.parse_proxy_required_bodies(values), host) == label


_methods = st.one_of(st.just("*"), st.sampled_from(["INVITE", "MESSAGE", "UPDATE"]),
                     _tokens.filter(lambda t: t != "*"))
_ctypes = st.one_of(
    st.just("*"),
    _tokens.filter(lambda t: "*" not in t).map(lambda t: f"{t.lower()}/*"),
    st.tuples(_tokens, _tokens).filter(lambda p: "*" not in p[0] + p[1])
    .map(lambda p: f"{p[0]}/{p[1]}".lower()),
)
_rules = st.builds(h.Rule, _methods, _ctypes)
_urls = st.tuples(st.sampled_from(["http", "https"]), _hosts,
                  st.one_of(st.none(), st.integers(1, 65535)),
                  st.from_regex(r"(/[A-Za-z0-9._~%-]{0,8}){0,3}", fullmatch=True)).map(
    lambda t: f"{t[0]}://{t[1]}{'' if t[2] is None else f':{t[2]}'}{t[3]}")
_policies = st.builds(
    h.PolicyHeader, _hosts,
    view=st.lists(_rules, max_size=4).map(tuple),
    verify=st.lists(_rules, max_size=4).map(tuple),
    cert_fingerprint=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
    cert_url=st.one_of(st.none(), _urls),
    expires=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    extensions=_params,
)


@settings(max_examples=60, deadline=None)
@given(_policies)
def test_policy_format_parse_identity(policy: h.PolicyHeader) -> None:
    assert h.PolicyHeader.parse(policy.format()) == policy


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_parsers_raise_only_typed_errors(text: str) -> None:
    for parse in (h.parse_proxy_required_body, h.PolicyHeader.parse, h.parse_warnings,
                  h.parse_content_type_warnings):
        try:
            parse(text)
        except E2MError:
            pass


def test_body_labels_are_bounded_before_they_are_parsed():
    """A stranger's 11,000 labels cost the proxy 72 ms before this bound (50 times a
    normal message); now the count and size are checked first."""
    from e2m_plugins.errors import LimitExceededError
    one = "proxy.example.com;cid=part1@example.com"
    assert len(h.parse_proxy_required_bodies([one] * h.MAX_LABELS_PER_MESSAGE)) == 64
    with pytest.raises(LimitExceededError):
        h.parse_proxy_required_bodies([one] * (h.MAX_LABELS_PER_MESSAGE + 1))
    with pytest.raises(LimitExceededError):
        h.parse_proxy_required_bodies([", ".join([one] * 500)])
