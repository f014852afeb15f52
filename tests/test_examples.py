"""The examples run end to end: a ``--smoke`` run of each trains the torch and the fused models,
prints its table of losses and writes its plot (under the interpreter on CPU: the real kernels)."""

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A table row: the step, then one "train" or "train/held-out" value per model.
ROW = re.compile(r"^ *(\d+)((?: +\d+\.\d+(?:/\d+\.\d+)?)+)$", re.MULTILINE)


def check_plot(folder: Path, name: str) -> None:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    # A folder the example created keeps its files out of git.
    assert (folder / ".gitignore").read_text().splitlines()[-1] == "*"


@pytest.mark.parametrize("name", ["adding_problem", "copy_memory", "char_lm"])
def test_example_smoke_run_prints_losses_and_writes_plot(name, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module(name)
    runs = example.main(["--smoke", "--out", str(tmp_path / "plots")])

    steps = example.SMOKE["steps"]
    assert [run.label for run in runs] == ["nn.LSTM", "fused_rnn.LSTM", "nn.GRU", "fused_rnn.GRU"]
    for run in runs:
        assert len(run.losses) == steps and all(math.isfinite(loss) for loss in run.losses), run.label
    for reference, fused in (runs[:2], runs[2:]):
        # Same initial weights and the same batch: the first losses agree to rounding.
        assert fused.losses[0] == pytest.approx(reference.losses[0], rel=1e-5), fused.label
    rows = ROW.findall(capsys.readouterr().out)
    assert [int(step) for step, _ in rows][::len(rows) - 1] == [1, steps]
    assert all(len(values.split()) == len(runs) for _, values in rows)
    check_plot(tmp_path / "plots", name)


def test_example_runs_as_a_script_into_example_outputs_by_default(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "copy_memory.py"), "--smoke", "--steps", "1", "--cells", "gru"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert ROW.search(result.stdout), result.stdout
    check_plot(tmp_path / "example_outputs", "copy_memory")
