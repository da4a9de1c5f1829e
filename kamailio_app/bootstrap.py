"""What the KEMI script needs besides KSR: configuration, the engine, the services.

Kept apart from ``kemi.py`` so it can be built and exercised outside Kamailio (the
launcher validates with it, tests read what it wrote).  ``ProxyApp.load`` is run
once in Kamailio's main process before the workers fork, so a broken config stops
Kamailio at start instead of failing every request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, canonical_method, parse_address
from e2m_plugins.keycache import TRANSACTION_TTL
from e2m_plugins.uri import canonical_ip

from .archive import ArchiveError, ArchiveStore, BodyRecord, MediaRecord, content_uid
from .archive_spool import ArchiveEvents, answer_share
from .archive_store import open_archive, open_shared
from .replay_claims import ClaimedReplayCache, KsrAwayFlag, replay_claims
from .replay_htable import REPLAY_TABLE, HtableReplayCache
from .config import AppConfig, load_app_config
from . import dialog_targets
from .dialog_route import RouteTokens
from .keycache_htable import HtableKeyCache, KsrHtable

__all__ = ["ProxyApp", "KEYCACHE_TABLE", "body_records", "media_records", "media_log_lines",
           "ksr_events", "cluster_seal_key", "identity_key", "route_tokens", "dmq_peer_sources", "public_dmq_warning"]

KEYCACHE_TABLE = "e2mkeys"   # declared in the cfg template


def _uri(message: SipMessage, name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    try:
        return parse_address(value).uri
    except E2MError:
        return None


def _direction(message: SipMessage) -> str:
    return "request" if message.is_request else "response"


def _identity(message: SipMessage, seen: Sequence[Any] = ()) -> tuple[Any, ...]:
    """What tells one message of a dialog from another (not its copies apart): its ids
    and the times its bodies' signed contexts carry.  A copy (a retransmission, a
    hop's, another node's, one re-encoded in another Content-Transfer-Encoding) carries
    the same; the same words signed anew an hour later under the same ids, once the
    replay record has gone, carry another time: a second row (review 84).  Not the
    body's octets: its unsigned MIME wrapping is anyone's to re-encode, and each
    re-encoding was a row (review 86).  An unbound body (unsigned, or an older
    sender's without a context) carries no time: sent again byte for byte it is one
    row."""
    number, method = message.cseq
    return (message.call_id, message.from_tag, message.to_tag, number, method, message.status,
            [getattr(body, "signed_at", None) for body in seen])


def as_utf8(text: str | None) -> str | None:
    """``text`` as a database or Kamailio's log takes it: header octets that are not
    UTF-8 (which the core keeps as surrogates, to give them back byte-exact) written as
    ``\\xNN``.  Else the insert or the log call raises: a body would go unarchived, a
    route would stop (review 26's lead; the core refuses such URIs before it reads a
    body, so this guards what reaches the archive and the log)."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def body_records(message: SipMessage, seen: Any, *, responder: str | None = None,
                 sent_to: str | None = None) -> list[BodyRecord]:
    """Archive rows for the bodies ``verdict.seen`` reports for ``message``.

    ``from_uri`` is who sent the body: the From of a request; for a response, the
    ``responder`` its request was sent to (which the host kept with the transaction:
    the Request-URI as received, or the next hop of a Route set it followed), never
    a To, which whoever writes the message chooses (reviews 32, 33).  Without one (a
    cluster's stray reply) only a body the response's To signed names that To; else
    nobody.  An ACK is never challenged, and either party of the dialog can write the
    other's (the route token binds what both know; reviews 99, 101): only a body its
    From signed for this very ACK (``SeenBody.bound``) names it; else nobody.
    ``to_uri`` is the other party.  ``request_uri`` is where the request went
    (``sent_to``; for a request, by default its Request-URI)."""
    if message.is_request:
        target = sent_to or message.request_uri
        sender = _uri(message, "From")
        senders = [sender if canonical_method(message.method) != "ACK" or item.bound else None
                   for item in seen]
    else:
        target = sent_to
        senders = [responder or (_uri(message, "To") if item.bound else None)
                   for item in seen]
    receiver = "To" if message.is_request else "From"
    return [BodyRecord(call_id=message.call_id, from_uri=as_utf8(origin),
                       to_uri=as_utf8(_uri(message, receiver)), method=message.method,
                       direction=_direction(message), status=message.status,
                       content_type=as_utf8(item.content_type) or "",
                       plaintext=item.plaintext, sha256=item.sha256,
                       signature=item.signature, signer=as_utf8(item.signer),
                       cid=as_utf8(item.cid), request_uri=as_utf8(target))
            for item, origin in zip(seen, senders)]


def _codecs(line: Any) -> str:
    return ", ".join(f"{pt} {name}" for pt, name in line.codecs)


def _bound_signer(seen: Any) -> str | None:
    """The signer of the first body signed for this very message (bound), if any."""
    return next((item.signer for item in seen if item.bound and item.signer), None)


def media_records(message: SipMessage, media: Any) -> list[MediaRecord]:
    """Media rows for the ``MediaLine``s of the SDP seen in ``message``."""
    return [MediaRecord(call_id=message.call_id, method=message.method,
                        direction=_direction(message), media=as_utf8(line.media) or "",
                        address=as_utf8(line.address), port=line.port,
                        port_count=line.port_count, proto=as_utf8(line.proto) or "",
                        codecs=as_utf8(_codecs(line)) or "",
                        flow=as_utf8(line.direction), rtcp_port=line.rtcp_port,
                        rtcp_address=as_utf8(line.rtcp_address))
            for line in media]


def media_log_lines(message: SipMessage, media: Any) -> list[str]:
    """One info line per media stream: what a firewall would open, and no keys."""
    where = f"{message.method} {_direction(message)}"
    if not message.is_request:
        where += f" {message.status}"
    return [f"e2m media: {where} {line.media} {line.address or '-'}:{line.port}"
            f"{'/' + str(line.port_count) if line.port_count > 1 else ''} {line.proto} "
            f"{line.direction}"
            + (f" rtcp {line.rtcp_address or '-'}:{line.rtcp_port}"
               if line.rtcp_port is not None else "") for line in media]


def identity_key(proxy_config: Any, label: bytes) -> bytes:
    """A 32-byte key every node holding the proxy's private key derives alike, and
    nobody else: HKDF over the key with a label of its own per use, so a derived key
    says nothing about the private key or about the other derived keys."""
    der = proxy_config.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=label + proxy_config.host.encode()).derive(der)


def cluster_seal_key(proxy_config: Any) -> bytes:
    """The key that seals key-cache entries on every node of a cluster.

    From the proxy's private key, which every node holds (a UA encrypts for the
    proxy's certificate, and any node may have to open it) and a rogue DMQ peer does
    not: an entry it forges does not open."""
    return identity_key(proxy_config, b"e2m key cache seal v1 ")


def route_tokens(proxy_config: Any | None) -> RouteTokens:
    """The Record-Route tokens (``dialog_route``): alike on every node of a cluster and
    across restarts when the proxy has an identity; made at start when it has none."""
    if proxy_config is None:
        return RouteTokens.random()
    return RouteTokens(identity_key(proxy_config, b"e2m record-route v1 "))


def ksr_events(ksr: Any) -> ArchiveEvents:
    """The archive's reports inside Kamailio: its log, and the statistics module's
    counters (declared in the cfg) that ``kamcmd stats.get_statistics`` reads."""
    levels = {"error": ksr.err, "warn": ksr.warn, "info": ksr.info}

    def log(level: str, line: str) -> None:
        levels.get(level, ksr.info)(line + "\n")

    def counter(name: str, n: int) -> None:
        ksr.statistics.update_stat(name, n)

    return ArchiveEvents(log=log, counter=counter)


def public_dmq_warning(cluster: Any) -> str | None:
    """A line for the log when this node's DMQ socket is on a globally routable address.

    KDMQ is taken from a configured peer's address and port alone, and DMQ is UDP: an
    off-path sender that reaches the socket can forge a peer's source and write into
    the replicated tables (docs/threat-model.md, "a rogue DMQ peer").  A host name is
    not judged (Kamailio resolves it)."""
    address = getattr(cluster, "dmq_address", None) if cluster is not None else None
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(str(address.host).strip("[]"))
    except ValueError:
        return None
    if not ip.is_global:
        return None
    return ("e2m: [cluster] dmq_address %s is a public address: anyone who reaches it can "
            "forge KDMQ from a peer's address over UDP; keep DMQ on the nodes' own network "
            "(a private VLAN, or IPsec between them)" % address)


def tls_next_hop_warning(kamailio: Any) -> str | None:
    """A line for the log when the next hop is reached over TLS: Kamailio 5.6 checks
    its certificate's chain to ``[tls] ca`` and not its name, so any certificate that
    CA issued (another proxy's identity, the default ``[tls] cert``) is taken for the
    next hop (review 67, a known limit in docs/threat-model.md)."""
    if not kamailio.next_hop_tls:
        return None
    return ("e2m: next_hop %s is reached over TLS and Kamailio checks only that its "
            "certificate chains to [tls] ca, not the name in it: give [tls] ca a CA that "
            "issues no certificate but the next hop's" % kamailio.next_hop)


def dmq_peer_sources(cluster: Any) -> frozenset[tuple[str, int]]:
    """Every (address, port) of the [cluster] peers; a DNS name is resolved here, once,
    to all its addresses (with this node's DMQ port, as multi_notify does)."""
    names = [(peer.host, peer.port) for peer in cluster.peers]
    if cluster.peers_dns is not None:
        names.append((cluster.peers_dns, cluster.dmq_address.port))
    return _resolved(names)


def dmq_own_socket(cluster: Any) -> frozenset[tuple[str, int]]:
    """Every (address, port) this node's DMQ socket ([cluster] dmq_address) is: KDMQ is
    taken there alone, never on a SIP listener (review 40)."""
    return _resolved([(cluster.dmq_address.host, cluster.dmq_address.port)])


def _resolved(names: list[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    import socket
    out = set()
    for host, port in names:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            continue          # unknown now: such a peer is not let in
        out.update((canonical_ip(str(info[4][0])), port) for info in infos)
    return frozenset(out)


@dataclass
class ProxyApp:
    """The loaded proxy: settings, the engine (None on a plain routing hop), the archive."""

    config: AppConfig
    engine: Any = None          # e2m_plugins.proxy.ProxyEngine
    archive: ArchiveStore | None = None
    events: ArchiveEvents | None = None
    certs: Any = None           # cert_route.CertService: the [certs] service, or None
    routes: RouteTokens = field(default_factory=RouteTokens.random)  # in-dialog routing
    _dmq_sources: frozenset[tuple[str, int]] | None = None
    _dmq_socket: frozenset[tuple[str, int]] | None = None

    @classmethod
    def load(cls, config_path: str | Path, ksr: Any = None) -> ProxyApp:
        """Read PROXY.toml and build what it asks for.

        ``ksr`` is the KSR module inside Kamailio (for the shared key cache); outside
        Kamailio the engine gets an in-process cache, which is only right for tools
        that handle one message at a time.
        """
        config = load_app_config(config_path)
        if not config.e2m.enabled:
            return cls(config)
        from e2m_plugins.config import load_proxy_config
        from e2m_plugins.proxy import ProxyEngine
        proxy_config = load_proxy_config(config.path)
        replay: Any = None     # outside Kamailio: the engine's own, in this process
        if ksr is not None:
            expire = float(config.kamailio.keycache_expire)
            cluster = config.cluster if config.cluster and config.cluster.replicates else None
            cache: Any = HtableKeyCache(
                KsrHtable(ksr, KEYCACHE_TABLE), default_ttl=expire, max_ttl=expire,
                transaction_ttl=min(TRANSACTION_TTL, expire),
                seal_key=cluster_seal_key(proxy_config) if cluster else None,
                origin=str(cluster.dmq_address) if cluster else "",
                count=ksr.statistics.update_stat,
                refused=lambda key: ksr.warn(f"e2m: key cache entry {key[:80]} does not "
                                             "open (forged, or sealed elsewhere): refused\n"),
                gone=dialog_targets.forgetter(ksr))
            replay = HtableReplayCache(KsrHtable(ksr, REPLAY_TABLE),
                                       window=proxy_config.replay_window)
        else:
            from e2m_plugins.keycache import MemoryKeyCache
            cache = MemoryKeyCache()
        events = ksr_events(ksr) if ksr is not None else ArchiveEvents()
        if replay is not None and cluster is not None:
            # DMQ brings a node's records to the others after the fact: the first claim
            # in the shared database decides (review 37)
            replay = ClaimedReplayCache(replay, replay_claims(cluster), events=events,
                                        away=KsrAwayFlag(ksr))
        archive = open_archive(config, events)
        if archive is not None:
            archive.ensure_schema()
        elif isinstance(replay, ClaimedReplayCache):
            # the claims' table is in the archive's schema (review 40): checked the same
            open_shared(config).ensure_schema()
        certs = None
        if config.certs is not None:
            from .cert_route import CertService
            db = None
            if config.cluster is not None:
                # the nodes share one service: each its own SQLite file told others'
                # followers that bob had no certificate (review 122)
                from .cert_table_pg import PostgresCertDatabase
                db = PostgresCertDatabase(config.cluster.db)
            certs = CertService(config.certs, proxy_config.trust_anchors, ksr, db=db,
                                listeners=config.kamailio.listen)
            # an unusable file stops the start, not a request; a cluster's database may be
            # down while a node starts (the archive's spool covers that; the service
            # answers 500 meanwhile): a node with [certs] did not start (stop 40's CI)
            certs.db.ensure_schema(unreachable_ok=True)
            certs.db.close()             # each process connects on its own after the fork
        return cls(config, ProxyEngine(proxy_config, cache, replay=replay), archive, events,
                   certs, route_tokens(proxy_config))

    @property
    def e2m(self) -> bool:
        return self.engine is not None

    def cert_paths(self) -> set[str]:
        """URL paths at which the certificate is served: the configured one and the
        path of the policy header's cert-url (they normally agree)."""
        if self.engine is None:
            return set()
        paths = {self.config.kamailio.cert_path}
        url = getattr(self.engine.config, "cert_url", None)
        if url:
            paths.add(urlsplit(url).path or "/")
        return paths

    def observe(self, message: SipMessage, verdict: Any, *, responder: str | None = None,
                sent_to: str | None = None, share: str | None = None,
                stray: bool = False) -> list[str]:
        """Hand what the verdict saw to the archive; return the media lines to log.

        Raises ``ArchiveError`` when the archive cannot be written; the caller
        decides (``[archive] fail_request_on_error``) what that means.  A shared
        archive may spool what its database cannot take now, except a request that
        must not go on unarchived (``fail_request_on_error``).  ``responder``,
        ``sent_to``: whom and where the request went (``body_records``).  ``share``:
        the transaction's authenticated caller (None: the unauthenticated group); a
        spooled request is charged to it, a response to the caller's answers share.
        ``stray``: a cluster's reply to another node's request, whose caller is not
        known here: charged to the answers of the signer its body was bound by, not
        to the share a stranger's stray replies fill (review 61).
        """
        seen = tuple(getattr(verdict, "seen", ()) or ())
        media = tuple(getattr(verdict, "media", ()) or ())
        if self.archive is not None and (seen or media):
            bodies = body_records(message, seen, responder=responder, sent_to=sent_to)
            lines = media_records(message, media)
            if message.is_request:
                charged = share
            else:
                charged = answer_share(share, signer=_bound_signer(seen) if stray else None)
            try:
                self.archive.record(bodies, lines, uid=content_uid(_identity(message, seen), bodies, lines),
                                    may_spool=not self.archiving_blocks(message),
                                    share=charged)
            except ArchiveError:
                if self.events is not None:
                    self.events.count("e2m_archive_failed")
                raise
        return media_log_lines(message, media)

    def archiving_blocks(self, message: SipMessage) -> bool:
        """Whether ``message`` must not go on unarchived (``[archive]
        fail_request_on_error``): a request that can still be answered 500.  An ACK or
        a CANCEL cannot be refused, so its bodies are spooled like a response's
        (review 61: a strict proxy relayed an ACK's SDP stored nowhere)."""
        return (self.config.archive.fail_request_on_error and message.is_request
                and message.method not in ("ACK", "CANCEL"))

    @property
    def replicates(self) -> bool:
        """[cluster] dmq_address: this node shares its state with peers over DMQ."""
        return self.config.cluster is not None and self.config.cluster.replicates

    @property
    def front(self) -> str | None:
        """[cluster] front: the dispatcher front this node record-routes (HOST:PORT)."""
        cluster = self.config.cluster
        return cluster.front if cluster is not None else None

    def dmq_accepts(self, source: tuple[str, int], proto: str, local: tuple[str, int]) -> bool:
        """Whether a KDMQ request is a peer's: from a peer's address and port, over UDP
        (DMQ's transport: a TCP connection can be opened from a peer's free port by
        anyone on its host), received on this node's DMQ socket (a forged source on a
        public SIP listener is not; review 40)."""
        cluster = self.config.cluster
        if cluster is None or not cluster.replicates or proto.lower() != "udp":
            return False
        return ((canonical_ip(local[0]), local[1]) in self.dmq_socket()
                and (canonical_ip(source[0]), source[1]) in self.dmq_sources())

    def dmq_socket(self) -> frozenset[tuple[str, int]]:
        """(address, port) of this node's DMQ socket, resolved once, at start."""
        cluster = self.config.cluster
        if cluster is None or not cluster.replicates:
            return frozenset()
        if self._dmq_socket is None:
            self._dmq_socket = dmq_own_socket(cluster)
        return self._dmq_socket

    def dmq_sources(self) -> frozenset[tuple[str, int]]:
        """(address, port) a KDMQ request may come from: the [cluster] peers (resolved
        once, at start: a DNS name may stand for several)."""
        cluster = self.config.cluster
        if cluster is None or not cluster.replicates:
            return frozenset()
        if self._dmq_sources is None:
            self._dmq_sources = dmq_peer_sources(cluster)
        return self._dmq_sources

    def tend_replay_claims(self) -> None:
        """The replay claims' timer (the cfg's rtimer, a process of its own, every 2 s):
        probe a database that was away, or delete expired claims."""
        tend = getattr(getattr(self.engine, "replay", None), "tend", None)
        if tend is not None:
            tend()

    def replay_archive(self) -> int:
        """Move what the spool holds into the shared archive (the cfg's rtimer calls
        this every second in a process of its own); how many messages moved."""
        replay = getattr(self.archive, "replay", None)
        return replay() if replay is not None else 0
