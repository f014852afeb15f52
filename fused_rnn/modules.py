"""``LSTM`` and ``GRU`` modules: drop-in replacements for ``torch.nn.LSTM`` / ``torch.nn.GRU``.

Constructor, parameters (names, shapes, order, initialisation), ``state_dict``, argument checks
and return values are PyTorch's own: the modules build on ``torch.nn.RNNBase`` and borrow
``nn.LSTM``'s hidden-state checks. Only ``forward`` differs: it runs ``fused_rnn.functional``.
The modules deliberately do not subclass ``nn.LSTM`` / ``nn.GRU``, which ``torch.compile``
refuses to trace.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional

__all__ = ["LSTM", "GRU", "convert"]


def _pack_like(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``output (T, B, F)`` (caller's batch order) with the exact layout of ``like``."""
    if like.sorted_indices is not None:
        output = output.index_select(1, like.sorted_indices)
        lengths = lengths[like.sorted_indices.cpu()]
    data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class _FusedRNNBase(nn.modules.rnn.RNNBase):
    def flatten_parameters(self) -> None:
        """Kept for compatibility with ``nn.LSTM``; the fused kernels need no flat weight buffer."""

    def _prepare(self, input, hx, lengths, check_batched_hx):
        """Shared input handling: returns ``(input, hx, lengths, packed, is_batched)``.

        ``check_batched_hx(hx, is_batched)`` validates and (for unbatched input) unsqueezes hx.
        """
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths cannot be given with a PackedSequence, which has its own")
            if hx is None:
                self.check_input(input.data, input.batch_sizes)
            else:
                hx = check_batched_hx(hx, True)
                self.check_forward_args(input.data, hx, input.batch_sizes)
            # Padded data in the caller's batch order, which is also the order of hx.
            padded, lengths = pad_packed_sequence(input)
            return padded, hx, lengths, input, True
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.mode}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        if not is_batched:
            if lengths is not None:
                raise ValueError("lengths needs batched 3-D input")
            input = input.unsqueeze(0 if self.batch_first else 1)
        if hx is not None:
            hx = check_batched_hx(hx, is_batched)
            self.check_forward_args(input, hx, None)
        else:
            self.check_input(input, None)
        return input, hx, lengths, None, is_batched

    def _arguments(self):
        return dict(
            has_biases=self.bias, num_layers=self.num_layers, dropout=self.dropout,
            train=self.training, bidirectional=self.bidirectional,
        )


class LSTM(_FusedRNNBase):
    """Multi-layer LSTM, a drop-in replacement for ``torch.nn.LSTM`` running fused Triton kernels.

    Takes nn.LSTM's arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None``)
    and returns ``output, (h_n, c_n)`` for a tensor or PackedSequence input, like nn.LSTM.
    ``forward`` also accepts ``lengths`` (B,): each sequence ends at its own length, outputs past
    it are zero and ``h_n, c_n`` are taken at each sequence's end - packing without a PackedSequence.
    """

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    @staticmethod
    def _check_hx(hx, is_batched):
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        h0, c0 = hx
        dims = 3 if is_batched else 2
        if h0.dim() != dims or c0.dim() != dims:
            raise RuntimeError(
                f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx and cx should also be "
                f"{dims}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        return (h0, c0) if is_batched else (h0.unsqueeze(1), c0.unsqueeze(1))

    def forward(self, input, hx=None, lengths=None):
        input, hx, lengths, packed, is_batched = self._prepare(input, hx, lengths, self._check_hx)
        output, (h_n, c_n) = functional.lstm(
            input, hx, self._flat_weights, batch_first=self.batch_first and packed is None,
            lengths=lengths, **self._arguments(),
        )
        if packed is not None:
            return _pack_like(output, lengths, packed), (h_n, c_n)
        if not is_batched:
            return output.squeeze(0 if self.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)


class GRU(_FusedRNNBase):
    """Multi-layer GRU, a drop-in replacement for ``torch.nn.GRU`` running fused Triton kernels.

    Takes nn.GRU's arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``) and returns
    ``output, h_n`` like nn.GRU; ``forward`` also accepts ``lengths`` as ``LSTM`` does.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    @staticmethod
    def _check_hx(hx, is_batched):
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"GRU: hx must be a tensor h_0, got {type(hx).__name__}")
        dims = 3 if is_batched else 2
        if hx.dim() != dims:
            raise RuntimeError(
                f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx should also be "
                f"{dims}-D but got {hx.dim()}-D tensor"
            )
        return hx if is_batched else hx.unsqueeze(1)

    def forward(self, input, hx=None, lengths=None):
        input, hx, lengths, packed, is_batched = self._prepare(input, hx, lengths, self._check_hx)
        output, h_n = functional.gru(
            input, hx, self._flat_weights, batch_first=self.batch_first and packed is None,
            lengths=lengths, **self._arguments(),
        )
        if packed is not None:
            return _pack_like(output, lengths, packed), h_n
        if not is_batched:
            return output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n


def _fused_twin(module: nn.Module) -> nn.Module:
    """A fused LSTM / GRU sharing ``module``'s parameter objects (optimizers keep working)."""
    kwargs = dict(
        input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
        bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
        bidirectional=module.bidirectional, device="meta",
    )
    if isinstance(module, nn.LSTM):
        twin = LSTM(proj_size=module.proj_size, **kwargs)
    else:
        twin = GRU(**kwargs)
    for name in module._flat_weights_names:
        setattr(twin, name, getattr(module, name))
    twin._init_flat_weights()
    return twin.train(module.training)


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` in ``model`` by the fused module, in place.

    Subclasses of ``nn.LSTM`` / ``nn.GRU`` are left alone: they may change ``forward``.
    The fused modules share the original parameters, so weights, devices, dtypes and any
    optimizer holding them stay valid. Returns ``model`` (or its replacement, when ``model``
    itself is an ``nn.LSTM`` / ``nn.GRU``).
    """
    # Exact types: a subclass may override forward, which a fused twin would silently drop.
    if type(model) in (nn.LSTM, nn.GRU):
        return _fused_twin(model)
    for name, child in model.named_children():
        replaced = convert(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
