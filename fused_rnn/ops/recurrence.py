"""The time loop every cell shares: tiling, resident weights, the recurrent matmuls, the barrier.

One launch runs one layer, both directions at once (grid axis 2). A program owns a block of
``BLOCK_U`` hidden units with all their gates: the rows ``g * H + u`` of ``W_hh`` for its units
``u`` form one gate-major operand of ``GATE_SLOTS * BLOCK_U`` rows, so a single ``tl.dot`` per
step gives every gate of the block, ``gates^T = W_block @ h_{t-1}^T``. Tiles are
``(features, batch)``: the units run down the rows, the ``BLOCK_B`` batch rows across.

With ``RESIDENT`` the program loads its block of ``W_hh`` once, before the time loop, and it stays
on chip (shared memory) for the whole launch: per step only ``h_{t-1}``, ``gates_x`` and the
states move. Without it (weights too large for the chip) the block streams through in ``BLOCK_K``
chunks every step. ``RESIDENT_PROJ`` does the same for the LSTM projection's ``W_hr``. The
launcher chooses (``launch.plan``).

Backward: program ``j`` gathers all of the previous step's gate gradients and multiplies them by
its block's columns of ``W_hh`` (``GATHER``: the transposed block, resident the same way), or,
where that block does not fit on an SM, where the weights stream, and where ``H`` (with a
projection also ``P``) is no multiple of 8 (``launch.rows_in_vectors``), turns the gate
gradients of its units into its part of ``dL/dh_{t-1}`` over every feature, ``partial_j =
dgates_j @ W_block_j``, and writes it to a workspace that the owner of each feature sums after the
barrier (``reduce_partials``).

The cell's own math (gate nonlinearities, states, what it saves) comes in as a ``@triton.jit``
function (``CELL_FORWARD``, ``CELL_BACKWARD``, and ``CELL_BACKWARD_INPUTS``, what the backward step
reads of its own) from ``ops/lstm.py``, ``gru.py`` and ``rnn.py``.

Buffers, for ``T`` steps, batch ``B``, ``D`` directions, ``H`` units, ``P`` features of ``h``:
``h (T+2, B, D, P)`` holds the forward direction's ``h_0`` in slot 0, the reverse direction's in
slot ``T+1``, and the state after timestep ``t`` in slot ``t+1`` (both directions): so slots
``1..T`` are the layer's output, already in ``[forward, reverse]`` feature order. The LSTM's ``c``
has the same layout. ``gates_x (T, B, D, G*H)`` is the input projection (``G`` gates a unit),
``saved (T, B, D, S*H)`` what the cell saves for the backward (``S`` activations a unit).
Per-sequence tensors (``h_mask``, carries, ``dh0``) are ``(B, D, .)``.

``python -m bench.kernels`` tells ``W_hr``'s loads from ``W_hh``'s by the source lines of the
calls that take ``W_hr``'s block (``kernels.weight_loads_in_time_loop``): keep those calls'
arguments starting a line with that block and its pointer.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from . import launch
from .launch import FROM_BARRIER, UP_TO_BARRIER, WHOLE_STEP, accumulator_dtype, sync_programs

# The kernels' ZONEOUT: off, in training with keep masks, in eval with its expectation.
ZONEOUT_OFF, ZONEOUT_MASKS, ZONEOUT_EXPECTATION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def aligned(size, ALIGNMENT: tl.constexpr):
    """``size``, a multiple of ``ALIGNMENT`` (``launch.alignment``), written as one: a launch marks
    only its integers that are multiples of 16, and from this the compiler knows that rows of
    ``size`` elements start on a multiple of ``ALIGNMENT`` and reads and writes them in vectors
    (H = 1000 in fp16: 16 bytes, not 2)."""
    if ALIGNMENT < 16:
        # The same value, written so that the compiler sees the multiple (of 16 a launch marks itself).
        size = size // ALIGNMENT * ALIGNMENT
    return size


@triton.jit
def step_bounds(T, step_begin, step_end, GRID_SYNC: tl.constexpr):
    """The steps a launch walks: all ``T`` in a persistent launch (``GRID_SYNC``), else ``[step_begin,
    step_end)``. Bounded by ``0`` and the argument ``T``, the time loop compares against ``T`` where
    the launch left it; ``step_end - step_begin`` took a register, which Triton 3.6 spilled in the
    gathering backward at B = 5 and loaded again every step, after the barrier's poll had
    invalidated L1 (``python -m bench.kernels``)."""
    first_step, last_step = step_begin, step_end
    if GRID_SYNC:
        first_step, last_step = 0, T
    return first_step, last_step


@triton.jit
def buffer_rows(slot, batch_rows, B, D, direction):
    """Rows of ``(slot, batch_rows, direction)`` in a ``(., B, D, F)`` buffer (int64: row offsets
    pass 2**31 long before the element count of any one tensor is a problem)."""
    return (tl.cast(slot, tl.int64) * B + batch_rows) * D + direction


@triton.jit
def load_tile(ptr, rows, row_length, features, mask):
    """``ptr[rows, features]`` of a row-major matrix as a ``(features, rows)`` tile; 0 where masked."""
    return tl.load(ptr + rows[None, :] * row_length + features[:, None], mask=mask, other=0.0)


@triton.jit
def load_fresh_tile(ptr, rows, row_length, features, mask):
    """``load_tile`` of data another program wrote during this launch: read from L2 (``.cg``),
    which every SM sees, never from a line this SM's L1 may hold from an earlier step."""
    return tl.load(ptr + rows[None, :] * row_length + features[:, None], mask=mask, other=0.0,
                   cache_modifier=".cg")


@triton.jit
def store_tile(ptr, rows, row_length, features, mask, value):
    """``ptr[rows, features] = value`` for a ``(features, rows)`` tile, cast to the buffer's dtype."""
    tl.store(ptr + rows[None, :] * row_length + features[:, None], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def tanh(x):
    # triton.language has no tanh; this form is exact at the limits (+-1) and needs one exp.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def gate_offsets(first_unit, H, GATES_IN_ROW: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_U: tl.constexpr):
    """Offsets and mask of a gate-major ``(GATE_SLOTS * BLOCK_U, .)`` tile: slot ``g * BLOCK_U + j``
    is gate ``g`` of unit ``first_unit + j``, at offset ``g * H + unit``: the column of a buffer
    whose rows hold ``GATES_IN_ROW`` gates, or the row of a weight. Slots past the real gates or
    units are masked."""
    slots = tl.arange(0, GATE_SLOTS * BLOCK_U)
    gate = slots // BLOCK_U
    unit = first_unit + slots % BLOCK_U
    return gate * H + unit, (gate < GATES_IN_ROW) & (unit < H)


@triton.jit
def load_gates(ptr, rows, H, first_unit, row_mask,
               GATES_IN_ROW: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_U: tl.constexpr):
    """Every gate of the block's units at ``rows`` of a ``(., GATES_IN_ROW * H)`` buffer, as one
    gate-major ``(GATE_SLOTS * BLOCK_U, BLOCK_B)`` tile (see ``split_gates``)."""
    columns, column_mask = gate_offsets(first_unit, H, GATES_IN_ROW, GATE_SLOTS, BLOCK_U)
    return load_tile(ptr, rows, GATES_IN_ROW * H, columns, column_mask[:, None] & row_mask[None, :])


@triton.jit
def store_gates(ptr, rows, H, first_unit, row_mask, value,
                GATES_IN_ROW: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_U: tl.constexpr):
    """The inverse of ``load_gates``."""
    columns, column_mask = gate_offsets(first_unit, H, GATES_IN_ROW, GATE_SLOTS, BLOCK_U)
    store_tile(ptr, rows, GATES_IN_ROW * H, columns, column_mask[:, None] & row_mask[None, :], value)


@triton.jit
def split_gates(gates, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr):
    """A gate-major ``(4 * BLOCK_U, BLOCK_B)`` tile as four ``(BLOCK_U, BLOCK_B)`` tiles, in gate order."""
    # tl.split halves the last dimension: bring the gate index g = 2a + b there as (a, b).
    pairs = tl.permute(tl.reshape(gates, (2, 2, BLOCK_U, BLOCK_B)), (2, 3, 0, 1))
    even, odd = tl.split(pairs)
    gate_0, gate_2 = tl.split(even)
    gate_1, gate_3 = tl.split(odd)
    return gate_0, gate_1, gate_2, gate_3


@triton.jit
def join_gates(gate_0, gate_1, gate_2, gate_3):
    """The inverse of ``split_gates``."""
    BLOCK_U: tl.constexpr = gate_0.shape[0]
    BLOCK_B: tl.constexpr = gate_0.shape[1]
    pairs = tl.join(tl.join(gate_0, gate_2), tl.join(gate_1, gate_3))
    return tl.reshape(tl.permute(pairs, (2, 3, 0, 1)), (4 * BLOCK_U, BLOCK_B))


@triton.jit
def previous_state(ptr, prev_rows, init_rows, row_length, features, mask, reset, HAS_RESETS: tl.constexpr):
    """The state a step starts from, as a ``(features, batch)`` tile: the one the previous step
    wrote, or the initial state in the rows that reset here (one load, each row from its own)."""
    if HAS_RESETS:
        prev_rows = tl.where(reset, init_rows, prev_rows)
    return load_tile(ptr, prev_rows, row_length, features, mask)


@triton.jit
def zoneout(new, prev, keep_ptr, rows, row_length, features, mask, p, ZONEOUT: tl.constexpr):
    """Zoneout (Krueger et al.): in training (``ZONEOUT_MASKS``) each unit keeps its previous value
    where the keep mask says so; in eval it takes the expectation ``p * prev + (1 - p) * new``."""
    if ZONEOUT == ZONEOUT_MASKS:
        new = tl.where(load_tile(keep_ptr, rows, row_length, features, mask) != 0, prev, new)
    elif ZONEOUT == ZONEOUT_EXPECTATION:
        # prev in new's precision (fp32): Triton computes a 16-bit tile times the fp32 scalar p in
        # the tile's dtype (a scalar of the same kind does not promote), p rounded to it, and its
        # interpreter gets bf16's product wrong (by 1e31, or NaN).
        new = p * prev.to(new.dtype) + (1.0 - p) * new
    return new


@triton.jit
def route_to_initial(grad, initial_grad_ptr, state_rows, row_length, features, mask, reset,
                     HAS_RESETS: tl.constexpr):
    """``grad``, what flows back to the previous step's state, except in the rows that ``reset``
    here: the state they started from is the initial one, so their part is added to
    ``initial_grad`` (``dh0`` / ``dc0``) and zeroed in what is returned."""
    if HAS_RESETS:
        initial = load_tile(initial_grad_ptr, state_rows, row_length, features, mask)
        store_tile(initial_grad_ptr, state_rows, row_length, features, mask,
                   initial + tl.where(reset[None, :], grad, 0.0))
        grad = tl.where(reset[None, :], 0.0, grad)
    return grad


@triton.jit
def zoneout_grad(grad, keep_ptr, rows, row_length, features, mask, p, ZONEOUT: tl.constexpr):
    """The backward of ``zoneout``: ``grad`` split into the parts reaching ``new`` and ``prev``."""
    to_prev = tl.zeros_like(grad)
    if ZONEOUT == ZONEOUT_MASKS:
        keep = load_tile(keep_ptr, rows, row_length, features, mask) != 0
        to_prev = tl.where(keep, grad, 0.0)
        grad = tl.where(keep, 0.0, grad)
    elif ZONEOUT == ZONEOUT_EXPECTATION:
        to_prev = p * grad
        grad = (1.0 - p) * grad
    return grad, to_prev


@triton.jit
def matmul(a, b, accumulator, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``accumulator + a @ b``: a ``tl.dot`` (``DOT_PRECISION`` "tf32" or "ieee"; the tensor cores
    but for exact fp32, which runs on the FMA units), or for fp64 a product reduced in registers."""
    if accumulator.dtype == tl.float64:
        # fp64 multiplies and reduces in registers: Triton 3.6 (the GPU machines') cannot lower most
        # fp64 dots ("fp64 don't support largeK MMA"). The launcher keeps fp64 blocks small for it.
        accumulator += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        if DOT_UPCAST:
            # The interpreter's fp16/bf16 tl.dot is wrong (triton-lang/triton#11584); fp32 operands
            # give the exact products that tensor cores accumulate in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        accumulator = tl.dot(a, b, accumulator, input_precision=DOT_PRECISION)
    return accumulator


@triton.jit
def weight_block(w_ptr, first, N, K, ks, NUM_GATES: tl.constexpr, GATE_SLOTS: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Columns ``ks`` of this program's block of a weight, the operand of ``recurrent_matmul``.

    Forward (not ``TRANSPOSED``): the rows of a ``(NUM_GATES * N, K)`` weight that belong to the
    block's ``BLOCK_ROWS`` units from ``first``, gate-major: ``(GATE_SLOTS * BLOCK_ROWS, columns)``.
    ``TRANSPOSED`` (the backward): the block's columns ``first, ...`` of a ``(K, N)`` weight, as
    the rows of its transpose: ``(BLOCK_ROWS, columns)``. Zero past the real gates, rows and K.
    ``ks`` of shape ``(columns,)`` gives that tile; of shape ``(pieces, 1, columns)``, a stack of
    such tiles, one per piece (``group_columns``)."""
    if TRANSPOSED:
        columns = first + tl.arange(0, BLOCK_ROWS)
        mask = (columns < N)[:, None] & (ks < K)
        return tl.load(w_ptr + ks.to(tl.int64) * N + columns[:, None], mask=mask, other=0.0)
    rows, row_mask = gate_offsets(first, N, NUM_GATES, GATE_SLOTS, BLOCK_ROWS)
    mask = row_mask[:, None] & (ks < K)
    return tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + ks, mask=mask, other=0.0)


@triton.jit
def group_columns(first_piece, GROUP_PIECES: tl.constexpr, BLOCK_K: tl.constexpr, DOWN: tl.constexpr):
    """The columns of ``GROUP_PIECES`` pieces of ``BLOCK_K`` from ``first_piece``, along a weight
    tile's last axis: a vector for one piece, else ``(GROUP_PIECES, 1, BLOCK_K)``, a piece per
    leading index; ``DOWN`` an operand tile's rows: ``(BLOCK_K, 1)`` or ``(GROUP_PIECES, BLOCK_K, 1)``.
    Built along the axis they run on, never reshaped there: through a reshape Triton 3.6 loses
    that the columns are contiguous and loads the operand one element at a time."""
    columns = tl.arange(0, BLOCK_K)
    if DOWN:
        columns = columns[:, None]
    if GROUP_PIECES == 1:
        columns = first_piece * BLOCK_K + columns
    else:
        pieces = first_piece + tl.arange(0, GROUP_PIECES)
        columns = pieces[:, None, None] * BLOCK_K + columns[None, :]
    return columns


@triton.jit
def resident_block(w_ptr, first, N, K, NUM_GATES: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_PIECES: tl.constexpr, GROUP_PIECES: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
    """This program's whole block of a weight (``weight_block``), loaded once before the time loop
    to stay on chip for the whole launch: ``NUM_PIECES`` column pieces of ``BLOCK_K``
    (``launch.pieces``), so that ``K`` need not be padded to one power of two, as a tuple of
    groups of ``GROUP_PIECES`` pieces (``group_columns``), each a stack for one batched ``tl.dot``
    where there are several (``recurrent_matmul`` says why)."""
    pieces = ()
    for group in tl.static_range(NUM_PIECES // GROUP_PIECES):
        ks = group_columns(group * GROUP_PIECES, GROUP_PIECES, BLOCK_K, DOWN=False)
        pieces = pieces + (weight_block(w_ptr, first, N, K, ks, NUM_GATES, GATE_SLOTS, BLOCK_ROWS, TRANSPOSED),)
    return pieces


@triton.jit
def load_operand(x_ptr, x_rows, K, row_mask, BLOCK_K: tl.constexpr, NUM_PIECES: tl.constexpr,
                 GROUP_PIECES: tl.constexpr, RESIDENT: tl.constexpr, WAVE: tl.constexpr = 0,
                 OPERAND_WAVES: tl.constexpr = 1):
    """The operand ``x = x_ptr[x_rows, :K]`` of a resident block's ``recurrent_matmul``, which
    other programs wrote in the previous step (hence ``.cg``), in the block's groups of pieces,
    transposed: ``(BLOCK_K, batch)`` tiles, or ``(GROUP_PIECES, BLOCK_K, batch)`` stacks. The
    groups come in ``OPERAND_WAVES`` waves of as many as they divide into (the last may be
    smaller); this loads wave ``WAVE``. Every one of a wave is issued before its first product,
    so their L2 round trips overlap: one per wave and step, not one per piece. A streamed block
    loads its operand chunk by chunk instead (nothing here)."""
    NUM_GROUPS: tl.constexpr = NUM_PIECES // GROUP_PIECES
    WAVE_GROUPS: tl.constexpr = (NUM_GROUPS + OPERAND_WAVES - 1) // OPERAND_WAVES
    FIRST_GROUP: tl.constexpr = WAVE * WAVE_GROUPS
    END_GROUP: tl.constexpr = FIRST_GROUP + WAVE_GROUPS if FIRST_GROUP + WAVE_GROUPS < NUM_GROUPS else NUM_GROUPS
    pieces = ()
    if RESIDENT:
        for group in tl.static_range(FIRST_GROUP, END_GROUP):
            # The block's columns, turned to run down the operand's rows.
            ks = group_columns(group * GROUP_PIECES, GROUP_PIECES, BLOCK_K, DOWN=True)
            pieces = pieces + (tl.load(x_ptr + x_rows * K + ks, mask=(ks < K) & row_mask, other=0.0,
                                       cache_modifier=".cg"),)
    return pieces


@triton.jit
def group_matmul(a, b, accumulator, GROUP_PIECES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DOT_UPCAST: tl.constexpr):
    """``accumulator + a @ b`` for one piece, or for a group the sum over its pieces of their
    products, one batched ``tl.dot``."""
    if GROUP_PIECES == 1:
        accumulator = matmul(a, b, accumulator, DOT_PRECISION, DOT_UPCAST)
    else:
        parts = tl.zeros((GROUP_PIECES, accumulator.shape[0], accumulator.shape[1]), dtype=accumulator.dtype)
        accumulator += tl.sum(matmul(a, b, parts, DOT_PRECISION, DOT_UPCAST), axis=0)
    return accumulator


@triton.jit
def recurrent_matmul(
    w, w_ptr, first, N, K, operand, x_ptr, x_rows, row_mask,
    NUM_GATES: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_PIECES: tl.constexpr, GROUP_PIECES: tl.constexpr, RESIDENT: tl.constexpr,
    TRANSPOSED: tl.constexpr, OPERAND_WAVES: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """``W_block @ x^T`` for ``x = x_ptr[x_rows, :K]``: ``(GATE_SLOTS * BLOCK_ROWS, BLOCK_B)``,
    see ``weight_block``.

    ``RESIDENT``: ``w`` is the whole block (``resident_block``) and ``operand`` the first of the
    ``OPERAND_WAVES`` waves of ``x``'s pieces (``load_operand``), or None to load it here; a caller
    loads it first to issue its own loads beside it (the cells' inputs, forward and backward). Each
    later wave is loaded after the products of the one before, in the registers it leaves (the
    LSTM's gathering backward at H = 1024: 128 KB of gate gradients a batch tile, in two waves of
    64). A ``tl.dot`` gives each warp a whole reduction over ``K``, one matrix instruction after
    another into the same accumulator; where the block has few rows, the 8 warps all do the same
    (the gathering backward's ``(16, 3072) @ (3072, 16)``: 192 dependent instructions on each warp).
    Groups of ``GROUP_PIECES`` pieces are batched dots instead, a piece per warp, and the pieces'
    products are summed: chains of ``BLOCK_K / 16``.
    Otherwise the block streams from ``w_ptr`` in ``BLOCK_K`` chunks, and ``x`` with it.
    """
    accumulator = tl.zeros((GATE_SLOTS * BLOCK_ROWS, BLOCK_B), dtype=ACC_DTYPE)
    if RESIDENT:
        NUM_GROUPS: tl.constexpr = NUM_PIECES // GROUP_PIECES
        WAVE_GROUPS: tl.constexpr = (NUM_GROUPS + OPERAND_WAVES - 1) // OPERAND_WAVES
        for group in tl.static_range(NUM_GROUPS):
            if group % WAVE_GROUPS == 0 and (group > 0 or operand is None):
                operand = load_operand(x_ptr, x_rows, K, row_mask, BLOCK_K, NUM_PIECES, GROUP_PIECES, RESIDENT,
                                       group // WAVE_GROUPS, OPERAND_WAVES)
            accumulator = group_matmul(w[group], operand[group % WAVE_GROUPS], accumulator, GROUP_PIECES,
                                       DOT_PRECISION, DOT_UPCAST)
    else:
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            x = load_fresh_tile(x_ptr, x_rows, K, ks, (ks < K)[:, None] & row_mask[None, :])
            w_chunk = weight_block(w_ptr, first, N, K, ks, NUM_GATES, GATE_SLOTS, BLOCK_ROWS, TRANSPOSED)
            accumulator = matmul(w_chunk, x, accumulator, DOT_PRECISION, DOT_UPCAST)
    return accumulator


@triton.jit
def store_recurrent_input(h, h_ptr, h_mask_ptr, recurrent_ptr, recurrent_rows, init_rows, state_rows, P, features,
                          mask, reset_next, HAS_RESETS: tl.constexpr, HAS_H_MASK: tl.constexpr):
    """Write what the next step multiplies by ``W_hh`` for these features: ``h_t``, or ``h_0`` in
    the rows that reset there, times the recurrent-dropout mask. Done once here, on the producer's
    small tile, so that the next step's matmul reads one plain operand whatever the options."""
    if HAS_RESETS:
        initial = load_tile(h_ptr, init_rows, P, features, mask & reset_next[None, :])
        h = tl.where(reset_next[None, :], initial, h)
    if HAS_H_MASK:
        h = h * load_tile(h_mask_ptr, state_rows, P, features, mask)
    store_tile(recurrent_ptr, recurrent_rows, P, features, mask, h)


@triton.jit
def store_hidden(h, h_ptr, zoneout_h_ptr, h_mask_ptr, recurrent_ptr, zoneout_p, x_rows, prev_rows, init_rows,
                 out_rows, state_rows, recurrent_rows, P, features, mask, active, reset, reset_next,
                 HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_H_MASK: tl.constexpr,
                 ZONEOUT: tl.constexpr):
    """Write ``h_t`` for these features, from the step's new value ``h``: zoneout keeps units of
    ``h_{t-1}``, past a sequence's end the state passes through unchanged; then, with resets or
    recurrent dropout, what the next step multiplies (``store_recurrent_input``)."""
    if ZONEOUT != ZONEOUT_OFF:
        h_prev = previous_state(h_ptr, prev_rows, init_rows, P, features, mask, reset, HAS_RESETS)
        h = zoneout(h, h_prev, zoneout_h_ptr, x_rows, P, features, mask, zoneout_p, ZONEOUT)
    if HAS_LENGTHS:
        h = tl.where(active[None, :], h, load_tile(h_ptr, prev_rows, P, features, mask))
    store_tile(h_ptr, out_rows, P, features, mask, h)
    if HAS_RESETS or HAS_H_MASK:
        store_recurrent_input(h, h_ptr, h_mask_ptr, recurrent_ptr, recurrent_rows, init_rows, state_rows, P,
                              features, mask, reset_next, HAS_RESETS, HAS_H_MASK)


@triton.jit
def write_partial(
    w, w_ptr, first, N, K, dgates, partial_ptr, partial_rows, row_length, row_mask, accumulate,
    NUM_GATES: tl.constexpr, GATE_SLOTS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_PIECES: tl.constexpr, RESIDENT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """This program's part of ``dL/dx`` for every feature of ``x``: ``W_block^T @ dgates``, written
    to ``partial[partial_rows, :K]``, or added to it (``accumulate``: a streaming program's later
    blocks; a resident program has one block, ``w``, in pieces: one piece's part in registers at
    a time). ``partial``'s rows are ``row_length`` long, ``K`` rounded up to a multiple of 16, and the
    stores of resident pieces fill them to there (zeros past ``K``, where the block is zero):
    their mask then changes only every 16 columns, so the compiler may vectorise them whatever
    ``K``. (A streamed block's chunks end at the first multiple of ``BLOCK_K`` from ``K``;
    readers mask past ``K``.)

    ``W_block`` is ``weight_block``'s (``BLOCK_ROWS`` units or features from ``first`` of ``N``).
    ``dgates (GATE_SLOTS * BLOCK_ROWS, BLOCK_B)`` is the gradient of ``W_block @ x^T``. It is rounded
    to the weight's dtype first, as a GEMM over stored gate gradients would see it.
    """
    dgates = dgates.to(w_ptr.dtype.element_ty)
    if RESIDENT:
        for piece in tl.static_range(NUM_PIECES):
            store_part(w[piece], dgates, piece * BLOCK_K + tl.arange(0, BLOCK_K), partial_ptr, partial_rows,
                       row_length, row_mask, False, BLOCK_B, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)
    else:
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            w_chunk = weight_block(w_ptr, first, N, K, ks, NUM_GATES, GATE_SLOTS, BLOCK_ROWS, TRANSPOSED=False)
            store_part(w_chunk, dgates, ks, partial_ptr, partial_rows, row_length, row_mask, accumulate,
                       BLOCK_B, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)


@triton.jit
def store_part(w_piece, dgates, ks, partial_ptr, partial_rows, row_length, row_mask, accumulate,
               BLOCK_B: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DOT_UPCAST: tl.constexpr):
    """``w_piece^T @ dgates`` for the columns ``ks`` of ``w_piece``, stored to ``partial[partial_rows,
    ks]`` or, with ``accumulate``, added to what is there (``write_partial``)."""
    mask = (ks < row_length)[:, None] & row_mask[None, :]
    part = matmul(tl.trans(w_piece), dgates, tl.zeros((ks.shape[0], BLOCK_B), dtype=ACC_DTYPE),
                  DOT_PRECISION, DOT_UPCAST)
    if accumulate:
        part += load_tile(partial_ptr, partial_rows, row_length, ks, mask)
    store_tile(partial_ptr, partial_rows, row_length, ks, mask, part)


@triton.jit
def reduce_partials(partial_ptr, first_part, num_parts, batch_rows, B, D, direction, row_length, features, mask,
                    BLOCK_F: tl.constexpr, BLOCK_B: tl.constexpr, REDUCE_CHUNK: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """``sum_j partial[first_part + j, batch_rows, direction, features]`` over the ``num_parts``
    programs' parts (rows ``row_length`` long), as a ``(BLOCK_F, BLOCK_B)`` tile. ``REDUCE_CHUNK``
    parts are loaded at once, so their L2 round trips overlap instead of queueing one behind the
    other."""
    total = tl.zeros((BLOCK_F, BLOCK_B), dtype=ACC_DTYPE)
    for chunk_start in range(0, num_parts, REDUCE_CHUNK):
        parts = chunk_start + tl.arange(0, REDUCE_CHUNK)
        rows = buffer_rows(first_part + parts[:, None], batch_rows[None, :], B, D, direction)
        pointers = partial_ptr + rows[:, None, :] * row_length + features[None, :, None]
        part_mask = (parts < num_parts)[:, None, None] & mask[None, :, :]
        total += tl.sum(tl.load(pointers, mask=part_mask, other=0.0, cache_modifier=".cg"), axis=0)
    return total


@triton.jit
def active_and_reset(t, T, batch_rows, row_mask, lengths_ptr, resets_ptr, B, direction,
                     HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr):
    """``(active, reset)`` of ``step_rows`` at timestep ``t``: the rows still inside their
    sequence, and those whose state goes back to the initial state before this step."""
    active = row_mask
    if HAS_LENGTHS:
        active = row_mask & (t < tl.load(lengths_ptr + batch_rows, mask=row_mask, other=0))
    reset = row_mask & False  # all false, in the tile's shape
    if HAS_RESETS:
        # Forwards a segment starts where resets[t] is set; walking backwards in time (the reverse
        # direction) a segment starts at the step before the next one's start.
        reset_step = t + direction
        flag = tl.load(resets_ptr + tl.cast(tl.minimum(reset_step, T - 1), tl.int64) * B + batch_rows,
                       mask=active, other=0)
        reset = active & (flag != 0) & (batch_rows * 0 + reset_step < T)  # the scalar test, as a tile
    return active, reset


@triton.jit
def step_rows(t, t_adjacent, T, first_row, lengths_ptr, resets_ptr, B, D, direction,
              HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, BLOCK_B: tl.constexpr):
    """What a batch tile touches at timestep ``t``.

    Returns the tile's batch rows and their mask; its rows in the ``(T, B, D, .)`` buffers
    (``x_rows``), in the state buffers the slot read (``prev_rows``: ``t``, or ``t + 2`` in
    reverse), the slot written (``out_rows``: ``t + 1``) and the initial state (``init_rows``);
    in the ``(B, D, .)`` buffers (``state_rows``); ``active``, the rows still inside their
    sequence; ``reset``, the rows whose state goes back to the initial state before this step;
    and those that reset at ``t_adjacent``, the step this one hands its state to (the forward's
    next, the backward's previous).
    """
    batch_rows = (first_row + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_mask = batch_rows < B
    active, reset = active_and_reset(t, T, batch_rows, row_mask, lengths_ptr, resets_ptr, B, direction,
                                     HAS_LENGTHS, HAS_RESETS)
    reset_adjacent = active_and_reset(t_adjacent, T, batch_rows, row_mask, lengths_ptr, resets_ptr, B, direction,
                                      HAS_LENGTHS, HAS_RESETS)[1]
    return (
        batch_rows, row_mask,
        buffer_rows(t, batch_rows, B, D, direction),
        buffer_rows(t + 2 * direction, batch_rows, B, D, direction),
        buffer_rows(t + 1, batch_rows, B, D, direction),
        buffer_rows(direction * (T + 1), batch_rows, B, D, direction),
        buffer_rows(0, batch_rows, B, D, direction),
        active, reset, reset_adjacent,
    )


# The options both kernels take, each a constexpr flag derived from what the launch passes (None:
# the option is off; zoneout: keep masks in training, its probability alone in eval).
OPTION_FLAGS = {
    "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
    "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
    "HAS_RESETS": lambda args: args["resets_ptr"] is not None,
    "HAS_H_MASK": lambda args: args["h_mask_ptr"] is not None,
    "ZONEOUT": lambda args: (ZONEOUT_MASKS if args["zoneout_h_ptr"] is not None
                             else ZONEOUT_EXPECTATION if args["zoneout_p"] > 0 else ZONEOUT_OFF).value,
    "GRID_SYNC": lambda args: args["barrier_ptr"] is not None,
}


@triton.heuristics({
    **OPTION_FLAGS,
    "HAS_HH_BIAS": lambda args: args["b_hh_ptr"] is not None,
    "HAS_CELL_STATE": lambda args: args["c_ptr"] is not None,
    "SAVE": lambda args: args["saved_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "step_begin", "step_end"])
def forward_kernel(
    gates_x_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, lengths_ptr, resets_ptr, h_mask_ptr, zoneout_h_ptr, zoneout_c_ptr,
    h_ptr, c_ptr, h_raw_ptr, saved_ptr, recurrent_ptr,
    T, B, H, P, zoneout_p, barrier_ptr, step_begin, step_end,
    CELL_FORWARD: tl.constexpr, NUM_GATES: tl.constexpr, GATE_SLOTS: tl.constexpr, HAS_HH_BIAS: tl.constexpr,
    HAS_CELL_STATE: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_H_MASK: tl.constexpr, ZONEOUT: tl.constexpr, SAVE: tl.constexpr, GRID_SYNC: tl.constexpr,
    RESIDENT: tl.constexpr, RESIDENT_PROJ: tl.constexpr,
    STEP_PHASE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PIECES: tl.constexpr, GROUP_PIECES: tl.constexpr, BLOCK_KP: tl.constexpr, NUM_PIECES_P: tl.constexpr,
    GROUP_PIECES_P: tl.constexpr, ALIGNMENT_H: tl.constexpr, ALIGNMENT_P: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Forward recurrence of a layer over its ``T`` steps (a stepwise launch: ``[step_begin,
    step_end)``, ``step_bounds``), both directions.

    Grid ``(n_b, n_u, D)``: program ``(i, j, d)`` runs direction ``d`` (1: reverse in time) for the
    batch tiles ``i, i + n_b, ...`` and the unit blocks ``j, j + n_u, ...`` (with ``RESIDENT``,
    exactly block ``j``). With ``proj_size`` it also owns the blocks of ``BLOCK_P`` features
    ``j, j + n_u, ...`` of ``h = h_raw @ W_hr^T``. The ``n_u`` programs of a ``(i, d)`` meet at
    ``sync_programs`` after each step and, with proj, between the cell and the projection; a
    stepwise launch runs one of those two phases (``STEP_PHASE``: ``UP_TO_BARRIER`` or
    ``FROM_BARRIER``; ``WHOLE_STEP`` otherwise).

    Reads ``gates_x (T, B, D, G*H)``, ``W_hh (D, G*H, P)``, ``b_hh (D, G*H)`` [GRU],
    ``W_hr (D, P, H)`` [proj], ``lengths (B,)``, ``resets (T, B)``, ``h_mask (B, D, P)``
    [recurrent dropout], the zoneout keep masks ``zoneout_h (T, B, D, P)`` and ``zoneout_c
    (T, B, D, H)`` [LSTM] in training (``zoneout_p`` in eval) and the initial states in
    ``h``/``c``. Writes ``h (T+2, B, D, P)``, ``c (T+2, B, D, H)`` [LSTM], ``h_raw (T, B, D,
    H)`` [proj] and what the cell saves for the backward into ``saved (T, B, D, S*H)``. With
    resets or recurrent dropout, the matmul's operand ``h_{t-1}`` (reset and masked) goes through
    ``recurrent (2, B, D, P)``, alternating slots by step parity (slot 0 holds the first step's,
    written by the launcher).
    """
    RECURRENT_COPY: tl.constexpr = HAS_RESETS or HAS_H_MASK
    H, P = aligned(H, ALIGNMENT_H), aligned(P, ALIGNMENT_P)
    direction = tl.program_id(2)
    D = tl.num_programs(2)
    w_hh_ptr += direction.to(tl.int64) * NUM_GATES * H * P
    first_unit = tl.program_id(1) * BLOCK_U
    first_feature = tl.program_id(1) * BLOCK_P
    if HAS_HH_BIAS:
        b_hh_ptr += direction * NUM_GATES * H
    if HAS_PROJ:
        w_hr_ptr += direction.to(tl.int64) * P * H
    # A stepwise launch of one phase (up to the barrier: the cell; from it: the projection) loads
    # only the block it uses.
    w_hh = 0.0
    w_hr = 0.0
    if RESIDENT and STEP_PHASE != FROM_BARRIER:
        w_hh = resident_block(w_hh_ptr, first_unit, H, P, NUM_GATES, GATE_SLOTS, BLOCK_U, BLOCK_K, NUM_PIECES,
                              GROUP_PIECES, TRANSPOSED=False)
    if RESIDENT_PROJ and STEP_PHASE != UP_TO_BARRIER:
        w_hr = resident_block(w_hr_ptr, first_feature, P, H, NUM_GATES=1, GATE_SLOTS=1, BLOCK_ROWS=BLOCK_P,
                              BLOCK_K=BLOCK_KP, NUM_PIECES=NUM_PIECES_P, GROUP_PIECES=GROUP_PIECES_P, TRANSPOSED=False)
    arrivals = 0
    first_step, last_step = step_bounds(T, step_begin, step_end, GRID_SYNC)
    for step in range(first_step, last_step):
        t = tl.where(direction == 0, step, T - 1 - step)
        t_next = t + 1 - 2 * direction
        # recurrent's slots: the one the previous step wrote, and the one this step writes.
        read_slot = step % 2
        write_slot = 1 - read_slot
        if STEP_PHASE != FROM_BARRIER:
            for first_row in range(tl.program_id(0) * BLOCK_B, B, tl.num_programs(0) * BLOCK_B):
                (batch_rows, row_mask, x_rows, prev_rows, out_rows, init_rows, state_rows, active, reset,
                 reset_next) = step_rows(t, t_next, T, first_row, lengths_ptr, resets_ptr, B, D, direction,
                                         HAS_LENGTHS, HAS_RESETS, BLOCK_B)
                if RECURRENT_COPY:
                    operand_ptr = recurrent_ptr
                    operand_rows = buffer_rows(read_slot, batch_rows, B, D, direction)
                else:
                    operand_ptr = h_ptr
                    operand_rows = prev_rows
                for block_start in range(first_unit, H, tl.num_programs(1) * BLOCK_U):
                    units = block_start + tl.arange(0, BLOCK_U)
                    mask = (units < H)[:, None] & row_mask[None, :]
                    operand = load_operand(operand_ptr, operand_rows, P, row_mask, BLOCK_K, NUM_PIECES, GROUP_PIECES,
                                           RESIDENT)
                    # What the cell reads of its own - gates_x and the state its units left, c_{t-1}
                    # (the LSTM) or h_{t-1} (the GRU; the RNN's step ignores it, and the compiler
                    # drops the load) - is loaded before the product, so that its L2 round trip
                    # overlaps the operand's rather than following it.
                    gates_x = load_gates(gates_x_ptr, x_rows, H, block_start, row_mask, NUM_GATES, GATE_SLOTS, BLOCK_U)
                    if HAS_CELL_STATE:
                        state = previous_state(c_ptr, prev_rows, init_rows, H, units, mask, reset, HAS_RESETS)
                    else:
                        state = previous_state(h_ptr, prev_rows, init_rows, P, units, mask, reset, HAS_RESETS)
                    gates_h = recurrent_matmul(
                        w_hh, w_hh_ptr, block_start, H, P, operand, operand_ptr, operand_rows, row_mask,
                        NUM_GATES, GATE_SLOTS, BLOCK_U, BLOCK_B, BLOCK_K, NUM_PIECES, GROUP_PIECES, RESIDENT,
                        TRANSPOSED=False, OPERAND_WAVES=1, ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=DOT_PRECISION,
                        DOT_UPCAST=DOT_UPCAST)
                    h = CELL_FORWARD(
                        gates_h, gates_x.to(ACC_DTYPE), state.to(ACC_DTYPE), b_hh_ptr, c_ptr, saved_ptr, zoneout_c_ptr,
                        zoneout_p, x_rows, out_rows, row_mask, active, block_start, H, HAS_HH_BIAS, HAS_LENGTHS,
                        ZONEOUT, SAVE, BLOCK_U, BLOCK_B, ACC_DTYPE)
                    if HAS_PROJ:
                        store_tile(h_raw_ptr, x_rows, H, units, mask, h)
                    else:
                        store_hidden(
                            h, h_ptr, zoneout_h_ptr, h_mask_ptr, recurrent_ptr, zoneout_p, x_rows, prev_rows,
                            init_rows, out_rows, state_rows, buffer_rows(write_slot, batch_rows, B, D, direction),
                            P, units, mask, active, reset, reset_next, HAS_LENGTHS, HAS_RESETS, HAS_H_MASK, ZONEOUT)
        if HAS_PROJ:
            if STEP_PHASE == WHOLE_STEP:
                # The projection needs every unit of o * tanh(c_t): wait for all programs.
                arrivals = sync_programs(barrier_ptr, arrivals, GRID_SYNC)
            if STEP_PHASE != UP_TO_BARRIER:
                for first_row in range(tl.program_id(0) * BLOCK_B, B, tl.num_programs(0) * BLOCK_B):
                    (batch_rows, row_mask, x_rows, prev_rows, out_rows, init_rows, state_rows, active, reset,
                     reset_next) = step_rows(t, t_next, T, first_row, lengths_ptr, resets_ptr, B, D, direction,
                                             HAS_LENGTHS, HAS_RESETS, BLOCK_B)
                    for block_start in range(first_feature, P, tl.num_programs(1) * BLOCK_P):
                        features = block_start + tl.arange(0, BLOCK_P)
                        mask = (features < P)[:, None] & row_mask[None, :]
                        h = recurrent_matmul(
                            w_hr, w_hr_ptr, block_start, P, H, None, h_raw_ptr, x_rows, row_mask, NUM_GATES=1,
                            GATE_SLOTS=1, BLOCK_ROWS=BLOCK_P, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_KP,
                            NUM_PIECES=NUM_PIECES_P, GROUP_PIECES=GROUP_PIECES_P, RESIDENT=RESIDENT_PROJ,
                            TRANSPOSED=False, OPERAND_WAVES=1, ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=DOT_PRECISION,
                            DOT_UPCAST=DOT_UPCAST)
                        store_hidden(
                            h, h_ptr, zoneout_h_ptr, h_mask_ptr, recurrent_ptr, zoneout_p, x_rows, prev_rows,
                            init_rows, out_rows, state_rows, buffer_rows(write_slot, batch_rows, B, D, direction),
                            P, features, mask, active, reset, reset_next, HAS_LENGTHS, HAS_RESETS, HAS_H_MASK, ZONEOUT)
        # The next step reads h_t from every program.
        arrivals = sync_programs(barrier_ptr, arrivals, GRID_SYNC)


@triton.jit
def hidden_grad(
    w_hh, w_hh_ptr, operand, grad_h_ptr, dh_carry_ptr, routed_dh0_recurrent_ptr, recurrent_grad_ptr, partial_ptr,
    h_mask_ptr, step, x_rows, before_rows, state_rows, batch_rows, row_mask, B, D, direction, H, P, partial_columns,
    first_feature, mask, reset_before,
    NUM_GATES: tl.constexpr, GATHER: tl.constexpr, HAS_RESETS: tl.constexpr, HAS_H_MASK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PIECES: tl.constexpr,
    GROUP_PIECES: tl.constexpr, OPERAND_WAVES: tl.constexpr, REDUCE_CHUNK: tl.constexpr, RESIDENT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """``dL/dh_t`` for the ``(BLOCK_F, batch)`` tile of features from ``first_feature``: the
    gradient of the output sequence, the carry (what reached ``h_t`` around ``W_hh``), and what the
    previous backward step sends through ``W_hh``. With ``GATHER`` that is its gate gradients, every
    program's (``recurrent_grad`` at ``before_rows``: ``operand``, the first of their
    ``OPERAND_WAVES`` waves, loaded by the caller, or None to load it here), times the block's
    columns of ``W_hh``; else the sum of the parts every program wrote (``reduce_partials``). Where
    that step reset, it belongs to ``h_0`` instead and goes to ``routed_dh0_recurrent``: a buffer
    of its own, not ``routed_dh0``, which the caller adds to later in the step, so that no tile is
    added to twice in a step, by threads of two layouts that nothing orders."""
    features = first_feature + tl.arange(0, BLOCK_F)
    dh = load_tile(grad_h_ptr, x_rows, P, features, mask).to(ACC_DTYPE)
    dh += load_tile(dh_carry_ptr, state_rows, P, features, mask)
    if step > 0:
        if GATHER:
            incoming = recurrent_matmul(
                w_hh, w_hh_ptr, first_feature, P, NUM_GATES * H, operand, recurrent_grad_ptr, before_rows, row_mask,
                NUM_GATES=1, GATE_SLOTS=1, BLOCK_ROWS=BLOCK_F, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, NUM_PIECES=NUM_PIECES,
                GROUP_PIECES=GROUP_PIECES, RESIDENT=RESIDENT, TRANSPOSED=True, OPERAND_WAVES=OPERAND_WAVES,
                ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=DOT_PRECISION, DOT_UPCAST=DOT_UPCAST)
        else:
            num_parts = tl.num_programs(1)
            incoming = reduce_partials(partial_ptr, (1 - step % 2) * num_parts, num_parts, batch_rows, B, D,
                                       direction, partial_columns, features, mask, BLOCK_F, BLOCK_B, REDUCE_CHUNK,
                                       ACC_DTYPE)
        if HAS_H_MASK:
            incoming *= load_tile(h_mask_ptr, state_rows, P, features, mask)
        dh += route_to_initial(incoming, routed_dh0_recurrent_ptr, state_rows, P, features, mask, reset_before,
                               HAS_RESETS)
    return dh


@triton.heuristics({
    **OPTION_FLAGS,
    "SEPARATE_HIDDEN_GRAD": lambda args: args["dgates_h_ptr"] is not None,
})
@triton.jit(do_not_specialize=["T", "step_begin", "step_end"])
def backward_kernel(
    grad_h_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr, resets_ptr, h_mask_ptr, zoneout_h_ptr, zoneout_c_ptr,
    h_ptr, c_ptr, saved_ptr,
    dgates_x_ptr, dgates_h_ptr, grad_h_proj_ptr, dh_carry_ptr, routed_dh0_ptr, routed_dh0_recurrent_ptr, dc_carry_ptr,
    routed_dc0_ptr,
    partial_ptr, partial_proj_ptr,
    T, B, H, P, partial_columns, partial_proj_columns, zoneout_p, barrier_ptr, step_begin, step_end,
    CELL_BACKWARD_INPUTS: tl.constexpr, CELL_BACKWARD: tl.constexpr, NUM_GATES: tl.constexpr,
    GATE_SLOTS: tl.constexpr, GATHER: tl.constexpr,
    HAS_PROJ: tl.constexpr, SEPARATE_HIDDEN_GRAD: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_RESETS: tl.constexpr, HAS_H_MASK: tl.constexpr, ZONEOUT: tl.constexpr, GRID_SYNC: tl.constexpr,
    RESIDENT: tl.constexpr, RESIDENT_PROJ: tl.constexpr, STEP_PHASE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PIECES: tl.constexpr, GROUP_PIECES: tl.constexpr, OPERAND_WAVES: tl.constexpr, BLOCK_KP: tl.constexpr,
    NUM_PIECES_P: tl.constexpr, GROUP_PIECES_P: tl.constexpr, REDUCE_CHUNK: tl.constexpr, ALIGNMENT_H: tl.constexpr,
    ALIGNMENT_P: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Backward (BPTT) of ``forward_kernel`` over its ``T`` steps (stepwise: ``[step_begin,
    step_end)``), each direction walking its time the other way. Same grid as the forward;
    program ``j`` owns the unit blocks ``j, j + n_u, ...`` and the blocks of ``BLOCK_P`` features
    of ``h`` (with a projection; else its features are its units).

    Per step: ``dh_t`` for the features the program owns (``hidden_grad``); [proj] then
    a barrier (``STEP_PHASE`` as in the forward) and ``dL/d(o *
    tanh(c_t))`` for its units through ``W_hr``; the cell's gate gradients, from what
    ``CELL_BACKWARD_INPUTS`` loaded before the product. The product by ``W_hh`` that carries them
    to the previous step runs one of two ways (``launch`` chooses):

    * ``GATHER``: after the step's barrier, every program reads all of the gate gradients and
      multiplies them by its block's columns of ``W_hh`` (``TRANSPOSED`` blocks of ``BLOCK_F``
      features: ``BLOCK_P`` with a projection, else ``BLOCK_U``; 16 on a GPU); with a projection
      likewise ``grad_h_proj`` by its columns of ``W_hr``.
    * else: each program writes its part of ``dL/dh_{t-1}`` for every feature,
      ``W_block^T @ dgates_block``, to ``partial (2, n_u, B, D, partial_columns)`` (two slots,
      alternating by step parity, so one barrier per step separates a slot's writers from its
      readers), and the owner of each feature sums the parts; with a projection likewise through
      ``partial_proj (n_u, B, D, partial_proj_columns)``. Its blocks are the forward's, so it
      spreads ``W_hh`` over more programs: the launcher takes it where a transposed block does
      not fit on an SM, and where the weights stream.

    Reads ``grad_h (T, B, D, P)`` (the gradient of the output sequence, the final-state gradient
    folded in), the forward's ``h``, ``c`` and ``saved``, ``W_hh (D, G*H, P)``, ``W_hr (D, P, H)``
    [proj] and the forward's options (``lengths``, ``resets``, ``h_mask``, the zoneout keep masks
    or ``zoneout_p``). Writes
    ``dgates_x (T, B, D, G*H)`` (the gradient of ``gates_x``, and for the LSTM and RNN that of
    ``h W_hh^T``), ``dgates_h`` [GRU: the gradient of ``h W_hh^T + b_hh``, where it differs],
    ``grad_h_proj (T, B, D, P)`` [proj: the gradient of the projection's output]. The carries
    ``dh_carry (B, D, P)`` and ``dc_carry (B, D, H)`` come in as zeros and ``dL/dc_n`` and leave
    as the parts of ``dL/dh_0`` and ``dL/dc_0`` from the first step; ``routed_dh0`` and
    ``routed_dc0`` (zeros in) gather what the resets route to the initial state around ``W_hh``,
    ``routed_dh0_recurrent`` [resets] what they route to it through ``W_hh``. The launcher adds
    these up into ``dL/dh_0`` and ``dL/dc_0``, with what the last step sends through ``W_hh``.
    """
    H, P = aligned(H, ALIGNMENT_H), aligned(P, ALIGNMENT_P)
    direction = tl.program_id(2)
    D = tl.num_programs(2)
    w_hh_ptr += direction.to(tl.int64) * NUM_GATES * H * P
    first_unit = tl.program_id(1) * BLOCK_U
    first_feature = tl.program_id(1) * BLOCK_P
    num_parts = tl.num_programs(1)
    if HAS_PROJ:
        w_hr_ptr += direction.to(tl.int64) * P * H
    # The LSTM and RNN multiply their dgates_x by W_hh, the GRU its dgates_h.
    recurrent_grad_ptr = dgates_x_ptr
    if SEPARATE_HIDDEN_GRAD:
        recurrent_grad_ptr = dgates_h_ptr
    # A stepwise launch of one phase loads only the block it uses. Gathering, dL/dh (up to the
    # barrier) reads W_hh and the cell (from it) W_hr; summing parts, the parts through W_hr are
    # written with dL/dh and those through W_hh after the cell.
    w_hh = 0.0
    w_hr = 0.0
    if GATHER:
        if RESIDENT and STEP_PHASE != FROM_BARRIER:
            BLOCK_F: tl.constexpr = BLOCK_P if HAS_PROJ else BLOCK_U
            w_hh = resident_block(w_hh_ptr, tl.program_id(1) * BLOCK_F, P, NUM_GATES * H, NUM_GATES=1, GATE_SLOTS=1,
                                  BLOCK_ROWS=BLOCK_F, BLOCK_K=BLOCK_K, NUM_PIECES=NUM_PIECES,
                                  GROUP_PIECES=GROUP_PIECES, TRANSPOSED=True)
        if RESIDENT_PROJ and STEP_PHASE != UP_TO_BARRIER:
            w_hr = resident_block(w_hr_ptr, first_unit, H, P, NUM_GATES=1, GATE_SLOTS=1, BLOCK_ROWS=BLOCK_U,
                                  BLOCK_K=BLOCK_KP, NUM_PIECES=NUM_PIECES_P, GROUP_PIECES=GROUP_PIECES_P,
                                  TRANSPOSED=True)
    else:
        if RESIDENT and STEP_PHASE != UP_TO_BARRIER:
            w_hh = resident_block(w_hh_ptr, first_unit, H, P, NUM_GATES, GATE_SLOTS, BLOCK_U, BLOCK_K, NUM_PIECES,
                                  GROUP_PIECES=1, TRANSPOSED=False)
        if RESIDENT_PROJ and STEP_PHASE != FROM_BARRIER:
            w_hr = resident_block(w_hr_ptr, first_feature, P, H, NUM_GATES=1, GATE_SLOTS=1, BLOCK_ROWS=BLOCK_P,
                                  BLOCK_K=BLOCK_KP, NUM_PIECES=NUM_PIECES_P, GROUP_PIECES=1, TRANSPOSED=False)
    arrivals = 0
    first_step, last_step = step_bounds(T, step_begin, step_end, GRID_SYNC)
    for step in range(first_step, last_step):
        # Walking time backwards: T-1, ..., 0 for the forward direction; 0, ..., T-1 in reverse. As
        # arithmetic (T - 1 - step + direction * (2 * step + 1 - T)) it kept 1 - T live across the
        # loop, which Triton 3.9 spilled in the LSTM's gathering backward with lengths.
        t = tl.where(direction == 0, T - 1 - step, step)
        # The step this backward walked before this one: the next one in time (t + 1 forwards).
        t_before = t + 1 - 2 * direction
        parity = step % 2
        if HAS_PROJ:
            if STEP_PHASE != FROM_BARRIER:
                for first_row in range(tl.program_id(0) * BLOCK_B, B, tl.num_programs(0) * BLOCK_B):
                    (batch_rows, row_mask, x_rows, prev_rows, out_rows, init_rows, state_rows, active, reset,
                     reset_before) = step_rows(t, t_before, T, first_row, lengths_ptr, resets_ptr, B, D, direction,
                                               HAS_LENGTHS, HAS_RESETS, BLOCK_B)
                    for block_start in range(first_feature, P, num_parts * BLOCK_P):
                        features = block_start + tl.arange(0, BLOCK_P)
                        mask = (features < P)[:, None] & row_mask[None, :]
                        dh = hidden_grad(
                            w_hh, w_hh_ptr, None, grad_h_ptr, dh_carry_ptr, routed_dh0_recurrent_ptr,
                            recurrent_grad_ptr, partial_ptr, h_mask_ptr, step, x_rows,
                            buffer_rows(t_before, batch_rows, B, D, direction), state_rows, batch_rows, row_mask, B,
                            D, direction, H, P, partial_columns, block_start, mask,
                            reset_before, NUM_GATES, GATHER, HAS_RESETS, HAS_H_MASK, BLOCK_P, BLOCK_B, BLOCK_K,
                            NUM_PIECES, GROUP_PIECES, OPERAND_WAVES, REDUCE_CHUNK, RESIDENT, ACC_DTYPE, DOT_PRECISION,
                            DOT_UPCAST)
                        dh_new, carry = zoneout_grad(dh, zoneout_h_ptr, x_rows, P, features, mask, zoneout_p, ZONEOUT)
                        if HAS_LENGTHS:
                            # Past a sequence's end h_t is h_{t-1}: dh goes around the projection and the cell.
                            carry = tl.where(active[None, :], carry, dh)
                            dh_new = tl.where(active[None, :], dh_new, 0.0)
                        if HAS_LENGTHS or ZONEOUT != ZONEOUT_OFF:
                            carry = route_to_initial(carry, routed_dh0_ptr, state_rows, P, features, mask, reset,
                                                     HAS_RESETS)
                            store_tile(dh_carry_ptr, state_rows, P, features, mask, carry)
                        dh = dh_new
                        store_tile(grad_h_proj_ptr, x_rows, P, features, mask, dh)
                        if not GATHER:
                            write_partial(
                                w_hr, w_hr_ptr, block_start, P, H, dh, partial_proj_ptr,
                                buffer_rows(tl.program_id(1), batch_rows, B, D, direction), partial_proj_columns,
                                row_mask, block_start != first_feature, NUM_GATES=1, GATE_SLOTS=1,
                                BLOCK_ROWS=BLOCK_P, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_KP, NUM_PIECES=NUM_PIECES_P,
                                RESIDENT=RESIDENT_PROJ, ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=DOT_PRECISION,
                                DOT_UPCAST=DOT_UPCAST)
            if STEP_PHASE == WHOLE_STEP:
                # The cell needs the gradient through W_hr for its units, from every feature.
                arrivals = sync_programs(barrier_ptr, arrivals, GRID_SYNC)
        if STEP_PHASE != UP_TO_BARRIER:
            for first_row in range(tl.program_id(0) * BLOCK_B, B, tl.num_programs(0) * BLOCK_B):
                (batch_rows, row_mask, x_rows, prev_rows, out_rows, init_rows, state_rows, active, reset,
                 reset_before) = step_rows(t, t_before, T, first_row, lengths_ptr, resets_ptr, B, D, direction,
                                           HAS_LENGTHS, HAS_RESETS, BLOCK_B)
                for block_start in range(first_unit, H, num_parts * BLOCK_U):
                    units = block_start + tl.arange(0, BLOCK_U)
                    mask = (units < H)[:, None] & row_mask[None, :]
                    # All of the step's loads go out before the product, so that their L2 round trips
                    # overlap: the gathering product's operand, its first wave (masked off entirely
                    # at the first step, which has no step before it), then what the cell reads of
                    # its own (the saved activations, its states). In the other order, or with the
                    # cell's loads after the product's, Triton 3.6 and 3.9 spilled 4 to 20 bytes a
                    # thread where the operand fills the registers (LSTM H=768, GRU H=768 and 1024).
                    before_rows = buffer_rows(t_before, batch_rows, B, D, direction)
                    if GATHER and not HAS_PROJ:
                        operand = load_operand(recurrent_grad_ptr, before_rows, NUM_GATES * H, row_mask & (step > 0),
                                               BLOCK_K, NUM_PIECES, GROUP_PIECES, RESIDENT, 0, OPERAND_WAVES)
                    else:
                        operand = None
                    inputs = CELL_BACKWARD_INPUTS(
                        saved_ptr, h_ptr, c_ptr, dc_carry_ptr, x_rows, prev_rows, init_rows, out_rows, state_rows,
                        row_mask, reset, block_start, H, P, HAS_RESETS, ZONEOUT, BLOCK_U)
                    if HAS_PROJ:
                        if GATHER:
                            dh = recurrent_matmul(
                                w_hr, w_hr_ptr, block_start, H, P, None, grad_h_proj_ptr, x_rows, row_mask,
                                NUM_GATES=1, GATE_SLOTS=1, BLOCK_ROWS=BLOCK_U, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_KP,
                                NUM_PIECES=NUM_PIECES_P, GROUP_PIECES=GROUP_PIECES_P, RESIDENT=RESIDENT_PROJ,
                                TRANSPOSED=True, OPERAND_WAVES=1, ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=DOT_PRECISION,
                                DOT_UPCAST=DOT_UPCAST)
                        else:
                            dh = reduce_partials(partial_proj_ptr, 0, num_parts, batch_rows, B, D, direction,
                                                 partial_proj_columns, units, mask, BLOCK_U, BLOCK_B, REDUCE_CHUNK,
                                                 ACC_DTYPE)
                    else:
                        dh = hidden_grad(
                            w_hh, w_hh_ptr, operand, grad_h_ptr, dh_carry_ptr, routed_dh0_recurrent_ptr,
                            recurrent_grad_ptr, partial_ptr, h_mask_ptr, step, x_rows, before_rows, state_rows,
                            batch_rows, row_mask, B, D, direction, H, P, partial_columns, block_start, mask,
                            reset_before, NUM_GATES, GATHER, HAS_RESETS, HAS_H_MASK, BLOCK_U, BLOCK_B, BLOCK_K,
                            NUM_PIECES, GROUP_PIECES, OPERAND_WAVES, REDUCE_CHUNK, RESIDENT, ACC_DTYPE, DOT_PRECISION,
                            DOT_UPCAST)
                    dh_total = dh
                    if not HAS_PROJ:
                        dh, carry_zoneout = zoneout_grad(dh, zoneout_h_ptr, x_rows, P, units, mask, zoneout_p, ZONEOUT)
                    dgates_h, carry = CELL_BACKWARD(
                        dh, inputs, dgates_x_ptr, dgates_h_ptr, dc_carry_ptr, routed_dc0_ptr, zoneout_c_ptr, zoneout_p,
                        x_rows, state_rows, row_mask, active, reset, block_start, H, HAS_LENGTHS, HAS_RESETS,
                        ZONEOUT, BLOCK_U, BLOCK_B)
                    if not HAS_PROJ:
                        carry += carry_zoneout
                        if HAS_LENGTHS:
                            carry = tl.where(active[None, :], carry, dh_total)
                        carry = route_to_initial(carry, routed_dh0_ptr, state_rows, P, units, mask, reset, HAS_RESETS)
                        store_tile(dh_carry_ptr, state_rows, P, units, mask, carry)
                    if not GATHER:
                        write_partial(
                            w_hh, w_hh_ptr, block_start, H, P, dgates_h, partial_ptr,
                            buffer_rows(parity * num_parts + tl.program_id(1), batch_rows, B, D, direction),
                            partial_columns, row_mask, block_start != first_unit, NUM_GATES, GATE_SLOTS, BLOCK_U,
                            BLOCK_B, BLOCK_K, NUM_PIECES, RESIDENT, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST)
        # The next step reads this step's gate gradients (or parts) from every program.
        arrivals = sync_programs(barrier_ptr, arrivals, GRID_SYNC)


@dataclasses.dataclass(frozen=True)
class Cell:
    """What a cell brings to the shared kernels: its step math and the shape of its buffers.

    The step math is three ``@triton.jit`` functions with one signature for every cell (the
    kernels call them alike; a cell ignores the arguments it has no use for), for a block of
    ``BLOCK_U`` units and a batch tile, as ``(units, batch)`` tiles:

    * ``forward(gates_h, gates_x, state, ...)``: from the recurrent product ``gates_h``, the
      block's ``gates_x`` and the state its units left (``c_{t-1}``, or ``h_{t-1}``), writes what
      the cell keeps (``c_t``, the saved activations) and returns the new ``h`` (before zoneout,
      lengths and the projection, which the kernel applies).
    * ``backward_inputs(saved_ptr, h_ptr, c_ptr, ...)``: every load the backward step needs of
      its own, as a tuple, issued before the recurrent product so that their round trips overlap.
    * ``backward(dh, inputs, ...)``: from ``dh = dL/dh_t`` (after zoneout) and those inputs,
      writes the gate gradients (and moves the LSTM's ``dc`` carry); returns them gate-major,
      ``(GATE_SLOTS * BLOCK_U, batch)``, and the gradient reaching ``h_{t-1}`` around ``W_hh``.
    """

    num_gates: int        # G: gates per unit (rows of W_hh per unit)
    saved_gates: int      # activations per unit saved for the backward (0: it reads h_t)
    has_cell_state: bool  # the LSTM's c
    forward: object
    backward_inputs: object
    backward: object
    separate_hidden_grad: bool = False  # GRU: d(h W_hh^T + b_hh) differs from d(gates_x)


# The kernels' operators (``operator``); ``native.py``'s are another fragment of the namespace.
_LIBRARY = torch.library.Library("fused_rnn", "FRAGMENT")


def operator(launcher):
    """``launcher`` as the operator ``fused_rnn::<its name>``, its schema read off its annotations:
    the ``OpOverload`` that compiled graphs, exported programs and profiles show.

    Registered with ``torch.library.define`` / ``impl`` rather than ``torch.library.custom_op``,
    whose eager call wraps the op in an autograd Function of its own (where none is registered)
    and checks the outputs for aliases: 20 to 30 µs a call more on the CPU of docs/performance.md's
    "Short sequences", twice per training call. These ops need no autograd of their own:
    ``functional``'s Functions differentiate them, and call them where nothing records a graph.
    """
    name = launcher.__name__
    _LIBRARY.define(name + torch.library.infer_schema(launcher, mutates_args=()))
    _LIBRARY.impl(name, launcher, "CompositeExplicitAutograd")
    return getattr(torch.ops.fused_rnn, name).default


def _shape(cell: Cell, T: int, B: int, D: int, H: int, P: int, dtype, has_proj: bool) -> launch.Shape:
    return launch.Shape(dtype=dtype, batch=B, hidden=H, features=P, directions=D,
                        num_gates=cell.num_gates, has_proj=has_proj, steps=T)


def _none_if_empty(tensor):
    return tensor if tensor.numel() else None


def _dense(*tensors):
    """The tensors as the kernels index them, dense and row-major (None stays None): the custom ops
    are public, and a strided view would be read wrong."""
    return [None if tensor is None else tensor.contiguous() for tensor in tensors]


def _check_timesteps(name: str, tensor) -> None:
    """The custom ops are public: a sequence without steps would leave ``h_n`` (and the backward's
    gathered gradients) unwritten; ``functional`` refuses it before as ``nn.LSTM`` does."""
    if tensor.shape[0] == 0:
        raise ValueError(f"{name}: the recurrence needs at least one timestep, got shape {list(tensor.shape)}")


def _check_devices(first_name: str, first, **tensors) -> None:
    """The launch runs on ``first``'s device; a tensor on another would be read across devices
    (through peer memory, or a fault), or copied without a word. ``functional`` checks before."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != first.device:
            raise RuntimeError(f"{name} is on {tensor.device}, {first_name} on {first.device}: the recurrence "
                               "needs every tensor on one device")


def _check_zoneout_masks(cell: Cell, zoneout_h, zoneout_c) -> None:
    """One flag (``ZONEOUT``) covers ``h`` and ``c``: the LSTM takes both keep masks or neither."""
    if cell.has_cell_state and (zoneout_h is None) != (zoneout_c is None):
        raise ValueError("zoneout_h and zoneout_c: the LSTM's zoneout takes both keep masks or neither")


def _buffer(needed: bool, shape: tuple, dtype, device) -> torch.Tensor:
    """A launch's output buffer, or an empty tensor where the launch does not write that one."""
    return launch.empty(*(shape if needed else (0,)), dtype=dtype, device=device)


def forward_outputs(cell: Cell, gates_x, w_hh, w_hr, save_for_backward: bool, zoneout_h, zoneout_p: float):
    """Buffers of a forward launch: ``h (T+2, B, D, P)``, ``c (T+2, B, D, H)`` [LSTM],
    ``h_raw (T, B, D, H)`` [proj], ``saved (T, B, D, S*H)`` [saving]; empty where not needed.
    A cell that saves nothing saves its new ``h`` under zoneout (keep masks ``zoneout_h`` in
    training, ``zoneout_p > 0`` in eval): ``h_t`` may hold ``h_{t-1}``."""
    T, B, D, gates_h = gates_x.shape
    saved_gates = cell.saved_gates or int(zoneout_h is not None or zoneout_p > 0)
    H, P = gates_h // cell.num_gates, w_hh.shape[2]
    dtype, device = gates_x.dtype, gates_x.device
    return (
        _buffer(True, (T + 2, B, D, P), dtype, device),
        _buffer(cell.has_cell_state, (T + 2, B, D, H), accumulator_dtype(dtype), device),
        _buffer(w_hr is not None, (T, B, D, H), dtype, device),
        _buffer(save_for_backward and saved_gates > 0, (T, B, D, saved_gates * H), dtype, device),
    )


def _write_initial_state(states, initial, num_steps: int):
    """The forward direction starts from slot 0, the reverse from slot ``T + 1``."""
    states[0] = initial.transpose(0, 1)
    if initial.shape[0] == 2:
        states[num_steps + 1] = initial.transpose(0, 1)


def forward(cell: Cell, gates_x, w_hh, b_hh, w_hr, h0, c0, lengths, resets, h_mask, zoneout_h, zoneout_c,
            zoneout_p: float, save_for_backward: bool):
    """Run ``forward_kernel`` for ``cell``; returns ``forward_outputs``, filled. The zoneout keep
    masks are given in training; in eval ``zoneout_p`` alone (0: no zoneout)."""
    _check_timesteps("gates_x", gates_x)
    _check_devices("gates_x", gates_x, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, h0=h0, c0=c0, lengths=lengths, resets=resets,
                   h_mask=h_mask, zoneout_h=zoneout_h, zoneout_c=zoneout_c)
    _check_zoneout_masks(cell, zoneout_h, zoneout_c)
    gates_x, w_hh, b_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c = _dense(
        gates_x, w_hh, b_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c)
    h, c, h_raw, saved = forward_outputs(cell, gates_x, w_hh, w_hr, save_for_backward, zoneout_h, zoneout_p)
    T, B, D, _ = gates_x.shape
    H, P = gates_x.shape[3] // cell.num_gates, h.shape[3]
    _write_initial_state(h, h0, T)
    if cell.has_cell_state:
        _write_initial_state(c, c0, T)
    recurrent = None
    if resets is not None or h_mask is not None:
        # The first step's operand; the kernel writes each next one (``store_recurrent_input``).
        recurrent = launch.empty(2, B, D, P, dtype=h.dtype, device=h.device)
        recurrent[0] = h0.transpose(0, 1) if h_mask is None else h0.transpose(0, 1) * h_mask
    shape = _shape(cell, T, B, D, H, P, gates_x.dtype, w_hr is not None)
    plan = launch.plan(shape, gates_x.device, backward=False)
    launch.launch(
        forward_kernel,
        (gates_x, w_hh, b_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c,
         h, _none_if_empty(c), _none_if_empty(h_raw), _none_if_empty(saved), recurrent, T, B, H, P, float(zoneout_p)),
        plan, T, CELL_FORWARD=cell.forward, NUM_GATES=cell.num_gates, GATE_SLOTS=shape.gate_slots,
    )
    return h, c, h_raw, saved


def backward_outputs(cell: Cell, grad_h, w_hh, w_hr):
    """Outputs of a backward launch: ``dgates_x (T, B, D, G*H)``, ``dgates_h`` [GRU],
    ``grad_h_proj (T, B, D, P)`` [proj], ``dh0 (D, B, P)``, ``dc0 (D, B, H)`` [LSTM]."""
    T, B, D, P = grad_h.shape
    H = w_hh.shape[1] // cell.num_gates
    dtype, device = grad_h.dtype, grad_h.device
    return (
        _buffer(True, (T, B, D, cell.num_gates * H), dtype, device),
        _buffer(cell.separate_hidden_grad, (T, B, D, cell.num_gates * H), dtype, device),
        _buffer(w_hr is not None, (T, B, D, P), dtype, device),
        _buffer(True, (D, B, P), dtype, device),
        _buffer(cell.has_cell_state, (D, B, H), dtype, device),
    )


def backward(cell: Cell, grad_h, grad_c_n, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c,
             zoneout_p: float, h, c, saved):
    """Run ``backward_kernel`` for ``cell``; returns ``backward_outputs``, filled."""
    _check_timesteps("grad_h", grad_h)
    _check_devices("grad_h", grad_h, grad_c_n=grad_c_n, w_hh=w_hh, w_hr=w_hr, lengths=lengths, resets=resets,
                   h_mask=h_mask, zoneout_h=zoneout_h, zoneout_c=zoneout_c, h=h, c=c, saved=saved)
    _check_zoneout_masks(cell, zoneout_h, zoneout_c)
    grad_h, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c, h, c, saved = _dense(
        grad_h, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c, h, c, saved)
    dgates_x, dgates_h, grad_h_proj, dh0, dc0 = backward_outputs(cell, grad_h, w_hh, w_hr)
    T, B, D, P = grad_h.shape
    H = w_hh.shape[1] // cell.num_gates
    accumulator, device = accumulator_dtype(grad_h.dtype), grad_h.device
    shape = _shape(cell, T, B, D, H, P, grad_h.dtype, w_hr is not None)
    plan = launch.plan(shape, device, backward=True)
    dh_carry = torch.zeros(B, D, P, dtype=accumulator, device=device)
    # What resets route to the initial states, summed in the kernel: to h_0 around W_hh and through it.
    routed_dh0 = torch.zeros(B, D, P, dtype=accumulator, device=device)
    routed_dh0_recurrent = None if resets is None else torch.zeros(B, D, P, dtype=accumulator, device=device)
    dc_carry = routed_dc0 = None
    if cell.has_cell_state:
        dc_carry = grad_c_n.transpose(0, 1).to(dtype=accumulator, memory_format=torch.contiguous_format, copy=True)
        routed_dc0 = torch.zeros(B, D, H, dtype=accumulator, device=device)
    columns, proj_columns = launch.partial_columns(P), launch.partial_columns(H)
    partial = partial_proj = None
    if not plan.options["GATHER"]:
        # Every program owns a unit block and writes its parts of every feature; with a projection
        # a program whose feature block lies past P writes no part of dL/d(o * tanh(c)): zeros.
        programs = plan.grid[1]
        partial = launch.empty(2, programs, B, D, columns, dtype=accumulator, device=device)
        if w_hr is not None:
            partial_proj = torch.zeros(programs, B, D, proj_columns, dtype=accumulator, device=device)
    launch.launch(
        backward_kernel,
        (grad_h, w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c, h,
         _none_if_empty(c), _none_if_empty(saved), dgates_x, _none_if_empty(dgates_h), _none_if_empty(grad_h_proj),
         dh_carry, routed_dh0, routed_dh0_recurrent, dc_carry, routed_dc0, partial, partial_proj, T, B, H, P, columns,
         proj_columns, float(zoneout_p)),
        plan, T, CELL_BACKWARD_INPUTS=cell.backward_inputs, CELL_BACKWARD=cell.backward, NUM_GATES=cell.num_gates,
        GATE_SLOTS=shape.gate_slots,
    )
    # What each direction's last step (t = 0 forwards, T - 1 in reverse) sends through W_hh reaches h_0.
    if plan.options["GATHER"]:
        recurrent_grad = dgates_h if cell.separate_hidden_grad else dgates_x
        last = torch.stack([recurrent_grad[(T - 1) * direction, :, direction] for direction in range(D)])
        incoming = torch.bmm(last.to(accumulator), w_hh.to(accumulator)).transpose(0, 1)
    else:
        incoming = partial[(T - 1) % 2, ..., :P].sum(0)
    if h_mask is not None:
        incoming = incoming * h_mask
    if routed_dh0_recurrent is not None:
        routed_dh0 += routed_dh0_recurrent
    dh0.copy_((routed_dh0 + dh_carry + incoming).transpose(0, 1))
    if cell.has_cell_state:
        dc0.copy_((routed_dc0 + dc_carry).transpose(0, 1))
    return dgates_x, dgates_h, grad_h_proj, dh0, dc0
