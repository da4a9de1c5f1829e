"""The rate benchmark's digest scenarios complete through the real proxy (stop 51).

Since review 67 the proxy takes credentials only for the Request-URI they name, and
SIPp names one URI for every request of a run (``-auth_uri``).  The benchmark kept
``bob@example.com``, the INVITE's Request-URI, so every BYE (its Request-URI the
UAS's Contact) was answered 400 and each ``off-auth`` and ``x25519-auth`` dialog
failed: the bench's digest dialog rows had no figures since that fix, and only
``make bench`` would have said so.  Now a dialog's INVITE names the UAS too
(``bench/sipp/uac_dialog_auth.tmpl.xml``).  A few calls of each digest scenario, as
the benchmark starts and drives them (``bench/proxyrates.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import proxyrates as pr  # noqa: E402

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]


@pytest.fixture(scope="module")
def bench_world(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench-digest")
    pki = pr.init_test_pki(workdir / "pki", proxy_hosts=(pr.TRUSTED,), users=("alice", "bob"))
    return workdir, pki, {c.key: c for c in pr.make_configs(pki, pr.Plan().text)}


@pytest.mark.parametrize("key", ["off-auth", "x25519-auth"])
def test_every_call_of_a_digest_scenario_completes(bench_world, key):
    workdir, pki, configs = bench_world
    plan = pr.Plan()
    inst = pr.start_instance(configs[key], pki, workdir / key, plan)
    try:
        for workload in ("message", "dialog"):
            run = pr.run_sipp(inst, workload, 10, 1.0, plan, workdir)
            assert (run.successful, run.failed) == (10, 0), (workload, run.to_json(),
                                                             inst.proxy.log_since(0)[-3000:])
    finally:
        inst.stop()
