"""The LSTM layer on the Triton kernels (``functional.layer("LSTM", ...)``) against
``reference.layer`` in float64, with and without ``proj_size``; cases and checks in ``ops_cases``."""

import pytest
import torch
from helpers import KERNEL_DEVICE, assert_close
from ops_cases import (
    ALL_EVAL,
    ALL_TRAINING,
    LENGTHS,
    LOW_PRECISION_SHAPES,
    OTHER_PLANS,
    RESETS,
    SHAPES,
    ZONEOUT,
    Case,
    check_against_reference,
    check_kernels_ran,
    check_no_grad_saves_nothing,
    check_second_derivatives,
    check_state_buffer,
    gradcheck,
    option_cases,
    params,
    plan_cases,
    shape_and_dtype_cases,
    use_plan,
)

from fused_rnn import functional, reference
from fused_rnn.ops import lstm, recurrence

# proj_size: P=7 against H=20 (one feature block), P=65 against H=70 (several), P=1.
PROJ_SHAPES = [(3, 3, 20, 7), (3, 3, 70, 65), (3, 3, 7, 1)]


@pytest.mark.parametrize("case", params(shape_and_dtype_cases(
    "LSTM", shapes=SHAPES + PROJ_SHAPES, low_precision_shapes=LOW_PRECISION_SHAPES + [(3, 3, 70, 65), (3, 3, 7, 1)],
)))
def test_lstm_matches_reference_per_shape_and_dtype(monkeypatch, case):
    use_plan(monkeypatch, "default")
    check_against_reference(case)


@pytest.mark.parametrize("case", params(
    option_cases("LSTM") + option_cases("LSTM", P=7, grid=[(LENGTHS,), ALL_TRAINING, ALL_EVAL])
    + [Case("LSTM", 3, 19, 70, 65, D=2, options=ALL_TRAINING)]
))
def test_lstm_matches_reference_with_options(monkeypatch, case):
    use_plan(monkeypatch, "default")
    check_against_reference(case)


@pytest.mark.parametrize("plan", OTHER_PLANS)
@pytest.mark.parametrize("case", params(
    plan_cases("LSTM")
    + [Case("LSTM", 3, 5, 20, 7, D=2, options=ALL_EVAL), Case("LSTM", 2, 3, 70, 65, options=ALL_TRAINING),
       # The projection's gathering backward loads the first wave of the gate gradients in its
       # product, not beside the cell's loads (3 groups, 2 waves).
       Case("LSTM", 2, 3, 192, 65)]
))
def test_lstm_matches_reference_on_every_plan(monkeypatch, plan, case):
    use_plan(monkeypatch, plan)
    check_against_reference(case)


def test_lstm_gathering_backward_in_two_waves_of_one_group(monkeypatch):
    # H=256 on the interpreter's resident plan: 1024 gate rows in 16 pieces of 64, two groups of 8,
    # one a wave: the second wave is loaded after the first's product (a wave boundary that the 3
    # groups of H=192 do not test alone).
    use_plan(monkeypatch, "stepwise-resident")
    check_against_reference(Case("LSTM", 2, 3, 256))


def test_lstm_bf16_cell_state_gradient_keeps_every_steps_increment():
    """dL/dc walks back through 128 steps whose forget gates round to 1 in bf16, so the carry is
    dL/dc_n plus 128 small increments: a bf16 carry (8 bits of mantissa) next to 256 drops them,
    the fp32 carry the kernels keep does not."""
    torch.manual_seed(0)
    T, B, H, I = 128, 2, 8, 5
    w_ih, w_hh = torch.randn(4 * H, I) * 0.3, torch.randn(4 * H, H) * 0.3
    b_ih, b_hh = torch.randn(4 * H) * 0.1, torch.randn(4 * H) * 0.1
    b_ih[:H] -= 10.0     # input gate shut: c stays small
    b_ih[H:2 * H] += 16.0  # forget gate open
    x, h0, c0 = torch.randn(T, B, I), torch.randn(1, B, H) * 0.1, torch.randn(1, B, H) * 0.1
    bf16 = [tensor.to(torch.bfloat16) for tensor in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]

    def grad_c0(layer, dtype):
        x, h0, c0, *weights = (tensor.to(KERNEL_DEVICE, dtype, copy=True) for tensor in bf16)
        c0.requires_grad_()
        output, _, c_n = layer("LSTM", x, h0, c0, [(*weights, None)])
        return torch.autograd.grad([output, c_n], c0, [torch.ones_like(output), torch.full_like(c_n, 256.0)])[0]

    assert_close(grad_c0(functional.layer, torch.bfloat16), grad_c0(reference.layer, torch.float64), torch.bfloat16,
                 name="dL/dc_0")


@pytest.mark.parametrize("case", params([Case("LSTM", 3, 5, 20, D=2, options=(ZONEOUT,)),
                                         Case("LSTM", 3, 5, 20, 7, D=2, options=(ZONEOUT,))]))
def test_lstm_zoneout_masks_alone_match_reference(case):
    """The keep masks without the rate they were drawn with (``zoneout_p`` at its default, 0)."""
    check_against_reference(case, zoneout_p=None)


@pytest.mark.parametrize(
    "plan, case, grid, backward_grid, launches",
    [
        pytest.param("default", Case("LSTM", 3, 3, 20, D=2), (1, 1, 2), (1, 1, 2), 1, id="default-one-launch"),
        pytest.param("default", Case("LSTM", 3, 3, 20, 7, D=2), (1, 1, 2), (1, 1, 2), 1,
                     id="default-proj-one-launch"),
        # H=20 in blocks of 8 units: 3 programs, the gathering backward's blocks of 16: 2; B=67 in
        # tiles of 64: 2.
        pytest.param("stepwise-resident", Case("LSTM", 2, 67, 20), (2, 3, 1), (2, 2, 1), 2,
                     id="stepwise-one-launch-per-step"),
        pytest.param("stepwise-partial", Case("LSTM", 2, 67, 20), (2, 3, 1), (2, 3, 1), 2,
                     id="stepwise-partial-one-launch-per-step"),
        pytest.param("stepwise-resident", Case("LSTM", 2, 3, 20, 7, D=2), (1, 3, 2), (1, 2, 2), 4,
                     id="stepwise-proj-two-launches-per-step"),
    ],
)
def test_lstm_runs_the_triton_kernels(monkeypatch, plan, case, grid, backward_grid, launches):
    use_plan(monkeypatch, plan)
    check_kernels_ran(monkeypatch, case, grid, backward_grid, launches)


@pytest.mark.parametrize("case", params([Case("LSTM", 2, 2, 3, D=2, dtype=torch.float64, options=ALL_TRAINING),
                                         Case("LSTM", 2, 2, 3, 2, dtype=torch.float64, options=ALL_EVAL)]))
def test_lstm_gradcheck(case):
    gradcheck(case)


@pytest.mark.parametrize("case", params([Case("LSTM", 2, 2, 3, 2, D=2, dtype=torch.float64, options=(LENGTHS, RESETS))]))
def test_lstm_second_derivatives(case):
    check_second_derivatives(case)


@pytest.mark.parametrize("case", params([Case("LSTM", 3, 3, 20, D=2, options=ALL_EVAL),
                                         Case("LSTM", 3, 3, 20, 7, D=2, options=ALL_EVAL)]))
def test_lstm_no_grad_forward_saves_nothing_and_matches(monkeypatch, case):
    check_no_grad_saves_nothing(monkeypatch, case)


@pytest.mark.parametrize("case", params([Case("LSTM", 4, 3, 7, D=2, dtype=torch.float64, options=(LENGTHS,)),
                                         Case("LSTM", 4, 3, 7, 4, D=2, dtype=torch.float16, options=(LENGTHS,))]))
def test_lstm_state_buffers_hold_initial_states_outputs_and_final_cell_state(monkeypatch, case):
    check_state_buffer(monkeypatch, case)


def _strided(tensor):
    """The same values in a layout that is not contiguous."""
    if tensor.dim() == 1:
        return torch.stack([tensor, tensor], 1)[:, 0]
    return tensor.transpose(0, -1).contiguous().transpose(0, -1)


def test_lstm_ops_read_strided_inputs_as_their_values():
    # The custom ops are public (torch.ops.fused_rnn): a view of any input with other strides
    # gives what its contiguous copy gives, forward and backward, every option on, with a projection.
    torch.manual_seed(0)
    T, B, D, H, P, dtype = 3, 3, 2, 8, 5, torch.float64
    forward_inputs = [
        torch.randn(T, B, D, 4 * H, dtype=dtype), torch.randn(D, 4 * H, P, dtype=dtype) / 3,
        torch.randn(D, P, H, dtype=dtype) / 3, torch.randn(D, B, P, dtype=dtype), torch.randn(D, B, H, dtype=dtype),
        torch.tensor([3, 1, 2]), torch.rand(T, B) < 0.3, (torch.rand(B, D, P) < 0.8).to(dtype) / 0.8,
        torch.rand(T, B, D, P) < 0.3, torch.rand(T, B, D, H) < 0.3,
    ]
    assert not any(_strided(tensor).is_contiguous() for tensor in forward_inputs)
    expected = torch.ops.fused_rnn.lstm_forward(*forward_inputs, 0.3, True)
    actual = torch.ops.fused_rnn.lstm_forward(*map(_strided, forward_inputs), 0.3, True)
    for name, want, got in zip(("h", "c", "h_raw", "saved"), expected, actual):
        assert torch.equal(got, want), name
    h, c, _, saved = expected
    _, w_hh, w_hr, _, _, lengths, resets, h_mask, zoneout_h, zoneout_c = forward_inputs
    grads = [torch.randn(T, B, D, P, dtype=dtype), torch.randn(D, B, H, dtype=dtype)]
    before, after = [w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c], [h, c, saved]
    expected = torch.ops.fused_rnn.lstm_backward(*grads, *before, 0.3, *after)
    actual = torch.ops.fused_rnn.lstm_backward(*map(_strided, grads + before), 0.3, *map(_strided, after))
    for name, want, got in zip(("dgates", "grad_h_proj", "dh0", "dc0"), expected, actual):
        assert torch.equal(got, want), name


def test_lstm_ops_take_both_zoneout_masks_or_neither():
    T, B, D, H = 2, 2, 1, 4
    inputs = [torch.randn(T, B, D, 4 * H), torch.randn(D, 4 * H, H), None, torch.randn(D, B, H), torch.randn(D, B, H),
              None, None, None]
    for zoneout_h, zoneout_c in [(torch.rand(T, B, D, H) < 0.5, None), (None, torch.rand(T, B, D, H) < 0.5)]:
        with pytest.raises(ValueError, match="zoneout_h and zoneout_c"):
            torch.ops.fused_rnn.lstm_forward(*inputs, zoneout_h, zoneout_c, 0.5, False)


def test_lstm_ops_refuse_a_sequence_without_timesteps():
    B, D, H = 2, 1, 4
    w_hh, states = torch.randn(D, 4 * H, H), [torch.randn(D, B, H), torch.randn(D, B, H)]
    with pytest.raises(ValueError, match="gates_x: the recurrence needs at least one timestep"):
        torch.ops.fused_rnn.lstm_forward(torch.randn(0, B, D, 4 * H), w_hh, None, *states, None, None, None, None,
                                         None, 0.0, False)
    with pytest.raises(ValueError, match="grad_h: the recurrence needs at least one timestep"):
        torch.ops.fused_rnn.lstm_backward(torch.randn(0, B, D, H), states[1], w_hh, None, None, None, None, None,
                                          None, 0.0, torch.randn(2, B, D, H), torch.randn(2, B, D, H),
                                          torch.randn(0, B, D, 4 * H))


def test_lstm_ops_refuse_a_tensor_on_another_device():
    # The launch runs on gates_x's (grad_h's) device: a weight on another GPU would be read through
    # peer memory. A meta tensor stands for it (through the op it would reach the fake kernel).
    T, B, D, H = 2, 2, 1, 4
    states = [torch.randn(D, B, H), torch.randn(D, B, H)]
    with pytest.raises(RuntimeError, match="w_hh is on meta, gates_x on cpu"):
        recurrence.forward(lstm.CELL, torch.randn(T, B, D, 4 * H), torch.randn(D, 4 * H, H, device="meta"), None,
                           None, *states, None, None, None, None, None, 0.0, False)
    with pytest.raises(RuntimeError, match="h is on meta, grad_h on cpu"):
        recurrence.backward(lstm.CELL, torch.randn(T, B, D, H), states[1], torch.randn(D, 4 * H, H), None, None,
                            None, None, None, None, 0.0, torch.randn(T + 2, B, D, H, device="meta"),
                            torch.randn(T + 2, B, D, H), torch.randn(T, B, D, 4 * H))
