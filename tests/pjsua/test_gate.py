"""The gate: exact wheel, platform, loopback self-test; refusal when E2M is required."""

from __future__ import annotations

import importlib.metadata

import pytest

pytestmark = pytest.mark.pjsua2
pytest.importorskip("pjsua2")

from pjsua_hooks import gate as gate_mod  # noqa: E402
from pjsua_hooks import pjsip_abi  # noqa: E402
from pjsua_hooks.endpoint import SipEndpoint  # noqa: E402
from pjsua_hooks.endpoint import gate  # noqa: E402
from pjsua_hooks.gate import GateError, check_environment  # noqa: E402


def test_gate_passes_on_this_machine() -> None:
    result = gate()
    assert result.ok, result.reason
    names = {name for name, ok, _ in result.checks if ok}
    assert {"wheel", "platform", "pjproject", "position", "answer", "directions",
            "reparse", "sanity"} <= names
    # the self-test OPTIONS and its 200, each seen leaving and arriving
    assert result.counts == {"tx_req": 1, "tx_resp": 1, "rx_req": 1, "rx_resp": 1}


def test_gate_fails_cleanly_on_version_mismatch() -> None:
    installed = importlib.metadata.version("pjsua2-python")
    result = gate(expected_version="2.15.0")
    assert not result.ok
    assert installed in result.reason and "2.15.0" in result.reason
    # It failed before starting anything: an endpoint can start right after.
    with SipEndpoint() as ep:
        assert ep.hook_active


def test_gate_fails_cleanly_on_platform_mismatch() -> None:
    result = check_environment(expected_platform=("linux", "aarch64"))
    assert not result.ok
    assert "aarch64" in result.reason and "x86_64" in result.reason


def test_required_e2m_refuses_to_start_on_wrong_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_mod.importlib.metadata, "version", lambda dist: "2.16.0")
    ep = SipEndpoint(require_e2m=True)
    with pytest.raises(GateError) as info:
        ep.start()
    assert "E2M is required" in str(info.value)
    assert "2.16.0" in str(info.value) and pjsip_abi.PINNED_WHEEL in str(info.value)
    assert not ep.started and not info.value.result.ok


def test_optional_e2m_runs_without_hook_on_wrong_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_mod.importlib.metadata, "version", lambda dist: "2.16.0")
    with SipEndpoint(require_e2m=False) as ep:
        assert ep.started and not ep.hook_active and not ep.hook.registered
        assert ep.gate_result is not None and not ep.gate_result.ok


def test_self_test_catches_a_wrong_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    # A layout we do not know: obj_name read from the wrong place.  The hook
    # only reads there, fails its sanity check and refuses to send.
    monkeypatch.setattr(pjsip_abi, "TX_OBJ_NAME", pjsip_abi.TX_OBJ_NAME + 8)
    ep = SipEndpoint(require_e2m=True, self_test_timeout=1.0)
    with pytest.raises(GateError) as info:
        ep.start()
    reason = info.value.result.reason
    assert "hook errors during the self-test" in reason and "obj_name" in reason
    assert not ep.started


def test_self_test_catches_a_wrong_rx_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pjsip_abi, "RX_SRC_PORT", pjsip_abi.RX_SRC_PORT + 4)
    ep = SipEndpoint(require_e2m=True, self_test_timeout=1.0)
    with pytest.raises(GateError) as info:
        ep.start()
    assert "src_addr disagrees" in info.value.result.reason
    assert not ep.started


def test_self_test_catches_a_wrong_destination_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    # review 108: the phone notes where pjsip sends each request; a layout that reads
    # no destination would hold every answer to the home, so the gate says so at start
    monkeypatch.setattr(pjsip_abi, "TX_DESTINATION_LAYOUTS",
                        tuple((a + 8, n, p) for a, n, p in pjsip_abi.TX_DESTINATION_LAYOUTS))
    ep = SipEndpoint(require_e2m=True, self_test_timeout=1.0)
    with pytest.raises(GateError) as info:
        ep.start()
    assert "the hook read the destination as [None" in info.value.result.reason
    assert not ep.started
