"""The benchmark harness (``python -m bench``): config grids, flags, result rows, the JSON and PNG files.

Timings are not checked (on the CPU they measure Triton's interpreter); what is checked is that the
harness builds the documented configs, verifies agreement with torch, and writes the documented schema.
"""

import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from triton.runtime import interpreter

from bench import ALL_MODES, PACKED_MODES, drift, skeleton, suite
from bench.__main__ import axis_overrides, main, parse_args, results_tag
import fused_rnn
from fused_rnn.ops import cost, launch
from fused_rnn.ops.launch import interpreting

REPO = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (the CPU smoke mode)")


def configs_for(*flags):
    args = parse_args(list(flags))
    return suite.select_configs("headline" if args.headline else "grid", **axis_overrides(args))


def check_results(path: Path, num_rows: int, on_gpu: bool) -> list:
    """Assert the documented schema of a results file; returns its rows."""
    results = json.loads(path.read_text())
    assert list(results) == list(suite.HEADER_KEYS)
    assert all(isinstance(results[key], str) for key in ("device", "torch", "triton"))
    assert isinstance(results["cudnn"], int) if on_gpu else results["cudnn"] is None
    rows = results["rows"]
    assert len(rows) == num_rows
    for row in rows:
        assert list(row) == [*suite.ROW_KEYS, "correct"]
        assert row["cell"] in suite.CELLS and row["dtype"] in suite.DTYPES and row["mode"] in ALL_MODES
        for key in ("batch", "seq", "hidden", "input", "layers"):
            assert type(row[key]) is int and row[key] > 0, key
        assert type(row["bidirectional"]) is bool
        assert row["correct"] is True
        for key in ("ours_ms", "cudnn_ms", "speedup"):
            assert type(row[key]) is float and row[key] > 0, key
        assert row["speedup"] == pytest.approx(row["cudnn_ms"] / row["ours_ms"], rel=1e-12)
        for key in ("ours_peak_mb", "cudnn_peak_mb"):
            assert (type(row[key]) is float and row[key] >= 0) if on_gpu else row[key] is None, key
    return rows


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_default_grid_is_the_issue_grid_plus_two_layer_bidirectional():
    configs = configs_for()
    assert len(configs) == 2 * 4 * 3 * 3 * 2 + 2 * 3 * 2
    assert len(set(configs)) == len(configs)
    grid = [c for c in configs if c.layers == 1]
    assert {(c.cell, c.batch, c.hidden, c.dtype, c.mode) for c in grid} == {
        (cell, batch, hidden, dtype, mode)
        for cell in ("lstm", "gru") for batch in (1, 16, 64, 256) for hidden in (256, 768, 1024)
        for dtype in ("float32", "float16", "bfloat16") for mode in ("forward", "forward_backward")
    }
    assert all(c.seq == 512 and c.input == c.hidden and not c.bidirectional for c in grid)
    deep = [c for c in configs if c.layers != 1]
    assert len(deep) == 12
    assert all((c.layers, c.bidirectional, c.batch, c.hidden, c.input, c.seq) == (2, True, 64, 768, 768, 512)
               for c in deep)


def test_headline_preset():
    configs = configs_for("--headline")
    assert {(c.dtype, c.mode) for c in configs} == {
        (dtype, mode) for dtype in ("float16", "bfloat16") for mode in ("forward", "forward_backward")
    }
    assert len(configs) == 4
    assert all((c.cell, c.batch, c.seq, c.hidden, c.input, c.layers, c.bidirectional)
               == ("lstm", 16, 1024, 768, 768, 1, False) for c in configs)


def test_shape_flags_narrow_the_grid_and_drop_the_deep_configs():
    configs = configs_for("--cell", "gru", "--batch", "16", "64", "--dtype", "float16")
    assert len(configs) == 2 * 3 * 2
    assert {c.cell for c in configs} == {"gru"} and {c.dtype for c in configs} == {"float16"}
    assert {c.batch for c in configs} == {16, 64} and {c.layers for c in configs} == {1}


def test_filter_flags_keep_the_deep_configs():
    configs = configs_for("--dtype", "bfloat16", "--mode", "forward", "--seq", "128")
    assert len(configs) == 2 * 4 * 3 + 2
    assert {(c.dtype, c.mode, c.seq) for c in configs} == {("bfloat16", "forward", 128)}


def test_input_layers_bidirectional_flags():
    configs = configs_for("--hidden", "256", "--input", "128", "512", "--layers", "3", "--bidirectional")
    assert len(configs) == 2 * 4 * 2 * 3 * 2
    assert {c.input for c in configs} == {128, 512}
    assert all(c.hidden == 256 and c.layers == 3 and c.bidirectional for c in configs)


def test_smoke_preset_follows_flags():
    assert len(suite.select_configs("smoke")) == 4
    configs = suite.select_configs("smoke", cells=("lstm",), modes=("forward",))
    assert [(c.cell, c.batch, c.seq, c.hidden, c.dtype, c.mode) for c in configs] == [
        ("lstm", 2, 4, 16, "float32", "forward")
    ]


def test_result_file_names():
    date = datetime.date(2025, 3, 7)
    assert suite.result_stem("NVIDIA H100 80GB HBM3", date) == "nvidia-h100-80gb-hbm3-2025-03-07"
    assert suite.result_stem("NVIDIA H100 80GB HBM3", date, "headline") == "nvidia-h100-80gb-hbm3-2025-03-07-headline"
    assert suite.slug(suite.CPU_DEVICE) == "cpu-triton-interpreter"
    def tag(preset, flags=(), **environment):
        return results_tag(preset, axis_overrides(parse_args(list(flags))), **environment)

    assert tag("grid") is None
    assert tag("grid", ["--batch", "1", "16", "--dtype", "float16"]) == "grid-batch-1-16-dtype-float16"
    assert tag("headline") == "headline"
    assert tag("grid", scheme="stepwise") == "stepwise"
    assert tag("headline", ["--bidirectional"], scheme="persistent") == "headline-bidirectional-persistent"
    assert tag("headline", ["--mode", "forward_backward"], backward="partial") == (
        "headline-mode-forward_backward-backward-partial")
    # Two partial runs of one preset that differ in their flags keep both files.
    assert tag("headline", ["--seq", "256", "--mode", "forward_backward", "gradient_penalty"]) != tag(
        "headline", ["--dtype", "float16", "--mode", "packed_forward", "packed_forward_backward"])


def test_row_speedup_and_untimed_rows():
    config = suite.select_configs("smoke")[0]
    row = suite.make_row(config, ours_ms=2.0, cudnn_ms=3.0, ours_peak_mb=1.5, cudnn_peak_mb=2.5)
    assert list(row) == [*suite.ROW_KEYS, "correct"]
    assert row["speedup"] == 1.5 and row["correct"] is True
    untimed = suite.make_row(config, correct=False)
    assert untimed["correct"] is False
    assert all(untimed[key] is None for key in ("ours_ms", "cudnn_ms", "speedup", "ours_peak_mb", "cudnn_peak_mb"))


@needs_interpreter
def test_config_that_disagrees_is_marked_and_not_timed(monkeypatch):
    monkeypatch.setitem(suite.TOLERANCE, "float32", -1.0)  # nothing can agree within a negative tolerance
    config = suite.select_configs("smoke", cells=("gru",), modes=("forward",))[0]
    row, warning = suite.run_config(config, "cpu")
    assert row["correct"] is False and row["ours_ms"] is None and row["speedup"] is None
    assert "not timed" in warning


@needs_interpreter
def test_smoke_run_writes_the_documented_json_and_png(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "say nothing about the speed" in printed
    (json_path,), (png_path,) = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.png"))
    assert json_path.stem == png_path.stem
    assert json_path.stem.startswith("cpu-triton-interpreter-")
    rows = check_results(json_path, num_rows=4, on_gpu=False)
    assert json.loads(json_path.read_text())["device"] == suite.CPU_DEVICE
    assert {(row["cell"], row["mode"]) for row in rows} == {
        (cell, mode) for cell in ("lstm", "gru") for mode in ("forward", "forward_backward")
    }
    check_png(png_path)


@needs_interpreter
def test_gradient_penalty_mode_checks_second_derivatives_against_torch(tmp_path):
    """The penalty's weight gradients go through the kernels' create_graph backward; a run agrees
    with torch and writes its rows."""
    assert main(["--smoke", "--mode", "gradient_penalty", "--out", str(tmp_path), "--no-progress"]) == 0
    (json_path,) = tmp_path.glob("*.json")
    rows = check_results(json_path, num_rows=2, on_gpu=False)
    assert {(row["cell"], row["mode"]) for row in rows} == {("lstm", "gradient_penalty"), ("gru", "gradient_penalty")}
    config = suite.select_configs("smoke", cells=("lstm",), modes=("gradient_penalty",))[0]
    reference, fused = suite.build_modules(config, "cpu")
    x, upstream = suite.make_inputs(config, "cpu")
    tensors = suite.compared_tensors(fused, x, upstream, "gradient_penalty")
    assert {f"penalty grad {name}" for name, _ in fused.named_parameters()} <= tensors.keys()


@needs_interpreter
def test_packed_modes_feed_both_modules_one_packed_sequence_of_unequal_lengths(tmp_path):
    assert main(["--smoke", "--cell", "lstm", "--mode", *PACKED_MODES, "--out", str(tmp_path), "--no-progress"]) == 0
    (json_path,) = tmp_path.glob("*.json")
    rows = check_results(json_path, num_rows=2, on_gpu=False)
    assert [row["mode"] for row in rows] == list(PACKED_MODES) and all(row["correct"] for row in rows)
    config = suite.select_configs("smoke", cells=("lstm",), batches=(8,), modes=("packed_forward_backward",))[0]
    torch.manual_seed(0)
    x, upstream = suite.make_inputs(config, "cpu")
    assert isinstance(x, PackedSequence) and x.data.requires_grad
    lengths = pad_packed_sequence(x)[1]
    assert lengths.max() == config.seq and len(set(lengths.tolist())) > 1
    # The output's data, its upstream gradient and the input gradient all follow the packing.
    reference, fused = suite.build_modules(config, "cpu")
    tensors = suite.compared_tensors(fused, x, upstream, config.mode)
    assert tensors["output"].shape == upstream.shape and upstream.shape[0] == lengths.sum()
    assert tensors["grad input"].shape == x.data.shape
    assert suite.check_agreement(config, reference, fused, x, upstream)[0]


@needs_interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without CUDA")
def test_cpu_run_without_out_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "RESULTS_DIR", tmp_path / "results")
    assert main(["--cell", "gru", "--mode", "forward", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA device" in printed and "Nothing written" in printed
    assert not (tmp_path / "results").exists()


def test_cpu_preset_is_both_cells_and_modes_at_two_shapes():
    configs = suite.select_configs("cpu")
    assert len(configs) == 2 * 2 * 2
    assert {(c.batch, c.seq, c.hidden) for c in configs} == {(16, 100, 128), (64, 200, 256)}
    assert {(c.cell, c.mode) for c in configs} == {(cell, mode) for cell in suite.CELLS for mode in suite.MODES}
    assert all(c.dtype == "float32" and c.input == c.hidden and c.layers == 1 for c in configs)


def test_cpu_run_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="without TRITON_INTERPRET"):
        main(["--cpu"])


def test_cpu_run_times_the_native_path_and_writes_the_documented_json(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    monkeypatch.setattr(suite, "CPU_BUDGET_S", 0.0)
    threads = torch.get_num_threads()
    try:
        flags = ["--cpu", "--batch", "2", "--seq", "3", "--hidden", "4", "--out", str(tmp_path), "--no-progress"]
        assert main(flags) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "ours/torch" in printed and ", 1 thread" in printed
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.stem.endswith("-cpu-batch-2-hidden-4-seq-3")
    check_results(json_path, num_rows=4, on_gpu=False)
    assert json.loads(json_path.read_text())["scheme"] == suite.NATIVE_SCHEME


def test_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--cell", "--batch", "--hidden", "--seq", "--input", "--layers", "--bidirectional",
                 "--dtype", "--mode", "--out", "--smoke", "--headline", "--cpu", "--threads"):
        assert flag in result.stdout


def test_the_suite_collects_where_triton_compiles_the_kernels():
    # bench/gpu_session.sh's tests stage runs every test file without the interpreter: a module
    # that exits at import there (test_traffic's bench.traffic did) ends pytest's whole run.
    environment = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 0 and "INTERNALERROR" not in printed, printed[-4000:]



@needs_interpreter
def test_host_cost_runs_the_kernel_path_without_its_launches_and_restores_them(capsys):
    from bench import host  # exits at import where the kernels are compiled

    lstm = host.calls("LSTM", 2, 3, 8)
    with host.launches_left_out():
        # The output buffers stay as allocated (NaN, conftest's poison): no kernel ran.
        assert fused_rnn.LSTM(8, 8)(torch.randn(3, 2, 8))[0].isnan().all()
        assert host.operators(lstm["forward"]) > 0
    assert not fused_rnn.LSTM(8, 8)(torch.randn(3, 2, 8))[0].isnan().any()
    assert host.main(["--cell", "LSTM", "GRU", "--repeat", "1", "--number", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[4]) for row in rows] == [(cell, call) for cell in ("LSTM", "GRU")
                                                  for call in ("forward", "forward+backward")]
    assert all(float(row[5]) >= float(row[6]) > 0 and int(row[7]) > 0 for row in rows)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_times_both_modules(tmp_path):
    flags = ["--cell", "lstm", "gru", "--batch", "16", "--hidden", "256", "--seq", "16", "--dtype", "float16",
             "--out", str(tmp_path), "--no-progress"]
    assert main(flags) == 0
    (json_path,), (png_path,) = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.png"))
    assert json_path.name.endswith("-grid-cell-lstm-gru-batch-16-hidden-256-seq-16-dtype-float16.json")
    check_results(json_path, num_rows=4, on_gpu=True)
    check_png(png_path)


def test_drift_error_figures_cover_the_whole_sequence_and_both_windows():
    error = torch.arange(10.0).reshape(10, 1, 1)  # |h - h_fp64| = t at step t
    assert drift.error_figures(error, window=3) == {
        "max": 9.0, "median": 4.0, "first_max": 2.0, "first_median": 1.0, "last_max": 9.0, "last_median": 8.0,
    }


@needs_interpreter
def test_drift_run_writes_the_documented_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", interpreter.InterpreterBuilder.cast_impl)
    flags = ["--steps", "6", "--window", "2", "--cell", "gru", "--dtype", "float16", "--device", "cpu",
             "--out", str(tmp_path)]
    assert drift.main(flags) == 0
    assert "round to nearest as on a GPU" in capsys.readouterr().out
    (path,) = tmp_path.glob("drift-cpu-triton-interpreter-*.json")
    results = json.loads(path.read_text())
    assert list(results) == [*suite.environment("cpu"), "note", "config", "rows"]
    assert results["config"]["steps"] == 6 and results["config"]["window"] == 2
    assert [(row["cell"], row["dtype"], row["implementation"]) for row in results["rows"]] == [
        ("gru", "float16", "fused_rnn"), ("gru", "float16", "torch"),
    ]
    for row in results["rows"]:
        assert list(row) == list(drift.ROW_KEYS)
        assert 0 <= row["median"] <= row["max"] < 1e-2


def test_skeleton_checks_its_kernels_and_writes_the_documented_json(tmp_path, capsys):
    # On a GPU this times every measurement too (and runs the barrier with up to one program per SM).
    assert skeleton.main(["--steps", "4", "--hops", "40", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("skeleton-*.json")
    results = json.loads(path.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert list(results) == [*suite.environment(device), "config", "rows"]
    assert results["config"] == {"steps": 4, "hops": 40, "chased_lines": skeleton.CHASED_LINES}
    rows = results["rows"]
    assert [row["kind"] for row in rows if row["kind"] != "barrier"] == ["chase"] + ["exchange"] * 4 + ["tagged"] * 4
    assert any(row["kind"] == "barrier" for row in rows)
    for row in rows:
        assert list(row) == list(skeleton.ROW_KEYS)
        assert row["agrees"] is (None if row["kind"] == "barrier" else True)
        # A difference of two medians: its sign at 4 steps is noise, so only its presence is checked.
        assert (type(row["us_per_step"]) is float and math.isfinite(row["us_per_step"])) if device == "cuda" \
            else row["us_per_step"] is None
        assert row["model_us_per_step"] > 0


def test_skeleton_models_each_exchange_as_the_cost_model_does_a_forward_step():
    # The cost model's terms for the headline forward: 3 sync trips and one tile's, and the larger
    # of all the programs' bytes over L2's bandwidth and one program's over its SM's share: 48
    # programs of 16 units (today's plan) or 96 of 8 read h_{t-1} as often, the L2 twice as much.
    # Tagged: the stores' trip and the tile's, reading 4-byte words of h_{t-1} and writing its
    # own features as fp16 and as words.
    rows = {(measurement.kind, measurement.name): measurement
            for measurement in skeleton.measurements(132, on_gpu=True)}
    for name, programs, units in (("forward B16 H768", 48, 16), ("forward B16 H768 in 96 programs", 96, 8)):
        for kind, trips, per_program in (("exchange", 4, 16 * (768 + units) * 2),
                                         ("tagged", 2, 16 * (768 * 4 + units * 6))):
            bandwidth = max(programs * per_program / cost.L2_BANDWIDTH, per_program / cost.SM_L2_BANDWIDTH)
            assert skeleton.model_us(rows[kind, name]) == pytest.approx((trips * cost.L2_ROUND_TRIP + bandwidth) * 1e6)
    assert skeleton.model_us(rows["exchange", "forward B256 H768"]) == pytest.approx(6.253, abs=1e-3)
    assert skeleton.model_us(rows["exchange", "backward B16 H768"]) == pytest.approx(1.893, abs=1e-3)


def test_skeleton_exchange_check_finds_features_no_program_wrote(monkeypatch):
    # (A tagged exchange would wait for those features' words for ever.)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exchange = skeleton.Measurement("exchange", "test", batch=20, features=48, block_b=16)
    assert skeleton.check_exchange(exchange, 3, device)
    monkeypatch.setattr(skeleton.Measurement, "own", property(lambda self: self.features // 2))
    assert not skeleton.check_exchange(exchange, 3, device)


@pytest.mark.timeout(300)  # a step waiting for words that never come fails here instead of hanging
@pytest.mark.skipif(torch.cuda.is_available(), reason="publishes from a thread into an interpreted launch; "
                    "on a GPU the tagged check runs 48 programs that wait for each other's words")
def test_skeleton_tagged_exchange_reads_only_words_of_its_step():
    # Two steps of two batch tiles, five pieces of 64 features, values of both signs. Both ring
    # slots hold other values tagged as step -1; a thread publishes h_0's words into slot 0, all
    # but the last word (last tile, last piece) after half a second, that word after a second.
    # The first step must wait for it, the second for the words the first wrote into slot 1.
    tagged = skeleton.Measurement("tagged", "test", batch=20, features=300, block_b=16)
    options = tagged.plan().options
    assert (options["BLOCK_K"], options["NUM_PIECES"]) == (64, 5) and tagged.tiles == 2
    h = torch.full((3, 20, 300), float("nan"), dtype=torch.float16)
    h[0] = torch.randn(20, 300).to(torch.float16)
    ring = skeleton.initial_ring(torch.randn(20, 300).to(torch.float16))[[1, 1]]
    words = skeleton.initial_ring(h[0])[0]

    def publish():
        time.sleep(0.5)
        early = torch.ones_like(words, dtype=torch.bool)
        early[-1, -1] = False
        ring[0][early] = words[early]
        time.sleep(0.5)
        ring[0, -1, -1] = words[-1, -1]

    publisher = threading.Thread(target=publish)
    publisher.start()
    began = time.perf_counter()
    skeleton.run_persistent(tagged, 2, h, ring)
    waited = time.perf_counter() - began
    publisher.join()
    assert waited > 0.9
    assert torch.allclose(h.float(), skeleton.expected_exchange(h[0], 2).float(), rtol=2e-3, atol=0)


def test_skeleton_chase_follows_one_cycle_through_every_line():
    cycle = skeleton.make_cycle(8, "cpu")
    visited = [skeleton.walk(cycle, hops) for hops in range(1, 9)]
    assert sorted(visited) == [line * skeleton.LINE for line in range(8)] and visited[-1] == 0
    out = torch.full((1,), -1, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    skeleton.chase(cycle.to(out.device), 5, out)
    assert out.item() == visited[4]


@pytest.mark.parametrize("version", ["3.6", "3.9"])
def test_cost_model_reads_the_committed_compiler_reports_of_todays_plans(version, monkeypatch, capsys):
    # bench.model refuses a report whose plan is not the launcher's today: the committed reports
    # must be regenerated (python -m bench.kernels --all --json) whenever a plan changes.
    from bench import model

    monkeypatch.setattr(launch, "interpreting", lambda: False)  # fp32 plans as on a GPU (TF32)
    path = REPO / "bench" / "results" / f"kernels-sm90-triton-{version}-all.json"
    assert model.main(["--kernels", str(path)]) == 0
    headline = [line.split() for line in capsys.readouterr().out.splitlines()
                if line.split()[:4] == ["lstm", "16", "768", "float16"]]
    assert len(headline) == 1 and "gather" in headline[0]


@pytest.mark.parametrize("version", ["3.6", "3.9"])
def test_launcher_estimates_the_product_the_compiler_makes(version, monkeypatch):
    # The launcher ranks plans by cost.product_estimate, from the blocks' shapes alone; bench.model
    # reads the compiled matrix instructions. Wherever the launcher ranks by the model (rows of H
    # and P in vectors) they must agree; a streamed W_hr's chunk loop is compiled once, so its
    # report counts one chunk and only the estimate counts them all.
    from bench import kernels, model

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    reports = json.loads((REPO / "bench" / "results" / f"kernels-sm90-triton-{version}-all.json").read_text())
    compared = 0
    for report in reports["reports"]:
        variant = kernels.Variant(**report["variant"])
        if variant.dtype not in model.KERNEL_DTYPES.values():
            continue
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", kernels.DTYPES[variant.dtype][1])
        shape, backward = kernels.shape_of(variant), variant.kernel == "backward"
        plan = kernels.plan_of(shape, backward)
        in_vectors = launch.rows_in_vectors(shape.hidden) and launch.rows_in_vectors(shape.features)
        if not plan.resident or not in_vectors or (shape.has_proj and not plan.options["RESIDENT_PROJ"]):
            continue
        compiled = model.product_seconds(report, shape.dtype)
        assert cost.product_estimate(shape, plan.options, backward) == pytest.approx(compiled, rel=1e-6), report
        compared += 1
    assert compared > 300


def test_cost_model_counts_the_activations_each_cell_saves():
    from fused_rnn.ops import gru, lstm, rnn

    for cell in (lstm.CELL, gru.CELL, *rnn.CELLS.values()):
        assert cost.SAVED_GATES[cell.num_gates] == cell.saved_gates


def test_cost_model_refuses_a_report_of_another_plan(tmp_path, monkeypatch):
    from bench import model

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    reports = json.loads((REPO / "bench" / "results" / "kernels-sm90-triton-3.6-all.json").read_text())
    for report in reports["reports"]:
        report["plan"] = report["plan"].replace("1x48x1", "1x47x1")
    (tmp_path / "stale.json").write_text(json.dumps(reports))
    with pytest.raises(ValueError, match="no compiler report of today's plan"):
        model.main(["--kernels", str(tmp_path / "stale.json")])


@triton.jit
def _store_kernel(source_ptr, target_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(target_ptr + offsets, tl.load(source_ptr + offsets))  # cast to the target's dtype


@needs_interpreter
def test_interpreter_rounds_bfloat16_stores_as_torch_does(monkeypatch):
    """Under ``bench.bfloat16_rounding`` (conftest installs it) an fp32 value stored to bfloat16 is
    torch's rounding bit for bit: random values over 60 decades, ties both ways, subnormals, the
    largest finite values (which round to infinity), infinities and NaN. The interpreter's own cast
    truncates, and differs."""
    ties = (torch.arange(1, 2049, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38, 1e-40, -1e-39])
    randoms = torch.randn(8192) * torch.logspace(-30, 30, 8192)
    values = torch.cat([randoms, ties, -ties, special, torch.randn(16384 - 8192 - 4096 - len(special))])
    expected = values.to(torch.bfloat16)

    def stored_as_expected():
        target = torch.empty(values.numel(), dtype=torch.bfloat16)
        _store_kernel[(1,)](values, target, values.numel())
        numbers = ~expected.isnan()  # NaN's bits are not torch's to fix
        return (torch.equal(target.isnan(), expected.isnan())
                and torch.equal(target[numbers].view(torch.int16), expected[numbers].view(torch.int16)))

    assert stored_as_expected()
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", interpreter.InterpreterBuilder.cast_impl.__wrapped__)
    assert not stored_as_expected()
