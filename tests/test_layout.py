"""The repository's shape as promises: the library (posenc/) never imports a stage or a script, nothing edits
sys.path, the top level holds only the pipeline's stages, one dtype rule serves every stage, and checkpoints
written before the library moved into posenc/ still load to the same model."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"train", "extend_context", "sample", "evaluate", "explain", "reproduce"}  # entry scripts (model.py is not)
OLD = ROOT / "tests" / "fixtures" / "old_layout"  # written by the code of commit 8b67ea9, before the move


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of the file (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "posenc").glob("*.py")), ids=lambda p: p.name)
def test_the_library_never_imports_a_stage_or_a_script(path):
    assert not imported_modules(path) & (STAGES | {"scripts"}), path


def test_nothing_edits_sys_path():
    """Modules are found the way a user's code finds them: run from the root, or pytest.ini's pythonpath."""
    edit = ("sys.path" + ".insert", "sys.path" + ".append")  # split, so that this file does not match itself
    files = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts]
    assert [str(p.relative_to(ROOT)) for p in files if any(e in p.read_text() for e in edit)] == []


def test_the_top_level_is_the_pipeline():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == STAGES | {"model"}, sorted(top)


def test_one_dtype_rule_for_every_stage(monkeypatch):
    """auto is bf16 exactly where the CPU computes it natively, for training, evaluation, sampling and benchmarks."""
    import evaluate
    import sample
    import train
    from posenc import runtime
    from scripts import bench_decode, bench_model
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        assert runtime.resolve_dtype("auto", "cpu")[0] == expected
    for cls in (train.TrainConfig, evaluate.EvalConfig, sample.SampleConfig, bench_model.BenchConfig,
                bench_decode.DecodeBenchConfig):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["dtype"] == "auto", cls
    with runtime.autocast("cpu", "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast("cpu", "float32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("run", ["run", "yarn"])
def test_checkpoints_from_before_the_move_load_to_the_same_model(run):
    from posenc.checkpoint import model_from_checkpoint
    saved = torch.load(OLD / "logits.pt", weights_only=True)
    model, ckpt = model_from_checkpoint(OLD / run / "ckpt.pt")
    with torch.no_grad():
        logits = model(saved["idx"][:, :model.config.block_size])[0]
    # The same weights through the same arithmetic: equal here to the bit; 1e-6 leaves room for another CPU's kernels.
    torch.testing.assert_close(logits, saved["logits"][run], rtol=0, atol=1e-6)
