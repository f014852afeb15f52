"""ONNX export of the fused layers, checked by running the exported graph in onnxruntime.

Each model is exported once with a dynamic time and batch axis, then run in onnxruntime at
sequence lengths and batch sizes other than the export example's and compared with the fused
module in torch. The graph itself must hold standard ONNX ``LSTM`` / ``GRU`` / ``RNN`` nodes (an
ONNX ``Scan`` for an LSTM with projection, which ONNX's LSTM lacks) and nothing from the kernels.
"""

import dataclasses

import pytest
import torch
from helpers import assert_close
from torch import nn

import fused_rnn
from fused_rnn.onnx import exporting, layers

for package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(package, reason=f"ONNX export tests need {package}: pip install -e '.[onnx]'")
import onnxruntime  # noqa: E402

INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 5, 6, 3
EXAMPLE_STEPS, EXAMPLE_BATCH = 5, 3
# (T, B) at which the exported graph runs: neither is the export example's.
RUN_SHAPES = [(8, 4), (2, 2)]
FLOAT32 = (1e-5, 1e-5)


@dataclasses.dataclass
class Case:
    """A layer configuration and which optional inputs the exported model takes."""

    options: dict
    with_state: bool
    with_lengths: bool

    @property
    def num_layers(self):
        return self.options.get("num_layers", 1)

    @property
    def num_directions(self):
        return 2 if self.options.get("bidirectional") else 1

    @property
    def batch_first(self):
        return self.options.get("batch_first", False)

    def inputs(self, steps, batch, state_sizes):
        """Random keyword inputs of ``Exported``: ``x`` and the optional ``h0``, ``c0``, ``lengths``."""
        shape = (batch, steps, INPUT_SIZE) if self.batch_first else (steps, batch, INPUT_SIZE)
        inputs = {"x": torch.randn(shape)}
        if self.with_state:
            for name, size in zip(("h0", "c0"), state_sizes):
                inputs[name] = torch.randn(self.num_layers * self.num_directions, batch, size)
        if self.with_lengths:
            inputs["lengths"] = torch.randint(1, steps + 1, (batch,))
            inputs["lengths"][0] = steps
        return inputs

    def dynamic_shapes(self, inputs):
        steps, batch = torch.export.Dim("T"), torch.export.Dim("B")
        axes = {"x": {0: batch, 1: steps} if self.batch_first else {0: steps, 1: batch},
                "h0": {1: batch}, "c0": {1: batch}, "lengths": {0: batch}}
        return {name: axes[name] for name in inputs}


CASES = {
    "1layer": Case(dict(), with_state=False, with_lengths=False),
    "2layers-bidirectional-batch_first-state-lengths": Case(
        dict(num_layers=2, bidirectional=True, batch_first=True), with_state=True, with_lengths=True
    ),
    "2layers-no_bias-state": Case(dict(num_layers=2, bias=False), with_state=True, with_lengths=False),
    "bidirectional-no_bias-batch_first-lengths": Case(
        dict(bidirectional=True, bias=False, batch_first=True), with_state=False, with_lengths=True
    ),
}


class Exported(nn.Module):
    """``layer`` called as ``call(layer, x, hx, lengths)`` with the optional inputs given."""

    def __init__(self, layer, call):
        super().__init__()
        self.layer, self.call = layer, call

    def forward(self, x, h0=None, c0=None, lengths=None):
        hx = h0 if c0 is None else (h0, c0)
        return self.call(self.layer, x, hx, lengths)


def call_module(module, x, hx, lengths):
    return module(x, hx, lengths=lengths)


def export(model, case, inputs):
    """The ONNX ModelProto of ``model`` traced on ``inputs`` with dynamic T and B.

    Every node must be a standard ONNX operator: a kernel's custom operator (``fused_rnn::...``)
    in the traced graph would mean the export went through the Triton path.
    """
    program = torch.onnx.export(
        model.eval(), (), kwargs=inputs, dynamo=True, dynamic_shapes=case.dynamic_shapes(inputs), verbose=False
    )
    proto = program.model_proto
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, [node.op_type for node in proto.graph.node]
    return proto


def nodes(proto, op_type):
    return [node for node in proto.graph.node if node.op_type == op_type]


def attributes(node):
    return {attribute.name: attribute for attribute in node.attribute}


def flat_outputs(result):
    """``output, h_n`` or ``output, (h_n, c_n)`` as a flat list."""
    output, states = result
    return [output, *(states if isinstance(states, tuple) else (states,))]


def check_against_torch(proto, expected_fn, case, state_sizes):
    """Run ``proto`` in onnxruntime at every RUN_SHAPES; compare with ``expected_fn(**inputs)``."""
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps, batch in RUN_SHAPES:
        inputs = case.inputs(steps, batch, state_sizes)
        with torch.no_grad():
            expected = flat_outputs(expected_fn(**inputs))
        actual = session.run(None, {name: value.numpy() for name, value in inputs.items()})
        assert len(actual) == len(expected)
        for index, (got, want) in enumerate(zip(actual, expected)):
            assert_close(torch.from_numpy(got), want, name=f"T={steps} B={batch} output {index}", tolerance=FLOAT32)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_module_exports_onnx_operator_with_dynamic_time_and_batch(cell, name):
    case = CASES[name]
    model = Exported(getattr(fused_rnn, cell)(INPUT_SIZE, HIDDEN_SIZE, **case.options), call_module)
    state_sizes = [HIDDEN_SIZE] * (2 if cell == "LSTM" else 1)
    proto = export(model, case, case.inputs(EXAMPLE_STEPS, EXAMPLE_BATCH, state_sizes))

    recurrent = nodes(proto, cell)
    assert len(recurrent) == case.num_layers, [node.op_type for node in proto.graph.node]
    for node in recurrent:
        direction = attributes(node)["direction"].s.decode()
        assert direction == ("bidirectional" if case.num_directions == 2 else "forward")
        if cell == "GRU":
            assert attributes(node)["linear_before_reset"].i == 1
        assert (len(node.input) > 4 and node.input[4] != "") == case.with_lengths, "lengths is sequence_lens"
    check_against_torch(proto, model, case, state_sizes)


# Fewer scans than CASES would export: torch.export traces each scan slowly (seconds).
PROJECTION_CASES = {
    "bidirectional-batch_first-state-lengths": Case(
        dict(bidirectional=True, batch_first=True), with_state=True, with_lengths=True
    ),
    "2layers-no_bias": Case(dict(num_layers=2, bias=False), with_state=False, with_lengths=False),
}


@pytest.mark.parametrize("name", list(PROJECTION_CASES))
def test_lstm_with_projection_exports_scan_with_dynamic_time_and_batch(name):
    case = PROJECTION_CASES[name]
    model = Exported(fused_rnn.LSTM(INPUT_SIZE, HIDDEN_SIZE, proj_size=PROJ_SIZE, **case.options), call_module)
    state_sizes = [PROJ_SIZE, HIDDEN_SIZE]
    proto = export(model, case, case.inputs(EXAMPLE_STEPS, EXAMPLE_BATCH, state_sizes))

    assert not nodes(proto, "LSTM")
    assert len(nodes(proto, "Scan")) == case.num_layers * case.num_directions
    check_against_torch(proto, model, case, state_sizes)


def call_onnx_layers(rnn, x, h0, lengths):
    """``fused_rnn.onnx.layers`` on an ``nn.RNN``'s weights, zeroing the output past each
    sequence's end as ``functional`` does."""
    if h0 is None:
        h0 = torch.zeros(rnn.num_layers * (2 if rnn.bidirectional else 1), x.shape[1], rnn.hidden_size)
    cell = "RNN_TANH" if rnn.nonlinearity == "tanh" else "RNN_RELU"
    # Looked up by name: the export swaps the parameters, which nn.RNN's _flat_weights list misses.
    params = [getattr(rnn, name) for name in rnn._flat_weights_names]
    output, (h_n,) = layers(cell, x, (h0,), params, rnn.bias, rnn.num_layers, 0.0, False, rnn.bidirectional, lengths)
    if lengths is not None:
        valid = torch.arange(x.shape[0])[:, None] < lengths[None, :]
        output = torch.where(valid[:, :, None], output, torch.zeros((), dtype=output.dtype))
    return output, h_n


def packed_rnn(rnn):
    """``rnn`` on ``Exported``'s keyword inputs, ``lengths`` through a PackedSequence."""

    def run(x, h0=None, lengths=None):
        if lengths is None:
            return rnn(x, h0)
        output, h_n = rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False), h0)
        return nn.utils.rnn.pad_packed_sequence(output, total_length=x.shape[0])[0], h_n

    return run


@pytest.mark.parametrize(
    "nonlinearity, name",
    [("tanh", "2layers-bidirectional-batch_first-state-lengths"), ("relu", "2layers-no_bias-state")],
)
def test_rnn_layers_export_onnx_rnn_with_dynamic_time_and_batch(nonlinearity, name):
    # layers() takes time-major input (batch_first is the modules' business).
    case = CASES[name]
    case = Case({k: v for k, v in case.options.items() if k != "batch_first"}, case.with_state, case.with_lengths)
    rnn = nn.RNN(INPUT_SIZE, HIDDEN_SIZE, nonlinearity=nonlinearity, **case.options)
    model = Exported(rnn, call_onnx_layers)
    proto = export(model, case, case.inputs(EXAMPLE_STEPS, EXAMPLE_BATCH, [HIDDEN_SIZE]))

    recurrent = nodes(proto, "RNN")
    assert len(recurrent) == case.num_layers
    activations = [activation.decode() for activation in attributes(recurrent[0])["activations"].strings]
    assert activations == [nonlinearity.capitalize()] * case.num_directions
    check_against_torch(proto, packed_rnn(rnn), case, [HIDDEN_SIZE])


# Recurrent dropout acts in training only: that case exports a module in training mode.
@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
@pytest.mark.parametrize("option", ["reset", "recurrent_dropout", "zoneout"])
def test_options_without_an_onnx_operator_are_refused_by_name(option):
    """ONNX's recurrent operators have no state resets, recurrent dropout or zoneout (which acts
    in eval too): the export fails with the package's refusal (docs/api.md), not with a failed
    translation of the kernels' operators. torch 2.13's exporter tries ``torch.export`` twice,
    the second time strict, under dynamo, which answers ``torch.onnx.is_in_onnx_export()`` False
    by itself: that try must see the export and refuse too."""
    module = fused_rnn.GRU(INPUT_SIZE, HIDDEN_SIZE, recurrent_dropout=0.3 if option == "recurrent_dropout" else 0.0,
                           zoneout=0.3 if option == "zoneout" else 0.0).train(option == "recurrent_dropout")
    x = torch.randn(EXAMPLE_STEPS, EXAMPLE_BATCH, INPUT_SIZE)
    kwargs = {"reset": torch.rand(EXAMPLE_STEPS, EXAMPLE_BATCH) < 0.5} if option == "reset" else {}
    with pytest.raises(torch.onnx.OnnxExporterError,
                       match=r"GRU: reset=, recurrent_dropout and zoneout have no ONNX operator"):
        torch.onnx.export(module, (x,), kwargs=kwargs, dynamo=True)


def test_torchscript_exporter_is_refused_with_a_clear_error(tmp_path):
    module = fused_rnn.GRU(INPUT_SIZE, HIDDEN_SIZE).eval()
    x = torch.randn(EXAMPLE_STEPS, EXAMPLE_BATCH, INPUT_SIZE)
    with pytest.raises(RuntimeError, match=r"dynamo=True"):
        torch.onnx.export(module, (x,), str(tmp_path / "gru.onnx"), dynamo=False)


def test_exporting_is_false_outside_torch_onnx_export():
    assert not exporting()


def test_onnx_layers_refuse_to_run_outside_an_export():
    # Run eagerly, the ONNX operators would return zeros of the right shape.
    module = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    x = torch.randn(EXAMPLE_STEPS, EXAMPLE_BATCH, INPUT_SIZE)
    hx = (torch.randn(1, EXAMPLE_BATCH, HIDDEN_SIZE),) * 2
    with pytest.raises(RuntimeError, match="runs only inside it"):
        layers("LSTM", x, hx, module._flat_weights, True, 1, 0.0, False, False, None)
