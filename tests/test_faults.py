"""Fault injection on a tiny run, a few trials of each fault (the long version: scripts/fault_injection.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fault_injection  # noqa: E402


@pytest.mark.parametrize("fault", fault_injection.FAULTS)
def test_a_run_stopped_by_faults_resumes_to_the_same_run(fault, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "faults"  # shared: one data folder and one reference run
    results = fault_injection.main(trials=1, faults=(fault,), seed=1, work=work)
    assert results[fault] == [True]
