"""``python -m bench.drift``: how far a long recurrence in fp16 / bf16 / fp32 drifts from float64.

For each cell and dtype, one layer with PyTorch's default initialisation runs a sequence of
unit-scale random inputs (``torch.randn``, zero initial state), and every output ``h_t`` is
compared with ``torch.nn.LSTM`` / ``nn.GRU`` run in float64 on the CPU with the same weights and
inputs. Weights and inputs are rounded to the dtype first and the float64 run starts from those
rounded values, so the error measured is that of the recurrence's own arithmetic (``h`` carried
in the dtype from step to step, gates rounded, products accumulated), not the rounding of the
inputs. Reported: the max and median of ``|h - h_fp64|`` over every element of the whole
sequence, of its first ``--window`` steps and of its last ``--window`` steps (whether the error
grows with ``t``), for ``fused_rnn`` and, as a baseline, for ``torch.nn`` in the same dtype on the
same device (cuDNN on a GPU).

On the CPU the kernels run in Triton's interpreter, its fp32 -> bf16 casts made to round to
nearest as a GPU's do (``bench.bfloat16_rounding``; the interpreter truncates them). The JSON is
written only when ``--out DIR`` is given: ``DIR/drift-<device>-<date>.json``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench import bfloat16_rounding, interpret_kernels, text_table

CELLS = ("lstm", "gru")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
IMPLEMENTATIONS = ("fused_rnn", "torch")
TORCH_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU}
CPU_NOTE = (
    "CPU: fused_rnn ran in Triton's interpreter, its fp32 -> bf16 casts made to round to nearest as on a GPU "
    "(the interpreter truncates them)."
)
# Keys of a result row, in order (errors are |h - h_fp64|).
ROW_KEYS = (
    "cell", "dtype", "implementation", "max", "median", "first_max", "first_median",
    "last_max", "last_median", "seconds",
)


def module_class(cell: str, implementation: str) -> type:
    """``fused_rnn.LSTM`` / ``GRU`` or ``torch.nn.LSTM`` / ``GRU``.

    fused_rnn is imported here, on first use, because ``main`` must set ``TRITON_INTERPRET``
    before Triton is imported for a CPU run.
    """
    if implementation == "torch":
        return TORCH_MODULES[cell]
    import fused_rnn

    return {"lstm": fused_rnn.LSTM, "gru": fused_rnn.GRU}[cell]


def error_figures(error: torch.Tensor, window: int) -> dict:
    """Max and median of ``error (T, B, H)``: over all of it, its first and its last ``window`` steps."""
    figures = {}
    for prefix, part in (("", error), ("first_", error[:window]), ("last_", error[-window:])):
        figures[f"{prefix}max"] = part.max().item()
        figures[f"{prefix}median"] = part.median().item()
    return figures


def measure_drift(cell: str, dtype: torch.dtype, steps: int, batch: int = 4, hidden: int = 64,
                  input_size: int = 32, device: str = "cpu", seed: int = 0, window: int = 1000,
                  implementation: str = "fused_rnn") -> dict:
    """Run one layer over ``steps`` timesteps in ``dtype`` on ``device``, forward only, and return
    ``error_figures`` of ``|h_t - h_t(float64)|`` plus the wall time of the run (``seconds``; on
    a GPU it includes compiling the kernels the first time).

    ``cell`` is ``"lstm"`` or ``"gru"``; ``implementation`` ``"fused_rnn"`` or ``"torch"``. The
    weights come from PyTorch's default initialisation under ``torch.manual_seed(seed)``.
    """
    torch.manual_seed(seed)
    oracle = TORCH_MODULES[cell](input_size, hidden, dtype=torch.float64)
    with torch.no_grad():
        for param in oracle.parameters():
            param.copy_(param.to(dtype))
    x = torch.randn(steps, batch, input_size, dtype=torch.float64).to(dtype)
    module = module_class(cell, implementation)(input_size, hidden, device=device, dtype=dtype)
    module.load_state_dict(oracle.state_dict())
    with torch.no_grad():
        expected, _ = oracle(x.double())
        start = time.perf_counter()
        output, _ = module(x.to(device))
        if output.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    error = (output.double().cpu() - expected).abs()
    return {**error_figures(error, window), "seconds": seconds}


def format_table(rows: list) -> str:
    """The rows as a fixed-width text table."""

    header = ("cell", "dtype", "implementation", "max", "median", "first max", "first median",
              "last max", "last median", "seconds")
    lines = [header] + [
        (row["cell"], row["dtype"], row["implementation"],
         *(f"{row[key]:.3g}" for key in ROW_KEYS[3:9]), f"{row['seconds']:.1f}")
        for row in rows
    ]
    return text_table(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``python -m bench.drift --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.drift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=10_000, help="sequence length T (default 10000)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--input", type=int, default=32, help="input size (default 32)")
    parser.add_argument("--window", type=int, default=1000, help="steps in the first / last windows (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    parser.add_argument("--cell", nargs="+", choices=CELLS, default=list(CELLS), help="cells (default: both)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes (default: all three)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda if available; cpu runs the kernels in Triton's interpreter")
    parser.add_argument("--out", help="directory for the JSON (nothing is written without it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Measure every (cell, dtype, implementation), print the table, write the JSON if ``--out``."""
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        interpret_kernels("a CPU run", "python -m bench.drift")  # before module_class imports fused_rnn
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        builder.cast_impl = bfloat16_rounding(builder.cast_impl)
    from bench import suite

    header = suite.environment(device)
    config = dict(steps=args.steps, batch=args.batch, hidden=args.hidden, input_size=args.input,
                  window=args.window, seed=args.seed)
    if device == "cuda":
        config["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # what float32 runs as
    print(f"device {header['device']}, torch {header['torch']}, triton {header['triton']}, "
          f"scheme {header['scheme']}; {config}")
    rows = []
    for cell in args.cell:
        for dtype in args.dtype:
            for implementation in IMPLEMENTATIONS:
                figures = measure_drift(
                    cell, DTYPES[dtype], args.steps, batch=args.batch, hidden=args.hidden, input_size=args.input,
                    device=device, seed=args.seed, window=args.window, implementation=implementation,
                )
                rows.append({"cell": cell, "dtype": dtype, "implementation": implementation, **figures})
                print(f"{cell} {dtype} {implementation}: max {figures['max']:.3g} "
                      f"({figures['seconds']:.1f} s)", flush=True)
    print(format_table(rows))
    if device == "cpu":
        header["note"] = CPU_NOTE
        print(CPU_NOTE)
    if args.out is not None:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"drift-{suite.result_stem(header['device'])}.json"
        path.write_text(json.dumps({**header, "config": config, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
