"""What a DMQ node list may hold before Kamailio's dmq module reads it.

A KDMQ to ``notification_peer`` carries one line per node, ``sip:<host>:<port>`` and
``;status=<state>`` (dmq's ``build_node_str``).  Kamailio 5.6.3's ``extract_node_list``
takes the node list's lock and, on a line it refuses (a bad status, a URI it cannot
parse, a host that does not resolve, an empty line), returns with the lock still held:
DMQ stops for good, and every htable write that replicates waits on it; it also logs
the refused value whole at ERROR (review 190).  So a node list is handed to dmq only
when each line names one of the cluster's nodes, by address, with a known state.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from e2m_plugins.uri import canonical_ip

_NODE = re.compile(r"sip:(\[[0-9A-Fa-f:.]+\]|[0-9.]+):([0-9]{1,5})(?:;transport=udp)?"
                   r";status=(?:active|disabled|timeout|pending)\r?")


def node_list_ok(body: str, nodes: Collection[tuple[str, int]]) -> bool:
    """Whether ``body`` is a node list dmq reads safely: every line (a newline may end the
    last) a node of ``nodes`` (canonical address, port), each at most once."""
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                        # a newline ends the last line
    if not lines or len(lines) > len(nodes):
        return False
    seen = set()
    for line in lines:
        match = _NODE.fullmatch(line)
        if match is None:
            return False
        try:
            node = (canonical_ip(match.group(1).strip("[]")), int(match.group(2)))
        except ValueError:
            return False
        if node not in nodes or node in seen:
            return False
        seen.add(node)
    return True
