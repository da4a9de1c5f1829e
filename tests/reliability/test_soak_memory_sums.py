"""How the soak reads Kamailio's private memory (``pkg.stats``), without processes:
CI once failed the 60 s soak's "drained" check by 2.9 MB because the TCP main process's
row read 0 in the sample before the traffic (its figures not written yet) and its whole
inherited heap after.  A row that reads 0 is no figure, a process counts once by pid
(its name changes as it starts), and sums compare the processes every sample has."""

from __future__ import annotations

from types import SimpleNamespace

from e2m_lab import wire

HEAP = 2_874_320


def _pkg_stats(rows: list[tuple[int, int, str]]) -> str:
    return "\n".join(f"{{\n\tentry: {n}\n\tpid: {pid}\n\treal_used: {used}\n\tdesc: {desc}\n}}"
                     for n, (pid, used, desc) in enumerate(rows))


def _sample(monkeypatch, rows: list[tuple[int, int, str]]) -> dict:
    answers = {"core.shmmem": "total: 1\nused: 1\nreal_used: 1\n", "pkg.stats": _pkg_stats(rows)}
    monkeypatch.setattr(wire, "process_memory", lambda proxy: {})
    return wire.memory_sample(SimpleNamespace(rpc=lambda command: answers[command]))


def test_a_row_not_yet_written_and_a_second_row_of_one_pid_are_not_counted(monkeypatch):
    sample = _sample(monkeypatch, [(10, HEAP, "main"), (11, HEAP, "udp receiver"),
                                   (12, 0, "tcp main process"), (10, HEAP, "main process - attendant"),
                                   (0, 0, "")])
    assert sample["pkg_real_used_sum"] == 2 * HEAP and sample["pkg_processes"] == 2
    assert sample["pkg_names"]["10"] == "main process - attendant"


def test_a_process_first_written_mid_run_is_no_growth_but_a_real_one_is(monkeypatch):
    early = _sample(monkeypatch, [(10, HEAP, "main"), (11, HEAP, "udp"), (12, 0, "tcp main process")])
    late = _sample(monkeypatch, [(10, HEAP, "main process - attendant"), (11, HEAP + 4096, "udp"),
                                 (12, HEAP + 120, "tcp main process")])
    samples = [dict(early, phase="before"), dict(late, phase="after")]
    assert late["pkg_real_used_sum"] - early["pkg_real_used_sum"] > HEAP     # what CI saw
    left_out = wire.pkg_over_common_processes(samples)
    assert left_out == ["12"]
    assert samples[1]["pkg_real_used_sum"] - samples[0]["pkg_real_used_sum"] == 4096
    assert wire.pkg_moved(samples[0], samples[1]) == {"11 udp": 4096}
