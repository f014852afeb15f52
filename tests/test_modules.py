"""``fused_rnn.LSTM`` / ``GRU`` / ``RNN`` against ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` holding the same weights.

The oracle is the torch module in float64, loaded with the fused module's weights (rounded to the
fused dtype first, as are the inputs and upstream gradients, so that both compute from identical
values). Compared: the output, the final states, and the gradients of a random upstream gradient
on every output w.r.t. the input, the initial states and every parameter. Then the module's
surroundings: packing, ``lengths=``, dropout, state dicts, ``repr``, ``convert()``, dtype moves and
a short training run. The Elman RNN is two cells here, ``RNN_TANH`` and ``RNN_RELU`` (nn.RNNBase's
modes), one per nonlinearity.
"""

import copy
import io
from functools import partial

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from helpers import HALF_DTYPES, KERNEL_DEVICE, KERNELS_RUN, assert_close
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import reference

# Cells by nn.RNNBase's ``mode``: the Elman RNN's two nonlinearities are two cells.
CELLS = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
FUSED_CLASS = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN_TANH": fused_rnn.RNN, "RNN_RELU": fused_rnn.RNN}
TORCH_CLASS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def _constructor(cls, cell):
    """``cls``, with the nonlinearity of an ``RNN_*`` cell bound."""
    return partial(cls, nonlinearity=cell.removeprefix("RNN_").lower()) if cell.startswith("RNN_") else cls


# Constructors taking the torch module's arguments, one per cell.
FUSED = {cell: _constructor(FUSED_CLASS[cell], cell) for cell in CELLS}
TORCH = {cell: _constructor(TORCH_CLASS[cell], cell) for cell in CELLS}


def is_fused(module, cell):
    """Whether ``module`` is exactly the fused module of ``cell`` (class and, for the RNN, nonlinearity)."""
    return type(module) is FUSED_CLASS[cell] and module.mode == cell


INPUT_SIZE, HIDDEN_SIZE = 5, 7
STEPS, BATCH = 5, 3

OPTIONS = {
    "1layer": {},
    "2layers": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True),
    "2layers-bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "2layers-bidirectional-batch_first-no_bias": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
    "hidden20": dict(hidden_size=20),
}
LSTM_OPTIONS = {
    "proj3": dict(proj_size=3),
    "proj3-2layers-bidirectional": dict(proj_size=3, num_layers=2, bidirectional=True),
    "proj5-no_bias-batch_first": dict(proj_size=5, bias=False, batch_first=True),
}


def cases(*names):
    """``pytest.param(cell, options)`` for the named OPTIONS (LSTM_OPTIONS for LSTM only), with ids."""
    params = []
    for cell in CELLS:
        for name in names:
            table = LSTM_OPTIONS if name in LSTM_OPTIONS else OPTIONS
            if table is LSTM_OPTIONS and cell != "LSTM":
                continue
            params.append(pytest.param(cell, table[name], id=f"{cell}-{name}"))
    return params


ALL_CASES = cases(*OPTIONS, *LSTM_OPTIONS)
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


def make_pair(cell, dtype=torch.float64, **options):
    """``(oracle, fused)``: a float64 torch module and a fused module in ``dtype`` with equal weights."""
    options = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    oracle = TORCH[cell](dtype=torch.float64, **options)
    with torch.no_grad():
        for param in oracle.parameters():
            param.copy_(param.to(dtype))
    fused = FUSED[cell](device=KERNEL_DEVICE, dtype=dtype, **options)
    fused.load_state_dict(oracle.state_dict())
    return oracle, fused


def draw(*shape, dtype):
    """Random float64 values that ``dtype`` holds exactly."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype).double()


def draw_inputs(module, dtype, batch=BATCH, steps=STEPS, hx=True, unbatched=False):
    """Float64 ``{"input", "h_0"[, "c_0"]}`` for ``module`` (time-major unless it is batch_first)."""
    batch = 1 if unbatched else batch
    input_shape = (batch, steps) if module.batch_first else (steps, batch)
    tensors = {"input": draw(*input_shape, module.input_size, dtype=dtype)}
    if unbatched:
        tensors["input"] = tensors["input"].squeeze(0 if module.batch_first else 1)
    if hx:
        layers = module.num_layers * (2 if module.bidirectional else 1)
        state_shapes = {"h_0": module.proj_size or module.hidden_size}
        if module.mode == "LSTM":
            state_shapes["c_0"] = module.hidden_size
        for name, features in state_shapes.items():
            shape = (layers, features) if unbatched else (layers, batch, features)
            tensors[name] = draw(*shape, dtype=dtype)
    return tensors


def hx_of(inputs):
    """The ``hx`` argument made of ``inputs``: ``(h_0, c_0)``, ``h_0`` or None."""
    if "c_0" in inputs:
        return inputs["h_0"], inputs["c_0"]
    return inputs.get("h_0")


def plain_forward(module, inputs):
    return module(inputs["input"], hx_of(inputs))


def run_module(module, tensors, round_to, forward=plain_forward):
    """Run ``forward(module, inputs)`` and backpropagate a random upstream gradient on every output.

    ``inputs`` are copies of ``tensors`` in the module's dtype and on its device, requiring grad.
    Returns ``{name: tensor}``: the output (``.data`` of a PackedSequence), ``h_n`` (``c_n``), and
    ``grad <name>`` for every input and every parameter. The upstream gradients come from a fixed
    generator, rounded to ``round_to`` (the fused module's dtype), so that the oracle and the
    fused module receive the same ones.
    """
    weight = next(module.parameters())
    inputs = {name: t.to(weight.device, weight.dtype).requires_grad_() for name, t in tensors.items()}
    output, state = forward(module, inputs)
    if isinstance(output, PackedSequence):
        output = output.data
    states = state if isinstance(state, tuple) else (state,)
    results = dict(zip(("output", "h_n", "c_n"), (output, *states)))
    generator = torch.Generator().manual_seed(1)
    upstream = [
        torch.randn(value.shape, generator=generator, dtype=torch.float64).to(round_to).to(value)
        for value in results.values()
    ]
    wrt = {f"grad {name}": tensor for name, tensor in inputs.items()}
    wrt.update((f"grad {name}", param) for name, param in module.named_parameters())
    grads = torch.autograd.grad(list(results.values()), list(wrt.values()), upstream)
    results.update(zip(wrt, grads))
    return results


def assert_matches(actual, expected, dtype, same_math=None):
    """Every result of the fused module has its dtype and lies within its tolerance of the oracle's;
    with ``same_math`` (the oracle's results in ``dtype``) within twice their error of it."""
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].dtype == dtype, f"{name}: dtype {actual[name].dtype}, expected {dtype}"
        assert_close(actual[name], value, dtype=dtype, name=name, same_math=(same_math or {}).get(name))


def compare_with_oracle(oracle, fused, tensors, forward=plain_forward, oracle_forward=None, same_math=False):
    """Run both modules on ``tensors``, compare every result, and return the fused module's. In
    fp16 and bf16, and where ``same_math`` asks for it, each result's error is bounded by that of
    the oracle run in the fused module's dtype (``helpers.assert_close``)."""
    dtype = fused.weight_ih_l0.dtype
    expected = run_module(oracle, tensors, dtype, oracle_forward or forward)
    actual = run_module(fused, tensors, dtype, forward)
    same = None
    if same_math or dtype in HALF_DTYPES:
        same = run_module(copy.deepcopy(oracle).to(dtype), tensors, dtype, oracle_forward or forward)
    assert_matches(actual, expected, dtype, same)
    return actual


def non_contiguous(tensor):
    """The same values with the first two dimensions' strides swapped."""
    copy = tensor.transpose(0, 1).contiguous().transpose(0, 1)
    assert not copy.is_contiguous()
    return copy


def check_against_torch(cell, dtype, options, hx=True, unbatched=False, batch=BATCH):
    """Module pair from ``options``, random inputs of the given kind, everything compared."""
    oracle, fused = make_pair(cell, dtype, **options)
    return compare_with_oracle(oracle, fused, draw_inputs(oracle, dtype, batch=batch, hx=hx, unbatched=unbatched))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell, options", ALL_CASES)
def test_outputs_and_grads_match_torch_with_hx(cell, options, dtype):
    check_against_torch(cell, dtype, options)


@pytest.mark.parametrize("cell, options", cases("1layer", "2layers-bidirectional", "proj3"))
def test_outputs_and_grads_match_torch_without_hx(cell, options):
    check_against_torch(cell, torch.float32, options, hx=False)


@pytest.mark.parametrize("cell, options", cases("1layer", "proj3-2layers-bidirectional", "2layers-bidirectional"))
def test_float16_outputs_and_grads_match_float64_torch(cell, options):
    check_against_torch(cell, torch.float16, options)


@pytest.mark.parametrize("hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_2d_input_matches_torch(cell, batch_first, hx):
    actual = check_against_torch(
        cell, torch.float64, dict(bidirectional=True, batch_first=batch_first), hx=hx, unbatched=True
    )
    assert actual["output"].shape == (STEPS, 2 * HIDDEN_SIZE)
    assert actual["h_n"].shape == (2, HIDDEN_SIZE)


@pytest.mark.parametrize("hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_matches_torch(cell, hx):
    actual = check_against_torch(cell, torch.float64, dict(num_layers=2), hx=hx, batch=0)
    assert actual["output"].shape == (STEPS, 0, HIDDEN_SIZE)
    assert actual["h_n"].shape == (2, 0, HIDDEN_SIZE)


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_input_and_hx_match_torch(cell):
    oracle, fused = make_pair(cell, num_layers=2, bidirectional=True)
    tensors = {name: non_contiguous(t) for name, t in draw_inputs(oracle, torch.float64).items()}
    compare_with_oracle(oracle, fused, tensors)


def packed_forward(lengths, enforce_sorted, outputs):
    """A ``forward`` for ``run_module`` that packs the input and collects the PackedSequence returned."""

    def forward(module, inputs):
        packed = pack_padded_sequence(
            inputs["input"], lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted
        )
        output, state = module(packed, hx_of(inputs))
        outputs.append(output)
        return output, state

    return forward


def assert_same_packing(actual, expected):
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert (got is None) == (want is None), f"{field}: {got} vs {want}"
        if want is not None:
            assert torch.equal(got.cpu(), want.cpu()), f"{field}: {got} vs {want}"


PACKED_LENGTHS = {True: [5, 4, 2, 1], False: [3, 5, 1, 4]}


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize(
    "cell, options", cases("1layer", "2layers-bidirectional", "batch_first", "proj3-2layers-bidirectional")
)
def test_packed_sequence_matches_torch(cell, options, enforce_sorted):
    oracle, fused = make_pair(cell, **options)
    lengths = PACKED_LENGTHS[enforce_sorted]
    tensors = draw_inputs(oracle, torch.float64, batch=len(lengths))
    outputs = []
    compare_with_oracle(oracle, fused, tensors, packed_forward(lengths, enforce_sorted, outputs))
    expected_packed, actual_packed = outputs
    assert isinstance(actual_packed, PackedSequence)
    assert_same_packing(actual_packed, expected_packed)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_sequence_without_hx_matches_torch(cell):
    oracle, fused = make_pair(cell, torch.float32, bidirectional=True)
    lengths = PACKED_LENGTHS[False]
    tensors = draw_inputs(oracle, torch.float32, batch=len(lengths), hx=False)
    outputs = []
    compare_with_oracle(oracle, fused, tensors, packed_forward(lengths, False, outputs))
    assert_same_packing(*reversed(outputs))


@pytest.mark.parametrize(
    "cell, options", cases("1layer", "2layers-bidirectional", "batch_first", "proj3-2layers-bidirectional")
)
def test_lengths_keyword_matches_packed_torch_with_zero_padding(cell, options):
    oracle, fused = make_pair(cell, **options)
    lengths = torch.tensor([3, 5, 1, 4])
    tensors = draw_inputs(oracle, torch.float64, batch=len(lengths))

    def packed_then_padded(module, inputs):
        packed = pack_padded_sequence(inputs["input"], lengths, batch_first=module.batch_first, enforce_sorted=False)
        output, state = module(packed, hx_of(inputs))
        return pad_packed_sequence(output, batch_first=module.batch_first, total_length=STEPS)[0], state

    def with_lengths(module, inputs):
        return module(inputs["input"], hx_of(inputs), lengths=lengths.to(KERNEL_DEVICE))

    actual = compare_with_oracle(oracle, fused, tensors, with_lengths, oracle_forward=packed_then_padded)
    output = actual["output"] if not fused.batch_first else actual["output"].transpose(0, 1)
    past_end = torch.arange(STEPS)[:, None] >= lengths[None, :]
    assert (output.cpu()[past_end] == 0).all(), "outputs past each sequence's end must be exactly zero"


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_ignores_dropout_like_torch(cell):
    oracle, fused = make_pair(cell, num_layers=2, dropout=0.5)
    oracle.eval(), fused.eval()
    compare_with_oracle(oracle, fused, draw_inputs(oracle, torch.float64))


@pytest.mark.parametrize("cell", CELLS)
def test_training_dropout_is_reproducible_under_manual_seed(cell):
    _, fused = make_pair(cell, torch.float32, num_layers=2, dropout=0.5)
    fused.train()
    tensors = draw_inputs(fused, torch.float32)

    def run():
        torch.manual_seed(1234)
        return run_module(fused, tensors, torch.float32)

    first, second = run(), run()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between runs with the same seed"
    fused.eval()
    eval_output = run_module(fused, tensors, torch.float32)["output"]
    assert not torch.allclose(first["output"], eval_output), "dropout=0.5 in training mode changed nothing"


@pytest.mark.parametrize("cell", CELLS)
def test_training_dropout_one_zeroes_inner_layer_outputs_like_torch(cell):
    """dropout=1 is deterministic: the second layer sees zeros, and the last layer is not dropped."""
    oracle, fused = make_pair(cell, num_layers=2, dropout=1.0)
    oracle.train(), fused.train()
    actual = compare_with_oracle(oracle, fused, draw_inputs(oracle, torch.float64))
    if cell == "RNN_RELU":  # ReLU zeroes units of its own: every step and row keeps some
        assert (actual["output"] != 0).any(dim=-1).all()
    else:
        assert actual["output"].abs().min() > 0


@pytest.mark.parametrize("cell, options", ALL_CASES)
def test_named_parameters_match_torch(cell, options):
    kwargs = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    fused, torch_module = FUSED[cell](**kwargs), TORCH[cell](**kwargs)
    expected = [(name, param.shape, param.dtype) for name, param in torch_module.named_parameters()]
    assert [(name, param.shape, param.dtype) for name, param in fused.named_parameters()] == expected
    assert list(fused.state_dict()) == list(torch_module.state_dict())
    assert fused._flat_weights_names == torch_module._flat_weights_names


@pytest.mark.parametrize("cell, options", ALL_CASES)
def test_all_weights_match_torch(cell, options):
    kwargs = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    fused, torch_module = FUSED[cell](**kwargs), TORCH[cell](**kwargs)
    assert [[w.shape for w in layer] for layer in fused.all_weights] == [
        [w.shape for w in layer] for layer in torch_module.all_weights
    ]
    parameters = [param for layer in fused.all_weights for param in layer]
    assert [id(param) for param in parameters] == [id(param) for param in fused.parameters()]


REPR_OPTIONS = [
    {},
    dict(num_layers=3, bias=False, batch_first=True, dropout=0.25, bidirectional=True),
]


@pytest.mark.parametrize("options", REPR_OPTIONS, ids=["defaults", "every_option"])
@pytest.mark.parametrize("cell", CELLS)
def test_repr_matches_torch(cell, options):
    if cell == "LSTM" and options:
        options = dict(options, proj_size=4)
    fused, torch_module = FUSED[cell](5, 7, **options), TORCH[cell](5, 7, **options)
    expected = repr(torch_module).replace(type(torch_module).__name__, type(fused).__name__, 1)
    assert repr(fused) == expected


@pytest.mark.parametrize(
    "cell, options", cases("1layer", "2layers-bidirectional-batch_first-no_bias", "proj3-2layers-bidirectional")
)
def test_state_dict_round_trips_between_fused_and_torch(cell, options):
    oracle, fused = make_pair(cell, **options)
    for name, value in oracle.state_dict().items():
        assert torch.equal(fused.state_dict()[name].cpu(), value), f"nn -> fused: {name}"
    # fused -> nn: a fresh fused module (its own random init) loaded strictly into a fresh nn module.
    source = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **options)
    target = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **options)
    target.load_state_dict(source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), f"fused -> nn: {name}"
    x = draw_inputs(target, torch.float64, hx=False)["input"]
    assert_close(source.to(KERNEL_DEVICE)(x.to(KERNEL_DEVICE))[0], target(x)[0], name="output")


@pytest.mark.parametrize("cell", CELLS)
def test_flatten_parameters_keeps_parameters_and_outputs(cell):
    oracle, fused = make_pair(cell, num_layers=2)
    before = [(param, param.detach().clone()) for param in fused.parameters()]
    fused.flatten_parameters()
    for param, (same, value) in zip(fused.parameters(), before):
        assert param is same and torch.equal(param, value)
    x = draw_inputs(oracle, torch.float64, hx=False)["input"]
    assert_close(fused(x.to(KERNEL_DEVICE))[0], oracle(x)[0], name="output")


@pytest.mark.parametrize("cell", CELLS)
def test_init_is_uniform_within_one_over_sqrt_hidden(cell):
    hidden = 20
    fused = FUSED[cell](INPUT_SIZE, hidden, num_layers=2, bidirectional=True)
    bound = hidden**-0.5
    values = torch.cat([param.detach().flatten() for param in fused.parameters()])
    assert values.abs().max() <= bound
    # Uniform(-b, b): mean 0, standard deviation b / sqrt(3), extremes close to +-b.
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.std() / (bound / 3**0.5) - 1) < 0.05
    assert values.max() > 0.99 * bound and values.min() < -0.99 * bound
    fused.reset_parameters()
    redrawn = torch.cat([param.detach().flatten() for param in fused.parameters()])
    assert redrawn.abs().max() <= bound and not torch.equal(redrawn, values)


@pytest.mark.skipif(not KERNELS_RUN, reason="plain CPU calls are torch.nn's")
@pytest.mark.parametrize("cell", CELLS)
def test_torch_func_grad_and_vjp_match_torch(cell):
    """What docs/migration.md says of torch.func on the kernel path: ``grad`` of a
    ``functional_call`` and ``vjp`` give torch.nn's derivatives."""
    oracle, fused = make_pair(cell, num_layers=2, bidirectional=True)
    oracle, fused = oracle.to(KERNEL_DEVICE), fused.to(KERNEL_DEVICE)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64).to(KERNEL_DEVICE)
    weights = draw(STEPS, BATCH, 2 * HIDDEN_SIZE, dtype=torch.float64).to(KERNEL_DEVICE)

    def loss(module, params, input):
        return (torch.func.functional_call(module, params, (input,))[0] * weights).sum()

    params = {name: param.detach() for name, param in fused.named_parameters()}
    grads = torch.func.grad(partial(loss, fused), argnums=(0, 1))(params, x)
    expected = torch.func.grad(partial(loss, oracle), argnums=(0, 1))(params, x)
    for name, value in {**expected[0], "input": expected[1]}.items():
        assert_close({**grads[0], "input": grads[1]}[name], value, dtype=torch.float64, name=name)

    def pullback(module):
        outputs, vjp = torch.func.vjp(lambda input: tuple(torch.utils._pytree.tree_leaves(module(input))), x)
        return vjp(tuple(draw(*output.shape, dtype=torch.float64).to(KERNEL_DEVICE) for output in outputs))[0]

    torch.manual_seed(0)
    grad_x = pullback(fused)
    torch.manual_seed(0)
    assert_close(grad_x, pullback(oracle), dtype=torch.float64, name="vjp")


@pytest.mark.parametrize("cell", CELLS)
def test_vmap_and_forward_mode_ad_run_the_layers_in_plain_pytorch(cell):
    """Neither has a rule for the kernels' Functions (nor vmap for PyTorch's RNN operator, where
    ``nn.LSTM`` raises): the layers run in ``reference.layer``, which they differentiate as any
    PyTorch code. Per-example gradients (``vmap`` of ``grad``, DP-SGD's), ``vmap``, ``jvp``,
    ``torch.autograd.forward_ad`` and ``jacfwd`` give torch.nn's values, checked in float64
    against it run one example at a time, and its tangents on the CPU (cuDNN has no jvp)."""
    oracle, fused = make_pair(cell, num_layers=2, bidirectional=True)
    fused = fused.to(KERNEL_DEVICE)
    examples = draw(2, STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)

    leaves = torch.utils._pytree.tree_leaves
    mapped = leaves(torch.func.vmap(fused)(examples.to(KERNEL_DEVICE)))
    for index, example in enumerate(examples):
        for name, value, expected in zip(("output", "h_n", "c_n"), mapped, leaves(oracle(example))):
            assert_close(value[index], expected, dtype=torch.float64, name=f"vmap's {name}, example {index}")

    x, tangent = examples
    params = {name: param.detach() for name, param in fused.named_parameters()}

    def loss(module, params, input):
        # One sequence: vmap takes the batch axis (1) away from it.
        output = torch.func.functional_call(module, params, (input.unsqueeze(1),))[0]
        return (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype, device=output.device)
                .view_as(output)).sum()

    per_example = torch.func.vmap(torch.func.grad(partial(loss, fused)), in_dims=(None, 1))(params, x.to(KERNEL_DEVICE))
    for column in range(BATCH):
        expected = torch.autograd.grad(loss(oracle, dict(oracle.named_parameters()), x[:, column]), oracle.parameters())
        for (name, grads), value in zip(per_example.items(), expected):
            assert_close(grads[column], value, dtype=torch.float64, name=f"per-example grad of {name}, {column}")

    expected_output, expected_tangent = torch.func.jvp(lambda input: oracle(input)[0], (x,), (tangent,))
    output, output_tangent = torch.func.jvp(lambda input: fused(input)[0], (x.to(KERNEL_DEVICE),),
                                            (tangent.to(KERNEL_DEVICE),))
    assert_close(output, expected_output, dtype=torch.float64, name="jvp output")
    assert_close(output_tangent, expected_tangent, dtype=torch.float64, name="jvp tangent")
    with forward_ad.dual_level():
        dual = fused(forward_ad.make_dual(x.to(KERNEL_DEVICE), tangent.to(KERNEL_DEVICE)))[0]
        assert_close(forward_ad.unpack_dual(dual).tangent, expected_tangent, dtype=torch.float64,
                     name="forward_ad tangent")
    short = x[:2, :1]
    jacobian = torch.func.jacfwd(lambda input: fused(input)[0])(short.to(KERNEL_DEVICE))
    assert_close(jacobian, torch.func.jacrev(lambda input: oracle(input)[0])(short), dtype=torch.float64,
                 name="jacfwd")


@pytest.mark.parametrize("cell", CELLS)
def test_functional_call_deepcopy_and_save_load_behave_like_torch(cell):
    oracle, fused = make_pair(cell)
    x = draw_inputs(oracle, torch.float64, hx=False)["input"]
    doubled = {name: 2 * param for name, param in oracle.named_parameters()}
    expected = torch.func.functional_call(oracle, doubled, (x,))[0]
    on_device = {name: value.to(KERNEL_DEVICE) for name, value in doubled.items()}
    output = torch.func.functional_call(fused, on_device, (x.to(KERNEL_DEVICE),))[0]
    assert_close(output, expected, name="functional_call")
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert is_fused(twin, cell)
        assert_close(twin(x.to(KERNEL_DEVICE))[0], oracle(x)[0], name="output of a copy")


class Seq2Seq(nn.Module):
    """An encoder (GRU inside an nn.Sequential), a decoder LSTM held as a plain attribute and a
    ReLU RNN before the head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(INPUT_SIZE, 6), nn.Tanh(), nn.GRU(6, HIDDEN_SIZE, batch_first=True))
        self.decoder = nn.LSTM(HIDDEN_SIZE, 6, proj_size=4, bidirectional=True, batch_first=True)
        self.post = nn.RNN(8, 5, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        encoded, _ = self.encoder(x)
        decoded, (h_n, c_n) = self.decoder(encoded)
        return self.head(self.post(decoded)[0]), h_n, c_n


def seq2seq_forward(model, inputs):
    output, h_n, c_n = model(inputs["input"])
    return output, (h_n, c_n)


def test_convert_replaces_nested_rnns_sharing_parameters():
    model = Seq2Seq().double()
    x = draw(BATCH, STEPS, INPUT_SIZE, dtype=torch.float64)
    expected = run_module(model, {"input": x}, torch.float64, seq2seq_forward)
    parameters = list(model.parameters())
    assert fused_rnn.convert(model) is model
    assert type(model.encoder[2]) is fused_rnn.GRU
    assert type(model.decoder) is fused_rnn.LSTM
    assert is_fused(model.post, "RNN_RELU")
    assert [id(param) for param in model.parameters()] == [id(param) for param in parameters]
    model.to(KERNEL_DEVICE)
    assert_matches(run_module(model, {"input": x}, torch.float64, seq2seq_forward), expected, torch.float64)


def test_convert_keeps_a_module_held_under_several_names_one_module():
    shared_lstm, shared_gru = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE), nn.GRU(INPUT_SIZE, HIDDEN_SIZE)
    model = nn.Module()
    model.encoder = model.decoder = shared_lstm  # one parent, two names
    model.first, model.second = nn.Sequential(shared_gru), nn.ModuleList([shared_gru, shared_gru])
    fused_rnn.convert(model)
    assert type(model.encoder) is fused_rnn.LSTM and model.decoder is model.encoder
    assert type(model.first[0]) is fused_rnn.GRU
    assert model.second[0] is model.first[0] and model.second[1] is model.first[0]


@pytest.mark.parametrize("cell", CELLS)
def test_convert_of_a_bare_rnn_returns_its_fused_twin(cell):
    options = dict(num_layers=2, bias=False, batch_first=True, dropout=0.25, bidirectional=True)
    if cell == "LSTM":
        options["proj_size"] = 3
    original = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, **options)
    converted = fused_rnn.convert(original)
    assert is_fused(converted, cell)
    assert repr(converted) == repr(original)
    converted_parameters, original_parameters = dict(converted.named_parameters()), dict(original.named_parameters())
    assert list(converted_parameters) == list(original_parameters)
    for name, param in original_parameters.items():
        assert converted_parameters[name] is param, f"{name} is not the original Parameter object"


def test_convert_leaves_subclasses_alone():
    class DoublingLSTM(nn.LSTM):
        def forward(self, input, hx=None):
            return super().forward(2 * input, hx)

    model = nn.Sequential(DoublingLSTM(3, 4), nn.GRU(4, 5))
    fused_rnn.convert(model)
    assert type(model[0]) is DoublingLSTM, "a subclass's own forward would be lost"
    assert isinstance(model[1], fused_rnn.GRU)


class Halved(nn.Module):
    """A parametrization: the weight the module computes with is half the stored one."""

    def forward(self, weight):
        return weight / 2


@pytest.mark.parametrize("parametrization", ["weight_norm", "halved"])
def test_a_parametrization_registered_on_the_fused_module_acts_at_every_call(parametrization):
    # A parametrized nn.LSTM is a generated subclass, which convert leaves alone (migration.md):
    # registered on the fused module instead, the parametrization makes W_hh at each call, and its
    # stored tensors get the gradients, as on nn.LSTM.
    def register(module):
        if parametrization == "weight_norm":
            nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
        else:
            nn.utils.parametrize.register_parametrization(module, "weight_hh_l0", Halved())
        return module

    oracle = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64)
    fused = fused_rnn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64)
    fused.load_state_dict(oracle.state_dict())
    register(oracle).to(KERNEL_DEVICE)
    register(fused).to(KERNEL_DEVICE)
    assert fused_rnn.convert(oracle) is oracle
    tensors = draw_inputs(fused, torch.float64)
    for _ in range(2):
        assert_matches(run_module(fused, tensors, torch.float64), run_module(oracle, tensors, torch.float64),
                       torch.float64)
        # A step of an optimizer on the stored tensors: the next call computes with the new W_hh.
        with torch.no_grad():
            for module in (oracle, fused):
                for stored in module.parametrizations.weight_hh_l0.parameters():
                    stored.mul_(1.5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_keeps_training_mode(training):
    model = Seq2Seq().train(training)
    fused_rnn.convert(model)
    assert [module.training for module in model.modules()] == [training] * len(list(model.modules()))


@pytest.mark.parametrize("cell", CELLS)
def test_optimizer_made_before_convert_updates_the_converted_module(cell):
    model = nn.Sequential(TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64))
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    fused_rnn.convert(model)
    model.to(KERNEL_DEVICE)
    assert is_fused(model[0], cell)
    initial = [param.detach().clone() for param in model.parameters()]
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)
    for module, opt, device in ((model, optimizer, KERNEL_DEVICE), (twin, twin_optimizer, "cpu")):
        opt.zero_grad()
        module(x.to(device))[0].square().mean().backward()
        opt.step()
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        assert_close(param, twin_param, name=name)
    for (name, param), before in zip(model.named_parameters(), initial):
        assert not torch.equal(param.detach().cpu(), before.cpu()), f"{name} was not updated by the optimizer"


@pytest.mark.parametrize("cell", CELLS)
def test_double_and_to_move_the_fused_module(cell):
    oracle, fused = make_pair(cell, torch.float32, bidirectional=True)
    tensors = draw_inputs(oracle, torch.float32)
    assert fused.double() is fused
    assert all(param.dtype == torch.float64 for param in fused.parameters())
    assert all(weight is param for weight, param in zip(fused._flat_weights, fused.parameters()))
    compare_with_oracle(oracle, fused, tensors)
    fused.to(device=KERNEL_DEVICE, dtype=torch.float32)
    assert all(param.dtype == torch.float32 for param in fused.parameters())
    compare_with_oracle(oracle, fused, tensors)


@pytest.mark.parametrize("cell", CELLS)
def test_every_parameter_gradient_has_a_storage_of_its_own_as_in_torch(cell):
    # A bidirectional layer's W_ih and bias gradients were split from one product over both
    # directions: autograd kept the views as .grad, so the reverse direction's gradient lived at an
    # offset of the forward one's storage (freeing that storage destroyed it; torch.save wrote both).
    oracle, fused = make_pair(cell, torch.float64, bidirectional=True, num_layers=2)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64).to(KERNEL_DEVICE)
    output = fused(x)[0]
    output.square().sum().backward()
    storages = {name: param.grad.untyped_storage().data_ptr() for name, param in fused.named_parameters()}
    assert len(set(storages.values())) == len(storages), storages
    for name, param in fused.named_parameters():
        assert param.grad.storage_offset() == 0, name
        assert param.grad.untyped_storage().nbytes() == param.grad.numel() * param.grad.element_size(), name
    oracle(x.cpu())[0].square().sum().backward()
    for name, param in fused.named_parameters():
        assert_close(param.grad, getattr(oracle, name).grad, dtype=torch.float64, name=name)


@pytest.mark.parametrize("cell", CELLS)
def test_sgd_training_moves_the_loss_like_torch(cell):
    oracle, fused = make_pair(cell, torch.float32)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float32)
    target = draw(STEPS, BATCH, HIDDEN_SIZE, dtype=torch.float32)

    def train(module, dtype, device):
        optimizer = torch.optim.SGD(module.parameters(), lr=2.0)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            output = module(x.to(device, dtype))[0]
            loss = (output - target.to(device, dtype)).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    expected, actual = train(oracle, torch.float64, "cpu"), train(fused, torch.float32, KERNEL_DEVICE)
    assert_close(actual, expected, name="losses")
    assert (expected[1:] < expected[:-1]).all(), f"the loss did not fall at every step: {expected.tolist()}"
    for name, param in fused.named_parameters():
        assert_close(param, getattr(oracle, name), dtype=torch.float32, name=name)


@pytest.mark.parametrize("cell", CELLS)
def test_module_runs_the_triton_kernels_not_the_reference(cell, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the module fell back to the PyTorch reference recurrence")

    monkeypatch.setattr(reference, "layer", refuse)
    for name in ("lstm_recurrence", "gru_recurrence", "rnn_recurrence"):
        monkeypatch.setattr(reference, name, refuse)
    check_against_torch(cell, torch.float32, dict(bidirectional=True))


def test_rnn_takes_torch_positional_arguments_and_rejects_other_nonlinearities():
    args = (INPUT_SIZE, HIDDEN_SIZE, 2, "relu", False, True, 0.25, True)
    fused, torch_module = fused_rnn.RNN(*args), nn.RNN(*args)
    for name in ("mode", "nonlinearity", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(fused, name) == getattr(torch_module, name), name
    assert fused_rnn.RNN(INPUT_SIZE, HIDDEN_SIZE).mode == "RNN_TANH"
    with pytest.raises(ValueError):
        nn.RNN(INPUT_SIZE, HIDDEN_SIZE, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        fused_rnn.RNN(INPUT_SIZE, HIDDEN_SIZE, nonlinearity="sigmoid")


def test_numpy_hyperparameters_and_a_changed_rnn_mode_behave_as_in_torch():
    """torch.nn takes numpy numbers for ``num_layers`` and ``dropout`` (hyperparameters drawn by
    numpy), and nn.RNN's forward picks its nonlinearity from ``mode``, not from ``nonlinearity``."""
    oracle, fused = make_pair("LSTM", num_layers=np.int64(2), dropout=np.float32(0.25))
    oracle.eval(), fused.eval()
    assert fused_rnn.GRU(INPUT_SIZE, HIDDEN_SIZE, zoneout=np.float32(0.1)).zoneout == pytest.approx(0.1)
    inputs = draw_inputs(fused, torch.float64)
    assert_matches(run_module(fused, inputs, torch.float64), run_module(oracle, inputs, torch.float64),
                   torch.float64)
    oracle, fused = make_pair("RNN_TANH")
    for module in (oracle, fused):
        module.mode = "RNN_RELU"
    inputs = draw_inputs(fused, torch.float64)
    assert_matches(run_module(fused, inputs, torch.float64), run_module(oracle, inputs, torch.float64),
                   torch.float64)


def test_convert_keeps_hooks_buffers_and_attributes():
    model = nn.Sequential(nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64))
    calls = []
    handle = model[0].register_forward_hook(lambda module, args, output: calls.append(type(module)))
    model[0].register_buffer("calls_seen", torch.tensor(3))
    model[0].note = "kept"
    fused_rnn.convert(model)
    model.to(KERNEL_DEVICE)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64).to(KERNEL_DEVICE)
    model(x)
    assert calls == [fused_rnn.LSTM]
    assert list(model.state_dict())[-1] == "0.calls_seen" and model.state_dict()["0.calls_seen"].item() == 3
    assert model[0].note == "kept"
    handle.remove()
    model(x)
    assert calls == [fused_rnn.LSTM], "the hook's handle no longer removes it"


def test_converted_module_and_its_original_keep_containers_of_their_own():
    """The twin shares the original's Parameter objects, not its dicts: what is registered on one
    after convert (a buffer, a parameter) does not appear on the other; the hooks' dicts aside,
    which stay shared so that a handle removes a hook from both (the test above)."""
    original = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    names = list(original.state_dict())
    converted = fused_rnn.convert(original)
    converted.register_buffer("steps_seen", torch.tensor(0))
    original.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert list(original.state_dict()) == [*names, "scale"], "a buffer registered on the converted module " \
        "appeared on the original"
    assert list(converted.state_dict()) == [*names, "steps_seen"], "a parameter registered on the original " \
        "appeared on the converted module"


@pytest.mark.parametrize("cell", CELLS)
def test_output_changed_in_place_is_refused_by_the_backward_that_needs_it(cell):
    # As with cuDNN, whose backward reads the output: the change itself is allowed (before, the
    # output was a view made inside the autograd Function, which refused any change at once).
    _, fused = make_pair(cell, bidirectional=True)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64).to(KERNEL_DEVICE).requires_grad_()
    output = fused(x)[0]
    output.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()
    with torch.no_grad():
        fused(x)[0].add_(1)


@pytest.mark.parametrize("cell", CELLS)
def test_output_hook_sees_only_the_output_gradient_as_in_torch(cell):
    # h_n is an output of its own, as torch.nn's: a hook on output that changes its gradient leaves
    # what reaches the input through h_n (h_n was a view of output, and the hook zeroed that too).
    oracle, fused = make_pair(cell, bidirectional=True)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)

    def run(module):
        input = x.to(KERNEL_DEVICE).requires_grad_()
        output, state = module(input)
        h_n = state[0] if isinstance(state, tuple) else state
        seen = []
        output.register_hook(lambda grad: seen.append(grad.clone()) or grad * 0)
        (output.sum() + h_n.sum()).backward()
        return seen[0].cpu(), input.grad.cpu()

    (seen, grad), (expected_seen, expected_grad) = run(fused), run(oracle)
    assert_close(seen, expected_seen, dtype=torch.float64, name="output's gradient")
    assert_close(grad, expected_grad, dtype=torch.float64, name="input's gradient through h_n")
    assert expected_grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cell", CELLS)
def test_torch_jit_script_is_refused_with_what_to_use_instead(cell):
    # TorchScript's own failure was an AssertionError about overloads that named nothing useful.
    torch_module, fused = make_pair(cell)
    torch.jit.script(nn.Sequential(torch_module))
    for scripted in (fused, nn.Sequential(nn.Identity(), fused)):
        with pytest.raises(RuntimeError, match=rf"fused_rnn.{type(fused).__name__} does not support torch.jit.script.*torch.compile"):
            torch.jit.script(scripted)
