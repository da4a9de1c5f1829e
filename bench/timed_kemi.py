"""KEMI script for ``profile_proxy.py --live CONFIG --timed``: the proxy's own script
(``kamailio_app/kemi.py``, imported as a module), with the CPU time of chosen
functions counted in each Kamailio process.

py-spy samples show shares of whatever ran, and a worker waiting for the core it
shares with another sampled as busy; this counts each function's thread CPU time
(``time.thread_time``), so a worker's figures are its own however the core is
shared.  Each process writes its totals (function, calls, CPU µs, one row each) to
``$E2M_TIMING_DIR/timing-<pid>.tsv`` every 200 requests.  Each counted call costs
about a microsecond more: compare configurations timed alike, never with a run
that was not.  Never for production.
"""

from __future__ import annotations

import os
import sys
import time

from kamailio_app import kemi as _kemi
from kamailio_app.keycache_htable import HtableKeyCache, KsrHtable
from e2m_plugins.proxy import ProxyEngine

_DIR = os.environ.get("E2M_TIMING_DIR", "")
_TOTALS: dict[str, list] = {}     # label -> [calls, seconds]
_REQUESTS = [0]
_WRITE_EVERY = 200

# What the kekri/x25519 comparison of issue 17 needed; the request, reply and
# onreply routes are the whole of the script's work per message.
TIMED = {
    _kemi.kamailio: ("ksr_request_route", "ksr_reply_route", "ksr_onreply_route",
                     "inspect_request", "read_reply", "route_reply", "relay",
                     "route_in_dialog", "route_sanity", "record_route",
                     "moved_route_entries", "note_dialog_targets", "note_bye_way",
                     "end_answered_dialog"),
    ProxyEngine: ("inspect", "read_response", "_view", "_spend", "_keep_keys", "_fork",
                  "end_answered"),
    HtableKeyCache: ("put", "get", "drop_scope", "scope_life", "expire_within",
                     "_seal", "_unseal"),
    KsrHtable: ("get", "set", "remove", "lock", "unlock"),
}


# ``E2M_TIMED_FINE=1``: also the steps inside ``_view`` (the engine's own and the
# module functions it calls by name), to see where a body's time goes.
FINE_METHODS = {
    ProxyEngine: ("_read_body", "_first_sighting", "_labels", "_targets", "_sender_of",
                  "_keys_for", "_context", "_check_policy", "_seen", "answer_caller"),
    _kemi.kamailio: ("observe", "note_caller", "reply_with"),
    __import__("e2m_plugins.cms.recipients", fromlist=["Match"]).Match: ("unwrap",),
}
FINE_FUNCTIONS = {
    "e2m_plugins.proxy": ("open_part", "check_signed_by", "message_body", "top_parts",
                          "media_summary", "check_context", "refuse_hidden_parts",
                          "refuse_encoded_plaintext"),
    "e2m_plugins.body": ("open_message", "_inner_entity", "_context_of"),
    "e2m_plugins.layers": ("open_envelope", "verify_input", "load_cms_message",
                           "nested_cms"),
    "e2m_plugins.cmsinput": ("verify",),
    "e2m_plugins.cms.envelope": ("_parse", "match"),
    "e2m_plugins.cms.ciphers": ("decrypt_content",),
    "e2m_plugins.cms.signed": ("_parse", "_pool", "_verify_signer", "_find_signer_cert",
                               "signing_key", "_check_signature", "verify_chain",
                               "certificate_identities", "_time"),
    "kamailio_app.kemi": ("_read_message", "_remove_headers", "note_answer_key",
                          "_summary", "_info"),
}


def _write() -> None:
    path = os.path.join(_DIR, f"timing-{os.getpid()}.tsv")
    with open(path + ".tmp", "w") as out:
        for label, (calls, seconds) in sorted(_TOTALS.items()):
            out.write(f"{label}\t{calls}\t{seconds * 1e6:.0f}\n")
    os.replace(path + ".tmp", path)


def _timed(cls, name: str, label: str | None = None, by_caller: bool = False) -> None:
    raw = cls.__dict__[name]
    static = isinstance(raw, staticmethod)
    inner = getattr(cls, name)
    label = label or f"{cls.__name__}.{name}"
    counts_requests = cls is _kemi.kamailio and name == "ksr_request_route"

    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            total = _TOTALS.setdefault(
                f"{label}<{sys._getframe(1).f_code.co_name}" if by_caller else label, [0, 0.0])
            total[0] += 1
            total[1] += time.thread_time() - start
            if counts_requests:
                _REQUESTS[0] += 1
                if _DIR and _REQUESTS[0] % _WRITE_EVERY == 0:
                    _write()

    setattr(cls, name, staticmethod(timed) if static else timed)


def _timed_fine() -> None:
    import importlib
    for cls, names in FINE_METHODS.items():
        for name in names:
            _timed(cls, name)
    for module_name, names in FINE_FUNCTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            _timed(module, name, f"{module_name.rsplit('.', 1)[1]}.{name}")


def mod_init():
    fine = bool(os.environ.get("E2M_TIMED_FINE"))
    for cls, names in TIMED.items():
        for name in names:
            # fine: the key cache's calls apart by the function that made each
            _timed(cls, name, by_caller=fine and cls is HtableKeyCache)
    if fine:
        _timed_fine()
    return _kemi.mod_init()
