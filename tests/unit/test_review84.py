"""An eighty-fourth attacker's review (December 2026) of 4ad57e0: the insider UA, fresh
eyes (archive completeness and identity; core half).

Hole 1 (``test_hole_the_same_text_sent_again_an_hour_later_leaves_no_row``): attacker:
an insider UA (alice, digest-authenticated, her own client, her own certificate).
Messages: two MESSAGEs to bob through the home proxy (which views MESSAGE and archives),
an hour apart, each signed by her and sealed for bob and the proxy with a fresh signed
SIP context (its own time), both with the same Call-ID, From tag, CSeq number and
Content-ID and the same text ("Yes, approved.").  Effect: the proxy checks and forwards
both (the replay record of those ids, ``SipContext.replay_key``, which binds no time,
lives the window plus a transaction's lifetime, 332 s, and the second body is newer
than the stale floor it left), bob's engine opens and shows both (the phone's
``FirstCopy`` remembers 300 s), but ``content_uid`` digests nothing that tells the two
apart (not the signed time), so the second message gets the first one's ``message_uid``
and the archive's ``ON CONFLICT (message_uid, part)`` stores nothing: one row, with the
first message's time.  An insider who approves a second deal with
the words she used for the first leaves no trace of the second approval in the archive
(or, sending the words once early and again when it matters, leaves a row dated before
the question was asked).  The threat model promises "copies of one message share one
``message_uid``"; these are two messages the proxy itself accepted as two (its replay
check let the second through).
Code at fault: ``kamailio_app/archive.py::content_uid`` (and ``bootstrap._identity``):
the identity of a request is (Call-ID, tags, CSeq, method, status) plus recorded fields,
none of them the body's signed time.  Fix: carry the signed context's time in
``SeenBody`` and digest it into the uid (``_identity``/``content_uid``): copies of one
message (a 2xx retransmission, a hop's copy at another node) carry the same signed
time and still share a uid, two messages made at different times never do.  (Within
the window a second message under the same ids is refused 403 as a replay, control
below; a wire test would have to wait out the 33 s of the smallest window, so this
hole is shown on the core alone.)

Hole 2 (``test_hole_a_sealed_key_line_with_a_bare_cr_moves_bobs_media_past_the_proxy``;
real phone: ``tests/pjsua/test_review84_phone.py``): attacker: an insider UA (alice, her
own client and certificate).  Messages: her INVITE with an SRTP offer split for the home
proxy (it views INVITE SDP: pinholes and the media archive), the view saying
``c=IN IP4 127.0.0.1``, and sealed for bob alone under her signature her a=crypto line
plus the "keying line" ``k=prompt<CR>c=IN IP4 203.0.113.66``.  Effect: the proxy reads
and records media at 127.0.0.1:49170 and forwards; bob's engine takes the line for a
keying line (``_LINE = ([a-z])=(.*)``: ``.`` matches CR; ``_is_keying`` looks at the
letter ``k`` only) and ``merge_keys`` writes it after the m= line; pjmedia ends a
``k=`` line (``parse_generic_line``) at the CR and reads ``c=IN IP4 203.0.113.66`` as the
media's connection.  Seen on the real phone: 200 OK, ``call_media remote_rtp
127.0.0.66:49170`` where the proxy recorded 127.0.0.1.  bob's media goes to an address
the firewall and the archive never saw, past the insider row's fix ("bob gets the very
SDP the proxy read plus keying lines; a sealed line that is not one is refused").
Code at fault: ``e2m_plugins/sdp.py`` ``SdpKeys.decode`` and ``merge_keys`` (key lines
are checked with ``_LINE.fullmatch`` only, never for control characters, and the merged
SDP is not parsed again).  Fix: refuse CR (and any control character but HTAB) in a
sealed key line, as ``parse_lines._text`` does for the view, and run ``parse_lines`` over
the merged SDP before handing it on.

Tried and held (core; each read in the code, only those named a control were run):
- a MESSAGE under the same ids within the window: 403 as a replay (control);
- a multipart/alternative (or related) body holding a decoy part for the proxy and a
  part sealed for bob alone: the proxy takes the multipart as one plaintext part and
  archives it whole; bob's engine does not open it either (``has_protection`` reads
  only multipart/mixed), so nothing is shown that the archive lacks;
- a decoy ``handling=optional`` part beside the real one: the proxy opens every part
  when its policy covers the method (496 for a closed one); bob shows the first
  required part, which the archive holds too;
- an inner entity (inside the envelope) that is itself S/MIME: refused by ``open_part``;
- a MESSAGE under a kekri of a key the proxy never held: 496 (the proxy's view rules
  cover the method whatever the content type);
- hole 2's CR on an ``a=crypto`` key line instead of ``k=``: merged too, but pjmedia's
  attribute parser (``pj_scan_skip_line``) skips to the next LF, so the ``c=`` after the
  CR is never read (read in pjmedia's source, not run); a plain sealed ``c=`` line is
  refused (control);
- a second SignerInfo (another user's, captured): its signed context names another
  message, so the contexts disagree (BindingMismatchError);
- not pursued: a MESSAGE sent straight to bob's UDP contact, past the proxy (the
  threat model's phone section: a TLS phone takes requests only on its own
  connection); two RecipientInfos wrapping different CEKs (AES-GCM would need a
  key-committing break so that one ciphertext opens to two signed entities).

Fixed (stop 34): hole 1, the archive's message uid also digests the body's octets as
sent (``bootstrap._identity``): the second approval is a second row.  Hole 2, a sealed
key line holding a control character (but HTAB) is refused (``SdpKeys.decode``,
``merge_keys``), and the merged SDP is parsed again and must hold the view's lines and
nothing else; bob's engine now refuses the call, so the hole asserts the refusal
instead of the merged address.  Both turned XPASS; the markers are gone (the phone's
too, ``tests/pjsua/test_review84_phone.py``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from e2m_plugins.errors import E2MError

V_MESSAGE = ("MESSAGE:*",)
TEXT = b"Yes, approved."
HOUR = 3600.0


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


class _Scene:
    """alice's and bob's engines, the home proxy (views MESSAGE) and its SQLite archive,
    all on one clock the test moves."""

    def __init__(self, world, tmp_path, monkeypatch) -> None:
        from e2m_lab.flows import TRUSTED, known_proxy, proxy_engine, ua_engine
        from e2m_plugins.keycache import MemoryKeyCache
        from e2m_plugins.proxy import ProxyEngine
        from e2m_plugins.ua import UAEngine
        from kamailio_app.archive import SqliteArchive
        from kamailio_app.bootstrap import ProxyApp
        self.world = world
        self.now = time.time()
        clock = lambda: self.now                                      # noqa: E731
        self.proxy = ProxyEngine(proxy_engine(world, TRUSTED, view=V_MESSAGE).config,
                                 MemoryKeyCache(),
                                 clock=lambda: datetime.fromtimestamp(self.now, timezone.utc))
        chosen = (known_proxy(world, TRUSTED, V_MESSAGE),)
        self.alice = UAEngine(ua_engine(world, "alice", peers=("bob",), proxies=chosen).config,
                              clock=clock)
        self.bob = UAEngine(ua_engine(world, "bob", peers=("alice",), proxies=chosen).config,
                            clock=clock)
        self.archive = SqliteArchive(tmp_path / "archive.sqlite")
        self.archive.ensure_schema()
        config = SimpleNamespace(archive=SimpleNamespace(fail_request_on_error=False))
        self.app = ProxyApp(config, engine=None, archive=self.archive,  # type: ignore[arg-type]
                            events=None)
        # alice's own client: it writes the Content-ID it likes (here always the same)
        monkeypatch.setattr("e2m_plugins.mime.new_content_id", lambda host: f"part@{host}")

    def send(self, text: bytes):
        """alice's MESSAGE (Call-ID, From tag and CSeq always the same, a new Via branch
        each time) through the proxy to bob: (proxy verdict, what bob's engine shows)."""
        from e2m_lab.flows import apply_forward
        from e2m_plugins.sip import make_request
        world = self.world
        request = make_request("MESSAGE", world.aor("bob"), from_uri=world.aor("alice"),
                               to_uri=world.aor("bob"), call_id="r84-deal@10.0.0.7",
                               from_tag="a84", cseq=7, body=text, content_type="text/plain")
        sent = self.alice.protect(request).message
        verdict = self.proxy.inspect(sent)
        if verdict.action != "forward":
            return verdict, None
        # kemi's inspect_request -> observe (the Request-URI as received, alice's digest)
        self.app.observe(sent, verdict, sent_to=sent.request_uri, share=world.aor("alice"))
        return verdict, self.bob.open(apply_forward(sent, verdict)).message.body

    def rows(self):
        return [(r.from_uri, r.plaintext) for r in self.archive.bodies(limit=100)]


@pytest.fixture
def scene(world, tmp_path, monkeypatch):
    return _Scene(world, tmp_path, monkeypatch)


def test_control_two_different_texts_under_the_same_ids_are_two_rows(scene):
    """The set-up is sound: the proxy reads, archives and forwards each message, bob's
    engine shows each, and two texts give two rows."""
    first, shown = scene.send(TEXT)
    assert first.action == "forward" and [s.signature for s in first.seen] == ["valid"]
    assert shown == TEXT
    scene.now += HOUR
    second, shown = scene.send(b"No, declined.")
    assert second.action == "forward" and shown == b"No, declined."
    alice = scene.world.aor("alice")
    assert scene.rows() == [(alice, TEXT), (alice, b"No, declined.")]


def test_control_a_copy_of_the_same_message_is_refused_by_the_proxy(scene):
    """A byte copy of alice's message (a replay) is refused at the proxy: the uid's
    merging of copies is only ever needed for responses."""
    from e2m_plugins.sip import make_request
    world = scene.world
    request = make_request("MESSAGE", world.aor("bob"), from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"), call_id="r84-copy@10.0.0.7",
                           from_tag="a84", cseq=1, body=TEXT, content_type="text/plain")
    sent = scene.alice.protect(request).message
    assert scene.proxy.inspect(sent).action == "forward"
    again = scene.proxy.inspect(sent)
    assert (again.action, again.code) == ("reply", 403)


def test_hole_the_same_text_sent_again_an_hour_later_leaves_no_row(scene):
    first, shown_first = scene.send(TEXT)
    scene.now += HOUR
    second, shown_second = scene.send(TEXT)
    # both accepted by the proxy (its replay check tells them apart) and shown by bob
    assert (first.action, second.action) == ("forward", "forward")
    assert (shown_first, shown_second) == (TEXT, TEXT)
    alice = scene.world.aor("alice")
    # secure: two messages delivered, two rows (today: one, the first's)
    assert scene.rows() == [(alice, TEXT), (alice, TEXT)]


def test_control_within_the_window_the_same_ids_are_refused_as_a_replay(scene):
    """What keeps the ids unique while the replay record lives: a second message under
    the same ids a minute later is 403, whatever its text."""
    first, _ = scene.send(TEXT)
    scene.now += 60
    second, shown = scene.send(b"No, declined.")
    assert first.action == "forward" and (second.action, second.code, shown) == ("reply", 403, None)


# --------------------------------------------------------------------------- hole 2
# A sealed keying line that carries a bare CR: pjmedia reads what follows as a line.

SDP_VIEW = ("INVITE:application/sdp",)
ELSEWHERE = "203.0.113.66"
SMUGGLED = f"k=prompt\rc=IN IP4 {ELSEWHERE}"


def pjmedia_lines(sdp: bytes) -> list[str]:
    """The lines pjmedia's ``pjmedia_sdp_parse`` reads (pjmedia/src/pjmedia/sdp.c): an
    ``a=`` line runs to its value's first CR or LF and ``pj_scan_skip_line`` then skips
    to the next LF; every other line (``parse_generic_line``, ``c=``, ``m=``...) ends at
    the first CR or LF, and ``pj_scan_get_newline`` takes one CR and one LF."""
    text, out, at = sdp.decode("utf-8"), [], 0
    while at < len(text):
        end = min([i for i in (text.find("\r", at), text.find("\n", at)) if i >= 0],
                  default=len(text))
        line = text[at:end]
        if line:
            out.append(line)
        if line.startswith("a="):
            nl = text.find("\n", end)
            at = len(text) if nl < 0 else nl + 1
        else:
            at = end + (1 if text[end:end + 1] == "\r" else 0)
            at += 1 if text[at:at + 1] == "\n" else 0
    return out


def media_addresses(lines: list[str]) -> list[str]:
    """Each m= section's connection address as pjmedia keeps it: the section's last
    ``c=`` (``media->conn`` is overwritten), else the session's."""
    session, sections = None, []
    for line in lines:
        if line.startswith("m="):
            sections.append(session)
        elif line.startswith("c="):
            address = line.split()[-1]
            if sections:
                sections[-1] = address
            else:
                session = address
    return sections


def _insiders_call(world, extra_key_lines: tuple[str, ...]):
    """alice's (the insider's own client) signed SRTP offer to bob, split for the home
    proxy (which views INVITE SDP), with ``extra_key_lines`` sealed for bob beside her
    real a=crypto line: (proxy verdict, the SDP bob's engine hands pjsip)."""
    from e2m_lab.flows import (SRTP_OFFER, TRUSTED, apply_forward, invite, known_proxy,
                               proxy_engine, ua_engine)
    from e2m_plugins import ua as ua_module
    from e2m_plugins.sdp import SdpKeys
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    chosen = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", peers=("bob",), proxies=chosen)
    bob = ua_engine(world, "bob", peers=("alice",), proxies=chosen)
    real = ua_module.separate_keys

    def her_split(content, keying):
        view, keys = real(content, keying)
        return view, SdpKeys(keys.lines + tuple((0, line) for line in extra_key_lines))

    ua_module.separate_keys = her_split
    try:
        sent = alice.protect(invite(world, SRTP_OFFER, call_id="r84-media@10.0.0.7")).message
    finally:
        ua_module.separate_keys = real
    verdict = proxy.inspect(sent)
    return verdict, bob.open(apply_forward(sent, verdict)).message.body


def test_control_a_sealed_c_line_is_refused_and_an_honest_split_keeps_the_media(world):
    """Review 1's rule holds for a plain line: a sealed ``c=`` is 403-class
    (InconsistentSplitError); an honest split gives pjmedia the addresses the proxy
    recorded."""
    from e2m_plugins.errors import InconsistentSplitError
    with pytest.raises(InconsistentSplitError):
        _insiders_call(world, (f"c=IN IP4 {ELSEWHERE}",))
    verdict, sdp = _insiders_call(world, ())
    assert verdict.action == "forward"
    assert [m.address for m in verdict.media] == ["127.0.0.1"]
    assert media_addresses(pjmedia_lines(sdp)) == ["127.0.0.1"]
    assert b"a=crypto:" in sdp


def test_hole_a_sealed_key_line_with_a_bare_cr_moves_bobs_media_past_the_proxy(world):
    """Attacker: an insider UA (alice, her own client, her own certificate).  Message:
    her INVITE, an SRTP offer split as the home proxy's policy asks (it views INVITE
    SDP: firewall pinholes and the media archive): the SDP view for the proxy and bob
    with ``c=IN IP4 127.0.0.1``, and, sealed for bob alone under her signature
    (``e2m-sdp-keys``), her a=crypto line plus the "keying line"
    ``k=prompt<CR>c=IN IP4 203.0.113.66``.  Effect: the proxy records media at
    127.0.0.1:49170; bob's engine takes the line for a keying line (``_LINE``'s ``.``
    matches CR, ``_is_keying`` looks at the letter ``k``), ``merge_keys`` puts it after
    the m= line and hands pjsip the SDP; pjmedia ends the ``k=`` line at the CR and
    reads ``c=IN IP4 203.0.113.66`` as the media's connection: bob's RTP goes to an
    address the firewall and the archive never saw (threat model, insider row 2: "bob
    gets the very SDP the proxy read plus keying lines").  Real phone:
    ``tests/pjsua/test_review84_phone.py``.
    At fault: ``e2m_plugins/sdp.py`` ``SdpKeys.decode`` / ``merge_keys`` (a key line is
    checked by ``_LINE.fullmatch``, whose ``.`` takes CR, and never for control
    characters).  Fix: refuse a key line holding CR (or any control character but
    HTAB) in ``SdpKeys.decode`` and ``merge_keys`` (as ``parse_lines._text`` does for
    the view), and parse the merged SDP again with ``parse_lines`` before handing it on."""
    # Fixed (stop 34): bob's engine refuses the sealed keys (a key line with a control
    # character is malformed), so no SDP with another c= reaches his stack; before the
    # fix it handed pjmedia 203.0.113.66 (the assertion was on the merged SDP's address)
    with pytest.raises(E2MError, match="control character"):
        _insiders_call(world, (SMUGGLED,))
