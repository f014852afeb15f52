"""``fused_rnn.functional.lstm`` / ``gru`` against ``torch.nn.LSTM`` / ``torch.nn.GRU`` in float64.

Both sides use the same weights: ours get ``module._flat_weights``. Outputs, final states and the
gradients with respect to the input, the initial states and every parameter are compared under
random upstream gradients on every output.
"""

import copy
import re

import pytest
import torch
from helpers import HALF_DTYPES, KERNEL_DEVICE, assert_close
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_rnn import functional

T, B, INPUT, HIDDEN, PROJ = 5, 4, 5, 7, 3
# Unsorted, with a full-length row and a length-1 row: packing must sort and unsort.
LENGTHS = [3, 5, 1, 4]

# (num_layers, bidirectional, batch_first, bias, proj_size)
LSTM_CONFIGS = {
    "L1": (1, False, False, True, 0),
    "L2-bidirectional": (2, True, False, True, 0),
    "L1-batch_first-no-bias": (1, False, True, False, 0),
    "L2-bidirectional-proj": (2, True, False, True, PROJ),
    "L1-batch_first-no-bias-proj": (1, False, True, False, PROJ),
    "L2-bidirectional-batch_first-no-bias-proj": (2, True, True, False, PROJ),
}
# (num_layers, bidirectional, batch_first, bias)
GRU_CONFIGS = {
    "L1": (1, False, False, True),
    "L2-bidirectional": (2, True, False, True),
    "L1-batch_first-no-bias": (1, False, True, False),
    "L2-bidirectional-batch_first-no-bias": (2, True, True, False),
}


def make_torch_module(cell, config, dropout=0.0, device=KERNEL_DEVICE):
    """``nn.LSTM`` / ``nn.GRU`` in float64 with PyTorch's random initialisation."""
    if cell == "lstm":
        num_layers, bidirectional, batch_first, bias, proj_size = config
        module = torch.nn.LSTM(
            INPUT, HIDDEN, num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
            bidirectional=bidirectional, proj_size=proj_size,
        )
    else:
        num_layers, bidirectional, batch_first, bias = config
        module = torch.nn.GRU(
            INPUT, HIDDEN, num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
            bidirectional=bidirectional,
        )
    return module.to(device, torch.float64)


def make_inputs(cell, module, dtype, device=KERNEL_DEVICE):
    """Random input and initial states (rounded to ``dtype``, held in float64)."""
    groups = module.num_layers * (2 if module.bidirectional else 1)
    shape = (B, T, INPUT) if module.batch_first else (T, B, INPUT)
    x = torch.randn(*shape, dtype=torch.float64).to(dtype).double()
    h0 = torch.randn(groups, B, module.proj_size or HIDDEN, dtype=torch.float64).to(dtype).double()
    if cell == "gru":
        return x.to(device), (h0.to(device),)
    c0 = torch.randn(groups, B, HIDDEN, dtype=torch.float64).to(dtype).double()
    return x.to(device), (h0.to(device), c0.to(device))


def run_ours(cell, module, x, state, params, lengths=None, **kwargs):
    """``functional.lstm`` / ``gru`` with the module's configuration; returns ``(output, states)``."""
    run = functional.lstm if cell == "lstm" else functional.gru
    hx = state if cell == "lstm" or state is None else state[0]
    output, final = run(
        x, hx, params, has_biases=module.bias, num_layers=module.num_layers,
        bidirectional=module.bidirectional, batch_first=module.batch_first, lengths=lengths, **kwargs,
    )
    return output, (final if cell == "lstm" else (final,))


def run_torch(cell, module, x, state, lengths=None):
    """The module on a padded batch, or on a PackedSequence when ``lengths`` is given."""
    hx = state if cell == "lstm" or state is None else state[0]
    if lengths is None:
        output, final = module(x, hx)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=False)
        packed_output, final = module(packed, hx)
        output, _ = pad_packed_sequence(packed_output, batch_first=module.batch_first, total_length=T)
    return output, (final if cell == "lstm" else (final,))


def assert_same_result(ours, theirs):
    """``(output, final states)`` of ours against torch's, element by element."""
    (output, final), (ref_output, ref_final) = ours, theirs
    assert_close(output, ref_output, name="output")
    for value, ref in zip(final, ref_final, strict=True):
        assert_close(value, ref, name="final state")


def torch_results(cell, module, inputs, upstream, lengths=None):
    """The module's outputs from ``inputs`` (input and initial states, converted to its dtype) and
    their gradients with respect to the inputs and its weights under ``upstream``."""
    dtype = module._flat_weights[0].dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    output, final = run_torch(cell, module, leaves[0], tuple(leaves[1:]), lengths)
    outputs = [output, *final]
    grads = torch.autograd.grad(outputs, leaves + list(module._flat_weights), [u.to(dtype) for u in upstream])
    return outputs + list(grads)


def check_against_torch(cell, config, dtype, lengths=None, lengths_as_list=False):
    """Ours in ``dtype`` against the float64 module (on a PackedSequence when ``lengths`` is given):
    output, final states, and the gradients of the input, initial states and every parameter;
    fp16 and bf16 within twice the error of the module run in their dtype (``assert_close``)."""
    module = make_torch_module(cell, config)
    x, state = make_inputs(cell, module, dtype)
    with torch.no_grad():
        for weight in module._flat_weights:
            weight.copy_(weight.to(dtype))  # both sides start from the weights as rounded to dtype
    ours_inputs = [x.to(dtype).requires_grad_()] + [s.to(dtype).requires_grad_() for s in state]
    params = [w.detach().to(dtype).requires_grad_() for w in module._flat_weights]
    ours_lengths = None
    if lengths is not None:
        ours_lengths = lengths if lengths_as_list else torch.tensor(lengths, device=KERNEL_DEVICE)

    output, final = run_ours(cell, module, ours_inputs[0], tuple(ours_inputs[1:]), params, ours_lengths)
    outputs = [output, *final]
    upstream = [torch.randn_like(o) for o in outputs]
    results = outputs + list(torch.autograd.grad(outputs, ours_inputs + params, upstream))

    expected = torch_results(cell, module, [x, *state], upstream, lengths)
    same_math = None
    if dtype in HALF_DTYPES:
        same_math = torch_results(cell, copy.deepcopy(module).to(dtype), [x, *state], upstream, lengths)
    state_names = ["h0", "c0"] if cell == "lstm" else ["h0"]
    names = (["output", "h_n", "c_n"][:len(outputs)] + ["grad input"] + [f"grad {n}" for n in state_names]
             + [f"grad {n}" for n in module._flat_weights_names])
    for name, value, wanted, same in zip(names, results, expected, same_math or [None] * len(expected), strict=True):
        assert value.dtype == dtype, name
        assert_close(value, wanted, dtype, name=name, same_math=same)
    if lengths is not None:
        time_major = output.transpose(0, 1) if module.batch_first else output
        padded = (torch.arange(T)[:, None] >= torch.tensor(lengths)[None, :]).to(output.device)
        assert (time_major[padded] == 0).all(), "outputs past a sequence's end must be exactly zero"


@pytest.mark.parametrize("config", LSTM_CONFIGS.values(), ids=LSTM_CONFIGS.keys())
def test_lstm_output_states_and_grads_match_torch(config):
    check_against_torch("lstm", config, torch.float64)


@pytest.mark.parametrize("config", GRU_CONFIGS.values(), ids=GRU_CONFIGS.keys())
def test_gru_output_state_and_grads_match_torch(config):
    check_against_torch("gru", config, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_lstm_output_states_and_grads_match_torch_per_dtype(dtype):
    check_against_torch("lstm", LSTM_CONFIGS["L2-bidirectional-proj"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_gru_output_state_and_grads_match_torch_per_dtype(dtype):
    check_against_torch("gru", GRU_CONFIGS["L2-bidirectional"], dtype)


@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
def test_lstm_grads_of_one_result_alone_match_torch(used):
    """A loss of one result leaves the layer's other outputs without a gradient (None in its
    backward): every gradient is still torch's."""
    module = make_torch_module("lstm", LSTM_CONFIGS["L2-bidirectional-proj"])
    x, state = make_inputs("lstm", module, torch.float64)

    def grads_of(run, weights, *params):
        inputs = [tensor.detach().clone().requires_grad_() for tensor in (x, *state)]
        output, (h_n, c_n) = run("lstm", module, inputs[0], tuple(inputs[1:]), *params)
        result = {"output": output, "h_n": h_n, "c_n": c_n}[used]
        torch.manual_seed(0)
        return torch.autograd.grad((result * torch.randn_like(result)).sum(), inputs + weights)

    params = [weight.detach().clone().requires_grad_() for weight in module._flat_weights]
    expected = grads_of(run_torch, list(module._flat_weights))
    names = ["input", "h0", "c0", *module._flat_weights_names]
    for name, value, wanted in zip(names, grads_of(run_ours, params, params), expected, strict=True):
        assert_close(value, wanted, torch.float64, name=f"grad {name}")


@pytest.mark.parametrize("wanted", ["h0", "c0"])
def test_lstm_grad_of_one_initial_state_alone_matches_torch(wanted):
    """Only one of h0, c0 requires grad: the backward gives that one its gradient, not the other's flag."""
    module = make_torch_module("lstm", LSTM_CONFIGS["L2-bidirectional"])
    x, state = make_inputs("lstm", module, torch.float64)
    upstream = torch.randn(T, B, 2 * HIDDEN, dtype=torch.float64)

    def grad_of(run, *params):
        states = [s.detach().clone().requires_grad_(name == wanted) for name, s in zip(("h0", "c0"), state)]
        output, _ = run("lstm", module, x, tuple(states), *params)
        return torch.autograd.grad((output * upstream).sum(), states[("h0", "c0").index(wanted)])[0]

    params = [weight.detach().clone() for weight in module._flat_weights]
    assert_close(grad_of(run_ours, params), grad_of(run_torch), torch.float64, name=f"grad {wanted}")


@pytest.mark.parametrize("wanted", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_grad_of_one_kind_of_bias_alone_matches_torch(cell, wanted):
    """Only b_ih or only b_hh requires grad (the other frozen, as fine-tuning may leave it): the
    backward computes the biases' gradients when either kind wants them, and the GRU's b_hh
    gets its own (b_hn sits inside r * (.)), not b_ih's."""
    config = LSTM_CONFIGS["L2-bidirectional"] if cell == "lstm" else GRU_CONFIGS["L2-bidirectional"]
    module = make_torch_module(cell, config)
    x, state = make_inputs(cell, module, torch.float64)
    upstream = torch.randn(T, B, 2 * HIDDEN, dtype=torch.float64, device=KERNEL_DEVICE)
    chosen = [name.startswith(wanted) for name in module._flat_weights_names]

    def grads_of(run, weights, *params):
        output, _ = run(cell, module, x, state, *params)
        return torch.autograd.grad((output * upstream).sum(), [w for w, c in zip(weights, chosen) if c])

    params = [weight.detach().clone().requires_grad_(c) for weight, c in zip(module._flat_weights, chosen)]
    expected = grads_of(run_torch, list(module._flat_weights))
    names = [name for name, c in zip(module._flat_weights_names, chosen) if c]
    for name, value, wanted_grad in zip(names, grads_of(run_ours, params, params), expected, strict=True):
        assert_close(value, wanted_grad, torch.float64, name=f"grad {name} (the other biases frozen)")


@pytest.mark.parametrize(
    "config", [LSTM_CONFIGS[k] for k in ("L1", "L2-bidirectional-proj", "L1-batch_first-no-bias")],
    ids=["L1", "L2-bidirectional-proj", "L1-batch_first-no-bias"],
)
def test_lstm_with_lengths_matches_torch_packed_sequence(config):
    check_against_torch("lstm", config, torch.float64, lengths=LENGTHS)


@pytest.mark.parametrize(
    "config", [GRU_CONFIGS[k] for k in ("L1", "L2-bidirectional-batch_first-no-bias")],
    ids=["L1", "L2-bidirectional-batch_first-no-bias"],
)
def test_gru_with_lengths_matches_torch_packed_sequence(config):
    check_against_torch("gru", config, torch.float64, lengths=LENGTHS)


def test_lstm_with_lengths_as_python_list_matches_torch_packed_sequence():
    check_against_torch("lstm", LSTM_CONFIGS["L1-batch_first-no-bias-proj"], torch.float32, LENGTHS, lengths_as_list=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_without_initial_state_matches_torch_zero_state(cell):
    config = LSTM_CONFIGS["L2-bidirectional"] if cell == "lstm" else GRU_CONFIGS["L2-bidirectional"]
    module = make_torch_module(cell, config)
    x, _ = make_inputs(cell, module, torch.float64)
    with torch.no_grad():
        ours = run_ours(cell, module, x, None, list(module._flat_weights))
        assert_same_result(ours, run_torch(cell, module, x, None))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_in_training_is_reproducible_under_seed_and_differs_from_eval(cell):
    config = (2, False, False, True, 0) if cell == "lstm" else (2, False, False, True)
    module = make_torch_module(cell, config, dropout=0.5)
    x, state = make_inputs(cell, module, torch.float64)
    params = list(module._flat_weights)

    def run(train, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            output, final = run_ours(cell, module, x, state, params, dropout=0.5, train=train)
        return torch.cat([output.flatten()] + [f.flatten() for f in final])

    first, again = run(True, 1), run(True, 1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, run(True, 2)), "the dropout mask does not depend on the seed"
    assert not torch.allclose(first, run(False, 1)), "dropout with train=True changed nothing"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_without_training_matches_torch_eval(cell):
    config = LSTM_CONFIGS["L2-bidirectional-proj"] if cell == "lstm" else GRU_CONFIGS["L2-bidirectional"]
    module = make_torch_module(cell, config, dropout=0.5).eval()
    x, state = make_inputs(cell, module, torch.float64)
    with torch.no_grad():
        ours = run_ours(cell, module, x, state, list(module._flat_weights), dropout=0.5, train=False)
        assert_same_result(ours, run_torch(cell, module, x, state))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_in_training_matches_torch_train_mode_under_same_seed(cell):
    # On CPU tensors: cuDNN draws its dropout masks from its own generator, PyTorch's CPU RNN from
    # the global one, in the order the functional API uses (layer by layer, time-major output).
    config = (2, True, True, True, PROJ) if cell == "lstm" else (2, True, True, True)
    module = make_torch_module(cell, config, dropout=0.5, device="cpu").train()
    x, state = make_inputs(cell, module, torch.float64, device="cpu")
    x.requires_grad_()
    torch.manual_seed(1)
    ours = run_ours(cell, module, x, state, list(module._flat_weights), dropout=0.5, train=True)
    torch.manual_seed(1)
    theirs = run_torch(cell, module, x, state)
    assert_same_result(ours, theirs)
    (output, _), (ref_output, _) = ours, theirs
    upstream = torch.randn_like(output)
    (grad,) = torch.autograd.grad(output, x, upstream)
    (ref_grad,) = torch.autograd.grad(ref_output, x, upstream)
    assert_close(grad, ref_grad, name="grad input")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_has_no_effect_on_a_single_layer(cell):
    config = LSTM_CONFIGS["L1"] if cell == "lstm" else GRU_CONFIGS["L1"]
    module = make_torch_module(cell, config)
    x, state = make_inputs(cell, module, torch.float64)
    params = list(module._flat_weights)
    with torch.no_grad():
        train_output, _ = run_ours(cell, module, x, state, params, dropout=0.5, train=True)
        eval_output, _ = run_ours(cell, module, x, state, params, dropout=0.5, train=False)
    assert torch.equal(train_output, eval_output)


@pytest.mark.parametrize("index", range(20))
def test_a_weight_of_the_wrong_shape_is_named(index):
    # 2 layers x 2 directions x (W_ih, W_hh, b_ih, b_hh, W_hr): each weight's own index, layer,
    # direction and shapes, whichever it is - except the first W_hh, which gives the sizes that the
    # others are checked against: with it cut, some other weight is named.
    module = make_torch_module("lstm", LSTM_CONFIGS["L2-bidirectional-proj"])
    x, state = make_inputs("lstm", module, torch.float64)
    params = list(module._flat_weights)
    wrong = params[index].detach()[..., :-1]
    params[index] = wrong
    expected = list(module._flat_weights[index].shape)
    match = (rf"weight {index} \(layer {index // 10}, direction {index // 5 % 2}\) has shape "
             rf"{re.escape(str(list(wrong.shape)))}, expected {re.escape(str(expected))}")
    if index == 1:
        match = r"weight \d+ \(layer \d, direction \d\) has shape"
    with pytest.raises(RuntimeError, match=match):
        run_ours("lstm", module, x, state, params)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_w_hh_of_another_width_than_hidden_size_is_named(cell):
    # Without a projection h has hidden_size features: a wider W_hh, consistent with every other
    # weight, would run on features no state holds.
    module = make_torch_module(cell, LSTM_CONFIGS["L1"] if cell == "lstm" else GRU_CONFIGS["L1"])
    x, _ = make_inputs(cell, module, torch.float64)
    params = list(module._flat_weights)
    params[1] = torch.cat([params[1], params[1][:, :1]], dim=1).detach()
    gates = params[1].shape[0]
    with pytest.raises(RuntimeError, match=rf"weight 1 \(layer 0, direction 0\) has shape \[{gates}, {HIDDEN + 1}\], "
                                           rf"expected \[{gates}, {HIDDEN}\]"):
        run_ours(cell, module, x, None, params)


def test_gru_refuses_a_fifth_weight_per_layer_which_only_the_lstm_takes_as_w_hr():
    module = make_torch_module("gru", GRU_CONFIGS["L1"])
    x, state = make_inputs("gru", module, torch.float64)
    params = [*module._flat_weights, torch.randn(HIDDEN, HIDDEN, dtype=torch.float64, device=KERNEL_DEVICE)]
    with pytest.raises(ValueError, match=r"GRU: expected the weights of 1 layer\(s\) x 1 direction\(s\) with biases, "
                                         r"got 5 tensors"):
        run_ours("gru", module, x, state, params)


def test_layer_off_the_kernel_path_says_where_it_runs():
    x = torch.randn(T, B, INPUT, device="meta")
    weights = [(torch.randn(3 * HIDDEN, INPUT, device="meta"), torch.randn(3 * HIDDEN, HIDDEN, device="meta"),
                None, None, None)]
    with pytest.raises(RuntimeError, match=r"runs the Triton kernels: CUDA tensors, or CPU tensors under "
                                           r"TRITON_INTERPRET=1; got x on meta"):
        functional.layer("GRU", x, torch.randn(1, B, HIDDEN, device="meta"), None, weights)


def state_like(params, *shape):
    """A random state of ``shape`` in the weights' dtype, on their device."""
    return torch.randn(*shape, dtype=params[0].dtype, device=params[0].device)


# name: (the arguments that differ from a good call's, given its weights; the error; its message)
BAD_ARGUMENTS = {
    "num_layers_zero": (lambda params: dict(num_layers=0), ValueError, r"num_layers must be a positive int, got 0"),
    "num_layers_float": (lambda params: dict(num_layers=1.0), ValueError,
                         r"num_layers must be a positive int, got 1.0"),
    "num_layers_bool": (lambda params: dict(num_layers=True), ValueError,
                        r"num_layers must be a positive int, got True"),
    "bidirectional_int": (lambda params: dict(bidirectional=1), TypeError, r"bidirectional must be a bool, got 1"),
    "dropout_negative": (lambda params: dict(dropout=-0.5, train=True), ValueError,
                         r"dropout must be a number in \[0, 1\], got -0.5"),
    "dropout_above_one": (lambda params: dict(dropout=1.5), ValueError,
                          r"dropout must be a number in \[0, 1\], got 1.5"),
    "dropout_str": (lambda params: dict(dropout="0.1", train=True), ValueError,
                    r"dropout must be a number in \[0, 1\], got '0.1'"),
    "weight_drop_none": (lambda params: dict(weight_drop=None, train=True), ValueError,
                         r"weight_drop must be a number in \[0, 1\), got None"),
    "param_none": (lambda params: dict(params=[None, *params[1:]]), TypeError,
                   r"params\[0\] must be a tensor, got NoneType"),
    "hx_none": (lambda params: dict(hx=(None, None)), TypeError,
                r"hx\[0\] must be a tensor, got NoneType"),
    # A state of the wrong size: h_0 is checked against (L * D, B, P), c_0 against (L * D, B, H).
    "h0_of_another_batch": (lambda params: dict(hx=(state_like(params, 1, B + 1, HIDDEN),
                                                    state_like(params, 1, B, HIDDEN))),
                            RuntimeError, r"Expected hidden size \(1, 4, 7\), got \[1, 5, 7\]"),
    "c0_of_another_size": (lambda params: dict(hx=(state_like(params, 1, B, HIDDEN),
                                                   state_like(params, 1, B, HIDDEN - 1))),
                           RuntimeError, r"Expected hidden size \(1, 4, 7\), got \[1, 4, 6\]"),
    "lengths_int": (lambda params: dict(lengths=3), ValueError, r"lengths must be a 1-D tensor of 4 entries, got shape \[\]"),
    "hidden_size_zero": (lambda params: dict(params=[params[0][:0], params[1][:0, :0], params[2][:0], params[3][:0]]),
                         RuntimeError, r"W_hh\) has shape \[0, 0\]: hidden_size must be positive"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_raise_and_say_what_is_wrong(name):
    """What nn.LSTM's constructor and operator refuse, ours refuses saying which argument and why
    (a zero num_layers divided by zero, a None weight had no ``.device``, a negative dropout was
    ignored)."""
    changes, error, match = BAD_ARGUMENTS[name]
    module = make_torch_module("lstm", LSTM_CONFIGS["L1"])
    x, _ = make_inputs("lstm", module, torch.float64)
    params = [weight.detach() for weight in module._flat_weights]
    with pytest.raises(error, match=match):
        functional.lstm(**(dict(input=x, hx=None, params=params) | changes(params)))


def test_empty_batch_takes_an_empty_list_of_lengths():
    # torch.as_tensor([]) is float, which lengths must not be.
    module = make_torch_module("lstm", LSTM_CONFIGS["L1"])
    params = [weight.detach() for weight in module._flat_weights]
    x = torch.randn(T, 0, INPUT, dtype=torch.float64, device=KERNEL_DEVICE)
    output, (h_n, c_n) = functional.lstm(x, None, params, lengths=[])
    assert output.shape == (T, 0, HIDDEN) and h_n.shape == c_n.shape == (1, 0, HIDDEN)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-direction", "bidirectional"])
def test_the_kernels_get_one_directions_w_hh_as_a_view_of_the_parameter(monkeypatch, bidirectional):
    # Stacking a single direction's weights would copy W_hh on every forward and backward.
    received = []

    def recording(op, w_hh_index):
        def call(*args):
            received.append(args[w_hh_index])
            return op(*args)
        return call

    monkeypatch.setattr(functional, "lstm_forward", recording(functional.lstm_forward, 1))
    monkeypatch.setattr(functional, "lstm_backward", recording(functional.lstm_backward, 2))
    module = make_torch_module("lstm", (1, bidirectional, False, True, 0))
    x = torch.randn(T, B, INPUT, dtype=torch.float64, device=KERNEL_DEVICE, requires_grad=True)
    output, _ = functional.lstm(x, None, list(module._flat_weights), bidirectional=bidirectional)
    output.sum().backward()
    assert len(received) == 2
    for w_hh in received:
        assert w_hh.shape == (2 if bidirectional else 1, 4 * HIDDEN, HIDDEN)
        assert (w_hh.data_ptr() == module.weight_hh_l0.data_ptr()) != bidirectional


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_call_that_nothing_differentiates_skips_the_autograd_function(monkeypatch, cell):
    """Such a call runs the layers without ``_FusedLayer``'s bookkeeping, to the same results;
    forward-mode AD, whose dual inputs require no grad, still meets the Function's refusal in
    ``layer`` rather than losing its tangents without a word (the functional API sends it to
    ``reference.layer``: test_modules)."""
    applied = []
    real_apply = functional._FusedLayer.apply
    monkeypatch.setattr(functional._FusedLayer, "apply", lambda *args: applied.append(True) or real_apply(*args))
    config = LSTM_CONFIGS["L2-bidirectional"] if cell == "lstm" else GRU_CONFIGS["L2-bidirectional"]
    module = make_torch_module(cell, config)
    x = torch.randn(T, B, INPUT, dtype=torch.float64, device=KERNEL_DEVICE)

    def run(input, weights):
        return getattr(functional, cell)(input, None, weights, num_layers=2, bidirectional=True)

    with torch.no_grad():
        skipped = run(x, list(module._flat_weights))
    assert not applied
    through = run(x, list(module._flat_weights))  # the weights require grad
    assert len(applied) == 2
    for value, expected in zip(torch.utils._pytree.tree_leaves(skipped), torch.utils._pytree.tree_leaves(through)):
        assert torch.equal(value, expected)
    # Layer 0's (W_ih, W_hh, b_ih, b_hh, W_hr) in each direction.
    weights = [tuple(None if name is None else getattr(module, f"{name}_l0{suffix}").detach()
                     for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", None))
               for suffix in ("", "_reverse")]
    h0 = torch.randn(2, B, HIDDEN, dtype=torch.float64, device=KERNEL_DEVICE)
    with pytest.raises(NotImplementedError, match="jvp"), torch.autograd.forward_ad.dual_level():
        functional.layer(cell.upper(), torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)), h0,
                         torch.randn_like(h0) if cell == "lstm" else None, weights)
