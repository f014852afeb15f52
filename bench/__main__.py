"""``python -m bench``: time fused_rnn.LSTM / GRU against torch.nn.LSTM / GRU (cuDNN).

On a GPU it runs the default grid (or ``--headline``, or the subset the flags choose), prints a
table and writes ``bench/results/<gpu>-<date>.json`` and ``.png`` (or into ``--out``). Without a
GPU, or with ``--smoke``, it checks a tiny configuration on the CPU in Triton's interpreter and
writes files only into an explicit ``--out``. With ``--cpu`` it times fused_rnn's CPU path
(PyTorch's native RNN operator) against torch.nn on the CPU, in one thread unless ``--threads``
says otherwise, and writes files only into an explicit ``--out``.
"""

import argparse
import os
import sys
from typing import Optional

import torch

from bench import ALL_MODES, interpret_kernels

CPU_NOTE = (
    "NOTE: these times were taken on the CPU with the Triton kernels running in Triton's interpreter. "
    "They say nothing about the speed of fused_rnn: a CUDA GPU is needed for that."
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; an axis flag left out keeps the preset's values (see ``bench.suite.PRESETS``)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cell", nargs="+", choices=("lstm", "gru"), help="cells (default: both)")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default grid: 1 16 64 256)")
    parser.add_argument("--hidden", nargs="+", type=int, help="hidden sizes (default grid: 256 768 1024)")
    parser.add_argument("--seq", nargs="+", type=int, help="sequence lengths T (default grid: 512)")
    parser.add_argument("--input", nargs="+", type=int, help="input sizes (default: equal to the hidden size)")
    parser.add_argument("--layers", nargs="+", type=int, help="numbers of layers (default: 1)")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional modules only")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"),
                        help="dtypes (default: all three; float32 runs in TF32, as cuDNN does)")
    parser.add_argument("--mode", nargs="+", choices=ALL_MODES,
                        help="forward under no_grad, and/or forward + backward (default: both); "
                             "gradient_penalty: a backward with create_graph=True, then the penalty's "
                             "backward through it (second derivatives; torch.nn runs without cuDNN, "
                             "which refuses them); packed_forward, packed_forward_backward: the same two "
                             "with a PackedSequence of unequal lengths (T/2 to T) as both modules' input")
    parser.add_argument("--headline", action="store_true",
                        help="the headline preset instead of the grid: LSTM B=16 T=1024 H=768, fp16 and bf16")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU check in Triton's interpreter (automatic without CUDA); times are meaningless")
    parser.add_argument("--cpu", action="store_true",
                        help="time the CPU path (no TRITON_INTERPRET) against torch.nn: LSTM and GRU at "
                             "B16 T100 H128 and B64 T200 H256, fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of a --cpu run (default: 1)")
    parser.add_argument("--out", help="directory for the JSON and PNG (default on a GPU: bench/results; "
                                      "a CPU run writes files only when --out is given)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


# The command-line flag of each ``Axes`` field (``axis_overrides``), as results file names spell it.
FLAGS = dict(cells="cell", batches="batch", hiddens="hidden", seqs="seq", inputs="input", layers="layers",
             bidirectional="bidirectional", dtypes="dtype", modes="mode")


def axis_overrides(args: argparse.Namespace) -> dict:
    """The ``Axes`` fields that the flags set; ``None`` for a flag left out."""
    overrides = {field: getattr(args, flag) for field, flag in FLAGS.items()}
    overrides["bidirectional"] = (True,) if args.bidirectional else None
    return overrides


def results_tag(preset: str, overrides: dict, scheme: Optional[str] = None, backward: Optional[str] = None):
    """Suffix of the results file name: none for the full grid, else the preset, then each flag
    that narrowed it with its values (``axis_overrides``; ``headline-seq-256-mode-forward_backward``),
    so that no partial run overwrites the grid's ``<gpu>-<date>.json`` nor another partial run of
    the day; then the launch scheme when ``FUSED_RNN_SCHEME`` forced one, and the backward when
    ``FUSED_RNN_BACKWARD`` did."""
    narrowed = [(FLAGS[field], values) for field, values in overrides.items() if values is not None]
    parts = [] if preset == "grid" and not narrowed else [preset]
    for flag, values in narrowed:
        parts.append(flag if flag == "bidirectional" else "-".join([flag, *map(str, values)]))
    if scheme is not None:
        parts.append(scheme)
    if backward is not None:
        parts.append(f"backward-{backward}")
    return "-".join(parts) or None


def main(argv=None) -> int:
    """Run the suite; the exit status is 1 when some config disagrees with torch."""
    args = parse_args(argv)
    if args.cpu and (args.smoke or args.headline):
        sys.exit("--cpu times the native CPU path; it does not combine with --smoke or --headline")
    if args.cpu and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--cpu times PyTorch's native operator, which TRITON_INTERPRET=1 replaces by the "
                 "interpreted kernels: run it without TRITON_INTERPRET")
    smoke = not args.cpu and (args.smoke or not torch.cuda.is_available())
    if smoke:
        interpret_kernels("--smoke", "python -m bench --smoke")
    from bench import suite

    if smoke and not args.smoke:
        print("No CUDA device: running the CPU smoke configuration in Triton's interpreter.")
    if args.cpu:
        torch.set_num_threads(args.threads)
    preset = "cpu" if args.cpu else "smoke" if smoke else "headline" if args.headline else "grid"
    overrides = axis_overrides(args)
    configs = suite.select_configs(preset, **overrides)
    device = "cpu" if smoke or args.cpu else "cuda"
    header = suite.environment(device)
    print(f"device {header['device']}, torch {header['torch']}, triton {header['triton']}, cuDNN {header['cudnn']}")
    print(f"fused_rnn launch scheme: {header['scheme']}; {len(configs)} configs ({preset})")

    rows = suite.run_suite(configs, device, progress=not args.no_progress)
    print(suite.format_cpu_table(rows) if args.cpu else suite.format_table(rows))
    print(suite.cpu_summary(rows) if args.cpu else suite.summary(rows))
    if smoke:
        print(CPU_NOTE)
    if args.out is None and device == "cpu":
        print("Nothing written: a CPU run writes its JSON and PNG only into an explicit --out DIR.")
    else:
        tag = results_tag(preset, overrides, scheme=os.environ.get("FUSED_RNN_SCHEME"),
                          backward=os.environ.get("FUSED_RNN_BACKWARD"))
        for path in suite.write_results(header, rows, args.out or suite.RESULTS_DIR, tag=tag):
            if path is not None:
                print(f"wrote {path}")
    return 0 if all(row["correct"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
