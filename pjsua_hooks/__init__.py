"""pjsua2 adapter: a raw pjsip message hook (ctypes), its gate, and a small endpoint.

- :mod:`pjsua_hooks.rawhook`: :class:`RawSipHook` hands every outgoing and
  incoming SIP message to Python as bytes and writes the result back.
- :mod:`pjsua_hooks.pjsip_abi`: the only module that knows struct offsets,
  with the run-time sanity checks.
- :mod:`pjsua_hooks.gate`: exact wheel, platform and a loopback self-test.
- :mod:`pjsua_hooks.endpoint`: the one pjsua2 Endpoint (main-thread event
  loop), transports, accounts, MESSAGE, calls, hold, hang-up, as events.

Importing this package does not import pjsua2; the submodules that need it do.
"""
