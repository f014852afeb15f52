"""Benchmark suite: ``fused_rnn.LSTM`` / ``fused_rnn.GRU`` against ``torch.nn.LSTM`` / ``nn.GRU`` (cuDNN).

``python -m bench --help`` lists the options; ``bench.suite`` holds the importable pieces (config
grids, the agreement check, timing, the result rows, the JSON file and the plot).
docs/performance.md explains the grid, the targets and how to read the results. This module holds
what the entry points (``bench``, ``bench.drift``) share and may use before fused_rnn is imported.
"""

import functools
import os
import sys

# What a config times: the presets run MODES; gradient_penalty (second derivatives) and the packed
# modes (a PackedSequence of unequal lengths in, both modules) when asked for.
MODES = ("forward", "forward_backward")
PACKED_MODES = ("packed_forward", "packed_forward_backward")
ALL_MODES = (*MODES, "gradient_penalty", *PACKED_MODES)


def interpret_kernels(what: str, command: str) -> None:
    """Make fused_rnn's kernels run in Triton's interpreter (a CPU run of ``what``).

    Triton reads ``TRITON_INTERPRET`` when fused_rnn's kernels are defined, i.e. on its first
    import: too late once Triton is loaded without it, so that exits naming ``command`` instead.
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit(f"{what} needs TRITON_INTERPRET=1 before triton is imported; run `{command}`")
    os.environ["TRITON_INTERPRET"] = "1"


def bfloat16_rounding(cast_impl):
    """Triton's ``interpreter.InterpreterBuilder.cast_impl`` with fp32 -> bfloat16 rounded to
    nearest, ties to even, as a GPU's ``cvt.rn.bf16.f32`` and torch round: the interpreter
    (Triton 3.6 and 3.9) drops the low 16 bits instead, twice a rounding's error at every bfloat16
    store. The tests and ``bench.drift`` install it; Triton must already run interpreted."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    @functools.wraps(cast_impl)
    def cast(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return cast_impl(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded), tl.bfloat16)

    return cast


def text_table(lines: list) -> str:
    """Rows of strings (the header first) right-aligned in columns two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
