"""Elman RNN cell (``nn.RNN``): the step math of the shared recurrence kernels, and its launchers.

Per step and unit (``gates_x = x W_ih^T + b_ih + b_hh``, computed for all timesteps by one GEMM):

    h_t = tanh(gates_x[t] + h_{t-1} W_hh^T)      or, with nonlinearity='relu', max(., 0)

One gate: the weight block of a program is ``BLOCK_U`` rows of ``W_hh``. Nothing is saved for
the backward, the derivative of either nonlinearity follows from ``h_t``; but with zoneout,
which keeps units of ``h_{t-1}`` in ``h_t``, the new value is saved.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import recurrence
from .recurrence import ZONEOUT_OFF, load_gates, load_tile, store_gates, tanh


@triton.jit
def rnn_step(gates_h, gates_x, saved_ptr, x_rows, row_mask, first_unit, H, RELU: tl.constexpr,
             ZONEOUT: tl.constexpr, SAVE: tl.constexpr, BLOCK_U: tl.constexpr):
    """``h_t = tanh(gates_h + gates_x)``, or ``relu`` with ``RELU``: the step both cells share."""
    preactivation = gates_h + gates_x
    if RELU:
        h = tl.maximum(preactivation, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        h = tanh(preactivation)
    if SAVE and ZONEOUT != ZONEOUT_OFF:
        # Zoneout keeps units of h_{t-1} in h_t: the backward needs the new value itself.
        store_gates(saved_ptr, x_rows, H, first_unit, row_mask, h, 1, 1, BLOCK_U)
    return h


@triton.jit
def rnn_step_grad(dh, h, dgates_x_ptr, x_rows, row_mask, active, first_unit, H,
                  HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, BLOCK_U: tl.constexpr):
    """The gradient of ``rnn_step``'s preactivation from ``dh`` and ``h_t``, stored to ``dgates_x``."""
    h = h.to(dh.dtype)
    if RELU:
        # As torch's ReLU backward (threshold_backward): zero where h <= 0, so a NaN h passes dh.
        dgates = tl.where(h <= 0.0, 0.0, dh)
    else:
        dgates = dh * (1.0 - h * h)
    if HAS_LENGTHS:
        dgates = tl.where(active[None, :], dgates, 0.0)
    store_gates(dgates_x_ptr, x_rows, H, first_unit, row_mask, dgates, 1, 1, BLOCK_U)
    return dgates, tl.zeros_like(dh)


@triton.jit
def rnn_backward_inputs(
    saved_ptr, h_ptr, c_ptr, dc_carry_ptr, x_rows, prev_rows, init_rows, out_rows, state_rows, row_mask, reset,
    first_unit, H, P, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """What the RNN's backward reads for the block's units: ``h_t``, or with zoneout the new value
    it saved (``h_t`` holds units of ``h_{t-1}`` there)."""
    units = first_unit + tl.arange(0, BLOCK_U)
    mask = (units < H)[:, None] & row_mask[None, :]
    if ZONEOUT != ZONEOUT_OFF:
        h = load_gates(saved_ptr, x_rows, H, first_unit, row_mask, 1, 1, BLOCK_U)
    else:
        h = load_tile(h_ptr, out_rows, P, units, mask)
    return (h,)


# The shared kernels call a cell's step with one signature; these bind the nonlinearity.
@triton.jit
def rnn_tanh_forward_cell(
    gates_h, gates_x, h_prev, b_hh_ptr, c_ptr, saved_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, out_rows, row_mask, active, first_unit, H,
    HAS_HH_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """``h_t = tanh(gates_x[t] + gates_h)`` for the block's units."""
    return rnn_step(gates_h, gates_x, saved_ptr, x_rows, row_mask, first_unit, H, False, ZONEOUT, SAVE, BLOCK_U)


@triton.jit
def rnn_relu_forward_cell(
    gates_h, gates_x, h_prev, b_hh_ptr, c_ptr, saved_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, out_rows, row_mask, active, first_unit, H,
    HAS_HH_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """``h_t = max(gates_x[t] + gates_h, 0)`` for the block's units."""
    return rnn_step(gates_h, gates_x, saved_ptr, x_rows, row_mask, first_unit, H, True, ZONEOUT, SAVE, BLOCK_U)


@triton.jit
def rnn_tanh_backward_cell(
    dh, inputs, dgates_x_ptr, dgates_h_ptr, dc_carry_ptr, routed_dc0_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, state_rows, row_mask, active, reset, first_unit, H,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """``dL/dpreactivation = dh * (1 - h_t^2)``; nothing reaches ``h_{t-1}`` around ``W_hh``."""
    return rnn_step_grad(dh, inputs[0], dgates_x_ptr, x_rows, row_mask, active, first_unit, H, HAS_LENGTHS, False,
                         BLOCK_U)


@triton.jit
def rnn_relu_backward_cell(
    dh, inputs, dgates_x_ptr, dgates_h_ptr, dc_carry_ptr, routed_dc0_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, state_rows, row_mask, active, reset, first_unit, H,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """``dL/dpreactivation = 0`` where ``h_t <= 0``, else ``dh``."""
    return rnn_step_grad(dh, inputs[0], dgates_x_ptr, x_rows, row_mask, active, first_unit, H, HAS_LENGTHS, True,
                         BLOCK_U)


CELLS = {
    "tanh": recurrence.Cell(num_gates=1, saved_gates=0, has_cell_state=False, forward=rnn_tanh_forward_cell,
                            backward_inputs=rnn_backward_inputs, backward=rnn_tanh_backward_cell),
    "relu": recurrence.Cell(num_gates=1, saved_gates=0, has_cell_state=False, forward=rnn_relu_forward_cell,
                            backward_inputs=rnn_backward_inputs, backward=rnn_relu_backward_cell),
}


@recurrence.operator
def rnn_forward(
    gates_x: Tensor, w_hh: Tensor, h0: Tensor, lengths: Optional[Tensor], resets: Optional[Tensor],
    h_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_p: float, nonlinearity: str,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor]:
    """The RNN recurrence of one layer, all directions, over ``gates_x (T, B, D, H)``:
    ``w_hh (D, H, H)``, ``h0 (D, B, H)``, options as for ``lstm_forward``. Returns the state
    buffer ``h (T+2, B, D, H)`` and, with zoneout, the new values ``(T, B, D, H)`` for the
    backward (else empty)."""
    h, _, _, saved = recurrence.forward(CELLS[nonlinearity], gates_x, w_hh, None, None, h0, None, lengths, resets,
                                        h_mask, zoneout_h, None, zoneout_p, save_for_backward)
    return h, saved


@torch.library.register_fake(rnn_forward)
def _(gates_x, w_hh, h0, lengths, resets, h_mask, zoneout_h, zoneout_p, nonlinearity, save_for_backward):
    h, _, _, saved = recurrence.forward_outputs(CELLS[nonlinearity], gates_x, w_hh, None, save_for_backward,
                                                zoneout_h, zoneout_p)
    return h, saved


@recurrence.operator
def rnn_backward(
    grad_h: Tensor, w_hh: Tensor, lengths: Optional[Tensor], resets: Optional[Tensor], h_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_p: float, h: Tensor, saved: Tensor, nonlinearity: str,
) -> tuple[Tensor, Tensor]:
    """BPTT through ``rnn_forward``. Returns ``dgates (T, B, D, H)`` (the gradient of ``gates_x``)
    and ``dh0 (D, B, H)``."""
    dgates, _, _, dh0, _ = recurrence.backward(CELLS[nonlinearity], grad_h, None, w_hh, None, lengths, resets,
                                               h_mask, zoneout_h, None, zoneout_p, h, h.new_empty(0), saved)
    return dgates, dh0


@torch.library.register_fake(rnn_backward)
def _(grad_h, w_hh, lengths, resets, h_mask, zoneout_h, zoneout_p, h, saved, nonlinearity):
    dgates, _, _, dh0, _ = recurrence.backward_outputs(CELLS[nonlinearity], grad_h, w_hh, None)
    return dgates, dh0
