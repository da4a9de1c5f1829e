"""No padding oracle in the answers: every RSA key-transport failure looks the same.

A Bleichenbacher attacker sends envelopes whose encryptedKey decrypts to
blocks of their choosing and watches what comes back.  Whatever the block
(bad padding of four kinds, good padding around a CEK of the wrong length or
value), the wrong private key, or a tampered tag or ciphertext, the core must
raise the same ``DecryptionError("decryption failed")`` with the same
(suppressed) context, the proxy must give the same verdict, and the UA the
same error.  The timing side is ``bench/test_oracle_timing.py``.

The cases come from ``fuzz/oracle_cases.py``, shared with the benchmark.
"""

from __future__ import annotations

import pytest

from e2m_lab import flows
from e2m_lab import oracle_cases
from e2m_plugins import mime
from e2m_plugins.body import with_entity
from e2m_plugins.cms import recipients
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.limits import Limits
from e2m_plugins.config import LegacyPeer
from e2m_plugins.errors import DecryptionError

CIPHERS = ("aes-128-gcm", "aes-256-gcm", "aes-128-cbc")
# CBC has no integrity: a random CEK (or a tampered block) passes the final
# PKCS#7 check about once in 256 and "opens" to garbage.  Those cases are
# rebuilt (fresh CEK and IV) when that happens; a tampered middle block is
# not detectable at all with CBC, which is why AES-GCM is the default.
CBC_CHANCE = {"bad padding: first byte not 00", "bad padding: block type 01",
              "bad padding: no 00 separator", "bad padding: padding string < 8 octets",
              "good padding, CEK of 24 octets", "good padding, empty CEK", "good padding, wrong CEK",
              "wrong private key"}
TRIES = 6
# CBC is refused by default (the same DecryptionError, before any key work); these
# tests look at what happens when a deployment accepts it.
CBC_ACCEPTED = Limits(accept_cbc=True)


def _failure(case, limits: Limits = CBC_ACCEPTED):
    """The exception opening ``case`` raises, or None if it opened."""
    try:
        opened = open_envelope(case.der, list(case.keys), limits=limits)
    except Exception as exc:  # noqa: BLE001 - any escape is what we compare
        return exc
    assert opened.plaintext != oracle_cases.CONTENT, f"{case.name} opened to the real content"
    return None


def _answer(exc: BaseException) -> tuple:
    """Everything a caller (or a log with a traceback) could tell apart."""
    ctx = exc.__context__
    return (type(exc), exc.args, str(exc), exc.__cause__, type(ctx) if ctx else None,
            exc.__suppress_context__)


@pytest.fixture(scope="module")
def proxy_cred(kit):
    return kit.pki.proxy(flows.TRUSTED)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_every_key_transport_failure_gives_the_same_answer(kit, proxy_cred, cipher):
    cases = oracle_cases.cases(proxy_cred.cert, proxy_cred.key, cipher=cipher)
    opened = open_envelope(cases["good"].der, list(cases["good"].keys), limits=CBC_ACCEPTED)
    assert opened.plaintext == oracle_cases.CONTENT
    answers = {}
    for name, case in cases.items():
        if name == "good" or ("cbc" in cipher and name == "tampered ciphertext"):
            continue
        exc = _failure(case)
        tries = 1
        while exc is None and "cbc" in cipher and name in CBC_CHANCE and tries < TRIES:
            case = oracle_cases.cases(proxy_cred.cert, proxy_cred.key, cipher=cipher)[name]
            exc, tries = _failure(case), tries + 1
        assert exc is not None, f"{name} opened"
        answers[name] = _answer(exc)
    assert len(answers) >= 9
    first = next(iter(answers.values()))
    assert first[0] is DecryptionError and first[2] == "decryption failed"
    different = {name: a for name, a in answers.items() if a != first}
    assert not different, f"answers differ: {different}"


def test_oaep_failure_gives_the_same_answer_as_v15(kit, proxy_cred):
    v15 = oracle_cases.cases(proxy_cred.cert, proxy_cred.key)
    oaep = oracle_cases.oaep_good_and_bad(proxy_cred.cert, proxy_cred.key)
    assert open_envelope(oaep["good"].der, list(oaep["good"].keys)).plaintext == oracle_cases.CONTENT
    assert _answer(_failure(oaep["bad OAEP block"])) == _answer(_failure(v15["bad padding: block type 01"]))


def _message_for(kit, der: bytes, cipher: str):
    kind = "authEnveloped-data" if "gcm" in cipher else "enveloped-data"
    entity = mime.smime_entity(der, kind, content_id="oracle@example.com")
    msg = with_entity(flows.message(kit.pki), entity)
    return msg.add("Proxy-Required-Body", f'{flows.TRUSTED};cid="oracle@example.com"')


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-128-cbc"])
def test_the_proxy_gives_one_verdict_for_every_failure(kit, proxy_cred, cipher):
    # alice is a legacy peer here whose unsigned CBC is taken (the most permissive
    # setting): then at least every failure must look the same
    proxy = flows.proxy_engine(kit.pki, flows.TRUSTED, view=("MESSAGE:*",),
                               legacy_peers=(kit.pki.aor("alice"),), legacy_unsigned_cbc=True)
    cases = oracle_cases.cases(proxy_cred.cert, proxy_cred.key, cipher=cipher)
    good = proxy.inspect(_message_for(kit, cases["good"].der, cipher))
    assert good.action == "forward" and [s.plaintext for s in good.seen] == [oracle_cases.CONTENT.split(b"\r\n\r\n", 1)[1]]
    verdicts = {}
    for name in cases:
        if name in ("good", "wrong private key", "tampered ciphertext"):
            continue   # the engine holds the right key; CBC tampering is not detectable
        for _ in range(TRIES):
            v = proxy.inspect(_message_for(kit, cases[name].der, cipher))
            if v.code == 496 or "cbc" not in cipher:
                break
            # CBC: the random CEK passed PKCS#7 (1 in 256) and the garbage body got its own
            # answer; see test_cbc_content_padding_is_visible_in_the_answer below
            cases = oracle_cases.cases(proxy_cred.cert, proxy_cred.key, cipher=cipher)
        verdicts[name] = (v.action, v.code, v.reason, v.error, v.detail, v.add_headers, v.body)
    first = next(iter(verdicts.values()))
    assert first[0] == "reply"
    different = {name: v[:5] for name, v in verdicts.items() if v != first}
    assert not different, f"{first[:5]} vs {different}"


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-128-cbc"])
def test_the_ua_gives_one_error_for_every_failure(kit, cipher):
    bob_cred = kit.pki.user("bob")
    bob = flows.ua_engine(kit.pki, "bob", legacy=(LegacyPeer(kit.pki.aor("alice"),
                                                             accept_unsigned=True,
                                                             accept_unsigned_cbc=True),))
    cases = oracle_cases.cases(bob_cred.cert, bob_cred.key, cipher=cipher)
    assert bob.open(_message_for(kit, cases["good"].der, cipher)).message.body
    answers = {}
    for name in cases:
        if name in ("good", "wrong private key", "tampered ciphertext"):
            continue
        for _ in range(TRIES):
            try:
                bob.open(_message_for(kit, cases[name].der, cipher))
            except DecryptionError as exc:
                answers[name] = _answer(exc)
                break
            except Exception as exc:  # noqa: BLE001 - a garbage CBC body: rebuild, as above
                assert "cbc" in cipher, f"{name}: {exc!r}"
            else:
                assert "cbc" in cipher, f"{name} opened"
            cases = oracle_cases.cases(bob_cred.cert, bob_cred.key, cipher=cipher)
        assert name in answers, f"{name} kept opening"
    first = next(iter(answers.values()))
    assert issubclass(first[0], DecryptionError)
    assert all(a == first for a in answers.values()), answers


# -- the content side of CBC -------------------------------------------------------

CBC_ORACLE = ("CBC content padding oracle: EnvelopedData with AES-CBC has no integrity, so a body "
              "whose last block still has valid PKCS#7 padding decrypts to garbage and gets the "
              "garbage's answer (400 / forward at the proxy, MalformedError at the UA), while bad "
              "padding gets 496 / DecryptionError; an attacker holding a CBC envelope for the "
              "proxy or UA can use the difference as a Vaudenay padding oracle on the content. "
              "AuthEnvelopedData (GCM, our default) is not affected.")


def _cbc_pair(cert):
    """(valid final padding but garbage, invalid final padding) from one good CBC envelope."""
    from e2m_plugins.cms.envelope import seal
    from e2m_plugins.cms.recipients import KeyTransRecipient
    good = seal(oracle_cases.CONTENT, [KeyTransRecipient(cert)], cipher="aes-128-cbc").der
    blocks = (len(oracle_cases.CONTENT) // 16 + 1) * 16
    assert blocks >= 48
    first_block = len(good) - blocks        # EnvelopedData ends with the ciphertext
    garbage = good[:first_block + 3] + bytes([good[first_block + 3] ^ 0x01]) + good[first_block + 4:]
    bad_pad = good[:-17] + bytes([good[-17] ^ 0x80]) + good[-16:]
    return garbage, bad_pad


def test_cbc_content_padding_is_not_visible_in_the_proxy_answer(kit, proxy_cred):
    proxy = flows.proxy_engine(kit.pki, flows.TRUSTED, view=("MESSAGE:*",))
    garbage, bad_pad = _cbc_pair(proxy_cred.cert)
    answers = [proxy.inspect(_message_for(kit, der, "aes-128-cbc")) for der in (garbage, bad_pad)]
    assert (answers[0].action, answers[0].code) == (answers[1].action, answers[1].code)


def test_cbc_content_padding_is_not_visible_in_the_ua_error(kit):
    bob = flows.ua_engine(kit.pki, "bob")
    garbage, bad_pad = _cbc_pair(kit.pki.user("bob").cert)
    errors = []
    for der in (garbage, bad_pad):
        try:
            bob.open(_message_for(kit, der, "aes-128-cbc"))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001
            errors.append(_answer(exc))
    assert errors[0] == errors[1]


# -- the work done must not depend on the padding either ------------------------------

RANDOM_CEK = ("recipients._open_ktri drew the random CEK (os.urandom, ~1 µs) only when the RSA "
              "result was not a CEK of the right length, i.e. only for bad padding: a small "
              "padding-dependent difference in work (the bench showed bad padding ~1-2 µs slower "
              "than a wrong CEK of the right length, at the edge of its noise).  RFC 3218 §2.3.2: "
              "make the fallback CEK before decrypting and use it on failure, so both paths do the "
              "same.  The fallback is now derived (implicit rejection, HMAC keyed by the private "
              "key over the encryptedKey) rather than drawn; it is still made every time.")


def test_fallback_cek_is_made_whatever_the_padding(kit, proxy_cred, monkeypatch):
    cases = oracle_cases.cases(proxy_cred.cert, proxy_cred.key)
    real = recipients._implicit_rejection_cek
    calls = []
    monkeypatch.setattr(recipients, "_implicit_rejection_cek",
                        lambda *args: calls.append(args[2]) or real(*args))
    counts = {}
    for name in ("good", "good padding, wrong CEK", "bad padding: block type 01",
                 "good padding, CEK of 24 octets"):
        calls.clear()
        try:
            open_envelope(cases[name].der, list(cases[name].keys))
        except DecryptionError:
            pass
        counts[name] = len(calls)
    assert len(set(counts.values())) == 1, counts
