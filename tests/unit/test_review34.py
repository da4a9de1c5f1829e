"""Review 34 (an attacker's review of the archive spool's share per sender, f94124b).

Each spooled message is charged to a share (the transaction's authenticated caller, or
the one unauthenticated group) holding at most ``spool_share`` percent of the spool's
two bounds.  The share's byte bound is counted with ``message_weight``: the plaintexts
plus a fixed 512 bytes a row, "a fixed estimate: they are bounded, the plaintext is
not".  The node's byte bound counts the pages in use.

The flows here go through the real engine (``ProxyEngine.inspect``), the rows kemi
builds (``body_records``, ``media_records``, ``content_uid``), the share kemi names
(``ProxyEngine.answer_caller``) and the real spool (``SpoolFile`` under a stand-in
database that is away: ``tests/cluster/test_cluster_units.py``).

Both holes failed on f94124b (strict xfails).  Fixed: a media row names each payload
type once, with encoding names of at most 64 characters (``sdp._codecs``), and
``message_weight`` counts every column's octets of every row.
"""

from __future__ import annotations

import pytest

from kamailio_app.archive_spool import message_weight
from kamailio_app.bootstrap import _identity, body_records, media_records
from kamailio_app.archive import content_uid
from tests.cluster.test_cluster_units import _spooled

_MIB = 1024 * 1024
V_INVITE_MESSAGE = ("MESSAGE:text/plain", "INVITE:application/sdp")


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture()
def proxy(world):
    from e2m_lab.flows import TRUSTED, proxy_engine
    return proxy_engine(world, TRUSTED, view=V_INVITE_MESSAGE)


def _repeated_codec_sdp(repeats: int, name_len: int) -> bytes:
    """One m= line listing payload type 96 ``repeats`` times, one rtpmap giving 96 an
    encoding name of ``name_len`` octets: valid as the parser reads it (a format may be
    listed again; ``_codecs`` maps every listed copy)."""
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0",
             "m=audio 4000 RTP/AVP " + " ".join(["96"] * repeats),
             "a=rtpmap:96 %s/8000" % ("X" * name_len)]
    return ("\r\n".join(lines) + "\r\n").encode()


def _plain_sdp(size: int) -> bytes:
    """An ordinary offer of about ``size`` octets (a long session name)."""
    return ("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=%s\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
            "m=audio 4000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n" % ("x" * size)).encode()


def _strangers_invite(world, n: int, sdp: bytes):
    """A stranger's plaintext INVITE to bob (a From of another domain: never
    challenged), its own Call-ID."""
    from e2m_plugins.sip import make_request
    return make_request("INVITE", world.aor("bob"), from_uri=f"sip:eve{n}@rival.example",
                        to_uri=world.aor("bob"), call_id=f"junk-{n}@rival.example",
                        from_tag=f"e{n}", body=sdp, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:eve@192.0.2.1>")])


def _through(proxy, archive, message):
    """What kemi does with a request: inspect, name the share (``answer_caller``, no
    digest), build the rows and record them (``ProxyApp.observe``)."""
    verdict = proxy.inspect(message)
    assert verdict.action == "forward", verdict
    share = proxy.answer_caller(message, verdict)
    bodies = body_records(message, verdict.seen, sent_to=message.request_uri)
    media = media_records(message, verdict.media)
    archive.record(bodies, media, uid=content_uid(_identity(message), bodies, media),
                   share=share)
    return share, bodies, media


def _alices_message(world, proxy, archive, text: bytes):
    from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, V_INVITE_MESSAGE),))
    sent = alice.protect(message(world, text)).message
    share, _, _ = _through(proxy, archive, sent)
    assert share == world.aor("alice")           # her own share: signed, bound context
    return share


def _stored_text(bodies, media) -> int:
    """The octets the rows' columns hold (what the spool's pages must keep), indexes
    not counted."""
    total = 0
    for row in list(bodies) + list(media):
        for value in vars(row).values():
            if isinstance(value, (str, bytes)):
                total += len(value)
    return total


def _flood_then_alice(world, proxy, tmp_path, sdp: bytes, strangers: int):
    archive, shared, lines = _spooled(tmp_path, max_bytes=4 * _MIB)
    shared.down = True
    for n in range(strangers):
        share, _, _ = _through(proxy, archive, _strangers_invite(world, n, sdp))
        assert share == "unauthenticated:"
    lost_before = archive.events.counts.get("e2m_archive_lost", 0)
    _alices_message(world, proxy, archive, b"alice's report")
    lost_after = archive.events.counts.get("e2m_archive_lost", 0)
    return archive, lost_before, lost_after, lines


def test_control_a_strangers_flood_of_ordinary_invites_leaves_alice_her_share(world, proxy,
                                                                             tmp_path):
    """Without the attack: twenty strangers' INVITEs with ordinary ~2 KB offers during
    the outage; they stay within the unauthenticated group's share and alice's signed
    MESSAGE is spooled."""
    archive, lost_before, lost_after, _ = _flood_then_alice(world, proxy, tmp_path,
                                                            _plain_sdp(2000), 20)
    assert lost_after == lost_before
    assert archive.pending() == 21


def test_control_a_messages_weight_covers_what_an_ordinary_offer_stores(world, proxy):
    _, bodies, media = _through_nothing(proxy, _strangers_invite(world, 0, _plain_sdp(2000)))
    assert message_weight(bodies, media) >= _stored_text(bodies, media)


def _through_nothing(proxy, message):
    verdict = proxy.inspect(message)
    return verdict, body_records(message, verdict.seen), media_records(message, verdict.media)


def test_hole_one_30kb_offer_stores_75mb_that_its_share_counts_as_31kb(world, proxy):
    """Attacker: off-path sender (a stranger's plaintext INVITE to one of our users is
    never challenged, and a proxy that views ``INVITE:application/sdp`` reads and
    archives its offer); equally any insider or any callee (an answer's SDP).

    Attack: an offer whose one ``m=`` line lists payload type 96 five thousand times
    (``m=audio 4000 RTP/AVP 96 96 96 ...``) and whose one ``a=rtpmap:96`` gives it an
    encoding name of 15000 octets: 30 KB in all, one UDP datagram.

    Effect: ``sdp._codecs`` maps every listed copy of 96, and ``media_records`` joins
    them into the media row's ``codecs`` column: 75 MB of text from a 30 KB body (the
    row is written to PostgreSQL as it is, or to the spool during an outage).
    ``message_weight`` charges it 31 KB (plaintext + 512 per row) against the sender's
    share, so the share check lies by a factor of 2400: at the defaults (256 MiB, 12 %)
    four such INVITEs, all within the strangers' share, fill the node's whole spool by
    pages and every user's message is lost for the rest of the outage (the next test).
    Outside an outage, each one writes 75 MB into the shared archive's PostgreSQL, and
    the worker builds a 75 MB string and a 75 MB statement per INVITE.

    Fix: bound what a media row may store (each payload type once: ``_codecs`` over
    the distinct formats, an encoding name bounded as RFC 4566 tokens are in practice,
    a bound on the codecs column); and make ``message_weight`` count every column's
    octets (or weigh the rows as encoded), not a fixed 512 a row."""
    sdp = _repeated_codec_sdp(5000, 15000)
    assert len(sdp) < 31_000
    verdict, bodies, media = _through_nothing(proxy, _strangers_invite(world, 0, sdp))
    assert verdict.action == "forward"
    stored = _stored_text(bodies, media)
    weight = message_weight(bodies, media)
    print(f"\noffer {len(sdp)} octets: rows hold {stored} octets, weigh {weight}")
    assert weight >= stored, (weight, stored)


def test_hole_a_strangers_repeated_codec_offers_fill_the_spool_and_alices_message_is_lost(
        world, proxy, tmp_path):
    """Attacker: off-path sender (a stranger, no account, no certificate).

    Attack: during a database outage, twenty plaintext INVITEs to bob, each a 2 KB offer
    listing payload type 96 300 times with a 1000-octet rtpmap encoding name (the test
    above at a scale a unit test can hold; the spool here is bounded at 4 MiB, the
    strangers' share at 12 %: 491 KiB and 1200 messages).

    Effect: each INVITE weighs 3 KB against the unauthenticated share (60 KB for the
    twenty, an eighth of the share) but stores 300 KB of media row: the node's bound
    (pages in use) is reached after about a dozen, and alice's signed MESSAGE, in her
    own, empty share, is lost: "the spool is full".  The share per sender (f94124b)
    promised that a stranger's flood loses only the strangers' messages.

    Fix: as above: the weight counts every octet a row stores, and a media row stores
    each payload type once (bounded)."""
    sdp = _repeated_codec_sdp(300, 1000)
    assert len(sdp) < 2100
    archive, lost_before, lost_after, lines = _flood_then_alice(world, proxy, tmp_path, sdp, 20)
    print(f"\nstrangers' lost: {lost_before}; last: {lines[-1][1] if lines else '-'}")
    assert lost_after == lost_before, "alice's message was lost: " + lines[-1][1]
