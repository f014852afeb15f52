"""The CPU path (``fused_rnn.native``): PyTorch's own RNN operator behind the fused modules.

The test process interprets the Triton kernels (conftest sets ``TRITON_INTERPRET=1`` without a
GPU), so the fixture ``native_calls`` makes fused_rnn believe it does not: plain CPU tensors then
take the native path, and the fixture counts the calls of ``torch._VF``'s RNN operators to prove it.
The oracle is the torch.nn module holding the same weights, run on the same inputs: outputs,
final states and the gradients of a random upstream gradient on every output w.r.t. the input,
the initial states and every parameter are compared (float64 at 1e-10, float32 at 1e-5).
"""

import collections
import re

import pytest
import torch
from helpers import TOLERANCES, assert_close
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import functional, native
from fused_rnn.ops import launch

# PyTorch's CPU LSTM says, on every call with proj_size, that oneDNN does not take it.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

FUSED = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU}
TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU}
VF_OPERATORS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

INPUT_SIZE, HIDDEN_SIZE, STEPS, BATCH = 5, 7, 6, 4
# Unsorted, with a full-length row and a length-1 row: packing must sort and unsort. The sort
# ([2, 0, 3, 1]) is not its own inverse ([1, 3, 0, 2]), so that a state put back in the order it
# was sorted in, or sorted by the order that restores it, shows.
LENGTHS = [4, 1, 6, 3]

OPTIONS = {
    "1layer": {},
    "2layers-bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first-no_bias": dict(batch_first=True, bias=False),
    "2layers-bidirectional-batch_first-no_bias": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
}
LSTM_OPTIONS = {
    "proj3": dict(proj_size=3),
    "proj3-2layers-bidirectional-batch_first": dict(proj_size=3, num_layers=2, bidirectional=True, batch_first=True),
    "proj4-no_bias": dict(proj_size=4, bias=False),
}


def cases(names=None):
    """``pytest.param(cell, options)`` for both cells over OPTIONS (or the named ones), LSTM also over LSTM_OPTIONS."""
    params = []
    for cell in FUSED:
        tables = {**OPTIONS, **(LSTM_OPTIONS if cell == "LSTM" else {})}
        for name, options in tables.items():
            if names is None or name in names:
                params.append(pytest.param(cell, options, id=f"{cell}-{name}"))
    return params


DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.fixture
def native_calls(monkeypatch):
    """Plain CPU tensors take the native path; returns a Counter of the ``torch._VF`` RNN calls."""
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    calls = collections.Counter()
    for name in VF_OPERATORS:
        def counting(*args, _name=name, _operator=getattr(torch._VF, name)):
            calls[_name] += 1
            return _operator(*args)

        monkeypatch.setattr(torch._VF, name, counting)
    return calls


def make_pair(cell, dtype, **options):
    """``(torch module, fused module)`` in ``dtype`` with equal weights."""
    options = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    oracle = TORCH[cell](dtype=dtype, **options)
    fused = FUSED[cell](dtype=dtype, **options)
    fused.load_state_dict(oracle.state_dict())
    return oracle, fused


def draw_inputs(module, dtype, batch=BATCH, unbatched=False):
    """``{"input", "h_0"[, "c_0"]}`` for ``module`` (time-major unless it is batch_first)."""
    shape = (batch, STEPS) if module.batch_first else (STEPS, batch)
    tensors = {"input": torch.randn(*shape, module.input_size, dtype=dtype)}
    groups = module.num_layers * (2 if module.bidirectional else 1)
    tensors["h_0"] = torch.randn(groups, batch, module.proj_size or module.hidden_size, dtype=dtype)
    if module.mode == "LSTM":
        tensors["c_0"] = torch.randn(groups, batch, module.hidden_size, dtype=dtype)
    if unbatched:
        tensors = {name: t.squeeze(0 if name == "input" and module.batch_first else 1) for name, t in tensors.items()}
    return tensors


def flatten(value):
    """The tensors of a nested tuple such as ``(output, (h_n, c_n))``, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [tensor for item in value for tensor in flatten(item)]


def hx_of(inputs):
    return (inputs["h_0"], inputs["c_0"]) if "c_0" in inputs else inputs["h_0"]


def plain_forward(module, inputs):
    return module(inputs["input"], hx_of(inputs))


def run_module(module, tensors, forward=plain_forward):
    """``forward(module, inputs)``, then the gradients of fixed random upstream gradients on every output.

    Returns ``{name: tensor}``: the output (``.data`` of a PackedSequence), ``h_n`` (``c_n``) and
    ``grad <name>`` for every input and parameter.
    """
    inputs = {name: tensor.clone().requires_grad_() for name, tensor in tensors.items()}
    output, state = forward(module, inputs)
    if isinstance(output, PackedSequence):
        output = output.data
    results = dict(zip(("output", "h_n", "c_n"), (output, *(state if isinstance(state, tuple) else (state,)))))
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(value.shape, generator=generator, dtype=value.dtype) for value in results.values()]
    wrt = {f"grad {name}": tensor for name, tensor in inputs.items()}
    wrt.update((f"grad {name}", param) for name, param in module.named_parameters())
    results.update(zip(wrt, torch.autograd.grad(list(results.values()), list(wrt.values()), upstream)))
    return results


def compare(oracle, fused, tensors, calls, forward=plain_forward, oracle_forward=None):
    """Run both modules, check that the fused one made one native call, compare every result;
    returns the fused module's results."""
    expected = run_module(oracle, tensors, oracle_forward or forward)
    before = sum(calls.values())
    actual = run_module(fused, tensors, forward)
    assert sum(calls.values()) == before + 1, "the fused module did not run torch._VF's operator once"
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert_close(actual[name], value, name=name)
    return actual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell, options", cases())
def test_outputs_states_and_grads_match_torch(cell, options, dtype, native_calls):
    oracle, fused = make_pair(cell, dtype, **options)
    compare(oracle, fused, draw_inputs(oracle, dtype), native_calls)
    assert native_calls[cell.lower()] == 2  # the oracle's call and ours


@pytest.mark.parametrize("cell, options", cases(["1layer", "2layers-bidirectional", "proj3"]))
def test_without_hx_matches_torch(cell, options, native_calls):
    oracle, fused = make_pair(cell, torch.float64, **options)
    tensors = {"input": draw_inputs(oracle, torch.float64)["input"]}
    compare(oracle, fused, tensors, native_calls, forward=lambda module, inputs: module(inputs["input"]))


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cell", FUSED)
def test_unbatched_input_matches_torch(cell, batch_first, native_calls):
    oracle, fused = make_pair(cell, torch.float64, bidirectional=True, batch_first=batch_first)
    actual = compare(oracle, fused, draw_inputs(oracle, torch.float64, batch=1, unbatched=True), native_calls)
    assert actual["output"].shape == (STEPS, 2 * HIDDEN_SIZE)


@pytest.mark.parametrize("cell, options", cases(["2layers-bidirectional", "batch_first-no_bias",
                                                 "proj3-2layers-bidirectional-batch_first"]))
def test_lengths_match_packed_torch_and_zero_the_padding(cell, options, native_calls):
    oracle, fused = make_pair(cell, torch.float64, **options)
    lengths = torch.tensor(LENGTHS)

    def packed_then_padded(module, inputs):
        packed = pack_padded_sequence(inputs["input"], lengths, batch_first=module.batch_first, enforce_sorted=False)
        output, state = module(packed, hx_of(inputs))
        return pad_packed_sequence(output, batch_first=module.batch_first, total_length=STEPS)[0], state

    def with_lengths(module, inputs):
        return module(inputs["input"], hx_of(inputs), lengths=lengths)

    actual = compare(oracle, fused, draw_inputs(oracle, torch.float64), native_calls, with_lengths, packed_then_padded)
    output = actual["output"].transpose(0, 1) if fused.batch_first else actual["output"]
    past_end = torch.arange(STEPS)[:, None] >= lengths[None, :]
    assert (output[past_end] == 0).all(), "outputs past each sequence's end must be exactly zero"


@pytest.mark.parametrize("cell, options", cases(["2layers-bidirectional"]))
def test_lengths_all_shorter_than_the_input_keep_its_length(cell, options, native_calls):
    # No sequence reaches the last step: the packed operator's output, unpadded, is a step short.
    oracle, fused = make_pair(cell, torch.float64, **options)
    lengths = torch.tensor([4, 1, STEPS - 1, 3])

    def packed_then_padded(module, inputs):
        packed = pack_padded_sequence(inputs["input"], lengths, enforce_sorted=False)
        output, state = module(packed, hx_of(inputs))
        return pad_packed_sequence(output, total_length=STEPS)[0], state

    actual = compare(oracle, fused, draw_inputs(oracle, torch.float64), native_calls,
                     lambda module, inputs: module(inputs["input"], hx_of(inputs), lengths=lengths), packed_then_padded)
    assert actual["output"].shape[0] == STEPS and (actual["output"][-1] == 0).all()


@pytest.mark.parametrize("with_lengths", [False, True], ids=["no_lengths", "lengths"])
@pytest.mark.parametrize("cell", FUSED)
def test_empty_batch_matches_torch(cell, with_lengths, native_calls):
    oracle, fused = make_pair(cell, torch.float64, bidirectional=True)
    x = torch.randn(STEPS, 0, INPUT_SIZE, dtype=torch.float64)
    lengths = torch.zeros(0, dtype=torch.int64) if with_lengths else None
    expected, actual = oracle(x), fused(x, lengths=lengths)
    assert native_calls[cell.lower()] == 2
    assert [a.shape for a in flatten(actual)] == [e.shape for e in flatten(expected)]


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("cell, options", cases(["2layers-bidirectional", "proj3"]))
def test_packed_sequence_matches_torch(cell, options, enforce_sorted, native_calls):
    oracle, fused = make_pair(cell, torch.float64, **options)
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS

    def packed(module, inputs):
        sequence = pack_padded_sequence(inputs["input"], lengths, enforce_sorted=enforce_sorted)
        output, state = module(sequence, hx_of(inputs))
        assert isinstance(output, PackedSequence)
        assert torch.equal(output.batch_sizes, sequence.batch_sizes)
        return output, state

    compare(oracle, fused, draw_inputs(oracle, torch.float64), native_calls, packed)


@pytest.mark.parametrize("cell", FUSED)
def test_training_dropout_draws_torch_masks_under_the_same_seed(cell, native_calls):
    oracle, fused = make_pair(cell, torch.float32, num_layers=3, dropout=0.5)
    tensors = draw_inputs(oracle, torch.float32)

    def seeded(module, inputs):
        torch.manual_seed(1234)
        return plain_forward(module, inputs)

    expected, actual = run_module(oracle, tensors, seeded), run_module(fused, tensors, seeded)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{name} differs from torch.nn's under the same seed"
    fused.eval()
    assert not torch.equal(run_module(fused, tensors)["output"], actual["output"]), "dropout changed nothing"


@pytest.mark.parametrize("cell", FUSED)
def test_functional_api_takes_the_native_path(cell, native_calls):
    oracle, _ = make_pair(cell, torch.float64, num_layers=2, bidirectional=True, batch_first=True)
    tensors = draw_inputs(oracle, torch.float64)
    run = functional.lstm if cell == "LSTM" else functional.gru

    def through_functional(module, inputs):
        return run(inputs["input"], hx_of(inputs), module._flat_weights, num_layers=2, bidirectional=True,
                   batch_first=True)

    compare(oracle, oracle, tensors, native_calls, through_functional, oracle_forward=plain_forward)


@pytest.mark.parametrize("cell", FUSED)
def test_eager_backward_is_torch_native_not_the_custom_op(cell, native_calls):
    _, fused = make_pair(cell, torch.float32)
    output = fused(torch.randn(STEPS, BATCH, INPUT_SIZE, requires_grad=True))[0]
    assert "fused_rnn" not in type(output.grad_fn).__name__


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_eager_module_calls_are_torch_nn_forward_unless_options_need_more(cell, native_calls, monkeypatch):
    # Calls of the functional layer (fused_rnn.functional), counted; torch.nn's forward skips it.
    functional_calls = collections.Counter()
    run = functional._run

    def counting(*args, **kwargs):
        functional_calls["_run"] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(functional, "_run", counting)
    fused = getattr(fused_rnn, cell)(INPUT_SIZE, HIDDEN_SIZE, recurrent_dropout=0.5)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    operator = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[cell]
    expected_runs = 0
    for train, extra, runs_functional in [(False, {}, False), (False, dict(lengths=torch.tensor(LENGTHS)), True),
                                          (False, dict(reset=torch.rand(STEPS, BATCH) < 0.3), True),
                                          (True, {}, True)]:  # recurrent dropout acts in training
        fused.train(train)
        before = native_calls[operator]
        fused(x, **extra)
        expected_runs += runs_functional
        assert functional_calls["_run"] == expected_runs, (train, list(extra))
        # The reference recurrence runs resets and recurrent dropout, PyTorch's operator the rest.
        assert native_calls[operator] == before + (not extra and not train or "lengths" in extra)
    fused.eval()
    fused(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))
    assert functional_calls["_run"] == expected_runs


@pytest.mark.parametrize("cell", FUSED)
def test_eager_module_calls_with_zoneout_mix_in_its_expectation_in_eval(cell, native_calls):
    # torch.nn has no zoneout: its forward must not serve the call, which would drop it silently.
    oracle, fused = make_pair(cell, torch.float64)
    fused.zoneout = 0.5
    fused.eval()
    tensors = draw_inputs(oracle, torch.float64)
    run = functional.lstm if cell == "LSTM" else functional.gru
    expected = run(tensors["input"], hx_of(tensors), fused._flat_weights, zoneout=0.5)
    actual = fused(tensors["input"], hx_of(tensors))
    for value, wanted in zip(flatten(actual), flatten(expected), strict=True):
        assert_close(value, wanted, name="zoneout in eval")
    assert not torch.allclose(actual[0], oracle(tensors["input"], hx_of(tensors))[0]), "zoneout had no effect"


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_eager_module_calls_name_a_state_of_the_wrong_dtype(cell, native_calls):
    # torch.nn's operator would say "get_mkldnn_dtype: unsupported data type" (LSTM) or
    # "mat1 and mat2 must have the same dtype" (GRU).
    fused = getattr(fused_rnn, cell)(INPUT_SIZE, HIDDEN_SIZE)
    state = torch.randn(1, BATCH, HIDDEN_SIZE, dtype=torch.float64)
    hx = (state, state.float()) if cell == "LSTM" else state
    with pytest.raises(RuntimeError, match=r"hidden dtype \(torch.float64\) does not match input dtype \(torch.float32\)"):
        fused(torch.randn(STEPS, BATCH, INPUT_SIZE), hx)


def torch_or_its_error(module, *args):
    """``module(*args)``, or the RuntimeError with which torch.nn's CPU operator refused it."""
    try:
        return module(*args)
    except RuntimeError as error:
        return error


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_eager_module_calls_take_the_float32_c0_torch_takes(dtype, native_calls):
    # torch.nn's CPU operator computes with a c_0 of another dtype here (and returns c_n in it for
    # bf16 input): a drop-in does the same.
    oracle, fused = make_pair("LSTM", dtype)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=dtype)
    hx = (torch.randn(1, BATCH, HIDDEN_SIZE, dtype=dtype), torch.randn(1, BATCH, HIDDEN_SIZE))
    expected_or_error = torch_or_its_error(oracle, x, hx)
    if isinstance(expected_or_error, RuntimeError):
        # Where its operator takes it from oneDNN, which lacks bf16 on some CPUs (an AMD EPYC
        # without AVX-512: "mat1 and mat2 must have the same dtype"), torch.nn refuses: so does this.
        with pytest.raises(RuntimeError, match="dtype"):
            fused(x, hx)
        return
    for actual, expected in zip(flatten(fused(x, hx)), flatten(expected_or_error), strict=True):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_eager_module_calls_under_autocast_take_states_in_the_autocast_dtype_as_torch_does(cell, native_calls):
    oracle, fused = make_pair(cell, torch.float32)
    state = torch.randn(1, BATCH, HIDDEN_SIZE, dtype=torch.bfloat16)
    hx = (state, state) if cell == "LSTM" else state
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch_or_its_error(oracle, x, hx)
        if isinstance(expected, RuntimeError):
            # oneDNN without bf16 on this CPU (an AMD EPYC without AVX-512): the same refusal.
            with pytest.raises(RuntimeError, match=re.escape(str(expected).splitlines()[0])):
                fused(x, hx)
            return
        got = fused(x, hx)
    for actual, want in zip(flatten(got), flatten(expected), strict=True):
        assert torch.equal(actual, want)


# ``native.layers`` called directly with nn.RNN's flat weights.
RNN_CASES = {
    "1layer": dict(),
    "2layers-bidirectional": dict(num_layers=2, bidirectional=True),
    "no_bias-bidirectional": dict(bias=False, bidirectional=True),
}


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("options", list(RNN_CASES.values()), ids=list(RNN_CASES))
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_layers_match_torch_rnn(nonlinearity, options, with_lengths, native_calls):
    rnn = nn.RNN(INPUT_SIZE, HIDDEN_SIZE, nonlinearity=nonlinearity, dtype=torch.float64, **options)
    cell = f"RNN_{nonlinearity.upper()}"
    tensors = draw_inputs(rnn, torch.float64)
    lengths = torch.tensor(LENGTHS) if with_lengths else None

    def through_layers(module, inputs):
        output, (h_n,) = native.layers(
            cell, inputs["input"], (inputs["h_0"],), module._flat_weights, module.bias, module.num_layers,
            0.0, False, module.bidirectional, lengths,
        )
        return output, h_n

    def torch_rnn(module, inputs):
        if lengths is None:
            return module(inputs["input"], inputs["h_0"])
        packed = pack_padded_sequence(inputs["input"], lengths, enforce_sorted=False)
        output, h_n = module(packed, inputs["h_0"])
        return pad_packed_sequence(output, total_length=STEPS)[0], h_n

    compare(rnn, rnn, tensors, native_calls, through_layers, oracle_forward=torch_rnn)
    assert native_calls[cell.lower()] == 2


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_layers_dropout_draws_torch_masks(nonlinearity, native_calls):
    rnn = nn.RNN(INPUT_SIZE, HIDDEN_SIZE, num_layers=3, nonlinearity=nonlinearity, dropout=0.5)
    x, h0 = torch.randn(STEPS, BATCH, INPUT_SIZE), torch.randn(3, BATCH, HIDDEN_SIZE)
    torch.manual_seed(7)
    expected, expected_h_n = rnn(x, h0)
    torch.manual_seed(7)
    output, (h_n,) = native.layers(f"RNN_{nonlinearity.upper()}", x, (h0,), rnn._flat_weights, True, 3, 0.5, True,
                                   False, None)
    assert torch.equal(output, expected) and torch.equal(h_n, expected_h_n)


def test_handles_plain_cpu_tensors_only_when_not_interpreting(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    assert native.handles(torch.zeros(1))
    assert not native.handles(torch.zeros(1, device="meta"))
    monkeypatch.setattr(launch, "_INTERPRETING", True)
    assert not native.handles(torch.zeros(1))


@pytest.mark.parametrize("cell", FUSED)
def test_vmap_runs_the_layers_in_plain_pytorch(cell, native_calls):
    """PyTorch's RNN operator has no batching rule (``nn.LSTM`` under vmap raises): under vmap
    the layers run in ``reference.layer``, here in float32 to torch.nn's values one example at a
    time; and ``jacfwd`` (vmap over jvp) of the float32 LSTM, whose oneDNN operator torch.nn's
    jvp refuses, matches ``jacrev``."""
    oracle, fused = make_pair(cell, torch.float32, num_layers=2, bidirectional=True)
    examples = torch.randn(2, STEPS, BATCH, INPUT_SIZE)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.func.vmap(oracle)(examples)
    native_calls.clear()  # (nn.LSTM's own call)
    leaves = torch.utils._pytree.tree_leaves
    mapped = leaves(torch.func.vmap(fused)(examples))
    assert not native_calls
    for index, example in enumerate(examples):
        for name, value, expected in zip(("output", "h_n", "c_n"), mapped, leaves(oracle(example))):
            assert_close(value[index], expected, tolerance=TOLERANCES[torch.float32], name=f"{name}, {index}")
    short = examples[0, :2, :1]
    assert_close(torch.func.jacfwd(lambda input: fused(input)[0])(short),
                 torch.func.jacrev(lambda input: oracle(input)[0])(short), tolerance=TOLERANCES[torch.float32],
                 name="jacfwd")


# --------------------------------------------------------------------------------------------
# The custom op that tracers see (torch.export, torch.compile)


def op_arguments(cell, lengths=False, dropout=0.0):
    """``fused_rnn::native_rnn``'s arguments (float64, time-major) for 2 bidirectional layers of ``cell``."""
    options = dict(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=2, bidirectional=True,
                   dropout=dropout, dtype=torch.float64)
    module = nn.LSTM(proj_size=3, **options) if cell == "LSTM" else nn.GRU(**options) if cell == "GRU" else nn.RNN(
        nonlinearity=cell[4:].lower(), **options)
    tensors = draw_inputs(module, torch.float64)
    hx = [tensors["h_0"], tensors["c_0"]] if cell == "LSTM" else [tensors["h_0"]]
    return (cell, tensors["input"], hx, list(module.parameters()), True, 2, dropout, dropout > 0, True,
            torch.tensor(LENGTHS) if lengths else None)


@pytest.mark.parametrize("cell, lengths", [
    pytest.param("LSTM", False, id="LSTM"), pytest.param("LSTM", True, id="LSTM-lengths"),
    pytest.param("GRU", True, id="GRU-lengths"), pytest.param("RNN_TANH", False, id="RNN_TANH"),
])
def test_custom_op_passes_opcheck(cell, lengths):
    # Schema, fake implementation (shapes, strides) and autograd registration, eager and under
    # AOTAutograd with dynamic shapes (which runs the backward op).
    arguments = op_arguments(cell, lengths)
    for tensor in (arguments[1], *arguments[2], *arguments[3]):
        tensor.requires_grad_()
    torch.library.opcheck(torch.ops.fused_rnn.native_rnn.default, arguments)


@pytest.mark.parametrize("cell", FUSED)
def test_custom_op_matches_the_eager_path_with_dropout_and_lengths(cell, native_calls):
    arguments = op_arguments(cell, lengths=True, dropout=0.5)
    cell, x, hx, params, *options, lengths = arguments
    leaves = [t.clone().requires_grad_() for t in (x, *hx, *params)]

    def gradients(run):
        inputs = [leaf.clone() for leaf in leaves]
        torch.manual_seed(3)
        output, finals = run(inputs[0], inputs[1:1 + len(hx)], inputs[1 + len(hx):])
        results = [output, *finals]
        upstream = [torch.randn_like(result) for result in results]
        return [r.detach() for r in results] + list(torch.autograd.grad(results, leaves, upstream))

    def through_op(x, hx, params):
        output, finals, _ = torch.ops.fused_rnn.native_rnn(cell, x, hx, params, *options, lengths)
        return output, finals

    expected = gradients(lambda x, hx, params: native.layers(cell, x, tuple(hx), params, *options, lengths))
    actual = gradients(through_op)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, name=f"result {index}", tolerance=TOLERANCES[torch.float64])


class TwoRNNs(nn.Module):
    """LSTM (2 layers, bidirectional, projection, dropout) -> GRU, with lengths: every path of the op."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, proj_size=3,
                                   dropout=0.5, batch_first=True)
        self.gru = fused_rnn.GRU(6, HIDDEN_SIZE, batch_first=True)

    def forward(self, x, lengths):
        y, (h_n, c_n) = self.lstm(x, lengths=lengths)
        z, g_n = self.gru(y, lengths=lengths)
        return z, h_n, c_n, g_n


def test_compiled_training_matches_eager_with_dropout_and_lengths(native_calls):
    torch._dynamo.reset()
    counters.clear()
    model = TwoRNNs().double().train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)

    def run(module, batch, steps):
        generator = torch.Generator().manual_seed(batch * 100 + steps)
        x = torch.randn(batch, steps, INPUT_SIZE, generator=generator, dtype=torch.float64, requires_grad=True)
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        outputs = module(x, lengths)
        sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum() for o in outputs).backward()
        return [o.detach() for o in outputs] + [x.grad] + [p.grad for p in model.parameters()]

    try:
        # No size equal to another input size (5 features): dynamo would give both one symbol.
        for batch, steps in ((3, 8), (2, 11)):
            expected, actual = run(model, batch, steps), run(compiled, batch, steps)
            for index, (a, e) in enumerate(zip(actual, expected)):
                assert_close(a, e, name=f"result {index} at B={batch} T={steps}")
        # One graph for both shapes: T and B stayed symbolic (aten.lstm would have fixed T).
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
