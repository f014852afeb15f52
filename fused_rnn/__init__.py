"""fused_rnn: LSTM, GRU and RNN layers whose recurrence runs in fused Triton kernels.

``fused_rnn.LSTM`` / ``fused_rnn.GRU`` / ``fused_rnn.RNN`` are drop-in replacements for
``torch.nn.LSTM`` / ``GRU`` / ``RNN``; ``fused_rnn.convert(model)`` swaps them into an existing model;
``fused_rnn.functional`` holds the functional API for users who keep their own weights.
"""

from . import functional
from .modules import GRU, LSTM, RNN, convert

__all__ = ["LSTM", "GRU", "RNN", "convert", "functional"]
__version__ = "0.1.0"
