"""GRU cell: the step math of the shared recurrence kernels, and the GRU's launchers.

Per step and unit, in PyTorch's gate order r, z, n (``gates_x = x W_ih^T + b_ih``, computed for
all timesteps by one GEMM):

    r = sigmoid(gates_x_r + h W_hr^T + b_hr)     z = sigmoid(gates_x_z + h W_hz^T + b_hz)
    n = tanh(gates_x_n + r * (h W_hn^T + b_hn))  h_t = (1 - z) * n + z * h_{t-1}

with ``W_hr``, ``W_hz``, ``W_hn`` the gates' blocks of ``W_hh`` (``nn.GRU``'s names; elsewhere in
this package ``W_hr`` is the LSTM's projection). ``b_hn`` sits inside the product with r, so
``b_hh`` cannot be folded into ``gates_x``. The three gates fill four slots of the gate-major
weight block (``tl.dot`` needs power-of-two shapes); the fourth is zero. Saved for the backward:
r, z, n and ``h W_hn^T + b_hn``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import recurrence
from .recurrence import gate_offsets, join_gates, load_gates, previous_state, split_gates, store_gates, tanh


@triton.jit
def gru_forward_cell(
    gates_h, gates_x, h_prev, b_hh_ptr, c_ptr, saved_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, out_rows, row_mask, active, first_unit, H,
    HAS_HH_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """One step for the block's units, given ``gates_h = W_block @ h_{t-1}^T``, the block's
    ``gates_x`` tile and its units' ``h_{t-1}``; returns ``h_t``."""
    if HAS_HH_BIAS:
        columns, column_mask = gate_offsets(first_unit, H, 3, 4, BLOCK_U)
        gates_h += tl.load(b_hh_ptr + columns, mask=column_mask, other=0.0).to(ACC_DTYPE)[:, None]
    r_h, z_h, n_h, _ = split_gates(gates_h, BLOCK_U, BLOCK_B)
    r_x, z_x, n_x, _ = split_gates(gates_x, BLOCK_U, BLOCK_B)
    r = tl.sigmoid(r_x + r_h)
    z = tl.sigmoid(z_x + z_h)
    n = tanh(n_x + r * n_h)
    if SAVE:
        store_gates(saved_ptr, x_rows, H, first_unit, row_mask, join_gates(r, z, n, n_h), 4, 4, BLOCK_U)
    return (1.0 - z) * n + z * h_prev


@triton.jit
def gru_backward_inputs(
    saved_ptr, h_ptr, c_ptr, dc_carry_ptr, x_rows, prev_rows, init_rows, out_rows, state_rows, row_mask, reset,
    first_unit, H, P, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """What ``gru_backward_cell`` reads for the block's units: the saved activations and ``h_{t-1}``."""
    units = first_unit + tl.arange(0, BLOCK_U)
    mask = (units < H)[:, None] & row_mask[None, :]
    saved = load_gates(saved_ptr, x_rows, H, first_unit, row_mask, 4, 4, BLOCK_U)
    return saved, previous_state(h_ptr, prev_rows, init_rows, P, units, mask, reset, HAS_RESETS)


@triton.jit
def gru_backward_cell(
    dh, inputs, dgates_x_ptr, dgates_h_ptr, dc_carry_ptr, routed_dc0_ptr, zoneout_c_ptr, zoneout_p,
    x_rows, state_rows, row_mask, active, reset, first_unit, H,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ZONEOUT: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Gate gradients of one step for the block's units, given ``dh = dL/dh_t`` and
    ``gru_backward_inputs``.

    Writes ``dgates_x`` (r, z, n) and ``dgates_h`` (r, z, n * r: the gradient of
    ``h W_hh^T + b_hh``, what is multiplied by ``W_hh``). Returns the latter, gate-major, and
    ``z * dh``, the gradient reaching ``h_{t-1}`` around ``W_hh``.
    """
    saved, h_prev = inputs
    h_prev = h_prev.to(dh.dtype)
    r, z, n, n_h = split_gates(saved.to(dh.dtype), BLOCK_U, BLOCK_B)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dr = dn * n_h * r * (1.0 - r)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    unused = tl.zeros_like(dn)
    dgates_x = join_gates(dr, dz, dn, unused)
    dgates_h = join_gates(dr, dz, dn * r, unused)
    if HAS_LENGTHS:
        dgates_x = tl.where(active[None, :], dgates_x, 0.0)
        dgates_h = tl.where(active[None, :], dgates_h, 0.0)
    store_gates(dgates_x_ptr, x_rows, H, first_unit, row_mask, dgates_x, 3, 4, BLOCK_U)
    store_gates(dgates_h_ptr, x_rows, H, first_unit, row_mask, dgates_h, 3, 4, BLOCK_U)
    return dgates_h, dh * z


CELL = recurrence.Cell(num_gates=3, saved_gates=4, has_cell_state=False, forward=gru_forward_cell,
                       backward_inputs=gru_backward_inputs, backward=gru_backward_cell, separate_hidden_grad=True)


@recurrence.operator
def gru_forward(
    gates_x: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
    resets: Optional[Tensor], h_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_p: float,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor]:
    """The GRU recurrence of one layer, all directions, over ``gates_x (T, B, D, 3H)``.

    ``w_hh (D, 3H, H)``, ``b_hh (D, 3H)``, ``h0 (D, B, H)``; the options as for ``lstm_forward``.
    Returns the state buffer ``h (T+2, B, D, H)`` and the activations ``(T, B, D, 4H)`` saved for
    the backward (empty when not needed).
    """
    h, _, _, saved = recurrence.forward(CELL, gates_x, w_hh, b_hh, None, h0, None, lengths, resets, h_mask,
                                        zoneout_h, None, zoneout_p, save_for_backward)
    return h, saved


@torch.library.register_fake(gru_forward)
def _(gates_x, w_hh, b_hh, h0, lengths, resets, h_mask, zoneout_h, zoneout_p, save_for_backward):
    h, _, _, saved = recurrence.forward_outputs(CELL, gates_x, w_hh, None, save_for_backward, zoneout_h, zoneout_p)
    return h, saved


@recurrence.operator
def gru_backward(
    grad_h: Tensor, w_hh: Tensor, lengths: Optional[Tensor], resets: Optional[Tensor], h_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor], zoneout_p: float, h: Tensor, saved: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT through ``gru_forward``; ``grad_h (T, B, D, H)`` with the final-state gradient folded in.

    Returns ``dgates_x (T, B, D, 3H)`` (the gradient of ``gates_x``), ``dgates_h`` (that of
    ``h W_hh^T + b_hh``) and ``dh0 (D, B, H)``.
    """
    dgates_x, dgates_h, _, dh0, _ = recurrence.backward(
        CELL, grad_h, None, w_hh, None, lengths, resets, h_mask, zoneout_h, None, zoneout_p, h, h.new_empty(0), saved)
    return dgates_x, dgates_h, dh0


@torch.library.register_fake(gru_backward)
def _(grad_h, w_hh, lengths, resets, h_mask, zoneout_h, zoneout_p, h, saved):
    dgates_x, dgates_h, _, dh0, _ = recurrence.backward_outputs(CELL, grad_h, w_hh, None)
    return dgates_x, dgates_h, dh0
