"""The proxy removes exactly the headers its verdict names, on the wire (issue 17).

The KEMI script removes a verdict's headers by name when every instance of that header
is one to remove (a few KSR calls), and otherwise walks every header of the message.
The attack both paths must stop: a hop writes a Proxy-Body-Policy in the trusted
proxy's name (another certificate, another URL) so that the called UA learns a false
policy.  The forged one must go, ours must be added, and a policy naming another proxy
must reach the UA untouched.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.sipp import register, send_with_sipp

from e2m_plugins.headers import PROXY_BODY_POLICY, PolicyHeader, parse_policy_headers

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

TEXT = b"Hello. This is confidential."
FORGED = PolicyHeader(TRUSTED, cert_fingerprint=b"\x01" * 32,
                      cert_url="http://203.0.113.9/e2m/cert.der", expires=3600).format()
OTHER = PolicyHeader("other.example.net", cert_fingerprint=b"\x02" * 32,
                     cert_url="http://198.51.100.7/e2m/cert.der", expires=60).format()


def _through_home(proxy_factory, sipp, raw_uas, pki, tmp_path, extra: list[str]):
    home = proxy_factory("home", e2m=True, view=("MESSAGE:*",))
    register(home, "bob", raw_uas.port, sipp)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
    sent = alice.protect(message(pki, TEXT)).message
    for value in extra:
        sent = sent.add(PROXY_BODY_POLICY, value)
    result = send_with_sipp(sipp, home.port, sent, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    return home, got.get_all(PROXY_BODY_POLICY)


def test_a_policy_forged_in_our_name_is_replaced_by_ours(proxy_factory, sipp, raw_uas, pki,
                                                         tmp_path):
    home, values = _through_home(proxy_factory, sipp, raw_uas, pki, tmp_path, [FORGED])
    assert FORGED not in values
    (policy,) = parse_policy_headers(values)
    assert policy.is_for(TRUSTED) and policy.cert_url == home.cert_url


def test_only_the_forged_policy_goes_when_another_proxy_has_one_too(
        proxy_factory, sipp, raw_uas, pki, tmp_path):
    home, values = _through_home(proxy_factory, sipp, raw_uas, pki, tmp_path,
                                 [OTHER, FORGED, FORGED])
    assert FORGED not in values and values.count(OTHER) == 1
    ours = [p for p in parse_policy_headers(values) if p.is_for(TRUSTED)]
    assert len(ours) == 1 and ours[0].cert_url == home.cert_url
