"""What the fused modules take beyond torch.nn: ``forward(..., reset=)`` and the constructor's
regularizers ``recurrent_dropout``, ``zoneout`` and ``weight_drop``.

- ``reset=`` against its definition: the float64 torch module run on each segment of each sequence
  separately, every segment from ``h_0`` (``c_0``), the reverse direction from each segment's end.
  Compared: output, final states and the gradients of the input, the initial states (which collect
  from every segment) and every parameter; with ``lengths=``, packed and unbatched input too.
- ``reset=`` validation: a wrong type, dtype, shape or device raises and says what is wrong.
- The regularizers: reproducible under ``torch.manual_seed``, different under another seed, exact
  no-ops in eval (zoneout: its expectation), checked constructor values, ``extra_repr``, state
  dicts that still load into torch.nn, and the training forward / backward against
  ``reference.layer`` in float64 given the very masks the module drew (recorded by wrapping
  ``functional.layer``).
"""

import copy
import inspect

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNELS_RUN, assert_close, random_lengths
from test_modules import (
    CELLS,
    FUSED,
    TORCH,
    draw,
    draw_inputs,
    hx_of,
    make_pair,
    run_module,
)
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import functional, native, reference
from fused_rnn.ops import launch

INPUT_SIZE, HIDDEN_SIZE = 5, 7
STEPS, BATCH = 5, 3

REGULARIZERS = ("recurrent_dropout", "zoneout", "weight_drop")


def state_names(cell):
    return ["h_0", "c_0"] if cell == "LSTM" else ["h_0"]


def hx_argument(cell, states):
    """``states`` (a list, or None) as a module's ``hx``: ``(h_0, c_0)`` for the LSTM, ``h_0`` otherwise."""
    if states is None:
        return None
    return tuple(states) if cell == "LSTM" else states[0]


def final_states(state):
    return list(state) if isinstance(state, tuple) else [state]


# ---------------------------------------------------------------------------------------------
# reset= equals running each segment on its own
# ---------------------------------------------------------------------------------------------


def draw_resets(steps, batch):
    """``(T, B)`` bool: about one step in three, and on row 0 a reset at t=0 (a no-op), one at
    t=2 and one at the last step (a segment of a single step)."""
    resets = torch.rand(steps, batch) < 0.35
    resets[0, 0] = resets[2, 0] = resets[-1, 0] = True
    return resets


def segments(resets, row, length):
    """``[(start, end)]``: the segments of ``row`` within its first ``length`` steps."""
    starts = [0] + [t for t in range(1, length) if resets[t, row]]
    return list(zip(starts, starts[1:] + [length]))


def segmented(module, x, states, resets, lengths=None):
    """What ``reset=`` must give: ``module`` (the torch oracle) run on every segment of every row
    on its own, each segment from the row's initial states (zeros when ``states`` is None).

    ``x (T, B, I)`` is time-major whatever ``module.batch_first``. Returns ``output (T, B, D*P)``
    (zeros past each row's length) and the final states ``[(L*D, B, .)]``: of each layer's forward
    direction from the row's last segment, of its reverse direction from the first one.
    """
    steps, batch = x.shape[:2]
    directions = 2 if module.bidirectional else 1
    rows, row_finals = [], []
    for row in range(batch):
        length = steps if lengths is None else int(lengths[row])
        row_states = None if states is None else [state[:, row:row + 1] for state in states]
        pieces, ends = [], []
        for start, end in segments(resets, row, length):
            piece = x[start:end, row:row + 1]
            output, state = module(piece.transpose(0, 1) if module.batch_first else piece,
                                   hx_argument(module.mode, row_states))
            pieces.append(output.transpose(0, 1) if module.batch_first else output)
            ends.append(final_states(state))
        output = torch.cat(pieces)
        rows.append(torch.cat([output, output.new_zeros(steps - length, *output.shape[1:])]))
        # State group g = layer * D + direction: forward ends in the last segment, reverse in the first.
        groups = ends[0][0].shape[0]
        row_finals.append([
            torch.stack([(ends[-1] if group % directions == 0 else ends[0])[k][group] for group in range(groups)])
            for k in range(len(ends[0]))
        ])
    output = torch.cat(rows, dim=1)
    return output, [torch.cat([finals[k] for finals in row_finals], dim=1) for k in range(len(row_finals[0]))]


def time_major(tensor, batch_first):
    return tensor.transpose(0, 1) if batch_first else tensor


def reset_forwards(resets, lengths=None, packed=False):
    """``(fused_forward, oracle_forward)`` for ``run_module``: the fused module with ``reset=``
    (in its layout), the oracle run segment by segment."""

    def fused_forward(module, inputs):
        reset = resets.t() if module.batch_first else resets
        hx = hx_of(inputs)
        if packed:
            sequence = pack_padded_sequence(inputs["input"], lengths, batch_first=module.batch_first,
                                            enforce_sorted=False)
            return module(sequence, hx, reset=reset.to(KERNEL_DEVICE))
        return module(inputs["input"], hx, lengths=None if lengths is None else lengths.to(KERNEL_DEVICE),
                      reset=reset.to(KERNEL_DEVICE))

    def oracle_forward(module, inputs):
        states = [inputs[name] for name in state_names(module.mode) if name in inputs] or None
        output, finals = segmented(module, time_major(inputs["input"], module.batch_first), states, resets, lengths)
        if packed:
            output = pack_padded_sequence(output, lengths, enforce_sorted=False)
        else:
            output = time_major(output, module.batch_first)
        return output, tuple(finals) if module.mode == "LSTM" else finals[0]

    return fused_forward, oracle_forward


def check_reset_against_segments(cell, options, dtype=torch.float64, hx=True, with_lengths=False, packed=False,
                                 resets=None):
    oracle, fused = make_pair(cell, dtype, **options)
    tensors = draw_inputs(oracle, dtype, steps=STEPS, hx=hx)
    resets = draw_resets(STEPS, BATCH) if resets is None else resets
    lengths = random_lengths(STEPS, BATCH).cpu() if with_lengths or packed else None
    fused_forward, oracle_forward = reset_forwards(resets, lengths, packed)
    expected = run_module(oracle, tensors, dtype, oracle_forward)
    actual = run_module(fused, tensors, dtype, fused_forward)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].dtype == dtype, f"{name}: dtype {actual[name].dtype}, expected {dtype}"
        assert_close(actual[name], value, dtype=dtype, name=name)
    return actual


RESET_OPTIONS = {
    "1layer": {},
    "bidirectional-batch_first-no_bias": dict(bidirectional=True, batch_first=True, bias=False),
    "2layers-bidirectional": dict(num_layers=2, bidirectional=True),
}
# (hx, lengths)
RESET_INPUTS = {"hx": (True, False), "no_hx-lengths": (False, True), "hx-lengths": (True, True)}


def reset_cases(*names):
    params = [pytest.param(cell, RESET_OPTIONS[name], id=f"{cell}-{name}") for cell in CELLS for name in names]
    params.append(pytest.param("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3),
                               id="LSTM-proj3-2layers-bidirectional"))
    return params


@pytest.mark.parametrize("hx, with_lengths", RESET_INPUTS.values(), ids=RESET_INPUTS.keys())
@pytest.mark.parametrize("cell, options", reset_cases(*RESET_OPTIONS))
def test_reset_matches_torch_run_segment_by_segment(cell, options, hx, with_lengths):
    check_reset_against_segments(cell, options, hx=hx, with_lengths=with_lengths)


@pytest.mark.parametrize("cell", CELLS)
def test_reset_on_plain_cpu_tensors_matches_segments(cell, monkeypatch):
    # Without the interpreter a plain CPU tensor runs reset= on the reference recurrence (PyTorch's
    # operator has none): its reverse direction must restart where the kernels' does.
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    if not native.handles(torch.zeros(1, device=KERNEL_DEVICE)):
        pytest.skip("the kernel device is not a plain CPU")
    check_reset_against_segments(cell, RESET_OPTIONS["2layers-bidirectional"], with_lengths=True)


@pytest.mark.parametrize("cell", CELLS)
def test_reset_in_float32_matches_float64_segments(cell):
    check_reset_against_segments(cell, RESET_OPTIONS["2layers-bidirectional"], torch.float32, with_lengths=True)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cell", CELLS)
def test_reset_with_packed_sequence_matches_segments(cell, batch_first):
    """The reset of a PackedSequence has its padded shape, in the caller's batch order."""
    check_reset_against_segments(cell, dict(bidirectional=True, batch_first=batch_first), packed=True)


@pytest.mark.parametrize("pattern", ["none", "every_step", "first_step_only"])
@pytest.mark.parametrize("cell", CELLS)
def test_reset_patterns_match_segments(cell, pattern):
    """No reset (the plain module), a reset at every step (each step from h_0), resets at t=0 (no-ops)."""
    resets = torch.zeros(STEPS, BATCH, dtype=torch.bool)
    if pattern == "every_step":
        resets[:] = True
    elif pattern == "first_step_only":
        resets[0] = True
    check_reset_against_segments(cell, dict(bidirectional=True), resets=resets)


@pytest.mark.parametrize("cell", CELLS)
def test_all_false_reset_equals_no_reset(cell):
    _, fused = make_pair(cell, bidirectional=True)
    tensors = draw_inputs(fused, torch.float64, steps=STEPS)
    no_reset = torch.zeros(STEPS, BATCH, dtype=torch.bool, device=KERNEL_DEVICE)
    plain = run_module(fused, tensors, torch.float64)
    with_reset = run_module(fused, tensors, torch.float64,
                            lambda module, inputs: module(inputs["input"], hx_of(inputs), reset=no_reset))
    for name, value in plain.items():
        assert_close(with_reset[name], value, name=name)


@pytest.mark.parametrize("hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cell", CELLS)
def test_reset_of_unbatched_input_is_1d_over_time(cell, batch_first, hx):
    oracle, fused = make_pair(cell, bidirectional=True, batch_first=batch_first)
    tensors = draw_inputs(oracle, torch.float64, steps=STEPS, hx=hx, unbatched=True)
    resets = draw_resets(STEPS, 1)

    def fused_forward(module, inputs):
        return module(inputs["input"], hx_of(inputs), reset=resets[:, 0].to(KERNEL_DEVICE))

    def oracle_forward(module, inputs):
        states = [inputs[name].unsqueeze(1) for name in state_names(cell) if name in inputs] or None
        output, finals = segmented(module, inputs["input"].unsqueeze(1), states, resets)
        finals = [state.squeeze(1) for state in finals]
        return output.squeeze(1), tuple(finals) if cell == "LSTM" else finals[0]

    expected = run_module(oracle, tensors, torch.float64, oracle_forward)
    actual = run_module(fused, tensors, torch.float64, fused_forward)
    for name, value in expected.items():
        assert_close(actual[name], value, name=name)


def test_reset_gradient_of_h0_collects_from_every_segment():
    """A reset at every step of an RNN: ``grad h_0`` is the sum over steps of each step's own
    ``grad h_{t-1}``, which only the collecting backward gets right."""
    oracle, fused = make_pair("RNN_TANH")
    tensors = draw_inputs(oracle, torch.float64, steps=STEPS)
    resets = torch.ones(STEPS, BATCH, dtype=torch.bool)
    fused_forward, _ = reset_forwards(resets)
    actual = run_module(fused, tensors, torch.float64, fused_forward)
    # Every step from h_0: h_t = tanh(x_t W_ih^T + b + h_0 W_hh^T) for all t at once.
    x, h0 = tensors["input"].requires_grad_(), tensors["h_0"].requires_grad_()
    params = dict(oracle.named_parameters())
    output = torch.tanh(x @ params["weight_ih_l0"].t() + params["bias_ih_l0"] + params["bias_hh_l0"]
                        + h0 @ params["weight_hh_l0"].t())
    generator = torch.Generator().manual_seed(1)  # run_module's upstream gradients
    upstream = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in (output.shape, h0.shape)]
    (grad_h0,) = torch.autograd.grad([output, output[-1:]], [h0], upstream)
    assert_close(actual["output"], output, name="output")
    assert_close(actual["grad h_0"], grad_h0, name="grad h_0")


# ---------------------------------------------------------------------------------------------
# reset= validation
# ---------------------------------------------------------------------------------------------


def reset_error_cases():
    steps, batch = 4, 2
    good = torch.zeros(steps, batch, dtype=torch.bool)
    cases = {
        "list": (dict(), lambda: good.tolist(), TypeError, r"reset must be a bool tensor, got list"),
        "int64": (dict(), lambda: good.long(), ValueError, r"reset must be a bool tensor, got torch.int64"),
        "float": (dict(), lambda: good.float(), ValueError, r"reset must be a bool tensor, got torch.float32"),
        "batch_time_for_time_major": (dict(), lambda: good.t(), ValueError,
                                      r"reset must have the input's batch and time dims \(T, B\) = \[4, 2\], "
                                      r"got \[2, 4\]"),
        "time_batch_for_batch_first": (dict(batch_first=True), lambda: good, ValueError,
                                       r"\(B, T\) with batch_first = \[2, 4\], got \[4, 2\]"),
        "1d_for_batched": (dict(), lambda: good[:, 0], ValueError, r"got \[4\]"),
        "3d": (dict(), lambda: good[:, :, None], ValueError, r"got \[4, 2, 1\]"),
        "too_few_steps": (dict(), lambda: good[:3], ValueError, r"= \[4, 2\], got \[3, 2\]"),
        "meta_device": (dict(), lambda: good.to("meta"), RuntimeError,
                        r"Input and reset tensors are not at the same device"),
    }
    return [pytest.param(cell, *case, id=f"{cell}-{name}") for name, case in cases.items() for cell in CELLS]


@pytest.mark.parametrize("cell, options, make_reset, error, match", reset_error_cases())
def test_bad_reset_raises_and_module_keeps_working(cell, options, make_reset, error, match):
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE, **options)
    x = torch.randn(2, 4, INPUT_SIZE) if fused.batch_first else torch.randn(4, 2, INPUT_SIZE)
    x = x.to(KERNEL_DEVICE)
    before = fused(x)
    with pytest.raises(error, match=match):
        fused(x, reset=make_reset())
    after = fused(x)
    for got, want in zip([after[0], *final_states(after[1])], [before[0], *final_states(before[1])], strict=True):
        assert torch.equal(got, want), "the module's output changed after a refused call"


@pytest.mark.parametrize("cell", CELLS)
def test_bad_reset_of_unbatched_and_packed_input_raises(cell):
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE)
    x = torch.randn(4, INPUT_SIZE, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"reset must have shape \(4,\) for unbatched input of 4 steps, got \[4, 1\]"):
        fused(x, reset=torch.zeros(4, 1, dtype=torch.bool, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match=r"reset must be a bool tensor, got torch.uint8"):
        fused(x, reset=torch.zeros(4, dtype=torch.uint8, device=KERNEL_DEVICE))
    sequence = pack_padded_sequence(torch.randn(4, 2, INPUT_SIZE, device=KERNEL_DEVICE), [4, 2])
    with pytest.raises(ValueError, match=r"= \[4, 2\], got \[2, 4\]"):
        fused(sequence, reset=torch.zeros(2, 4, dtype=torch.bool, device=KERNEL_DEVICE))


@pytest.mark.parametrize("run", [functional.lstm, functional.gru, functional.rnn], ids=["lstm", "gru", "rnn"])
def test_functional_reset_is_validated(run):
    module = {functional.lstm: fused_rnn.LSTM, functional.gru: fused_rnn.GRU, functional.rnn: fused_rnn.RNN}[run]
    params = list(module(INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE)._flat_weights)
    x = torch.randn(4, 2, INPUT_SIZE, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"\(B, T\) with batch_first = \[2, 4\], got \[4, 2\]"):
        run(x.transpose(0, 1), None, params, batch_first=True,
            reset=torch.zeros(4, 2, dtype=torch.bool, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match=r"reset must be a bool tensor, got torch.int32"):
        run(x, None, params, reset=torch.zeros(4, 2, dtype=torch.int32, device=KERNEL_DEVICE))


# ---------------------------------------------------------------------------------------------
# Regularizers: seeds, eval mode, constructor, state dicts
# ---------------------------------------------------------------------------------------------

REGULARIZER_SETTINGS = {
    "recurrent_dropout": dict(recurrent_dropout=0.5),
    "zoneout": dict(zoneout=0.4),
    "weight_drop": dict(weight_drop=0.5),
}


def regularized_pair(cell, regularizers, dtype=torch.float64, **options):
    """``(oracle, plain, fused)``: the float64 torch module, a fused module without regularizers,
    and one with ``regularizers``, all with the same weights."""
    oracle, plain = make_pair(cell, dtype, **options)
    options = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options, **regularizers}
    fused = FUSED[cell](device=KERNEL_DEVICE, dtype=dtype, **options)
    fused.load_state_dict(plain.state_dict())
    return oracle, plain, fused


def seeded_run(module, tensors, seed, forward=None):
    torch.manual_seed(seed)
    return run_module(module, tensors, next(module.parameters()).dtype,
                      forward or (lambda module, inputs: module(inputs["input"], hx_of(inputs))))


def regularizer_cases():
    return [pytest.param(cell, settings, id=f"{cell}-{name}")
            for name, settings in REGULARIZER_SETTINGS.items() for cell in CELLS]


@pytest.mark.parametrize("cell, regularizers", regularizer_cases())
def test_regularized_training_is_reproducible_under_seed_and_differs_between_seeds(cell, regularizers):
    _, _, fused = regularized_pair(cell, regularizers, torch.float32, bidirectional=True)
    tensors = draw_inputs(fused, torch.float32)
    fused.train()
    first, again = seeded_run(fused, tensors, 1), seeded_run(fused, tensors, 1)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name} differs between two runs under the same seed"
    x = tensors["input"].to(KERNEL_DEVICE, torch.float32)
    with torch.no_grad():
        torch.manual_seed(2)
        other = fused(x, hx_of({name: t.to(x) for name, t in tensors.items()}))[0]
        evaluated = fused.eval()(x, hx_of({name: t.to(x) for name, t in tensors.items()}))[0]
    assert not torch.equal(first["output"], other), "the output is the same under another seed"
    assert not torch.allclose(first["output"], evaluated), f"{regularizers} changed nothing in training"


@pytest.mark.parametrize("regularizers", [dict(recurrent_dropout=0.5), dict(weight_drop=0.5),
                                          dict(recurrent_dropout=0.3, weight_drop=0.6)],
                         ids=["recurrent_dropout", "weight_drop", "both"])
@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_dropout_and_weight_drop_are_exact_no_ops_in_eval(cell, regularizers):
    _, plain, fused = regularized_pair(cell, regularizers, torch.float32, bidirectional=True)
    tensors = draw_inputs(fused, torch.float32)
    plain.eval(), fused.eval()
    expected, actual = seeded_run(plain, tensors, 1), seeded_run(fused, tensors, 2)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), f"{name}: eval mode is not bitwise the plain module"


@pytest.mark.parametrize("cell", CELLS)
def test_regularizers_do_nothing_in_eval_on_the_functional_api(cell):
    run = {"LSTM": functional.lstm, "GRU": functional.gru}.get(cell, functional.rnn)
    extra = dict(nonlinearity=cell.removeprefix("RNN_").lower()) if cell.startswith("RNN_") else {}
    _, fused = make_pair(cell, num_layers=2)
    x = draw(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64).to(KERNEL_DEVICE)
    params = list(fused._flat_weights)
    expected = run(x, None, params, num_layers=2, **extra)
    torch.manual_seed(3)
    actual = run(x, None, params, num_layers=2, train=False, recurrent_dropout=0.5, weight_drop=0.5, **extra)
    assert torch.equal(actual[0], expected[0])


def test_regularizer_settings_show_in_repr_and_survive_copies():
    fused = fused_rnn.LSTM(5, 7, num_layers=2, recurrent_dropout=0.25, zoneout=0.1, weight_drop=0.5)
    assert repr(fused) == "LSTM(5, 7, num_layers=2, recurrent_dropout=0.25, zoneout=0.1, weight_drop=0.5)"
    assert repr(fused_rnn.GRU(5, 7, zoneout=0.1)) == "GRU(5, 7, zoneout=0.1)"
    assert repr(fused_rnn.RNN(5, 7, nonlinearity="relu", weight_drop=0.2)) == "RNN(5, 7, weight_drop=0.2)"
    for twin in (copy.deepcopy(fused), fused_rnn.LSTM(5, 7, num_layers=2, recurrent_dropout=0.25, zoneout=0.1,
                                                    weight_drop=0.5)):
        assert (twin.recurrent_dropout, twin.zoneout, twin.weight_drop) == (0.25, 0.1, 0.5)


BAD_PROBABILITIES = [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None]


@pytest.mark.parametrize("value", BAD_PROBABILITIES, ids=repr)
@pytest.mark.parametrize("name", REGULARIZERS)
@pytest.mark.parametrize("cell", CELLS)
def test_bad_regularizer_values_raise(cell, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\), got "):
        FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, **{name: value})


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", REGULARIZERS)
def test_bad_regularizer_values_raise_on_the_functional_api(name, train):
    params = list(fused_rnn.GRU(INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE)._flat_weights)
    x = torch.randn(4, 2, INPUT_SIZE, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\), got 1.0"):
        functional.gru(x, None, params, train=train, **{name: 1.0})


@pytest.mark.parametrize("cell", CELLS)
def test_regularized_state_dict_is_torch_state_dict(cell):
    regularizers = dict(recurrent_dropout=0.2, zoneout=0.3, weight_drop=0.4)
    options = dict(num_layers=2, bidirectional=True, **(dict(proj_size=3) if cell == "LSTM" else {}))
    oracle, _, fused = regularized_pair(cell, regularizers, **options)
    assert list(fused.state_dict()) == list(oracle.state_dict())
    target = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **options)
    target.load_state_dict(fused.state_dict())
    for name, value in fused.state_dict().items():
        assert torch.equal(target.state_dict()[name], value.cpu()), name
    # The regularizers are settings, not state: nothing of them in the state dict.
    assert not any(name in key for key in fused.state_dict() for name in REGULARIZERS)


# ---------------------------------------------------------------------------------------------
# Regularizers against reference.layer, with the masks the module drew
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_layers(monkeypatch):
    """The arguments (by name) of every ``functional.layer`` call, which still runs."""
    calls = []
    real = functional.layer
    signature = inspect.signature(real)

    def recording(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        calls.append(dict(arguments.arguments))
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "layer", recording)
    return calls


def direction_weights(module, layer, direction):
    """``(W_ih, W_hh, b_ih, b_hh, W_hr)`` of one layer and direction, None where absent."""
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return tuple(getattr(module, name + suffix, None)
                 for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))


def reference_forward(module, x, states, lengths=None, resets=None, masks=None, w_hh_scales=None, zoneout_p=0.0):
    """``module``'s forward in plain PyTorch: ``reference.layer`` layer after layer (no dropout
    between layers) over time-major ``x``, from ``states`` (zeros when None).

    ``masks[layer]`` holds that layer's ``h_masks``, ``zoneout_h``, ``zoneout_c``;
    ``w_hh_scales[layer][direction]`` multiplies ``W_hh`` (weight drop's mask over ``1 - p``).
    Returns ``output (T, B, D*P)`` (zeros past each length) and the final states ``[(L*D, B, .)]``.
    """
    directions = 2 if module.bidirectional else 1
    groups, batch = module.num_layers * directions, x.shape[1]
    if states is None:
        features = [module.proj_size or module.hidden_size, module.hidden_size][:2 if module.mode == "LSTM" else 1]
        states = [x.new_zeros(groups, batch, size) for size in features]
    finals = [[] for _ in states]
    for index in range(module.num_layers):
        weights = []
        for direction in range(directions):
            w_ih, w_hh, b_ih, b_hh, w_hr = direction_weights(module, index, direction)
            if w_hh_scales is not None:
                w_hh = w_hh * w_hh_scales[index][direction]
            weights.append((w_ih, w_hh, b_ih, b_hh, w_hr))
        group = slice(index * directions, (index + 1) * directions)
        layer_masks = masks[index] if masks is not None else {}
        x, h_n, c_n = reference.layer(module.mode, x, states[0][group], states[1][group] if len(states) > 1 else None,
                                      weights, lengths, resets, zoneout_p=zoneout_p, **layer_masks)
        finals[0].append(h_n)
        if c_n is not None:
            finals[1].append(c_n)
    if lengths is not None:
        valid = torch.arange(x.shape[0], device=x.device)[:, None] < lengths[None, :].to(x.device)
        x = torch.where(valid[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, [torch.cat(collected) for collected in finals]


def check_drawn_masks(fused, calls, batch, steps):
    """The masks of each layer's call have the documented shape and values; returns
    ``(masks, w_hh_scales)`` for ``reference_forward``."""
    directions = 2 if fused.bidirectional else 1
    features = fused.proj_size or fused.hidden_size
    assert len(calls) == fused.num_layers, f"{len(calls)} functional.layer calls for {fused.num_layers} layers"
    masks, scales = [], []
    for index, call in enumerate(calls):
        h_masks, zoneout_h, zoneout_c = call["h_masks"], call["zoneout_h"], call["zoneout_c"]
        if fused.recurrent_dropout:
            # One mask per sequence, direction and unit, the same at every step: (B, D, P).
            assert h_masks.shape == (batch, directions, features)
            kept = 1 / (1 - fused.recurrent_dropout)
            assert ((h_masks == 0) | ((h_masks - kept).abs() < 1e-6)).all(), "h_masks are not 0 or 1 / (1 - p)"
        else:
            assert h_masks is None
        if fused.zoneout:
            assert zoneout_h.dtype == torch.bool and zoneout_h.shape == (steps, batch, directions, features)
            assert not all(torch.equal(zoneout_h[0], step) for step in zoneout_h), "zoneout drew one mask for all steps"
            if fused.mode == "LSTM":
                assert zoneout_c.dtype == torch.bool
                assert zoneout_c.shape == (steps, batch, directions, fused.hidden_size)
            else:
                assert zoneout_c is None
            assert call["zoneout_p"] == fused.zoneout
        else:
            assert zoneout_h is None and zoneout_c is None
        masks.append(dict(h_masks=h_masks, zoneout_h=zoneout_h, zoneout_c=zoneout_c))
        layer_scales = []
        for direction, weights in enumerate(call["weights"]):
            w_hh = direction_weights(fused, index, direction)[1]
            if fused.weight_drop:
                # DropConnect: each entry of W_hh dropped, or kept and scaled by 1 / (1 - p).
                scale = torch.where(weights[1] == 0, 0.0, 1 / (1 - fused.weight_drop)).detach()
                assert_close(weights[1], w_hh * scale, name=f"dropped W_hh of layer {index}, direction {direction}")
                assert 0 < (scale == 0).sum() < scale.numel(), "weight_drop dropped none or all of W_hh"
                layer_scales.append(scale)
            else:
                assert weights[1] is w_hh, "W_hh reached the layer changed though weight_drop is 0"
                layer_scales.append(1.0)
        scales.append(layer_scales)
    if fused.recurrent_dropout and len(calls) > 1:
        assert not torch.equal(calls[0]["h_masks"], calls[1]["h_masks"]), "two layers share one recurrent mask"
    return masks, scales


ALL_REGULARIZERS = dict(recurrent_dropout=0.5, zoneout=0.4, weight_drop=0.5)
MASK_CASES = {
    **{name: (settings, dict(bidirectional=True), False) for name, settings in REGULARIZER_SETTINGS.items()},
    "all-2layers-bidirectional": (ALL_REGULARIZERS, dict(num_layers=2, bidirectional=True), False),
    "all-2layers-batch_first-reset-lengths": (ALL_REGULARIZERS, dict(num_layers=2, batch_first=True), True),
}


def mask_cases():
    params = [pytest.param(cell, *case, id=f"{cell}-{name}") for name, case in MASK_CASES.items() for cell in CELLS]
    params.append(pytest.param("LSTM", ALL_REGULARIZERS, dict(num_layers=2, bidirectional=True, proj_size=3), True,
                               id="LSTM-all-proj3-2layers-bidirectional-reset-lengths"))
    return params


def as_float64(value, device):
    """``value`` (a tensor, or lists / dicts of them) on ``device``, floating-point tensors in float64."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float64 if value.is_floating_point() else value.dtype)
    if isinstance(value, list):
        return [as_float64(item, device) for item in value]
    if isinstance(value, dict):
        return {name: as_float64(item, device) for name, item in value.items()}
    return value


def run_against_reference(fused, tensors, dtype, with_options, recorded_layers, training):
    """Run ``fused`` (in training or eval; with ``reset=`` and ``lengths=`` when ``with_options``)
    and ``reference_forward`` with the masks it drew; compare output, states and every gradient."""
    resets = draw_resets(STEPS, BATCH) if with_options else None
    lengths = random_lengths(STEPS, BATCH).cpu() if with_options else None
    fused.train(training)

    def fused_forward(module, inputs):
        if resets is None:
            return module(inputs["input"], hx_of(inputs))
        reset = resets.t() if module.batch_first else resets
        return module(inputs["input"], hx_of(inputs), lengths=lengths.to(KERNEL_DEVICE), reset=reset.to(KERNEL_DEVICE))

    actual = seeded_run(fused, tensors, 7, fused_forward)
    calls = list(recorded_layers)
    if not training:
        masks, scales = None, None
        for call in calls:
            assert call["h_masks"] is None and call["zoneout_h"] is None and call["zoneout_c"] is None
            assert call["zoneout_p"] == fused.zoneout
    else:
        masks, scales = check_drawn_masks(fused, calls, BATCH, STEPS)
    oracle = copy.deepcopy(fused).double()

    def oracle_forward(module, inputs):
        x = time_major(inputs["input"], module.batch_first)
        states = [inputs[name] for name in state_names(module.mode) if name in inputs] or None
        output, finals = reference_forward(
            module, x, states, as_float64(lengths, x.device), as_float64(resets, x.device),
            as_float64(masks, x.device), as_float64(scales, x.device), zoneout_p=fused.zoneout)
        return time_major(output, module.batch_first), tuple(finals) if module.mode == "LSTM" else finals[0]

    expected = run_module(oracle, tensors, dtype, oracle_forward)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert_close(actual[name], value, dtype=dtype, name=name)
    return actual


needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the masks are recorded at functional.layer, the kernels")


@needs_kernels
@pytest.mark.parametrize("cell, regularizers, options, with_options", mask_cases())
def test_regularized_training_matches_reference_with_the_drawn_masks(cell, regularizers, options, with_options,
                                                                    recorded_layers):
    _, _, fused = regularized_pair(cell, regularizers, **options)
    tensors = draw_inputs(fused, torch.float64, steps=STEPS)
    run_against_reference(fused, tensors, torch.float64, with_options, recorded_layers, training=True)


@needs_kernels
@pytest.mark.parametrize("cell", CELLS)
def test_regularized_training_in_float32_matches_float64_reference_with_the_drawn_masks(cell, recorded_layers):
    _, _, fused = regularized_pair(cell, ALL_REGULARIZERS, torch.float32, num_layers=2, bidirectional=True)
    tensors = draw_inputs(fused, torch.float32, steps=STEPS)
    run_against_reference(fused, tensors, torch.float32, True, recorded_layers, training=True)


@needs_kernels
@pytest.mark.parametrize("options, with_options", [
    pytest.param(dict(), False, id="1layer"),
    pytest.param(dict(num_layers=2, bidirectional=True, dropout=0.5), True,
                 id="2layers-bidirectional-dropout-reset-lengths"),
])
@pytest.mark.parametrize("cell", CELLS)
def test_zoneout_in_eval_matches_reference_with_its_expectation(cell, options, with_options, recorded_layers):
    """In eval mode zoneout mixes ``p * previous + (1 - p) * new``; the other regularizers and
    the dropout between layers are off."""
    _, plain, fused = regularized_pair(cell, ALL_REGULARIZERS, **options)
    tensors = draw_inputs(fused, torch.float64, steps=STEPS)
    actual = run_against_reference(fused, tensors, torch.float64, with_options, recorded_layers, training=False)
    if not with_options:
        inputs = {name: tensor.to(KERNEL_DEVICE) for name, tensor in tensors.items()}
        with torch.no_grad():
            plain_output = plain.eval()(inputs["input"], hx_of(inputs))[0]
        assert not torch.allclose(actual["output"], plain_output), "zoneout did nothing in eval"


@needs_kernels
@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_draws_a_fresh_mask_per_call_and_masks_at_their_rates(cell, recorded_layers):
    regularizers = dict(recurrent_dropout=0.25, zoneout=0.4, weight_drop=0.5)
    batch, steps, hidden = 64, 4, 16
    fused = FUSED[cell](INPUT_SIZE, hidden, bidirectional=True, device=KERNEL_DEVICE, **regularizers).train()
    x = torch.randn(steps, batch, INPUT_SIZE, device=KERNEL_DEVICE)
    with torch.no_grad():
        fused(x), fused(x)
    first, second = recorded_layers
    for direction in range(2):
        assert not torch.equal(first["weights"][direction][1] == 0, second["weights"][direction][1] == 0), (
            "two calls dropped the same entries of W_hh")
    # Rates within 6 standard deviations of p (the masks hold thousands of draws).
    w_hh_dropped = torch.stack([weights[1] == 0 for weights in first["weights"]]).double()
    for name, mask, rate in (("weight_drop", w_hh_dropped, 0.5),
                             ("recurrent_dropout", (first["h_masks"] == 0).double(), 0.25),
                             ("zoneout", first["zoneout_h"].double(), 0.4)):
        tolerance = 6 * (rate * (1 - rate) / mask.numel()) ** 0.5
        assert abs(mask.mean().item() - rate) < tolerance, f"{name}: rate {mask.mean().item():.3f}, expected {rate}"
