"""End-to-middle (E2M) security for SIP: the shared, sans-IO body-handling core.

Nothing in this package performs I/O on its own or imports Kamailio or pjsua2;
the adapters in ``kamailio_app`` and ``pjsua_hooks`` call into it.
"""

__version__ = "0.1.0"
