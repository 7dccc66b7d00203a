"""Fault injection on a tiny run, a few trials of each fault (the long version: python -m scripts.fault_injection)."""
import pytest

from scripts import fault_injection


@pytest.mark.parametrize("fault", fault_injection.FAULTS)
def test_a_run_stopped_by_faults_resumes_to_the_same_run(fault, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "faults"  # shared: one data folder and one reference run
    results = fault_injection.main(trials=1, faults=(fault,), seed=1, work=work)
    assert results[fault] == [True]
