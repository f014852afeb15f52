"""The GRU layer on the Triton kernels (``functional.layer("GRU", ...)``) against
``reference.layer`` in float64; cases and checks in ``ops_cases``. The GRU keeps ``b_hh`` apart
from ``gates_x`` (``b_hn`` sits inside ``r * (.)``), so bias on and off take different kernels."""

import pytest
import torch
from helpers import KERNEL_DEVICE, assert_close
from ops_cases import (
    ALL_EVAL,
    ALL_TRAINING,
    LENGTHS,
    OTHER_PLANS,
    RESETS,
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


@pytest.mark.parametrize("case", params(shape_and_dtype_cases("GRU")))
def test_gru_matches_reference_per_shape_and_dtype(monkeypatch, case):
    use_plan(monkeypatch, "default")
    check_against_reference(case)


@pytest.mark.parametrize("case", params(option_cases("GRU")))
def test_gru_matches_reference_with_options(monkeypatch, case):
    use_plan(monkeypatch, "default")
    check_against_reference(case)


@pytest.mark.parametrize("plan", OTHER_PLANS)
@pytest.mark.parametrize("case", params(plan_cases("GRU") + [Case("GRU", 2, 3, 20, D=2, bias=False, options=ALL_EVAL)]))
def test_gru_matches_reference_on_every_plan(monkeypatch, plan, case):
    use_plan(monkeypatch, plan)
    check_against_reference(case)


@pytest.mark.parametrize("case", params([Case("GRU", 3, 5, 20, D=2, options=(ZONEOUT,))]))
def test_gru_zoneout_masks_alone_match_reference(case):
    """The keep masks without the rate they were drawn with (``zoneout_p`` at its default, 0)."""
    check_against_reference(case, zoneout_p=None)


@pytest.mark.parametrize(
    "plan, case, grid, backward_grid, launches",
    [
        pytest.param("default", Case("GRU", 3, 3, 20, D=2), (1, 1, 2), (1, 1, 2), 1, id="default-one-launch"),
        # H=20 in blocks of 8 units: 3 programs, the gathering backward's blocks of 16: 2; B=67 in
        # tiles of 64: 2.
        pytest.param("stepwise-resident", Case("GRU", 2, 67, 20), (2, 3, 1), (2, 2, 1), 2,
                     id="stepwise-one-launch-per-step"),
        pytest.param("stepwise-partial", Case("GRU", 2, 67, 20), (2, 3, 1), (2, 3, 1), 2,
                     id="stepwise-partial-one-launch-per-step"),
    ],
)
def test_gru_runs_the_triton_kernels(monkeypatch, plan, case, grid, backward_grid, launches):
    use_plan(monkeypatch, plan)
    check_kernels_ran(monkeypatch, case, grid, backward_grid, launches)


@pytest.mark.parametrize("case", params([Case("GRU", 2, 2, 3, D=2, dtype=torch.float64, options=ALL_TRAINING),
                                         Case("GRU", 2, 2, 3, dtype=torch.float64, bias=False, options=ALL_EVAL)]))
def test_gru_gradcheck(case):
    gradcheck(case)


@pytest.mark.parametrize("case", params([Case("GRU", 2, 2, 3, D=2, dtype=torch.float64, options=(LENGTHS, RESETS))]))
def test_gru_second_derivatives(case):
    check_second_derivatives(case)


@pytest.mark.parametrize("case", params([Case("GRU", 3, 3, 20, D=2, options=ALL_EVAL)]))
def test_gru_no_grad_forward_saves_nothing_and_matches(monkeypatch, case):
    check_no_grad_saves_nothing(monkeypatch, case)


@pytest.mark.parametrize("case", params([Case("GRU", 4, 3, 7, D=2, dtype=torch.float64, options=(LENGTHS,))]))
def test_gru_state_buffer_holds_initial_states_and_outputs(monkeypatch, case):
    check_state_buffer(monkeypatch, case)


def test_gru_bf16_hidden_state_gradient_keeps_every_steps_increment():
    """dL/dh walks back through 128 steps whose update gates round to 1 in bf16, so the carry is
    dL/dh_n plus 128 small increments: a bf16 carry next to 256 drops them, the fp32 carry the
    kernels keep does not (as the LSTM's dL/dc, test_ops_lstm)."""
    torch.manual_seed(0)
    T, B, H, I = 128, 2, 8, 5
    w_ih, w_hh = torch.randn(3 * H, I) * 0.3, torch.randn(3 * H, H) * 0.3
    b_ih, b_hh = torch.randn(3 * H) * 0.1, torch.randn(3 * H) * 0.1
    b_ih[H:2 * H] += 16.0  # update gate open: h_t is h_{t-1} plus a little
    x, h0 = torch.randn(T, B, I), torch.randn(1, B, H) * 0.1
    bf16 = [tensor.to(torch.bfloat16) for tensor in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def grad_h0(layer, dtype):
        x, h0, *weights = (tensor.to(KERNEL_DEVICE, dtype, copy=True) for tensor in bf16)
        h0.requires_grad_()
        output, h_n, _ = layer("GRU", x, h0, None, [(*weights, None)])
        return torch.autograd.grad([output, h_n], h0, [torch.ones_like(output), torch.full_like(h_n, 256.0)])[0]

    assert_close(grad_h0(functional.layer, torch.bfloat16), grad_h0(reference.layer, torch.float64), torch.bfloat16,
                 name="dL/dh_0")
