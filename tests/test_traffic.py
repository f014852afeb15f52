"""What the kernels read per launch and per step (``python -m bench.traffic``): the resident plans
read ``W_hh`` (and, in the backward, ``W_hr``) once per launch and never per step; the streaming
plan reads them every step. Counted from the interpreter's memory operations."""

import functools

import pytest

from bench import traffic

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


def test_projection_weights_stay_resident_in_the_backward_and_stream_in_the_forward():
    config = traffic.Config("lstm_proj", **SMALL)
    w_hr = traffic.weight_elements(config)["w_hr_ptr"]
    assert weight_traffic(config, "backward_kernel", "w_hr_ptr") == (w_hr, 0)
    assert weight_traffic(config, "forward_kernel", "w_hr_ptr") == (0, w_hr)
    assert weight_traffic(config, "forward_kernel", "w_hh_ptr")[1] == 0


def test_streaming_plan_reads_the_weights_every_step():
    config = traffic.Config("lstm", weights="streaming", **SMALL)
    w_hh = traffic.weight_elements(config)["w_hh_ptr"]
    for kernel in ("forward_kernel", "backward_kernel"):
        assert weight_traffic(config, kernel, "w_hh_ptr") == (0, w_hh)
