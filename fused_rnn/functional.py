"""Autograd Functions over the Triton recurrences, and the functional LSTM / GRU.

Each layer and direction is
    gates_x = x W_ih^T + b          one GEMM over all timesteps (cuBLAS through torch, autograd)
    h_seq   = Recurrence(gates_x)   the Triton time loop, with a hand-written BPTT backward
The backward of a recurrence returns ``dgates`` (the gradient of ``gates_x``; autograd turns it
into dx, dW_ih and the biases' gradients with GEMMs) and computes dW_hh, dW_hr and db_hh as
single GEMMs / reductions over all ``T * B`` rows after the loop.

On CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``, the Triton kernels run; other
CPU tensors take the PyTorch reference recurrence (``fused_rnn.reference``).
"""

import torch
import torch.nn.functional as F

from . import reference
from .ops.gru import gru_backward, gru_forward
from .ops.launch import accumulator_dtype, final_slot, runs_triton, states_after, states_before
from .ops.lstm import lstm_backward, lstm_forward

__all__ = ["lstm", "gru", "lstm_recurrence", "gru_recurrence", "LSTMRecurrence", "GRURecurrence"]


def _first_step(num_steps: int, reverse: bool) -> int:
    return num_steps - 1 if reverse else 0


def _refuse_double_backward() -> None:
    # The hand-written backward is not itself differentiable. Raising (as cuDNN's RNN does) beats
    # the silently partial second derivative that autograd would build around it.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fused_rnn: double backward (create_graph=True through an LSTM/GRU layer) is not supported"
        )


class LSTMRecurrence(torch.autograd.Function):
    """``(gates_x, W_hh, W_hr, h0, c0, lengths, reverse, grad_enabled) -> (h_seq (T, B, P), c_n (B, H))``.

    ``grad_enabled`` is ``torch.is_grad_enabled()`` at the call: nothing is saved without it.
    """

    @staticmethod
    def forward(ctx, gates_x, w_hh, w_hr, h0, c0, lengths, reverse, grad_enabled):
        save = grad_enabled and any(ctx.needs_input_grad)
        h, c, h_raw, gates = lstm_forward(gates_x, w_hh, w_hr, h0, c0, lengths, reverse, save)
        ctx.reverse = reverse
        if save:
            ctx.save_for_backward(w_hh, w_hr, lengths, h, c, h_raw, gates)
        num_steps = gates_x.shape[0]
        return states_after(h, reverse), c[final_slot(num_steps, reverse)].to(gates_x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_h_seq, grad_c_n):
        _refuse_double_backward()
        w_hh, w_hr, lengths, h, c, h_raw, gates = ctx.saved_tensors
        reverse = ctx.reverse
        T, B, P = h.shape[0] - 1, h.shape[1], h.shape[2]
        H = c.shape[2]
        if grad_h_seq is None:
            grad_h_seq = torch.zeros(T, B, P, dtype=h.dtype, device=h.device)
        if grad_c_n is None:
            grad_c_n = torch.zeros(B, H, dtype=h.dtype, device=h.device)
        dgates, grad_h_proj, dh_carry, dc0 = lstm_backward(
            grad_h_seq, grad_c_n, w_hh, w_hr, lengths, reverse, gates, c
        )
        need_w_hh, need_w_hr, need_h0, need_c0 = ctx.needs_input_grad[1:5]
        grad_w_hh = grad_w_hr = grad_h0 = grad_c0 = None
        if need_w_hh:
            grad_w_hh = dgates.view(T * B, 4 * H).t() @ states_before(h, reverse).reshape(T * B, P)
        if need_w_hr:
            grad_w_hr = grad_h_proj.view(T * B, P).t() @ h_raw.view(T * B, H)
        if need_h0:
            grad_h0 = (dh_carry + dgates[_first_step(T, reverse)] @ w_hh).to(h.dtype)
        if need_c0:
            grad_c0 = dc0.to(h.dtype)
        return dgates, grad_w_hh, grad_w_hr, grad_h0, grad_c0, None, None, None


class GRURecurrence(torch.autograd.Function):
    """``(gates_x, W_hh, b_hh, h0, lengths, reverse, grad_enabled) -> h_seq (T, B, H)``."""

    @staticmethod
    def forward(ctx, gates_x, w_hh, b_hh, h0, lengths, reverse, grad_enabled):
        save = grad_enabled and any(ctx.needs_input_grad)
        h, gates = gru_forward(gates_x, w_hh, b_hh, h0, lengths, reverse, save)
        ctx.reverse = reverse
        if save:
            ctx.save_for_backward(w_hh, lengths, h, gates)
        return states_after(h, reverse)

    @staticmethod
    def backward(ctx, grad_h_seq):
        _refuse_double_backward()
        w_hh, lengths, h, gates = ctx.saved_tensors
        reverse = ctx.reverse
        T, B, H = h.shape[0] - 1, h.shape[1], h.shape[2]
        dgates_x, dgates_h, dh_carry = gru_backward(grad_h_seq, w_hh, lengths, reverse, gates, h)
        need_w_hh, need_b_hh, need_h0 = ctx.needs_input_grad[1:4]
        grad_w_hh = grad_b_hh = grad_h0 = None
        if need_w_hh:
            grad_w_hh = dgates_h.view(T * B, 3 * H).t() @ states_before(h, reverse).reshape(T * B, H)
        if need_b_hh:
            grad_b_hh = dgates_h.sum(dim=(0, 1), dtype=accumulator_dtype(h.dtype)).to(h.dtype)
        if need_h0:
            grad_h0 = (dh_carry + dgates_h[_first_step(T, reverse)] @ w_hh).to(h.dtype)
        return dgates_x, grad_w_hh, grad_b_hh, grad_h0, None, None, None


def lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths=None, reverse=False):
    """One LSTM layer's recurrence over ``gates_x (T, B, 4H)``; see ``reference.lstm_recurrence``."""
    if runs_triton(gates_x) and gates_x.shape[1] > 0:
        return LSTMRecurrence.apply(gates_x, w_hh, w_hr, h0, c0, lengths, reverse, torch.is_grad_enabled())
    return reference.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths, reverse)


def gru_recurrence(gates_x, w_hh, b_hh, h0, lengths=None, reverse=False):
    """One GRU layer's recurrence over ``gates_x (T, B, 3H)``; see ``reference.gru_recurrence``."""
    if runs_triton(gates_x) and gates_x.shape[1] > 0:
        return GRURecurrence.apply(gates_x, w_hh, b_hh, h0, lengths, reverse, torch.is_grad_enabled())
    return reference.gru_recurrence(gates_x, w_hh, b_hh, h0, lengths, reverse)


def _lstm_layer(x, weights, has_biases, state, lengths, reverse):
    w_ih, w_hh = weights[0], weights[1]
    bias = weights[2] + weights[3] if has_biases else None
    w_hr = weights[-1] if len(weights) == (5 if has_biases else 3) else None
    h0, c0 = state
    h_seq, c_n = lstm_recurrence(F.linear(x, w_ih, bias), w_hh, w_hr, h0, c0, lengths, reverse)
    return h_seq, (h_seq[0] if reverse else h_seq[-1], c_n)


def _gru_layer(x, weights, has_biases, state, lengths, reverse):
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    (h0,) = state
    h_seq = gru_recurrence(F.linear(x, w_ih, b_ih), w_hh, b_hh, h0, lengths, reverse)
    return h_seq, (h_seq[0] if reverse else h_seq[-1],)


def _check_device(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    if tensor.device != input.device:
        raise RuntimeError(
            f"Input and {name} tensors are not at the same device, found input tensor at "
            f"{input.device} and {name} tensor at {tensor.device}"
        )


def _check_dtype(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    if tensor.dtype != input.dtype:
        raise RuntimeError(f"{name} dtype ({tensor.dtype}) does not match input dtype ({input.dtype})")


def _check_lengths(lengths, num_steps: int, batch: int) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must be a 1-D tensor of {batch} entries, got shape {list(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    # Reading the values needs them on the host: skipped where that is impossible (inside
    # torch.compile or CUDA graph capture); out-of-range values cannot make the kernels misbehave.
    capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()
    if batch > 0 and not torch.compiler.is_compiling() and not capturing:
        shortest, longest = int(lengths.min()), int(lengths.max())
        if shortest < 1 or longest > num_steps:
            raise ValueError(
                f"lengths must lie in [1, {num_steps}] (the input's sequence length), "
                f"got values from {shortest} to {longest}"
            )
    return lengths


def _check_weights(cell, params, num_gates, has_biases, num_layers, num_directions, input_size):
    """Check every weight's shape against the first ``W_hh``; returns ``(hidden_size, P)``."""
    groups = num_layers * num_directions
    per_group = len(params) // groups
    base = 4 if has_biases else 2  # W_ih, W_hh[, b_ih, b_hh]; LSTM may add W_hr
    has_proj = cell == "LSTM" and per_group == base + 1
    if len(params) != groups * per_group or per_group != base + has_proj:
        raise ValueError(
            f"{cell}: expected the weights of {num_layers} layer(s) x {num_directions} direction(s)"
            f"{' with biases' if has_biases else ''}, got {len(params)} tensors"
        )
    hidden, features = params[1].shape[0] // num_gates, params[1].shape[1]
    for group in range(groups):
        layer_input = input_size if group < num_directions else num_directions * features
        expected = [(num_gates * hidden, layer_input), (num_gates * hidden, features)]
        if has_biases:
            expected += [(num_gates * hidden,)] * 2
        if has_proj:
            expected.append((features, hidden))
        for index, shape in enumerate(expected):
            weight = params[group * per_group + index]
            if tuple(weight.shape) != shape:
                raise RuntimeError(
                    f"{cell}: weight {group * per_group + index} (layer {group // num_directions}, "
                    f"direction {group % num_directions}) has shape {list(weight.shape)}, expected {list(shape)}"
                )
    return hidden, features


def _run(cell, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths):
    """Shared multi-layer, bidirectional driver; ``hx`` is a tuple of ``(L * D, B, .)`` states or None."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        got = f"{input.dim()}-D tensor" if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"{cell}: expected a 3-D input tensor, got {got}")
    if not input.is_floating_point():
        raise ValueError(f"{cell}: input must be a floating point tensor, got {input.dtype}")
    x = input.transpose(0, 1) if batch_first else input
    num_steps, batch = x.shape[0], x.shape[1]
    if num_steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    for param in params:
        _check_device("parameter", param, x)
    for state in hx or ():
        _check_device("hidden", state, x)
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        # As nn.LSTM / nn.GRU under autocast: input, weights and states all run in one lower
        # precision - on CUDA always float16, whatever the autocast dtype, because PyTorch's cuDNN
        # RNN autocast wrapper hardcodes it (aten/src/ATen/cudnn/AutocastRNN.cpp). The casts are
        # differentiable, so gradients reach the parameters in their own dtype.
        dtype = torch.float16 if x.is_cuda else torch.get_autocast_dtype(x.device.type)
        x, params = x.to(dtype), [param.to(dtype) for param in params]
        hx = None if hx is None else tuple(state.to(dtype) for state in hx)
    num_directions = 2 if bidirectional else 1
    groups = num_layers * num_directions
    for param in params:
        _check_dtype("parameter", param, x)
    num_gates, layer_fn = (4, _lstm_layer) if cell == "LSTM" else (3, _gru_layer)
    hidden, features = _check_weights(cell, params, num_gates, has_biases, num_layers, num_directions, x.shape[2])
    state_shapes = [(groups, batch, features), (groups, batch, hidden)][: 2 if cell == "LSTM" else 1]
    if hx is None:
        hx = tuple(torch.zeros(shape, dtype=x.dtype, device=x.device) for shape in state_shapes)
    for state, shape in zip(hx, state_shapes):
        _check_dtype("hidden", state, x)
        if tuple(state.shape) != shape:
            raise RuntimeError(f"Expected hidden size {shape}, got {list(state.shape)}")
    if lengths is not None:
        lengths = _check_lengths(lengths, num_steps, batch).to(device=x.device, dtype=torch.int64)

    per_group = len(params) // groups
    finals = [[] for _ in hx]
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            group = layer * num_directions + direction
            weights = params[group * per_group:(group + 1) * per_group]
            state = tuple(s[group] for s in hx)
            out, last = layer_fn(x, weights, has_biases, state, lengths, direction == 1)
            outputs.append(out)
            for collected, value in zip(finals, last):
                collected.append(value)
        x = torch.cat(outputs, dim=2) if num_directions == 2 else outputs[0]
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    if lengths is not None:
        valid = torch.arange(num_steps, device=x.device)[:, None] < lengths[None, :]
        x = torch.where(valid[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    output = x.transpose(0, 1) if batch_first else x
    return output, tuple(torch.stack(collected) for collected in finals)


def lstm(
    input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
    bidirectional=False, batch_first=False, lengths=None,
):
    """Multi-layer LSTM with the math and weight layout of ``torch.nn.LSTM``.

    ``params`` lists, per layer and direction (forward, then reverse), ``W_ih, W_hh[, b_ih, b_hh]
    [, W_hr]`` exactly as ``nn.LSTM._flat_weights``. ``hx`` is ``(h_0, c_0)`` or ``None``.
    ``lengths`` (B,) makes each sequence end at its own length: outputs past it are zero and the
    final states are taken at each sequence's end (same as packing, without a PackedSequence).
    Returns ``output, (h_n, c_n)``.
    """
    if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
    output, (h_n, c_n) = _run(
        "LSTM", input, None if hx is None else tuple(hx), params, has_biases, num_layers, dropout,
        train, bidirectional, batch_first, lengths,
    )
    return output, (h_n, c_n)


def gru(
    input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
    bidirectional=False, batch_first=False, lengths=None,
):
    """Multi-layer GRU with the math and weight layout of ``torch.nn.GRU``.

    ``params`` lists, per layer and direction, ``W_ih, W_hh[, b_ih, b_hh]`` exactly as
    ``nn.GRU._flat_weights``; ``hx`` is ``h_0`` or ``None``; ``lengths`` as in ``lstm``.
    Returns ``output, h_n``.
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"GRU: hx must be a tensor h_0, got {type(hx).__name__}")
    output, (h_n,) = _run(
        "GRU", input, None if hx is None else (hx,), params, has_biases, num_layers, dropout,
        train, bidirectional, batch_first, lengths,
    )
    return output, h_n
