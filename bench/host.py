"""``python -m bench.host``: the host's work per call of a fused layer on the kernel path.

At T = 1 to a few dozen steps a call's time on a GPU is its Python and dispatch, not its steps
(docs/performance.md, "Short sequences"). This measures that part without a GPU: the modules run
the kernel path on CPU tensors in Triton's interpreter with every Triton launch left out
(``launch.launch`` does nothing) and each shape's plan made once, as a GPU's is, so what remains
is the host's work of a call: the argument checks, the autograd Function, the custom ops'
dispatch, the buffers, and torch's operators at sizes too small to take time (the input GEMM and
the weight gradients). One CPU thread; microseconds per call, the median and the fastest of the
repeats, and the count of torch operators a call runs at the top level (views included). On a
GPU each operator that launches work also pays CUDA's launch, which this does not count.
"""

import argparse
import contextlib
import functools
import statistics
import sys
import time
from unittest import mock

from bench import interpret_kernels, text_table

interpret_kernels("python -m bench.host", "TRITON_INTERPRET=1 python -m bench.host")

import torch  # noqa: E402

import fused_rnn  # noqa: E402
from fused_rnn.ops import launch  # noqa: E402

CELLS = ("LSTM", "GRU", "RNN")


def operators(call) -> int:
    """Top-level torch operators in one ``call``: those that fused_rnn and autograd call, not
    those that run inside another operator (a custom op's count, as its Python calls them)."""
    with torch.profiler.profile() as profile:
        call()

    def top_level(event):
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        return parent is None

    return sum(1 for event in profile.events() if event.name.startswith("aten::") and top_level(event))


@contextlib.contextmanager
def launches_left_out():
    """The kernel path without its Triton launches, its plans cached as on a GPU (``launch.plan``)."""
    with mock.patch.object(launch, "launch", lambda *args, **kwargs: None), \
            mock.patch.object(launch, "plan", functools.lru_cache(launch.plan)):
        yield


def calls(cell: str, batch: int, seq: int, hidden: int) -> dict:
    """The two calls timed: a forward under ``no_grad``, and a forward and backward."""
    module = getattr(fused_rnn, cell)(hidden, hidden)
    x = torch.randn(seq, batch, hidden, requires_grad=True)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module(x)[0].sum().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def measure(call, repeat: int, number: int) -> tuple:
    """``(median us, fastest us, operators)`` per call over ``repeat`` runs of ``number`` calls."""
    for _ in range(number):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(times), min(times), operators(call)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", nargs="+", choices=CELLS, default=["LSTM", "GRU"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs; the median and the fastest are shown")
    parser.add_argument("--number", type=int, default=200, help="calls per timed run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    table = [["cell", "B", "T", "H", "call", "median us", "fastest us", "operators"]]
    with launches_left_out():
        for cell in args.cell:
            for name, call in calls(cell, args.batch, args.seq, args.hidden).items():
                median, fastest, operators = measure(call, args.repeat, args.number)
                table.append([cell, str(args.batch), str(args.seq), str(args.hidden), name, f"{median:.0f}",
                              f"{fastest:.0f}", str(operators)])
    print(text_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
