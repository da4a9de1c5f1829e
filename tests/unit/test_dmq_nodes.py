"""``kamailio_app.dmq_nodes.node_list_ok``: which KDMQ node lists reach Kamailio's dmq
module (review 190: a line dmq refuses leaves its node-list lock held for good)."""

from __future__ import annotations

import pytest

from kamailio_app.dmq_nodes import node_list_ok

NODES = {("127.0.0.1", 5090), ("127.0.0.2", 5090), ("::1", 5091)}


@pytest.mark.parametrize("body", [
    "sip:127.0.0.1:5090;status=active\r\nsip:127.0.0.2:5090;status=pending\r\n",
    "sip:127.0.0.1:5090;status=active",
    "sip:[::1]:5091;status=timeout\n",
    "sip:[0:0:0:0:0:0:0:1]:5091;transport=udp;status=disabled\r\n",
])
def test_a_list_of_our_nodes_passes(body):
    assert node_list_ok(body, NODES)


@pytest.mark.parametrize("body", [
    "",                                                          # no node at all
    "sip:127.0.0.1:5090;status=awake\r\n",                       # a state dmq refuses
    "sip:127.0.0.1:5090;status=active\r\n\r\nsip:127.0.0.2:5090;status=active\r\n",
    "sip:127.0.0.9:5090;status=active\r\n",                      # not one of ours
    "sip:node-a.example.net:5090;status=active\r\n",             # a name to resolve
    "sip:127.0.0.1:5090;status=active\r\nsip:127.0.0.1:5090;status=active\r\n",
    "sip:127.0.0.1:5090;transport=tcp;status=active\r\n",        # DMQ is UDP here
    "sip:127.0.0.1:99999;status=active\r\n",
    "sip:127.0.0.1:5090;status=active;x=1\r\n",
    "sip:127.0.0.1:5090\r\n",                                     # no state
    "sip:[::1:5091;status=active\r\n",
])
def test_anything_else_is_refused(body):
    assert not node_list_ok(body, NODES)


def test_more_lines_than_nodes_are_refused():
    body = "sip:127.0.0.1:5090;status=active\r\n" * 4
    assert not node_list_ok(body, NODES)
