"""fused_rnn: LSTM and GRU layers whose recurrence runs in fused Triton kernels.

``fused_rnn.LSTM`` / ``fused_rnn.GRU`` are drop-in replacements for ``torch.nn.LSTM`` /
``torch.nn.GRU``; ``fused_rnn.convert(model)`` swaps them into an existing model;
``fused_rnn.functional`` holds the functional API for users who keep their own weights.
"""

from . import functional
from .modules import GRU, LSTM, convert

__all__ = ["LSTM", "GRU", "convert", "functional"]
__version__ = "0.1.0"
