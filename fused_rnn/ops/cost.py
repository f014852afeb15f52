"""A per-step cost model of a persistent launch on an H100 / H200: what the launcher ranks its
candidate plans by (``launch._resident_persistent_plan``), and what ``python -m bench.model``
tabulates, there with the compiled code's matrix instructions in place of this estimate.

A model, not a measurement: a lower bound in seconds per step from the bytes each program moves
per step (the buffers ``python -m bench.traffic`` attributes: the operand, ``gates_x``, the
states, the saved activations the backward reads (the forward as in inference, saving nothing),
the backward's gate gradients of every unit (gathering) or partial sums, the weights when they
stream: ``W_hh``, and ``W_hr`` where it streams beside a resident ``W_hh``), the dependent trips to
L2 and the matrix work:

    step = round_trips * L2_ROUND_TRIP + max(L2 bytes of all programs / L2 bandwidth,
                                             L2 bytes of one program / one SM's L2 bandwidth)
           + tiles * product
           [+ the weights' bytes / HBM bandwidth, where a streaming plan's weight reads in a
              step (its blocks again for every batch tile) pass 50 MB, the L2's size]

``round_trips`` counts the dependent trips to L2 on a step's critical path: the stores the next
step reads and the barrier (an arrival and the poll that sees the last one), then for each batch
tile a program walks the operand load (every piece at once, or of the gathering backward's operand
one wave after another; in a backward that sums parts, one per chunk of programs whose parts
``reduce_partials`` loads), with the cell's own loads issued before it; with a projection, a
second barrier a step and, for each tile, the projection's operand load (in one wave; summing
parts, as many as the first phase). A batch tile's product takes the longer of its longest
run of dependent ``HMMA`` instructions (30 cycles each) and its multiply-adds at the SM's
tensor-core rate: ``HGMMA`` (wgmma) for a single ``tl.dot`` of 64 rows or more, ``HMMA`` for the
batched pieces and smaller dots (``recurrence.recurrent_matmul``). The elementwise math hides
under them.

Every program reads all of the operand, so spreading ``W_hh`` over more programs shrinks each
program's product but multiplies the L2 traffic: at B=16 H=768 in fp16, 96 programs of 8 units
read 2.6 MB a step (0.47 us at L2's bandwidth), 48 of 16 half that, and their 64-row blocks
run ``HGMMA`` at twice the rate, the same product time.

Assumed constants (public figures; what the GPU gives in practice is for a GPU session to
measure, ``python -m bench.skeleton``): L2 about 5.5 TB/s in all and 64 bytes per clock
per SM at 1.755 GHz; an L2 round trip about 0.25 us; HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s
(H200); 30 cycles from one dependent ``HMMA`` to the next, as microbenchmarks put it on Ampere
and Hopper; 2048 fp16 multiply-adds a clock per SM with ``HGMMA`` (H100 SXM's dense 989 TFLOPS),
half that with ``HMMA`` (``mma.sync``, an assumption), half again in TF32.
"""

import math

import torch

HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes per second
L2_BANDWIDTH = 5.5e12
L2_BYTES = 50e6
CLOCK = 1.755e9
SM_L2_BANDWIDTH = 64 * CLOCK
L2_ROUND_TRIP = 0.25e-6
SYNC_ROUND_TRIPS = 3  # the step's stores, the barrier's arrival and the poll that sees the last one
TILE_ROUND_TRIPS = 1  # per batch tile: the operand load, the cell's own loads issued beside it
MMA_LATENCY = 30 / CLOCK  # one dependent matrix instruction to the next
MULTIPLY_ADDS_PER_CLOCK = {"HGMMA": 2048, "HMMA": 1024}  # an SM's, fp16 / bf16; TF32 half
# Activations per unit the cells save for the backward (``recurrence.Cell.saved_gates``), by their
# number of gates: the LSTM (4), the GRU (3), the Elman RNN (1).
SAVED_GATES = {4: 4, 3: 4, 1: 0}


def l2_seconds(per_program: float, programs: int) -> float:
    """Seconds for each of ``programs`` programs to move ``per_program`` bytes through L2: at the
    L2's bandwidth, or at one SM's share of it, whichever binds."""
    return max(programs * per_program / L2_BANDWIDTH, per_program / SM_L2_BANDWIDTH)


def multiply_add_rate(instruction: str, dtype) -> float:
    """Multiply-adds a second of one SM's tensor cores with ``instruction`` (``HGMMA``, ``HMMA``) in
    ``dtype``'s products: TF32 (fp32) at half the 16-bit rate."""
    return MULTIPLY_ADDS_PER_CLOCK[instruction] * CLOCK / (2 if dtype == torch.float32 else 1)


def _product(dtype, rows: int, columns: int, batch_rows: int, piece_columns: int, batched: bool) -> float:
    """Seconds of one ``(rows, columns) @ (columns, batch_rows)`` product: ``HGMMA`` where it is one
    ``tl.dot`` of 64 rows or more, else ``HMMA`` in chains of a piece's ``K`` steps."""
    k_step = 8 if dtype == torch.float32 else 16  # K of one HMMA.1688 (TF32) / HMMA.16816
    hgmma = not batched and rows >= 64
    chain = 0 if hgmma else (piece_columns if batched else columns) // k_step
    rate = multiply_add_rate("HGMMA" if hgmma else "HMMA", dtype)
    return max(chain * MMA_LATENCY, rows * columns * batch_rows / rate)


def product_estimate(shape, options: dict, backward: bool) -> float:
    """Seconds of one batch tile's products by a resident plan's blocks (``launch._options``):
    ``W_hh``'s, and with a projection ``W_hr``'s, from their shapes alone (``bench.model`` reads
    the compiled code's instead)."""
    block_b, block_u, block_p = options["BLOCK_B"], options["BLOCK_U"], options["BLOCK_P"]
    columns = options["BLOCK_K"] * options["NUM_PIECES"]
    columns_p = options["BLOCK_KP"] * options["NUM_PIECES_P"]
    if not options["RESIDENT_PROJ"]:  # W_hr's block streams in chunks over all of H
        columns_p = math.ceil(shape.hidden / options["BLOCK_KP"]) * options["BLOCK_KP"]
    batched, batched_p = options["GROUP_PIECES"] > 1, options["GROUP_PIECES_P"] > 1
    if backward and options["GATHER"]:  # the transposed blocks: features by every gate row
        block_f = block_p if shape.has_proj else block_u
        seconds = _product(shape.dtype, block_f, columns, block_b, options["BLOCK_K"], batched)
        if shape.has_proj:  # W_hr's block by all of dL/dh: (units, P) @ (P, batch)
            seconds += _product(shape.dtype, block_u, columns_p, block_b, options["BLOCK_KP"], batched_p)
    elif backward:  # each piece's part of every feature: (piece, gate rows) @ (gate rows, batch)
        gate_rows = shape.gate_slots * block_u
        seconds = options["NUM_PIECES"] * _product(shape.dtype, options["BLOCK_K"], gate_rows, block_b, gate_rows,
                                                   False)
        if shape.has_proj:  # and W_hr's, of every unit: (piece, features) @ (features, batch)
            seconds += options["NUM_PIECES_P"] * _product(shape.dtype, options["BLOCK_KP"], block_p, block_b,
                                                          block_p, False)
    else:
        seconds = _product(shape.dtype, shape.gate_slots * block_u, columns, block_b, options["BLOCK_K"], batched)
        if shape.has_proj:  # W_hr's block by all of h_raw: (features, H) @ (H, batch)
            seconds += _product(shape.dtype, block_p, columns_p, block_b, options["BLOCK_KP"], batched_p)
    return seconds


def step_seconds(shape, plan, backward: bool, product: float | None = None, gpu: str = "H100") -> float:
    """The modelled lower bound of one step of ``plan`` (``launch.Plan``) for ``shape``, in
    seconds; ``product``, a batch tile's, defaults to ``product_estimate`` for a resident plan
    and to none for a streaming one (whose weights' bytes are its bound)."""
    gates, size = shape.num_gates, shape.dtype.itemsize
    groups, programs, directions = plan.grid
    options = plan.options
    block_b, block_u = options["BLOCK_B"], options["BLOCK_U"]
    tiles = math.ceil(math.ceil(shape.batch / block_b) / groups)  # batch tiles a program walks, one after another
    rows = tiles * block_b
    units = block_u * math.ceil(math.ceil(shape.hidden / block_u) / programs)  # units a program owns
    cell_state = shape.num_gates == 4
    states = (2 * 4 if cell_state else 0) + size  # c in fp32 read and written, h written
    phases = 2 if shape.has_proj else 1
    if backward and options["GATHER"]:
        per_program = rows * (
            gates * shape.hidden * size      # every unit's gate gradients of the step before, read
            + units * (SAVED_GATES[gates] + gates) * size  # saved activations read, gate gradients written
            + units * (size + states + 8))   # grad_h, states, carries
        # A wave of the operand after another's products: one trip each (TILE_ROUND_TRIPS a wave).
        operand_trips = options["OPERAND_WAVES"] * TILE_ROUND_TRIPS
    elif backward:
        per_program = rows * (
            shape.features * 4               # partial sums of dL/dh_{t-1}, written (fp32)
            + programs * units * 4           # every program's parts for my units, read
            + units * (SAVED_GATES[gates] + gates) * size
            + units * (size + states + 8))
        # reduce_partials loads REDUCE_CHUNK programs' parts at a time, one dependent trip each.
        operand_trips = math.ceil(programs / options["REDUCE_CHUNK"])
    else:
        per_program = rows * (shape.features * size + units * (gates * size + states))
        operand_trips = TILE_ROUND_TRIPS
    projection_trips = 0
    if shape.has_proj:
        if backward and not options["GATHER"]:
            # W_hr's partial sums of dL/dh_raw over all of H, written (fp32), and every program's for
            # my features read, as many trips as W_hh's.
            features = options["BLOCK_P"] * math.ceil(math.ceil(shape.features / options["BLOCK_P"]) / programs)
            per_program += rows * (shape.hidden + programs * features) * 4
            projection_trips = operand_trips
        else:  # the projection's operand, in one load: all of h_raw (forward) or of dL/dh (backward)
            per_program += rows * (shape.features if backward else shape.hidden) * size
            projection_trips = TILE_ROUND_TRIPS
        if plan.resident and not options["RESIDENT_PROJ"]:  # W_hr's block read again for every tile
            per_program += tiles * options["BLOCK_P"] * shape.hidden * size
    round_trips = phases * SYNC_ROUND_TRIPS + tiles * (operand_trips + projection_trips)
    weights = 0.0
    if not plan.resident:  # every program reads its blocks again for every batch tile, every step
        weights = gates * shape.hidden * shape.features * size * math.ceil(shape.batch / block_b) * directions
        per_program += weights / (groups * programs * directions)
    bandwidth = l2_seconds(per_program, directions * groups * programs)
    if product is None:
        product = product_estimate(shape, options, backward) if plan.resident else 0.0
    hbm = weights / HBM_BANDWIDTH[gpu] if weights > L2_BYTES else 0.0
    return round_trips * L2_ROUND_TRIP + bandwidth + tiles * product + hbm
