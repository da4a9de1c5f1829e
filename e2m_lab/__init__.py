"""The loopback lab above both adapters: what drives the Kamailio proxy and the pjsua2
phone together.

``make demo`` (``e2m_lab.demo``), the process handles (``proxy_process``, ``phones``),
packet captures, SIPp, and the harnesses the tests, benchmarks and fuzzers share (the
in-memory flows, hostile messages, the fuzz kit).  Nothing in ``e2m_plugins``,
``kamailio_app`` or ``pjsua_hooks`` imports this package.
"""
