"""A proxy certificate fetched again, unchanged, is no error (stop 49).

Since review 166 HB1 a certificate held for a proxy host is replaced only by one a
policy in force names by fingerprint.  A policy without a fingerprint (the common
case) made the same certificate, fetched again (a renewal timer, a second 496 from the
same proxy), fail with "a certificate for ... is held, and no policy names this one":
nothing was lost, but the phone logged a fetch error for an honest proxy.  Re-adding the
held certificate itself is now a no-op that still runs the chain, name and time checks;
another key for the host is still refused (the control)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import headers as hdr
from e2m_plugins.config import UAConfig
from e2m_plugins.errors import CertificateRejectedError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine

HOME = "proxy.example.com"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _alice_holding_home(world) -> UAEngine:
    """alice registered: the home's 200 taught a policy with no fingerprint, and she
    fetched the home's certificate."""
    cred = world.user("alice")
    alice = UAEngine(UAConfig(aor=world.aor("alice"), certificate=cred.cert,
                              private_key=cred.key, trust_anchors=(world.ca.cert,),
                              peers={world.aor("bob"): world.user("bob").cert}))
    register = make_request("REGISTER", f"sip:{HOME}", from_uri=world.aor("alice"),
                            to_uri=world.aor("alice"))
    alice.protect(register)
    policy = hdr.PolicyHeader(HOME, view=(hdr.Rule("MESSAGE", "text/plain"),), expires=7200)
    alice.open(make_response(register, 200, "OK", [(hdr.PROXY_BODY_POLICY, policy.format())],
                             b"", None))
    alice.add_proxy_certificate(HOME, world.proxy(HOME).cert.public_bytes(Encoding.DER))
    return alice


def test_the_held_certificate_fetched_again_is_taken_without_error(world):
    alice = _alice_holding_home(world)
    held = world.proxy(HOME).cert
    again = alice.add_proxy_certificate(HOME, held.public_bytes(Encoding.PEM))
    assert again == held and alice.certs.proxy(HOME) == held


def test_control_another_key_for_the_host_is_still_refused(world):
    alice = _alice_holding_home(world)
    other = world.proxy(HOME, "rsa").cert
    assert other != world.proxy(HOME).cert
    with pytest.raises(CertificateRejectedError, match="no policy names this one"):
        alice.add_proxy_certificate(HOME, other.public_bytes(Encoding.DER))
    assert alice.certs.proxy(HOME) == world.proxy(HOME).cert
