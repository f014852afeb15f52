"""How a recurrence is launched: the plan (scheme, resident or streamed weights, block sizes,
grid), the precision, the grid barrier, and the launch itself.

Launch schemes (both run the same kernels: a persistent launch walks all ``T`` steps, a stepwise
one ``[step_begin, step_end)``, ``recurrence.step_bounds``):

* ``persistent`` - one launch per layer, both directions. Grid ``(n_b, n_u, D)``: the ``n_u``
  programs of a batch group and direction walk every timestep and meet at a barrier
  (``sync_programs``) after each step. On a GPU every program has an SM to itself (the launch is
  cooperative: the driver refuses a grid it cannot keep resident rather than letting it hang)
  and, where the weights fit on chip, its block of ``W_hh`` stays there for the whole launch.
  Under ``TRITON_INTERPRET=1``, which runs a grid's programs one after another, ``n_u`` is 1:
  no program ever waits for another.
* ``stepwise`` - one launch per timestep (two with a projection, one per phase), grid
  ``(batch tiles, unit blocks, D)``: each program
  has one block and the launch boundary orders the steps, so no program ever waits. It is how the
  interpreter runs the many-program tiling of the GPU (the backward's exchanges between programs
  included), and a baseline to compare the persistent scheme with on a GPU.

The backward carries the gradient through ``W_hh`` one of two ways (``recurrence.backward_kernel``):
``gather`` (every program reads all gate gradients, the default where its transposed blocks fit on
an SM) or ``partial`` (partial sums, the finer tiling; also wherever the weights stream, and
where rows of ``H`` are not in vectors: ``gpu_plan``).

``FUSED_RNN_SCHEME`` (``persistent`` / ``stepwise``) forces a scheme; ``FUSED_RNN_WEIGHTS=streaming``
forces streamed weights (``resident``, the default, keeps them on chip where they fit);
``FUSED_RNN_BACKWARD=partial`` the partial sums. The tests use them to run every path on the CPU.
"""

import contextlib
import dataclasses
import functools
import os
import threading

import torch
import triton
import triton.language as tl

from . import cost

SCHEMES = ("persistent", "stepwise")
WEIGHTS = ("resident", "streaming")
BACKWARDS = ("gather", "partial")

# How every kernel is compiled. 8 warps give the resident weight block's tl.dot enough threads;
# no software pipelining (num_stages=1), so a loop-invariant dot operand stays where it was
# loaded, in shared memory, instead of being re-staged every step. ``maxnreg`` tells ptxas the
# whole register file is ours (a persistent program has an SM to itself); without it ptxas 12.8
# (Triton 3.6) keeps to 80-128 registers for occupancy and spills. Multiply-adds fuse into FMAs
# (``enable_fp_fusion``), as cuDNN's do: Triton 3.9 fuses by default but warns at every first
# compile that 3.10 will not; named, the numerics stay the same across Triton versions.
# ``python -m bench.kernels`` prints the compiler's report.
COMPILE_OPTIONS = dict(num_warps=8, num_stages=1, maxnreg=255, enable_fp_fusion=True)

# Triton lowers ``tl.dot`` to tensor-core instructions from sm_80 on. Before (a T4 or an RTX 20xx,
# sm_75; a V100, sm_70) its products are FMAs on operands held in other layouts: compiled for a
# T4, resident plans took up to 2.8 times the shared memory they count (the fp16 LSTM backward at
# B=64 H=256, both directions: 80 KB, of the 64 a T4 gives a program) and spilled up to 1.3 KB a
# thread (``python -m bench.kernels --arch 75``, Triton 3.9). There the weights stream.
TENSOR_CORE_MAJOR = 8

# Shared memory a program may use on an H100/H200 (its opt-in limit a block,
# ``shared_memory_per_block_optin``): ``gpu_plan``'s default.
H100_SHARED_MEMORY = 227 * 1024
# What the plan counts (the weight blocks and the dot operand tiles, ``resident_bytes``) leaves
# this much of a GPU's limit to the compiler's layout-conversion scratch (``shared_memory_budget``).
# Compiled (bench.kernels, sweeps in docs/performance.md), plans within 8 KB of the budget took at
# most 16 KB more than counted on an H100 (212 KB of 227; Triton 3.6 and 3.9), 24 KB on an A100 and
# 28 on an L40S. Far below the budget one took more (the TF32 LSTM backward at B=64 H=512, both
# directions: 136 KB counted, 168 compiled).
SHARED_MEMORY_MARGIN = 27 * 1024
# The backward that sums parts takes more scratch on 32-row batch tiles: 24 to 32 KB more than
# counted in TF32 (the LSTM's at B=256 H=264 with P=100, both directions, 28 KB: 228 KB of 227,
# a launch the GPU refuses; bench.kernels, Triton 3.9), where 16-row tiles take 16 (the committed
# reports): its plans count this much more.
WIDE_PARTS_SCRATCH = 8 * 1024
# Elements of a (features, batch) tile a program holds in registers: the forward's h_{t-1} operand
# on its way to shared memory, and the partial sums' part of dL/dh: 64 a thread at 8 warps.
TILE_ELEMENTS = 64 * 256
# Bytes of the gathering backward's operand (the gate gradients of a batch tile) loaded at once, in
# registers: 96 registers (384 bytes) a thread at 8 warps. Every piece of a wave is loaded at once,
# so that their L2 round trips overlap (``recurrence.load_operand``); a larger operand comes in
# several waves, one after the other's products (``operand_waves``).
OPERAND_BYTES = 96 * 1024
# Most waves an operand comes in: each adds an L2 round trip to every step.
MAX_OPERAND_WAVES = 4
# Batch rows of a tile on a GPU: wider tiles make the operands and the partial sums spill.
LARGEST_BLOCK_B = 32
# The forward keeps W_hr on chip beside W_hh where the step's gate tile (gate rows x batch rows) is
# at most this: with 128 x 32 (B=256 H=768, 32-unit blocks) it spills 4 bytes a thread (Triton 3.6).
PROJECTION_GATE_TILE = 64 * 32
# K chunk of a streamed block under the interpreter: the least ``tl.dot`` takes, as on a GPU.
INTERPRETER_CHUNK = 16

# ``STEP_PHASE``: a whole step, or (stepwise with a projection, one launch each) the part of a step
# up to the barrier between the cell and the projection, or the part from it.
WHOLE_STEP, UP_TO_BARRIER, FROM_BARRIER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# The forward's batched pieces (``_resident_pieces``): 8 of them at P=768 (padded to 1024), one a warp.
FORWARD_PIECE_COLUMNS = 128
# Bytes of the operand of one batched group of pieces (``group_pieces``): the TF32 forward's 8 pieces
# of 128 x 16 at the headline. In two groups of 4 they spilled 4 bytes a thread with Triton 3.6.
GROUP_OPERAND_BYTES = 64 * 1024
# The widest piece of a resident block (``pieces``): with 1024-column pieces the LSTM's gathering
# backward spills 472 bytes a thread at the headline, with 512 none at 246 registers, with 256 212.
MAX_PIECE_COLUMNS = 256
# The pieces of blocks of 16 (to 32) rows, the gathering backward's and W_hr's, are narrower: 8 of
# them (32 x 16 fp16, 1 KB) make a group (``group_pieces``), whose batched dot gives each warp a
# piece, a chain of 2 dependent HMMA. In groups of 4 pieces of 256 columns (the headline's 12)
# Triton 3.6 spilled 428 bytes a thread, in groups of 8 of 128 412; in groups smaller than the 8
# warps it repeats the product on several warps (python -m bench.kernels, 2026-12-04).
NARROW_PIECE_COLUMNS = 32
# The gathering backward's pieces are twice as wide (where they fill groups as well): its operand
# then takes fewer registers (the GRU's at B=16 H=1024: 232 a thread with Triton 3.6, no spill; in
# pieces of 32, 255 and 44 bytes of spill), for chains of 4 HMMA.
GATHER_PIECE_COLUMNS = 2 * NARROW_PIECE_COLUMNS
# Elements of the (parts, features, batch) tile ``reduce_partials`` loads at once: 8 programs' (16
# units x 16 rows) parts. Twice that spills with Triton 3.6 (python -m bench.kernels --all).
REDUCE_ELEMENTS = 2048
# Units per block the partial-sum backward prefers (``_resident_persistent_plan``).
BACKWARD_UNITS = 16
# Units per block of the streaming path: the gate-major block has at most 64 rows (16 LSTM or GRU
# units) and at most 32 units: with 64, the Elman RNN's exact-fp32 backward needs more than 255
# registers a thread and spills (python -m bench.kernels --all).
STREAMING_ROWS = 64
STREAMING_UNITS = 32

# Triton decides when a kernel is decorated whether it will be interpreted, so read it once too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1`` at import time)."""
    return _INTERPRETING


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels handle this tensor (CUDA, or CPU under the interpreter)."""
    return tensor.is_cuda or (tensor.is_cpu and interpreting())


def empty(*shape, dtype, device) -> torch.Tensor:
    """Allocation for every buffer a kernel fills; tests patch it to poison unwritten memory."""
    return torch.empty(*shape, dtype=dtype, device=device)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and matmul accumulators: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forced(name: str, choices) -> str | None:
    value = os.environ.get(name)
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@functools.lru_cache
def _device_limits(device_index: int) -> tuple:
    """``(SMs, shared memory, tensor cores)`` of a GPU that a plan depends on: the SMs a launch may
    use, the bytes of shared memory a program may opt in to (Triton refuses a kernel that needs
    more: ``OutOfResources``), and whether Triton runs ``tl.dot`` on its tensor cores. A persistent
    grid has at most a program an SM and each fits one alone (8 warps of at most 255 registers take
    65280 of the 65536 of an sm_75 to sm_90 SM), so the cooperative launch finds every program
    resident."""
    properties = torch.cuda.get_device_properties(device_index)
    count = properties.multi_processor_count
    # An MPS client may be limited to a share of the SMs without the device properties saying so.
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if share:
        count = int(count * float(share) / 100)
    return max(1, count), properties.shared_memory_per_block_optin, properties.major >= TENSOR_CORE_MAJOR


def shared_memory_budget(shared_memory: int) -> int:
    """Bytes a resident program's plan may count (``resident_bytes``) on a GPU whose programs may
    use ``shared_memory``: all but ``SHARED_MEMORY_MARGIN``, 200 KB on an H100."""
    return shared_memory - SHARED_MEMORY_MARGIN


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the host. Triton 3.9 makes it and ``next_power_of_2`` ``constexpr``
    functions, which cost 3 to 4 us a call from Python: the launcher calls them on every call, and
    ranking the plans of a new shape hundreds of times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for the host (``cdiv`` says why), for ``n >= 1``."""
    return 1 << (n - 1).bit_length()


def _pow2(size: int, smallest: int = 16) -> int:
    return max(smallest, next_power_of_2(size))


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a plan depends on: one layer's recurrence."""

    dtype: torch.dtype
    batch: int
    hidden: int      # H
    features: int    # P: features of h (proj_size, or H)
    directions: int  # D
    num_gates: int   # G
    has_proj: bool
    steps: int

    @property
    def gate_slots(self) -> int:
        """Rows a unit takes in the gate-major weight block: G rounded up to a power of two."""
        return next_power_of_2(self.num_gates)

    @property
    def smallest_block(self) -> int:
        """Fewest units per block: ``tl.dot`` needs at least 16 rows."""
        return max(1, 16 // self.gate_slots)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one launch runs: scheme, grid ``(n_b, n_u, D)`` and the kernels' block constexprs."""

    scheme: str
    grid: tuple
    options: dict
    two_phases: bool  # the LSTM with proj_size: cell and projection, a barrier between

    @property
    def resident(self) -> bool:
        return self.options["RESIDENT"]


def cudnn_rnn_tf32() -> bool:
    """Whether cuDNN's RNN may take TF32 for fp32, resolved as PyTorch resolves it:
    ``torch.backends.cudnn.rnn.fp32_precision``, where that is "none" cuDNN's, then PyTorch's own
    ``fp32_precision``. (``cudnn.allow_tf32`` sets the RNN's, but reading it raises where the RNN's
    and convolutions' differ: one set with the newer API.)"""
    for precision in (torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def _precision(dtype: torch.dtype) -> dict:
    """fp32 takes TF32 where cuDNN's RNN would (``cudnn_rnn_tf32``). The interpreter's fp16/bf16
    ``tl.dot`` is wrong (triton-lang/triton#11584), so there the operands are upcast."""
    half = dtype in (torch.float16, torch.bfloat16)
    tf32 = dtype == torch.float32 and not interpreting() and cudnn_rnn_tf32()
    return dict(
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if tf32 else "ieee",
        DOT_UPCAST=half and interpreting(),
    )


def _options(shape: Shape, block_b: int, block_u: int, block_p: int, programs: int, chunk: int, *,
             resident: bool, backward: bool, gather: bool = False, resident_proj: bool = False,
             whole_groups: bool = True) -> dict:
    """The block constexprs: resident blocks come in ``NUM_PIECES`` pieces of ``BLOCK_K`` columns
    (``pieces``), batched ``GROUP_PIECES`` at a time, ``W_hr``'s (``resident_proj``) in
    ``NUM_PIECES_P`` of ``BLOCK_KP``, ``GROUP_PIECES_P`` at a time; streamed ones go ``chunk`` at a
    time. The gathering backward multiplies by the transposed blocks
    (``recurrence.backward_kernel``): its ``K`` is ``G * H``, and ``W_hr``'s is ``P``; its operand
    comes in one wave (``OPERAND_WAVES``, more where ``operand_waves`` says). Batched pieces are
    padded to fill whole groups (``batched_pieces``); ``W_hr``'s only with ``whole_groups``.
    """
    batched = resident and (gather if backward else _batches_forward(shape, block_u))
    block_k, num_pieces = _resident_pieces(shape, backward, gather, batched) if resident else (chunk, 1)
    group = group_pieces(shape, block_k, num_pieces, block_b) if batched else 1
    batched_proj = resident_proj and _batches_projection(backward, gather, block_u, block_p)
    block_kp, num_pieces_p = (_projection_pieces(shape, gather, batched_proj, whole_groups) if resident_proj
                              else (chunk, 1))
    group_p = group_pieces(shape, block_kp, num_pieces_p, block_b) if batched_proj else 1
    options = dict(
        RESIDENT=resident,
        RESIDENT_PROJ=resident_proj,
        BLOCK_B=block_b,
        BLOCK_U=block_u,
        BLOCK_P=block_p,
        BLOCK_K=block_k,
        NUM_PIECES=num_pieces,
        GROUP_PIECES=group,
        BLOCK_KP=block_kp,
        NUM_PIECES_P=num_pieces_p,
        GROUP_PIECES_P=group_p,
        ALIGNMENT_H=alignment(shape.hidden),
        ALIGNMENT_P=alignment(shape.features),
        **_precision(shape.dtype),
    )
    if backward:
        options.update(GATHER=gather, OPERAND_WAVES=1,
                       REDUCE_CHUNK=_reduce_chunk(shape, block_b, block_u, block_p, programs))
    return options


def _reduce_chunk(shape: Shape, block_b: int, block_u: int, block_p: int, programs: int) -> int:
    """Programs' parts ``reduce_partials`` loads at once. It sums tiles of ``BLOCK_U`` units, and
    with a projection also of ``BLOCK_P`` features; the projection's backward holds ``W_hr``'s
    block and operand besides: half the elements at once."""
    block_f = max(block_u, block_p) if shape.has_proj else block_u
    reduce_elements = REDUCE_ELEMENTS // 2 if shape.has_proj else REDUCE_ELEMENTS
    return max(1, min(next_power_of_2(programs), reduce_elements // (block_f * block_b)))


def alignment(size: int) -> int:
    """``ALIGNMENT_H`` / ``ALIGNMENT_P``: the largest power of two, at most 16, dividing ``size``
    (``recurrence.aligned``)."""
    return min(16, size & -size)


def rows_in_vectors(size: int) -> bool:
    """Whether rows of ``size`` elements start on 8 elements (16 bytes in fp16 and bf16, 32 in
    fp32), where the compiler reads them in 16-byte vectors: the alignment the plans ask of ``H``
    (and with a projection ``P``) for the gathering backward and 16-unit blocks of parts, of ``P``
    for the forward's 32-row batch tiles (compiled at H = 1000, ``python -m bench.kernels
    --all``)."""
    return alignment(size) >= 8


def partial_columns(features: int) -> int:
    """Row length of the partial-sum buffers: ``features`` rounded up to a multiple of 16, which a
    launch marks divisible by 16 (``recurrence.write_partial`` says why)."""
    return cdiv(features, 16) * 16


def _batches_forward(shape: Shape, block_u: int) -> bool:
    """Whether the forward multiplies its resident block in batched pieces
    (``recurrence.recurrent_matmul``): blocks of fewer than 64 gate rows, which run on ``HMMA``
    anyway (64 rows and more take ``HGMMA``, which a batched ``tl.dot`` would give up), with
    ``P`` at least 32 (two pieces of ``tl.dot``'s least 16) and even (read an element at a time,
    at P = 1000 before ``ALIGNMENT_P`` told the compiler of its multiple of 8, the batched forward
    spilled 8 bytes a thread with Triton 3.6; at P = 300 or 750, multiples of 4 or 2 read in 8-
    or 4-byte vectors in fp16, it runs chains of 4 to 8 ``HMMA`` where one ``tl.dot`` ran 32, no
    spill: ``python -m bench.kernels --all``, 2026-12-06). The gathering backward always batches
    (its blocks have 16 rows); in how many groups, ``group_pieces`` decides."""
    return shape.gate_slots * block_u < 64 and shape.features >= 32 and alignment(shape.features) >= 2


def group_pieces(shape: Shape, block_k: int, num_pieces: int, block_b: int) -> int:
    """Pieces a batched ``tl.dot`` takes at once (``recurrence.recurrent_matmul``): the most, a
    power of two that divides ``num_pieces``, at most one a warp, whose operand stays within
    ``GROUP_OPERAND_BYTES`` (the forward's 8-unit blocks at H = 768: all 8; the headline's
    gathering backward: 6 groups of 8); 1 (a piece at a time) for fp64, which multiplies in
    registers, not with ``tl.dot``. A group of fewer pieces than warps leaves warps repeating each
    other's products (Triton 3.6)."""
    if shape.dtype == torch.float64:
        return 1
    group = _whole_group(num_pieces)
    while group > 1 and group * block_k * block_b * shape.dtype.itemsize > GROUP_OPERAND_BYTES:
        group //= 2
    return group


def _whole_group(num_pieces: int) -> int:
    """The most of ``num_pieces`` pieces a group may take whatever their size: the largest power of
    two that divides ``num_pieces``, at most one a warp."""
    return min(num_pieces & -num_pieces, COMPILE_OPTIONS["num_warps"])


def _resident_pieces(shape: Shape, backward: bool, gather: bool, batched: bool) -> tuple:
    """``(BLOCK_K, NUM_PIECES)`` of a resident ``W_hh`` block. The gathering backward's ``dgates
    W_hh`` sums over the ``G * H`` gate rows, the partial sums' ``W_block^T @ dgates`` give a part
    for each of the ``P`` features: both in ``pieces``, the gathering backward's batched ones of at
    most ``GATHER_PIECE_COLUMNS`` (``batched_pieces``). The forward's ``h_{t-1} W_hh^T`` pads ``P``
    to a power of two: one piece, or where its product is ``batched`` at least two pieces of at
    most ``FORWARD_PIECE_COLUMNS``, 8 where they can. Its 64-row blocks in chained
    pieces spilled (84 bytes a thread in the LSTM's at B=16 H=768, both directions, Triton 3.9;
    ``python -m bench.kernels --all``, 2026-12-02)."""
    if not backward:
        columns = _pow2(shape.features)
        return batched_pieces(columns, min(FORWARD_PIECE_COLUMNS, columns // 2)) if batched else (columns, 1)
    if gather:
        # Not narrower than 32: in pieces of 16 the headline's spilled 8 bytes a thread (Triton 3.6).
        return batched_pieces(shape.num_gates * shape.hidden, GATHER_PIECE_COLUMNS, NARROW_PIECE_COLUMNS)
    return pieces(shape.features)


def batched_pieces(columns: int, widest: int, narrowest: int = 16, whole_groups: bool = True) -> tuple:
    """``(BLOCK_K, NUM_PIECES)`` of a batched product: pieces of a power-of-two width from
    ``widest`` down to ``narrowest``, with ``whole_groups`` as many as fill whole groups (8, one a
    warp, where there are 8 or more; else a power of two), those past ``columns`` zeros; else as
    many as cover ``columns``, in groups of the largest power of two dividing their count
    (``_whole_group``). Of the widths, the one making the largest groups, then the fewest
    columns, then the widest. In a group of fewer pieces than warps Triton 3.6 repeats each
    product on several warps (the forward at P = 256 in 2 pieces of 128: on 2 to 4 of them;
    ``python -m bench.kernels --all``, 2026-12-06), as in the GRU's gathering backward at H = 480
    without padding: its 1440 gate rows in 23 pieces of 64 or 45 of 32, one group on every warp;
    padded, 24 pieces of 64 make 3 groups of 8. The gathering backward always pads, or sums
    parts; the projection's forward pads ``W_hr``'s pieces where they fit beside ``W_hh``'s block
    (``_resident_persistent_plan``)."""
    options = []
    for shift in range(widest.bit_length() - narrowest.bit_length() + 1):
        width = widest >> shift
        count = cdiv(columns, width)
        group = _whole_group(next_power_of_2(count) if whole_groups else count)
        count = cdiv(count, group) * group
        options.append((group, -count * width, width, count))
    _, _, width, count = max(options)
    return width, count


def _batches_projection(backward: bool, gather: bool, block_u: int, block_p: int) -> bool:
    """Whether ``W_hr``'s product is batched like the gathering backward's: the forward's (``BLOCK_P``
    feature rows) and the gathering backward's (``BLOCK_U`` unit rows) where they have fewer than
    64; the partial sums' ``W_block^T @ dh`` has ``H`` rows."""
    return (gather or not backward) and (block_u if gather else block_p) < 64


def _projection_pieces(shape: Shape, gather: bool, batched: bool, whole_groups: bool) -> tuple:
    """``(BLOCK_KP, NUM_PIECES_P)`` of a resident ``W_hr`` block: over its ``P`` columns in the
    gathering backward (the transposed block), else over ``H``; narrow where its product is
    ``batched``."""
    columns = shape.features if gather else shape.hidden
    return batched_pieces(columns, NARROW_PIECE_COLUMNS, whole_groups=whole_groups) if batched else pieces(columns)


def pieces(columns: int, widest: int = MAX_PIECE_COLUMNS) -> tuple:
    """``(BLOCK_K, NUM_PIECES)``: pieces of one power-of-two width, at least 16 (``tl.dot``'s
    least K) and at most ``widest``, that cover ``columns``: the fewest whose padding is at most an
    eighth of them, or 32 columns (3072 = 12 x 256, 768 = 3 x 256, 1000 -> 4 x 256, 300 -> 5 x 64,
    100 -> 1 x 128, 20 -> 1 x 32), else the least padded. A resident block is held in such pieces
    (``recurrence.resident_block``) rather than padded to one power of two."""
    # (pieces, padded columns, width) of every width; the fewest pieces, then the least padding.
    options = [(cdiv(columns, width), cdiv(columns, width) * width, width)
               for width in (16 << i for i in range(widest.bit_length() - 4))]
    small = [option for option in options if 8 * (option[1] - columns) <= max(columns, 256)]
    count, _, width = min(small) if small else min(options, key=lambda option: option[1:])
    return width, count


def resident_bytes(shape: Shape, options: dict, backward: bool) -> int:
    """Shared memory a resident program (block constexprs ``options``, see ``_options``) needs for
    its weight blocks and dot operands; ``W_hr``'s too where it keeps it (``RESIDENT_PROJ``); the
    compiler's scratch beside them only where the margin does not hold it (``WIDE_PARTS_SCRATCH``)."""
    size = shape.dtype.itemsize
    block_b, block_u, block_p = options["BLOCK_B"], options["BLOCK_U"], options["BLOCK_P"]
    columns = options["BLOCK_K"] * options["NUM_PIECES"]
    projection_columns = options["BLOCK_KP"] * options["NUM_PIECES_P"] if options["RESIDENT_PROJ"] else 0
    scratch = 0
    if options.get("GATHER", False):
        # W_hh's transposed block over features, W_hr's over units; the operands' pieces, W_hh's a
        # wave at a time
        block_f = block_p if shape.has_proj else block_u
        weights = block_f * columns + block_u * projection_columns
        operands = (wave_columns(options) + projection_columns) * block_b
    elif backward:  # the weight blocks (W_hr's too) and the gate gradients, the other operand
        weights = shape.gate_slots * block_u * columns + block_p * projection_columns
        operands = shape.gate_slots * block_u * block_b + (block_p * block_b if shape.has_proj else 0)
        if block_b == 32:
            scratch = WIDE_PARTS_SCRATCH
    else:  # W_hh's block and h_{t-1} for a batch tile, W_hr's block and h_raw's if it stays too
        weights = shape.gate_slots * block_u * columns + block_p * projection_columns
        operands = block_b * (columns + projection_columns)
    return size * (weights + operands) + scratch


def wave_columns(options: dict) -> int:
    """Columns of the widest wave of a resident block's operand (``recurrence.load_operand``): the
    block's groups of pieces split into ``OPERAND_WAVES`` waves of as many as they divide into."""
    group_columns = options["GROUP_PIECES"] * options["BLOCK_K"]
    groups = options["NUM_PIECES"] // options["GROUP_PIECES"]
    return cdiv(groups, options.get("OPERAND_WAVES", 1)) * group_columns


def operand_waves(options: dict) -> list:
    """The wave counts a gathering block's operand may come in (``OPERAND_WAVES``), at most
    ``MAX_OPERAND_WAVES``: those that split its groups of pieces into that many waves, all but the
    last of one size (6 groups: 1, 2, 3; not 4, which ``load_operand`` would load in 3)."""
    groups = options["NUM_PIECES"] // options["GROUP_PIECES"]
    return [waves for waves in range(1, min(groups, MAX_OPERAND_WAVES) + 1)
            if cdiv(groups, cdiv(groups, waves)) == waves]


def _projection_fits(shape: Shape, options: dict, budget: int) -> bool:
    """Whether the forward keeps its block of ``W_hr`` on chip beside ``W_hh``'s (``options`` with
    ``RESIDENT_PROJ``): in ``budget`` bytes of shared memory, and with a gate tile small enough that
    the registers hold ``h_raw``'s pieces besides (``PROJECTION_GATE_TILE``). Elsewhere (on an
    H100: TF32 at the larger H, and blocks of 32 units or more on 32-row tiles or of 64 on 16-row
    ones; docs/design.md lists where) it streams, the smaller weight: ``P x H`` against ``4H x P``
    (``python -m bench.kernels --all``)."""
    return (shape.gate_slots * options["BLOCK_U"] * options["BLOCK_B"] <= PROJECTION_GATE_TILE
            and resident_bytes(shape, options, False) <= budget)


def _fits(shape: Shape, options: dict, backward: bool, budget: int) -> bool:
    """Whether a resident program with the block constexprs ``options`` fits an SM: what it counts
    in shared memory (``resident_bytes``) within ``budget`` (``shared_memory_budget``), its
    operand tiles in registers."""
    exact = shape.dtype == torch.float64 or (shape.dtype == torch.float32
                                             and _precision(shape.dtype)["DOT_PRECISION"] == "ieee")
    if exact:
        # Exact fp32 and fp64 products run on the FMA units, which hold both operands whole in
        # registers (fp64 multiplies and reduces, see recurrence.matmul): a resident block does not
        # fit there. TF32, fp16 and bf16 use the tensor cores, which read the block from shared memory.
        return False
    if resident_bytes(shape, options, backward) > budget:
        return False
    block_b = options["BLOCK_B"]
    if options.get("GATHER", False):  # a wave of the gate gradients in registers at once
        return wave_columns(options) * block_b * shape.dtype.itemsize <= OPERAND_BYTES
    # The forward stages its (P, BLOCK_B) operand through registers, the partial sums hold their part
    # of dL/dh (all P, or H with a projection, features) there.
    widest = max(shape.features, shape.hidden if shape.has_proj and backward else 0)
    return _pow2(widest) * block_b <= TILE_ELEMENTS


def _block_b(batch: int, largest: int) -> int:
    return min(largest, _pow2(batch))


def plan(shape: Shape, device: torch.device, backward: bool) -> Plan:
    """Choose scheme, resident or streamed weights, block sizes and grid for one launch. A GPU's
    plan is made once for each shape, SM count and shared memory (``_device_limits``), forced
    choice, cuDNN TF32 switch (``_precision``) and interpreter mode, the values it depends on:
    ranking the candidates by the cost model takes 0.04 to 0.45 ms of Python (a plan of the
    benchmark grid, on the CI machine's CPU), about what a layer's whole launch at the headline
    takes by the model. The sequence's length only decides whether the barrier counters hold it
    (``_for_length``), after the lookup: batches of every length share a plan."""
    scheme = _forced("FUSED_RNN_SCHEME", SCHEMES) or "persistent"
    weights = _forced("FUSED_RNN_WEIGHTS", WEIGHTS)
    gather = _forced("FUSED_RNN_BACKWARD", BACKWARDS) != "partial"
    if device.type != "cuda":
        return _interpreter_plan(shape, scheme, weights != "streaming", backward, gather)
    multiprocessors, shared_memory, tensor_cores = _device_limits(device.index)
    any_length = _gpu_plan_once(dataclasses.replace(shape, steps=0), multiprocessors, shared_memory, backward, scheme,
                                weights, gather, tensor_cores, cudnn_rnn_tf32(), interpreting())
    return _for_length(any_length, shape, backward)


@functools.lru_cache(maxsize=4096)
def _gpu_plan_once(shape: Shape, multiprocessors: int, shared_memory: int, backward: bool, scheme: str,
                   weights: str | None, gather: bool, tensor_cores: bool, allow_tf32: bool, interpreted: bool) -> Plan:
    """``_any_length_plan``, cached by its arguments and the two switches it reads (``allow_tf32``,
    ``interpreted``), which here only key the cache. Callers must not change the plan."""
    return _any_length_plan(shape, multiprocessors, shared_memory, backward, scheme, weights, gather, tensor_cores)


def gpu_plan(shape: Shape, multiprocessors: int, backward: bool, scheme: str = "persistent",
             weights: str | None = None, gather: bool = True, *, shared_memory: int = H100_SHARED_MEMORY,
             tensor_cores: bool = True) -> Plan:
    """``plan`` for a GPU with ``multiprocessors`` SMs whose programs may use ``shared_memory``
    bytes, with or without ``tensor_cores`` (``python -m bench.kernels`` asks without one). The
    backward gathers where its transposed blocks fit, else it sums parts; not where rows of ``H``,
    or with a projection of ``P``, are not in vectors (``rows_in_vectors``): read an element at a time, the GRU's
    gathering backward spilled 140 bytes a thread at H = 1000 before ``ALIGNMENT_H`` (``python -m
    bench.kernels --all``), the LSTM's with a projection 32 to 112 bytes with Triton 3.6 at P =
    239 and 245 (H = 720 and 736)."""
    any_length = _any_length_plan(shape, multiprocessors, shared_memory, backward, scheme, weights, gather,
                                  tensor_cores)
    return _for_length(any_length, shape, backward)


def _any_length_plan(shape: Shape, multiprocessors: int, shared_memory: int, backward: bool, scheme: str,
                     weights: str | None, gather: bool, tensor_cores: bool) -> Plan:
    """``gpu_plan`` for a sequence its barrier counters hold: it never reads ``shape.steps``.
    Without tensor cores (``TENSOR_CORE_MAJOR``) the weights stream unless ``weights`` says."""
    budget = shared_memory_budget(shared_memory)
    found = None
    if weights == "resident" or (weights is None and tensor_cores):
        if backward and gather and rows_in_vectors(shape.hidden) and rows_in_vectors(shape.features):
            found = _resident_persistent_plan(shape, multiprocessors, backward, budget, gather=True)
        found = found or _resident_persistent_plan(shape, multiprocessors, backward, budget)
    found = found or _streaming_persistent_plan(shape, multiprocessors, backward)
    # A resident program loads one block, at program_id(1), of W_hh (and of W_hr where it keeps
    # it), where a streaming one walks every n_u-th: the blocks must cover H (and P).
    units, features = (found.grid[1] * found.options[block] for block in ("BLOCK_U", "BLOCK_P"))
    assert not found.resident or (units >= shape.hidden
                                  and (features >= shape.features or not found.options["RESIDENT_PROJ"])), found
    # Fewer SMs than directions (one, under MPS): a grid the GPU cannot hold at once, whose
    # programs would wait for each other at the barrier, runs a step a launch instead.
    fits = found.grid[0] * found.grid[1] * found.grid[2] <= multiprocessors
    return found if scheme == "persistent" and fits else _stepwise(found, shape, backward)


def _for_length(found: Plan, shape: Shape, backward: bool) -> Plan:
    """``found`` for a sequence of ``shape.steps``; stepwise where its barrier counters would not
    hold them. The int32 arrival counters are never reset: they reach at most ``n_u * 2 * steps``
    (two barriers a step with a projection, one without)."""
    if found.scheme == "persistent" and found.grid[1] * 2 * shape.steps >= 2**31:
        return _stepwise(found, shape, backward)
    return found


def _stepwise(found: Plan, shape: Shape, backward: bool) -> Plan:
    """``found``'s blocks launched a step at a time: the same blocks, so the same rounding, one
    program per block and batch tile."""
    options = dict(found.options)
    block_b, block_u, block_p = options["BLOCK_B"], options["BLOCK_U"], options["BLOCK_P"]
    programs = cdiv(shape.hidden, block_u)
    if backward:
        options["REDUCE_CHUNK"] = _reduce_chunk(shape, block_b, block_u, block_p, programs)
    return Plan("stepwise", (cdiv(shape.batch, block_b), programs, shape.directions), options, shape.has_proj)


def _interpreter_plan(shape: Shape, scheme: str, resident: bool, backward: bool, gather: bool) -> Plan:
    # The interpreter pays per operation, not per element: large tiles make it fast. Small blocks
    # where it matters for the tests: several blocks per program (streaming) or several programs.
    # The backward gathers where its weights are resident, as on a GPU, unless told otherwise.
    block_b = _block_b(shape.batch, 64)
    # A persistent program holds all of W_hh resident, and the interpreter refuses a tile of more
    # than TRITON_MAX_TENSOR_NUMEL elements (fp64's product is a (rows, K, batch) tile): larger
    # weights stream (the LSTM's above H = 512 in fp32, above H = 128 in fp64 at B <= 16).
    tile = shape.gate_slots * _pow2(shape.hidden) * _pow2(shape.features)
    if shape.dtype == torch.float64:
        tile *= block_b
    resident = resident and not (scheme == "persistent" and tile > tl.TRITON_MAX_TENSOR_NUMEL)
    gather = gather and resident and backward
    batch_tiles = cdiv(shape.batch, block_b)
    if scheme == "stepwise":
        block_u = 16 if gather else max(shape.smallest_block, 8)
        programs = cdiv(shape.hidden, block_u)
        block_p = _pow2(cdiv(shape.features, programs))
        options = _options(shape, block_b, block_u, block_p, programs, INTERPRETER_CHUNK, resident=resident,
                           backward=backward, gather=gather, resident_proj=resident and shape.has_proj)
        if gather:  # the gathering operand in two waves where it has two groups or more, as on a GPU
            options["OPERAND_WAVES"] = min(2, options["NUM_PIECES"] // options["GROUP_PIECES"])
        return Plan(scheme, (batch_tiles, programs, shape.directions), options, shape.has_proj)
    if resident:
        block_u, block_p = max(shape.smallest_block, next_power_of_2(shape.hidden)), _pow2(shape.features)
    else:
        block_u, block_p = shape.smallest_block, 16
    return Plan(scheme, (1, 1, shape.directions),
                _options(shape, block_b, block_u, block_p, 1, INTERPRETER_CHUNK, resident=resident,
                         backward=backward, gather=gather, resident_proj=resident and shape.has_proj), shape.has_proj)


def _resident_persistent_plan(shape: Shape, multiprocessors: int, backward: bool, budget: int,
                              gather: bool = False) -> Plan | None:
    """The resident plan with the least modelled step (``cost.step_seconds``, which counts the
    round trips of the batch tiles a program walks one after another and of the gathering
    backward's operand waves, the L2 bytes of all programs and of one, and the product), rounded to
    the nanosecond; of equals, the fewest waves, then the smallest blocks (the most SMs sharing
    ``W_hh``; a backward that sums parts prefers ``BACKWARD_UNITS``, then larger blocks, for its
    fewer partial sums), then the widest tiles. Every program must fit on an SM, what it counts in
    shared memory within ``budget`` (``_fits``). Spreading ``W_hh`` over more programs shrinks
    each program's product but has more of them read all of the operand: at the headline the
    forward takes 48 programs of 16 units, not 96 of 8 (``ops/cost.py``). Where rows of ``H`` or
    ``P`` are not in vectors (``rows_in_vectors``), the fewest batch tiles times waves instead of
    the model, then as above.

    The gathering backward's blocks are transposed, blocks of features: ``tl.dot`` wants 16 at
    least, and larger ones spill (at B=256 H=768 the RNN's 64-unit blocks, 104 bytes a thread with
    Triton 3.9; its 32-unit TF32 blocks, 12 with 3.6: ``python -m bench.kernels --all``), so it
    takes 16. The partial sums cost each program a write and a read of ``B * P`` values per step,
    which the model counts. Not where rows of ``H`` are not in vectors (``rows_in_vectors``): read
    an element at a time, 16-unit programs spilled (56 bytes a thread in the LSTM backward at H =
    1000 before ``ALIGNMENT_H``, ``python -m bench.kernels --all``). The gathering backward's
    pieces are padded to whole groups (``batched_pieces``), or it does not gather: in smaller
    groups its warps repeat each other's products (in the TF32 projection's at H = 328, P = 120,
    41 pieces of 32 in groups of 1: 332 ``HMMA`` a warp in a chain of 164, with Triton 3.9 and
    3.6)."""
    sizes = [16] if gather else [size for size in (1, 2, 4, 8, 16, 32, 64) if size >= shape.smallest_block]
    if backward and not gather and rows_in_vectors(shape.hidden):
        sizes = ([size for size in sizes if size >= BACKWARD_UNITS]
                 + [size for size in sizes[::-1] if size < BACKWARD_UNITS])
    chunk = _chunk(shape.dtype)
    # Where rows of H or P are not in 16-byte vectors, the larger blocks the model would take spilled
    # (Triton 3.6: the forward's 64-row blocks at H = 999, 100 bytes a thread; the partial sums'
    # 256-row blocks at B=256 H=300, 236): there the plan walks the fewest batch tiles (times
    # waves) with the smallest blocks, whatever the model says.
    in_vectors = rows_in_vectors(shape.hidden) and rows_in_vectors(shape.features)
    # Where rows of P come in narrower vectors, the forward's 32-row tiles of h_{t-1} spilled
    # (Triton 3.6: 40 bytes a thread at B=256 H=300, 4 with a projection at H=1000, P=500).
    largest_block_b = _block_b(shape.batch, LARGEST_BLOCK_B if backward or rows_in_vectors(shape.features) else 16)
    best_plan, best_rank = None, None
    for preference, block_u in enumerate(sizes):
        programs = cdiv(shape.hidden, block_u)
        block_p = _pow2(cdiv(shape.features, programs))
        if shape.directions * programs > multiprocessors:
            continue
        for block_b in [size for size in (32, 16) if size <= largest_block_b]:
            # The backward keeps W_hr wherever it keeps W_hh; the forward where both fit
            # (``_keeping_projection``).
            options = _options(shape, block_b, block_u, block_p, programs, chunk, resident=True, backward=backward,
                               gather=gather, resident_proj=shape.has_proj and backward)
            # The gathering operand in as few waves as fit, each its own L2 round trip; in several
            # only in 16-bit dtypes: TF32's gathering product runs HMMA at a quarter of the partial
            # sums' HGMMA rate, and from B=64 the model puts the GRU at H=768 in 3 waves behind them
            # (9.1 us a step against 8.5; python -m bench.model, 2026-12-06).
            for waves in operand_waves(options) if gather and shape.dtype.itemsize == 2 else (1,):
                in_waves = dict(options, OPERAND_WAVES=waves) if gather else options
                if not _fits(shape, in_waves, backward, budget):
                    continue
                if shape.has_proj and not backward:
                    in_waves = _keeping_projection(shape, in_waves, programs, chunk, budget)
                groups = min(cdiv(shape.batch, block_b), multiprocessors // (shape.directions * programs))
                found = Plan("persistent", (groups, programs, shape.directions), in_waves, shape.has_proj)
                if in_vectors:  # rounded, so that steps the model cannot tell apart tie
                    step = round(cost.step_seconds(shape, found, backward), 9)
                else:
                    step = cdiv(cdiv(shape.batch, block_b), groups) * waves
                # The least step, then the fewest waves, the preferred block size, the widest tile;
                # of equal ranks the first found.
                rank = (step, waves, preference, -block_b)
                if best_rank is None or rank < best_rank:
                    best_plan, best_rank = found, rank
                break  # the fewest waves that fit: each more is one more round trip a tile
    return best_plan


def _keeping_projection(shape: Shape, options: dict, programs: int, chunk: int, budget: int) -> dict:
    """A forward's ``options`` with its block of ``W_hr`` kept on chip where it fits beside ``W_hh``'s
    in ``budget`` bytes (``_projection_fits``), its pieces padded to whole groups where they can be."""
    for whole_groups in (True, False):
        keeping = _options(shape, options["BLOCK_B"], options["BLOCK_U"], options["BLOCK_P"], programs, chunk,
                           resident=True, backward=False, resident_proj=True, whole_groups=whole_groups)
        if _projection_fits(shape, keeping, budget):
            return keeping
    return options


def _chunk(dtype: torch.dtype) -> int:
    """K chunk of a streamed weight block: 64 bytes of a row; for fp64, whose product is a
    (rows, chunk, batch) tile in registers, 8 elements."""
    if dtype == torch.float64:
        return 8
    return max(16, 64 // dtype.itemsize)


def _streaming_persistent_plan(shape: Shape, multiprocessors: int, backward: bool) -> Plan:
    """The plan where ``W_hh`` does not fit on the SMs: as many programs as SMs allow walk their
    unit blocks, each streaming its block through in chunks every step (``_chunk``), and with
    SMs to spare several batch groups run side by side."""
    block_u = max(shape.smallest_block, min(STREAMING_UNITS, STREAMING_ROWS // shape.gate_slots))
    block_b = _block_b(shape.batch, LARGEST_BLOCK_B)
    per_direction = max(1, multiprocessors // shape.directions)
    programs = min(cdiv(shape.hidden, block_u), per_direction)
    groups = max(1, min(cdiv(shape.batch, block_b), per_direction // programs))
    # BLOCK_P: the projection's features a program owns, 16 at a time.
    options = _options(shape, block_b, block_u, 16, programs, _chunk(shape.dtype), resident=False, backward=backward)
    return Plan("persistent", (groups, programs, shape.directions), options, shape.has_proj)


# The interpreter swaps parts of triton.language process-wide while a kernel runs, so two threads
# interpreting at once break each other; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock() if _INTERPRETING else contextlib.nullcontext()


def launch(kernel, args: tuple, plan: Plan, num_steps: int, **cell):
    """Run ``kernel(*args, barrier_ptr, step_begin, step_end, **constexprs)`` over ``num_steps``."""
    options = dict(plan.options, **cell, **COMPILE_OPTIONS)
    device = args[0].device
    # Triton launches on the current device and its stream: make those the tensors' (a model on
    # cuda:1 while cuda:0 is current would otherwise run there, unordered after its own GEMMs).
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with _INTERPRETER_LOCK, on_device:
        if plan.scheme == "stepwise":
            # With a projection a step has two phases that every program must finish in turn.
            phases = (UP_TO_BARRIER, FROM_BARRIER) if plan.two_phases else (WHOLE_STEP,)
            for step in range(num_steps):
                for phase in phases:
                    kernel[plan.grid](*args, None, step, step + 1, STEP_PHASE=phase.value, **options)
            return
        groups, programs, directions = plan.grid
        barrier = torch.zeros(directions * groups, dtype=torch.int32, device=device)
        cooperative = device.type == "cuda" and groups * programs * directions > 1
        kernel[plan.grid](*args, barrier, 0, num_steps, STEP_PHASE=WHOLE_STEP.value, **options,
                          launch_cooperative_grid=cooperative)


@triton.jit
def sync_programs(barrier_ptr, arrivals, GRID_SYNC: tl.constexpr):
    """Wait until every program of this batch group and direction has done its work up to here;
    returns ``arrivals + 1``.

    Without ``GRID_SYNC`` (stepwise: one step per launch) only this program's threads must agree:
    a CTA barrier. With it, the ``num_programs(1)`` programs of ``(program_id(0), program_id(2))``
    count their arrivals in one counter, zero at launch and never reset: the ``arrivals``-th
    barrier (from 0) opens when it reaches ``(arrivals + 1) * num_programs(1)``. The
    release/acquire pair makes every store this program made before the barrier (ordered by the
    CTA barrier first) visible to the programs that pass it, as in inductor's ``x_grid_barrier``.
    """
    tl.debug_barrier()
    if GRID_SYNC:
        counter = barrier_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        opens_at = (arrivals + 1) * tl.num_programs(1)
        while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < opens_at:
            pass
        tl.debug_barrier()
    return arrivals + 1
