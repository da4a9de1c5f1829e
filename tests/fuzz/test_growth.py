"""No quadratic blow-up: inputs that grow along the axes an attacker controls.

Each family builds a hostile input of about 4, 8, 16, 32 and 60 KiB (many
headers, long comma lists, many MIME parts, boundary look-alikes, many
recipients, wide BER segmentation, long SDPs ...) and feeds it to the parser
that sees it on the network.  The assertion is the fuzzers' bound: under
64 KiB, no input takes a second (a quadratic path at 60 KiB does).  The
seconds per size are printed at the end of the run (and recorded in
docs/reliability.md) as "time/size growth": about 1x means linear.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pytest
from fuzzreport import GROWTH, OUTCOME

from e2m_lab import flows
from e2m_lab import fuzzkit
from e2m_plugins import headers as hdr
from e2m_plugins import grammar, mime, sdp, sip
from e2m_plugins.cms import der, oids
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.errors import E2MError
from e2m_plugins.layers import open_message

SIZES = (4 * 1024, 8 * 1024, 16 * 1024, 32 * 1024, 60 * 1024)
REPEAT = 5


def _fill(unit: str | bytes, size: int, head=None, tail=None):
    empty = unit[:0]
    head, tail = head if head is not None else empty, tail if tail is not None else empty
    count = max(1, (size - len(head) - len(tail)) // len(unit))
    return head + unit * count + tail


def _sip(headers: str, body: bytes = b"", ctype: str | None = None) -> bytes:
    lines = ["MESSAGE sip:bob@example.com SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx",
             "From: <sip:alice@example.com>;tag=a", "To: <sip:bob@example.com>", "Call-ID: grow",
             "CSeq: 1 MESSAGE"]
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    return ("\r\n".join(lines) + "\r\n" + headers + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def many_headers(size):
    per = 250
    n = min(250, size // per)
    return _sip("".join(f"X-H{i}: {'v' * (per - 10)}\r\n" for i in range(n)))


def many_vias(size):
    # comma-separated Via values, 100 to a line (the proxy looks for the bottom-most branch)
    values = [f"SIP/2.0/UDP h{i}.example.com;branch=z9hG4bK{i:020d}" for i in range(size // 56)]
    lines = ["Via: " + ", ".join(values[i:i + 100]) + "\r\n" for i in range(0, len(values), 100)]
    return _sip("".join(lines))


def long_comma_lists(size):
    # Proxy-Required-Body lists, 8 KiB lines (the line limit), as many lines as fit
    item = "h{:05d}.example.com;cid=<c{:05d}@x>, "
    lines, i, total = [], 0, 0
    while total < size - 400:
        line = "Proxy-Required-Body: "
        while len(line) < 8000 and total + len(line) < size - 400:
            line += item.format(i, i)
            i += 1
        lines.append(line.rstrip(", ") + "\r\n")
        total += len(lines[-1])
    return _sip("".join(lines))


def empty_folds(size):
    return _sip("X-Fold: " + "v" * 1000 + "\r\n" + " \r\n" * ((size - 1500) // 3))


def prb_value(size):
    return _fill("h.example.com;cid=<a@x>, cid=\"b@x\", ", size)


def policy_rules(size):
    rules = _fill("INVITE:application/sdp,", size - 40)
    return f'proxy.example.com;view="{rules}*:*";expires=60'


def warning_list(size):
    return _fill('380 proxy.example.com "Required to view \'application/sdp\'", ', size)


def quoted_escapes(size):
    return _fill('"a\\"b\\\\c,d", ', size)


def mime_parts(size):
    per = max(1, size // 16 - 80)
    parts = [mime.make_part("application/octet-stream", b"x" * per, content_id=f"p{i}@x") for i in range(16)]
    return mime.encode_part(mime.multipart_mixed(parts, boundary="b0undary"))


def boundary_lookalikes(size):
    head = b"Content-Type: multipart/mixed; boundary=\"e2m-b0undary\"\r\n\r\n"
    tail = b"--e2m-b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n--e2m-b0undary--\r\n"
    return _fill(b"--e2m-b0undar\r\n-e2m-b0undary\r\n--e2m-b0undaryX\r\n", size, head, tail)


def folded_mime_headers(size):
    folds = b"".join(b"\tx%d=y;\r\n" % i for i in range(min(900, size // 9)))
    head = b"Content-Type: text/plain;\r\n" + folds + b"\r\n"
    return head + b"x" * max(0, size - len(head))


def recipients(size):
    n = max(1, size // 60)
    ri = der.tlv(der.context(2), der.seq(der.enc_integer(4), der.seq(der.octet_string(b"k" * 8)),
                                         der.algorithm(oids.AES128_WRAP), der.octet_string(b"w" * 24)))
    eci = der.seq(der.enc_oid(oids.DATA), der.algorithm(oids.AES128_CBC, der.octet_string(b"\0" * 16)),
                  der.tlv(der.context(0, False), b"c" * 16))
    body = der.seq(der.enc_integer(2), der.tlv(der.SET, ri * n), eci)
    return der.seq(der.enc_oid(oids.ENVELOPED_DATA), der.explicit(0, body))


def ber_segments(size):
    n = max(1, size // 6)
    segs = der.tlv(der.OCTET_STRING, b"abcd") * n
    eci = der.seq(der.enc_oid(oids.DATA), der.algorithm(oids.AES128_CBC, der.octet_string(b"\0" * 16)),
                  der.tlv(der.context(0), segs))
    ri = der.tlv(der.context(2), der.seq(der.enc_integer(4), der.seq(der.octet_string(b"k" * 8)),
                                         der.algorithm(oids.AES128_WRAP), der.octet_string(b"w" * 24)))
    body = der.seq(der.enc_integer(2), der.set_of(ri), eci)
    return der.seq(der.enc_oid(oids.ENVELOPED_DATA), der.explicit(0, body))


def indefinite_wide(size):
    # 60 levels of indefinite length (inside the guard) around a wide body
    leaf = der.tlv(der.OCTET_STRING, b"abcd") * max(1, (size - 300) // 6)
    return b"\x30\x80" * 60 + leaf + b"\x00\x00" * 60


def base64_entity(size):
    head = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n" \
           b"Content-Transfer-Encoding: base64\r\n\r\n"
    return _fill(b"MIAGCSqGSIb3DQEHA6CAMIACAQAxggEd\r\n", size, head)


def sdp_formats_x_rtpmap(size):
    n = max(1, size // 22)
    fmts = " ".join(str(i) for i in range(n))
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0",
             f"m=audio 4000 RTP/AVP {fmts}"] + [f"a=rtpmap:{i} X/8000" for i in range(n)]
    return ("\r\n".join(lines) + "\r\n").encode()


def sdp_many_lines(size):
    head = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    media = b"".join(b"m=audio %d RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n" % (4000 + i)
                     for i in range(60))
    return _fill(b"a=x-attr:value\r\n", size, head + media)


def _proxy(kit, data):
    verdict = kit.proxy.inspect(sip.parse(data))
    assert verdict.action in ("forward", "reply")


def _protected_message_with_sdp(kit, size_builder):
    """A MESSAGE carrying a real envelope for the proxy around the SDP: media_summary runs."""
    def build(size):
        body = size_builder(size)
        alice = flows.ua_engine(kit.pki, "alice", proxies=(
            flows.known_proxy(kit.pki, flows.TRUSTED, ("INVITE:application/sdp",)),))
        return alice.protect(flows.invite(kit.pki, body)).message.serialize()
    return build


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[int], bytes | str]
    call: Callable[[object, bytes | str], object]
    needs_kit_build: bool = False


FAMILIES = [
    Family("sip many headers", many_headers, lambda k, d: sip.parse(d)),
    Family("sip many headers, proxy", many_headers, _proxy),
    Family("sip many Vias, proxy", many_vias, _proxy),
    Family("sip empty folds", empty_folds, lambda k, d: sip.parse(d)),
    Family("sip frame_length", many_headers, lambda k, d: sip.frame_length(d)),
    Family("proxy PRB comma lists", long_comma_lists, _proxy),
    Family("PRB value", prb_value, lambda k, d: hdr.parse_proxy_required_body(d)),
    Family("policy rules", policy_rules, lambda k, d: hdr.PolicyHeader.parse(d)),
    Family("warning list", warning_list, lambda k, d: hdr.parse_content_type_warnings(d)),
    Family("quoted escapes", quoted_escapes, lambda k, d: grammar.split_header_list(d)),
    Family("mime 16 parts", mime_parts, lambda k, d: list(mime.walk(mime.parse_entity(d)))),
    Family("mime boundary look-alikes", boundary_lookalikes,
           lambda k, d: mime.parse_multipart(mime.parse_entity(d))),
    Family("mime folded headers", folded_mime_headers, lambda k, d: mime.parse_entity(d)),
    Family("cms many recipients", recipients, lambda k, d: open_envelope(d, k.keys)),
    Family("cms BER segments", ber_segments, lambda k, d: open_envelope(d, k.keys)),
    Family("cms indefinite, wide", indefinite_wide, lambda k, d: open_envelope(d, k.keys)),
    Family("smime base64 entity", base64_entity,
           lambda k, d: open_message(d, keys=k.keys, trust_anchors=k.anchors)),
    Family("sdp formats x rtpmap", sdp_formats_x_rtpmap, lambda k, d: sdp.media_summary(d)),
    Family("sdp many lines", sdp_many_lines, lambda k, d: sdp.separate_keys(d)),
    Family("proxy sdp formats x rtpmap", sdp_formats_x_rtpmap, _proxy, needs_kit_build=True),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_time_grows_gently_with_input_size(kit, family):
    build = _protected_message_with_sdp(kit, family.build) if family.needs_kit_build else family.build
    points = []
    for size in SIZES:
        data = build(size)
        wire_size = len(data.encode() if isinstance(data, str) else data)
        best = float("inf")
        for _ in range(REPEAT):
            start = time.perf_counter()
            try:
                family.call(kit, data)
                outcome = "accepted"
            except E2MError as exc:
                outcome = type(exc).__name__
            elapsed = time.perf_counter() - start
            best = min(best, elapsed)
            if wire_size < fuzzkit.BOUNDED_SIZE:
                assert elapsed < fuzzkit.PER_INPUT_BOUND, (
                    f"{family.name}: {wire_size}-byte input took {elapsed:.2f} s")
        points.append((wire_size, best))
    GROWTH[family.name] = points
    OUTCOME[family.name] = outcome


# -- the one super-linear path found ---------------------------------------------

class _CountingTuple(tuple):
    """A tuple that adds up the elements each ``in`` test may compare."""

    work = 0

    def __contains__(self, item) -> bool:
        _CountingTuple.work += len(self)
        return tuple.__contains__(self, item)


SDP_CODECS = ("sdp._codecs tests every a=rtpmap payload type with `pt in formats` on the m= line's "
              "tuple: formats x rtpmap lines comparisons, quadratic in the SDP size (about 0.5 s "
              "for a 214 KB SDP, which the proxy's media_summary reads from any body it may view)")


def test_codec_mapping_work_is_linear_in_the_sdp(monkeypatch):
    """Deterministic (no clock): the comparisons per SDP byte must not grow with the SDP."""
    original = sdp._codecs
    monkeypatch.setattr(sdp, "_codecs", lambda formats, proto, attrs:
                        original(_CountingTuple(formats), proto, attrs))
    per_byte = []
    for size in (16 * 1024, 64 * 1024):
        data = sdp_formats_x_rtpmap(size)
        _CountingTuple.work = 0
        sdp.media_summary(data)
        per_byte.append(_CountingTuple.work / len(data))
    assert per_byte[1] <= 2 * per_byte[0], f"comparisons per byte {per_byte[0]:.0f} -> {per_byte[1]:.0f}"
