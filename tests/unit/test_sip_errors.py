"""The error table: complete, configurable, inherited along the MRO."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from e2m_plugins import errors
from e2m_plugins.sip_errors import (
    DEFAULT_ACCEPT,
    ERROR_TABLE,
    INTERNAL_ERROR,
    ROLES,
    E2MCodes,
    SipAnswer,
    answer_for,
    error_table_markdown,
)

ALL_ERRORS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, errors.E2MError) and cls.__module__ == errors.__name__]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_has_its_own_row_for_both_roles(cls: type) -> None:
    assert cls in ERROR_TABLE, f"{cls.__name__} has no row in the error table"
    assert set(ERROR_TABLE[cls]) == set(ROLES)
    for role in ROLES:
        assert ERROR_TABLE[cls][role].why, "every row states its reason"


def _answer(error: Exception, role: str, **kw: object) -> SipAnswer:
    answer = answer_for(error, role, **kw)  # type: ignore[arg-type]
    assert answer is not None
    return answer


def test_known_codes() -> None:
    assert _answer(errors.MalformedError("x"), "ua").code == 400
    assert _answer(errors.DecryptionError(), "ua").code == 493
    assert _answer(errors.NoMatchingRecipientError("x"), "ua").code == 493
    assert _answer(errors.DecryptionError(), "proxy").code == 496
    assert _answer(errors.NoMatchingRecipientError("x"), "proxy").code == 496
    assert _answer(errors.SignatureInvalidError("x"), "proxy").code == 403
    assert _answer(errors.SignatureRequiredError("x"), "proxy").code == 495
    assert _answer(errors.LimitExceededError("x"), "proxy").code == 413
    assert _answer(errors.DowngradeError("x"), "ua").code == 488
    assert _answer(errors.DowngradeError("x"), "proxy").code == 403


def test_decryption_failures_answer_alike() -> None:
    # No padding oracle: wrong key and bad ciphertext look the same on the wire.
    for role in ROLES:
        assert answer_for(errors.DecryptionError(), role) == \
            answer_for(errors.NoMatchingRecipientError("x"), role)


def test_certificate_rejected_is_local_at_a_ua_only() -> None:
    assert answer_for(errors.CertificateRejectedError("bad 496 cert"), "ua") is None
    assert _answer(errors.CertificateRejectedError("x"), "proxy").code == 403


def test_496_with_content_type_has_a_380_warning_and_certificate() -> None:
    answer = _answer(errors.ProxyCannotDecryptError(content_type="application/sdp"), "proxy")
    assert (answer.code, answer.reason, answer.needs_certificate) == (496, "Proxy Indecipherable", True)
    assert answer.warning_header("ss1.atlanta.example.com") == \
        "380 ss1.atlanta.example.com \"Required to view 'application/sdp'\""


def test_496_for_the_whole_body_has_no_warning() -> None:
    answer = _answer(errors.ProxyCannotDecryptError(), "proxy")
    assert answer.warning is None and answer.warning_header("p.example.com") is None


def test_configurable_codes() -> None:
    codes = E2MCodes(proxy_indecipherable=599, signature_required=598, warn_code=399)
    answer = _answer(errors.ProxyCannotDecryptError(content_type="text/plain"), "proxy", codes=codes)
    assert answer.code == 599
    assert answer.warning_header("p.example.com", ).startswith("399 p.example.com ")
    assert _answer(errors.SignatureRequiredError(), "ua", codes=codes).code == 598
    assert "599 Proxy Indecipherable" in error_table_markdown(codes)
    with pytest.raises(ValueError):
        E2MCodes(warn_code=496)
    with pytest.raises(ValueError):
        E2MCodes(proxy_indecipherable=200)


def test_subclasses_inherit_through_the_mro() -> None:
    class NoSdpKey(errors.DecryptionError):
        pass

    class StrictPolicy(errors.SignatureRequiredError):
        pass

    class Odd(errors.E2MError):
        pass

    assert _answer(NoSdpKey(), "proxy").code == 496
    assert _answer(StrictPolicy("x"), "ua").code == 495
    assert _answer(Odd("x"), "ua").code == 400
    # CertificateRejectedError is an UntrustedSignerError with its own row.
    assert isinstance(errors.CertificateRejectedError("x"), errors.UntrustedSignerError)


def test_415_carries_accept() -> None:
    answer = _answer(errors.UnsupportedMediaTypeError("x"), "ua")
    assert (answer.code, answer.accept) == (415, DEFAULT_ACCEPT)
    own = _answer(errors.UnsupportedMediaTypeError("x", accept="application/pkcs7-mime"), "ua")
    assert own.accept == "application/pkcs7-mime"
    assert _answer(errors.UnsupportedAlgorithmError("rc2"), "proxy").accept == DEFAULT_ACCEPT


def test_warning_text_is_a_safe_quoted_string() -> None:
    error = errors.ProxyCannotDecryptError(content_type='text/x"{agent}\r\nX: y\\')
    header = _answer(error, "proxy").warning_header("p.example.com")
    assert header is not None and "\r" not in header and "\n" not in header
    assert header.startswith('380 p.example.com "') and header.count("p.example.com") == 1
    assert '\\"' in header and "\\\\" in header
    with pytest.raises(ValueError):
        _answer(error, "proxy").warning_header("bad agent\r\nX: y")


def test_non_e2m_errors_are_500_and_roles_are_checked() -> None:
    assert answer_for(KeyError("bug"), "proxy") is INTERNAL_ERROR
    with pytest.raises(ValueError):
        answer_for(errors.MalformedError("x"), "b2bua")  # type: ignore[arg-type]


def test_docs_table_is_the_generated_one() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    assert error_table_markdown() in doc.read_text(encoding="utf-8")
