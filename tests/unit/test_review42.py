"""A forty-second attacker's review (December 2026) of a31495c: review 40's "KDMQ only
over UDP, on this node's DMQ socket" (``ProxyApp.dmq_accepts``), at the configuration.

The check holds only while the DMQ socket is one that strangers cannot reach.  Nothing
makes it so: ``[cluster] dmq_address`` may name a ``[kamailio] listen`` UDP socket (or a
port a wildcard SIP listener serves), the launcher renders it without a second
``listen=`` line (``launcher._listen_lines``: "the DMQ socket when no listener is already
on it") and ``public_dmq_warning`` speaks only of globally routable addresses.  Then a
forged UDP KDMQ sent to the SIP port passes ``dmq_accepts``; on real processes it is
written into the replicated tables (``tests/cluster/test_review42_cluster.py``).

Fixed: the configuration refuses such a ``dmq_address`` (and a wildcard one), and the
launcher always renders the DMQ socket as a listener of its own.
"""

from __future__ import annotations

import pytest

from kamailio_app.bootstrap import ProxyApp, public_dmq_warning
from kamailio_app.config import AppConfigError, parse_app_config
from kamailio_app.launcher import render_cfg

DB = "postgres://e2m:pw@127.0.0.1:5432/e2m"
PEER = ("10.0.0.12", 5060)


def _config(tmp_path, listen, dmq_address, peer="sip:10.0.0.12:5060"):
    return parse_app_config({"kamailio": {"listen": listen, "domains": ["example.com"]},
                             "cluster": {"db_url": DB, "dmq_address": dmq_address,
                                         "peers": [peer]}}, tmp_path / "PROXY.toml")


SHARED = [
    # the SIP UDP listener itself is the DMQ socket (private LAN: no warning either)
    (["udp:10.0.0.11:5060", "tcp:10.0.0.11:5060"], "sip:10.0.0.11:5060"),
    # a wildcard SIP listener on the DMQ port: the launcher adds the DMQ socket beside it
    (["udp:0.0.0.0:5060"], "sip:10.0.0.11:5060"),
]


@pytest.mark.parametrize("listen,dmq", SHARED)
def test_hole_a_dmq_address_that_is_a_sip_listener_is_accepted(tmp_path, listen, dmq):
    """Attacker: review 40's off-path sender that forges a UDP source and reaches the
    node's SIP port (phones reach it), not a private DMQ network.

    Precondition: ``[cluster] dmq_address`` names a socket a ``[kamailio] listen`` UDP
    entry serves (the same address and port; or the port of a wildcard listener, which
    the launcher then binds beside it).  Config load, ``render_cfg`` and the proxy's
    start take it; ``public_dmq_warning`` is None for a private address.

    Attack: KDMQ (a captured htable replication, renamed) from a peer's address and DMQ
    port, forged, sent over UDP to the node's SIP port.

    Effect: ``dmq_accepts`` is True (UDP, ``$Ri:$Rp`` == dmq_address, a peer's source),
    so ``dmq.handle_message`` writes it: a forged replay record refuses a fresh request,
    a deleted one lets a replay through, a forged registration (dmq_usrloc) takes a
    user's calls.  Shown on the wire in
    ``tests/cluster/test_review42_cluster.py::test_hole_kdmq_forged_to_a_sip_port_that_is_the_dmq_socket_is_taken``.

    Fix: refuse at load a ``dmq_address`` whose port a ``[kamailio] listen`` UDP socket
    serves on that address or on a wildcard (AppConfigError naming dmq_address), and
    drop the launcher's "no listener is already on it" branch."""
    with pytest.raises(AppConfigError, match="dmq_address"):
        config = _config(tmp_path, listen, dmq)
        # what it leads to today (never reached once the config is refused):
        host, port = dmq[4:].rsplit(":", 1)
        app = ProxyApp(config)
        assert app.dmq_accepts(PEER, "udp", (host, int(port)))      # the SIP socket
        assert public_dmq_warning(config.cluster) is None
        render_cfg(config, tmp_path)


def test_control_a_dmq_socket_of_its_own_refuses_kdmq_on_the_sip_listener(tmp_path):
    """The documented layout (``examples/cluster-node-a.toml``: a DMQ socket of its own):
    the same forged KDMQ on the SIP listener is refused, a peer's on the DMQ socket
    taken."""
    config = _config(tmp_path, ["udp:10.0.0.11:5060", "tcp:10.0.0.11:5060"],
                     "sip:10.0.0.11:5090", peer="sip:10.0.0.12:5090")
    app = ProxyApp(config)
    assert not app.dmq_accepts(("10.0.0.12", 5090), "udp", ("10.0.0.11", 5060))
    assert app.dmq_accepts(("10.0.0.12", 5090), "udp", ("10.0.0.11", 5090))
    listens = [line for line in render_cfg(config, tmp_path).splitlines()
               if line.startswith("listen=")]
    assert "listen=udp:10.0.0.11:5090" in listens
