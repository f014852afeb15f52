"""What the kernels read per launch and per step (``python -m bench.traffic``): the resident plans
read ``W_hh`` and ``W_hr`` once per launch and never per step; the streaming plan reads them every
step. Counted from the interpreter's memory operations."""

import functools

import pytest

from fused_rnn.ops.launch import interpreting

if not interpreting():  # on a GPU: bench.traffic would exit at import, taking pytest's whole run with it
    pytest.skip("counts the interpreter's memory operations: needs TRITON_INTERPRET=1 (CPU)", allow_module_level=True)

from bench import traffic  # noqa: E402

# Small sizes: the interpreter pays per launch and per operation.
SMALL = dict(batch=3, hidden=12, steps=2)


@functools.lru_cache
def measured(config):
    return {(row[0], row[1], row[2]): row[3:] for row in traffic.measure(config)}


def weight_traffic(config, kernel, buffer):
    """``(per launch, per step)`` elements of a weight loaded by a kernel."""
    return measured(config).get((kernel, buffer, "load"), (0, 0))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("directions", [1, 2], ids=["D1", "D2"])
def test_resident_weights_are_read_once_per_launch(cell, directions):
    config = traffic.Config(cell, directions=directions, lengths=True, **SMALL)
    w_hh = traffic.weight_elements(config)["w_hh_ptr"]
    for kernel in ("forward_kernel", "backward_kernel"):
        per_launch, per_step = weight_traffic(config, kernel, "w_hh_ptr")
        assert per_step == 0, f"{kernel} reads W_hh every step"
        assert per_launch == w_hh, f"{kernel} read {per_launch} elements of W_hh, not its {w_hh}"


@pytest.mark.parametrize("directions", [1, 2], ids=["D1", "D2"])
def test_projection_weights_are_read_once_per_launch(directions):
    config = traffic.Config("lstm_proj", directions=directions, **SMALL)
    sizes = traffic.weight_elements(config)
    for kernel in ("forward_kernel", "backward_kernel"):
        for weight in ("w_hh_ptr", "w_hr_ptr"):
            assert weight_traffic(config, kernel, weight) == (sizes[weight], 0), f"{kernel} {weight}"


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj"])
def test_streaming_plan_reads_the_weights_every_step(cell):
    config = traffic.Config(cell, weights="streaming", **SMALL)
    sizes = traffic.weight_elements(config)
    for kernel in ("forward_kernel", "backward_kernel"):
        for weight in ("w_hh_ptr", "w_hr_ptr") if cell == "lstm_proj" else ("w_hh_ptr",):
            assert weight_traffic(config, kernel, weight) == (0, sizes[weight]), f"{kernel} {weight}"
