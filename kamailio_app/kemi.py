"""Kamailio KEMI routing script (app_python3, cfgengine "python") for e2m-proxy.

A thin adapter: it reads the message byte-exact, asks the E2M engine for a verdict,
applies it with KSR calls, and hands what was seen to the archive.  It never
changes a body and never logs one.  Each route method has one job:

  request:  flood limits -> sanity -> CANCEL | in-dialog (a certificate refresh of
            ours) | certificate SUBSCRIBE | [auth] -> certificate PUBLISH | REGISTER |
            OPTIONS to us | target -> inspect -> relay  (certificates: cert_route.py)
  reply:    (tm onreply) inspect -> archive -> forward (a response is never refused)
  failure:  (tm failure route: any negative end, tm's own 408 included) drop the keys
            the attempt kept
  xhttp:    the proxy certificate at its cert-url path
  rtimer:   the certificate service's NOTIFYs and sweeps (ksr_cert_timer)

Loaded by the cfg that ``e2m-proxy`` renders; the defines there say where the
project, the venv and PROXY.toml are (see kamailio_app/launcher.py).
"""

import base64
import hashlib
import ipaddress
import json
import math
import os
import re
import sys
import time
import traceback
from urllib.parse import quote

import KSR


def _define(name):
    value = KSR.kx.get_def(name)
    return value.strip('"') if isinstance(value, str) else None


def _bootstrap_path():
    # The venv must come before Debian's dist-packages (newer cryptography), and the
    # script's own folder must not shadow anything (app_python3 puts it first).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    extra = (_define("E2M_PYTHONPATH") or "").split(os.pathsep)
    for entry in reversed([e for e in extra if e]):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


_bootstrap_path()

from e2m_plugins.cms.budget import DEFAULT_PUBLIC_KEY_OPS  # noqa: E402
from e2m_plugins.challenge import (  # noqa: E402
    CHALLENGE_HEADERS, credentials_fit_request, names_realm)
from e2m_plugins.errors import E2MError, LimitExceededError, MalformedError  # noqa: E402
from e2m_plugins.grammar import retry_after_seconds, split_header_list  # noqa: E402
from e2m_plugins.headers import PROXY_BODY_POLICY, PROXY_REQUIRED_BODY  # noqa: E402
from e2m_plugins.keycache import bounded_keeper  # noqa: E402
from e2m_plugins.proxy import MAX_FORKS, Verdict, message_scope  # noqa: E402
from e2m_plugins.sip import (canonical_method, canonical_name, crlf_head, parse,  # noqa: E402
                             parse_address, rfc3261_branch, via_sent_by)
from e2m_plugins.uri import (canonical_ip, host_key, identity_of, is_sip_uri,  # noqa: E402
                             parse_uri, split_hostport)
from kamailio_app.archive import ArchiveError  # noqa: E402
from kamailio_app.bootstrap import (  # noqa: E402
    ProxyApp, as_utf8, public_dmq_warning, tls_next_hop_warning)
from kamailio_app.config import DEFAULT_EXPIRES, MAX_EXPIRES, MIN_EXPIRES  # noqa: E402
from kamailio_app.dialog_route import (MAX_ROUTE_ENTRIES, UNREAD_ROUTE_SET,  # noqa: E402
                                       UNROUTED_MARK, carries_a_token, dialog_ids,
                                       dialog_parties, double_rr_entry, route_entries,
                                       route_set_digest, routes_within_bounds,
                                       same_route_uri, written_as_ours)
from kamailio_app.dialog_targets import (DIALOG as _DIALOG_TARGET,  # noqa: E402
                                         TABLE as _TARGETS, UNANSWERED as _UNANSWERED_TARGET,
                                         caller_name as _caller_name, callers_tag,
                                         dialog_name as _dialog_name, digest as _digest,
                                         forget as _forget_targets, tag_digest,
                                         target_and_side as _target_and_side)
from kamailio_app.late_copies import (note_answer_key, remember_answer,  # noqa: E402
                                     remembered_answer)
from kamailio_app.dmq_bodies import htable_body_ok, node_list_ok, usrloc_body_ok  # noqa: E402
from kamailio_app.sync_gate import for_cluster  # noqa: E402
from kamailio_app.sources import SITE_SHARES, site_of, unmapped  # noqa: E402
from kamailio_app.htable_items import put_expiring  # noqa: E402
from kamailio_app.tcp_sweep import (AUTHENTICATED, SPOKE, TcpSweeper,  # noqa: E402
                                    list_connections, marked_lifetime)

APP = None            # ProxyApp, loaded in mod_init (main process, before fork)
SYNC_GATE = None      # [cluster] sync gate (kamailio_app/sync_gate.py), made in mod_init
_ITERATOR = "e2mhf"   # textopsx header iterator name
_PLAIN_FORWARD = Verdict("forward")
_BANS = "e2mban"      # htable: banned source addresses (cfg template, [limits])
_REPLY_READS = "e2mreplyreads"  # htable: replies read per branch of our transactions
# ... and, in the same item, the public-key operations they spent, in units of this
# (the item's value is operations * _OPS_UNIT + replies: no item of its own per branch)
_OPS_UNIT = 1 << 12
_OPS_LOGGED = "w:"    # ... and whether a drop past those was logged
# replies read per branch of a transaction: a 180, 183s and the 2xx with SDP, and the
# 2xx's retransmissions until the ACK (UDP, every 0.5 to 4 s for 32 s)
READS_PER_BRANCH = 16
READS_PER_TRANSACTION = READS_PER_BRANCH * MAX_FORKS  # forks whose answers are kept
# ... and the public-key operations those readings may spend: an honest reading spends
# about 3 (a decryption, a signature, its chain), so 16 fit a branch's 64 with room;
# each reading's budget is what is left of both (a message's 32 at most), so a
# transaction's replies spend at most 128 however their bodies are built (review 161
# K2: 64 readings of 32 each, 2,048 operations for one INVITE)
OPS_PER_BRANCH = 2 * DEFAULT_PUBLIC_KEY_OPS
OPS_PER_TRANSACTION = MAX_FORKS * DEFAULT_PUBLIC_KEY_OPS
# ... and one reading at most (reserved before it runs): an answer's split SDP spends
# about 8 (two decryptions, two signatures, two chains); four workers reading one branch
# at once fit its 64
REPLY_READING_OPS = OPS_PER_BRANCH // 4
_SITE_PIPE = "e2msite "     # pipelimit pipes: a site's messages per second (source_banned)
_MAX_OPEN_AOR = 256   # characters of an AoR an open registrar binds (real ones are short)
_REGS = "e2mregs"     # htable: AoRs each source registered while the registrar is open
_SLOT_SLACK = 10      # seconds a slot outlives its binding (the registrar's timer, ours)
_SLOT_LEFT = "$shtex(e2mregs=>$var(e2m_slot))"     # seconds a slot has left
# auth_db's auth_check: the credentials are good but belong to someone else
_AUTH_USER_MISMATCH = -8
# auth_check failed for itself (a database error, or credentials it already answered 400)
_AUTH_ERROR = -1
_AUTH_RETRY_AFTER = 5      # seconds a UA waits before trying again after that 500
_AUTH_STALE = (-4, -6)   # nonce expired, nonce (or its count) used before
_AUTH_FAILURES = {-2: "wrong password", -3: "unknown user", -4: "stale nonce",
                  -5: "no credentials of this kind", -6: "nonce used before",
                  _AUTH_USER_MISMATCH: "credentials of another user"}
_QOP_AUTH, _STALE = 1, 16  # auth_challenge flags
_COUNTED_REFUSALS = (400, 403, 495, 496)   # statistics: e2m_refused_<code>
# Who pays for a key an answer offers (ProxyEngine.answer_caller): set in the request
# route before t_relay (set after t_newtran it goes into the transaction's own list;
# set before, t_newtran takes it along), so tm brings it to the reply route.
_CALLER_AVP = "$avp(e2m_caller)"
# The names of the keys a request kept afresh (Verdict.kept, hex, comma-separated), the
# same way: its failure route drops those and no other (ProxyEngine.end_attempt).
_KEPT_AVP = "$avp(e2m_kept)"
# Whom the request was sent to, the same way: the Request-URI as received, or the next
# hop of a Route set past us it followed.  The archive names an answer's sender by it,
# not by the answer's own To nor the request's, which whoever writes them chooses
# (reviews 32 and 33); and where it went ($avp(e2m_sent_to), ``sent_to``).
_CALLEE_AVP = "$avp(e2m_callee)"
_SENT_TO_AVP = "$avp(e2m_sent_to)"
# Set by tm's reply route on a 401/407 from downstream that names our own realm: the
# failure route answers 502 instead of relaying it (``own_realm_challenge``).
_OWN_CHALLENGE_AVP = "$avp(e2m_own_challenge)"
# Set in the request route on a BYE that goes the dialog's way (``note_bye_way``): the
# rest of its Route the other party's side of the dialog's route set, its next hop
# what loose_route chose.  tm brings it to the reply route, where a 2xx ends the
# dialog's keys only with it (``end_answered_dialog``; review 96).
_BYE_WAY_AVP = "$avp(e2m_bye_way)"
# An INVITE's transaction wrote its caller's target note: only then may its failure
# remove it (another INVITE under the same Call-ID and tag must not take it; stop 41)
_TARGET_MINE_AVP = "$avp(e2m_target_mine)"
# A front's fr_timer: the nodes' (5 s, templates/kamailio.cfg.tmpl) and a margin, so that
# a node that is up always answers first, if only with its own 408 (``failover``).
_FRONT_FR_TIMER_MS = 7000
# The DMQ peers the cfg loads: dmq's own, htable's, dmq_usrloc's (``kdmq_body_ok``)
_DMQ_TARGETS = ("notification_peer", "htable", "usrloc")


def mod_init():
    global APP, SYNC_GATE
    path = _define("E2M_CONFIG") or os.environ.get("E2M_PROXY_CONFIG")
    if not path:
        raise RuntimeError("E2M_CONFIG define (or E2M_PROXY_CONFIG) is not set")
    APP = ProxyApp.load(path, KSR)
    APP.dmq_sources()     # [cluster] peers resolved once, before the workers fork
    APP.dmq_socket()      # and this node's own DMQ socket
    SYNC_GATE = for_cluster(KSR, APP.config.cluster, APP.dmq_sources())
    for warning in (public_dmq_warning(APP.config.cluster),
                    tls_next_hop_warning(APP.config.kamailio)):
        if warning:
            _warn(warning + "\n")
    mode = "E2M proxy for %s" % APP.engine.host if APP.e2m else "plain routing proxy"
    _info("e2m: %s; python %s; config %s\n" % (mode, sys.version.split()[0], path))
    return kamailio()


# -- helpers -------------------------------------------------------------------

def _where(exc):
    # File, line and function only: an exception's message or locals may quote a body.
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return " <- ".join("%s:%d %s" % (os.path.basename(f.filename), f.lineno, f.name)
                       for f in reversed(frames))


# Log lines name what a message held (an error's text, a URI): octets that are not
# UTF-8 make app_python3's str conversion raise, and the route would stop there.
def _info(line):
    KSR.info(as_utf8(line))


def _warn(line):
    KSR.warn(as_utf8(line))


def _err(line):
    KSR.err(as_utf8(line))


def _log_exception(where, exc):
    detail = ": %s" % exc if isinstance(exc, (E2MError, ArchiveError)) else ""
    _err("e2m: %s failed: %s%s at %s\n" % (where, type(exc).__name__, detail, _where(exc)))


# Kamailio's transformations work in one 64 KiB buffer: base64 of the whole message
# fits up to 49,149 octets (65,532 characters).  A longer one is read in slices whose
# base64 fits; offset and length are $var()s, so the PV spec string is always the same
# (each distinct spec string would stay in Kamailio's PV cache for good).  {s.substr}
# copies its slice with strncpy, so every octet after a NUL comes back as zero: what
# the slices give is compared with Kamailio's own SHA-256 of the message ({s.sha256}
# hashes its length, NULs and all), and a message that does not match is refused, never
# read as something else (review 103: the engine archived a decoy and zeros while bob
# got the real text).  So a message past 49,149 octets with a NUL in it (a binary
# body) cannot be read at all: 413 Request Entity Too Large.
_WHOLE_MAX = 49149
_SLICE = 32 * 1024
_WHOLE = "$(mb{s.encode.base64})"
_PIECE = "$(mb{s.substr,$var(e2m_off),$var(e2m_len)}{s.encode.base64})"
_MESSAGE_SHA256 = "$(mb{s.sha256})"


def _read_message():
    """The message as received, byte-exact ($mb through base64: bodies may be binary).
    Octets past the Content-Length body are refused, not dropped: tm relays a reply's
    datagram whole, and a stock UA takes them for the body the archive never saw
    (review 69; a request's are answered 400 by the sanity check before this)."""
    return parse(_message_octets(), exact=True)


# The last message read whole in this process: (its id, length and Call-ID, its
# octets).  The door's framing check and the engine read the same message; it is read
# once.  The Call-ID too: tm's faked request in a failure route takes an id of its own
# choosing (review 105), which must not serve another message's octets.
_LAST_READ = [None, b""]


def _message_octets():
    """The whole message, byte-exact; MalformedError when it cannot be read so (not all
    of it came, or not as Kamailio holds it: a NUL in a long one, see above)."""
    try:
        mark = (KSR.pv.get("$mi"), KSR.pv.get("$ml"), KSR.pv.get("$ci"))
    except UnicodeDecodeError:            # a Call-ID that is not UTF-8: read, not kept
        mark = (None, KSR.pv.get("$ml"), None)
    if mark[0] is not None and _LAST_READ[0] == mark:
        return _LAST_READ[1]
    total = int(mark[1] or 0)
    if total <= _WHOLE_MAX:
        raw = base64.b64decode(KSR.pv.get(_WHOLE) or "")
    else:
        pieces = []
        for offset in range(0, total, _SLICE):
            KSR.pv.seti("$var(e2m_off)", offset)
            KSR.pv.seti("$var(e2m_len)", min(_SLICE, total - offset))
            pieces.append(base64.b64decode(KSR.pv.get(_PIECE) or ""))
        raw = b"".join(pieces)
        held = (KSR.pv.get(_MESSAGE_SHA256) or "").lower()
        if not held or hashlib.sha256(raw).hexdigest() != held:
            # too large for what can be read byte-exact: 413, as the core's own bounds
            raise LimitExceededError("message past %d octets with a NUL in it cannot be "
                                     "read as received" % _WHOLE_MAX)
    if len(raw) != total:
        raise MalformedError("message could not be read whole")
    _LAST_READ[:] = [mark, raw]
    return raw


def _request_kept() -> list[bytes]:
    """The names of the keys the transaction's request kept afresh (``$avp(e2m_kept)``,
    set by ``inspect_request`` only)."""
    kept = KSR.pv.get(_KEPT_AVP)
    if not kept:
        return []
    try:
        return [bytes.fromhex(name) for name in kept.split(",")]
    except ValueError:
        return []


def _answer_anyway(code, reason):
    """Statefully where a transaction is, else statelessly: sl's send_reply once took a
    worker's transaction state for one and failed, leaving the request unanswered
    (review 23's BYE, under load)."""
    if KSR.sl.send_reply(code, reason) < 0:
        KSR.sl.sl_send_reply(code, reason)


def _slot_name(source, index):
    return "%s#%d" % (source, index)


def _has_body():
    # $bs is the body as parsed, not the Content-Length header: over UDP a message
    # may leave Content-Length out and still carry a body (RFC 3261 §20.14).
    return int(KSR.pv.get("$bs") or 0) > 0


def _header_line(name, value):
    if any(ch in name + value for ch in "\r\n\x00"):
        raise ValueError("header from the engine contains CR, LF or NUL")
    return "%s: %s\r\n" % (name, value)


def _normal(value):
    return " ".join(value.split())


# The headers the engine removes (its own label, policies in its name), read by name
# when every instance goes: a fixed set of PV spec strings (each stays in Kamailio's
# PV cache), instances beyond _BY_NAME_MAX are left to the iterator.
# Route header values read by index: a fixed set of PV spec strings (Kamailio keeps
# each distinct one for good); a real route set has one or two headers.
_ROUTE_SPECS = ["$(hdr(Route)[%d])" % i for i in range(MAX_ROUTE_ENTRIES)]
_RECORD_ROUTE_SPECS = ["$(hdr(Record-Route)[%d])" % i for i in range(MAX_ROUTE_ENTRIES)]
_VIA_SPECS = ["$(hdr(Via)[0])", "$(hdr(Via)[1])"]
_BY_NAME_MAX = 4
_BY_NAME = {canonical_name(n): (n, "$hdrc(%s)" % n, ["$(hdr(%s)[%d])" % (n, i)
                                                     for i in range(_BY_NAME_MAX)])
            for n in (PROXY_REQUIRED_BODY, PROXY_BODY_POLICY)}


# Headers SIP allows once (as sip._SINGLE_HEADERS): Kamailio counts them by type, compact
# forms too.  A reply with two is dropped as Kamailio drops such a request: the core
# reads the first copy, a stock UA (pjsip) the last, so it would be relayed unread,
# its body unarchived (review 57).
_SINGLE_COUNTS = tuple("$hdrc(%s)" % n for n in ("From", "To", "Call-ID", "CSeq"))
# Identity headers a UA may believe of its proxy (RFC 3325, and the older Remote-Party-ID):
# only a [limits] trusted peer may bring them; a user's are its own word (review 57).
_ASSERTED_IDENTITY = ("P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID")


def _names_this_proxy(uri):
    """A SIP URI without a user whose host and port are this proxy's (Kamailio's
    myself check: listen addresses and aliases)."""
    try:
        parsed = parse_uri(uri)
    except E2MError:
        return False
    return parsed.user is None and KSR.is_myself(uri) > 0


def _repeats_a_single_header():
    return any((KSR.pv.get(spec) or 0) > 1 for spec in _SINGLE_COUNTS)


_MAX_CONTACTS_READ = 16     # Contact headers and entries read; more: the longest lifetime
_CONTACT_SPECS = ["$(hdr(Contact)[%d])" % i for i in range(_MAX_CONTACTS_READ)]
_EMPTY_EXPIRES = re.compile(r";[ \t]*expires[ \t]*=[ \t]*(?=;|$)", re.IGNORECASE)


def _register_contacts():
    """The REGISTER's Contact entries as written (``*`` among them when sent); None
    when there are none or more than ``_MAX_CONTACTS_READ``.  Raises E2MError."""
    count = KSR.pv.get("$hdrc(Contact)") or 0
    if count == 0 or count > _MAX_CONTACTS_READ:
        return None
    contacts = [item for i in range(count)
                for item in split_header_list(KSR.pv.get(_CONTACT_SPECS[i]) or "")]
    if not contacts or len(contacts) > _MAX_CONTACTS_READ:
        return None
    return contacts


def _names_us(host, port):
    """Whether ``host``:``port`` (an address or a name, as written) is one of this
    proxy's sockets or aliases (Kamailio's own ``check_self``, any transport).  The
    port is always given: without one, ``check_self`` takes any port."""
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return KSR.is_myself("sip:%s:%d" % (host, port)) > 0


def _contact_naming_us():
    """The first Contact of this REGISTER that names this proxy (its address, an alias,
    the front: ``_names_us``; port 5060, or 5061 for sips or TLS, when it gives none)
    or a node's DMQ socket, or None.  Such a binding relays every request for the AoR
    back to us, Max-Forwards times, each pass from our own address, which pike does not
    count (reviews 107, 109).  Entries the core cannot read are left to the registrar;
    the cfg's onsend_route stops a loop whatever the spelling (a request to our own
    SIP sockets is never sent)."""
    try:
        contacts = _register_contacts() or []
    except E2MError:
        return None
    for item in contacts:
        if item == "*":
            continue
        try:
            uri = parse_uri(parse_address(item).uri)
        except E2MError:
            continue
        tls = uri.scheme == "sips" or (uri.params.get("transport") or "").lower() == "tls"
        port = uri.port or (5061 if tls else 5060)
        if _names_us(uri.host, port) or (canonical_ip(uri.host), port) in _dmq_places():
            return item
    return None


def _dmq_places():
    """Every node's DMQ socket, ours and the peers': no SIP request goes there, so no
    binding may name one (review 109: a binding at one node naming another's DMQ socket
    looped there)."""
    if not APP.replicates:
        return frozenset()
    return APP.dmq_socket() | APP.dmq_sources()


def _faces_the_caller(uri, config):
    """Whether ``uri``, the entry this transaction wrote nearest the caller (with
    double Record-Route the other one faces the callee; in a spiral another pass wrote
    the lower ones: ``callers_side_entry``), names the socket the request came in
    on, transport included: the caller's in-dialog requests go where it says.
    ``is_myself`` takes any of our sockets, so the callee moved it to another one (a
    second listener, a DMQ socket, review 109), and the reply's own socket, which an
    earlier check also took, is his to choose; a hop on his leg moved a TLS caller's
    entry to our UDP socket, her digest then crossed in clear (review 111).  The front,
    the advertised address and any name (a domain) stand for every node and are left
    to ``is_myself``; so is a stray reply (no transaction to say which socket: a known
    limit)."""
    try:
        parsed = parse_uri(uri)
    except E2MError:
        return False
    host = canonical_ip(parsed.host)
    if host is None:
        return True
    transport = (parsed.params.get("transport") or "udp").lower()
    if parsed.scheme == "sips":
        transport = "tls"
    port = parsed.port or (5061 if transport == "tls" else 5060)
    if any(host == shared and (shared_port is None or port == shared_port)
           for shared, shared_port in _cluster_places(config)):
        return True
    if KSR.tm.t_check_trans() <= 0:
        return True
    came_in = (canonical_ip(KSR.pv.get("$T_req($Ri)") or ""), KSR.pv.get("$T_req($Rp)"),
               (KSR.pv.get("$T_req($pr)") or "").lower())
    return (host, port, transport) == came_in


def _cluster_places(config):
    """The cluster's shared address as our entries name it: ``[cluster] front`` or
    ``advertise`` (canonical address, port or None for any), when an address."""
    cluster = getattr(config, "cluster", None)
    places = []
    for value in (getattr(cluster, "front", None), getattr(cluster, "advertise", None)):
        if not value:
            continue
        try:
            host, port = split_hostport(value)
        except E2MError:
            continue
        ip = canonical_ip(host)
        if ip is not None:
            places.append((ip, port))
    return places


def _asked_lifetime():
    """Seconds the registrar will keep what this REGISTER binds, read as it reads them:
    0 for no Contact (a query), a ``*`` (a removal of all, or a request it refuses) or
    contacts whose every expiry is 0; else the longest of the contacts' own
    ``expires`` (an empty one, as a missing one, gives the Expires header, else the
    default), within the registrar's bounds.  What cannot be read (more than 16
    contacts, bad syntax, an expiry that is no number) gets the longest: fail closed."""
    count = KSR.pv.get("$hdrc(Contact)") or 0
    if count == 0:
        return 0
    header = (KSR.pv.get("$hdr(Expires)") or "").strip() or str(DEFAULT_EXPIRES)
    try:
        contacts = _register_contacts()
        if contacts is None:
            return MAX_EXPIRES
        if "*" in contacts:
            return 0
        # an empty ``expires=`` is no expiry to Kamailio (the header's then); the core
        # would refuse the parameter (review 82)
        asked = [parse_address(_EMPTY_EXPIRES.sub("", item)).params.get("expires") or header
                 for item in contacts]
    except E2MError:
        return MAX_EXPIRES
    if any(not value.isdigit() or len(value) > 10 for value in asked):
        return MAX_EXPIRES
    seconds = max(int(value) for value in asked)
    return 0 if seconds == 0 else min(max(seconds, MIN_EXPIRES), MAX_EXPIRES)


_SAVE_NO_REPLY = 2             # registrar save() flag: the script sends the reply
_UNSETTLED = 32                # a front's claim before the node's 2xx: 64*T1, a transaction
_ULC_PROFILE = "e2mreg"
_ULC_COUNT = "$ulc(e2mreg=>count)"
_ULC_EXPIRES = ["$(ulc(e2mreg=>expires)[%d])" % i for i in range(_MAX_CONTACTS_READ)]


def _bound_seconds():
    """After ``save``: seconds the longest binding of the REGISTER's AoR has left in
    usrloc (0: none); ``MAX_EXPIRES`` when it cannot be read (fail closed)."""
    found = KSR.registrar.reg_fetch_contacts("location", KSR.pv.get("$tu") or "",
                                             _ULC_PROFILE)
    if found == -1:
        return 0                               # the AoR is not in usrloc
    if found < 0:
        return MAX_EXPIRES
    try:
        count = KSR.pv.get(_ULC_COUNT) or 0
        if count > len(_ULC_EXPIRES):
            return MAX_EXPIRES
        ends = [KSR.pv.get(_ULC_EXPIRES[i]) or 0 for i in range(count)]
    finally:
        KSR.registrar.reg_free_contacts(_ULC_PROFILE)
    return _within_expires(max([end - int(time.time()) for end in ends], default=0))


def _replied_seconds():
    """On a front, from a node's 2xx to a REGISTER: the longest ``expires`` its Contacts
    list (the registrar lists every binding of the AoR; none: 0); ``MAX_EXPIRES`` when
    they cannot be read (fail closed)."""
    count = KSR.pv.get("$hdrc(Contact)") or 0
    if count == 0:
        return 0
    if count > _MAX_CONTACTS_READ:
        return MAX_EXPIRES
    try:
        values = [parse_address(item).params.get("expires") for i in range(count)
                  for item in split_header_list(KSR.pv.get(_CONTACT_SPECS[i]) or "")]
    except E2MError:
        return MAX_EXPIRES
    if not values or len(values) > _MAX_CONTACTS_READ or \
            any(not value or not value.isdigit() or len(value) > 10 for value in values):
        return MAX_EXPIRES
    return _within_expires(max(int(value) for value in values))


def _within_expires(seconds):
    return min(max(seconds, 0), MAX_EXPIRES)


def _cseq_method():
    """A reply's CSeq method as tm and a UA's stack match it, in any case: one written
    ``invite`` answers the INVITE all the same, and a check for "INVITE" alone skipped
    the Record-Route check of such a 2xx (review 116).  (A request's method is in
    capitals: the door refuses any other.)"""
    return (KSR.pv.get("$rm") or "").upper()


def _top_via():
    """The request's top Via entry as it reached us (None: unreadable)."""
    try:
        entries = split_header_list(KSR.pv.get("$(hdr(Via)[0])") or "")
    except (E2MError, UnicodeDecodeError):
        return None
    return entries[0] if entries else None


def _via_below_ours():
    """In a reply, the Via entry below ours: its request's top Via as it reached us."""
    try:
        count = int(KSR.pv.get("$hdrc(Via)") or 0)
        entries = []
        for i in range(min(count, 2)):
            entries += split_header_list(KSR.pv.get(_VIA_SPECS[i]) or "")
            if len(entries) >= 2:
                return entries[1]
    except (E2MError, UnicodeDecodeError):
        return None
    return None


def _dialog_parties():
    """The From and To AoRs of this message as a route token binds them
    (``dialog_route.dialog_parties``); None when unreadable (no token fits)."""
    try:
        return dialog_parties(KSR.pv.get("$fu"), KSR.pv.get("$tu"))
    except UnicodeDecodeError:
        return None


def _callers_side():
    """The Record-Route this request reached us with (the caller's side of the route
    set our entry goes on top of); None when it is longer than we read, or unreadable."""
    try:
        count = int(KSR.pv.get("$hdrc(Record-Route)") or 0)
        if count > len(_RECORD_ROUTE_SPECS):
            return None
        return [KSR.pv.get(_RECORD_ROUTE_SPECS[i]) or "" for i in range(count)]
    except UnicodeDecodeError:
        return None


def _header_entries(name, specs):
    """The entries of every ``name`` header of the message, in order; None when they
    are more than ``specs`` reads, not UTF-8, or past ``routes_within_bounds``."""
    try:
        count = int(KSR.pv.get("$hdrc(%s)" % name) or 0)
        if count > len(specs):
            return None
        return route_entries([KSR.pv.get(specs[i]) or "" for i in range(count)])
    except (UnicodeDecodeError, ValueError):
        return None


def _target(value, *, contact=True):
    """A remote target as a BYE's Request-URI must name it: the first Contact's URI
    (``contact``), else a Request-URI, by scheme, user, host and port, as a digest; None
    when it cannot be read."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        text = value.strip()
        if contact:
            # as a stack reads it: a quoted display name may hold "<" and ">" (review 96)
            text = parse_address(split_header_list(text)[0]).uri
        uri = parse_uri(text)
    except (E2MError, ValueError, IndexError):
        return None
    return _digest("%s:%s@%s:%s" % (uri.scheme.lower(), uri.user or "", host_key(uri.host),
                                    uri.port or ""))


def _targets_life(app, call_id, caller, callee):
    """Seconds a dialog's targets are kept: as long as the keys the engine holds for it
    (``ProxyEngine.dialog_keys_life``: a later fork's keys live 200 s, and the table's
    own expiry of their record tells the key cache nothing, review 104), never past
    ``[kamailio] keycache_expire`` or 12 h; None when it holds none (nothing for a BYE to
    end).  The key cache's ``gone`` takes them sooner when the keys go sooner
    (dialog_targets.py).  An engine that cannot tell is taken to hold some for ever."""
    engine = app.engine
    life = getattr(engine, "dialog_keys_life", None)
    if life is not None:
        left = life(call_id, caller, callee)
    else:
        holds = getattr(engine, "holds_dialog_keys", None)
        left = math.inf if holds is None or holds(call_id, caller, callee) else None
    if left is None:
        return None
    config = getattr(app, "config", None)
    most = _DIALOG_TARGET if config is None else \
        min(_DIALOG_TARGET, int(config.kamailio.keycache_expire))
    return max(1, math.ceil(min(most, left)))


def _dialog_peer(call_id, from_tag, to_tag):
    """(dialog name, caller's tag, the remote target and route-set side of the
    party a request with these tags goes to) as e2mtargets holds them; None when
    the dialog's targets were not noted."""
    name = _dialog_name(call_id, from_tag, to_tag)
    held = KSR.htable.sht_get(_TARGETS, name)
    parts = held.split("|") if isinstance(held, str) else []
    if len(parts) != 2:
        return None
    callee_part = parts[1]
    caller = callers_tag(held, from_tag, to_tag)
    from_callee = caller == to_tag
    held = KSR.htable.sht_get(_TARGETS, _caller_name(call_id, caller))
    caller_part = held.split("|")[0] if isinstance(held, str) else None
    return name, caller, _target_and_side(caller_part if from_callee else callee_part)


_BRANCHES = "e2mbranch"
_INVITE_BRANCHES = "e2minvbranch"    # an INVITE's: it may ring up to max_inv_lifetime
_UNREAD = object()


def _branch_note():
    """This request's branch note: (a digest of its top Via branch, one of its Call-ID,
    CSeq and method, the htable: e2mbranch, or e2minvbranch for an INVITE, whose
    transaction may ring up to tm's max_inv_lifetime and whose branch must be held
    that long: review 118 found an INVITE ringing past the note's 64 s), or None for
    a branch that is not RFC 3261's (an RFC 2543 peer's need not be unique).  The branch is the one tm files the request under
    (``$via0(branch)``: a Via's last ``branch`` parameter, which pjsip takes too),
    compared as a UA's stack compares it (``rfc3261_branch``).  Digests, so a long
    branch costs no more."""
    branch = rfc3261_branch(KSR.pv.get("$via0(branch)"))
    if branch is None:
        return None
    key = hashlib.sha256(branch.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    method = KSR.pv.get("$rm") or ""
    request = "\n".join((KSR.pv.get("$ci") or "", str(KSR.pv.get("$cs") or ""), method))
    return key, hashlib.sha256(request.encode("utf-8", "surrogateescape")).hexdigest()[:32], \
        _INVITE_BRANCHES if method == "INVITE" else _BRANCHES


def _branch_taken(note):
    """Whether another request (Call-ID, CSeq or method) that this proxy relayed lately
    (64 s; an INVITE 222 s) came with this request's top Via branch (``note``:
    ``_branch_note``)."""
    if note is None:
        return False
    for table in (_BRANCHES, _INVITE_BRANCHES):
        held = KSR.htable.sht_get(table, note[0])
        if held is not None and held != note[1]:
            return True
    return False


def _note_branch(note):
    """Note a request's branch as it is relayed: only then, so a request answered here
    (a 404, a challenge) keeps nothing.  Noted at the door, every stranger's
    request did, and many addresses each under pike's rate filled shared memory: an
    honest MESSAGE then got 500 (review 117)."""
    if note is not None:
        KSR.htable.sht_sets(note[2], note[0], note[1])


_RELAYED = "e2mloop"
_VIA_LINE_SPECS = ["$(hdr(Via)[%d])" % i for i in range(MAX_ROUTE_ENTRIES)]


def _relay_key(with_route=True):
    """What makes this request the same request if it comes back: a digest of its
    Request-URI as received, From and To tags, Call-ID, CSeq, method and Route (RFC
    3261 16.6 step 8 without the Via, which each pass brings another of on top; a
    spiral comes back with another Request-URI or Route).  Without ``with_route``: the
    same but the Route, which each pass of a loose-routed request spells shorter (an
    in-dialog ACK's).  None when unreadable (the door's checks refused such a request
    before any relay)."""
    try:
        routes = _header_entries("Route", _ROUTE_SPECS) if with_route else ()
        fields = (KSR.pv.get("$ou") or "", KSR.pv.get("$ft") or "",
                  KSR.pv.get("$tt") or "", KSR.pv.get("$ci") or "",
                  str(KSR.pv.get("$cs") or ""), KSR.pv.get("$rm") or "")
    except UnicodeDecodeError:
        return None
    request = "\n".join(fields + ("\x00",) + tuple(routes if routes is not None else ("?",)))
    return hashlib.sha256(request.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _loop_check(with_route=True):
    """(key, note, resent, looped) for this request, as ``relay`` and an in-dialog ACK
    ask them: its ``_relay_key``, the e2mloop note under it (``_loop_note``), whether it
    is its first coming sent again (``_resent``), and whether it came back round a loop
    (``_came_back``)."""
    key = _relay_key(with_route)
    held = None if key is None else KSR.htable.sht_get(_RELAYED, key)
    note = _loop_note(held)
    resent = note is not None and _resent(note)
    return key, note, resent, held is not None and _came_back(note, resent)


def _loop_note(held):
    """An e2mloop note (``_note_relayed``) as (first Max-Forwards, times relayed again,
    the first coming's Via shape or None, times it came again as itself, when it last
    came in ms); None for no note or one that is not ours (a note of stop 40, without
    the last two, counts none and came long ago)."""
    if not isinstance(held, str):
        return None
    parts = held.split(" ")
    if len(parts) == 3:
        parts += ["0", "0"]
    if len(parts) != 5 or not all(parts[i].isdigit() for i in (0, 1, 3, 4)):
        return None
    return (int(parts[0]), int(parts[1]), (None if parts[2] == "-" else parts[2]),
            int(parts[3]), int(parts[4]))


def _reading_left():
    """This reply, one the engine must read in one of our transactions, is within
    ``READS_PER_BRANCH`` of its branch and ``READS_PER_TRANSACTION`` of its transaction
    (counted in e2mreplyreads).  Both are named by what tm matched (the transaction's
    hash index and label, set by t_check_trans, and the branch's index), never by the
    Via as received: tm reads the branch's numbers out of it, so many spellings match
    one branch, and each spelling was a count of its own and an item holding the
    sender's string (review 155).  The transaction's count because the callee decides
    how many branches there are: ten contacts made one INVITE ten branches of 16 reads
    each (review 156).  The first one past a cap is logged and every one counted
    (``e2m_replies_unread``).  Returns the (branch, transaction) keys and the public-key
    operations this reading may spend, reserved (``_settle_reply_ops`` gives back what
    it does not), or None when the reply is dropped unread."""
    transaction = "%s:%s" % (KSR.pv.get("$T(id_index)"), KSR.pv.get("$T(id_label)"))
    branch = "%s:%s" % (transaction, KSR.pv.get("$T_branch_idx"))
    # the transaction counts only what its branch's cap let through: a branch's dropped
    # replies spent the others' reads (review 157 K1)
    for key, cap in ((branch, READS_PER_BRANCH), (transaction, READS_PER_TRANSACTION)):
        count = KSR.htable.sht_inc(_REPLY_READS, key)
        count = count % _OPS_UNIT if count > 0 else count
        if not 0 < count <= cap:
            _unread(count, cap, "one branch" if key is branch else "one transaction")
            return None
    # what they spent: this reading may spend what both have left, REPLY_READING_OPS at
    # most, reserved before it runs (two workers reading at once each saw the budget
    # unspent: review 163 K1) and what it did not spend given back after
    granted = _reserve_ops(branch, OPS_PER_BRANCH, REPLY_READING_OPS)
    if granted:
        took = _reserve_ops(transaction, OPS_PER_TRANSACTION, granted)
        if took < granted:
            _add_ops(branch, took - granted)
        granted = took
        key, cap = transaction, OPS_PER_TRANSACTION
    else:
        key, cap = branch, OPS_PER_BRANCH
    if not granted:
        # logged once per branch or transaction (the caps above bound the rest)
        first = KSR.htable.sht_inc(_REPLY_READS, _OPS_LOGGED + key) == 1
        _unread(cap, cap, "public-key operations of one %s"
                % ("branch" if key is branch else "transaction"), ops=first)
        return None
    return (branch, transaction), granted


def _reserve_ops(key, cap, wanted):
    """Take up to ``wanted`` of the public-key operations ``key`` has left under ``cap``
    (read and written under the item's lock, which holds off the other workers'
    ``sht_inc`` of its count too; one item at a time: two items locked at once by two
    workers in the other order would wait on each other); how many."""
    KSR.htable.sht_lock(_REPLY_READS, key)
    try:
        value = KSR.htable.sht_get(_REPLY_READS, key)
        value = value if isinstance(value, int) and value > 0 else 0
        granted = max(0, min(wanted, cap - value // _OPS_UNIT))
        if granted:
            KSR.htable.sht_seti(_REPLY_READS, key, value + granted * _OPS_UNIT)
        return granted
    finally:
        KSR.htable.sht_unlock(_REPLY_READS, key)


def _add_ops(key, count):
    """Add ``count`` (negative: give back) to the operations ``key`` spent."""
    if not count:
        return
    KSR.htable.sht_lock(_REPLY_READS, key)
    try:
        value = KSR.htable.sht_get(_REPLY_READS, key)
        value = value if isinstance(value, int) and value > 0 else 0
        ops = max(0, value // _OPS_UNIT + int(count))
        KSR.htable.sht_seti(_REPLY_READS, key, ops * _OPS_UNIT + value % _OPS_UNIT)
    finally:
        KSR.htable.sht_unlock(_REPLY_READS, key)


def _settle_reply_ops(keys, granted, spent):
    """A reading reserved ``granted`` operations for a branch and its transaction
    (``keys``) and spent ``spent``: the rest goes back to both."""
    for key in keys:
        _add_ops(key, min(spent, granted) - granted)


def _unread(count, cap, where, ops=False):
    """A reply dropped unread past ``cap`` on ``where``: counted, and the first one past
    the cap (or a count the htable could not give) logged; past a cap of operations,
    the first one (``ops``: the caller knows which)."""
    KSR.statistics.update_stat("e2m_replies_unread", 1)
    if ops:
        _warn("e2m: %s %s from %s: %d of %d %s spent: dropped unread, and the rest\n"
              % (KSR.pv.get("$rs"), _cseq_method(), KSR.pv.get("$si"), count, cap, where))
    elif count == cap + 1 or count < 0:
        _warn("e2m: %s %s from %s: more than %d replies to read on %s, or no count (%d):"
              " dropped unread, and the rest past the cap\n"
              % (KSR.pv.get("$rs"), _cseq_method(), KSR.pv.get("$si"), cap, where, count))


def _now_ms():
    return int(time.time() * 1000)


def _via_shape():
    """How many Via entries the request carries and its bottom one (the sender's), as a
    digest: what a retransmission of the first coming brings again, through a stateful
    hop too (a hop's Via on top has another branch for each transaction, the count and
    the bottom entry do not); a loop adds Vias, or, hiding them, brings its own bottom
    entry.  None when the Vias cannot be read whole."""
    try:
        count = int(KSR.pv.get("$hdrc(Via)") or 0)
        if not 0 < count <= len(_VIA_LINE_SPECS):
            return None
        entries = []
        for spec in _VIA_LINE_SPECS[:count]:
            entries += split_header_list(KSR.pv.get(spec) or "")
    except (E2MError, UnicodeDecodeError, ValueError):
        return None
    if not entries:
        return None
    # received and rport are what the first hop saw: a caller's NAT may give its
    # retransmission another port (review 123), the sender's own words stay
    bottom = ";".join(param for param in entries[-1].strip().split(";")
                      if param.split("=", 1)[0].strip().lower() not in ("received", "rport"))
    shape = "%d\n%s" % (len(entries), bottom)
    return hashlib.sha256(shape.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _resent(note):
    """The request is its first coming sent again (an RFC 3261 retransmission that
    came after tm's transaction for it ended, about 5 s after its answer): the same
    Max-Forwards and the same Via shape, and no Via of ours below the top one (a
    cluster's front, one of our names, adds its own on top).  Such a copy is no pass
    round a loop: three comings of a caller whose answers were lost were taken for one
    (review 119).  Copies forked round a loop have the shape of each other, but carry
    our Via below the hop's (review 114's forks).  A hop that keeps the caller's Via,
    hides ours and writes Max-Forwards afresh makes every pass look so, and looped one
    datagram without end (review 123): so a copy is taken for one sent again only
    ``_RESEND_GAP_MS`` after the last coming (RFC 3261 retransmissions are T1, 500 ms,
    apart at least; past tm's transaction, 4 s), and at most ``_MAX_RESENDS`` times (a
    caller sends a handful in the note's 32 s)."""
    first, _, shape, resends, last = note
    return shape is not None and resends < _MAX_RESENDS \
        and _now_ms() - last >= _RESEND_GAP_MS and _max_forwards() == first \
        and _via_shape() == shape and not _carries_our_via(below_top=True)


def _came_back(note, resent):
    """Whether a request this proxy relayed in the last 32 s (``note``: its e2mloop
    note, ``_loop_note``; None when there is none readable) has gone round and come
    back: it carries a Via of ours (RFC 3261 16.3 step 4), or a lower Max-Forwards than
    it first came with (a hop that hides the Via stack, as topology hiding does, still
    counts it down: review 114), or it was relayed ``_MAX_PASSES`` times already (a hop
    that also writes Max-Forwards afresh looped it until shared memory ran out: review
    116).  Two registrars whose bindings name each other (two proxies, or a cluster's
    nodes) sent one stranger's MESSAGE round Max-Forwards times (review 112).  The
    first coming sent again (``resent``) is none of these: through a cluster's front,
    whose address is one of ours, its front's Via made the second such copy a loop
    (review 119).  A copy sent again from outside (a replay) has neither Via nor lower
    count: the engine's replay check answers it, as before."""
    if note is None:
        return _carries_our_via()
    if resent:
        return False
    first, passes = note[0], note[1]
    now = _max_forwards()
    return passes + 1 >= _MAX_PASSES or (now is not None and now < first) or _carries_our_via()


def _note_relayed(key, note, resent):
    """Note the request of ``key`` as relayed once more: the Max-Forwards it first came
    with (``_NO_MAX_FORWARDS`` without one: any that comes back is lower), the times it
    was relayed again, its Via shape, the times its first coming came again, and now."""
    if note is None:
        now = _max_forwards()
        KSR.htable.sht_sets(_RELAYED, key, "%d 0 %s 0 %d" % (
            _NO_MAX_FORWARDS if now is None else now, _via_shape() or "-", _now_ms()))
        return
    first, passes, shape, resends, _ = note
    if resent:
        resends += 1
    else:
        passes += 1
    KSR.htable.sht_sets(_RELAYED, key, "%d %d %s %d %d" % (
        first, passes, shape or "-", resends, _now_ms()))


_MAX_PASSES = 2              # relayed twice already: its third coming is a loop
_MAX_RESENDS = 8             # a first coming sent again at most this often in 32 s
_RESEND_GAP_MS = 400         # below RFC 3261's T1: a copy sooner is no retransmission
_FAILED_INVITE_NOTE = 32     # s: a failed INVITE's branch note, for a late 2xx
_NO_MAX_FORWARDS = 256       # above the 70 at most that maxfwd lets a request leave with


def _max_forwards():
    """The request's Max-Forwards as it came (the maxfwd module's decrement is a lump,
    not read back), or None without a readable one."""
    try:
        value = (KSR.pv.get("$hdr(Max-Forwards)") or "").strip()
    except UnicodeDecodeError:
        return None
    return int(value) if value.isdigit() and len(value) <= 3 else None


def _carries_our_via(below_top=False):
    """One of the request's first ``MAX_ROUTE_ENTRIES`` Via entries (``below_top``: but
    the top one) names one of our sockets or aliases (a proxy adds its Via on top: in a
    loop through fewer proxies than that, ours is among them)."""
    try:
        count = min(int(KSR.pv.get("$hdrc(Via)") or 0), len(_VIA_LINE_SPECS))
        entries = []
        for spec in _VIA_LINE_SPECS[:count]:
            entries += split_header_list(KSR.pv.get(spec) or "")
            if len(entries) >= MAX_ROUTE_ENTRIES:
                break
    except (E2MError, UnicodeDecodeError, ValueError):
        return False
    for entry in entries[1 if below_top else 0:MAX_ROUTE_ENTRIES]:
        try:
            transport, host, port = via_sent_by(entry)
        except E2MError:
            continue
        if _names_us(host, port or (5061 if transport == "TLS" else 5060)):
            return True
    return False


def _record_route_unvouchable():
    """A request whose Record-Route the reply checks cannot read whole: more headers
    than they read, an octet that is not UTF-8, or past ``routes_within_bounds``."""
    if KSR.hdr.is_present("Record-Route") <= 0:
        return False
    side = _callers_side()
    return side is None or not routes_within_bounds(side)


def _ends_readable():
    """From and To as the core reads them: a sip: or sips: URI it takes apart (any other
    scheme is Kamailio's to parse, and names none of our users)."""
    for spec in ("$hdr(From)", "$hdr(To)"):
        try:
            uri = parse_address(KSR.pv.get(spec) or "").uri
        except (E2MError, ValueError):
            return False
        if uri.partition(":")[0].lower() in ("sip", "sips") and not is_sip_uri(uri):
            return False
    return True


def _sent_to_sips():
    return (KSR.pv.get("$ou") or "")[:5].lower() == "sips:"


def _sips_leaves_tls():
    """True when the request was sent to a sips: URI and its next hop is not TLS (the
    destination set, else the Request-URI: a contact from lookup, a next hop; in a
    branch route, the branch's)."""
    if not _sent_to_sips():
        return False
    target = (KSR.pv.get("$du") if KSR.isdsturiset() else KSR.pv.get("$ru")) or ""
    try:
        uri = parse_uri(target)
    except E2MError:
        return True
    return uri.scheme != "sips" and (uri.params.get("transport") or "").lower() != "tls"


_BARE_LINE_ENDS = (400, "Lines Must End In CRLF")


def _framing_problem():
    """Why the message's framing cannot be vouched for, or None: a line of its head that
    ends in anything but CRLF (``crlf_head``; Kamailio and the core take a bare LF, or a
    bare CR as the blank line, but pjsip finds a message's end on a stream only by CRLF:
    relayed down a phone's TCP connection, such a message swallowed the requests after
    it, reviews 79, 80), or a message that cannot be read byte-exact (review 103: past
    what is read whole, with a NUL in it, 413).  As (status, reason).  Only the head is
    checked: a body may hold any octets."""
    head = int(KSR.pv.get("$ml") or 0) - int(KSR.pv.get("$bs") or 0)
    if head <= 0:
        return None
    try:
        octets = _message_octets()
    except LimitExceededError:
        return 413, "Request Entity Too Large"
    except MalformedError:
        return 400, "Message Cannot Be Read"
    return None if crlf_head(octets[:head]) else _BARE_LINE_ENDS


def _remove_by_name(wanted):
    """The usual case (a label naming only us): every instance of each named header is
    one to remove.  Then remove by name, reading only those instances, instead of
    iterating over every header of the message with three KSR calls each.  Exactly
    what the iterator would remove; False (nothing done) when that is not certain."""
    names = {name for name, _ in wanted}
    plan = []
    for key in names:
        known = _BY_NAME.get(key)
        if known is None:
            return False
        name, count_spec, value_specs = known
        count = KSR.pv.get(count_spec)
        if not isinstance(count, int) or not 0 < count <= _BY_NAME_MAX:
            return False
        for spec in value_specs[:count]:
            try:
                value = KSR.pv.get(spec)
            except UnicodeDecodeError:      # the iterator removes it (review 113)
                return False
            if not isinstance(value, str) or (key, _normal(value)) not in wanted:
                return False
        plan.append(name)
    for name in plan:
        KSR.hdr.remove(name)
    return True


def _remove_headers(pairs):
    """Remove exactly the header instances named (name and value), keep the rest; and
    any instance of a name named whose value is not UTF-8, which cannot be compared
    (fail closed: the engine read it, surrogate-escaped, perhaps as a policy in our
    name).  Only the bodies of headers so named are read: one octet that is not UTF-8
    in any other header (a Subject) made the walk raise half-way, and a policy in our
    name went on to the caller (review 113)."""
    if not pairs:
        return
    wanted = {(canonical_name(n), _normal(v)) for n, v in pairs}
    if _remove_by_name(wanted):
        return
    names = {name for name, _ in wanted}
    tx = KSR.textopsx
    tx.hf_iterator_start(_ITERATOR)
    try:
        while tx.hf_iterator_next(_ITERATOR) > 0:
            try:
                name = canonical_name(tx.hf_iterator_hname(_ITERATOR) or "")
            except UnicodeDecodeError:
                continue                    # not a name of ours, which are ASCII
            if name not in names:
                continue
            try:
                body = tx.hf_iterator_hbody(_ITERATOR) or ""
            except UnicodeDecodeError:
                tx.hf_iterator_rm(_ITERATOR)
                continue
            if (name, _normal(body)) in wanted:
                tx.hf_iterator_rm(_ITERATOR)
    finally:
        tx.hf_iterator_end(_ITERATOR)


def _kept(avp):
    """A string AVP kept with the transaction, or None."""
    value = KSR.pv.get(avp)
    return value if isinstance(value, str) and value else None


def _caller():
    """Who pays for a key the answer offers: the caller ``note_caller`` kept with the
    request's transaction (an identity the proxy authenticated, or the one shared
    unauthenticated group).  None for a reply to nothing we relayed (a cluster's stray
    reply): then the responder pays."""
    caller = KSR.pv.get(_CALLER_AVP)
    return caller if isinstance(caller, str) and caller else None


def _loggable(caller):
    # an authenticated AoR or the shared group; bounded and quoted all the same
    return quote(bounded_keeper(caller), safe=":@") if caller else "-"


def _summary(verdict):
    seen = ",".join("%s/%dB/sig=%s" % (s.content_type, len(s.plaintext), s.signature)
                    for s in verdict.seen) or "-"
    text = "action=%s seen=%s media=%d" % (verdict.action, seen, len(verdict.media))
    if verdict.action == "reply":
        text += " code=%s" % verdict.code
    if verdict.error:
        text += " error=%s" % verdict.error
    return text


class kamailio:
    def __init__(self):
        self.app = APP
        self._local_hosts = None     # [kamailio] domains and identity host (from_ours)
        self.tcp_sweeper = None      # made in the timer process that sweeps (tcp_sweep.py)
        # the reply the core reply route read ($mi, message or None: not to be read),
        # for tm's reply route to use rather than read it again
        self._reply = None
        self._reply_ops = None   # where the core reply route counts its reading's work

    def child_init(self, rank):
        return 0

    # -- request route ---------------------------------------------------------
    def ksr_request_route(self, msg):
        self.transaction = False     # t_newtran done for this request
        self.authenticated = None    # the user digest authentication proved for it
        self.onward = None           # the next hop of a Route set past us it follows
        self.branch_note = _UNREAD   # its e2mbranch note (route_new_transaction)
        try:
            if self.app.replicates and KSR.pv.get("$rm") == "KDMQ":
                self.route_dmq()
                return 1
            if self.app.replicates and self.on_dmq_socket():
                # the DMQ socket takes KDMQ alone: a SIP request there (a binding or a
                # route set naming it, review 109) is dropped unanswered, unrouted
                return 1
            if SYNC_GATE is not None and SYNC_GATE.refuses():
                return 1      # 503: still catching up with the peers (DMQ sync)
            self.route_request()
        except UnicodeDecodeError:
            # Call-ID, a tag or a URI with bytes that are not UTF-8: app_python3 cannot
            # hand them over as a str, and no request of ours carries them (review 23)
            _info("e2m: request with octets that are not UTF-8 in a header read: "
                     "refused\n")
            _answer_anyway(400, "Bad Request")
        except Exception as exc:  # noqa: BLE001 - any failure must get an answer
            _log_exception("request route", exc)
            _answer_anyway(500, "Server Internal Error")
        return 1

    def on_dmq_socket(self):
        """This request came in on the node's DMQ socket."""
        local = (canonical_ip(KSR.pv.get("$Ri") or ""), int(KSR.pv.get("$Rp") or 0))
        return local in self.app.dmq_socket()

    def route_dmq(self):
        """[cluster] replication (KDMQ), before anything else: from a configured peer's
        DMQ socket, over UDP, to this node's DMQ socket, to DMQ; anything else refused,
        and never let into a table.  A stranger's KDMQ passes the flood limits first (a
        ban, then silence), else each one would cost an answer and a log line at any
        rate."""
        source = (KSR.pv.get("$si") or "", int(KSR.pv.get("$sp") or 0))
        local = (KSR.pv.get("$Ri") or "", int(KSR.pv.get("$Rp") or 0))
        if self.app.dmq_accepts(source, KSR.pv.get("$pr") or "", local):
            if not self.kdmq_body_ok():
                # Kamailio's dmq, htable or dmq_usrloc would stop on it (reviews 190, 192)
                target = KSR.pv.get("$rU")
                _warn("e2m: KDMQ to %s from %s:%d whose body is not of its peers' shape: "
                      "refused\n" % ((target if target in _DMQ_TARGETS else "?",) + source))
                KSR.sl.sl_send_reply(400, "Bad Request")
                return
            if SYNC_GATE is not None:
                SYNC_GATE.observe("%s:%d" % (canonical_ip(source[0]), source[1]))
            KSR.dmq.handle_message()
            return
        if not self.route_limits():
            return
        _warn("e2m: KDMQ from %s:%d to %s:%d over %s (a peer's only over udp to our DMQ "
              "socket), not a [cluster] peer: refused\n"
              % (source + local + (KSR.pv.get("$pr") or "?",)))
        KSR.sl.sl_send_reply(403, "Forbidden")

    def kdmq_body_ok(self) -> bool:
        """Whether a peer's KDMQ goes to its module: a body exactly Content-Length long,
        in the shape that module's own peers write (``dmq_bodies``)."""
        try:
            if int(KSR.pv.get("$cl") or 0) != int(KSR.pv.get("$bs") or 0):
                return False
            body = KSR.pv.get("$rb") or ""
        except (TypeError, ValueError, UnicodeError):
            return False
        target = KSR.pv.get("$rU")
        if target not in _DMQ_TARGETS:
            return False
        if target == "notification_peer":
            return node_list_ok(body, self.app.dmq_sources() | self.app.dmq_socket())
        if target == "htable":
            return htable_body_ok(body)
        if target == "usrloc":
            return usrloc_body_ok(body)
        return False

    def route_request(self):
        if not self.route_limits():
            return
        if not (KSR.is_ACK() or KSR.is_CANCEL()):     # never challenged: no proof of use
            self.mark_connection(SPOKE)
        if not self.route_sanity():
            return
        self.drop_asserted_identity()
        if KSR.is_CANCEL():
            self.route_cancel()
            return
        if KSR.siputils.has_totag() > 0:
            self.route_in_dialog()
            return
        if not self.route_new_transaction():
            return
        certs = self.app.certs is not None and self.app.certs.takes()
        if certs and KSR.is_SUBSCRIBE():   # a certificate is public: no credentials (RFC 6072)
            if self.app.certs.admits_subscribe():
                exempt = self.exempt_source()
                self.route_certs(lambda message: self.app.certs.route_subscribe(message, exempt))
            return
        if KSR.is_OPTIONS() and KSR.is_myself_ruri() and not KSR.pv.get("$rU"):
            # A keepalive to the proxy itself (a front's probe, a monitor) names no
            # user: never challenged, or a front probing from one of our domains
            # would take every node out.
            self.route_options_self()
            return
        local_register = KSR.is_REGISTER() and self.app.config.dispatcher is None and (
            KSR.is_myself_ruri() or not self.app.config.kamailio.next_hop)
        if not self.route_auth(register=local_register):
            return
        if certs:                          # PUBLISH: as the authenticated owner only
            self.route_certs(lambda message: self.app.certs.route_publish(
                message, self.authenticated, self.app.config.auth is not None))
            return
        if local_register:
            self.route_register()
            return
        if KSR.is_REGISTER() and self.app.config.dispatcher is not None \
                and not self.count_registration():
            return
        # A REGISTER for a domain that is not ours goes on to next_hop like any
        # request: a visited proxy passes it to the home registrar.
        if not self.route_target():
            return
        if KSR.is_method_in("IS") and self.app.config.dispatcher is None:
            # INVITE, SUBSCRIBE: stay on the path of the dialog, once it is known the
            # request goes on (a refused one is given no route token).  A front stays off
            # it: its nodes record-route the front's address.
            if not self.record_route():
                return
        self.relay(inspect=True)

    def drop_asserted_identity(self):
        """P-Asserted-Identity and its kin from anyone but a [limits] trusted peer go,
        from requests and replies: a UA that trusts its proxy (RFC 3325) would show an
        authenticated user's request, or a callee's answer, as another user's (reviews
        57, 67).  Our UAs read the From and the signer, which digest and the signature
        hold to the user.  Our own address exempts nothing: a reply's sender may share
        it (loopback), and a request from it may be any local process or, on a cluster
        node, anyone using the front's address, which the node lists as an alias
        (review 68).  A spiral loses them, as it is refused as a replay anyway."""
        if self.trusted_peer():
            return
        for name in _ASSERTED_IDENTITY:
            if KSR.hdr.is_present(name) > 0:
                KSR.hdr.remove(name)

    def mark_unrouted(self):
        """An INVITE or SUBSCRIBE relayed in its dialog (not record-routed): our Via gets
        ``dialog_route.UNROUTED_MARK`` (core ``xavp_via_params``, corex), so a late 2xx
        to it is not taken for an initial INVITE's whose Record-Route was taken out."""
        if (KSR.pv.get("$rm") or "") not in ("INVITE", "SUBSCRIBE"):
            return
        call_id, _, _ = dialog_ids(KSR)
        KSR.pv.sets("$xavp(e2mvia=>" + UNROUTED_MARK + ")",
                    self.app.routes.unrouted_mark(call_id, _top_via()))
        KSR.corex.via_add_xavp_params(1)

    def record_route(self) -> bool:
        """With the dialog's token (``dialog_route``): only requests that carry it back
        are routed inside the dialog.  A cluster node behind a front ([cluster] front)
        names the front, so the dialog's next requests go back through it to whichever
        node is alive.  The token binds the dialog's two parties (its From and To AoRs,
        ``dialog_parties``); a request whose From or To the core cannot read gets none
        and is refused (400, False): none of its dialog's requests could be routed, and
        an ACK, never challenged, could be written as anyone's (review 98)."""
        call_id, from_tag, _ = dialog_ids(KSR)
        param = self.app.routes.param(call_id, from_tag or "", _callers_side(), _top_via(),
                                      parties=_dialog_parties())
        if param is None:
            _info("e2m: %s from %s with a From or To the core cannot read: refused\n" % (
                KSR.pv.get("$rm"), KSR.pv.get("$si")))
            KSR.sl.send_reply(400, "Bad From or To")
            return False
        KSR.rr.add_rr_param(param)
        try:
            self.note_caller_target()
        except Exception as exc:  # noqa: BLE001 - the keys then go at their expiry
            _log_exception("caller target", exc)
        front = self.app.front
        if front:
            KSR.rr.record_route_advertised_address(front)
        else:
            KSR.rr.record_route()
        return True

    # -- flood limits ([limits]) ----------------------------------------------------
    def exempt_source(self):
        """The proxy's own addresses (a spiral, a local tool) and [limits] trusted peers
        are never limited (Kamailio's own convention for pike)."""
        return KSR.is_myself_srcip() or self.trusted_peer()

    def trusted_peer(self):
        """The source is a [limits] trusted peer (an IPv4 one on a dual-stack listener
        too, where Kamailio gives its address IPv4-mapped: review 128)."""
        if not self.app.config.limits.trusted:
            return False
        source = KSR.pv.get("$si") or ""
        plain = unmapped(source)
        if plain != source:
            return KSR.permissions.allow_address(1, plain, KSR.pv.get("$sp") or 0) > 0
        return KSR.permissions.allow_source_address(1) > 0

    def route_limits(self):
        """A banned source, or one over pike's rate, is dropped (no answer: an answer
        would only feed the flood) and its TCP/TLS connection closed."""
        if self.exempt_source() or not self.source_banned():
            return True
        self.close_connection()
        return False

    def source_banned(self):
        """The message's source is banned, or pike bans it now: every message counted
        this way (requests, and replies matching no transaction, which the engine reads
        too: review 70) is one of its ``pike_requests`` per ``pike_window``.  The ban
        is named by the source's site (``sources.site_of``: an IPv6 /56, or the IPv4
        address it spells): each address of a line was banned alone, and the next one
        served at once (reviews 124, 125).  A site of several addresses has a rate too,
        ``SITE_SHARES`` times an address's, past which its messages are dropped and
        nobody is banned: an office's phones register together (review 125)."""
        limits = self.app.config.limits
        source = KSR.pv.get("$si") or ""
        site = site_of(source)
        if KSR.htable.sht_get(_BANS, site) is not None:
            return True
        if limits.pike_requests > 0 and KSR.pike.pike_check_req() < 0:
            KSR.htable.sht_seti(_BANS, site, 1)     # gone after ban_time (autoexpire)
            _warn("e2m: %s banned for %d s: more than %d messages in %d s\n"
                  % (site, limits.ban_time, limits.pike_requests, limits.pike_window))
            return True
        return site != source and limits.pike_requests > 0 \
            and not self._site_under_rate(site, limits)

    @staticmethod
    def _site_under_rate(site, limits):
        """A site's messages, all its addresses together, are within ``SITE_SHARES``
        times ``pike_requests`` a second (a pipelimit pipe per site, freed 10 s after
        its last use; pipelimit counts per second, the certificate service's pipe too)."""
        return KSR.pipelimit.pl_check_limit(_SITE_PIPE + site, "TAILDROP",
                                            SITE_SHARES * limits.pike_requests) > 0

    @staticmethod
    def on_stream():
        return (KSR.pv.get("$proto") or "") in ("tcp", "tls")

    def mark_connection(self, level):
        """A TCP/TLS connection that carried a message is in use: its lifetime says how
        (``tcp_sweep.SPOKE`` or ``AUTHENTICATED``), which the sweep reads."""
        if self.on_stream():
            KSR.tcpops.tcp_set_connection_lifetime(
                marked_lifetime(self.app.config.limits.tcp_idle_timeout, level))

    # -- rtimer (a process of its own, every 2 s): TCP/TLS slots held unused ----------
    def ksr_tcp_sweep(self, msg, evname):
        try:
            self.sweep_connections()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("tcp sweep", exc)
        return 1

    def sweep_connections(self):
        if self.tcp_sweeper is None:
            limits = self.app.config.limits
            self.tcp_sweeper = TcpSweeper(
                listen_ports={item.port for item in self.app.config.kamailio.listen
                              if item.proto in ("tcp", "tls")},
                idle_timeout=limits.tcp_idle_timeout,
                first_message_timeout=limits.tcp_first_message_timeout,
                per_source=limits.tcp_connections_per_source, exempt=self.exempt_address)
        if not self.tcp_sweeper.listen_ports:
            return
        connections = list_connections(KSR)
        if connections is None:
            return
        for conid, why in self.tcp_sweeper.to_close(connections, time.monotonic()).items():
            if KSR.tcpops.tcp_close_connection_id(conid) > 0:
                KSR.statistics.update_stat("e2m_tcp_closed", 1)
                _info("e2m: tcp connection %d closed: %s\n" % (conid, why))

    def exempt_address(self, address):
        """The proxy's own addresses and [limits] trusted ones (``exempt_source`` for an
        address the timer holds, not a message)."""
        host = "[%s]" % address if ":" in address else address
        if KSR.is_myself("sip:" + host) > 0:
            return True
        try:
            ip = ipaddress.ip_address(unmapped(address))
        except ValueError:           # not an address (never printed so): not trusted
            return False
        return any(ip in ipaddress.ip_network(net) for net in self.app.config.limits.trusted)

    def close_connection(self):
        if (KSR.pv.get("$proto") or "") in ("tcp", "tls"):
            KSR.tcpops.tcp_close_connection()

    # -- digest authentication ([auth]) ----------------------------------------------
    def new_transaction(self):
        if not self.transaction:
            if KSR.tm.t_newtran() < 0:
                raise RuntimeError("t_newtran failed")
            self.transaction = True
        return True

    def route_auth(self, register, in_dialog=False):
        """REGISTER to us needs www credentials of the AoR's own user; any other request
        from our domains proxy credentials of its From user; requests from elsewhere
        pass only toward our domains (or inside a dialog).  ACK and CANCEL are never
        challenged (RFC 3261 22.1).  False when the request was answered."""
        auth = self.app.config.auth
        if auth is None or KSR.is_ACK() or KSR.is_CANCEL():
            return True
        if not register and KSR.is_REGISTER():
            # for another registrar: nobody's to relay (a proxy cannot challenge it)
            KSR.sl.sl_send_reply(403, "Relaying Denied")
            return False
        if not register and not self.from_ours():
            if in_dialog or KSR.is_myself_ruri():
                return True
            KSR.sl.sl_send_reply(403, "Relaying Denied")
            return False
        if KSR.auth.has_credentials(auth.realm) < 0:
            # The first try: challenged without a transaction, so a stranger's requests
            # take no shared memory (a retransmission just gets a new challenge).
            KSR.auth.auth_challenge(auth.realm, _QOP_AUTH)
            return False
        self.new_transaction()   # nonce counting must see each request once (tm)
        rc = KSR.auth_db.auth_check(auth.realm, auth.table, 1)
        # In a dialog too: our route token binds only a Call-ID and a tag, which a hop
        # can take from a dialog of its own (review 70)
        if rc > 0 and not self.credentials_fit_request(register, auth.realm):
            _info("e2m: %s from %s refused: its credentials were made for another "
                  "Request-URI\n" % (KSR.pv.get("$rm"), KSR.pv.get("$si")))
            KSR.sl.send_reply(400, "Credentials For Another URI")
            return False
        if rc > 0:
            # auth_check (flag 1) proved the credentials of our realm for the From user
            # (a REGISTER's To user): name that one.  $au reads the first credentials
            # header, whatever its realm and unchecked: a decoy put first named anyone
            # as the caller who pays for keys (review 28).
            self.authenticated = KSR.pv.get("$tU" if register else "$fU")
            self.mark_connection(AUTHENTICATED)
            if not register:
                KSR.auth.consume_credentials()   # not for the next hop to see
            return True
        _info("e2m: %s from %s refused: %s\n" % (
            KSR.pv.get("$rm"), KSR.pv.get("$si"), _AUTH_FAILURES.get(rc, "invalid credentials")))
        if rc == _AUTH_USER_MISMATCH:
            KSR.sl.send_reply(403, "Forbidden")
            return False
        if rc == _AUTH_ERROR and KSR.tm.t_get_status_code() < 200:
            # Not a bad password: auth_db could not read the users (its database is away;
            # it logged why).  A new challenge would make the UA ask its user for
            # another password; a 500 with Retry-After makes it try again later.
            KSR.hdr.append_to_reply("Retry-After: %d\r\n" % _AUTH_RETRY_AFTER)
            KSR.sl.send_reply(500, "Server Internal Error")
            return False
        if rc in _AUTH_STALE and self.answer_late_copy():
            return False
        KSR.auth.auth_challenge(auth.realm, _QOP_AUTH | (_STALE if rc in _AUTH_STALE else 0))
        return False

    def answer_late_copy(self):
        """A request whose nonce was used before may be the very datagram that passed
        (a late retransmission after tm let its transaction go, its sender having lost
        the 2xx): when the engine names it (``replay_key_of``, nothing recorded) and its
        answer is remembered, that answer goes back and nothing goes further.  Else
        the caller challenges again, and a UA's retry would deliver it twice (review
        133 K4).  True when it was answered."""
        engine = self.app.engine
        if engine is None or KSR.pv.get("$rm") in ("INVITE", "ACK", "CANCEL") \
                or not _has_body():
            return False
        try:
            message = _read_message()
        except E2MError:
            return False
        late = remembered_answer(KSR, message, engine.replay_key_of(message))
        if late is None:
            return False
        _info("e2m: %s request a late copy of one answered %d (its nonce used): answered "
              "so again\n" % (message.method, late[0]))
        KSR.sl.send_reply(*late)
        return True

    def credentials_fit_request(self, register, realm):
        """Every credentials header of our realm names this Request-URI (as received)
        as its digest ``uri`` (``challenge.credentials_fit_request``, review 67)."""
        wanted = canonical_name("Authorization" if register else "Proxy-Authorization")
        values = []
        tx = KSR.textopsx
        tx.hf_iterator_start(_ITERATOR)
        try:
            while tx.hf_iterator_next(_ITERATOR) > 0:
                if canonical_name(tx.hf_iterator_hname(_ITERATOR) or "") == wanted:
                    values.append(tx.hf_iterator_hbody(_ITERATOR) or "")
        finally:
            tx.hf_iterator_end(_ITERATOR)
        return credentials_fit_request(values, realm, KSR.pv.get("$ou") or "",
                                       names_us=_names_this_proxy)

    def from_ours(self):
        """The From names one of our users: Kamailio's myself check, or the core's AoR
        of it in one of our domains.  Kamailio's check wants the host as written (a
        trailing dot makes it a stranger's), while the engine, every UA's signer check
        and the archive read ``sip:carol@example.com.`` as carol: such a request must
        carry carol's credentials like any other of hers."""
        if KSR.is_myself_furi():
            return True
        identity = identity_of(KSR.pv.get("$fu") or "")
        if identity is None:
            return False
        if self._local_hosts is None:
            self._local_hosts = frozenset(host_key(n) for n in self.app.config.local_names)
        if host_key(identity.host) in self._local_hosts:
            return True
        # One of our addresses or aliases on any port (a bare host: Kamailio compares no
        # port), an address in any spelling (IPv4-mapped too): the engine and the archive
        # drop the port, so sip:alice@<our address>:1 is alice (review 168 K1)
        host = canonical_ip(identity.host) or identity.host
        return KSR.is_myself("[%s]" % host if ":" in host else host) > 0

    def route_sanity(self):
        """Max-Forwards and RFC 3261 sanity; answers the request itself when it fails."""
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return False
        if KSR.sanity.sanity_check_defaults() < 0:
            return False  # sanity has replied (400 and the like)
        problem = _framing_problem()
        if problem is not None:
            if not KSR.is_ACK():
                KSR.sl.sl_send_reply(*problem)
            return False
        if _record_route_unvouchable():
            # its answers would carry it back (a UAS copies it, Kamailio's own replies
            # too) and be dropped by the reply checks: refused here, with an answer, not
            # left to end in silence (at a front, a node's dropped 200 once marked the
            # node down and left a REGISTER uncounted: review 91)
            if not KSR.is_ACK():
                KSR.sl.sl_send_reply(400, "Bad Record-Route")
            return False
        if KSR.sanity.sanity_check(1024, 6) < 0:
            return False  # a From or To URI Kamailio cannot parse: sanity has replied 400
        if not _ends_readable():
            # the engine, the archive and the signer checks read From and To with the
            # core: one it cannot take apart was never challenged (not "ours"), yet read
            # and archived under a URI a phone takes for alice's (review 98)
            if not KSR.is_ACK():
                KSR.sl.sl_send_reply(400, "Bad From or To")
            return False
        method = KSR.pv.get("$rm") or ""
        if canonical_method(method) != method:
            # "invite": Kamailio and the phones take it as INVITE, while a policy rule or
            # a check written for INVITE could read it as another method.  Refused at the
            # door (an ACK cannot be answered: dropped).
            if not KSR.is_ACK():
                KSR.sl.sl_send_reply(400, "Method Not In Capitals")
            return False
        return True

    def route_new_transaction(self):
        """Absorb retransmissions (the answer to them comes from tm)."""
        if KSR.is_ACK():
            # ACK to a non-2xx answer of ours or of a downstream hop: tm matches it.
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return False
        if KSR.tmx.t_precheck_trans() > 0:
            KSR.tm.t_check_trans()
            return False
        if KSR.tm.t_check_trans() == 0:
            return False
        self.branch_note = _branch_note()
        if _branch_taken(self.branch_note):
            # RFC 3261 §8.2.2.2's merged request: a branch is one transaction's.  tm
            # files a request under its CSeq too, so another request with alice's very
            # Via would be a transaction of its own whose answers her stack takes for
            # her INVITE's (a hop's 2xx with no Record-Route, or a Via mark minted for
            # her Via: review 94)
            KSR.sl.sl_send_reply(482, "Loop Detected")
            return False
        return True

    def route_cancel(self):
        if KSR.tm.t_check_trans() > 0:
            if not self.relayed_unread():
                # lets the engine drop keys of the cancelled dialog; a CANCEL is never
                # challenged and tm matches it to its INVITE whatever its From says, so
                # what it carries is not archived (review 99: one written "From alice"
                # was archived as hers); a CANCEL has no offer or answer to record
                self.inspect_only(archive=False)
            KSR.tm.t_relay()

    def route_in_dialog(self):
        if self.app.certs is not None and self.app.certs.takes_in_dialog():
            if self.route_new_transaction() and self.app.certs.admits_subscribe():
                self.route_certs(self.app.certs.route_resubscribe)
            return
        if self.app.config.dispatcher is not None:
            # A front: the dialog goes on at a live node, its route set untouched (the
            # node takes its own Route entry and checks the token in it).
            if not self.route_dispatch():
                return
            if KSR.is_ACK():
                KSR.tm.t_relay()
            elif self.route_new_transaction() and self.route_auth(register=False, in_dialog=True):
                self.relay(inspect=False)
            return
        if KSR.rr.loose_route() > 0:
            if not self.dialog_routed_here():
                # A Route naming us, but no token of a dialog we record-routed: a
                # stranger's "in-dialog" request to relay anywhere, or one of our
                # dialog's written with another From or To (review 98).  A non-2xx ACK
                # (it repeats the INVITE's preloaded Route) is tm's to match; an ACK
                # with a token of ours that is not its own is dropped (tm would take
                # it for the INVITE's 2xx ACK and relay it).
                if KSR.is_ACK():
                    if self.carries_a_route_token():
                        _info("e2m: ACK from %s with a route token not its own: "
                              "dropped\n" % KSR.pv.get("$si"))
                        return
                    if KSR.tm.t_check_trans() > 0:
                        KSR.tm.t_relay()
                    return
                _info("e2m: %s from %s with no route token of ours: refused\n" % (
                    KSR.pv.get("$rm"), KSR.pv.get("$si")))
                KSR.sl.sl_send_reply(403, "Not Routed Here")
                return
            if KSR.is_ACK():
                # a late answer rides in the ACK; a policy header may name us (review 58:
                # a forged one teaches the callee to drop our certificate); else nothing.
                # An ACK is never challenged and either party can write the other's
                # (reviews 99, 101): its bodies are archived, naming its From only
                # where a body is signed by it for this very ACK (``body_records``)
                if _has_body() or KSR.hdr.is_present(PROXY_BODY_POLICY) > 0:
                    self.relay_read_ack()
                else:
                    KSR.tm.t_relay()
                return
            if self.route_new_transaction() and self.route_auth(register=False, in_dialog=True):
                self.mark_unrouted()
                try:
                    self.note_bye_way()
                except Exception as exc:  # noqa: BLE001 - then its 2xx ends no key
                    _log_exception("BYE route", exc)
                self.relay(inspect=not self.relayed_unread())
            return
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return
        KSR.sl.sl_send_reply(404, "Not Here")

    def relay_read_ack(self):
        """An in-dialog ACK the engine reads, relayed: first the loop rule every other
        request gets in ``relay``, before any reading (one stranger's ACK whose Route
        set named us again and again went round Max-Forwards times, its body read at
        every pass: review 158 K1).  Keyed without its Route: each pass takes an entry
        off, and a key of its own per pass let 16 entries go round 8 times (review 161
        K1); an ACK is loose-routed, its Request-URI the same on every pass, and a copy
        sent again is still one (``_resent``).  A bodiless ACK is read by nobody: it
        keeps no note (Max-Forwards bounds its loop, as a bodiless request's)."""
        loop_key, note, resent, looped = _loop_check(with_route=False)
        if looped:
            _info("e2m: ACK from %s came back to us unchanged (a loop): dropped\n"
                  % KSR.pv.get("$si"))
            return
        if not self.inspect_only():
            return
        if loop_key is not None:
            _note_relayed(loop_key, note, resent)
        KSR.tm.t_relay()

    def may_route_onward(self):
        """Whether this request may follow a Route set past us: with [auth], only for one
        of our users (digest proved); without it, the proxy relays for anyone (it warned
        so at start).  Never for a source address: it names the last hop, not who wrote
        the request (a front or a peer in [limits] trusted relays anyone's, and a UDP
        source can be written by anyone).  Review 22."""
        return self.app.config.auth is None or self.authenticated is not None

    def moved_route_entries(self):
        """The Record-Route entries of this reply that carry our token for its Call-ID
        and From tag but do not name one of our sockets (host, port and transport).
        None at a front: it writes no entry and vouches for none (a node's reply it
        dropped was taken for the node's silence: review 91)."""
        if self.app.config.dispatcher is not None:
            return []
        count = int(KSR.pv.get("$hdrc(Record-Route)") or 0)
        if count == 0:
            # every entry taken out of a 2xx we record-routed, or of a 1xx making an
            # early dialog (a To tag): the caller's route set would be empty, her
            # in-dialog requests (PRACK, UPDATE) going past us (reviews 88, 90)
            status = KSR.pv.get("$rs") or 0
            if (200 <= status < 300 or (101 <= status < 200 and KSR.pv.get("$tt"))) \
                    and self.record_routed_here():
                return ["(no Record-Route)"]
            return []
        try:
            call_id = (KSR.pv.get("$ci") or "").strip(" \t")
            from_tag = (KSR.pv.get("$ft") or "").strip(" \t")
        except UnicodeDecodeError:
            # ids no request of ours had (the door refuses them), so the callee's or a
            # hop's: they hid a moved entry from the check (review 114)
            return ["(a Call-ID or From tag that is not UTF-8)"]
        # the parties as the reply names them (a UAS copies From and To): another
        # pair finds no entry of ours, and a reply to a request we record-routed is
        # then dropped below (review 98)
        parties = _dialog_parties()
        if count > len(_RECORD_ROUTE_SPECS):
            # past what we read, our entry could be anywhere: a hop put 16 of its
            # own above the one it moved (review 82)
            return ["(%d Record-Route headers)" % count]
        try:
            routes = [KSR.pv.get(_RECORD_ROUTE_SPECS[i]) or "" for i in range(count)]
        except UnicodeDecodeError:
            # one octet that is not UTF-8 in any entry hid the moved one (review 85)
            return ["(a Record-Route that is not UTF-8)"]
        if not routes_within_bounds(routes):
            return ["(a Record-Route past the read bound)"]
        ours = self.app.routes.ours_in(call_id, from_tag, routes, parties=parties)
        # ours must still name us, and say no more than we wrote (a maddr: review 90)
        moved = [uri for uri in ours if not written_as_ours(uri) or KSR.is_myself(uri) <= 0]
        if moved:
            return moved
        if ours:
            # below ours, exactly what the request reached us with (the MAC after our
            # token): a hop's entry there is the caller's first hop (reviews 82, 86).
            # The MAC names the request's top Via, so one made for another request
            # with the dialog's ids vouches for nothing here (review 88)
            mine = self.app.routes.callers_side_entry(call_id, from_tag, routes,
                                                      _via_below_ours(), parties=parties)
            if mine is None:
                return ["(an entry added or changed on the caller's side of ours)"]
            # that entry, not our lowest: in a spiral the lowest is the first pass's,
            # facing another socket (review 112)
            if not _faces_the_caller(mine, self.app.config):
                return [mine]
        elif self.record_routed_here():
            return ["(no entry of ours)"]      # ours taken out: the same, or worse
        return []

    def record_routed_here(self):
        """This reply answers a request we record-routed (an initial INVITE or
        SUBSCRIBE; a front record-routes nothing), so its Record-Route must hold our
        entry.  A stray one (no transaction: a hop changed our Via branch, or another
        node of a cluster got it) is taken for one of those: without our entry it
        cannot be told apart, and only the hop gains by it (a stray with our entry is
        checked by its MAC, which needs no transaction)."""
        if self.app.config.dispatcher is not None or \
                _cseq_method() not in ("INVITE", "SUBSCRIBE"):
            return False
        if KSR.tm.t_check_trans() > 0:
            return not KSR.pv.get("$T_req($tt)")
        # a stray: one we relayed unrecorded carries our mark on our Via (a re-INVITE's
        # late 2xx, review 90); any other is taken for one we record-routed
        call_id = (KSR.pv.get("$ci") or "").strip(" \t")
        return not self.app.routes.marks_unrouted(call_id, _top_via(), _via_below_ours())

    def dialog_routed_here(self) -> bool:
        """One of the request's Route entries carries our token for its Call-ID, one of
        its tags and its From and To AoRs (``dialog_route``): the dialog's parties, so
        an ACK (never challenged) written as another user's is not routed (review 98)."""
        return self.routed_side() is not None

    def routed_side(self):
        """Which side of the dialog this in-dialog request comes from, as our token in
        its Route says (``RouteTokens.side``): 0 the caller's, 1 the callee's, None
        when no token of ours fits its Call-ID, tags and From and To."""
        call_id, from_tag, to_tag = dialog_ids(KSR)
        return self.app.routes.side(call_id, (from_tag, to_tag), self.route_values(),
                                    parties=_dialog_parties())

    def route_values(self) -> list[str]:
        """The request's Route header values (as many as ``admits`` reads)."""
        count = min(int(KSR.pv.get("$hdrc(Route)") or 0), len(_ROUTE_SPECS))
        return [KSR.pv.get(_ROUTE_SPECS[i]) or "" for i in range(count)]

    def carries_a_route_token(self) -> bool:
        """One of the request's Route entries carries a route token of ours, whichever
        dialog's (``dialog_route.carries_a_token``); False when unreadable."""
        try:
            return carries_a_token(self.route_values())
        except UnicodeDecodeError:
            return False

    def route_register(self):
        """Save the contact (registrar: at most max_contacts per AoR), the source's AoRs
        counted while the registrar is open (``count_registration``).  A Contact that
        names this proxy is refused first (403, review 107)."""
        if _contact_naming_us() is not None:
            _info("e2m: REGISTER from %s with a Contact naming this proxy: refused\n"
                  % KSR.pv.get("$si"))
            KSR.sl.send_reply(403, "Contact Names This Proxy")
            return
        if not self.count_registration():
            return
        self.announce_policy_in_reply()
        # no reply yet (flag 2): the slot is settled to what was bound first, so the
        # sender's next REGISTER, sent on our 200, finds it settled
        KSR.registrar.save("location", _SAVE_NO_REPLY)
        try:
            self.settle_registration(_bound_seconds())
        finally:
            KSR.registrar.reg_send_reply()

    def count_registration(self):
        """While the registrar is open, one source may register at most
        ``registrations_per_source`` AoRs.  Each source has that many slots in e2mregs
        (``source#1`` ...); an AoR it registers holds one, named by its (source, AoR)
        pair, for as long as the registrar keeps the AoR's binding, no longer: claimed for
        what we read the REGISTER to ask, then settled to what the registrar bound
        (``settle_registration``; freed when nothing was: reviews 80, 85).
        A source's count is therefore its live AoRs and nothing else: a counter kept
        beside them outlived the AoRs it counted while any other
        was refreshed, so one forged burst from a shared address held it full (review
        78); one counter per source expired while its AoRs lived on (review 72).  By
        pair, not by "is the AoR registered": a second address refreshing the first's
        AoRs would keep them alive uncounted (review 74).  A slot is claimed by the
        atomic ``sht_inc`` that takes it from 0 to 1, then tagged with its pair: two
        workers with copies of one REGISTER never share a slot, so copies can only
        over-count, each extra slot for its own lifetime (review 76).  A front counts
        for its nodes, which see every REGISTER from its address (review 71).
        Returns True when the request may go on; False when answered 403."""
        if not self.counts_registrations():
            return True
        counted = self._registration_pair()
        if counted is None:
            # an AoR the core cannot read is no AoR to count, and usrloc keeps an AoR as
            # long as it is written: 60 KB ones filled shared memory (review 77)
            KSR.sl.send_reply(400, "Bad To")
            return False
        if (KSR.pv.get("$hdrc(Contact)") or 0) == 0:
            return True                          # a query binds nothing
        # Any Contact may bind, whatever we read it to ask: our reading of its expiry
        # and the registrar's differed (a single-quoted parameter, an Expires that wraps:
        # review 85).  So a slot is claimed for it now, for what we read (a removal: the
        # slack alone), and settled to what the registrar bound once it has
        # (``settle_registration``; freed if nothing was).
        lifetime = _asked_lifetime()
        if self.app.config.dispatcher is not None:
            # a front settles on the node's 2xx (``ksr_onreply_route``): until then, no
            # longer than the REGISTER's transaction lives, so one the node refuses or
            # never answers holds nothing for long (review 86)
            lifetime = min(lifetime, _UNSETTLED)
        limit = self.app.config.limits.registrations_per_source
        source, pair, tag = counted
        held = KSR.htable.sht_get(_REGS, pair) or 0
        if 0 < held <= limit and (KSR.htable.sht_get(_REGS, _slot_name(source, held))
                                  or 0) == tag:
            index = held                        # a refresh: the same slot, renewed
        else:
            index = self._claim_slot(source, limit)
            if index == 0:
                KSR.sl.send_reply(403, "Too Many Registrations From This Address")
                return False
        # both live as long as the binding asked for (or one still held, if longer):
        # a one-minute registration held a slot for MAX_EXPIRES (review 80)
        name = _slot_name(source, index)
        if index == held:
            # through a $var: each distinct PV spec string is kept for good (pkg memory)
            KSR.pv.sets("$var(e2m_slot)", name)
            left = KSR.pv.get(_SLOT_LEFT) or 0
            if 0 < left <= MAX_EXPIRES + _SLOT_SLACK:    # unsigned: a past one wraps
                lifetime = max(lifetime, left - _SLOT_SLACK)
        KSR.htable.sht_setxi(_REGS, name, tag, lifetime + _SLOT_SLACK)
        KSR.htable.sht_setxi(_REGS, pair, index, lifetime + _SLOT_SLACK)
        return True

    def counts_registrations(self):
        """The open registrar's per-source count applies (no digest, a limit, a source
        not exempt)."""
        limit = self.app.config.limits.registrations_per_source
        return self.app.config.auth is None and limit > 0 and not self.exempt_source()

    @staticmethod
    def _registration_pair(to_uri="$tu", source_ip="$si"):
        """(source, pair name, slot tag) of this REGISTER's source and AoR (read through
        ``to_uri`` and ``source_ip``: in a reply route, the request's, ``$T_req``); None
        when the AoR cannot be read.  Fixed-size names: the AoR's own length is the
        sender's to choose (review 77)."""
        identity = identity_of(KSR.pv.get(to_uri) or "")
        if identity is None or identity.user is None or len(str(identity)) > _MAX_OPEN_AOR:
            return None
        # by its site: one line has every address of an IPv6 /56 (reviews 124, 125)
        source = site_of(KSR.pv.get(source_ip) or "")
        digest = hashlib.sha256(str(identity).encode()).hexdigest()
        tag = int(digest[32:39], 16) + 2        # never 0 (free) nor 1 (being claimed)
        return source, "%s|%s" % (source, digest[:32]), tag

    def settle_registration(self, seconds, *, in_reply=False):
        """The slot this REGISTER's (source, AoR) pair holds lives as long as the AoR's
        longest binding has left (``seconds``, as the registrar bound it), and is freed
        when nothing is bound: what the registrar did, not what we read the REGISTER to
        ask, is what is counted (review 85).  ``in_reply``: on a front, from the node's
        2xx, whose own source is the node: the pair is named by the request's source and
        To (a pair exists only if its REGISTER was counted; review 86)."""
        if in_reply:
            limit = self.app.config.limits.registrations_per_source
            if self.app.config.auth is not None or limit <= 0:
                return
            counted = self._registration_pair("$T_req($tu)", "$T_req($si)")
        else:
            if not self.counts_registrations():
                return
            counted = self._registration_pair()
        if counted is None:
            return
        source, pair, tag = counted
        index = KSR.htable.sht_get(_REGS, pair) or 0
        if not 0 < index <= self.app.config.limits.registrations_per_source:
            return
        name = _slot_name(source, index)
        if (KSR.htable.sht_get(_REGS, name) or 0) != tag:
            return                               # retaken by another pair: not ours
        if seconds <= 0:
            KSR.htable.sht_rm(_REGS, pair)
            KSR.htable.sht_rm(_REGS, name)
            return
        KSR.htable.sht_setxi(_REGS, name, tag, seconds + _SLOT_SLACK)
        KSR.htable.sht_setxi(_REGS, pair, index, seconds + _SLOT_SLACK)

    @staticmethod
    def _claim_slot(source, limit):
        """The first free slot of ``source``, now ours (0: none).  Read before the
        increment: an increment renews an item, and probing a taken slot must not
        keep it alive."""
        for index in range(1, limit + 1):
            name = _slot_name(source, index)
            if (KSR.htable.sht_get(_REGS, name) or 0) == 0 \
                    and KSR.htable.sht_inc(_REGS, name) == 1:
                return index
        return 0

    def route_certs(self, handle):
        """The certificate service ([certs]) answers this request: ``handle(message)``
        with the message as received (a statefully answered one)."""
        self.new_transaction()
        try:
            message = _read_message()
        except E2MError as exc:
            _log_exception("parse", exc)
            KSR.sl.send_reply(400, "Bad Request")
            return
        handle(message)

    def route_options_self(self):
        self.announce_policy_in_reply()
        KSR.siputils.options_reply()

    def announce_policy_in_reply(self):
        engine = self.app.engine
        if engine is not None and getattr(engine.config, "announce_policy", True):
            name, value = engine.policy_header()
            KSR.hdr.append_to_reply(_header_line(name, value))

    def route_dispatch(self):
        """[dispatcher] front: a live node of the cluster (dispatcher set 1; the others
        kept for failover).  False when none is up (answered 503)."""
        if KSR.dispatcher.ds_select_dst(1, self.app.config.dispatcher.algorithm) > 0:
            # a node answers a non-INVITE with nothing before its own 408 (fr_timer):
            # wait longer than that, so its 408, not our timeout, ends the transaction
            KSR.tm.t_set_fr(0, _FRONT_FR_TIMER_MS)
            return True
        if not KSR.is_ACK():
            KSR.hdr.append_to_reply("Retry-After: %d\r\n" % _AUTH_RETRY_AFTER)
            KSR.sl.sl_send_reply(503, "No Node Available")
        return False

    def route_target(self):
        """Where the request goes: location, else next_hop, else by Request-URI."""
        if self.app.config.dispatcher is not None:
            return self.route_dispatch()
        next_hop = self.app.config.kamailio.next_hop
        if KSR.hdr.is_present("Route") > 0:
            request_uri = KSR.pv.get("$ru")
            KSR.rr.loose_route()       # a pre-loaded route set past us is honoured...
            # ...wherever it leads: a loose next hop sets the destination, a strict one
            # (no ;lr) rewrites the Request-URI instead (review 23).
            if KSR.isdsturiset() or KSR.pv.get("$ru") != request_uri:
                if not self.may_route_onward():
                    # ...but not for a stranger: a request to our domain (never challenged)
                    # with a Route past us would go anywhere, and one record-routed there
                    # would hand him a route token for requests anywhere.
                    KSR.sl.sl_send_reply(403, "Route Not Allowed")
                    return False
                # where it really goes, for the archive (review 33)
                self.onward = KSR.pv.get("$du") if KSR.isdsturiset() else KSR.pv.get("$ru")
                return True
        if KSR.is_myself_ruri():
            rc = KSR.registrar.lookup("location")
            if rc > 0:
                return True
            if next_hop:
                KSR.setdsturi(next_hop)
                return True
            if rc == -2:
                KSR.sl.sl_send_reply(405, "Method Not Allowed")
            else:
                KSR.sl.sl_send_reply(404, "Not Found")
            return False
        if next_hop:
            KSR.setdsturi(next_hop)
        return True

    # -- E2M -------------------------------------------------------------------
    def ksr_branch_route_sips(self, msg):
        """Each branch of a request sent to a sips: URI: one that would leave TLS is
        dropped (the first one was checked in ``relay``)."""
        try:
            if _sips_leaves_tls():
                _info("e2m: a branch of a sips: request to a target without TLS: dropped\n")
                KSR.set_drop()
        except Exception as exc:  # noqa: BLE001 - fail closed: the branch goes nowhere
            _log_exception("sips branch", exc)
            KSR.set_drop()
        return 1

    def relay(self, inspect):
        loop_key, note, resent, looped = _loop_check()
        if looped:
            # before any reading: a loop's later passes cost no CMS work either
            _info("e2m: %s from %s came back to us unchanged (a loop): refused\n" % (
                KSR.pv.get("$rm"), KSR.pv.get("$si")))
            KSR.sl.send_reply(482, "Loop Detected")
            return
        if _sips_leaves_tls():
            # RFC 5630 3.1.3: a sips: request goes over TLS on every hop, or not at all;
            # a contact or next hop over UDP or TCP would carry it in clear (review 81)
            if not KSR.is_ACK():
                KSR.hdr.append_to_reply('Warning: 380 %s "SIPS Not Allowed"\r\n'
                                        % (self.app.config.local_names or ("-",))[0])
                # stateful when record_route made a transaction (else tm would end it
                # with a 408 of its own later)
                KSR.sl.send_reply(480, "SIPS Not Allowed")
            return
        if _sent_to_sips():
            # lookup may have added a branch per contact: each is checked as it leaves
            # (a second, UDP contact of bob's got a sips: MESSAGE in clear: review 82)
            KSR.tm.t_on_branch("ksr_branch_route_sips")
        if inspect and self.app.engine is not None:
            # A refusal is answered statefully, so retransmissions are not inspected again.
            self.new_transaction()
            if not self.inspect_request():
                return
        elif self.app.engine is not None:
            # relayed unread (a bare BYE, a front's in-dialog request): no body vouched
            self.note_caller(self.app.engine.answer_caller(
                KSR.pv.get("$fu") or "", None, digest_user=self.digest_aor()))
        KSR.tm.t_on_reply("ksr_onreply_route")
        # always: an INVITE's notes end there, a 503's Retry-After is kept there
        KSR.tm.t_on_failure("ksr_failure_route")
        if loop_key is not None:
            _note_relayed(loop_key, note, resent)   # only what leaves: a refused one never did
        _note_branch(_branch_note() if self.branch_note is _UNREAD else self.branch_note)
        if KSR.tm.t_relay() < 0:
            self.drop_attempt_keys(answer_may_follow=False)     # nothing went out
            KSR.sl.send_reply(500, "Cannot Relay")

    def relayed_unread(self):
        """A bare BYE or CANCEL, relayed without reading the message (the engine says
        when forwarding it is all inspecting it would do; a BYE's keys go at its 2xx:
        ``end_answered_dialog``).  False when the message must be read."""
        engine = self.app.engine
        if engine is None:
            return False
        method = KSR.pv.get("$rm") or ""
        if not engine.needs_no_reading(method, has_body=_has_body(),
                                       has_label=KSR.hdr.is_present(PROXY_REQUIRED_BODY) > 0,
                                       has_policy=KSR.hdr.is_present(PROXY_BODY_POLICY) > 0):
            return False
        _info("e2m: %s request %s unread\n" % (method, _summary(_PLAIN_FORWARD)))
        return True

    def note_caller_target(self):
        """At an initial INVITE we record-route: the caller's remote target (its
        Contact) under the Call-ID and the caller's tag, for the transaction's life
        (htable e2mtargets; its 2xx keeps it for the dialog's: ``note_dialog_targets``),
        with a digest of the Record-Route the INVITE reached us with: the caller's side
        of the route set, the rest of the Route a BYE to the caller carries past ours
        (``note_bye_way``).  The first one noted stays."""
        if self.app.engine is None or KSR.pv.get("$rm") != "INVITE":
            return
        call_id, caller, _ = dialog_ids(KSR)
        target = _target(KSR.pv.get("$hdr(Contact)"))
        if call_id and caller and target is not None:
            name = _caller_name(call_id, caller)
            if KSR.htable.sht_get(_TARGETS, name) is None:
                side = route_set_digest(_header_entries("Record-Route", _RECORD_ROUTE_SPECS))
                put_expiring(KSR, _TARGETS, name, target + ":" + side, _UNANSWERED_TARGET)
                KSR.pv.seti(_TARGET_MINE_AVP, 1)

    def note_dialog_targets(self, stray=False):
        """At a 2xx to an initial INVITE (``stray``: one matching no transaction, read
        where it arrived, which the first one to name the dialog is taken for): the
        callee's tag and remote target (its Contact) under the dialog's name, and the
        caller's target kept as long, so that a BYE's 2xx ends the dialog's keys only
        when the BYE went to the other party (``end_answered_dialog``); with the
        callee's side of the route set (this 2xx's Record-Route entries above ours,
        reversed: the rest of the Route a BYE to the callee carries past ours).  The
        first noted stays: a later copy, forged or not, changes nothing.  Kept only
        when the engine holds keys for the dialog (called once the 2xx was read): a
        keyless call's entry goes now, nothing for a BYE to end (review 96); and no
        longer than those keys: their longest life (``_targets_life``), and gone with
        the dialog's key-cache record (``dialog_targets.forgetter``; review 99)."""
        status = KSR.pv.get("$rs") or 0
        if self.app.engine is None or _cseq_method() != "INVITE" \
                or not 200 <= status < 300 or (not stray and KSR.pv.get("$T_req($tt)")):
            return
        call_id, caller, callee = dialog_ids(KSR)
        target = _target(KSR.pv.get("$hdr(Contact)"))
        if not (call_id and caller and callee) or target is None:
            return        # no target to hold a BYE to: its keys go at their expiry
        # one dialog per INVITE we relayed, the first 2xx's: a caller's target not
        # noted (no INVITE of ours), or already bound to a dialog (another fork, a
        # forged stray with a made-up To tag), notes nothing, so what is kept for 12 h
        # grows only with the INVITEs the proxy relayed (a later fork's keys expire)
        held = KSR.htable.sht_get(_TARGETS, _caller_name(call_id, caller))
        if not isinstance(held, str) or "|" in held:
            return
        if not stray and not KSR.pv.get(_TARGET_MINE_AVP):
            # another INVITE's note under the same Call-ID and tag (a stranger's own
            # INVITE, answered while alice's rang, took hers: review 125)
            return
        life = _targets_life(self.app, call_id, caller, callee)
        if life is None:
            # a call holding no key keeps nothing for 12 h (review 96 hole 4: one
            # sender's plain calls filled shared memory); its INVITE is answered.  A
            # stray 2xx (no transaction to say whose note it is) ends nothing: one
            # datagram from a hop took a ringing call's note (review 125)
            if not stray:
                KSR.htable.sht_rm(_TARGETS, _caller_name(call_id, caller))
            return
        side = UNREAD_ROUTE_SET
        entries = _header_entries("Record-Route", _RECORD_ROUTE_SPECS)
        parties = _dialog_parties()
        if entries is not None:
            ours = [i for i, entry in enumerate(entries)
                    if self.app.routes.ours_in(call_id, caller, [entry],
                                               parties=parties)]
            if ours:
                side = route_set_digest(list(reversed(entries[:ours[0]])))
        # (the caller's note grows here: put_expiring keeps its life, stop 46)
        put_expiring(KSR, _TARGETS, _caller_name(call_id, caller),
                     held + "|" + tag_digest(callee), life)
        put_expiring(KSR, _TARGETS, _dialog_name(call_id, caller, callee),
                     tag_digest(callee) + "|" + target + ":" + side, life)

    def note_bye_way(self):
        """In the request route, after ``loose_route``: a BYE goes the dialog's way when
        the Route it carries past ours (the one or two entries ``loose_route`` takes
        off: our token, a double Record-Route's ``r2``) is the other party's side of
        the route set as the dialog's start gave it (``note_caller_target``,
        ``note_dialog_targets``), and its next hop the first of those (``$du``), or
        none and no destination set.  Noted with the transaction (``_BYE_WAY_AVP``) for
        ``end_answered_dialog``: a Route entry past ours to a hop's own UAS, whose 200
        ended a live call's keys, goes elsewhere (review 96).  What cannot be read is
        not the dialog's way (the keys go at their expiry)."""
        if self.app.engine is None or KSR.pv.get("$rm") != "BYE":
            return
        call_id, from_tag, to_tag = dialog_ids(KSR)
        if not (call_id and from_tag and to_tag):
            return
        peer = _dialog_peer(call_id, from_tag, to_tag)
        entries = _header_entries("Route", _ROUTE_SPECS)
        if peer is None or not entries or peer[2][1] == UNREAD_ROUTE_SET \
                or not self.app.routes.admits(call_id, (from_tag, to_tag), entries[:1],
                                              parties=_dialog_parties()):
            return
        rest = entries[2:] if double_rr_entry(entries[0]) else entries[1:]
        destination = KSR.pv.get("$du") or ""
        if (same_route_uri(rest[0], destination) if rest else not destination) \
                and route_set_digest(rest) == peer[2][1]:
            KSR.pv.seti(_BYE_WAY_AVP, 1)

    def end_answered_dialog(self):
        """A 2xx to a BYE we relayed ends the dialog's keys, named by the BYE's own ids
        (the transaction's request), when the BYE went to the dialog's other party: its
        Request-URI the remote target that party gave at the dialog's start (the
        callee's 2xx, the caller's INVITE).  One the callee refused ended nothing
        (review 92); one routed to the sender's own UAS, answered 200 there, neither
        (review 94), nor one that went there along a Route past ours: the request
        route noted whether it went the dialog's way (``note_bye_way``; review 96)."""
        engine = self.app.engine
        if engine is None or _cseq_method() != "BYE":
            return
        status = KSR.pv.get("$rs") or 0
        if not 200 <= status < 300:
            return
        call_id, from_tag, to_tag = dialog_ids(KSR, of_request=True)
        if not (call_id and from_tag and to_tag):
            return
        found = _dialog_peer(call_id, from_tag, to_tag)
        if found is None:
            return
        peer = found[2][0]
        if _target(KSR.pv.get("$T_req($ou)"), contact=False) != peer \
                or not KSR.pv.get(_BYE_WAY_AVP):
            _info("e2m: a BYE's %d from elsewhere than the dialog's other party: its keys "
                  "stay to their expiry\n" % status)
            return
        engine.end_answered("BYE", status, call_id, from_tag, to_tag)
        _forget_targets(KSR, call_id, from_tag, to_tag)    # the key cache's gone() too

    def inspect_request(self):
        """Ask the engine; apply its verdict.  False when the request was answered."""
        try:
            message = _read_message()
            # ids the core will not read (too long, not visible ASCII) refuse the request
            # here, not in the archive after the engine read it (review 30)
            _ids = (message.call_id, message.from_tag, message.to_tag)
        except E2MError as exc:
            # Kamailio's parser is more lenient than the core's: still a bad request.
            _log_exception("parse", exc)
            KSR.statistics.update_stat("e2m_refused_400", 1)
            KSR.sl.send_reply(400, "Bad Request")
            return False
        verdict = self.app.engine.inspect(message)
        if verdict.error == "ReplayError":
            late = remembered_answer(KSR, message, verdict.replay_key)
            if late is not None:
                # the same signed request again after tm let its transaction go: its
                # sender lost the answer it got (review 123 HB2); nothing goes further
                _info("e2m: %s request a late copy of one answered %d: answered so again\n"
                      % (message.method, late[0]))
                KSR.sl.send_reply(*late)
                return False
        _info("e2m: %s request %s\n" % (message.method, _summary(verdict)))
        caller = self.app.engine.answer_caller(message, verdict, digest_user=self.digest_aor())
        if not self.observe(message, verdict, caller):
            # answered 500: the keys its body offered serve no transaction now (and
            # would sit on the caller's quota until their expiry)
            self.app.engine.end_attempt(message_scope(message), verdict.kept)
            return False
        if verdict.action == "reply":
            self.reply_with(verdict)
            return False
        _remove_headers(verdict.remove_headers)
        for name, value in verdict.add_headers:
            KSR.hdr.append(_header_line(name, value))
        self.note_caller(caller)
        if verdict.kept:
            KSR.pv.sets(_KEPT_AVP, ",".join(name.hex() for name in verdict.kept))
        note_answer_key(KSR, message, verdict.replay_key)
        return True

    def note_caller(self, caller):
        """Keep with the transaction who pays for a key an answer to this request offers,
        and for the answer's place in the archive's spool (``ProxyEngine.answer_caller``:
        the user digest proved, else the From when the body's signature and signed
        context proved it).  An AVP set in the request route follows the transaction
        into tm's reply route, which reads it instead of parsing the request again
        ($T_req)."""
        KSR.pv.sets(_CALLER_AVP, caller)
        received = KSR.pv.get("$ou") or ""
        KSR.pv.sets(_CALLEE_AVP, self.onward or received)
        KSR.pv.sets(_SENT_TO_AVP, self.sent_to())

    def sent_to(self):
        """Where the request went, as the archive writes it: the Request-URI as received,
        and the next hop of a Route set past us when it followed one."""
        received = KSR.pv.get("$ou") or ""
        return "%s via %s" % (received, self.onward) if self.onward else received

    def digest_aor(self):
        """The AoR digest authentication proved for this request, or None.  auth_db
        checks user names only (use_domain 0) and the From may write any host name of
        ours: the user is named in our first domain (or the realm), one AoR however the
        From was spelled."""
        if self.authenticated is None:
            return None
        config = self.app.config
        domain = config.kamailio.domains[0] if config.kamailio.domains else config.auth.realm
        return "sip:%s@%s" % (self.authenticated, domain)

    def inspect_only(self, archive=True):
        """For ACK and CANCEL: they cannot be refused, but what they carry is recorded
        (not with ``archive`` false), and a policy in our name goes as from any request
        (review 58).  An ACK the engine would refuse, or cannot read, goes on all the
        same, logged and counted (``e2m_acks_unread``; review 113: it was neither; a
        CANCEL's body goes nowhere, tm sends a CANCEL of its own), unless it is refused
        as a response would be (``readable_ack``: plaintext the view refuses, a late
        offer's answer spelt so that only the callee's stack reads it, or a message the
        core cannot take apart; review 141): such an ACK is dropped, the callee's 2xx is
        repeated, and its ACKs are dropped until it ends the call.  False when it must not go on: that, or a policy in our name
        that could not be taken out."""
        if self.app.engine is None:
            return True
        method = KSR.pv.get("$rm")
        try:
            # an ACK's reading is the one ``readable_ack`` made: read twice, its body cost
            # two budgets of public-key work (review 158 K2)
            message, reading = self.readable_ack() if method == "ACK" \
                else (_read_message(), None)
            if message is None:
                return False
            verdict = self.app.engine.inspect(message, reading=reading)
        except Exception as exc:  # noqa: BLE001 - never block an ACK or CANCEL for it
            _log_exception("inspect %s" % method, exc)
            if method == "ACK":
                KSR.statistics.update_stat("e2m_acks_unread", 1)
            return True
        _info("e2m: %s request %s\n" % (message.method, _summary(verdict)))
        if verdict.action != "forward" and method == "ACK":
            KSR.statistics.update_stat("e2m_acks_unread", 1)
        try:
            if archive and (verdict.seen or verdict.media):
                self.observe(message, verdict, self.app.engine.answer_caller(
                    message, verdict, digest_user=self.digest_aor()))
        except Exception as exc:  # noqa: BLE001 - the header check below still runs
            _log_exception("record %s" % method, exc)
        try:
            _remove_headers(verdict.remove_headers)
        except Exception as exc:  # noqa: BLE001 - fail closed: ours would go on
            _log_exception("inspect %s" % method, exc)
            _warn("e2m: a %s whose header in our name could not be removed: dropped\n"
                  % method)
            return False
        return True

    def readable_ack(self):
        """This ACK (it carries a body or a policy header) and its body's reading, for
        ``inspect``; (None, None) when it is dropped, logged and counted: read as
        ``read_reply`` reads a response, it is one the core could not take apart or
        whose body is refused (``response_refused``).  A body sealed for others still
        goes on (an ACK cannot be answered 496)."""
        engine = self.app.engine
        try:
            ack = _read_message()
            engine.check_readable(ack)
        except E2MError as exc:
            why = type(exc).__name__
        else:
            reading = engine.read_response(ack)
            if not engine.response_refused(reading):
                return ack, reading
            why = type(reading.error).__name__
        KSR.statistics.update_stat("e2m_acks_unread", 1)
        _warn("e2m: ACK from %s with a body the view refuses (%s): dropped\n"
              % (KSR.pv.get("$si"), why))
        return None, None

    def observe(self, message, verdict, caller, stray=False):
        """Archive and log what was seen, a spooled message charged to ``caller`` (None:
        the unauthenticated group; a ``stray`` reply, whose caller this node cannot
        know: its bound signer's answers).  False when the request was answered 500."""
        if verdict.seen:
            KSR.statistics.update_stat("e2m_bodies_opened", len(verdict.seen))
        if message.is_request:
            responder, sent_to = None, self.sent_to()
        else:      # kept with the transaction (none for a cluster's stray reply)
            responder, sent_to = _kept(_CALLEE_AVP), _kept(_SENT_TO_AVP)
        try:
            for line in self.app.observe(message, verdict, responder=responder,
                                         sent_to=sent_to, share=caller, stray=stray):
                _info(line + "\n")
        except ArchiveError as exc:
            _log_exception("archive", exc)
            if self.app.archiving_blocks(message):
                KSR.sl.send_reply(500, "Archive Unavailable")
                return False
        return True

    def reply_with(self, verdict):
        for name, value in verdict.add_headers:
            KSR.hdr.append_to_reply(_header_line(name, value))
        if verdict.body:
            # Byte-exact (the 496 body is DER): decoded by the native block in the cfg.
            KSR.pv.sets("$var(e2m_body)", base64.b64encode(verdict.body).decode("ascii"))
            KSR.pv.sets("$var(e2m_ctype)", verdict.content_type or "application/octet-stream")
            KSR.route("E2M_REPLY_BODY")
        if int(verdict.code) in _COUNTED_REFUSALS:
            KSR.statistics.update_stat("e2m_refused_%d" % int(verdict.code), 1)
        KSR.sl.send_reply(int(verdict.code), verdict.reason or "Refused")

    # -- core reply route: every reply, before tm.  Defined so Kamailio finds it: a
    # missing callback method leaves an AttributeError pending in the interpreter, and
    # the next KSR call of the tm onreply route then raises SystemError.
    def ksr_reply_route(self, msg):
        try:
            return self.core_reply_route()
        finally:
            if self._reply_ops is not None:
                # operations reserved for a reading that never came (the reply was
                # dropped before it, or the reading failed): given back
                _settle_reply_ops(self._reply_ops[1], self._reply_ops[2], 0)
                self._reply_ops = None

    def core_reply_route(self):
        if self.app.config.dispatcher is not None and not self.from_a_node():
            return 0
        # (its $mi, the keys its public-key work counts under, what it may spend)
        self._reply_ops = None
        try:
            if self.app.engine is not None:
                if KSR.tm.t_check_trans() <= 0:
                    if not self.exempt_source() and self.source_banned():
                        # a stray the engine would read (private-key work for anyone's
                        # body): counted and banned as the source's requests are (review 70)
                        KSR.set_drop()
                        return 0
                elif self.reply_needs_reading():
                    # one of ours: at most READS_PER_BRANCH read per branch and
                    # READS_PER_TRANSACTION per transaction, and OPS_PER_BRANCH and
                    # OPS_PER_TRANSACTION public-key operations spent reading them, the
                    # rest dropped unread (review 153 K1: a callee's 183s on one ringing
                    # INVITE were read at any rate; review 161 K2: 64 of them spent 2,048
                    # operations).  Nobody is banned: the caller decides how many replies
                    # a callee sends (review 154 K1: a stranger's calls got an honest
                    # callee banned, its own requests dropped).  From anyone: a trusted
                    # peer is spared pike's rates, not these (review 163 K2: its replies
                    # were read without a budget)
                    left = _reading_left()
                    if left is None:
                        KSR.set_drop()
                        return 0
                    self._reply_ops = (KSR.pv.get("$mi"), *left)
        except Exception as exc:  # noqa: BLE001 - unlimited then, never unread
            _log_exception("reply limits", exc)
        try:
            if _repeats_a_single_header():
                _warn("e2m: a %s with a second From, To, Call-ID or CSeq: dropped\n"
                      % KSR.pv.get("$rs"))
                KSR.set_drop()
                return 0
            problem = _framing_problem()
            if problem is not None:
                _warn("e2m: a %s %s: dropped\n" % (
                    KSR.pv.get("$rs"), "whose lines do not end in CRLF"
                    if problem == _BARE_LINE_ENDS else "that cannot be read as received"))
                KSR.set_drop()
                return 0
        except Exception as exc:  # noqa: BLE001 - the checks below still run
            _log_exception("reply framing checks", exc)
        try:
            moved = self.moved_route_entries()
        except Exception as exc:  # noqa: BLE001 - fail closed: we cannot vouch for it
            _log_exception("record-route check", exc)
            moved = ["?"]
        if moved:
            # a hop on the callee's side rewrote the entry the caller's side follows (to
            # itself, off TLS), or added one below it: her in-dialog requests and digest
            # would go there (reviews 81, 82).  Our token says we wrote the entry; its
            # address, or what follows it, says the route set is not what we sent on.
            _warn("e2m: a %s whose Record-Route names %s, not ours: dropped\n"
                  % (KSR.pv.get("$rs"), moved[0] if moved[0].startswith("(")
                     else "%d address(es)" % len(moved)))
            KSR.set_drop()
            return 0
        try:
            unreadable = self.read_reply()
            if unreadable is not None:
                # forwarded, it would reach the caller unread and unarchived (a Via only
                # we see, which Kamailio strips, made it so: review 64); only here may a
                # final reply be dropped (tm's reply route cannot)
                _warn("e2m: a %s %s that must be read and cannot be (%s): dropped\n"
                      % (KSR.pv.get("$rm"), KSR.pv.get("$rs"), unreadable))
                KSR.set_drop()
                return 0
        except Exception as exc:  # noqa: BLE001 - unreadable: tm's route reads it again
            _log_exception("reply checks", exc)
        try:
            if (KSR.pv.get("$rs") or 0) in CHALLENGE_HEADERS and \
                    KSR.tm.t_check_trans() <= 0 and self.own_realm_challenge():
                # a stray one (no transaction of ours) would go on statelessly; one of
                # ours is tm's reply route's to note
                KSR.set_drop()
                return 0
        except Exception as exc:  # noqa: BLE001 - the reply goes on regardless
            _log_exception("challenge check", exc)
        if self.app.certs is not None:
            try:
                self.app.certs.on_reply()      # a 481 to one of our NOTIFYs
            except Exception as exc:  # noqa: BLE001 - the reply goes on regardless
                _log_exception("certificate reply", exc)
        try:
            if KSR.tm.t_check_trans() <= 0:
                # forwarded statelessly: lumps set here go with it (tm's are set in
                # ksr_onreply_route, the route whose edits tm relays)
                self.drop_asserted_identity()
        except Exception as exc:  # noqa: BLE001 - the reply goes on regardless
            _log_exception("stray reply identity", exc)
        if self.app.engine is not None:
            try:
                self.route_stray_reply()
            except Exception as exc:  # noqa: BLE001 - the response goes on unchanged
                _log_exception("stray reply", exc)
        return 1

    def from_a_node(self):
        """[dispatcher] front: a reply comes from a node (dispatcher set 1): the front
        sends requests to nowhere else, and has no engine to read one, so a callee's
        answer sent past its node (to the front, whose address the request carries)
        would reach the caller unread, its policies unremoved (review 71).  Dropped
        otherwise, and when the dispatcher cannot be asked (fail closed)."""
        try:
            if KSR.dispatcher.ds_is_from_list(1) > 0:
                return True
        except Exception as exc:  # noqa: BLE001 - fail closed below
            _log_exception("front reply source", exc)
        _warn("e2m: a %s %s from %s, not a node of ours: dropped\n"
              % (KSR.pv.get("$rm"), KSR.pv.get("$rs"), KSR.pv.get("$si")))
        KSR.set_drop()
        return False

    def route_stray_reply(self):
        """A response that matches no transaction of ours is forwarded statelessly by
        the core; it is read here as tm's route would.  On a cluster, one to a request
        another node sent (its Via is the cluster's advertised address; a front or a
        floating address brought it here), read with the keys that node kept; on any
        proxy, a 2xx retransmitted after the transaction ended, or an answer whose
        branch in our Via a callee or hop changed, which would otherwise reach the
        caller unread and unarchived (review 69)."""
        if KSR.tm.t_check_trans() > 0:
            return            # ours: ksr_onreply_route reads it
        try:
            self.route_reply(stray=True)
        finally:
            try:
                self.note_dialog_targets(stray=True)   # once read: are keys kept
            except Exception as exc:  # noqa: BLE001 - the keys then go at their expiry
                _log_exception("dialog targets", exc)

    # -- htable events ([cluster]): an expired key cache record (a scope's keys) counts
    def ksr_htable_event(self, *args):
        evname = args[-1] if args else ""
        if evname == "htable:expired:e2mkeys":
            KSR.statistics.update_stat("e2m_ceks_expired", 1)
        return 1

    # -- rtimer ([cluster], every 5 s): DMQ peers up into e2m_dmq_peers_up
    def ksr_cluster_timer(self, msg, evname):
        try:
            KSR.jsonrpcs.execx('{"jsonrpc": "2.0", "method": "dmq.list_nodes", "id": 1}')
            nodes = json.loads(KSR.pv.get("$jsonrpl(body)") or "{}").get("result") or []
            up = sum(1 for node in nodes if isinstance(node, dict)
                     and node.get("status") == "active" and not node.get("local"))
            KSR.statistics.reset_stat("e2m_dmq_peers_up")
            if up:
                KSR.statistics.update_stat("e2m_dmq_peers_up", up)
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("cluster timer", exc)
        return 1

    # -- rtimer ([cluster] sync gate, every 200 ms): ready once caught up with the peers
    def ksr_sync_timer(self, msg, evname):
        try:
            SYNC_GATE.tick()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("sync gate timer", exc)
        return 1

    # -- tm onreply route --------------------------------------------------------
    def ksr_onreply_route(self, msg):
        try:
            # a callee's answer may no more assert an identity than a request (review 67)
            self.drop_asserted_identity()
        except Exception as exc:  # noqa: BLE001 - the reply is still read below
            _log_exception("reply identity", exc)
        try:
            self.end_answered_dialog()
        except Exception as exc:  # noqa: BLE001 - the keys go at their expiry instead
            _log_exception("dialog end", exc)
        try:
            if self.app.config.dispatcher is not None and _cseq_method() == "REGISTER" \
                    and 200 <= (KSR.pv.get("$rs") or 0) < 300:
                # a front counts for its nodes: what the node's registrar bound (review 85)
                self.settle_registration(_replied_seconds(), in_reply=True)
        except Exception as exc:  # noqa: BLE001 - the slot keeps its claimed lifetime
            _log_exception("registration count", exc)
        try:
            if self.own_realm_challenge():
                KSR.pv.seti(_OWN_CHALLENGE_AVP, 1)     # the failure route answers 502
                return 1
            self.route_reply()
        except Exception as exc:  # noqa: BLE001 - the response goes on unchanged
            _log_exception("reply route", exc)
        try:
            self.note_dialog_targets()     # once read: whether it left the dialog keys
        except Exception as exc:  # noqa: BLE001 - the keys go at their expiry instead
            _log_exception("dialog targets", exc)
        try:
            remember_answer(KSR)           # for the request's late copies (late_copies.py)
        except Exception as exc:  # noqa: BLE001 - a late copy is then refused as a replay
            _log_exception("answer memory", exc)
        return 1

    def reply_needs_reading(self):
        """Whether the engine must read this reply (a 1xx above 100 or a final one with a
        body or a ``Proxy-Body-Policy``: ``ProxyEngine.response_needs_reading``)."""
        status = KSR.pv.get("$rs") or 0
        return status >= 101 and self.app.engine.response_needs_reading(
            _cseq_method(), status, has_body=_has_body(),
            has_policy=KSR.hdr.is_present(PROXY_BODY_POLICY) > 0)

    def read_reply(self):
        """Read the reply now if the engine must read it (kept for ``route_reply``).
        None when it was read or needs no reading; else why it cannot be read: the core
        refuses it (a header it will not take, ids it will not read, review 30), and
        the caller must not get what the proxy could not read."""
        self._reply = None       # an exception below leaves route_reply to read it
        mark = KSR.pv.get("$mi")
        engine = self.app.engine
        if engine is None or not self.reply_needs_reading():
            self._reply = (mark, None, None)   # e.g. a 200 to MESSAGE: nothing to inspect
            return None
        try:
            message = _read_message()
            engine.check_readable(message)
        except E2MError as exc:
            return "%s: %s" % (type(exc).__name__, exc)
        # the body read here, once: what the view refuses (SDP spelt so that only the
        # caller's stack reads it, a part that does not parse) is dropped now, as tm's
        # route could not; tm's route applies the rest with the transaction's caller
        counted = self._reply_ops if self._reply_ops and self._reply_ops[0] == mark else None
        self._reply_ops = None          # settled once, below
        spent = 0
        try:
            reading = engine.read_response(message, max_public_key_ops=counted[2]
                                           if counted else None)
            spent = reading.public_key_ops
        finally:
            if counted:
                _settle_reply_ops(counted[1], counted[2], spent)
        if engine.response_refused(reading):
            return "%s: %s" % (type(reading.error).__name__, reading.error)
        self._reply = (mark, message, reading)
        return None

    def route_reply(self, stray=False):
        """Read a response: of one of our transactions, or (``stray``) one matching
        none (``route_stray_reply``).  The core reply route read it already
        (``read_reply``), or dropped it."""
        if self._reply is None or self._reply[0] != KSR.pv.get("$mi"):
            if self.read_reply() is not None:
                return   # not this route's to drop: the core reply route did, or will
        _, message, reading = self._reply
        self._reply = None
        if message is None:
            return
        asked = []

        def caller():
            asked.append(_caller())
            return asked[-1]
        verdict = self.app.engine.inspect(message, caller=caller, reading=reading)
        # who paid for a key the answer offered (asked only then)
        charged = " caller=%s" % _loggable(asked[0]) if asked else ""
        _info("e2m: %s response %s %s%s\n" % (message.method, message.status,
                                                 _summary(verdict), charged))
        self.observe(message, verdict, asked[0] if asked else _caller(), stray=stray)
        _remove_headers(verdict.remove_headers)
        for name, value in verdict.add_headers:
            KSR.hdr.append(_header_line(name, value))

    def own_realm_challenge(self):
        """A 401/407 from downstream with a challenge in our own realm (or one whose
        realm cannot be read for sure): only this proxy may challenge in its realm, and
        a UA that answered would hand the sender (a callee, a hop further on) a digest
        response to test password guesses against offline (review 27).  A front
        relays its nodes' challenges: never its concern."""
        auth = self.app.config.auth
        if auth is None or self.app.config.dispatcher is not None:
            return False
        if (KSR.pv.get("$rs") or 0) not in CHALLENGE_HEADERS:
            return False
        tx = KSR.textopsx
        wanted = {canonical_name(h) for h in CHALLENGE_HEADERS.values()}
        tx.hf_iterator_start(_ITERATOR)
        try:
            while tx.hf_iterator_next(_ITERATOR) > 0:
                if canonical_name(tx.hf_iterator_hname(_ITERATOR) or "") in wanted and \
                        names_realm(tx.hf_iterator_hbody(_ITERATOR) or "", auth.realm):
                    break
            else:
                return False
        except Exception as exc:  # noqa: BLE001 - unreadable (octets that are not UTF-8):
            # fail closed, a client may read it as ours (review 29)
            _warn("e2m: a %s from downstream with a challenge we cannot read (%s)\n"
                  % (KSR.pv.get("$rs"), type(exc).__name__))
        finally:
            tx.hf_iterator_end(_ITERATOR)
        _warn("e2m: a %s from downstream challenges in our realm: refused\n"
              % KSR.pv.get("$rs"))
        return True

    # -- tm failure route: the request's transaction ended without success -----------
    def ksr_failure_route(self, msg):
        try:
            if KSR.pv.get(_OWN_CHALLENGE_AVP):
                self.drop_attempt_keys()
                KSR.tm.t_reply(502, "Bad Gateway")
                return 1
            if self.app.config.dispatcher is not None and self.failover():
                return 1
            self.drop_attempt_keys()
            self.end_failed_invite_notes()
            self.relay_retry_after()
        except Exception as exc:  # noqa: BLE001 - tm sends the failure on regardless
            _log_exception("failure route", exc)
        return 1

    @staticmethod
    def relay_retry_after():
        """A downstream 503 with a Retry-After is answered 500 with that Retry-After.
        tm sends no 503 on (RFC 3261 16.7 step 6) but builds its 500 from the request,
        none of the reply's headers in it: the certificate service's "busy, try again
        in 2 s" reached a phone behind a visited proxy as a bare failure (review 123).
        Only delta-seconds are copied (at most six digits)."""
        if KSR.pv.get("$T_reply_code") != 503:
            return
        seconds = retry_after_seconds(KSR.pv.get("$T_rpl($hdr(Retry-After))"))
        if seconds is not None:
            KSR.hdr.append_to_reply("Retry-After: %d\r\n" % seconds)
            KSR.tm.t_reply(500, "Server Internal Error")

    def end_failed_invite_notes(self):
        """An INVITE whose transaction failed (every branch answered 3xx-6xx, or timed
        out) rings no more: its branch note is kept 32 s more (a late 2xx, RFC 3261's
        Timer B), not ``max_inv_lifetime``'s 222 s, and its caller's target, noted for
        a dialog that did not come, goes when this transaction wrote it (another
        INVITE under alice's Call-ID and tag, failing while hers rings, must not take
        hers; stop 41).  Strangers' INVITEs answered 486 at 240 a
        second left 600 bytes of notes each, for 222, 64 and 32 s, more than tm's own
        memory for them, and filled 32 MB (review 120)."""
        if KSR.pv.get("$rm") != "INVITE":
            return
        note = _branch_note()
        if note is not None and KSR.htable.sht_get(note[2], note[0]) is not None:
            KSR.htable.sht_setex(note[2], note[0], _FAILED_INVITE_NOTE)
        call_id, caller, _ = dialog_ids(KSR)
        if call_id and caller and self.app.engine is not None \
                and KSR.pv.get(_TARGET_MINE_AVP):
            name = _caller_name(call_id, caller)
            held = KSR.htable.sht_get(_TARGETS, name)
            if isinstance(held, str) and "|" not in held:     # not bound to a dialog
                KSR.htable.sht_rm(_TARGETS, name)

    def failover(self):
        """[dispatcher] front: the node did not answer at all (the branch timed out with no
        reply from it): it is taken out until a probe answers, and the request goes to
        the next node.  True when it went.  No reply counts, whatever it says: a callee
        can make one reach us unchanged (a response that matches none of the node's
        transactions is forwarded statelessly along its Vias, review 21), or make the
        node send one itself (its registrar's 503 to too many contacts, review 20); a
        timeout after the node replied (its 100, a callee ringing past fr_inv_timer) is
        the callee's (review 18).  A node that is catching up answers our probes 503
        too (the sync gate): the probes take it out."""
        if KSR.tm.t_is_canceled() > 0:
            return False
        if KSR.tm.t_branch_timeout() < 0 or KSR.tm.t_branch_replied() > 0:
            return False
        KSR.dispatcher.ds_mark_dst()
        if KSR.dispatcher.ds_next_dst() < 0:
            return False
        KSR.tm.t_on_failure("ksr_failure_route")
        return KSR.tm.t_relay() > 0

    # -- rtimer (a process of its own, every second): the certificate service's NOTIFYs
    def ksr_cert_timer(self, msg, evname):
        try:
            self.app.certs.on_timer()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("certificate timer", exc)
        return 1

    # -- rtimer (a process of its own, every 2 s): the replay claims' database --------
    def ksr_claims_timer(self, msg, evname):
        try:
            self.app.tend_replay_claims()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("replay claims timer", exc)
        return 1

    # -- rtimer (a process of its own, every second): the shared archive's spool -------
    def ksr_archive_replay(self, msg, evname):
        try:
            self.app.replay_archive()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            _log_exception("archive replay", exc)
        return 1

    def drop_attempt_keys(self, answer_may_follow=True):
        """Keys kept for a transaction that ended without success (a failure answer,
        tm's own 408, a CANCEL's 487, a relay that failed) go now, not at their expiry:
        only those its own request kept afresh (``$avp(e2m_kept)``), in that request's
        scope (an INVITE's early dialog, a MESSAGE's transaction).  A request inside a
        dialog drops nothing: the dialog lives on.  An INVITE that went out keeps them
        for a late 2xx a while (``answer_may_follow``, ``ProxyEngine.end_attempt``)."""
        engine = self.app.engine
        names = _request_kept()
        if engine is None or not names or KSR.pv.get("$tt"):
            return
        engine.end_attempt(message_scope(_read_message()), names,
                           answer_may_follow=answer_may_follow)

    # -- xhttp: the certificate at its URL -------------------------------------------
    def ksr_xhttp_event(self, msg, evname):
        try:
            self.route_http()
        except Exception as exc:  # noqa: BLE001
            _log_exception("http", exc)
            KSR.xhttp.xhttp_reply(500, "Server Error", "text/plain", "error\n")
        return 1

    def route_http(self):
        path = (KSR.pv.get("$hu") or "").split("?", 1)[0]
        method = KSR.pv.get("$rm") or ""
        if self.app.engine is None or path not in self.app.cert_paths():
            KSR.xhttp.xhttp_reply(404, "Not Found", "text/plain", "not found\n")
            return
        if method not in ("GET", "HEAD"):
            KSR.xhttp.xhttp_reply(405, "Method Not Allowed", "text/plain", "GET only\n")
            return
        KSR.pv.seti("$var(e2m_code)", 200)
        KSR.pv.sets("$var(e2m_reason)", "OK")
        KSR.pv.sets("$var(e2m_ctype)", "application/pkix-cert")
        KSR.pv.sets("$var(e2m_body)",
                    base64.b64encode(self.app.engine.certificate_der).decode("ascii"))
        KSR.route("E2M_HTTP_BODY")
