"""The examples run end to end: a ``--smoke`` run of each trains its models (the torch and the fused
ones side by side, the regularized variants, the WGAN-GP), prints its table of losses and writes
its plot (under the interpreter on CPU: the real kernels)."""

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
# A row of wgan_gp.py's table: the step, four losses (signed), two distances.
GAN_ROW = re.compile(r"^ *(\d+)((?: +-?\d+\.\d+){6})$", re.MULTILINE)
# A line of rl_rollout.py's check of reset= against the split episodes.
SPLIT_CHECK = re.compile(r"^ +(\S+) split: outputs differ by (\S+), weight gradients by (\S+)$", re.MULTILINE)


def check_plot(folder: Path, name: str) -> None:
    assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    # A folder the example created keeps its files out of git.
    assert (folder / ".gitignore").read_text().splitlines()[-1] == "*"


def smoke_run(name, tmp_path, monkeypatch):
    """``(example module, what its main returned)`` after a ``--smoke`` run plotting into tmp_path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module(name)
    return example, example.main(["--smoke", "--out", str(tmp_path / "plots")])


def check_table(output: str, runs: list, steps: int) -> None:
    """Rows from step 1 to the last step, one value per run; every run has finite losses."""
    for run in runs:
        assert len(run.losses) == steps and all(math.isfinite(loss) for loss in run.losses), run.label
    rows = ROW.findall(output)
    assert [int(step) for step, _ in rows][::len(rows) - 1] == [1, steps]
    assert all(len(values.split()) == len(runs) for _, values in rows)


@pytest.mark.parametrize("name", ["adding_problem", "copy_memory", "char_lm", "rl_rollout"])
def test_example_smoke_run_prints_losses_and_writes_plot(name, tmp_path, capsys, monkeypatch):
    example, runs = smoke_run(name, tmp_path, monkeypatch)
    output = capsys.readouterr().out

    assert [run.label for run in runs] == ["nn.LSTM", "fused_rnn.LSTM", "nn.GRU", "fused_rnn.GRU"]
    for reference, fused in (runs[:2], runs[2:]):
        # Same initial weights and the same batch: the first losses agree to rounding.
        assert fused.twin is reference
        assert fused.losses[0] == pytest.approx(reference.losses[0], rel=1e-5), fused.label
    check_table(output, runs, example.SMOKE["steps"])
    check_plot(tmp_path / "plots", name)
    if name == "rl_rollout":
        # One call with reset= gives what the episodes give split apart, through fused_rnn's
        # RNN and through torch.nn's: outputs and weight gradients.
        checks = SPLIT_CHECK.findall(output)
        assert [label for label, _, _ in checks] == ["fused_rnn.LSTM", "nn.LSTM", "fused_rnn.GRU", "nn.GRU"]
        assert all(float(output) < 1e-5 and float(gradient) < 1e-5 for _, output, gradient in checks), checks


def test_regularized_lm_smoke_run_trains_every_variant(tmp_path, capsys, monkeypatch):
    example, runs = smoke_run("regularized_lm", tmp_path, monkeypatch)
    output = capsys.readouterr().out

    assert [run.label for run in runs] == [f"LSTM {name}" for name in example.VARIANTS]
    for run in runs:
        options = example.VARIANTS[run.label.split(" ", 1)[1]]
        assert {name: getattr(run.model.rnn, name) for name in options} == options, run.label
        assert f"{run.label}  {', '.join(f'{k}={v}' for k, v in options.items()) or '-'}" in output
    check_table(output, runs, example.SMOKE["steps"])
    check_plot(tmp_path / "plots", "regularized_lm")


def test_wgan_gp_smoke_run_trains_through_the_double_backward(tmp_path, capsys, monkeypatch):
    example, runs = smoke_run("wgan_gp", tmp_path, monkeypatch)
    output = capsys.readouterr().out

    steps = example.SMOKE["steps"]
    (run,) = runs
    assert run.label == "fused_rnn.LSTM"
    for name in ("critic_loss", "wasserstein", "penalty", "generator_loss"):
        values = getattr(run, name)
        assert len(values) == steps and all(math.isfinite(value) for value in values), name
    # The penalty's weight gradients through fused_rnn agree with nn.LSTM's (float64).
    assert run.check_error < 1e-10
    rows = GAN_ROW.findall(output)
    assert [int(step) for step, _ in rows] == list(range(1, steps + 1))
    assert [step for step, _ in run.evals] == list(range(steps + 1))
    assert "generator after 2 steps" in output
    check_plot(tmp_path / "plots", "wgan_gp")


def test_example_runs_as_a_script_into_example_outputs_by_default(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "copy_memory.py"), "--smoke", "--steps", "1", "--cells", "gru"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert ROW.search(result.stdout), result.stdout
    check_plot(tmp_path / "example_outputs", "copy_memory")
