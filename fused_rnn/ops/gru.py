"""GRU recurrence: Triton kernels for the forward and backward (BPTT) time loops, and launchers.

The input projection ``x W_ih^T + b_ih`` arrives precomputed as ``gates_x`` (one GEMM over all
timesteps). Per step and per tile of hidden units, in PyTorch's gate order r, z, n:

    r = sigmoid(gates_x_r + h W_hr^T + b_hr)     z = sigmoid(gates_x_z + h W_hz^T + b_hz)
    n = tanh(gates_x_n + r * (h W_hn^T + b_hn))  h_t = (1 - z) * n + z * h_{t-1}

``b_hn`` sits inside the product with r, so ``b_hh`` cannot be folded into ``gates_x``.
Shapes: ``T`` steps, ``B`` batch, ``H`` hidden units.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import (
    accumulator_dtype,
    empty,
    hidden_grad_tile,
    initial_slot,
    launch,
    load_tile,
    program_tiles,
    recurrent_gate,
    step_rows,
    store_tile,
    sync_tiles,
    tanh,
)


@triton.jit
def _hidden_part(
    w_hh_ptr, b_hh_ptr, h_ptr, gate, h_rows, row_mask, units, unit_mask, H,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """``h_{t-1} @ W_hh[gate]^T + b_hh[gate]`` for one tile."""
    part = recurrent_gate(
        h_ptr, h_rows, row_mask, w_hh_ptr, gate, units, unit_mask, H, H,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
    )
    if HAS_BIAS:
        part += tl.load(b_hh_ptr + gate * H + units, mask=unit_mask, other=0.0).to(ACC_DTYPE)[None, :]
    return part


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_hh_ptr"] is not None,
    "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
    "SAVE_GATES": lambda args: args["gates_ptr"] is not None,
    "GRID_SYNC": lambda args: args["barrier_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def gru_forward_kernel(
    gates_x_ptr, w_hh_ptr, b_hh_ptr, lengths_ptr, h_ptr, gates_ptr,
    T, B, H, reverse, barrier_ptr, step_begin, step_end,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """GRU forward over the steps ``[step_begin, step_end)``.

    Grid ``(cdiv(B, BLOCK_B), n)``: program ``(b, j)`` owns batch rows ``b * BLOCK_B + [0, BLOCK_B)``
    and the hidden tiles ``j, j + n, ...``; the ``n`` programs of a batch tile meet at
    ``sync_tiles`` after each step.

    Reads ``gates_x (T, B, 3H)``, ``W_hh (3H, H)``, ``b_hh (3H,)`` [bias], ``lengths (B,)``
    [optional]. The state buffer ``h (T+1, B, H)`` holds h_0 in slot 0 (slot T in reverse); step t
    reads slot ``t + reverse`` and writes ``t + 1 - reverse``. Writes ``gates = (r, z, n,
    h W_hn^T + b_hn) (T, B, 4H)`` when saving for backward.
    """
    batch_rows, row_mask, tile_start, tile_stride = program_tiles(B, BLOCK_B, BLOCK_H)
    arrivals = 0
    for step in range(step_begin, step_end):
        t, x_rows, prev_rows, out_rows = step_rows(step, T, B, reverse, 0, batch_rows)
        for h_start in range(tile_start, H, tile_stride):
            units = h_start + tl.arange(0, BLOCK_H)
            unit_mask = units < H
            mask = row_mask[:, None] & unit_mask[None, :]
            r = load_tile(gates_x_ptr, x_rows, 3 * H, units, mask).to(ACC_DTYPE) + _hidden_part(
                w_hh_ptr, b_hh_ptr, h_ptr, 0, prev_rows, row_mask, units, unit_mask, H, HAS_BIAS,
                BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)
            r = tl.sigmoid(r)
            z = load_tile(gates_x_ptr + H, x_rows, 3 * H, units, mask).to(ACC_DTYPE) + _hidden_part(
                w_hh_ptr, b_hh_ptr, h_ptr, 1, prev_rows, row_mask, units, unit_mask, H, HAS_BIAS,
                BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)
            z = tl.sigmoid(z)
            hn = _hidden_part(
                w_hh_ptr, b_hh_ptr, h_ptr, 2, prev_rows, row_mask, units, unit_mask, H, HAS_BIAS,
                BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)
            n = tanh(load_tile(gates_x_ptr + 2 * H, x_rows, 3 * H, units, mask).to(ACC_DTYPE) + r * hn)
            h_prev = load_tile(h_ptr, prev_rows, H, units, mask).to(ACC_DTYPE)
            h = (1.0 - z) * n + z * h_prev
            if HAS_LENGTHS:
                # Past a sequence's end the state passes through unchanged.
                lengths = tl.load(lengths_ptr + batch_rows, mask=row_mask, other=0)
                h = tl.where((t < lengths)[:, None], h, h_prev)
            store_tile(h_ptr, out_rows, H, units, mask, h)
            if SAVE_GATES:
                store_tile(gates_ptr, x_rows, 4 * H, units, mask, r)
                store_tile(gates_ptr + H, x_rows, 4 * H, units, mask, z)
                store_tile(gates_ptr + 2 * H, x_rows, 4 * H, units, mask, n)
                store_tile(gates_ptr + 3 * H, x_rows, 4 * H, units, mask, hn)
        # The next step reads h_t from every tile.
        arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)


@triton.heuristics({
    "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
    "GRID_SYNC": lambda args: args["barrier_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def gru_backward_kernel(
    grad_h_ptr, w_hh_ptr, lengths_ptr, gates_ptr, h_ptr,
    dgates_x_ptr, dgates_h_ptr, dh_carry_ptr,
    T, B, H, reverse, barrier_ptr, step_begin, step_end,
    HAS_LENGTHS: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """GRU backward (BPTT) over the steps ``[step_begin, step_end)``, walking time backwards.

    Same grid as the forward kernel. Per step t: ``dh_t = grad_h[t] + dh_carry +
    dgates_h[t_before] @ W_hh``, then the gate gradients; the carry becomes ``z * dh_t``.

    Reads ``grad_h (T, B, H)`` (gradient of the output sequence, final-state gradient folded in),
    the saved ``gates (T, B, 4H)`` and ``h (T+1, B, H)``, ``W_hh``, ``lengths``. Writes
    ``dgates_x (T, B, 3H)`` (gradient of ``gates_x``) and ``dgates_h (T, B, 3H)`` (gradient of
    ``h W_hh^T + b_hh``; its n part carries the extra factor r). ``dh_carry (B, H)`` comes in
    as zeros and leaves as the part of dL/dh_0 not passing through ``W_hh``.
    """
    batch_rows, row_mask, tile_start, tile_stride = program_tiles(B, BLOCK_B, BLOCK_H)
    arrivals = 0
    for step in range(step_begin, step_end):
        t, x_rows, prev_rows, _ = step_rows(step, T, B, reverse, 1, batch_rows)
        t_before = t + 1 - 2 * reverse
        for h_start in range(tile_start, H, tile_stride):
            units = h_start + tl.arange(0, BLOCK_H)
            unit_mask = units < H
            mask = row_mask[:, None] & unit_mask[None, :]
            dh = hidden_grad_tile(
                grad_h_ptr, dh_carry_ptr, dgates_h_ptr, w_hh_ptr, t, t_before, step,
                batch_rows, row_mask, units, unit_mask, B, H, 3 * H,
                BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
            )
            r = load_tile(gates_ptr, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
            z = load_tile(gates_ptr + H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
            n = load_tile(gates_ptr + 2 * H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
            hn = load_tile(gates_ptr + 3 * H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
            h_prev = load_tile(h_ptr, prev_rows, H, units, mask).to(ACC_DTYPE)
            dn = dh * (1.0 - z) * (1.0 - n * n)
            dr = dn * hn * r * (1.0 - r)
            dz = dh * (h_prev - n) * z * (1.0 - z)
            carry = dh * z
            if HAS_LENGTHS:
                active = (t < tl.load(lengths_ptr + batch_rows, mask=row_mask, other=0))[:, None]
                dn = tl.where(active, dn, 0.0)
                dr = tl.where(active, dr, 0.0)
                dz = tl.where(active, dz, 0.0)
                carry = tl.where(active, carry, dh)
            store_tile(dgates_x_ptr, x_rows, 3 * H, units, mask, dr)
            store_tile(dgates_x_ptr + H, x_rows, 3 * H, units, mask, dz)
            store_tile(dgates_x_ptr + 2 * H, x_rows, 3 * H, units, mask, dn)
            store_tile(dgates_h_ptr, x_rows, 3 * H, units, mask, dr)
            store_tile(dgates_h_ptr + H, x_rows, 3 * H, units, mask, dz)
            store_tile(dgates_h_ptr + 2 * H, x_rows, 3 * H, units, mask, dn * r)
            store_tile(dh_carry_ptr, batch_rows, H, units, mask, carry)
        # The next step reads dgates_h[t] from every tile.
        arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)


def _forward_outputs(gates_x, save_for_backward: bool):
    T, B, three_h = gates_x.shape
    H = three_h // 3
    dtype, device = gates_x.dtype, gates_x.device
    return (
        empty(T + 1, B, H, dtype=dtype, device=device),
        empty(T, B, 4 * H, dtype=dtype, device=device) if save_for_backward else empty(0, dtype=dtype, device=device),
    )


@torch.library.custom_op("fused_rnn::gru_forward", mutates_args=())
def gru_forward(
    gates_x: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
    reverse: bool, save_for_backward: bool,
) -> tuple[Tensor, Tensor]:
    """Run the GRU recurrence over ``gates_x (T, B, 3H)``.

    Returns ``(h, gates)``: the state buffer ``h (T+1, B, H)`` (see ``states_after``) and the
    ``(T, B, 4H)`` activations saved for the backward (empty when not needed).
    """
    h, gates = _forward_outputs(gates_x, save_for_backward)
    T, B, H = h.shape[0] - 1, h.shape[1], h.shape[2]
    h[initial_slot(T, reverse)] = h0
    launch(
        gru_forward_kernel,
        (gates_x.contiguous(), w_hh.contiguous(), None if b_hh is None else b_hh.contiguous(), lengths,
         h, gates if save_for_backward else None, T, B, H, int(reverse)),
        T, B, H, reduction=H, has_projection=False,
    )
    return h, gates


@gru_forward.register_fake
def _(gates_x, w_hh, b_hh, h0, lengths, reverse, save_for_backward):
    return _forward_outputs(gates_x, save_for_backward)


def _backward_outputs(grad_h):
    T, B, H = grad_h.shape
    dtype, device = grad_h.dtype, grad_h.device
    return (
        empty(T, B, 3 * H, dtype=dtype, device=device),
        empty(T, B, 3 * H, dtype=dtype, device=device),
    )


@torch.library.custom_op("fused_rnn::gru_backward", mutates_args=())
def gru_backward(
    grad_h: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool, gates: Tensor, h: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT through the GRU recurrence.

    ``grad_h (T, B, H)`` is the gradient of the output sequence with dL/dh_n folded into its last
    step. Returns ``(dgates_x, dgates_h, dh_carry)``, see ``gru_backward_kernel``.
    """
    dgates_x, dgates_h = _backward_outputs(grad_h)
    T, B, H = grad_h.shape
    dh_carry = torch.zeros(B, H, dtype=accumulator_dtype(grad_h.dtype), device=grad_h.device)
    launch(
        gru_backward_kernel,
        (grad_h.contiguous(), w_hh.contiguous(), lengths, gates, h, dgates_x, dgates_h, dh_carry,
         T, B, H, int(reverse)),
        T, B, H, reduction=H, has_projection=False,
    )
    return dgates_x, dgates_h, dh_carry


@gru_backward.register_fake
def _(grad_h, w_hh, lengths, reverse, gates, h):
    B, H = grad_h.shape[1], grad_h.shape[2]
    return (*_backward_outputs(grad_h), grad_h.new_empty(B, H, dtype=accumulator_dtype(grad_h.dtype)))
