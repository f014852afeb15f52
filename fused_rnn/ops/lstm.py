"""LSTM recurrence: Triton kernels for the forward and backward (BPTT) time loops, and launchers.

The input projection ``x W_ih^T + b_ih + b_hh`` arrives precomputed as ``gates_x`` (one GEMM over
all timesteps); these kernels do only the sequential part. Per step and per tile of hidden units:

    gates = gates_x[t] + h_{t-1} W_hh^T          i, f, o = sigmoid(.), g = tanh(.)   (order i, f, g, o)
    c_t = f * c_{t-1} + i * g                    h_t = o * tanh(c_t)   [then h_t = h_t W_hr^T with proj_size]

Shapes: ``T`` steps, ``B`` batch, ``H`` hidden units, ``P`` features of h (``proj_size`` or ``H``).
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
    matmul_tile,
    recurrent_gate,
    step_rows,
    store_tile,
    sync_tiles,
    tanh,
)


@triton.jit
def _gate_preactivation(
    gates_x_ptr, w_hh_ptr, h_ptr, gate, x_rows, h_rows, row_mask, units, unit_mask, H, P,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """``gates_x[t][:, gate] + h_{t-1} @ W_hh[gate]^T`` for one tile."""
    mask = row_mask[:, None] & unit_mask[None, :]
    gate_x = load_tile(gates_x_ptr + gate * H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
    return gate_x + recurrent_gate(
        h_ptr, h_rows, row_mask, w_hh_ptr, gate, units, unit_mask, H, P,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
    )


@triton.jit
def _lstm_forward_tile(
    gates_x_ptr, w_hh_ptr, h_ptr, c_ptr, h_raw_ptr, gates_ptr,
    x_rows, prev_rows, out_rows, row_mask, active, h_start, H, P,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One step of the cell for a (batch, unit) tile: gates, c_t, and h_t (or o * tanh(c_t))."""
    units = h_start + tl.arange(0, BLOCK_H)
    unit_mask = units < H
    mask = row_mask[:, None] & unit_mask[None, :]
    i = tl.sigmoid(_gate_preactivation(
        gates_x_ptr, w_hh_ptr, h_ptr, 0, x_rows, prev_rows, row_mask, units, unit_mask, H, P,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST))
    f = tl.sigmoid(_gate_preactivation(
        gates_x_ptr, w_hh_ptr, h_ptr, 1, x_rows, prev_rows, row_mask, units, unit_mask, H, P,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST))
    g = tanh(_gate_preactivation(
        gates_x_ptr, w_hh_ptr, h_ptr, 2, x_rows, prev_rows, row_mask, units, unit_mask, H, P,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST))
    o = tl.sigmoid(_gate_preactivation(
        gates_x_ptr, w_hh_ptr, h_ptr, 3, x_rows, prev_rows, row_mask, units, unit_mask, H, P,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST))
    c_prev = load_tile(c_ptr, prev_rows, H, units, mask)
    c = f * c_prev + i * g
    h = o * tanh(c)
    if HAS_LENGTHS:
        # Past a sequence's end the state passes through unchanged.
        c = tl.where(active[:, None], c, c_prev)
    store_tile(c_ptr, out_rows, H, units, mask, c)
    if HAS_PROJ:
        store_tile(h_raw_ptr, x_rows, H, units, mask, h)
    else:
        if HAS_LENGTHS:
            h = tl.where(active[:, None], h, load_tile(h_ptr, prev_rows, P, units, mask))
        store_tile(h_ptr, out_rows, P, units, mask, h)
    if SAVE_GATES:
        store_tile(gates_ptr, x_rows, 4 * H, units, mask, i)
        store_tile(gates_ptr + H, x_rows, 4 * H, units, mask, f)
        store_tile(gates_ptr + 2 * H, x_rows, 4 * H, units, mask, g)
        store_tile(gates_ptr + 3 * H, x_rows, 4 * H, units, mask, o)


@triton.jit
def _projection_tile(
    h_raw_ptr, w_hr_ptr, h_ptr, x_rows, prev_rows, out_rows, row_mask, active, p_start, H, P,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """``h_t = (o * tanh(c_t)) @ W_hr^T`` for a tile of the P output features."""
    cols = p_start + tl.arange(0, BLOCK_H)
    col_mask = cols < P
    mask = row_mask[:, None] & col_mask[None, :]
    h = matmul_tile(
        h_raw_ptr, x_rows, row_mask, H, w_hr_ptr, H, 1, cols, col_mask, H,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
    )
    if HAS_LENGTHS:
        h = tl.where(active[:, None], h, load_tile(h_ptr, prev_rows, P, cols, mask))
    store_tile(h_ptr, out_rows, P, cols, mask, h)


@triton.heuristics({
    "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
    "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
    "SAVE_GATES": lambda args: args["gates_ptr"] is not None,
    "GRID_SYNC": lambda args: args["barrier_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def lstm_forward_kernel(
    gates_x_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr, h_ptr, c_ptr, h_raw_ptr, gates_ptr,
    T, B, H, P, reverse, barrier_ptr, step_begin, step_end,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE_GATES: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """LSTM forward over the steps ``[step_begin, step_end)``.

    Grid ``(cdiv(B, BLOCK_B), n)``: program ``(b, j)`` owns batch rows ``b * BLOCK_B + [0, BLOCK_B)``
    and the hidden tiles ``j, j + n, ...``; the ``n`` programs of a batch tile meet at
    ``sync_tiles`` after each step (and, with proj, before the projection).

    Reads ``gates_x (T, B, 4H)``, ``W_hh (4H, P)``, ``W_hr (P, H)`` [proj], ``lengths (B,)``
    [optional]. The state buffers ``h (T+1, B, P)`` and ``c (T+1, B, H)`` hold the initial state
    in slot 0 (slot T in reverse); step t reads slot ``t + reverse`` and writes ``t + 1 - reverse``.
    Writes ``h_raw = o * tanh(c) (T, B, H)`` [proj] and ``gates = (i, f, g, o) (T, B, 4H)``
    [when saving for backward].
    """
    batch_rows, row_mask, tile_start, tile_stride = program_tiles(B, BLOCK_B, BLOCK_H)
    active = row_mask
    arrivals = 0
    for step in range(step_begin, step_end):
        t, x_rows, prev_rows, out_rows = step_rows(step, T, B, reverse, 0, batch_rows)
        if HAS_LENGTHS:
            active = row_mask & (t < tl.load(lengths_ptr + batch_rows, mask=row_mask, other=0))
        for h_start in range(tile_start, H, tile_stride):
            _lstm_forward_tile(
                gates_x_ptr, w_hh_ptr, h_ptr, c_ptr, h_raw_ptr, gates_ptr,
                x_rows, prev_rows, out_rows, row_mask, active, h_start, H, P,
                HAS_PROJ, HAS_LENGTHS, SAVE_GATES,
                BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
            )
        if HAS_PROJ:
            # The projection needs every unit of o * tanh(c_t): wait for all tiles.
            arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)
            for p_start in range(tile_start, P, tile_stride):
                _projection_tile(
                    h_raw_ptr, w_hr_ptr, h_ptr, x_rows, prev_rows, out_rows, row_mask, active,
                    p_start, H, P, HAS_LENGTHS,
                    BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
                )
        # The next step reads h_t from every tile.
        arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)


@triton.jit
def _lstm_backward_tile(
    dh, dgates_ptr, dc_carry_ptr, gates_ptr, c_ptr,
    x_rows, prev_rows, out_rows, batch_rows, row_mask, active, units, unit_mask, H,
    HAS_LENGTHS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Gate gradients of one step for a tile, given ``dh`` = dL/d(o * tanh(c_t)).

    Updates the cell-state carry ``dc`` (dL/dc_t on entry, dL/dc_{t-1} on exit).
    """
    mask = row_mask[:, None] & unit_mask[None, :]
    i = load_tile(gates_ptr, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
    f = load_tile(gates_ptr + H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
    g = load_tile(gates_ptr + 2 * H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
    o = load_tile(gates_ptr + 3 * H, x_rows, 4 * H, units, mask).to(ACC_DTYPE)
    c = load_tile(c_ptr, out_rows, H, units, mask)
    c_prev = load_tile(c_ptr, prev_rows, H, units, mask)
    dc_carry = load_tile(dc_carry_ptr, batch_rows, H, units, mask)
    tanh_c = tanh(c)
    dc = dc_carry + dh * o * (1.0 - tanh_c * tanh_c)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dh * tanh_c * o * (1.0 - o)
    dc_prev = dc * f
    if HAS_LENGTHS:
        keep = active[:, None]
        di = tl.where(keep, di, 0.0)
        df = tl.where(keep, df, 0.0)
        dg = tl.where(keep, dg, 0.0)
        do = tl.where(keep, do, 0.0)
        dc_prev = tl.where(keep, dc_prev, dc_carry)
    store_tile(dgates_ptr, x_rows, 4 * H, units, mask, di)
    store_tile(dgates_ptr + H, x_rows, 4 * H, units, mask, df)
    store_tile(dgates_ptr + 2 * H, x_rows, 4 * H, units, mask, dg)
    store_tile(dgates_ptr + 3 * H, x_rows, 4 * H, units, mask, do)
    store_tile(dc_carry_ptr, batch_rows, H, units, mask, dc_prev)


@triton.heuristics({
    "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
    "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
    "GRID_SYNC": lambda args: args["barrier_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def lstm_backward_kernel(
    grad_h_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr, gates_ptr, c_ptr,
    dgates_ptr, grad_h_proj_ptr, dh_carry_ptr, dc_carry_ptr,
    T, B, H, P, reverse, barrier_ptr, step_begin, step_end,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, GRID_SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """LSTM backward (BPTT) over the steps ``[step_begin, step_end)``, walking time backwards.

    Same grid as the forward kernel. Per step t: ``dh_t = grad_h[t] + dh_carry +
    dgates[t_before] @ W_hh``, then [proj] ``dh_raw = dh_t @ W_hr``, then the gate gradients.

    Reads ``grad_h (T, B, P)`` (gradient of the output sequence, final-state gradient folded in),
    the saved ``gates (T, B, 4H)`` and ``c (T+1, B, H)``, ``W_hh``, ``W_hr`` [proj], ``lengths``.
    Writes ``dgates (T, B, 4H)`` (= gradient of ``gates_x``) and ``grad_h_proj (T, B, P)`` [proj]:
    the gradient reaching the projection's output, for the W_hr gradient. The carries
    ``dh_carry (B, P)`` and ``dc_carry (B, H)`` come in as zeros and dL/dc_T and leave as the
    parts of dL/dh_0 and dL/dc_0 not passing through W_hh.
    """
    batch_rows, row_mask, tile_start, tile_stride = program_tiles(B, BLOCK_B, BLOCK_H)
    active = row_mask
    arrivals = 0
    for step in range(step_begin, step_end):
        t, x_rows, prev_rows, out_rows = step_rows(step, T, B, reverse, 1, batch_rows)
        t_before = t + 1 - 2 * reverse
        if HAS_LENGTHS:
            active = row_mask & (t < tl.load(lengths_ptr + batch_rows, mask=row_mask, other=0))
        if HAS_PROJ:
            for p_start in range(tile_start, P, tile_stride):
                cols = p_start + tl.arange(0, BLOCK_H)
                col_mask = cols < P
                mask = row_mask[:, None] & col_mask[None, :]
                dh = hidden_grad_tile(
                    grad_h_ptr, dh_carry_ptr, dgates_ptr, w_hh_ptr, t, t_before, step,
                    batch_rows, row_mask, cols, col_mask, B, P, 4 * H,
                    BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
                )
                if HAS_LENGTHS:
                    # Past a sequence's end h_t is h_{t-1}: dh bypasses the projection.
                    store_tile(dh_carry_ptr, batch_rows, P, cols, mask, tl.where(active[:, None], 0.0, dh))
                    dh = tl.where(active[:, None], dh, 0.0)
                store_tile(grad_h_proj_ptr, x_rows, P, cols, mask, dh)
            # dh_raw needs every feature of dh_t: wait for all tiles.
            arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)
        for h_start in range(tile_start, H, tile_stride):
            units = h_start + tl.arange(0, BLOCK_H)
            unit_mask = units < H
            if HAS_PROJ:
                dh = matmul_tile(
                    grad_h_proj_ptr, x_rows, row_mask, P, w_hr_ptr, 1, H, units, unit_mask, P,
                    BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
                )
            else:
                dh = hidden_grad_tile(
                    grad_h_ptr, dh_carry_ptr, dgates_ptr, w_hh_ptr, t, t_before, step,
                    batch_rows, row_mask, units, unit_mask, B, P, 4 * H,
                    BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
                )
                if HAS_LENGTHS:
                    mask = row_mask[:, None] & unit_mask[None, :]
                    store_tile(dh_carry_ptr, batch_rows, P, units, mask, tl.where(active[:, None], 0.0, dh))
            _lstm_backward_tile(
                dh, dgates_ptr, dc_carry_ptr, gates_ptr, c_ptr,
                x_rows, prev_rows, out_rows, batch_rows, row_mask, active, units, unit_mask, H,
                HAS_LENGTHS, ACC_DTYPE,
            )
        # The next step reads dgates[t] from every tile.
        arrivals = sync_tiles(barrier_ptr, arrivals, GRID_SYNC)


def _forward_outputs(gates_x, w_hh, has_proj: bool, save_for_backward: bool):
    T, B, four_h = gates_x.shape
    H, P = four_h // 4, w_hh.shape[1]
    dtype, device = gates_x.dtype, gates_x.device
    return (
        empty(T + 1, B, P, dtype=dtype, device=device),
        empty(T + 1, B, H, dtype=accumulator_dtype(dtype), device=device),
        empty(T, B, H, dtype=dtype, device=device) if has_proj else empty(0, dtype=dtype, device=device),
        empty(T, B, 4 * H, dtype=dtype, device=device) if save_for_backward else empty(0, dtype=dtype, device=device),
    )


@torch.library.custom_op("fused_rnn::lstm_forward", mutates_args=())
def lstm_forward(
    gates_x: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
    lengths: Optional[Tensor], reverse: bool, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the LSTM recurrence over ``gates_x (T, B, 4H)``.

    Returns ``(h, c, h_raw, gates)``: the state buffers ``h (T+1, B, P)`` and ``c (T+1, B, H)``
    (see ``states_after``), and - for the backward - ``h_raw (T, B, H)`` [proj] and
    ``gates (T, B, 4H)``; each of the last two is empty when not needed.
    """
    has_proj = w_hr is not None
    h, c, h_raw, gates = _forward_outputs(gates_x, w_hh, has_proj, save_for_backward)
    T, B, P = gates_x.shape[0], gates_x.shape[1], w_hh.shape[1]
    H = c.shape[2]
    h[initial_slot(T, reverse)] = h0
    c[initial_slot(T, reverse)] = c0
    launch(
        lstm_forward_kernel,
        (gates_x.contiguous(), w_hh.contiguous(), w_hr.contiguous() if has_proj else None, lengths,
         h, c, h_raw if has_proj else None, gates if save_for_backward else None,
         T, B, H, P, int(reverse)),
        T, B, H, reduction=max(H, P), has_projection=has_proj,
    )
    return h, c, h_raw, gates


@lstm_forward.register_fake
def _(gates_x, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward):
    return _forward_outputs(gates_x, w_hh, w_hr is not None, save_for_backward)


def _backward_outputs(grad_h, gates, has_proj: bool):
    T, B, P = grad_h.shape
    H = gates.shape[2] // 4
    dtype, device = grad_h.dtype, grad_h.device
    return (
        empty(T, B, 4 * H, dtype=dtype, device=device),
        empty(T, B, P, dtype=dtype, device=device) if has_proj else empty(0, dtype=dtype, device=device),
    )


@torch.library.custom_op("fused_rnn::lstm_backward", mutates_args=())
def lstm_backward(
    grad_h: Tensor, grad_c_n: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
    reverse: bool, gates: Tensor, c: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BPTT through the LSTM recurrence.

    ``grad_h (T, B, P)`` is the gradient of the output sequence (with dL/dh_n folded into its last
    step), ``grad_c_n (B, H)`` that of the final cell state. Returns ``(dgates, grad_h_proj,
    dh_carry, dc0)``: ``dgates (T, B, 4H)``, ``grad_h_proj (T, B, P)`` [proj, else empty],
    and the parts of dL/dh_0 and dL/dc_0 that do not pass through ``W_hh``.
    """
    has_proj = w_hr is not None
    dgates, grad_h_proj = _backward_outputs(grad_h, gates, has_proj)
    T, B, P = grad_h.shape
    H = gates.shape[2] // 4
    acc = accumulator_dtype(grad_h.dtype)
    dh_carry = torch.zeros(B, P, dtype=acc, device=grad_h.device)
    dc_carry = grad_c_n.to(dtype=acc, memory_format=torch.contiguous_format, copy=True)
    launch(
        lstm_backward_kernel,
        (grad_h.contiguous(), w_hh.contiguous(), w_hr.contiguous() if has_proj else None, lengths,
         gates, c, dgates, grad_h_proj if has_proj else None, dh_carry, dc_carry, T, B, H, P, int(reverse)),
        T, B, H, reduction=max(H, P), has_projection=has_proj,
    )
    return dgates, grad_h_proj, dh_carry, dc_carry


@lstm_backward.register_fake
def _(grad_h, grad_c_n, w_hh, w_hr, lengths, reverse, gates, c):
    B, P = grad_h.shape[1], grad_h.shape[2]
    acc = accumulator_dtype(grad_h.dtype)
    return (
        *_backward_outputs(grad_h, gates, w_hr is not None),
        grad_h.new_empty(B, P, dtype=acc),
        grad_c_n.new_empty(grad_c_n.shape, dtype=acc),
    )
