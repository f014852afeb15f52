"""Bad input: what ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` reject, the fused modules reject with the same
exception type and a message that says what is wrong, and a module that refused an input keeps working.

Each case runs the bad call on the torch module first, to check that torch raises the type the
table expects (the table is PyTorch's behaviour, not ours), then on the fused module with
``pytest.raises(type, match=<our message>)``, then calls the fused module on good input again.
"""

import pytest
import torch
from helpers import KERNEL_DEVICE
from test_modules import CELLS, FUSED, TORCH
from torch.nn.utils.rnn import pack_padded_sequence

SINGLE_STATE_CELLS = [cell for cell in CELLS if cell != "LSTM"]
RNN_CELLS = ["RNN_TANH", "RNN_RELU"]

INPUT_SIZE, HIDDEN_SIZE, STEPS, BATCH = 5, 7, 4, 2


def rand(*shape, dtype=torch.float32, device=KERNEL_DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def good_input():
    return rand(STEPS, BATCH, INPUT_SIZE)


def states(module, *shape, dtype=torch.float32, device=KERNEL_DEVICE):
    """An ``hx`` of state shape ``shape`` for ``module``: ``(h_0, c_0)`` for LSTM, ``h_0`` otherwise."""
    if module.mode == "LSTM":
        return rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    return rand(*shape, dtype=dtype, device=device)


def packed(*shape, enforce_sorted=True):
    """A PackedSequence of random (T, B, F) data whose sequences have lengths T, 2."""
    return pack_padded_sequence(rand(*shape), [shape[0], 2], enforce_sorted=enforce_sorted)


def make_pair(cell):
    torch_module = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE)
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, device=KERNEL_DEVICE)
    fused.load_state_dict(torch_module.state_dict())
    return torch_module, fused


def case(call, error, match, name, cells=CELLS):
    return [pytest.param(cell, call, error, match, id=f"{cell}-{name}") for cell in cells]


BOTH_DEVICES = rf"{torch.device(KERNEL_DEVICE).type}.*meta|meta.*{torch.device(KERNEL_DEVICE).type}"

# Rejected by nn.LSTM / nn.GRU / nn.RNN with ``error``; ``match`` is a meaningful part of our message.
REJECTED_BY_TORCH = [
    *case(lambda m: m(rand(STEPS, BATCH, 4)), RuntimeError,
          r"input.size\(-1\) must be equal to input_size. Expected 5, got 4", "wrong_input_features"),
    *case(lambda m: m(rand(INPUT_SIZE)), ValueError, r"Expected input to be 2D or 3D, got 1D", "input_1d"),
    *case(lambda m: m(rand(STEPS, BATCH, INPUT_SIZE, 1)), ValueError,
          r"Expected input to be 2D or 3D, got 4D", "input_4d"),
    *case(lambda m: m(rand(0, BATCH, INPUT_SIZE)), RuntimeError,
          r"sequence length to be larger than 0", "empty_sequence"),
    *case(lambda m: m(rand(0, INPUT_SIZE)), RuntimeError,
          r"sequence length to be larger than 0", "empty_sequence_unbatched"),
    *case(lambda m: m(torch.randint(0, 3, (STEPS, BATCH, INPUT_SIZE), device=KERNEL_DEVICE)), ValueError,
          r"input dtype \(torch.int64\) does not match weight dtype \(torch.float32\)", "integer_input"),
    *case(lambda m: m(rand(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)), ValueError,
          r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)", "float64_input"),
    *case(lambda m: m(good_input(), states(m, 2, BATCH, HIDDEN_SIZE)), RuntimeError,
          r"Expected hidden(\[0\])? size \(1, 2, 7\), got \[2, 2, 7\]", "hx_wrong_num_layers"),
    *case(lambda m: m(good_input(), states(m, 1, 3, HIDDEN_SIZE)), RuntimeError,
          r"Expected hidden(\[0\])? size \(1, 2, 7\), got \[1, 3, 7\]", "hx_batch_mismatch"),
    *case(lambda m: m(good_input(), states(m, 1, BATCH, 6)), RuntimeError,
          r"Expected hidden(\[0\])? size \(1, 2, 7\), got \[1, 2, 6\]", "hx_wrong_features"),
    *case(lambda m: m(good_input(), (rand(1, BATCH, HIDDEN_SIZE), rand(1, BATCH, 6))), RuntimeError,
          r"Expected hidden\[1\] size \(1, 2, 7\), got \[1, 2, 6\]", "cx_wrong_features", cells=["LSTM"]),
    *case(lambda m: m(rand(STEPS, INPUT_SIZE), states(m, 1, 1, HIDDEN_SIZE)), RuntimeError,
          r"For unbatched 2-D input, hx (and cx )?should also be 2-D", "hx_3d_with_unbatched_input"),
    *case(lambda m: m(good_input(), states(m, 1, HIDDEN_SIZE)), RuntimeError,
          r"For batched 3-D input, hx (and cx )?should also be 3-D", "hx_2d_with_batched_input"),
    # torch's messages here are "get_mkldnn_dtype: unsupported data type" or "mat1 and mat2 must
    # have the same dtype": ours must name the two dtypes.
    *case(lambda m: m(good_input(), states(m, 1, BATCH, HIDDEN_SIZE, dtype=torch.float64)), RuntimeError,
          r"\(torch.float64\) does not match input dtype \(torch.float32\)", "hx_float64_input_float32"),
    *case(lambda m: m(good_input(), (rand(1, BATCH, HIDDEN_SIZE), rand(1, BATCH, HIDDEN_SIZE, dtype=torch.float64))),
          RuntimeError, r"\(torch.float64\) does not match input dtype \(torch.float32\)",
          "cx_float64_input_float32", cells=["LSTM"]),
    *case(lambda m: m(packed(STEPS, BATCH, INPUT_SIZE), states(m, 1, 3, HIDDEN_SIZE)), RuntimeError,
          r"Expected hidden(\[0\])? size \(1, 2, 7\), got \[1, 3, 7\]", "packed_hx_batch_mismatch"),
    *case(lambda m: m(packed(STEPS, BATCH, INPUT_SIZE), states(m, 1, BATCH, HIDDEN_SIZE, dtype=torch.float64)),
          RuntimeError, r"\(torch.float64\) does not match input dtype \(torch.float32\)", "packed_hx_float64"),
    # A PackedSequence without hx: torch.nn's check of its data still comes first (not the weights' shapes').
    *case(lambda m: m(packed(STEPS, BATCH, 4)), RuntimeError,
          r"input.size\(-1\) must be equal to input_size. Expected 5, got 4", "packed_wrong_input_features"),
]

# Rejected by us; torch has no ``lengths`` or does not reliably raise the same there.
REJECTED_BY_US = [
    # A wrong kind of hx: torch fails by accident (IndexError from hx[1], AttributeError from
    # tuple.dim()), or with several layers not at all; we raise a TypeError that says so.
    *case(lambda m: m(good_input(), rand(1, BATCH, HIDDEN_SIZE)), TypeError,
          r"hx must be a tuple \(h_0, c_0\), got Tensor", "hx_not_a_tuple", cells=["LSTM"]),
    *case(lambda m: m(good_input(), (rand(1, BATCH, HIDDEN_SIZE),)), TypeError,
          r"hx must be a tuple \(h_0, c_0\), got a tuple of 1", "hx_tuple_of_one", cells=["LSTM"]),
    *case(lambda m: m(good_input(), (rand(1, BATCH, HIDDEN_SIZE), None)), TypeError,
          r"^LSTM: hx\[1\] must be a tensor, got NoneType", "cx_none", cells=["LSTM"]),
    *case(lambda m: m(good_input(), (rand(1, BATCH, HIDDEN_SIZE),)), TypeError,
          r"hx must be a tensor h_0, got tuple", "hx_given_as_tuple", cells=SINGLE_STATE_CELLS),
    # torch fails on list.dim() (AttributeError); ours names the class, as torch.nn's messages do.
    *case(lambda m: m([good_input()]), TypeError,
          r"^(LSTM|GRU|RNN): input must be a Tensor or PackedSequence, got list", "input_a_list"),
    # torch permutes an unsorted PackedSequence's hx with index_select and ignores the extra row.
    *case(lambda m: m(packed(STEPS, BATCH, INPUT_SIZE, enforce_sorted=False), states(m, 1, 3, HIDDEN_SIZE)),
          RuntimeError, r"Expected hidden(\[0\])? size \(1, 2, 7\), got \[1, 3, 7\]",
          "packed_unsorted_hx_batch_mismatch"),
    *case(lambda m: m(good_input(), states(m, 1, BATCH, HIDDEN_SIZE, device="meta")), RuntimeError,
          BOTH_DEVICES, "hx_on_another_device"),
    *case(lambda m: m(rand(STEPS, BATCH, INPUT_SIZE, device="meta")), RuntimeError,
          BOTH_DEVICES, "input_on_another_device"),
    *case(lambda m: m(good_input(), lengths=torch.tensor([STEPS])), ValueError,
          r"lengths must be a 1-D tensor of 2 entries, got shape \[1\]", "lengths_wrong_size"),
    *case(lambda m: m(good_input(), lengths=torch.tensor([[STEPS, STEPS]])), ValueError,
          r"lengths must be a 1-D tensor of 2 entries, got shape \[1, 2\]", "lengths_2d"),
    *case(lambda m: m(good_input(), lengths=torch.tensor([STEPS, 0])), ValueError,
          r"lengths must lie in \[1, 4\].*from 0 to 4", "lengths_zero"),
    *case(lambda m: m(good_input(), lengths=torch.tensor([STEPS + 1, 2])), ValueError,
          r"lengths must lie in \[1, 4\].*from 2 to 5", "lengths_past_sequence_end"),
    *case(lambda m: m(good_input(), lengths=torch.tensor([4.0, 2.0])), ValueError,
          r"lengths must be an integer tensor, got torch.float32", "lengths_float"),
    # bool is no integer here, though it converts to one: True would read as a length of 1.
    *case(lambda m: m(good_input(), lengths=torch.tensor([True, True])), ValueError,
          r"lengths must be an integer tensor, got torch.bool", "lengths_bool"),
    *case(lambda m: m(packed(STEPS, BATCH, INPUT_SIZE), lengths=torch.tensor([STEPS, 2])), ValueError,
          r"lengths cannot be given with a PackedSequence", "lengths_with_packed_sequence"),
    *case(lambda m: m(rand(STEPS, INPUT_SIZE), lengths=torch.tensor([STEPS])), ValueError,
          r"lengths needs batched 3-D input", "lengths_with_unbatched_input"),
]


def tensors_of(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


def assert_keeps_working(module, good, before):
    for got, want in zip(tensors_of(module(good)), tensors_of(before), strict=True):
        assert torch.equal(got, want), "the module's output on good input changed after a refused call"


@pytest.mark.parametrize("cell, call, error, match", REJECTED_BY_TORCH)
def test_rejects_what_torch_rejects_with_the_same_exception_type(cell, call, error, match):
    torch_module, fused = make_pair(cell)
    good = good_input()
    before = fused(good)
    with pytest.raises(error):
        call(torch_module)
    with pytest.raises(error, match=match):
        call(fused)
    assert_keeps_working(fused, good, before)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", [(INPUT_SIZE,), (STEPS, BATCH, INPUT_SIZE, 1)], ids=["1d", "4d"])
def test_input_dimension_message_is_torchs_word_for_word(cell, shape):
    """nn.RNN says "got 4D tensor instead", nn.LSTM and nn.GRU "got 4D instead": code that matches
    on torch.nn's message works the same."""
    torch_module, fused = make_pair(cell)
    with pytest.raises(ValueError) as torchs:
        torch_module(rand(*shape))
    with pytest.raises(ValueError) as ours:
        fused(rand(*shape))
    assert str(ours.value) == str(torchs.value)


@pytest.mark.parametrize("cell, call, error, match", REJECTED_BY_US)
def test_rejects_what_we_check_beyond_torch(cell, call, error, match):
    _, fused = make_pair(cell)
    good = good_input()
    before = fused(good)
    with pytest.raises(error, match=match):
        call(fused)
    assert_keeps_working(fused, good, before)


CONSTRUCTOR_ERRORS = [
    *case(dict(dropout=-0.1), ValueError, r"dropout should be a number in range \[0, 1\]", "dropout_negative"),
    *case(dict(dropout=1.5), ValueError, r"dropout should be a number in range \[0, 1\]", "dropout_above_one"),
    *case(dict(hidden_size=0), ValueError, r"hidden_size must be greater than zero", "hidden_size_zero"),
    *case(dict(input_size=0), ValueError, r"input_size must be greater than zero", "input_size_zero"),
    *case(dict(num_layers=0), ValueError, r"num_layers must be greater than zero", "num_layers_zero"),
    *case(dict(proj_size=HIDDEN_SIZE), ValueError, r"proj_size has to be smaller than hidden_size",
          "proj_size_equal_to_hidden_size", cells=["LSTM"]),
    *case(dict(proj_size=HIDDEN_SIZE + 2), ValueError, r"proj_size has to be smaller than hidden_size",
          "proj_size_above_hidden_size", cells=["LSTM"]),
    *case(dict(proj_size=3), ValueError, r"proj_size argument is only supported for LSTM", "proj_size",
          cells=SINGLE_STATE_CELLS),
    *case(dict(nonlinearity="sigmoid"), ValueError, r"Unknown nonlinearity 'sigmoid'", "nonlinearity_sigmoid",
          cells=RNN_CELLS),
]


@pytest.mark.parametrize("cell, options, error, match", CONSTRUCTOR_ERRORS)
def test_constructor_rejects_what_torch_rejects(cell, options, error, match):
    kwargs = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    with pytest.raises(error):
        TORCH[cell](**kwargs)
    with pytest.raises(error, match=match):
        FUSED[cell](**kwargs)


@pytest.mark.parametrize("cell", CELLS)
def test_weights_swapped_for_another_hidden_size_are_refused(cell):
    # Consistent among themselves, so only the module's hidden_size can tell (without hx, the
    # states would take the weights' size and the outputs the wrong width).
    torch_module, fused = make_pair(cell)
    smaller = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE - 1, device=KERNEL_DEVICE)
    for module in (torch_module, fused):
        for name in module._flat_weights_names:
            setattr(module, name, getattr(smaller, name))
    if cell != "LSTM":  # nn.LSTM on CPU returns 7 features from 6-unit weights, without a word
        with pytest.raises(RuntimeError):
            torch_module(good_input())
    gates = smaller.weight_hh_l0.shape[0]
    with pytest.raises(RuntimeError, match=rf"weight_hh_l0 has shape \[{gates}, 6\], expected "
                                           rf"\[{gates * 7 // 6}, 7\] \(hidden_size=7, proj_size=0\)"):
        fused(good_input())


@pytest.mark.parametrize("cell", CELLS)
def test_reset_of_a_batch_first_packed_sequence_is_checked_in_its_own_layout(cell):
    # The message names what the caller passes, (B, T) with batch_first, not the time-major
    # layout the module turns a PackedSequence into.
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, batch_first=True, device=KERNEL_DEVICE)
    data = pack_padded_sequence(rand(BATCH, STEPS, INPUT_SIZE), [STEPS, 2], batch_first=True)
    with pytest.raises(ValueError, match=rf"\(B, T\) with batch_first = \[{BATCH}, {STEPS}\], "
                                         rf"got \[{STEPS}, {BATCH}\]"):
        fused(data, reset=torch.zeros(STEPS, BATCH, dtype=torch.bool, device=KERNEL_DEVICE))
    fused(data, reset=torch.zeros(BATCH, STEPS, dtype=torch.bool, device=KERNEL_DEVICE))
