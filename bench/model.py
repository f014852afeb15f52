"""``python -m bench.model``: the per-step cost model of the persistent kernels on H100 / H200
(``fused_rnn.ops.cost``, which the launcher ranks its plans by), tabulated for the grid with the
compiled code's matrix instructions in place of the launcher's estimate.

For each row it takes the plan the launcher makes for a GPU (``launch.gpu_plan``) and the
compiler's report of that plan (``python -m bench.kernels --all --json``, the report given by
``--kernels``): a batch tile's product takes the longer of two times, ``chain``, its longest run
of ``HMMA`` instructions that each wait for the one before, and the multiply-adds of all its
matrix instructions (all warps: where a product's output tile is small, warps repeat each other's
work) at the SM's tensor-core rate. The forward is timed in inference (nothing saved), the
backward adds the saved tensors. The assumed constants are ``cost``'s.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

from bench import kernels, text_table
from fused_rnn.ops import cost

# The GPU machines compile with Triton 3.6.
KERNELS = os.path.join(os.path.dirname(__file__), "results", "kernels-sm90-triton-3.6-all.json")
CUDNN_US_PER_STEP = 2.0  # cuDNN, LSTM B=16 H=768 fp16 (../shared/NOTES.md: 2.01 ms at T=1024)
CELLS = ("lstm", "gru")
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


def _plan(cell: str, dtype_name: str, batch: int, hidden: int, backward: bool):
    kernel = "backward" if backward else "forward"
    shape = kernels.shape_of(kernels.Variant(cell, kernel, KERNEL_DTYPES[dtype_name], "all", batch, hidden))
    return shape, kernels.plan_of(shape, backward)


def load_reports(path: str) -> dict:
    """The compiler's reports (``python -m bench.kernels --all --json``) of one-direction variants
    with every option, by ``(cell, kernel, dtype, B, H)``."""
    with open(path) as file:
        reports = json.load(file)["reports"]
    return {(v["cell"], v["kernel"], v["dtype"], v["batch"], v["hidden"]): report
            for report in reports for v in [report["variant"]] if v["options"] == "all" and v["directions"] == 1}


def _report(reports: dict, cell: str, dtype_name: str, batch: int, hidden: int, backward: bool, shape, plan) -> dict:
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

    work = kernels.multiply_adds(report["matrix_instructions"], COMPILE_OPTIONS["num_warps"])
    tensor_cores = sum(count / cost.multiply_add_rate(opcode, dtype) for opcode, count in work.items())
    return max(report["mma_chain"] * cost.MMA_LATENCY, tensor_cores)


def step_seconds(shape, plan, report: dict, backward: bool, gpu: str) -> float:
    """The modelled lower bound of one step of ``plan``, in seconds, with the compiled product."""
    return cost.step_seconds(shape, plan, backward, product_seconds(report, shape.dtype), gpu)


def rows(cells, batches, hiddens, dtypes, reports: dict):
    for cell in cells:
        for dtype_name in dtypes:
            for batch in batches:
                for hidden in hiddens:
                    plans, times = [], []
                    for backward in (False, True):
                        shape, plan = _plan(cell, dtype_name, batch, hidden, backward)
                        report = _report(reports, cell, dtype_name, batch, hidden, backward, shape, plan)
                        plans.append(report["plan"])
                        times.append({gpu: step_seconds(shape, plan, report, backward, gpu) * 1e6
                                      for gpu in cost.HBM_BANDWIDTH})
                    yield Row(cell, batch, hidden, dtype_name, *plans, *times)


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
             for row in rows(CELLS, (1, 16, 64, 256), (256, 768, 1024), KERNEL_DTYPES, load_reports(args.kernels))]
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
