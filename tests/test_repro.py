"""`dualpath bench repro --repeats`: real clusters, each policy run several times, the median kept."""

import dataclasses

import pytest

from dualpath.bench.repro import ReproConfig, offline
from dualpath.bench.workload import agentic
from tests.test_serving import _free_port_block

pytestmark = pytest.mark.cluster  # real clusters, one per run

def test_repeated_runs_report_the_median_run_and_every_run(tmp_path):
    rc = ReproConfig(out_dir=str(tmp_path), policies=("dualpath",), snic_gbps=0.0, repeats=2,
                     base_port=_free_port_block())
    rc.workload = dataclasses.replace(rc.workload, agents=2, turns=3, first_prompt=(300, 400))
    runs, summaries = offline(rc, agentic(rc.workload), 0.0, rc.policies)
    assert [s["policy"] for s in summaries] == ["dualpath"]
    for run, s in zip(runs, summaries):
        assert len(s["tokens_per_s_runs"]) == 2 and s["failed"] == 0
        assert s["tokens_per_s"] == min(s["tokens_per_s_runs"])  # the median run (the lower of two) is reported
        assert len(run.records) == 2 * 2  # two agents, two timed turns each
