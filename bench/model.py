"""``python -m bench.model``: a per-step cost model of the persistent kernels on H100 / H200.

A model, not a measurement: it takes the plan the launcher makes for a GPU (``launch.gpu_plan``:
programs, blocks, resident or streamed weights) and the bytes each program moves per step (the
buffers ``python -m bench.traffic`` attributes: the ``h_{t-1}`` operand, ``gates_x``, the states,
the saved activations, the backward's gate gradients of every unit (gathering) or partial sums,
the weights when they stream) and turns them into a lower bound in microseconds per step:

    step = round_trips * L2_LATENCY + max(L2 bytes of all programs / L2 bandwidth,
                                          L2 bytes of one program / one SM's L2 bandwidth)
           + tiles * chain * MMA_LATENCY
           [+ the weights' bytes from HBM per step, streaming plans]

``round_trips`` counts the dependent trips to L2 on a step's critical path: the stores the next
step reads and the barrier (an arrival and the poll that sees the last one), then for each batch
tile a program walks the operand load (every piece at once; in a backward that sums parts, one
per chunk of programs whose parts ``reduce_partials`` loads), with the forward's own loads
(``gates_x``, the state) issued beside it, and in the backward the cell's loads, which wait for
the product. ``chain`` is the product's longest run of ``HMMA`` instructions that each wait for
the one before (``python -m bench.kernels`` counts them in the compiled code): a warp's share of
the reduction over ``K``, ``K / k`` (``k`` = 16, 8 for TF32), or one piece's ``BLOCK_K / k`` where
the pieces are batched over the warps (``_chain``). The elementwise math and the tensor cores'
throughput hide under them.
The forward is timed in inference (nothing saved), the backward adds the saved tensors.

Assumed constants (public figures; what the GPU gives in practice is for a GPU session to
measure): 132 SMs; L2 about 5.5 TB/s in all and 64 bytes per clock per SM at 1.755 GHz; an L2 round
trip about 0.25 us; HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200); 30 cycles from one dependent
matrix instruction (``HMMA``) to the next, as microbenchmarks put it on Ampere and Hopper.
"""

import argparse
import dataclasses
import math
import sys

import torch

from bench import text_table

GPUS = {"H100": 3.35e12, "H200": 4.8e12}  # HBM bytes per second
MULTIPROCESSORS = 132
L2_BANDWIDTH = 5.5e12
SM_L2_BANDWIDTH = 64 * 1.755e9
L2_ROUND_TRIP = 0.25e-6
SYNC_ROUND_TRIPS = 3  # the step's stores, the barrier's arrival and the poll that sees the last one
FORWARD_TILE_ROUND_TRIPS = 1  # per batch tile: the operand load, the cell's own loads issued beside it
BACKWARD_TILE_ROUND_TRIPS = 2  # per batch tile: the operand load and the cell's loads
MMA_LATENCY = 30 / 1.755e9  # one dependent matrix instruction to the next
CUDNN_US_PER_STEP = 2.0  # cuDNN, LSTM B=16 H=768 fp16 (../shared/NOTES.md: 2.01 ms at T=1024)
CELLS = {"lstm": (4, 4, True), "gru": (3, 4, False)}  # gates, saved gates, cell state
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


def _describe(plan) -> str:
    kind = "resident" if plan.resident else "streaming"
    scheme = {True: " gather", False: " parts"}.get(plan.options.get("GATHER"), "")
    return f"{kind}{scheme} {plan.grid[0]}x{plan.grid[1]} U{plan.options['BLOCK_U']}"


def step_seconds(cell: str, dtype, batch: int, hidden: int, backward: bool, hbm: float) -> float:
    """The modelled lower bound of one step, in seconds."""
    gates, saved_gates, has_cell_state = CELLS[cell]
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
        round_trips = SYNC_ROUND_TRIPS + tiles * BACKWARD_TILE_ROUND_TRIPS
    elif backward:
        per_program = rows * (
            hidden * 4                       # partial sums of dL/dh_{t-1}, written (fp32)
            + programs * units * 4           # every program's parts for my units, read
            + units * (saved_gates + gates) * size      # saved activations read, gate gradients written
            + units * (size + states + 8))              # grad_h, states, carries
        # reduce_partials loads REDUCE_CHUNK programs' parts at a time, one dependent trip each.
        chunks = math.ceil(programs / plan.options["REDUCE_CHUNK"])
        round_trips = SYNC_ROUND_TRIPS + tiles * (BACKWARD_TILE_ROUND_TRIPS - 1 + chunks)
    else:
        per_program = rows * (hidden * size + units * (gates * size + states))
        round_trips = SYNC_ROUND_TRIPS + tiles * FORWARD_TILE_ROUND_TRIPS
    weights = 0.0
    if not plan.resident:  # every program reads its blocks again for every batch tile, every step
        weights = 4 * hidden * hidden * size * groups * math.ceil(batch / block_b) / groups
        per_program += weights / (groups * programs)
    bandwidth = max(groups * programs * per_program / L2_BANDWIDTH, per_program / SM_L2_BANDWIDTH)
    product = tiles * _chain(shape, plan, backward) * MMA_LATENCY
    return round_trips * L2_ROUND_TRIP + bandwidth + product + (weights / hbm if weights > 50e6 else 0.0)


def _chain(shape, plan, backward: bool) -> float:
    """Dependent ``HMMA`` instructions of one batch tile's product (see the module's docstring):
    the products of fewer than 64 rows, the gathering backward's 16 features and the forward's
    blocks of fewer than 64 gate rows. Those of 64 rows and more (and the parts, ``W_block^T @
    dgates``, whose rows are the block's columns) take ``HGMMA``, issued asynchronously and not
    counted here."""
    options = plan.options
    k_step = 8 if shape.dtype == torch.float32 else 16
    rows = options["BLOCK_U"] if backward else shape.gate_slots * options["BLOCK_U"]
    if not plan.resident or (backward and not options["GATHER"]) or rows >= 64:
        return 0.0
    if options["GROUP_PIECES"] > 1:
        return options["BLOCK_K"] / k_step
    return options["BLOCK_K"] * options["NUM_PIECES"] / k_step


def rows(cells, batches, hiddens, dtypes):
    for cell in cells:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for batch in batches:
                for hidden in hiddens:
                    forward = {gpu: step_seconds(cell, dtype, batch, hidden, False, hbm) * 1e6 for gpu, hbm in GPUS.items()}
                    backward = {gpu: step_seconds(cell, dtype, batch, hidden, True, hbm) * 1e6 for gpu, hbm in GPUS.items()}
                    yield Row(cell, batch, hidden, dtype_name, _describe(_plan(cell, dtype, batch, hidden, False)[1]),
                              _describe(_plan(cell, dtype, batch, hidden, True)[1]), forward, backward)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (docs/performance.md)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = True  # fp32 runs as TF32, as cuDNN runs it
    header = ["cell", "B", "H", "dtype", "forward plan", "backward plan", "fwd us/step H100", "fwd H200",
              "bwd us/step H100", "bwd H200"]
    table = [[row.cell, str(row.batch), str(row.hidden), row.dtype, row.forward_plan, row.backward_plan,
              f"{row.forward_us['H100']:.2f}", f"{row.forward_us['H200']:.2f}",
              f"{row.backward_us['H100']:.2f}", f"{row.backward_us['H200']:.2f}"]
             for row in rows(CELLS, (1, 16, 64, 256), (256, 768, 1024), DTYPES)]
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
