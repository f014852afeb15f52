"""Launch plans and launches (``ops.launch``), without a GPU.

A persistent launch's programs wait for each other at a barrier every step, so its grid must never
exceed what the GPU keeps resident at once, one program per SM; a resident program's weight block
must fit in shared memory and its operand tiles (or the backward's partial sums) in registers. ``gpu_plan`` computes
a GPU's plan from its SM count alone, so these tests pin that arithmetic down on the CPU. The
kernels themselves run under every plan in ``test_ops_lstm`` / ``gru`` / ``rnn`` (and on a GPU in
``test_gpu``).
"""

import contextlib
import itertools
from types import SimpleNamespace

import pytest
import torch
import triton
from ops_cases import Case, make_inputs

from fused_rnn import functional
from fused_rnn.ops import cost, launch, recurrence

H100_SMS = 132
H100_BUDGET = 200 * 1024  # of the 227 KB a program may use (launch.shared_memory_budget)
# (SMs, shared memory a program may use): an H100/H200, an A100, an L40S (sm_89; as an RTX 4090 or A10).
GPUS = {"H100": (H100_SMS, 227 * 1024), "A100": (108, 163 * 1024), "L40S": (142, 99 * 1024)}
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
# (name, G, has a projection): the cells as the plans see them.
CELLS = {"lstm": (4, False), "lstm-proj": (4, True), "gru": (3, False), "rnn": (1, False)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def shape(cell="lstm", dtype=torch.float16, batch=16, hidden=768, directions=1, steps=100, proj=None):
    """A layer's ``launch.Shape``; with a projection ``proj`` features (H / 2 unless given)."""
    num_gates, has_proj = CELLS[cell]
    features = (proj or hidden // 2) if has_proj else hidden
    return launch.Shape(dtype=dtype, batch=batch, hidden=hidden, features=features, directions=directions,
                        num_gates=num_gates, has_proj=has_proj, steps=steps)


def gathering_options(layer, block_b):
    """The block constexprs of a gathering backward with 16-feature blocks and ``block_b`` rows."""
    programs = triton.cdiv(layer.hidden, 16)
    return launch._options(layer, block_b, 16, 16, programs, 16, resident=True, backward=True, gather=True,
                           resident_proj=layer.has_proj)


def fits_in_some_waves(layer, options):
    """Whether a gathering plan with ``options`` fits an SM with its operand in some number of waves."""
    return any(launch._fits(layer, dict(options, OPERAND_WAVES=waves), backward=True, budget=H100_BUDGET)
               for waves in launch.operand_waves(options))


@pytest.fixture
def no_forced_plan(monkeypatch):
    for variable in ("FUSED_RNN_SCHEME", "FUSED_RNN_WEIGHTS", "FUSED_RNN_BACKWARD"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def multiprocessors(monkeypatch):
    """Pretend a GPU with a given number of usable SMs (and shared memory a program, an H100's
    unless given; tensor cores unless told) is device 0."""

    def set_limits(count, shared_memory=launch.H100_SHARED_MEMORY, tensor_cores=True):
        monkeypatch.setattr(launch, "_device_limits", lambda index: (count, shared_memory, tensor_cores))

    return set_limits


def test_headline_forward_plan_gives_48_programs_of_16_units_each_an_sm():
    # LSTM fp16, B=16, H=P=768 on 132 SMs: blocks of 4 units would need 192 programs; of 8, 96
    # programs would read all of h_{t-1} every step, the L2 twice as much as 48 of 16 units, whose
    # 64-row blocks run HGMMA at twice the rate (the cost model, ops/cost.py).
    layer = shape()
    plan = launch.gpu_plan(layer, H100_SMS, backward=False)
    assert plan.scheme == "persistent" and plan.resident
    assert plan.grid == (1, 48, 1)
    assert plan.options["BLOCK_U"] == 16 and plan.options["BLOCK_B"] == 16
    options = launch._options(layer, 16, 8, 16, 96, 16, resident=True, backward=False)
    assert launch._fits(layer, options, backward=False, budget=H100_BUDGET)
    spread = launch.Plan("persistent", (1, 96, 1), options, False)
    assert cost.step_seconds(layer, plan, backward=False) < cost.step_seconds(layer, spread, backward=False)


def test_headline_backward_gathers_with_48_programs_of_16_units():
    # Each program holds the columns of W_hh of 16 features (all 3072 gate rows, in 48 pieces of
    # 64: 96 KB) and reads all of the previous step's gate gradients (96 KB) each step.
    plan = launch.gpu_plan(shape(), H100_SMS, backward=True)
    assert plan.scheme == "persistent" and plan.resident and plan.options["GATHER"]
    assert plan.grid == (1, 48, 1)
    assert plan.options["BLOCK_U"] == 16 and plan.options["BLOCK_B"] == 16
    assert (plan.options["BLOCK_K"], plan.options["NUM_PIECES"]) == (64, 48)
    assert launch.resident_bytes(shape(), plan.options, backward=True) == 2 * 96 * 1024


def test_backward_sums_parts_where_rows_of_h_are_not_in_vectors():
    # The GRU's transposed blocks fit at H=1004 (3012 gate rows), but its rows start on a multiple
    # of 4: read an element at a time, the gathering backward spilled (140 bytes a thread at
    # H=1000 before the kernels knew H a multiple of 8; python -m bench.kernels --all).
    layer = shape("gru", hidden=1004)
    assert launch.alignment(1004) == 4 and not launch.rows_in_vectors(1004)
    assert launch._fits(layer, gathering_options(layer, 16), backward=True, budget=H100_BUDGET)
    assert not launch.gpu_plan(layer, H100_SMS, backward=True).options["GATHER"]
    for hidden in (1000, 1008):
        assert launch.gpu_plan(shape("gru", hidden=hidden), H100_SMS, backward=True).options["GATHER"]


def test_projection_backward_sums_parts_where_rows_of_p_are_not_in_vectors():
    # With P = 245 at H = 736 the gathering backward reads grad_h_proj an element at a time and
    # spilled 112 bytes a thread with Triton 3.6 (32 at P = 239, H = 720); at P = 240 it gathers.
    for hidden, proj in ((736, 245), (720, 239), (720, 236)):
        layer = shape("lstm-proj", hidden=hidden, proj=proj)
        assert fits_in_some_waves(layer, gathering_options(layer, 16))
        assert not launch.gpu_plan(layer, H100_SMS, backward=True).options["GATHER"]
    assert launch.gpu_plan(shape("lstm-proj", hidden=736, proj=240), H100_SMS, backward=True).options["GATHER"]


@pytest.mark.parametrize("hidden, batched", [(300, True), (1004, True), (1000, True), (750, True), (999, False)])
def test_forward_batches_its_pieces_where_rows_of_p_are_even(hidden, batched):
    # At H = 300 or 1004 h_{t-1} comes in 8-byte vectors (fp16), at 750 in 4-byte ones: pieces in
    # one batched dot run chains of 4 to 8 HMMA where one tl.dot ran 32, no spill (Triton 3.6 and
    # 3.9). Read an element at a time (H = 999), the batched forward spilled: one tl.dot. Blocks of 8
    # units (32 gate rows; of 64 rows and more a tl.dot runs HGMMA and is not batched).
    layer = shape(hidden=hidden)
    options = launch._options(layer, 16, 8, 16, triton.cdiv(hidden, 8), 16, resident=True, backward=False)
    assert (options["GROUP_PIECES"] > 1) == batched


@pytest.mark.parametrize("hidden, block_b", [(300, 16), (304, 32)])
def test_forward_takes_32_row_tiles_only_where_rows_of_p_are_in_vectors(hidden, block_b):
    # At B=256 H=300 (rows of P in 8-byte vectors) the forward's 32-row tiles spilled 40 bytes a
    # thread with Triton 3.6; in 16-row tiles none.
    plan = launch.gpu_plan(shape(batch=256, hidden=hidden), H100_SMS, backward=False)
    assert plan.options["BLOCK_B"] == block_b


@pytest.mark.parametrize("size, expected", [(768, 16), (1024, 16), (1000, 8), (500, 4), (650, 2), (999, 1)])
def test_alignment_is_the_largest_power_of_two_up_to_16_dividing_a_size(size, expected):
    assert launch.alignment(size) == expected
    assert launch.rows_in_vectors(size) == (expected >= 8)


def test_every_plan_tells_the_kernels_an_alignment_of_h_and_p_that_divides_them(monkeypatch):
    # The kernels write H and P as multiples of ALIGNMENT_H and ALIGNMENT_P (recurrence.aligned):
    # one that does not divide them would move every row.
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    plans = []
    for cell, hidden, proj, backward in itertools.product(CELLS, (7, 20, 100, 500, 650, 1000, 1004), (None, 60, 125),
                                                          (False, True)):
        if proj and cell != "lstm-proj":
            continue
        layer = shape(cell, hidden=hidden, proj=proj and min(proj, hidden - 1))
        plans += [launch.gpu_plan(layer, H100_SMS, backward), launch.gpu_plan(layer, H100_SMS, backward, "stepwise"),
                  launch._interpreter_plan(layer, "persistent", True, backward, True)]
        for plan in plans[-3:]:
            assert layer.hidden % plan.options["ALIGNMENT_H"] == 0 and layer.features % plan.options["ALIGNMENT_P"] == 0
    assert {plan.options["ALIGNMENT_H"] for plan in plans} == {1, 4, 2, 8}


@pytest.mark.parametrize(
    "batch, hidden, grid, units, block_b",
    [
        (16, 768, (1, 48, 1), 16, 16),    # one tile a program either way; 96 programs read h twice as much
        (64, 768, (2, 48, 1), 16, 16),    # 2 tiles a program instead of 4 with 96 programs of 8 units
        (64, 256, (4, 16, 1), 16, 16),    # 1 tile of 16 rows, 64 programs reading h, not 2 x 64 of 32 rows
        (256, 256, (16, 8, 1), 32, 16),   # 1 tile, 128 programs of 32 units; of 16 units 32-row tiles
    ],
)
def test_forward_plan_is_the_one_the_cost_model_ranks_first(batch, hidden, grid, units, block_b):
    # A program walks its batch tiles one after another, each an operand load and the cell's loads;
    # every program reads all of h_{t-1} for each, so fewer, larger blocks read less of L2, and
    # blocks of 64 gate rows and more run HGMMA (ops/cost.py).
    layer = shape(batch=batch, hidden=hidden)
    plan = launch.gpu_plan(layer, H100_SMS, backward=False)
    assert plan.resident and plan.grid == grid
    assert (plan.options["BLOCK_U"], plan.options["BLOCK_B"]) == (units, block_b)
    for block_u, other_block_b in itertools.product((4, 8, 16, 32, 64), (16, 32)):
        programs = triton.cdiv(hidden, block_u)
        options = launch._options(layer, other_block_b, block_u, 16, programs, 16, resident=True, backward=False)
        fits = launch._fits(layer, options, backward=False, budget=H100_BUDGET)
        if programs <= H100_SMS and other_block_b <= batch and fits:
            groups = min(triton.cdiv(batch, other_block_b), H100_SMS // programs)
            other = launch.Plan("persistent", (groups, programs, 1), options, False)
            assert cost.step_seconds(layer, plan, False) <= cost.step_seconds(layer, other, False) + 1e-9


@pytest.mark.parametrize(
    "dtype, hidden, units",
    [(torch.float32, 768, 16), (torch.float32, 1024, 8), (torch.float16, 1004, 8)],
    ids=["tf32-H768", "tf32-H1024", "fp16-H1004"],
)
def test_backward_sums_parts_where_the_transposed_blocks_do_not_fit(monkeypatch, dtype, hidden, units):
    # TF32 at H=768: 16 features' columns alone take 3072 x 16 x 4 bytes, 192 KB, with no room for a
    # wave of the operand. The partial sums take blocks of 16 units where they fit, smaller ones where not (TF32
    # at H=1024: 64 x 1024 x 4 bytes), and the smallest where rows do not start on 16 bytes (H=1004
    # in fp16): read an element at a time, 16-unit programs spill (python -m bench.kernels --all).
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # fp32 dots in TF32, as on a GPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    layer = shape(dtype=dtype, hidden=hidden)
    assert not launch.rows_in_vectors(hidden) or not fits_in_some_waves(layer, gathering_options(layer, 16))
    plan = launch.gpu_plan(layer, H100_SMS, backward=True)
    assert plan.resident and not plan.options["GATHER"]
    assert plan.options["BLOCK_U"] == units


@pytest.mark.parametrize(
    "dtype, hidden, waves",
    [(torch.float16, 768, 1), (torch.float16, 1000, 2), (torch.float16, 1024, 2), (torch.bfloat16, 1216, 4)],
    ids=["fp16-H768", "fp16-H1000", "fp16-H1024", "bf16-H1216"],
)
def test_backward_gathers_in_waves_where_one_operand_does_not_fit(dtype, hidden, waves):
    # The LSTM at H=1024 in fp16: 16 features' columns of W_hh (4096 x 16 x 2 bytes, 128 KB) and
    # the gate gradients of a batch tile (128 KB) need 256 KB at once; in two waves of 64 KB, 192
    # KB, and 64 registers a thread for the operand. One wave where it fits: each costs a round trip.
    layer = shape(dtype=dtype, hidden=hidden)
    plan = launch.gpu_plan(layer, H100_SMS, backward=True)
    assert plan.resident and plan.options["GATHER"] and plan.options["OPERAND_WAVES"] == waves
    assert plan.options["BLOCK_U"] == 16 and plan.grid == (1, -(-hidden // 16), 1)
    assert launch.resident_bytes(layer, plan.options, backward=True) <= H100_BUDGET
    assert launch.wave_columns(plan.options) * 16 * dtype.itemsize <= launch.OPERAND_BYTES
    if waves > 1:
        assert not launch._fits(layer, dict(plan.options, OPERAND_WAVES=waves - 1), backward=True, budget=H100_BUDGET)


def test_tf32_backward_sums_parts_where_its_operand_would_need_waves(monkeypatch):
    # The LSTM at H=512 in TF32 would gather in two waves (128 KB of W_hh, 64 KB a wave), but its
    # product runs HMMA at a quarter of the partial sums' HGMMA rate (python -m bench.model).
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    layer = shape(dtype=torch.float32, hidden=512)
    options = gathering_options(layer, 16)
    assert launch._fits(layer, dict(options, OPERAND_WAVES=2), backward=True, budget=H100_BUDGET)
    assert not launch._fits(layer, options, backward=True, budget=H100_BUDGET)
    plan = launch.gpu_plan(layer, H100_SMS, backward=True)
    assert plan.resident and not plan.options["GATHER"]


@pytest.mark.parametrize("groups, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (6, [1, 2, 3]), (8, [1, 2, 3, 4])])
def test_operand_waves_split_the_groups_into_that_many_waves(groups, expected):
    # 6 groups in 4 waves would be 2 + 2 + 2 + 0: load_operand loads them in 3.
    options = dict(NUM_PIECES=8 * groups, GROUP_PIECES=8, BLOCK_K=64)
    assert launch.operand_waves(options) == expected
    for waves in expected:
        wave_groups = launch.wave_columns(dict(options, OPERAND_WAVES=waves)) // (8 * 64)
        assert (waves - 1) * wave_groups < groups <= waves * wave_groups


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_bidirectional_headline_plan_shares_the_sms_between_directions(backward):
    # Two directions of 48 programs of 16 units each, as one direction alone takes (96 programs of 8
    # units would need 192 SMs).
    plan = launch.gpu_plan(shape(directions=2), H100_SMS, backward)
    assert plan.scheme == "persistent" and plan.resident
    assert plan.grid == (1, 48, 2)
    assert plan.options["BLOCK_U"] == 16
    groups, programs, directions = plan.grid
    assert groups * programs * directions <= H100_SMS


def test_headline_projection_keeps_w_hr_on_chip_in_the_forward_too():
    # LSTM fp16 B=16 H=768 P=384: W_hh's block (64 x 384, padded to 512) and W_hr's (16
    # features x 768 columns in 24 pieces of 32, batched 8 at a time like the gathering
    # backward's), with their operands, 128 KB.
    layer = shape("lstm-proj")
    for backward in (False, True):
        plan = launch.gpu_plan(layer, H100_SMS, backward)
        assert plan.resident and plan.options["RESIDENT_PROJ"]
    options = launch.gpu_plan(layer, H100_SMS, backward=False).options
    assert (options["BLOCK_KP"], options["NUM_PIECES_P"], options["GROUP_PIECES_P"]) == (32, 24, 8)
    assert launch.resident_bytes(layer, options, backward=False) == 2 * (64 * 512 + 16 * 768 + 16 * (512 + 768))


@pytest.mark.parametrize(
    "dtype, batch, hidden",
    [(torch.float32, 64, 768), (torch.float16, 256, 1024)],
    ids=["tf32-B64-H768", "fp16-B256-H1024"],
)
def test_forward_streams_w_hr_where_it_does_not_fit_beside_w_hh(monkeypatch, dtype, batch, hidden):
    # TF32 at B=64: W_hh's block and operand take 192 KB already. fp16 at B=256 H=1024: 32-unit
    # blocks of 32 batch rows, a 128 x 32 gate tile, beside which h_raw's pieces spill (Triton 3.6).
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    plan = launch.gpu_plan(shape("lstm-proj", dtype, batch, hidden), H100_SMS, backward=False)
    assert plan.resident and not plan.options["RESIDENT_PROJ"]
    assert plan.options["NUM_PIECES_P"] == 1


def resident_fits(plan, layer, backward, budget=H100_BUDGET):
    """A resident plan's blocks fit the chip: ``budget`` bytes of shared memory for the weight
    blocks and dot operands, registers for the (features, batch) tile - the forward's operand, the
    partial sums over every feature (``TILE_ELEMENTS``), a wave of the gathering backward's operand
    (``OPERAND_BYTES``, in as many waves as ``operand_waves`` allows); batch tiles of at most
    ``LARGEST_BLOCK_B`` rows; blocks of at least 16 features where they are transposed;
    and each program owns exactly one block of units (and of the projection's features). A forward
    that keeps ``W_hr`` on chip too counts its block and operand, with a gate tile of at most
    ``PROJECTION_GATE_TILE``."""
    options = plan.options
    gather = options.get("GATHER", False)
    size = launch.resident_bytes(layer, options, backward)
    if gather:
        operand = launch.wave_columns(options) * options["BLOCK_B"] * layer.dtype.itemsize
        registers = operand <= launch.OPERAND_BYTES and options["BLOCK_U"] >= 16 and options["BLOCK_P"] >= 16
        registers &= options["OPERAND_WAVES"] in launch.operand_waves(options)
    else:
        widest = max(layer.features, layer.hidden if layer.has_proj and backward else 0)
        registers = triton.next_power_of_2(widest) * options["BLOCK_B"] <= launch.TILE_ELEMENTS
    if options["RESIDENT_PROJ"] and not backward:
        registers &= layer.gate_slots * options["BLOCK_U"] * options["BLOCK_B"] <= launch.PROJECTION_GATE_TILE
    programs = plan.grid[1]
    return (size <= budget
            and registers
            and options["BLOCK_B"] <= launch.LARGEST_BLOCK_B
            and programs == triton.cdiv(layer.hidden, options["BLOCK_U"])
            and (not layer.has_proj or programs * options["BLOCK_P"] >= layer.features))


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("cell", CELLS)
def test_every_persistent_plan_fits_the_gpu(cell, dtype, gpu):
    # What a plan counts leaves 27 KB of the GPU's shared memory to the compiler's scratch.
    sms, shared_memory = GPUS[gpu]
    budget = shared_memory - 27 * 1024
    violations = []
    for batch, hidden, directions, backward in itertools.product((1, 16, 64, 256), (256, 768, 1024, 4096), (1, 2),
                                                                 (False, True)):
        layer = shape(cell, dtype, batch, hidden, directions)
        plan = launch.gpu_plan(layer, sms, backward, shared_memory=shared_memory)
        groups, programs, grid_directions = plan.grid
        where = f"B={batch} H={hidden} D={directions} {'backward' if backward else 'forward'}: {plan}"
        if plan.scheme != "persistent" or grid_directions != directions:
            violations.append(f"not a persistent plan over D directions, {where}")
        if groups * programs * directions > sms:
            violations.append(f"{groups * programs * directions} programs, {where}")
        if plan.resident and not resident_fits(plan, layer, backward, budget):
            violations.append(f"resident blocks do not fit, {where}")
        stepwise = launch.gpu_plan(layer, sms, backward, scheme="stepwise", shared_memory=shared_memory)
        if stepwise.resident and not resident_fits(stepwise, layer, backward, budget):
            violations.append(f"stepwise resident blocks do not fit, {where}")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("backward", [False, True])
def test_a_gpu_with_fewer_sms_than_directions_runs_a_step_a_launch(backward):
    # One SM (an MPS share of 1%) cannot hold a program of each direction at once.
    plan = launch.gpu_plan(shape(directions=2), 1, backward)
    assert plan.scheme == "stepwise" and plan.grid[2] == 2
    assert launch.gpu_plan(shape(directions=1), 1, backward).scheme == "persistent"


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(shape(dtype=torch.float16, hidden=4096), id="fp16-H4096"),
        pytest.param(shape(dtype=torch.float32, hidden=2048), id="fp32-H2048"),
        pytest.param(shape(dtype=torch.float16, hidden=4096, directions=2), id="fp16-H4096-bidirectional"),
        pytest.param(shape("lstm-proj", torch.float32, hidden=2048, proj=1024), id="fp32-H2048-P1024"),
    ],
)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_large_weights_stream_through_a_persistent_launch(layer, backward):
    plan = launch.gpu_plan(layer, H100_SMS, backward)
    assert plan.scheme == "persistent"
    assert not plan.resident and not plan.options["RESIDENT_PROJ"]
    groups, programs, directions = plan.grid
    assert groups * programs * directions <= H100_SMS


def test_small_weights_stay_resident():
    # The counterpart of the streaming test: H=1024 fp16 still fits.
    assert launch.gpu_plan(shape(hidden=1024), H100_SMS, backward=True).resident


@pytest.mark.parametrize("columns", [1, 16, 17, 100, 300, 384, 512, 600, 768, 1000, 1024, 2304, 3072, 4000, 4096])
def test_resident_block_pieces_cover_the_columns_in_one_power_of_two(columns):
    width, count = launch.pieces(columns)
    assert width >= 16 and width & (width - 1) == 0 and width <= launch.MAX_PIECE_COLUMNS
    assert columns <= width * count < columns + width
    # Little padding (an eighth, or 32 columns), and no more pieces than that needs.
    assert 8 * (width * count - columns) <= max(columns, 256)
    assert width == launch.MAX_PIECE_COLUMNS or count == 1 or 8 * (triton.cdiv(columns, 2 * width) * 2 * width
                                                                    - columns) > max(columns, 256)


def test_headline_blocks_come_in_pieces():
    # The gathering backward's 3072 gate rows in 48 pieces of 64, batched 8 at a time (a piece a
    # warp: in fewer, larger groups Triton 3.6 spilled or repeated the product on several warps);
    # the GRU's 2304 in 72 pieces of 32, as 36 of 64 would not fill groups of 8; the parts
    # backward's 768 features in 3 of 256, unpadded; the forward's 768 features padded to 1024:
    # one piece for its 64-row blocks (HGMMA; in chained pieces those spilled), 8 pieces of 128 in
    # one batched tl.dot for 32-row blocks.
    assert launch.pieces(768) == (256, 3) and launch.pieces(3072) == (256, 12)
    options = launch.gpu_plan(shape(), H100_SMS, backward=True).options
    assert (options["BLOCK_K"], options["NUM_PIECES"], options["GROUP_PIECES"]) == (64, 48, 8)
    options = launch.gpu_plan(shape(cell="gru"), H100_SMS, backward=True).options
    assert (options["BLOCK_K"], options["NUM_PIECES"], options["GROUP_PIECES"]) == (32, 72, 8)
    for directions in (1, 2):
        options = launch.gpu_plan(shape(directions=directions), H100_SMS, backward=False).options
        assert options["BLOCK_U"] == 16
        assert (options["BLOCK_K"], options["NUM_PIECES"], options["GROUP_PIECES"]) == (1024, 1, 1)
    options = launch._options(shape(), 16, 8, 16, 96, 16, resident=True, backward=False)
    assert (options["BLOCK_K"], options["NUM_PIECES"], options["GROUP_PIECES"]) == (128, 8, 8)
    options = launch.gpu_plan(shape(), H100_SMS, backward=True, gather=False).options
    assert (options["BLOCK_K"], options["NUM_PIECES"], options["GROUP_PIECES"]) == (256, 3, 1)


def test_the_tf32_forward_batches_all_its_pieces_at_once(monkeypatch):
    # 8 pieces of 128 x 16 x 4 bytes: in two groups of 4 they spilled with Triton 3.6.
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    options = launch.gpu_plan(shape(dtype=torch.float32), H100_SMS, backward=False).options
    assert (options["DOT_PRECISION"], options["NUM_PIECES"], options["GROUP_PIECES"]) == ("tf32", 8, 8)


@pytest.mark.parametrize("rnn, cudnn, expected", [
    ("ieee", "none", "ieee"), ("tf32", "none", "tf32"), ("none", "tf32", "tf32"), ("none", "ieee", "ieee"),
])
def test_fp32_follows_the_precision_of_cudnns_rnn_set_with_the_newer_api(monkeypatch, request, rnn, cudnn, expected):
    # Convolutions set apart from the RNN: torch.backends.cudnn.allow_tf32 raises on being read.
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    flags = torch.backends.cudnn, torch.backends.cudnn.rnn, torch.backends.cudnn.conv
    saved = [flag.fp32_precision for flag in flags]
    request.addfinalizer(lambda: [setattr(flag, "fp32_precision", value) for flag, value in zip(flags, saved)])
    for flag, value in zip(flags, (cudnn, rnn, "ieee" if expected == "tf32" else "tf32")):
        flag.fp32_precision = value
    options = launch.gpu_plan(shape(dtype=torch.float32), H100_SMS, backward=False).options
    assert options["DOT_PRECISION"] == expected


@pytest.mark.parametrize("tf32", [False, True], ids=["half", "tf32"])
def test_every_batched_product_of_the_grid_gives_each_warp_a_piece(monkeypatch, tf32):
    # In a group of fewer pieces than warps Triton 3.6 repeated each product on 2 to 4 warps (the
    # forward at P = 256 in 2 pieces of 128; python -m bench.kernels --all, 2026-12-06).
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    dtype = torch.float32 if tf32 else torch.float16
    warps = launch.COMPILE_OPTIONS["num_warps"]
    for cell, batch, hidden, backward in itertools.product(CELLS, (1, 16, 64, 256), (256, 768, 1024), (False, True)):
        options = launch.gpu_plan(shape(cell, dtype, batch, hidden), H100_SMS, backward).options
        assert options["GROUP_PIECES"] in (1, warps) and options["GROUP_PIECES_P"] in (1, warps), (cell, batch, hidden)


@pytest.mark.parametrize("columns, widest, narrowest, expected", [
    (3072, 64, 32, (64, 48)),  # the headline's gathering backward: 6 groups of 8
    (2304, 64, 32, (32, 72)),  # the GRU's at H = 768: 36 pieces of 64 would make groups of 4
    (1440, 64, 32, (64, 24)),  # the GRU's at H = 480: 23 of 64 or 45 of 32, padded to 3 groups of 8
    (720, 64, 32, (32, 24)),   # the GRU's at H = 240: 12 of 64 padded to 16 take more columns
    (2880, 64, 32, (64, 48)),  # the LSTM's at H = 720: 45 of 64 padded to 6 groups
    (256, 128, 16, (32, 8)),   # the forward at P = 256: 2 pieces of 128 left warps repeating
    (32, 16, 16, (16, 2)),     # at least two pieces, of tl.dot's least 16
    (240, 32, 16, (32, 8)),    # W_hr over H = 240: a power of two, not 240 // 8 = 30
    (120, 32, 16, (16, 8)),    # W_hr over P = 120
    (48, 32, 16, (16, 4)),     # fewer than 8: a power of two of them
])
def test_batched_pieces_fill_whole_groups_then_take_the_fewest_columns(columns, widest, narrowest, expected):
    width, count = launch.batched_pieces(columns, widest, narrowest)
    group = min(count, launch.COMPILE_OPTIONS["num_warps"])
    assert (width, count) == expected and width * count >= columns and width & (width - 1) == 0
    assert count % group == 0 and group & (group - 1) == 0


@pytest.mark.parametrize("columns, widest, narrowest, expected", [
    (2880, 64, 32, (32, 90)),  # the LSTM's gathering backward at H = 720: groups of 2
    (1440, 64, 32, (32, 45)),  # the GRU's at H = 480: one piece a group
    (720, 64, 32, (64, 12)),   # groups of 4
])
def test_batched_pieces_without_padding_cover_the_columns_in_the_largest_groups(columns, widest, narrowest, expected):
    assert launch.batched_pieces(columns, widest, narrowest, whole_groups=False) == expected


def test_gathering_backward_pads_its_pieces_in_waves_rather_than_multiply_in_small_groups(no_forced_plan):
    # LSTM H=720 P=240, fp16, B=64: 2880 gate rows padded to 3072 and W_hr's 256 columns, with their
    # operands, need 208 KB at once; unpadded 196 KB, but 90 pieces of 32 make groups of 2, each
    # product repeated on 4 warps. Padded, the gate gradients come in waves: of 32 batch rows in 3
    # (184 KB), one tile a program, rather than 2 tiles of 16 in 2 waves each. Without the
    # projection the padded pieces fit in one wave.
    assert launch.batched_pieces(2880, 64, 32, whole_groups=False) == (32, 90)
    for layer, waves in ((shape("lstm-proj", batch=64, hidden=720, proj=240), 3), (shape(batch=64, hidden=720), 1)):
        plan = launch.gpu_plan(layer, H100_SMS, backward=True)
        assert plan.options["GATHER"] and plan.options["OPERAND_WAVES"] == waves
        assert (plan.options["NUM_PIECES"], plan.options["GROUP_PIECES"]) == (48, 8)
        assert launch._fits(layer, plan.options, backward=True, budget=H100_BUDGET)


def test_tf32_backward_sums_parts_where_its_pieces_make_no_whole_groups_in_one_wave(monkeypatch):
    # The TF32 projection at H=328, P=120: 1312 gate rows padded to 24 pieces of 64 need 208 KB with
    # their operand, and TF32 takes one wave. Its 41 unpadded pieces of 32 fit (180 KB), but in
    # groups of 1: every warp ran all of them, 332 HMMA in a chain of 164 (Triton 3.9 and 3.6).
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    layer = shape("lstm-proj", dtype=torch.float32, hidden=328, proj=120)
    options = gathering_options(layer, 16)
    assert launch.group_pieces(layer, *launch.batched_pieces(1312, 64, 32, whole_groups=False), 16) == 1
    assert not launch._fits(layer, options, backward=True, budget=H100_BUDGET) and fits_in_some_waves(layer, options)
    plan = launch.gpu_plan(layer, H100_SMS, backward=True)
    assert plan.resident and not plan.options["GATHER"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_batched_groups_divide_the_pieces_and_bound_their_operand(dtype):
    for block_k, num_pieces, block_b in itertools.product((16, 32, 128, 256), (1, 2, 3, 8, 12), (16, 32)):
        group = launch.group_pieces(shape(dtype=dtype), block_k, num_pieces, block_b)
        assert group & (group - 1) == 0 and num_pieces % group == 0 and group <= launch.COMPILE_OPTIONS["num_warps"]
        assert group == 1 or group * block_k * block_b * dtype.itemsize <= launch.GROUP_OPERAND_BYTES
        assert dtype != torch.float64 or group == 1


@pytest.mark.parametrize("features", [1, 15, 16, 17, 760, 768, 1000])
def test_partial_sum_rows_are_padded_to_a_multiple_of_16(features):
    columns = launch.partial_columns(features)
    assert columns % 16 == 0 and features <= columns < features + 16


@pytest.mark.parametrize("has_proj", [False, True], ids=["no-proj", "proj"])
def test_sequences_past_the_barrier_counters_int32_range_launch_stepwise(has_proj):
    """The persistent barrier counters reach n_u * 2 * steps; from 2**31 on they would wrap."""
    layer = shape("lstm-proj" if has_proj else "lstm")
    programs = launch.gpu_plan(layer, H100_SMS, backward=False).grid[1]
    longest = (2**31 - 1) // (2 * programs)
    below = launch.gpu_plan(shape("lstm-proj" if has_proj else "lstm", steps=longest), H100_SMS, backward=False)
    beyond = launch.gpu_plan(shape("lstm-proj" if has_proj else "lstm", steps=longest + 1), H100_SMS, backward=False)
    assert programs * 2 * longest < 2**31 <= programs * 2 * (longest + 1)
    assert below.scheme == "persistent" and below.grid[1] == programs
    assert beyond.scheme == "stepwise"


@pytest.mark.parametrize("backward", [False, True])
def test_a_resident_block_fits_a_budget_of_exactly_its_bytes(backward):
    # The budget is what a program may count (shared_memory_budget): reaching it exactly still fits.
    plan = launch.gpu_plan(shape(), H100_SMS, backward)
    needed = launch.resident_bytes(shape(), plan.options, backward)
    assert plan.resident and launch._fits(shape(), plan.options, backward, needed)
    assert not launch._fits(shape(), plan.options, backward, needed - 1)


@pytest.mark.parametrize("block_u, keeps", [(16, True), (32, False)])
def test_the_forward_keeps_w_hr_up_to_a_gate_tile_of_64_by_32_inclusive(block_u, keeps):
    # 4 gates x 16 units x 32 rows is PROJECTION_GATE_TILE itself: kept; 32 units on 32 rows is not.
    layer = shape("lstm-proj", batch=32)
    programs = triton.cdiv(layer.hidden, block_u)
    block_p = launch._pow2(triton.cdiv(layer.features, programs))
    options = launch._options(layer, 32, block_u, block_p, programs, 16, resident=True, backward=False,
                              resident_proj=True)
    assert launch.resident_bytes(layer, options, backward=False) <= H100_BUDGET or not keeps
    assert launch._projection_fits(layer, options, H100_BUDGET) == keeps


@pytest.mark.parametrize("batch", [1, 3, 8, 15])
@pytest.mark.parametrize("backward", [False, True])
def test_a_batch_below_16_still_takes_16_row_tiles(batch, backward):
    # tl.dot wants 16 rows at least: a small batch pads its tile rather than shrink it.
    for weights in ("resident", "streaming"):
        plan = launch.gpu_plan(shape(batch=batch), H100_SMS, backward, weights=weights)
        assert plan.options["BLOCK_B"] == 16 and plan.grid[0] == 1, (weights, plan)


def test_a_sequence_whose_barrier_count_reaches_2_to_the_31_exactly_launches_stepwise():
    # 32 programs (a power of two): 32 * 2 * 2**25 arrivals is 2**31, one past int32's largest.
    programs = launch.gpu_plan(shape(hidden=512), H100_SMS, backward=False).grid[1]
    assert programs == 32
    steps = 2**31 // (2 * programs)
    assert launch.gpu_plan(shape(hidden=512, steps=steps - 1), H100_SMS, backward=False).scheme == "persistent"
    assert launch.gpu_plan(shape(hidden=512, steps=steps), H100_SMS, backward=False).scheme == "stepwise"


@pytest.mark.parametrize("backward", [False, True])
def test_a_streaming_stepwise_plan_runs_a_program_per_block_not_per_sm(backward):
    # Streaming persistent programs walk every n_u-th block, n_u at most the SMs (132 of H = 4096's
    # 256 blocks of 16 units); a stepwise launch holds no barrier, so it takes one program a block.
    layer = shape(hidden=4096)
    persistent = launch.gpu_plan(layer, H100_SMS, backward)
    stepwise = launch.gpu_plan(layer, H100_SMS, backward, scheme="stepwise")
    assert not persistent.resident and persistent.grid[1] == H100_SMS
    assert stepwise.scheme == "stepwise" and not stepwise.resident
    assert stepwise.grid[1] == triton.cdiv(layer.hidden, stepwise.options["BLOCK_U"]) > H100_SMS


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "lstm-proj"])
def test_interpreter_persistent_plan_runs_one_program_per_direction(no_forced_plan, cell, directions):
    # The interpreter runs a grid's programs one after another: a second program of the same batch
    # group would wait forever at the first barrier.
    for backward in (False, True):
        plan = launch.plan(shape(cell, torch.float32, batch=67, hidden=70, directions=directions, proj=65), CPU,
                           backward)
        assert plan.scheme == "persistent" and plan.resident
        assert plan.grid == (1, 1, directions)
        assert plan.options["BLOCK_U"] >= 70 and plan.options["BLOCK_B"] == 64


@pytest.mark.parametrize(
    "cell, dtype, largest_resident",
    [("lstm", torch.float32, 512), ("rnn", torch.float16, 1024), ("lstm", torch.float64, 128)],
)
def test_interpreter_streams_weights_whose_tiles_it_refuses(no_forced_plan, cell, dtype, largest_resident):
    # The interpreter refuses a tile of more than 2**20 elements: an LSTM at H = 600 failed with
    # "numel (4194304) exceeds triton maximum tensor numel" before its weights streamed there.
    for hidden, resident in ((largest_resident, True), (largest_resident + 1, False)):
        for backward in (False, True):
            plan = launch.plan(shape(cell, dtype, batch=16, hidden=hidden), CPU, backward)
            assert plan.resident == resident and plan.grid == (1, 1, 1), (hidden, backward)


@pytest.mark.parametrize(
    "cell, units_per_block",
    [("lstm", 8), ("gru", 8), ("rnn", 16)],  # at least 16 rows of W_hh per block for tl.dot
)
@pytest.mark.parametrize("backward", [None, "gather", "partial"], ids=["forward", "gather", "partial"])
def test_interpreter_stepwise_plan_runs_several_programs(no_forced_plan, monkeypatch, cell, units_per_block,
                                                         backward):
    # The gathering backward's transposed blocks hold 16 features at least.
    monkeypatch.setenv("FUSED_RNN_SCHEME", "stepwise")
    if backward:
        monkeypatch.setenv("FUSED_RNN_BACKWARD", backward)
        units_per_block = 16 if backward == "gather" else units_per_block
    plan = launch.plan(shape(cell, torch.float32, batch=67, hidden=70, directions=2), CPU, backward=bool(backward))
    assert plan.scheme == "stepwise" and plan.resident
    assert plan.options.get("GATHER") == (backward == "gather" if backward else None)
    assert plan.options["BLOCK_U"] == units_per_block and plan.options["BLOCK_B"] == 64
    assert plan.grid == (2, triton.cdiv(70, units_per_block), 2)


@pytest.mark.parametrize(
    "scheme, weights",
    [("persistent", "streaming"), ("stepwise", "resident"), ("stepwise", "streaming"), ("persistent", "resident")],
)
@pytest.mark.parametrize("device", [CPU, CUDA], ids=["interpreter", "gpu"])
def test_environment_forces_the_plan(monkeypatch, multiprocessors, device, scheme, weights):
    multiprocessors(H100_SMS)
    monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
    monkeypatch.setenv("FUSED_RNN_WEIGHTS", weights)
    for backward in (False, True):
        plan = launch.plan(shape(hidden=256), device, backward)
        assert plan.scheme == scheme
        assert plan.resident == (weights == "resident")


def test_without_the_environment_the_gpu_plan_is_persistent_and_resident(no_forced_plan, multiprocessors):
    multiprocessors(H100_SMS)
    plan = launch.plan(shape(), CUDA, backward=False)
    assert plan == launch.gpu_plan(shape(), H100_SMS, backward=False)
    assert plan.scheme == "persistent" and plan.resident


def test_the_backward_summing_parts_on_32_row_tiles_counts_their_scratch(monkeypatch):
    # Compiled for sm_90 (bench.kernels, Triton 3.9 and 3.6), this plan counted 200 KB and took
    # 228 KB of the 227 a program may have: its launch would fail. Counting the wider tiles'
    # scratch, the plan takes 32-unit blocks, 114 KB compiled.
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    layer = launch.Shape(dtype=torch.float32, batch=256, hidden=264, features=100, directions=2, num_gates=4,
                         has_proj=True, steps=1)
    options = launch.gpu_plan(layer, H100_SMS, backward=True).options
    assert not options["GATHER"] and (options["BLOCK_B"], options["BLOCK_U"]) == (32, 32)
    refused = dict(options, BLOCK_U=64, BLOCK_P=32, BLOCK_KP=32, NUM_PIECES_P=9, BLOCK_K=128, NUM_PIECES=1)
    assert launch.resident_bytes(layer, refused, backward=True) > H100_BUDGET


def test_an_h100_plan_counts_200_kb_of_its_227(multiprocessors):
    # The committed compiler reports (bench/results/kernels-sm90-*) hold the plans of 200 KB; the
    # default of gpu_plan is an H100's shared memory, and launch.plan reads the device's.
    assert launch.shared_memory_budget(launch.H100_SHARED_MEMORY) == H100_BUDGET
    for backward in (False, True):
        layer = shape(hidden=1024)
        h100 = launch.gpu_plan(layer, H100_SMS, backward, shared_memory=227 * 1024)
        assert launch.gpu_plan(layer, H100_SMS, backward) == h100
        multiprocessors(H100_SMS, 227 * 1024)
        assert launch.plan(layer, CUDA, backward) == h100


@pytest.mark.parametrize(
    "gpu, forward, backward",
    [("A100", (True, False, 96), (True, True, 48)), ("L40S", (False, False, 48), (True, False, 96))],
)
def test_a_gpu_with_less_shared_memory_plans_smaller_blocks(no_forced_plan, multiprocessors, gpu, forward, backward):
    # The headline's 48 forward programs count 160 KB each (128 KB of W_hh, 32 KB of h_{t-1}), its
    # gathering backward's 192 KB: more than an A100's 163 KB or an L40S's 99 KB allow. An A100
    # takes 96 forward programs of 8 units (96 KB) and gathers in 3 waves (128 KB); on an L40S the
    # forward's 8-unit blocks (96 KB) do not fit either, 4-unit ones would need 192 SMs: it streams,
    # and the backward sums parts in 8-unit blocks (49 KB). (resident, gather, programs) each.
    sms, shared_memory = GPUS[gpu]
    budget = shared_memory - 27 * 1024
    for is_backward, expected in ((False, forward), (True, backward)):
        h100 = launch.gpu_plan(shape(), H100_SMS, is_backward)
        assert launch.resident_bytes(shape(), h100.options, is_backward) > budget
        plan = launch.gpu_plan(shape(), sms, is_backward, shared_memory=shared_memory)
        assert (plan.resident, plan.options.get("GATHER", False), plan.grid[1]) == expected
        assert not plan.resident or launch.resident_bytes(shape(), plan.options, is_backward) <= budget
        multiprocessors(sms, shared_memory)
        assert launch.plan(shape(), CUDA, is_backward) == plan


def test_a_resident_plan_whose_blocks_miss_units_is_refused(monkeypatch):
    # A resident program loads only its block, at program_id(1): 47 programs of 16 units would
    # leave the last 16 of H = 768 with no weights.
    found = launch.gpu_plan(shape(), H100_SMS, backward=False)
    short = launch.Plan(found.scheme, (1, 47, 1), found.options, found.two_phases)
    monkeypatch.setattr(launch, "_resident_persistent_plan", lambda *args, **kwargs: short)
    with pytest.raises(AssertionError):
        launch.gpu_plan(shape(), H100_SMS, backward=False)


def test_a_gpu_plan_is_made_once_for_each_thing_it_depends_on(no_forced_plan, multiprocessors, monkeypatch,
                                                               request):
    # Ranking the candidates costs up to 0.8 ms of Python a launch; launch.plan keeps what it made,
    # keyed by everything the plan reads: the SMs and shared memory, the forced choices, cuDNN's
    # TF32 switch; not the sequence's length, which only the barrier counters' check reads.
    made = []
    any_length = launch.Plan("persistent", (1, 1, 1), {}, False)  # a stand-in for the plans
    monkeypatch.setattr(launch, "_any_length_plan", lambda *args: made.append(args) or any_length)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    launch._gpu_plan_once.cache_clear()
    request.addfinalizer(launch._gpu_plan_once.cache_clear)  # drop the stand-ins
    multiprocessors(H100_SMS)
    for steps in (100, 100, 7, 5000):
        launch.plan(shape(dtype=torch.float32, steps=steps), CUDA, backward=False)
    assert len(made) == 1
    fp32 = shape(dtype=torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    launch.plan(fp32, CUDA, backward=False)
    multiprocessors(66)
    launch.plan(fp32, CUDA, backward=False)
    multiprocessors(66, 163 * 1024)
    launch.plan(fp32, CUDA, backward=False)
    multiprocessors(66, 163 * 1024, tensor_cores=False)
    launch.plan(fp32, CUDA, backward=False)
    monkeypatch.setenv("FUSED_RNN_SCHEME", "stepwise")
    launch.plan(fp32, CUDA, backward=False)
    launch.plan(fp32, CUDA, backward=True)
    assert len(made) == 7


def test_sequences_of_every_length_share_one_cached_plan(no_forced_plan, multiprocessors, request):
    # Variable-length batches: a new T finds the plan made for another, the same plan, until the
    # barrier counters would overflow, where it launches stepwise with the same blocks.
    launch._gpu_plan_once.cache_clear()
    request.addfinalizer(launch._gpu_plan_once.cache_clear)
    multiprocessors(H100_SMS)
    short = launch.plan(shape(steps=10), CUDA, backward=True)
    longer = launch.plan(shape(steps=4321), CUDA, backward=True)
    assert longer is short and launch._gpu_plan_once.cache_info().misses == 1
    assert short == launch.gpu_plan(shape(steps=10), H100_SMS, backward=True)
    longest = (2**31 - 1) // (2 * short.grid[1])
    assert launch.plan(shape(steps=longest), CUDA, backward=True) is short
    beyond = launch.plan(shape(steps=longest + 1), CUDA, backward=True)
    assert beyond == launch.gpu_plan(shape(steps=longest + 1), H100_SMS, backward=True)
    assert beyond.scheme == "stepwise" and beyond.options["BLOCK_U"] == short.options["BLOCK_U"]
    assert launch._gpu_plan_once.cache_info().misses == 1


def test_a_cached_gpu_plan_follows_the_tf32_switch(no_forced_plan, multiprocessors, monkeypatch):
    multiprocessors(H100_SMS)
    monkeypatch.setattr(launch, "interpreting", lambda: False)  # fp32 dots in TF32, as on a GPU
    for allowed in (True, False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allowed)
        plan = launch.plan(shape(dtype=torch.float32), CUDA, backward=False)
        assert plan.options["DOT_PRECISION"] == ("tf32" if allowed else "ieee")


@pytest.mark.parametrize("variable", ["FUSED_RNN_SCHEME", "FUSED_RNN_WEIGHTS", "FUSED_RNN_BACKWARD"])
def test_unknown_forced_value_is_rejected_naming_the_variable(no_forced_plan, monkeypatch, variable):
    monkeypatch.setenv(variable, "sequential")
    with pytest.raises(ValueError, match=f"{variable} must be one of .*'sequential'"):
        launch.plan(shape(), CPU, backward=False)


@pytest.mark.parametrize("share, usable", [(None, 132), ("50", 66), ("1", 1)])
def test_mps_thread_percentage_limits_the_usable_sms(monkeypatch, share, usable):
    # An H100's properties as torch reports them; MPS leaves a program's shared memory as it is.
    properties = SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=232448, major=9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    if share is None:
        monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    else:
        monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", share)
    assert launch._device_limits.__wrapped__(0) == (usable, 232448, True)


@pytest.mark.parametrize("major, tensor_cores", [(7, False), (8, True), (9, True), (12, True)])
def test_the_compute_capability_says_whether_dots_run_on_tensor_cores(monkeypatch, major, tensor_cores):
    # A T4 (sm_75) as torch reports it, and the same with a later major version.
    properties = SimpleNamespace(multi_processor_count=40, shared_memory_per_block_optin=65536, major=major)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    assert launch._device_limits.__wrapped__(0) == (40, 65536, tensor_cores)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm-proj", "rnn"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_weights_stream_on_a_gpu_whose_dots_have_no_tensor_cores(no_forced_plan, multiprocessors, monkeypatch,
                                                                 request, cell, backward):
    # On a T4 (40 SMs, 64 KB a program) Triton's products are FMAs, whose operands took up to 2.8
    # times the shared memory a resident plan counts, and spilled; B=16 H=256 fits that plan's count.
    layer = shape(cell, hidden=256, proj=128 if cell == "lstm-proj" else None)
    t4 = dict(shared_memory=64 * 1024)
    assert launch.gpu_plan(layer, 40, backward, **t4).resident
    plan = launch.gpu_plan(layer, 40, backward, **t4, tensor_cores=False)
    assert plan.scheme == "persistent" and not plan.resident and not plan.options["RESIDENT_PROJ"]
    multiprocessors(40, 64 * 1024, tensor_cores=False)
    launch._gpu_plan_once.cache_clear()
    request.addfinalizer(launch._gpu_plan_once.cache_clear)  # drop the pretend T4's plans
    assert launch.plan(layer, CUDA, backward) == plan
    monkeypatch.setenv("FUSED_RNN_WEIGHTS", "resident")  # a forced choice still decides
    assert launch.plan(layer, CUDA, backward).resident


class FakeKernel:
    """Stands in for a Triton kernel: records ``(grid, args, kwargs)`` of every launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def fake_launch(scheme, two_phases, num_steps=3, grid=(2, 3, 2)):
    kernel, x = FakeKernel(), torch.randn(4)
    plan = launch.Plan(scheme, grid, {"RESIDENT": True, "BLOCK_U": 8}, two_phases)
    launch.launch(kernel, (x, 7), plan, num_steps, NUM_GATES=4)
    for grid_launched, args, kwargs in kernel.launches:
        assert grid_launched == grid
        assert args[:2] == (x, 7)
        assert kwargs["RESIDENT"] is True and kwargs["BLOCK_U"] == 8 and kwargs["NUM_GATES"] == 4
        assert all(kwargs[name] == value for name, value in launch.COMPILE_OPTIONS.items())
    return kernel.launches


@pytest.mark.parametrize("two_phases", [False, True], ids=["no-proj", "proj"])
def test_stepwise_launches_each_step_without_a_barrier(two_phases):
    launches = fake_launch("stepwise", two_phases)
    phases = (1, 2) if two_phases else (0,)
    expected = [(None, step, step + 1, phase) for step in range(3) for phase in phases]
    assert [(*args[2:], kwargs["STEP_PHASE"]) for _, args, kwargs in launches] == expected


@pytest.mark.parametrize("two_phases", [False, True], ids=["no-proj", "proj"])
def test_persistent_launches_once_with_a_zeroed_barrier_per_batch_group_and_direction(two_phases):
    launches = fake_launch("persistent", two_phases, num_steps=5)
    assert len(launches) == 1
    _, args, kwargs = launches[0]
    barrier, step_begin, step_end = args[2:]
    assert (step_begin, step_end, kwargs["STEP_PHASE"]) == (0, 5, 0)
    assert barrier.dtype == torch.int32 and torch.equal(barrier, torch.zeros(2 * 2, dtype=torch.int32))
    assert kwargs["launch_cooperative_grid"] is False  # cooperative launches are for CUDA


def test_launches_on_the_device_of_its_tensors_not_the_current_one(monkeypatch):
    # Triton launches on the current device; tensors on another GPU must make theirs current.
    # Without a GPU, torch.cuda.device is replaced by a recorder.
    events = []

    @contextlib.contextmanager
    def device(which):
        events.append(("enter", which))
        yield
        events.append(("exit", which))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", kwargs["STEP_PHASE"]))

    monkeypatch.setattr(torch.cuda, "device", device)
    on_gpu_1 = SimpleNamespace(device=torch.device("cuda", 1))
    launch.launch(Kernel(), (on_gpu_1,), launch.Plan("stepwise", (1, 1, 1), {}, False), num_steps=2)
    gpu_1 = torch.device("cuda", 1)
    assert events == [("enter", gpu_1), ("launch", 0), ("launch", 0), ("exit", gpu_1)]


class RecordingBarrier:
    """Stands in for a Triton kernel, runs it, and records the grid and barrier counters
    (``barrier_ptr``) of every launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def recording(*args, **kwargs):
            self.launches.append((tuple(grid), args[-3]))
            return run(*args, **kwargs)

        return recording


@pytest.mark.parametrize("mode, proj", [("RNN_TANH", None), ("LSTM", 3)], ids=["rnn", "lstm-proj"])
def test_each_batch_group_and_direction_counts_only_its_own_programs_arrivals(monkeypatch, no_forced_plan, mode,
                                                                              proj):
    # sync_programs: the n_u programs of (batch group, direction) meet at counter
    # direction * n_b + group, one arrival each a barrier: one a step, two with a projection
    # (the cell, then the projection). After a persistent launch every counter holds exactly its
    # own programs' arrivals; under the interpreter the programs run one after another, so a
    # counter shared between directions, or one that starts above zero, would never make a
    # barrier wait and shows only here.
    T = 3
    case = Case(mode, T, 3, 5, proj, D=2)
    forward, backward = RecordingBarrier(recurrence.forward_kernel), RecordingBarrier(recurrence.backward_kernel)
    monkeypatch.setattr(recurrence, "forward_kernel", forward)
    monkeypatch.setattr(recurrence, "backward_kernel", backward)
    inputs = make_inputs(case)
    outputs = inputs.run(functional.layer, mode)
    torch.autograd.grad(outputs, [tensor for _, tensor in inputs.differentiable()],
                        [torch.randn_like(y) for y in outputs])
    barriers_a_step = 2 if proj else 1
    for kernel in (forward, backward):
        [(grid, barrier)] = kernel.launches
        groups, programs, directions = grid
        assert directions == 2
        assert barrier.tolist() == [programs * barriers_a_step * T] * (directions * groups), grid
