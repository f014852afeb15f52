"""``torch.export`` of models holding fused layers, with a dynamic batch and time axis.

Each model is exported once at one batch size and sequence length; the exported program then
runs at two others and must match the eager model there. Both CPU paths are covered: the Triton
kernels under the interpreter (their custom ops, the default in this test process) and PyTorch's
native RNN operator (``fused_rnn::native_rnn``; ``TRITON_INTERPRET`` patched off). Exporting must
warn about nothing the modules do (no tensor attribute assigned during export).
"""

import warnings

import pytest
import torch
from helpers import TOLERANCES, assert_close
from torch import nn
from torch.export import Dim

import fused_rnn
from fused_rnn.ops import launch

# PyTorch's CPU LSTM says, on every call with proj_size, that oneDNN does not take it.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

IN, HID = 5, 6
EXPORT_SHAPE = (3, 4)  # (B, T) of the example inputs
OTHER_SHAPES = [(2, 6), (5, 2)]


@pytest.fixture(params=["interpreter", "native"])
def path(request, monkeypatch):
    """The CPU path the fused layers take: the Triton kernels (interpreted) or the native operator."""
    if request.param == "interpreter":
        if not launch.interpreting():
            pytest.skip("needs TRITON_INTERPRET=1")
    else:
        monkeypatch.setattr(launch, "_INTERPRETING", False)
    return request.param


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM with a projection -> GRU -> Linear, batch first."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(IN, IN)
        self.lstm = fused_rnn.LSTM(IN, HID, num_layers=2, bidirectional=True, proj_size=4, batch_first=True)
        self.gru = fused_rnn.GRU(8, HID, batch_first=True)
        self.head = nn.Linear(HID, 3)

    def forward(self, x, h0, c0):
        y, (h_n, c_n) = self.lstm(self.embed(x), (h0, c0))
        z, g_n = self.gru(y)
        return self.head(z), h_n, c_n, g_n


class WithLengths(nn.Module):
    """A converted nn.GRU (time-major, bidirectional) fed ``lengths``."""

    def __init__(self):
        super().__init__()
        self.gru = fused_rnn.convert(nn.GRU(IN, HID, bidirectional=True))

    def forward(self, x, lengths):
        return self.gru(x, lengths=lengths)


def tagger_inputs(batch, steps):
    return (torch.randn(batch, steps, IN), torch.randn(4, batch, 4), torch.randn(4, batch, HID))


def lengths_inputs(batch, steps):
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    return torch.randn(steps, batch, IN), lengths


def tagger_dims(batch, time):
    return ({0: batch, 1: time}, {1: batch}, {1: batch})


def lengths_dims(batch, time):
    return ({0: time, 1: batch}, {0: batch})


CASES = {
    "lstm2-bidirectional-proj-gru-head": (Tagger, tagger_inputs, tagger_dims),
    "converted-gru-bidirectional-lengths": (WithLengths, lengths_inputs, lengths_dims),
}


def flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [tensor for item in value for tensor in flatten(item)]


def export_quietly(model, inputs, dynamic_shapes):
    """``torch.export.export`` that fails on a warning about tensor attributes assigned during
    export (which ``nn.RNNBase._update_flat_weights`` would cause)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    unwanted = [str(w.message) for w in caught if "attribute" in str(w.message)]
    assert not unwanted, unwanted
    return program


def called_ops(program) -> set:
    return {node.target for node in program.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_program_runs_other_batch_sizes_and_lengths_like_eager(case, path):
    model_class, make_inputs, make_dims = CASES[case]
    model = model_class().eval()
    program = export_quietly(model, make_inputs(*EXPORT_SHAPE), make_dims(Dim("batch"), Dim("time")))

    ops = called_ops(program)
    assert torch.ops.aten.lstm.input not in ops and torch.ops.aten.gru.input not in ops
    fused_ops = {op for op in ops if getattr(op, "namespace", None) == "fused_rnn"}
    if path == "native":
        assert fused_ops == {torch.ops.fused_rnn.native_rnn.default}
    else:
        assert fused_ops and torch.ops.fused_rnn.native_rnn.default not in fused_ops

    exported = program.module()
    for batch, steps in OTHER_SHAPES:
        inputs = make_inputs(batch, steps)
        with torch.no_grad():
            expected, actual = flatten(model(*inputs)), flatten(exported(*inputs))
        assert len(actual) == len(expected)
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, name=f"output {index} at B={batch} T={steps}", tolerance=TOLERANCES[torch.float32])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_export_of_a_bare_module_warns_about_no_tensor_attribute(cell, path):
    module = getattr(fused_rnn, cell)(IN, HID)
    export_quietly(module, (torch.randn(4, 2, IN),), ({0: Dim("time"), 1: Dim("batch")},))
