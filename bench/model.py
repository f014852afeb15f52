"""``python -m bench.model``: a per-step cost model of the persistent kernels on H100 / H200.

A model, not a measurement: it takes the plan the launcher makes for a GPU (``launch.gpu_plan``:
programs, blocks, resident or streamed weights), the bytes each program moves per step (the
buffers ``python -m bench.traffic`` attributes: the ``h_{t-1}`` operand, ``gates_x``, the states,
the saved activations, the backward's gate gradients of every unit (gathering) or partial sums,
the weights when they stream) and the compiled code's matrix instructions (``python -m
bench.kernels --all --json``, the report given by ``--kernels``) and turns them into a lower bound
in microseconds per step:

    step = round_trips * L2_ROUND_TRIP + max(L2 bytes of all programs / L2 bandwidth,
                                             L2 bytes of one program / one SM's L2 bandwidth)
           + tiles * max(chain * MMA_LATENCY, multiply-adds / the tensor cores' rate)
           [+ the weights' bytes / HBM bandwidth, where a streaming plan's weight reads in a
              step (its blocks again for every batch tile) pass 50 MB, the L2's size]

``round_trips`` counts the dependent trips to L2 on a step's critical path: the stores the next
step reads and the barrier (an arrival and the poll that sees the last one), then for each batch
tile a program walks the operand load (every piece at once, or of the gathering backward's
operand one wave after another; in a backward that sums parts, one per chunk of programs whose
parts ``reduce_partials`` loads), with the cell's own loads (the
forward's ``gates_x`` and state, the backward's saved activations and states) issued before it.
A batch tile's product takes the longer of two times: ``chain``, its longest run of
``HMMA`` instructions that each wait for the one before, and the multiply-adds of all its matrix
instructions (all warps: where a product's output tile is small, warps repeat each other's work)
at the SM's tensor-core rate. The elementwise math hides under them. The forward is timed in
inference (nothing saved), the backward adds the saved tensors.

Assumed constants (public figures; what the GPU gives in practice is for a GPU session to
measure): 132 SMs; L2 about 5.5 TB/s in all and 64 bytes per clock per SM at 1.755 GHz; an L2 round
trip about 0.25 us; HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200); 30 cycles from one dependent
matrix instruction (``HMMA``) to the next, as microbenchmarks put it on Ampere and Hopper; 2048
fp16 multiply-adds a clock per SM with ``HGMMA`` (H100 SXM's dense 989 TFLOPS), half that with
``HMMA`` (``mma.sync``, an assumption), half again in TF32.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

from bench import kernels, text_table

GPUS = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes per second
MULTIPROCESSORS = 132
L2_BANDWIDTH = 5.5e12
SM_L2_BANDWIDTH = 64 * 1.755e9
L2_ROUND_TRIP = 0.25e-6
SYNC_ROUND_TRIPS = 3  # the step's stores, the barrier's arrival and the poll that sees the last one
TILE_ROUND_TRIPS = 1  # per batch tile: the operand load, the cell's own loads issued beside it
CLOCK = 1.755e9
MMA_LATENCY = 30 / CLOCK  # one dependent matrix instruction to the next
MULTIPLY_ADDS_PER_CLOCK = {"HGMMA": 2048, "HMMA": 1024}  # an SM's, fp16 / bf16; TF32 half
# The GPU machines compile with Triton 3.6.
KERNELS = os.path.join(os.path.dirname(__file__), "results", "kernels-sm90-triton-3.6-all.json")
CUDNN_US_PER_STEP = 2.0  # cuDNN, LSTM B=16 H=768 fp16 (../shared/NOTES.md: 2.01 ms at T=1024)
CELLS = {"lstm": (4, 4, True), "gru": (3, 4, False)}  # gates, saved gates, cell state
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# bench.kernels' name of each dtype: fp32 runs as TF32 here, as cuDNN runs it.
KERNEL_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "tf32"}


@dataclasses.dataclass
class Row:
    cell: str
    batch: int
    hidden: int
    dtype: str
    forward_plan: str
    backward_plan: str
    forward_us: dict
    backward_us: dict


def _plan(cell: str, dtype, batch: int, hidden: int, backward: bool):
    from fused_rnn.ops.launch import Shape, gpu_plan

    shape = Shape(dtype=dtype, batch=batch, hidden=hidden, features=hidden, directions=1,
                  num_gates=CELLS[cell][0], has_proj=False, steps=1024)
    return shape, gpu_plan(shape, MULTIPROCESSORS, backward)


def load_reports(path: str) -> dict:
    """The compiler's reports (``python -m bench.kernels --all --json``) of one-direction variants
    with every option, by ``(cell, kernel, dtype, B, H)``."""
    with open(path) as file:
        reports = json.load(file)["reports"]
    return {(v["cell"], v["kernel"], v["dtype"], v["batch"], v["hidden"]): report
            for report in reports for v in [report["variant"]] if v["options"] == "all" and v["directions"] == 1}


def _report(reports: dict, cell: str, dtype_name: str, batch: int, hidden: int, backward: bool) -> dict:
    shape, plan = _plan(cell, DTYPES[dtype_name], batch, hidden, backward)
    kernel = "backward" if backward else "forward"
    report = reports.get((cell, kernel, KERNEL_DTYPES[dtype_name], batch, hidden))
    if report is None or report["plan"] != kernels.describe(shape, plan):
        raise ValueError(f"no compiler report of today's plan for {cell} {kernel} {dtype_name} B={batch} H={hidden}: "
                         "run python -m bench.kernels --all --json again")
    return report


def product_seconds(report: dict, dtype) -> float:
    """One batch tile's product in the compiled code: its chain of dependent ``HMMA``, or the tensor
    cores' time for all its warps' multiply-adds, whichever is longer."""
    from fused_rnn.ops.launch import COMPILE_OPTIONS

    slower = 2 if dtype == torch.float32 else 1
    work = kernels.multiply_adds(report["matrix_instructions"], COMPILE_OPTIONS["num_warps"])
    tensor_cores = sum(count * slower / (MULTIPLY_ADDS_PER_CLOCK[opcode] * CLOCK) for opcode, count in work.items())
    return max(report["mma_chain"] * MMA_LATENCY, tensor_cores)


def step_seconds(cell: str, dtype_name: str, batch: int, hidden: int, backward: bool, hbm: float,
                 reports: dict) -> float:
    """The modelled lower bound of one step, in seconds."""
    gates, saved_gates, has_cell_state = CELLS[cell]
    dtype = DTYPES[dtype_name]
    shape, plan = _plan(cell, dtype, batch, hidden, backward)
    size = torch.empty((), dtype=dtype).element_size()
    groups, programs, _ = plan.grid
    block_b, block_u = plan.options["BLOCK_B"], plan.options["BLOCK_U"]
    tiles = math.ceil(math.ceil(batch / block_b) / groups)  # batch tiles a program walks, one after another
    rows = tiles * block_b
    units = block_u * math.ceil(math.ceil(hidden / block_u) / programs)  # units a program owns
    states = (2 * 4 if has_cell_state else 0) + size  # c in fp32 read and written, h written
    if backward and plan.options["GATHER"]:
        per_program = rows * (
            gates * hidden * size            # every unit's gate gradients of the step before, read
            + units * (saved_gates + gates) * size      # saved activations read, gate gradients written
            + units * (size + states + 8))              # grad_h, states, carries
        # A wave of the operand after another's products: one trip each.
        round_trips = SYNC_ROUND_TRIPS + tiles * TILE_ROUND_TRIPS * plan.options["OPERAND_WAVES"]
    elif backward:
        per_program = rows * (
            hidden * 4                       # partial sums of dL/dh_{t-1}, written (fp32)
            + programs * units * 4           # every program's parts for my units, read
            + units * (saved_gates + gates) * size      # saved activations read, gate gradients written
            + units * (size + states + 8))              # grad_h, states, carries
        # reduce_partials loads REDUCE_CHUNK programs' parts at a time, one dependent trip each.
        chunks = math.ceil(programs / plan.options["REDUCE_CHUNK"])
        round_trips = SYNC_ROUND_TRIPS + tiles * chunks
    else:
        per_program = rows * (hidden * size + units * (gates * size + states))
        round_trips = SYNC_ROUND_TRIPS + tiles * TILE_ROUND_TRIPS
    weights = 0.0
    if not plan.resident:  # every program reads its blocks again for every batch tile, every step
        weights = 4 * hidden * hidden * size * groups * math.ceil(batch / block_b) / groups
        per_program += weights / (groups * programs)
    bandwidth = max(groups * programs * per_program / L2_BANDWIDTH, per_program / SM_L2_BANDWIDTH)
    product = tiles * product_seconds(_report(reports, cell, dtype_name, batch, hidden, backward), dtype)
    return round_trips * L2_ROUND_TRIP + bandwidth + product + (weights / hbm if weights > 50e6 else 0.0)


def rows(cells, batches, hiddens, dtypes, reports: dict):
    for cell in cells:
        for dtype_name in dtypes:
            for batch in batches:
                for hidden in hiddens:
                    plans = [_report(reports, cell, dtype_name, batch, hidden, backward)["plan"]
                             for backward in (False, True)]
                    forward, backward = ({gpu: step_seconds(cell, dtype_name, batch, hidden, backward, hbm, reports) * 1e6
                                          for gpu, hbm in GPUS.items()} for backward in (False, True))
                    yield Row(cell, batch, hidden, dtype_name, *plans, forward, backward)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (docs/performance.md)")
    parser.add_argument("--kernels", default=KERNELS,
                        help="the compiler's reports of the full grid (python -m bench.kernels --all --json); "
                             "default: Triton 3.6's, the GPU machines'")
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = True  # fp32 runs as TF32, as cuDNN runs it
    header = ["cell", "B", "H", "dtype", "forward plan", "backward plan", "fwd us/step H100", "fwd H200",
              "bwd us/step H100", "bwd H200"]
    table = [[row.cell, str(row.batch), str(row.hidden), row.dtype, row.forward_plan, row.backward_plan,
              f"{row.forward_us['H100']:.2f}", f"{row.forward_us['H200']:.2f}",
              f"{row.backward_us['H100']:.2f}", f"{row.backward_us['H200']:.2f}"]
             for row in rows(CELLS, (1, 16, 64, 256), (256, 768, 1024), DTYPES, load_reports(args.kernels))]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in table:
            print("| " + " | ".join(line) + " |")
    else:
        print(text_table([header] + table))
    print(f"\nModel, not measured. cuDNN measured elsewhere: about {CUDNN_US_PER_STEP} us per step "
          "(LSTM B16 H768 fp16, forward).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
