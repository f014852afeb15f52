"""What the LSTM and GRU kernels share: the recurrent matmul tile, launch schemes, precision choice.

Launch schemes (both run the same kernels, which take the steps ``[step_begin, step_end)`` and
differ only in how time is looped and how programs meet between steps):

* ``persistent`` - one launch per layer and direction. Grid ``(batch tiles, n)``: the ``n``
  programs of a batch tile share its hidden tiles and walk every timestep, meeting at a barrier
  (``sync_tiles``) after each step. ``n`` is as many as can be running at once: up to one per
  SM on a GPU, and 1 under ``TRITON_INTERPRET=1``, which runs a grid's programs one after another
  (with ``n == 1`` no program ever waits for another).
* ``stepwise`` - one launch per timestep. Grid ``(batch tiles, hidden tiles)``: every tile of a
  step runs in parallel and the launch boundary orders the steps, so no program ever waits. It
  cannot run the LSTM with ``proj_size``, whose projection needs a barrier inside the step.
"""

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl

SCHEMES = ("persistent", "stepwise")

# How every kernel is compiled. With 4 warps, or with the loads of the next K block prefetched
# into registers (``num_stages`` > 1), the LSTM and fp32 kernels need more than 255 registers a
# thread and spill to local memory. ``maxnreg`` tells ptxas the whole register file is ours: a
# persistent program has an SM to itself, yet without it ptxas 12.8 (Triton 3.6) keeps to 80-128
# registers for occupancy and spills a few bytes. With these nothing spills (``python -m
# bench.kernels`` prints the compiler's report).
COMPILE_OPTIONS = dict(num_warps=8, num_stages=1, maxnreg=255)

# Triton decides when a kernel is decorated whether it will be interpreted, so read it once too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1`` at import time)."""
    return _INTERPRETING


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels handle this tensor (CUDA, or CPU under the interpreter)."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def empty(*shape, dtype, device) -> torch.Tensor:
    """Allocation for every buffer a kernel fills; tests patch it to poison unwritten memory."""
    return torch.empty(*shape, dtype=dtype, device=device)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and matmul accumulators: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_options(dtype: torch.dtype, batch: int, hidden: int, reduction: int, multiprocessors: int = 0) -> dict:
    """Constexpr arguments shared by every kernel of a layer.

    ``tl.dot`` needs each block dimension >= 16 and a power of two; masks cover the remainder.
    ``multiprocessors``: the SMs a persistent launch may fill (0: not persistent on a GPU).
    ``BLOCK_H`` then halves, down to 16, while every tile still gets an SM of its own: more
    programs spread the per-step re-read of ``W_hh`` over more SMs' caches.
    fp32 follows ``torch.backends.cudnn.allow_tf32`` as cuDNN does. The interpreter's bf16/fp16
    ``tl.dot`` is wrong (triton-lang/triton#11584), so there the operands are upcast to fp32,
    which gives the same exact products as tensor cores with fp32 accumulation.
    """
    # The interpreter pays per operation, not per element: larger tiles make it faster.
    largest = 64 if interpreting() else 32
    half = dtype in (torch.float16, torch.bfloat16)
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting()
    block_b, block_h = _block(batch, largest), _block(hidden, largest)
    while block_h > 16 and triton.cdiv(batch, block_b) * triton.cdiv(hidden, block_h // 2) <= multiprocessors:
        block_h //= 2
    if dtype == torch.float64 and not interpreting():
        # A (BLOCK_B, BLOCK_K, BLOCK_H) product reduced in registers instead of tl.dot: at 2048
        # elements it does not spill.
        block_k = 2048 // (block_b * block_h)
    else:
        block_k = _block(reduction, 2 * largest)
    return dict(
        BLOCK_B=block_b,
        BLOCK_H=block_h,
        BLOCK_K=block_k,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if tf32 else "ieee",
        DOT_UPCAST=half and interpreting(),
    )


def _block(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(size)))


def choose_scheme(has_projection: bool) -> str:
    """``persistent``, unless ``FUSED_RNN_SCHEME`` asks for another (tests use it to run both on
    CPU). The LSTM with ``proj_size`` always runs ``persistent``."""
    forced = os.environ.get("FUSED_RNN_SCHEME")
    if forced is not None and forced not in SCHEMES:
        raise ValueError(f"FUSED_RNN_SCHEME must be one of {SCHEMES}, got {forced!r}")
    return "persistent" if forced is None or has_projection else forced


@functools.lru_cache
def _usable_multiprocessors(device_index: int) -> int:
    count = torch.cuda.get_device_properties(device_index).multi_processor_count
    # An MPS client may be limited to a share of the SMs without the device properties saying so.
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if share:
        count = int(count * float(share) / 100)
    return max(1, count)


def persistent_programs(batch_tiles: int, hidden_tiles: int, device: torch.device) -> int:
    """``n``, the programs per batch tile of the persistent scheme.

    The programs of a batch tile wait for each other every step, so all of them must be running at
    once or the first to wait never returns. Under the interpreter programs run one at a time: 1.
    On a GPU at most one program per SM (every program fits on an SM by itself), and the launch is
    cooperative, so the driver refuses a grid it cannot keep resident instead of hanging.
    """
    if device.type != "cuda":
        return 1
    return max(1, min(hidden_tiles, _usable_multiprocessors(device.index) // batch_tiles))


# The interpreter swaps parts of triton.language process-wide while a kernel runs, so two threads
# interpreting at once break each other; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock() if _INTERPRETING else contextlib.nullcontext()


def launch(kernel, args: tuple, num_steps: int, batch: int, hidden: int, reduction: int, has_projection: bool):
    """Run ``kernel`` over ``num_steps`` timesteps with the scheme ``choose_scheme`` picks.

    Every kernel takes ``(*args, barrier_ptr, step_begin, step_end, **kernel_options(...))``,
    processes the steps ``step_begin <= step < step_end``, and gives each program the hidden tiles
    ``program_id(1), program_id(1) + num_programs(1), ...``. ``barrier_ptr`` holds one arrival
    counter per batch tile for ``sync_tiles`` (persistent) or is None (stepwise). ``args[0]`` is
    a ``(T, B, .)`` tensor in the layer's dtype; ``reduction`` is the longest matmul reduction.
    """
    scheme = choose_scheme(has_projection)
    device, dtype = args[0].device, args[0].dtype
    multiprocessors = _usable_multiprocessors(device.index) if scheme == "persistent" and device.type == "cuda" else 0
    options = kernel_options(dtype, batch, hidden, reduction, multiprocessors)
    batch_tiles = triton.cdiv(batch, options["BLOCK_B"])
    hidden_tiles = triton.cdiv(hidden, options["BLOCK_H"])
    with _INTERPRETER_LOCK:
        if scheme == "stepwise":
            for step in range(num_steps):
                kernel[(batch_tiles, hidden_tiles)](*args, None, step, step + 1, **options, **COMPILE_OPTIONS)
            return
        programs = persistent_programs(batch_tiles, hidden_tiles, device)
        # The int32 arrival counters are never reset: they reach programs * 2 * num_steps (two
        # barriers per step with a projection). Past that one program per batch tile never waits.
        if programs * 2 * num_steps >= 2**31:
            programs = 1
        barrier = torch.zeros(batch_tiles, dtype=torch.int32, device=device)
        kernel[(batch_tiles, programs)](
            *args, barrier, 0, num_steps, **options, **COMPILE_OPTIONS,
            launch_cooperative_grid=programs > 1,
        )


@triton.jit
def sync_tiles(barrier_ptr, arrivals, GRID_SYNC: tl.constexpr):
    """Wait until every program of this batch tile has done its work up to here; returns
    ``arrivals + 1``.

    Without ``GRID_SYNC`` (stepwise: one step per launch) only this program's threads must agree:
    a CTA barrier. With it, the ``num_programs(1)`` programs of batch tile ``program_id(0)`` count
    their arrivals in ``barrier_ptr[program_id(0)]``, zero at launch and never reset: the
    ``arrivals``-th barrier (from 0) opens when the count reaches ``(arrivals + 1) * n``. The
    release/acquire pair makes every store this program made before the barrier (ordered by the
    CTA barrier first) visible to the programs that pass it, as in inductor's ``x_grid_barrier``.
    """
    tl.debug_barrier()
    if GRID_SYNC:
        counter = barrier_ptr + tl.program_id(0)
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        opens_at = (arrivals + 1) * tl.num_programs(1)
        while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < opens_at:
            pass
        tl.debug_barrier()
    return arrivals + 1


@triton.jit
def program_tiles(B, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's batch rows (int64, so row offsets past 2**31 are safe), their mask, and
    the first hidden-tile offset and stride: program ``(b, j)`` of a ``(., n)`` grid takes the
    tiles ``j, j + n, ...``."""
    batch_rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    return batch_rows, batch_rows < B, tl.program_id(1) * BLOCK_H, tl.num_programs(1) * BLOCK_H


@triton.jit
def step_rows(step, T, B, reverse, backward, batch_rows):
    """Timestep ``t`` handled at ``step`` and the buffer rows it touches.

    The forward walks time forwards (backwards when ``reverse``), the backward the other way.
    Returns ``t``, the rows of this program's batch in the ``(T, B, .)`` buffers at ``t``, and in
    the ``(T+1, B, .)`` state buffers the rows of the state read (slot ``t + reverse``) and
    written (slot ``t + 1 - reverse``).
    """
    walks_back = reverse ^ backward
    t = step + walks_back * (T - 1 - 2 * step)
    # Row indices go past 2**31 only when T * B does, but then the int32 product would wrap.
    t_rows = tl.cast(t, tl.int64) * B + batch_rows
    return t, t_rows, t_rows + reverse * B, t_rows + (1 - reverse) * B


@triton.jit
def tanh(x):
    # triton.language has no tanh; this form is exact at the limits (+-1) and needs one exp.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def matmul_tile(
    x_ptr,
    rows,
    row_mask,
    x_row_stride,
    w_ptr,
    w_n_stride,
    w_k_stride,
    cols,
    col_mask,
    K,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``out[b, n] = sum_k x[rows[b], k] * w[cols[n], k]`` for one (BLOCK_B, BLOCK_N) tile.

    ``x`` is row-major with ``x_row_stride`` elements per row (``rows`` are int64, so offsets
    past 2**31 are safe); ``w`` is addressed as ``w_ptr + n * w_n_stride + k * w_k_stride``, which
    serves both ``W`` (forward) and ``W^T`` (backward) without a transposed copy.

    ``x`` is always something other programs of the same launch wrote in the previous step or
    phase (``h_{t-1}``, ``dgates``, ...), so it is read from L2 (``.cg``), which every SM sees,
    not from this SM's L1; ``w`` never changes and may stay in L1 from one step to the next.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * x_row_stride + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + ks[:, None] * w_k_stride + cols[None, :] * w_n_stride,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if ACC_DTYPE == tl.float64:
            # tl.dot has no fp64 path on every GPU (triton-lang/triton#5483): multiply and reduce.
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        else:
            if DOT_UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def load_tile(ptr, rows, row_stride, cols, mask):
    """``ptr[rows, cols]`` of a row-major matrix with ``row_stride`` elements per row; 0 where masked."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, rows, row_stride, cols, mask, value):
    """``ptr[rows, cols] = value``, cast to the buffer's dtype."""
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def recurrent_gate(
    h_ptr,
    h_rows,
    row_mask,
    w_hh_ptr,
    gate,
    units,
    unit_mask,
    H,
    K,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``h_prev @ W_hh[gate]^T`` for one (batch, unit) tile: the recurrent part of one gate.

    ``W_hh`` is ``(num_gates * H, K)`` with the gates stacked along rows, as PyTorch stores it;
    ``h_prev`` has ``K`` features (``proj_size`` or ``H``).
    """
    return matmul_tile(
        h_ptr, h_rows, row_mask, K, w_hh_ptr + gate * H * K, K, 1, units, unit_mask, K,
        BLOCK_B, BLOCK_H, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
    )


@triton.jit
def hidden_grad_tile(
    grad_h_ptr,
    grad_h_carry_ptr,
    dgates_h_ptr,
    w_hh_ptr,
    t,
    t_before,
    step,
    batch_rows,
    row_mask,
    cols,
    col_mask,
    B,
    K,
    NUM_GATES_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Total gradient reaching the hidden state written at timestep ``t``, for one tile.

    ``dh_t = grad_h[t] + carry + dgates_h[t_before] @ W_hh`` where ``t_before`` is the step the
    backward pass handled just before (the one that read ``h_t`` in the forward pass), and the
    carry holds what reaches ``h_t`` other than through ``W_hh`` (GRU's ``z * dh``, or all of
    ``dh`` across a step past a sequence's end). ``NUM_GATES_H = num_gates * H`` is the
    reduction length; ``W_hh^T`` is read through strides.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    dh = load_tile(grad_h_ptr, t * B + batch_rows, K, cols, mask).to(ACC_DTYPE)
    dh += load_tile(grad_h_carry_ptr, batch_rows, K, cols, mask)
    if step > 0:
        dh += matmul_tile(
            dgates_h_ptr, t_before * B + batch_rows, row_mask, NUM_GATES_H, w_hh_ptr, 1, K,
            cols, col_mask, NUM_GATES_H,
            BLOCK_B, BLOCK_N, BLOCK_K, ACC_DTYPE, DOT_PRECISION, DOT_UPCAST,
        )
    return dh


def states_after(states: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The ``(T, B, F)`` states written by each step, from a ``(T + 1, B, F)`` state buffer.

    The buffer holds the initial state in slot 0 (forward) or slot T (reverse); step ``t`` reads
    slot ``t + reverse`` and writes slot ``t + 1 - reverse``, so the buffer is also the output.
    """
    return states[:-1] if reverse else states[1:]


def states_before(states: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The ``(T, B, F)`` states each step read: ``h_{t-1}`` in the order of ``t``."""
    return states[1:] if reverse else states[:-1]


def initial_slot(num_steps: int, reverse: bool) -> int:
    return num_steps if reverse else 0


def final_slot(num_steps: int, reverse: bool) -> int:
    return 0 if reverse else num_steps
