"""``python -m bench.kernels``: compile every kernel variant for a GPU, without one, and report
what the compiler made of it.

Triton compiles ahead of time for a named target (``GPUTarget``) with the ``ptxas`` it ships, so
the GPU compiler's verdict - ``tl.dot`` shapes, registers, spills to local memory, shared memory,
which matrix instructions were emitted and the longest chain of them that depend on each other
(``chain``) - is available on a machine without a GPU. That is what the interpreter cannot check.
A variant is (cell, forward or backward, dtype, optional inputs, batch, hidden, directions) with
the plan ``launch.gpu_plan`` makes for the architecture's GPU in ``GPUS`` (``--arch 90``, the
default: an H100/H200, 132 SMs; 80: an A100; 89: an L40S; 75: a T4).

For each variant the report also counts the loads of the weights that sit inside the time loop
(``W_hh in loop``, ``W_hr in loop``): the resident plans load their blocks once, before it; the
streaming ones (weights too large for the chip) read them every step, and so does a forward whose
block of ``W_hr`` does not fit beside ``W_hh``'s (plan "W_hr streams", ``launch._projection_fits``).
Its last column compares the shared memory the plan counted (``launch.resident_bytes``) with what
the compiler allocated.

``fresh loads`` counts, by width, the loads of what other programs wrote (the step's operand, the
partial sums), which go to L2: where rows of ``H`` and ``P`` start on 8 elements, 16-byte vectors.

Run it with ``TRITON_INTERPRET`` unset. ``--check`` exits non-zero if a variant fails to compile,
spills, needs more shared memory than that GPU gives a program, or reads from L2 in narrower loads
than that (``NARROW_FRESH_LOADS``); ``--all`` compiles the full grid
(B 1/16/64/256 x H 256/768/1024 x fp16/bf16/fp32/tf32, every cell and both kernels, one
direction; the headline B=16 H=768 also in fp64 and without options, and with both directions
at H=768 and H=512; B=5 x H=999, where no size is a multiple of 16 or of 2; B=16 x H=1000, a
multiple of 8, also in tf32; and B=16 x H=480, whose gate rows make no whole groups of batched
pieces);
``--json`` writes the table.
"""

import argparse
import concurrent.futures
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from bench import text_table

DTYPES = {
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
    "float32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "float64": (torch.float64, False),
}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# Buffers kept in the accumulator dtype (fp32, or fp64 for fp64), whatever the layer's dtype.
ACCUMULATOR_BUFFERS = {"c_ptr", "dh_carry_ptr", "routed_dh0_ptr", "routed_dh0_recurrent_ptr", "dc_carry_ptr",
                       "routed_dc0_ptr", "partial_ptr", "partial_proj_ptr"}
HEADLINE = (16, 768)
GRID_BATCHES, GRID_HIDDENS = (1, 16, 64, 256), (256, 768, 1024)
# (batch, hidden) with no multiple of 16, H not even of 2: nothing for the compiler to specialise on
# (``signature``), rows that start anywhere, read an element at a time.
UNALIGNED = (5, 999)
# H no multiple of 16, but of 8: a launch does not mark it, the kernels tell the compiler
# (``launch.alignment``), and its rows come in 16-byte vectors (the projection's P = 500 in 8-byte).
MULTIPLE_OF_8 = (16, 1000)
# H a multiple of 4 only, rows in 8-byte vectors in fp16 (16 in fp32): the forward's product still
# batched; at B=256 its 32-row tiles spilled (launch._resident_persistent_plan), it takes 16.
MULTIPLE_OF_4 = (16, 1004)
MULTIPLE_OF_4_LARGE_BATCH = (256, 300)
# H even only: rows in 4-byte vectors in fp16, the forward's product still batched.
MULTIPLE_OF_2 = (16, 750)
# A hidden size whose gate rows (and W_hr's columns) make no whole groups of batched pieces: they
# are padded (``launch.batched_pieces``; the GRU's 1440 rows in 24 pieces of 64, 3 groups of 8).
OFF_GRID = (16, 480)
# A batch of no multiple of 16 where the backward gathers, its operand filling the registers (the
# GRU's, one wave) or in waves (the LSTM's 2, the projection's 4): at B=5 Triton 3.6 spilled the
# time loop's trip count where 16 did not (``recurrence.step_bounds``).
ODD_BATCH = (5, 1024)
CELLS = ("lstm", "lstm_proj", "gru", "rnn_tanh")
# Where rows of H and P are in vectors (``launch.rows_in_vectors``), what a kernel reads from L2 comes in
# 16-byte vectors but for the streamed chunks (of h_{t-1}, and of h_raw where W_hr streams) and
# the reduction of W_hr's partial sums (the projection's backward where it sums parts): a load
# instruction each, of an element or two a thread. Built by a reshape, the operands' offsets make
# Triton 3.6 read the resident plans' operands an element at a time (64 to 192 loads a thread;
# ``recurrence.group_columns`` says why): this bound keeps that from coming back.
NARROW_FRESH_LOADS = 2
# Pointers each cell leaves None, and the optional inputs (the kernels' flags) of each direction.
CELL_POINTERS = {
    "lstm": {"b_hh_ptr", "dgates_h_ptr", "w_hr_ptr", "h_raw_ptr", "grad_h_proj_ptr", "partial_proj_ptr"},
    "gru": {"c_ptr", "zoneout_c_ptr", "dc_carry_ptr", "routed_dc0_ptr", "w_hr_ptr", "h_raw_ptr", "grad_h_proj_ptr",
            "partial_proj_ptr"},
    "rnn_tanh": {"b_hh_ptr", "c_ptr", "zoneout_c_ptr", "dgates_h_ptr", "dc_carry_ptr", "routed_dc0_ptr", "w_hr_ptr",
                 "h_raw_ptr", "grad_h_proj_ptr", "partial_proj_ptr"},
}
CELL_POINTERS["lstm_proj"] = CELL_POINTERS["lstm"] - {"w_hr_ptr", "h_raw_ptr", "grad_h_proj_ptr", "partial_proj_ptr"}
OPTIONAL = {"lengths_ptr", "resets_ptr", "routed_dh0_recurrent_ptr", "h_mask_ptr", "zoneout_h_ptr", "zoneout_c_ptr"}


@dataclass(frozen=True)
class Gpu:
    """What a plan depends on of a GPU (``launch._device_limits``)."""

    name: str
    multiprocessors: int
    shared_memory: int  # bytes a program may opt in to: shared_memory_per_block_optin
    tensor_cores: bool = True  # whether Triton runs tl.dot on them (launch.TENSOR_CORE_MAJOR)


# A GPU of each architecture ``--arch`` names. The L4 (58 SMs) and RTX 4090 (128), sm_89, and the
# sm_86 A10 (72) and RTX 3090 (82) give a program as much shared memory as the L40S; the T4 is
# sm_75, as the RTX 20xx, on which Triton's products run on FMAs (the ``matrix`` column is empty).
GPUS = {
    90: Gpu("H100 SXM / H200", 132, 227 * 1024),
    80: Gpu("A100", 108, 163 * 1024),
    89: Gpu("L40S", 142, 99 * 1024),
    75: Gpu("T4", 40, 64 * 1024, tensor_cores=False),
}


@dataclass
class Variant:
    cell: str
    kernel: str  # forward / backward
    dtype: str
    options: str  # "all": lengths, resets, recurrent dropout, zoneout; "none"
    batch: int
    hidden: int
    directions: int = 1


@dataclass
class Report:
    variant: Variant
    ok: bool
    plan: str = ""  # resident/streaming, grid, BLOCK_B x BLOCK_U
    registers: int = 0
    spill_bytes: int = 0  # bytes a thread spills to local memory: registers the compiler could not keep
    shared_bytes: int = 0
    planned_bytes: int = 0  # launch.resident_bytes: what the plan counted (0 when streaming)
    matrix_instructions: str = ""  # e.g. "HMMA.16816 x64", "HGMMA.64x16x16 x16" (wgmma), "DMMA.884 x16" (fp64)
    mma_chain: int = 0  # the longest run of HMMA (DMMA) each accumulating onto the one before: they wait for each other
    w_hh_loads_in_loop: int = 0  # loads of W_hh inside the time loop
    w_hr_loads_in_loop: int = 0  # and of W_hr (the LSTM projection)
    fresh_loads: str = ""  # loads of what other programs wrote (from L2) by width, e.g. "128-bit x24"
    error: str = ""


def cell_of(name: str):
    from fused_rnn.ops import gru, lstm, rnn

    return {"lstm": lstm.CELL, "lstm_proj": lstm.CELL, "gru": gru.CELL, "rnn_tanh": rnn.CELLS["tanh"]}[name]


def shape_of(variant: Variant):
    from fused_rnn.ops.launch import Shape

    features = variant.hidden // 2 if variant.cell == "lstm_proj" else variant.hidden
    return Shape(dtype=DTYPES[variant.dtype][0], batch=variant.batch, hidden=variant.hidden, features=features,
                 directions=variant.directions, num_gates=cell_of(variant.cell).num_gates,
                 has_proj=variant.cell == "lstm_proj", steps=1024)


def variants(full: bool):
    """The subset CI compiles - every cell and kernel at the headline shape with every option in
    fp16, tf32 and fp64, the LSTM also in bf16, fp32, without options and bidirectional (at H=512)
    - or the full grid, and each cell and kernel at the ``UNALIGNED``, ``MULTIPLE_OF_8``,
    ``MULTIPLE_OF_4`` and ``MULTIPLE_OF_2`` (also in tf32), ``MULTIPLE_OF_4_LARGE_BATCH``,
    ``OFF_GRID`` and ``ODD_BATCH`` shapes in fp16."""
    for cell in CELLS:
        for kernel in ("forward", "backward"):
            for dtype in DTYPES if full or cell == "lstm" else ("float16", "tf32", "float64"):
                yield Variant(cell, kernel, dtype, "all", *HEADLINE)
            if full or cell == "lstm":
                yield Variant(cell, kernel, "float16", "none", *HEADLINE)
                yield Variant(cell, kernel, "float16", "all", HEADLINE[0], 512, directions=2)
            if full:
                # Both directions of the headline in one launch: 2 x 48 programs of 16 units (the
                # RNN's and the projection's forward: 2 x 24 of 32), against 132 SMs.
                yield Variant(cell, kernel, "float16", "all", *HEADLINE, directions=2)
                for batch in GRID_BATCHES:
                    for hidden in GRID_HIDDENS:
                        for dtype in ("float16", "bfloat16", "float32", "tf32"):
                            if (batch, hidden) != HEADLINE:
                                yield Variant(cell, kernel, dtype, "all", batch, hidden)
                yield Variant(cell, kernel, "float16", "all", *UNALIGNED)
                for dtype in ("float16", "tf32"):
                    yield Variant(cell, kernel, dtype, "all", *MULTIPLE_OF_8)
                    yield Variant(cell, kernel, dtype, "all", *MULTIPLE_OF_4)
                    yield Variant(cell, kernel, dtype, "all", *MULTIPLE_OF_2)
                yield Variant(cell, kernel, "float16", "all", *MULTIPLE_OF_4_LARGE_BATCH)
                yield Variant(cell, kernel, "float16", "all", *OFF_GRID)
                yield Variant(cell, kernel, "float16", "all", *ODD_BATCH)


def signature(variant: Variant, kernel, plan):
    """Triton types of the kernel's arguments, the values of its constexprs (the plan's options,
    the cell, None for absent pointers, the flags the kernel's heuristics derive from them) and
    the names of the integer arguments known to be multiples of 16.

    The shape's integers are specialised as a launch does (``BaseBackend.get_int_specialization``):
    a 1 becomes a constant, a multiple of 16 is marked divisible by 16, which lets the compiler
    vectorise the accesses whose masks compare against it. Compiled without that, a kernel is not
    the one that runs."""
    from fused_rnn.ops.launch import accumulator_dtype, partial_columns

    shape = shape_of(variant)
    integers = {"B": shape.batch, "H": shape.hidden, "P": shape.features,
                "partial_columns": partial_columns(shape.features), "partial_proj_columns": partial_columns(shape.hidden)}
    dtype = DTYPES[variant.dtype][0]
    cell = cell_of(variant.cell)
    absent = CELL_POINTERS[variant.cell] | (OPTIONAL if variant.options == "none" else set())
    if plan.options.get("GATHER"):  # no partial sums: the launcher passes no workspace
        absent |= {"partial_ptr", "partial_proj_ptr"}
    jit_function = kernel.fn
    constants = dict(plan.options, CELL_FORWARD=cell.forward, CELL_BACKWARD_INPUTS=cell.backward_inputs,
                     CELL_BACKWARD=cell.backward, NUM_GATES=cell.num_gates, GATE_SLOTS=shape.gate_slots, STEP_PHASE=0)
    arguments = {}
    for name in jit_function.arg_names:
        if name in absent:
            arguments[name] = None
        elif name == "zoneout_p":
            arguments[name] = 0.25 if variant.options == "all" else 0.0
        else:
            arguments[name] = object()
    constants.update({flag: flag_of(arguments) for flag, flag_of in kernel.values.items()})
    constants.update({name: None for name in absent if name in jit_function.arg_names})
    constants.update({name: 1 for name, value in integers.items() if value == 1})
    constants = {name: value for name, value in constants.items() if name in jit_function.arg_names}
    types = {}
    for name in jit_function.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name == "lengths_ptr":
            types[name] = "*i64"
        elif name == "barrier_ptr":
            types[name] = "*i32"
        elif name in ("resets_ptr", "zoneout_h_ptr", "zoneout_c_ptr"):
            types[name] = "*i1"
        elif name.endswith("_ptr"):
            types[name] = "*" + TRITON_TYPES[accumulator_dtype(dtype) if name in ACCUMULATOR_BUFFERS else dtype]
        elif name == "zoneout_p":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    divisible = {name for name, value in integers.items() if value % 16 == 0 and name not in constants}
    return types, constants, divisible


def plan_of(shape, backward: bool, gpu: Gpu = GPUS[90]):
    """The plan a launch makes on ``gpu`` (``launch.gpu_plan``)."""
    from fused_rnn.ops import launch

    return launch.gpu_plan(shape, gpu.multiprocessors, backward, shared_memory=gpu.shared_memory,
                           tensor_cores=gpu.tensor_cores)


def describe(shape, plan) -> str:
    """A plan in a few words: resident or streaming weights, the backward's scheme, the grid and the
    blocks, e.g. ``resident gather 1x48x1 B16xU16``, and the gathering operand's waves where there
    are several (``resident gather 1x64x1 B16xU16 in 2 waves``)."""
    options = plan.options
    scheme = {True: " gather", False: " parts"}.get(options.get("GATHER"), "")
    waves = options.get("OPERAND_WAVES", 1) if options.get("GATHER") else 1
    projection = " W_hr streams" if plan.resident and shape.has_proj and not options["RESIDENT_PROJ"] else ""
    return (f"{'resident' if plan.resident else 'streaming'}{scheme} {plan.grid[0]}x{plan.grid[1]}x{plan.grid[2]} "
            f"B{options['BLOCK_B']}xU{options['BLOCK_U']}{projection}{f' in {waves} waves' if waves > 1 else ''}")


def compile_variant(variant: Variant, arch: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_rnn.ops import launch, recurrence

    torch.backends.cudnn.allow_tf32 = DTYPES[variant.dtype][1]
    kernel = recurrence.forward_kernel if variant.kernel == "forward" else recurrence.backward_kernel
    shape = shape_of(variant)
    backward = variant.kernel == "backward"
    plan = plan_of(shape, backward, GPUS[arch])
    options = plan.options
    description = describe(shape, plan)
    planned = launch.resident_bytes(shape, options, backward)
    types, constants, divisible = signature(variant, kernel, plan)
    # Pointers from torch allocations are 16-byte aligned; the launches specialise on that too.
    alignment = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.fn.arg_names)
                 if types[name].startswith("*") or name in divisible}
    source = ASTSource(fn=kernel.fn, signature=types, constexprs=constants, attrs=alignment)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch.COMPILE_OPTIONS)
    except Exception as error:  # noqa: BLE001 - every compiler failure is what this tool reports
        first_line = str(error).splitlines()[0][:300]
        return Report(variant, ok=False, plan=description, error=f"{type(error).__name__}: {first_line}")
    registers, spill = _resource_usage(compiled.asm["ptx"], arch)
    w_hh_loads, w_hr_loads = weight_loads_in_time_loop(compiled.asm["ttgir"])
    sass = _disassemble(compiled.asm["cubin"])
    matrix, mma_chain = matrix_instructions(sass)
    return Report(variant, ok=True, plan=description, registers=registers, spill_bytes=spill,
                  shared_bytes=compiled.metadata.shared, planned_bytes=planned if plan.resident else 0,
                  matrix_instructions=matrix, mma_chain=mma_chain,
                  w_hh_loads_in_loop=w_hh_loads, w_hr_loads_in_loop=w_hr_loads, fresh_loads=fresh_loads(sass))


def _call_spans(source: list, is_call) -> set:
    """Line numbers (1-based) of every line of the calls in ``source`` whose opening line or
    first argument line satisfies ``is_call``: compilers put a call's location on its first line
    (Triton 3.9) or its last (3.6)."""
    lines = set()
    for index, line in enumerate(source):
        if not is_call(line):
            continue
        start = index
        while not source[start].rstrip().endswith("(") and start > 0 and "(" not in source[start]:
            start -= 1
        if not source[start].rstrip().endswith("(") and "(" not in source[start]:
            continue
        depth, end = 0, start
        for end in range(start, len(source)):
            depth += source[end].count("(") - source[end].count(")")
            if depth <= 0:
                break
        lines.update(range(start + 1, end + 2))
    return lines


def weight_loads_in_time_loop(ttgir: str) -> tuple:
    """``(W_hh, W_hr)``: loads of a weight block inside the kernel's time loop (``for step in``),
    from the compiler's TTGIR. They are the ``tt.load`` ops nested in that ``scf.for`` whose
    source location (the chain of inlined calls) passes through ``weight_block``; those reached
    through the projection's calls (``w_hr, w_hr_ptr, ...``) read ``W_hr``."""
    from fused_rnn.ops import recurrence

    path = inspect.getsourcefile(recurrence)
    with open(path) as file:
        source = file.read().splitlines()
    body, first = inspect.getsourcelines(recurrence.weight_block.fn)
    weight_lines = set(range(first, first + len(body))) | _call_spans(source, lambda line: "weight_block(" in line)
    projection_lines = _call_spans(
        source, lambda line: line.strip().startswith("w_hr, w_hr_ptr") or "w_hr = resident_block(" in line)
    aliases = dict(re.findall(r"^(#loc\d*) = (.*)$", ttgir, re.MULTILINE))

    def location_text(text: str, depth: int = 0) -> str:
        if depth > 30:
            return text
        return re.sub(r"#loc\d*", lambda m: location_text(aliases[m.group(0)], depth + 1)
                      if m.group(0) in aliases else m.group(0), text)

    def source_lines(text: str) -> set:
        return {int(line) for line in re.findall(r'recurrence\.py":(\d+):', text)}

    lines = ttgir.splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r"scf\.for %step", line)), None)
    counts = [0, 0]
    if start is None:
        return tuple(counts)
    indent = len(lines[start]) - len(lines[start].lstrip())
    for line in lines[start + 1:]:
        if line.strip() == "}" and len(line) - len(line.lstrip()) == indent:
            break
        found = re.search(r"tt\.load .* loc\((#loc\d*)\)", line)
        if found:
            where = source_lines(location_text(found.group(1)))
            if where & weight_lines:
                counts[bool(where & projection_lines)] += 1
    return tuple(counts)


def _resource_usage(ptx: str, arch: int):
    """Registers and spill bytes (stores), from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        report = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", target, file.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spill


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# Multiply-adds of a synchronous matrix instruction's shape (m16n8k16 fp16/bf16, m16n8k8 TF32,
# m8n8k4 fp64); an HGMMA names its own (64xNx16) and is its warpgroup's: four warps issue it.
_MMA_SHAPES = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4}


def multiply_adds(matrix_instructions: str, num_warps: int) -> dict:
    """Multiply-adds of each opcode in a report's ``matrix_instructions`` (``"HMMA.16816 x48"``)
    in one pass through the code, all ``num_warps`` warps together."""
    totals = {}
    for name, count in re.findall(r"(\S+) x(\d+)", matrix_instructions):
        opcode, shape = name.split(".")
        if opcode.endswith("GMMA"):
            m, n, k = map(int, shape.split("x"))
            each = m * n * k * num_warps // 4
        else:
            each = _MMA_SHAPES[shape] * num_warps
        totals[opcode] = totals.get(opcode, 0) + each * int(count)
    return totals


def _disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([_tool("nvdisasm"), file.name], capture_output=True, text=True, check=True).stdout


def matrix_instructions(sass: str) -> tuple:
    """``(summary, chain)`` of a kernel's SASS: how many matrix instructions of each kind and shape
    it holds (each warp runs them all), and the longest run of synchronous ones (``HMMA``, ``DMMA``)
    each accumulating onto the result of the one before (its last operand, ``RZ`` for zero, is the
    previous one's destination). Those wait for each other, so such a product takes at least
    ``chain`` times the instruction's latency; ``HGMMA`` is asynchronous, its accumulation the
    tensor core's own."""
    counts, chain, longest = {}, {}, 0  # chain: register -> the run of matrix instructions that wrote it last
    for line in sass.splitlines():
        matrix = re.search(r"\b([HQ]GMMA|HMMA|DMMA)\.(\w+)\S*\s+(R\d+),([^;]*);", line)
        if matrix:
            opcode, shape, destination, sources = matrix.groups()
            counts[f"{opcode}.{shape}"] = counts.get(f"{opcode}.{shape}", 0) + 1
            if not opcode.endswith("GMMA"):
                chain[destination] = 1 + chain.get(sources.split(",")[-1].strip().split(".")[0], 0)
                longest = max(longest, chain[destination])
            continue
        other = re.search(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?[A-Z][\w.]*\s+(R\d+)", line)
        if other:  # any other instruction writing a register ends the run there
            chain[other.group(1)] = 0
    summary = " ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
    return summary, longest


# Bits a load moves per thread by its width qualifier; none is 32. Any other qualifier (cache
# hints such as ``LTC128B``) says nothing of the width.
_LOAD_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def fresh_loads(sass: str) -> str:
    """The kernel's loads of data other programs wrote (``.cg``: ``LDG.E[.qualifiers].STRONG.GPU``)
    by width, but the barrier's polls: the acquire's strong load, which ``CCTL.IVALL`` (dropping
    this SM's L1) follows. A load narrower than 128 bits moves less per instruction: the step's
    operand (tens of KB a program) read 2 bytes at a time takes 8 times the instructions of 16-byte
    vectors."""
    widths = {}
    lines = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]+\*/", line)]
    for line, following in zip(lines, lines[1:] + [""]):
        load = re.search(r"\bLDG\.E((?:\.\w+)*)\.STRONG\.GPU\b", line)
        if load and "CCTL.IVALL" not in following:
            sizes = [_LOAD_BITS[part] for part in load.group(1).split(".") if part in _LOAD_BITS]
            bits = sizes[0] if sizes else 32
            widths[bits] = widths.get(bits, 0) + 1
    return " ".join(f"{bits}-bit x{count}" for bits, count in sorted(widths.items(), reverse=True))


def failures(report: Report, gpu: Gpu) -> list:
    """What ``--check`` refuses in a report compiled for ``gpu``."""
    from fused_rnn.ops.launch import rows_in_vectors

    problems = []
    if not report.ok:
        problems.append("does not compile")
    if report.spill_bytes:
        problems.append(f"spills {report.spill_bytes} bytes")
    if report.shared_bytes > gpu.shared_memory:
        problems.append(f"needs {report.shared_bytes} bytes of shared memory")
    if report.ok and report.plan.startswith("resident") and report.w_hh_loads_in_loop:
        problems.append("loads W_hh inside the time loop")
    if report.ok and report.plan.startswith("resident") and "W_hr streams" not in report.plan and report.w_hr_loads_in_loop:
        problems.append("loads W_hr inside the time loop")
    narrow = sum(int(count) for bits, count in re.findall(r"(\d+)-bit x(\d+)", report.fresh_loads) if int(bits) < 128)
    shape = shape_of(report.variant)
    if rows_in_vectors(shape.hidden) and rows_in_vectors(shape.features) and narrow > NARROW_FRESH_LOADS:
        problems.append(f"reads from L2 in {narrow} loads narrower than 16 bytes")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(GPUS),
                        help="compute capability: the plans of its GPU in GPUS "
                             "(90: H100/H200, 80: A100, 89: L40S, 75: T4)")
    parser.add_argument("--all", action="store_true", help="the full grid (default: the subset CI compiles)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a variant fails to compile, spills, overflows shared memory or reads L2 "
                             "in narrow loads")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--json", help="write the reports to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")

    gpu = GPUS[args.arch]
    todo = list(variants(args.all))
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(compile_variant, todo, [args.arch] * len(todo)))
    rows = []
    for report in reports:
        v = report.variant
        row = [v.cell, v.kernel, v.dtype, v.options, v.batch, v.hidden, v.directions, report.plan]
        if report.ok:
            row += [report.registers, report.spill_bytes, report.shared_bytes, report.planned_bytes,
                    report.matrix_instructions or "-", report.mma_chain, report.w_hh_loads_in_loop,
                    report.w_hr_loads_in_loop, report.fresh_loads or "-"]
        else:
            row += ["FAILED: " + report.error, "", "", "", "", "", "", "", ""]
        rows.append(row)
    header = ["cell", "kernel", "dtype", "options", "B", "H", "D", "plan", "regs", "spill", "shared", "planned",
              "matrix", "chain", "W_hh in loop", "W_hr in loop", "fresh loads"]
    print(text_table([header] + [[str(cell) for cell in row] for row in rows]))
    import triton

    if args.json:
        with open(args.json, "w") as file:
            json.dump({"arch": args.arch, "triton": triton.__version__, "gpu": gpu.name,
                       "multiprocessors": gpu.multiprocessors, "shared_memory": gpu.shared_memory,
                       "reports": [asdict(report) for report in reports]}, file, indent=1)
    failed = [(report, problems) for report in reports if (problems := failures(report, gpu))]
    for report, problems in failed:
        print(f"FAILED {report.variant}: {', '.join(problems)}", file=sys.stderr)
    if args.check and failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
