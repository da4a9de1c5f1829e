"""Record-Route tokens: the proxy routes an in-dialog request only for a dialog it
record-routed (``kamailio_app/dialog_route.py``).

Before them, a To tag and a Route naming the proxy made any request "in-dialog", and
``loose_route`` relayed it to any address (``test_review2_proxy_wire.py``).  Here: the
token's rules without processes, then a real dialog through Kamailio whose route set
works and whose token opens no other Call-ID.
"""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import udp_send
from e2m_lab.sipp import register
from e2m_plugins.sip import RequestLine, SipMessage, make_response

from kamailio_app.bootstrap import identity_key, route_tokens
from kamailio_app.dialog_route import MAX_ROUTE_ENTRIES, PARAM, RouteTokens, dialog_parties

PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To


def _tokens() -> RouteTokens:
    return RouteTokens(b"k" * 32)


def test_the_token_binds_call_id_and_tag_and_either_tag_admits():
    tokens = _tokens()
    route = f"<sip:127.0.0.1:5060;lr{tokens.param('c1@x', 'alice-tag', parties=PARTIES)}>"
    assert tokens.admits("c1@x", ("alice-tag", "bob-tag"), [route], parties=PARTIES)     # alice's requests
    # bob's: her tag in To, his From and her To (the parties in the request's order)
    assert tokens.admits("c1@x", ("bob-tag", "alice-tag"), [route], parties=PARTIES[::-1])
    # her tag in From but written From bob (review 99): no token fits
    assert not tokens.admits("c1@x", ("alice-tag", "bob-tag"), [route], parties=PARTIES[::-1])
    assert tokens.side("c1@x", ("alice-tag", "bob-tag"), [route], parties=PARTIES) == 0
    assert tokens.side("c1@x", ("bob-tag", "alice-tag"), [route], parties=PARTIES[::-1]) == 1
    assert not tokens.admits("c2@x", ("alice-tag", "bob-tag"), [route], parties=PARTIES)
    assert not tokens.admits("c1@x", ("other", "bob-tag"), [route], parties=PARTIES)
    assert not tokens.admits("c1@x", (None, None), [route], parties=PARTIES)
    assert not tokens.admits("", ("alice-tag",), [route], parties=PARTIES)
    assert not RouteTokens(b"j" * 32).admits("c1@x", ("alice-tag",), [route], parties=PARTIES)   # another key


def test_forged_and_odd_routes_are_refused_and_reading_is_bounded():
    tokens = _tokens()
    good = tokens.token("c1@x", "t1", parties=PARTIES)
    assert not tokens.admits("c1@x", ("t1",), [f"<sip:p;lr;{PARAM}={'0' * 32}>"], parties=PARTIES)
    assert not tokens.admits("c1@x", ("t1",), [f"<sip:p;lr;{PARAM}={good[:-1]}>"], parties=PARTIES)
    assert not tokens.admits("c1@x", ("t1",), [f"<sip:p;lr;x{PARAM}={good}>"], parties=PARTIES)
    assert not tokens.admits("c1@x", ("t1",), [f"sip:p;lr;{PARAM}={good}"], parties=PARTIES)   # not name-addr
    assert tokens.admits("c1@x", ("t1",), [f"<sip:p;lr;{PARAM.upper()}={good.upper()}>"], parties=PARTIES)
    assert tokens.admits("c1@x", ("t1",), ["<sip:a;lr>, <sip:b;lr>", f"<sip:p;{PARAM}={good};lr>"], parties=PARTIES)
    padding = ", ".join(["<sip:x;lr>"] * MAX_ROUTE_ENTRIES)
    assert not tokens.admits("c1@x", ("t1",), [padding, f"<sip:p;lr;{PARAM}={good}>"], parties=PARTIES)
    with pytest.raises(ValueError):
        RouteTokens(b"short")


def test_dialog_ids_are_read_as_the_core_reads_them():
    """Kamailio's ``$ci`` keeps a trailing blank the core strips (review 24): the ids kemi
    names a dialog by are stripped the same way, and an absent tag is None."""
    from types import SimpleNamespace

    from e2m_plugins.sip import parse
    from kamailio_app.dialog_route import dialog_ids
    raw = (b"BYE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-d\r\n"
           b"From: <sip:alice@x>;tag=a1\r\nTo: <sip:bob@x>\r\nCall-ID: abc@x \t\r\n"
           b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    core = parse(raw)
    pvs = {"$ci": "abc@x \t", "$ft": "a1", "$tt": ""}       # what Kamailio hands over
    ksr = SimpleNamespace(pv=SimpleNamespace(get=pvs.get))
    assert dialog_ids(ksr) == (core.call_id, core.from_tag, core.to_tag) == ("abc@x", "a1", None)


def test_every_node_derives_the_same_key_and_a_plain_proxy_its_own(pki, tmp_path):
    from e2m_lab.kamailio_harness import write_proxy_config
    from e2m_plugins.config import load_proxy_config
    config = load_proxy_config(write_proxy_config(tmp_path / "a", 5999, pki=pki, e2m=True))
    again = load_proxy_config(write_proxy_config(tmp_path / "b", 5998, pki=pki, e2m=True))
    assert route_tokens(config).token("c", "t", parties=PARTIES) == route_tokens(again).token("c", "t", parties=PARTIES)
    assert identity_key(config, b"e2m record-route v1 ") != identity_key(config, b"e2m key cache seal v1 ")
    assert route_tokens(None).token("c", "t", parties=PARTIES) != route_tokens(None).token("c", "t", parties=PARTIES)


@pytest.mark.kamailio
@pytest.mark.sipp
def test_a_real_dialogs_route_set_works_and_its_token_opens_no_other_call(
        proxy_factory, sipp, raw_uas):
    home = proxy_factory("home", e2m=True)
    register(home, "bob", raw_uas.port, sipp)

    def answer_with_route_set(request: SipMessage) -> SipMessage:
        reply = make_response(request, 200, "OK")
        return reply
    raw_uas.responder = answer_with_route_set
    call_id = "routed@127.0.0.1"
    invite = SipMessage(RequestLine("INVITE", "sip:bob@example.com"), (
        ("Via", "SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bK-rt-1"),
        ("From", "<sip:alice@example.com>;tag=a-rt"), ("To", "<sip:bob@example.com>"),
        ("Call-ID", call_id), ("CSeq", "1 INVITE"), ("Max-Forwards", "70"),
        ("Contact", "<sip:alice@127.0.0.1:9>")), b"")
    ok = udp_send(home.port, invite)
    assert ok is not None and ok.status == 200, ok and ok.status
    (record_route,) = ok.get_all("Record-Route")
    assert f";{PARAM}=" in record_route

    def in_dialog(cid: str, n: int) -> SipMessage:
        return SipMessage(RequestLine("OPTIONS", f"sip:bob@127.0.0.1:{raw_uas.port}"), (
            ("Via", f"SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bK-rt-o{n}"),
            ("Route", record_route),
            ("From", "<sip:alice@example.com>;tag=a-rt"), ("To", f"<sip:bob@example.com>;tag={ok.to_tag}"),
            ("Call-ID", cid), ("CSeq", f"{n} OPTIONS"), ("Max-Forwards", "70")), b"")
    answer = udp_send(home.port, in_dialog(call_id, 2))
    assert answer is not None and answer.status == 200, answer and answer.status
    assert len(raw_uas.wait_for(1, method="OPTIONS")) == 1
    refused = udp_send(home.port, in_dialog("other-call@127.0.0.1", 3))
    assert refused is not None and refused.status == 403, refused and refused.status
    assert len(raw_uas.wait_for(2, timeout=0.5, method="OPTIONS")) == 1   # it went nowhere
