"""LSTM cell: the step math of the shared recurrence kernels, and the LSTM's launchers.

Per step and unit, in PyTorch's gate order i, f, g, o (``gates_x = x W_ih^T + b_ih + b_hh``,
computed for all timesteps by one GEMM):

    gates = gates_x[t] + h_{t-1} W_hh^T          i, f, o = sigmoid(.), g = tanh(.)
    c_t = f * c_{t-1} + i * g                    h_t = o * tanh(c_t)   [then h_t = h_t W_hr^T with proj_size]

Saved for the backward: the activations (i, f, g, o) and every c_t.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import recurrence
from .recurrence import (
    join_gates, load_gates, load_tile, previous_state, route_to_initial, split_gates, store_gates, store_tile, tanh,
    ZONEOUT_OFF, zoneout, zoneout_grad,
)


@triton.jit
def lstm_forward_cell(
    gates_h, gates_x, c_prev, b_hh_ptr, c_ptr, saved_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, out_rows, row_mask, active, first_unit, H,
    HAS_HH_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """One step for the block's units, given ``gates_h = W_block @ h_{t-1}^T``, the block's
    ``gates_x`` tile and ``c_{t-1}``: writes ``c_t`` (and the activations) and returns
    ``o * tanh(c_t)``."""
    gates = gates_h + gates_x
    i, f, g, o = split_gates(gates, BLOCK_U, BLOCK_B)
    i = tl.sigmoid(i)
    f = tl.sigmoid(f)
    g = tanh(g)
    o = tl.sigmoid(o)
    units = first_unit + tl.arange(0, BLOCK_U)
    mask = (units < H)[:, None] & row_mask[None, :]
    c = f * c_prev + i * g
    h = o * tanh(c)
    # Zoneout keeps units of c_{t-1} in c_t, after h has taken tanh of the new value (Krueger et al.).
    c = zoneout(c, c_prev, zoneout_c_ptr, x_rows, H, units, mask, zoneout_p, ZONEOUT)
    if HAS_LENGTHS:
        # Past a sequence's end the state passes through unchanged.
        c = tl.where(active[None, :], c, c_prev)
    store_tile(c_ptr, out_rows, H, units, mask, c)
    if SAVE:
        store_gates(saved_ptr, x_rows, H, first_unit, row_mask, join_gates(i, f, g, o), 4, 4, BLOCK_U)
    return h


@triton.jit
def lstm_backward_inputs(
    saved_ptr, h_ptr, c_ptr, dc_carry_ptr, x_rows, prev_rows, init_rows, out_rows, state_rows, row_mask, reset,
    first_unit, H, P, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """What ``lstm_backward_cell`` reads for the block's units: the saved activations, ``c_{t-1}``,
    ``c_t`` (under zoneout ``c_{t-1}`` again: ``c_t`` may hold units of ``c_{t-1}``, and the cell
    recomputes the new value) and the cell-state carry ``dL/dc_t``."""
    units = first_unit + tl.arange(0, BLOCK_U)
    mask = (units < H)[:, None] & row_mask[None, :]
    saved = load_gates(saved_ptr, x_rows, H, first_unit, row_mask, 4, 4, BLOCK_U)
    c_prev = previous_state(c_ptr, prev_rows, init_rows, H, units, mask, reset, HAS_RESETS)
    if ZONEOUT != ZONEOUT_OFF:
        c = c_prev
    else:
        c = load_tile(c_ptr, out_rows, H, units, mask)
    return saved, c_prev, c, load_tile(dc_carry_ptr, state_rows, H, units, mask)


@triton.jit
def lstm_backward_cell(
    dh, inputs, dgates_x_ptr, dgates_h_ptr, dc_carry_ptr, routed_dc0_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, state_rows, row_mask, active, reset, first_unit, H,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Gate gradients of one step for the block's units, given ``dh = dL/d(o * tanh(c_t))`` and
    ``lstm_backward_inputs``.

    Moves the cell-state carry from ``dL/dc_t`` to ``dL/dc_{t-1}`` (into ``routed_dc0`` where
    the step reset). Returns the gate-major gate gradients and the gradient reaching ``h_{t-1}`` other than
    through ``W_hh`` (none for the LSTM).
    """
    saved, c_prev, c, dc_carry = inputs
    units = first_unit + tl.arange(0, BLOCK_U)
    mask = (units < H)[:, None] & row_mask[None, :]
    i, f, g, o = split_gates(saved.to(dh.dtype), BLOCK_U, BLOCK_B)
    if ZONEOUT != ZONEOUT_OFF:
        c = f * c_prev + i * g
    dc_new, dc_kept = zoneout_grad(dc_carry, zoneout_c_ptr, x_rows, H, units, mask, zoneout_p, ZONEOUT)
    tanh_c = tanh(c)
    dc = dc_new + dh * o * (1.0 - tanh_c * tanh_c)
    dgates = join_gates(
        dc * g * i * (1.0 - i),
        dc * c_prev * f * (1.0 - f),
        dc * i * (1.0 - g * g),
        dh * tanh_c * o * (1.0 - o),
    )
    dc_prev = dc * f + dc_kept
    if HAS_LENGTHS:
        dgates = tl.where(active[None, :], dgates, 0.0)
        dc_prev = tl.where(active[None, :], dc_prev, dc_carry)
    dc_prev = route_to_initial(dc_prev, routed_dc0_ptr, state_rows, H, units, mask, reset, HAS_RESETS)
    store_tile(dc_carry_ptr, state_rows, H, units, mask, dc_prev)
    store_gates(dgates_x_ptr, x_rows, H, first_unit, row_mask, dgates, 4, 4, BLOCK_U)
    return dgates, tl.zeros_like(dh)


CELL = recurrence.Cell(num_gates=4, saved_gates=4, has_cell_state=True, forward=lstm_forward_cell,
                       backward_inputs=lstm_backward_inputs, backward=lstm_backward_cell)


@recurrence.operator
def lstm_forward(
    gates_x: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
    lengths: Optional[Tensor], resets: Optional[Tensor], h_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], zoneout_p: float, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM recurrence of one layer, all directions, over ``gates_x (T, B, D, 4H)``.

    ``w_hh (D, 4H, P)``, ``w_hr (D, P, H)`` [proj], ``h0 (D, B, P)``, ``c0 (D, B, H)``,
    ``lengths (B,)``, ``resets (T, B)``, ``h_mask (B, D, P)`` [recurrent dropout], the zoneout keep
    masks ``zoneout_h (T, B, D, P)`` and ``zoneout_c (T, B, D, H)`` [training] or ``zoneout_p``
    alone [eval]. Returns the state buffers ``h (T+2, B, D, P)`` and ``c (T+2, B, D, H)`` (see
    ``ops.recurrence``), and for the backward ``h_raw = o * tanh(c) (T, B, D, H)`` [proj] and the
    activations ``(T, B, D, 4H)``; each of the last two is empty when not needed.
    """
    return recurrence.forward(CELL, gates_x, w_hh, None, w_hr, h0, c0, lengths, resets, h_mask,
                              zoneout_h, zoneout_c, zoneout_p, save_for_backward)


@torch.library.register_fake(lstm_forward)
def _(gates_x, w_hh, w_hr, h0, c0, lengths, resets, h_mask, zoneout_h, zoneout_c, zoneout_p, save_for_backward):
    return recurrence.forward_outputs(CELL, gates_x, w_hh, w_hr, save_for_backward, zoneout_h, zoneout_p)


@recurrence.operator
def lstm_backward(
    grad_h: Tensor, grad_c_n: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
    resets: Optional[Tensor], h_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
    zoneout_p: float, h: Tensor, c: Tensor, saved: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BPTT through ``lstm_forward``.

    ``grad_h (T, B, D, P)`` is the gradient of the output sequence (final-state gradient folded
    in), ``grad_c_n (D, B, H)`` that of the final cell state. Returns ``dgates (T, B, D, 4H)``
    (the gradient of ``gates_x``), ``grad_h_proj (T, B, D, P)`` [proj: the gradient of
    ``h_raw W_hr^T``, else empty], ``dh0 (D, B, P)`` and ``dc0 (D, B, H)``.
    """
    dgates, _, grad_h_proj, dh0, dc0 = recurrence.backward(
        CELL, grad_h, grad_c_n, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c, zoneout_p, h, c, saved)
    return dgates, grad_h_proj, dh0, dc0


@torch.library.register_fake(lstm_backward)
def _(grad_h, grad_c_n, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c, zoneout_p, h, c, saved):
    dgates, _, grad_h_proj, dh0, dc0 = recurrence.backward_outputs(CELL, grad_h, w_hh, w_hr)
    return dgates, grad_h_proj, dh0, dc0
