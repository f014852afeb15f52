"""The CPU path: PyTorch's own RNN operator, the very call ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` make.

The Triton kernels run on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``). On a
plain CPU tensor (an eager module call that needs none of fused_rnn's options skips even this:
it is torch.nn's own ``forward``, ``modules._FusedRNNBase._torch_serves``) ``layers`` runs
``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` with the same flat weights, so results,
dropout masks, speed and the backward (PyTorch's native one) are those of torch.nn. ``lengths``
become a ``PackedSequence`` around the packed variant of the operator (``batch_sizes``), as
``nn.LSTM`` runs a packed input.

While ``torch.export`` or ``torch.compile`` traces the model, the call goes through the custom op
``fused_rnn::native_rnn`` instead. Traced, ``aten.lstm`` decomposes into one block of ops per
timestep, which fixes the sequence length to the example's (export then refuses a dynamic time
axis). The custom op is opaque: its fake implementation gives the output shapes in terms of the
input's, so the batch and time axes stay symbolic, and its real implementation is the ``_VF``
call. Its backward (``fused_rnn::native_rnn_backward``, for training under ``torch.compile``)
runs the forward again under autograd and differentiates that: correct, not the fastest.
Eager calls never take the custom op, whose dispatch and recomputing backward would cost time.
"""

from typing import Optional

import torch
from torch import _VF
from torch._C import DispatchKey
from torch._C._functorch import TransformType
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import launch

__all__ = ["handles", "layers"]

# The ``torch._VF`` operator of each cell; looked up at each call so that a patched one is used.
_OPERATORS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
# Bytes of the CPU generator's state (``torch.get_rng_state()``): the fake ``rng_state``'s size.
_RNG_STATE_BYTES = torch.get_rng_state().numel()


def handles(x: torch.Tensor) -> bool:
    """Whether ``layers`` runs this input: a CPU tensor while Triton is not interpreting, outside
    ``vmap``, for which PyTorch's operator has no batching rule (``nn.LSTM`` raises there; the
    layers run in plain PyTorch instead, ``reference.layer``)."""
    return x.is_cpu and not launch.interpreting() and not _vmapped()


def _vmapped() -> bool:
    """Whether torch.func's ``vmap`` is active (``jacrev``'s, ``jacfwd``'s and ``hessian``'s too)."""
    return torch._C._are_functorch_transforms_active() and any(
        interpreter.key() == TransformType.Vmap for interpreter in torch._C._functorch.get_interpreter_stack())


def layers(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths):
    """All layers and directions over time-major ``x (T, B, I)`` with PyTorch's native operator.

    ``cell`` is "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"; ``x``, ``hx`` (a tuple of ``(L * D, B, .)``
    states: ``(h0, c0)`` for the LSTM, ``(h0,)`` otherwise) and ``params`` (``nn.LSTM._flat_weights``
    order) are already checked; ``lengths`` is an int64 tensor (B,) on ``x``'s device, or None.
    Returns ``output (T, B, D * P)`` and the tuple of final states ``(L * D, B, .)``; outputs past
    a sequence's end are zero.
    """
    arguments = (has_biases, num_layers, dropout, train, bidirectional)
    if torch.compiler.is_compiling():
        output, finals, _ = torch.ops.fused_rnn.native_rnn(cell, x, list(hx), list(params), *arguments, lengths)
        return output, tuple(finals)
    return _native(cell, x, hx, params, *arguments, lengths)


def _native(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths):
    """The ``_VF`` call behind ``layers`` (see there); the packed variant when ``lengths`` is given."""
    operator = getattr(_VF, _OPERATORS[cell])
    arguments = (has_biases, num_layers, dropout, train, bidirectional)
    if lengths is None or x.shape[1] == 0:  # an empty batch has no sequence to pack
        output, *finals = operator(x, _state_argument(cell, hx), params, *arguments, False)
        return output, tuple(finals)
    # The packed operator wants the sequences longest first: sort the batch, and the states with
    # it, then put both back in the caller's order (as nn.LSTM does for an unsorted PackedSequence).
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    order, restore = packed.sorted_indices, packed.unsorted_indices
    sorted_hx = tuple(state.index_select(1, order) for state in hx)
    data, *finals = operator(packed.data, packed.batch_sizes, _state_argument(cell, sorted_hx), params, *arguments)
    output, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, order, restore), total_length=x.shape[0]
    )
    return output, tuple(state.index_select(1, restore) for state in finals)


def _state_argument(cell, hx):
    """``hx`` as the operator takes it: the list ``[h0, c0]`` for the LSTM, the tensor ``h0`` otherwise."""
    return list(hx) if cell == "LSTM" else hx[0]


def _drops_out(num_layers: int, dropout: float, train: bool) -> bool:
    """Whether the operator draws dropout masks (between layers, in training) from the CPU generator."""
    return dropout > 0 and train and num_layers > 1


@torch.library.custom_op("fused_rnn::native_rnn", mutates_args=())
def native_rnn(
    cell: str, x: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
    num_layers: int, dropout: float, train: bool, bidirectional: bool, lengths: Optional[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``layers`` as one opaque operator for tracers: ``(output, final states, rng_state)``.

    ``rng_state`` is the CPU generator's state before the call when the operator draws dropout
    masks (empty otherwise): the backward restores it to draw the same masks again.
    """
    rng_state = torch.get_rng_state() if _drops_out(num_layers, dropout, train) else x.new_empty(0, dtype=torch.uint8)
    output, finals = _native(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths)
    return output, list(finals), rng_state


@native_rnn.register_fake
def _(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths):
    num_directions = 2 if bidirectional else 1
    output = x.new_empty(x.shape[0], x.shape[1], num_directions * hx[0].shape[2])
    rng_bytes = _RNG_STATE_BYTES if _drops_out(num_layers, dropout, train) else 0
    return output, [state.new_empty(state.shape) for state in hx], x.new_empty(rng_bytes, dtype=torch.uint8)


def _autograd_dispatch():
    """Autograd back on inside a custom op's implementation, which the dispatcher runs with the
    autograd keys excluded (as PyTorch's own higher-order ops do to run autograd in theirs)."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


@torch.library.custom_op("fused_rnn::native_rnn_backward", mutates_args=())
def native_rnn_backward(
    cell: str, x: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor], has_biases: bool,
    num_layers: int, dropout: float, train: bool, bidirectional: bool, lengths: Optional[torch.Tensor],
    rng_state: torch.Tensor, grad_output: torch.Tensor, grad_finals: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradients ``(of x, of each state, of each weight)`` of ``native_rnn``: its forward is run
    again under autograd (with the same dropout masks) and differentiated by PyTorch."""
    leaves = [tensor.detach().requires_grad_() for tensor in (x, *hx, *params)]
    num_states = len(hx)
    with _autograd_dispatch(), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        if rng_state.numel():
            torch.set_rng_state(rng_state)
        output, finals = _native(
            cell, leaves[0], leaves[1:1 + num_states], leaves[1 + num_states:], has_biases, num_layers, dropout,
            train, bidirectional, lengths,
        )
    grads = torch.autograd.grad((output, *finals), leaves, (grad_output, *grad_finals), allow_unused=True)
    # Contiguous, as the fake implementation promises (a transposed input gets a transposed gradient).
    grads = [leaf.new_zeros(leaf.shape) if grad is None else grad.contiguous() for leaf, grad in zip(leaves, grads)]
    return grads[0], grads[1:1 + num_states], grads[1 + num_states:]


@native_rnn_backward.register_fake
def _(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths, rng_state,
      grad_output, grad_finals):
    return x.new_empty(x.shape), [state.new_empty(state.shape) for state in hx], [p.new_empty(p.shape) for p in params]


def _save_inputs(ctx, inputs, output):
    """``native_rnn``'s autograd context: its inputs and the generator state its dropout drew from."""
    cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.options = (cell, has_biases, num_layers, dropout, train, bidirectional)
    ctx.num_states = len(hx)
    ctx.save_for_backward(x, lengths, output[2], *hx, *params)


def _backward(ctx, grad_output, grad_finals, _grad_rng_state):
    """``native_rnn``'s backward: one ``native_rnn_backward``, opaque to tracers as the forward is."""
    cell, has_biases, num_layers, dropout, train, bidirectional = ctx.options
    x, lengths, rng_state, *weights = ctx.saved_tensors
    hx, params = weights[:ctx.num_states], weights[ctx.num_states:]
    # Outputs that fed nothing arrive as None; the backward operator takes tensors.
    if grad_output is None:
        grad_output = x.new_zeros(x.shape[0], x.shape[1], (2 if bidirectional else 1) * hx[0].shape[2])
    grad_finals = [torch.zeros_like(s) if g is None else g for s, g in zip(hx, grad_finals)]
    grad_x, grad_hx, grad_params = torch.ops.fused_rnn.native_rnn_backward(
        cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths, rng_state,
        grad_output, grad_finals,
    )
    return None, grad_x, grad_hx, grad_params, None, None, None, None, None, None


native_rnn.register_autograd(_backward, setup_context=_save_inputs)
