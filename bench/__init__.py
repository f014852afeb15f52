"""Benchmark suite: ``fused_rnn.LSTM`` / ``fused_rnn.GRU`` against ``torch.nn.LSTM`` / ``nn.GRU`` (cuDNN).

``python -m bench --help`` lists the options; ``bench.suite`` holds the importable pieces (config
grids, the agreement check, timing, the result rows, the JSON file and the plot).
docs/performance.md explains the grid, the targets and how to read the results. This module holds
what the entry points (``bench``, ``bench.drift``) share and may use before fused_rnn is imported.
"""

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


def text_table(lines: list) -> str:
    """Rows of strings (the header first) right-aligned in columns two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)
