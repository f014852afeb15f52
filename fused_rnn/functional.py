"""Autograd Functions over the Triton recurrences, and the functional LSTM / GRU / RNN.

A layer (every direction at once) is
    gates_x = x W_ih^T + b          one GEMM over all timesteps and directions (cuBLAS through torch)
    h       = recurrence(gates_x)   the Triton time loop (``ops``), both directions in one launch
and its backward is written by hand (``_FusedLayer``): the BPTT kernel gives the gate gradients,
then dx, dW_ih, the biases, dW_hh and dW_hr are single GEMMs / reductions over all ``T * B`` rows.

Where the layers run: ONNX operators during ``torch.onnx.export`` (``fused_rnn.onnx``); PyTorch's
own RNN operator on plain CPU tensors (``fused_rnn.native``); the Triton kernels on CUDA tensors,
and on CPU tensors under ``TRITON_INTERPRET=1``; ``fused_rnn.reference`` for empty batches, for
the options PyTorch's operator lacks on plain CPU tensors, under ``vmap`` and forward-mode AD
(which have no rule for the kernels' Functions), and on other devices (MPS, XPU).
"""

import functools
import numbers

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._C._functorch import TransformType

from . import native, onnx, reference
from .ops.gru import gru_backward, gru_forward
from .ops.launch import accumulator_dtype, runs_triton
from .ops.lstm import lstm_backward, lstm_forward
from .ops.rnn import rnn_backward, rnn_forward

__all__ = ["lstm", "gru", "rnn", "layer"]

NUM_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# Per direction, the fused layer takes (W_ih, W_hh, b_ih, b_hh, W_hr), None where absent.
WEIGHTS_PER_DIRECTION = 5
W_IH, W_HH, B_IH, B_HH, W_HR = range(WEIGHTS_PER_DIRECTION)


def _by_kind(weights):
    """The fused layer's flat ``weights`` as five lists over the directions: ``W_ih``, ``W_hh``,
    ``b_ih``, ``b_hh``, ``W_hr``."""
    return [weights[kind::WEIGHTS_PER_DIRECTION] for kind in range(WEIGHTS_PER_DIRECTION)]


def _recurrence_forward(mode, gates_x, w_hh, b_hh, w_hr, h0, c0, options, save):
    """``(h, c, h_raw, saved)`` of the cell's forward op; see ``ops.recurrence.forward_outputs``."""
    lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p = options
    if mode == "LSTM":
        return lstm_forward(gates_x, w_hh, w_hr, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p, save)
    if mode == "GRU":
        h, saved = gru_forward(gates_x, w_hh, b_hh, h0, lengths, resets, h_masks, zoneout_h, zoneout_p, save)
    else:
        h, saved = rnn_forward(gates_x, w_hh, h0, lengths, resets, h_masks, zoneout_h, zoneout_p, _nonlinearity(mode),
                               save)
    # Two tensors, not one twice: _FusedLayerUnderTransforms returns both, and AOT autograd fails on
    # a Function that returns one tensor twice (torch 2.13: "Placeholder node not found").
    return h, gates_x.new_empty(0), gates_x.new_empty(0), saved


def _recurrence_backward(mode, grad_h, grad_c_n, w_hh, w_hr, options, h, c, saved):
    """``(dgates_x, dgates_h, grad_h_proj, dh0, dc0)``; ``dgates_h`` is ``dgates_x`` but for the GRU."""
    lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p = options
    if mode == "LSTM":
        dgates, grad_h_proj, dh0, dc0 = lstm_backward(
            grad_h, grad_c_n, w_hh, w_hr, lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p, h, c, saved)
        return dgates, dgates, grad_h_proj, dh0, dc0
    if mode == "GRU":
        dgates_x, dgates_h, dh0 = gru_backward(grad_h, w_hh, lengths, resets, h_masks, zoneout_h, zoneout_p, h, saved)
        return dgates_x, dgates_h, None, dh0, None
    dgates, dh0 = rnn_backward(grad_h, w_hh, lengths, resets, h_masks, zoneout_h, zoneout_p, h, saved,
                               _nonlinearity(mode))
    return dgates, dgates, None, dh0, None


def _nonlinearity(mode: str) -> str:
    return mode.removeprefix("RNN_").lower()


def _stack(tensors):
    """The directions' tensors as one ``(D, ...)`` tensor, None where absent; one direction's is a
    view of it: a copy of the weights each call would be traffic and memory for nothing."""
    if tensors[0] is None:
        return None
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _cat(tensors):
    """The directions' tensors end to end along the first axis; one direction's as it is."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _final_states(states, num_steps: int) -> list:
    """The directions' last states in a ``(T+2, B, D, .)`` state buffer: the forward direction
    ends in slot ``T``, the reverse one in slot 1."""
    return [states[num_steps, :, 0]] + ([states[1, :, 1]] if states.shape[2] == 2 else [])


def _states_before(h, h0, resets, h_masks, direction: int):
    """``(T, B, P)``: the ``h_{t-1}`` each step multiplied by ``W_hh`` in one direction (after
    resets and the recurrent-dropout mask), in the order of ``t``."""
    num_steps = h.shape[0] - 2
    states = h[:num_steps, :, 0] if direction == 0 else h[2:, :, 1]
    if resets is not None:
        # Walking backwards in time, a segment starts at the step before the next one's start.
        starts = resets if direction == 0 else torch.cat([resets[1:], torch.zeros_like(resets[:1])])
        states = torch.where(starts[:, :, None], h0[direction], states)
    if h_masks is not None:
        states = states * h_masks[:, direction]
    return states


# _FusedLayer.apply's arguments: (mode, save, zoneout_p, x, h0, c0, lengths, resets,
# h_masks, zoneout_h, zoneout_c, *weights).
FIRST_TENSOR, FIRST_WEIGHT = 3, 11
LAYER_TENSORS = FIRST_WEIGHT - FIRST_TENSOR  # x, h0, c0 and the options' tensors
# It saves those, then its buffers (h, c, h_raw, saved), then the weights.
SAVED_BUFFERS = 4


class _FusedLayer(torch.autograd.Function):
    """One layer, every direction: the state buffer ``h (T+2, B, D, P)`` the kernel wrote, and
    ``c_n (D, B, H)`` for the LSTM (None for the other cells).

    ``weights`` lists ``(W_ih, W_hh, b_ih, b_hh, W_hr)`` per direction, None where absent; the
    options are those of ``reference.layer``. ``save`` asks for the saved activations (autograd
    is on and an input requires grad). ``layer`` takes the output (slots ``1..T``) and ``h_n`` as
    views of ``h``, outside the Function, so autograd treats the output as any view:
    changing it in place is allowed, and refused only by a backward that needs ``h``, as cuDNN's
    is (a view made inside a Function could not be changed at all).

    The context is set in ``forward``: for a Function with ``setup_context`` torch's ``apply``
    binds the arguments to the forward's signature with ``inspect`` on every call, which took a
    one-layer LSTM's forward from 165 to 221 us of host time (the CI machine's CPU, launches left
    out). torch.func's transforms take only that kind: ``_FusedLayerUnderTransforms`` is this
    Function so written.
    """

    @staticmethod
    def forward(ctx, *inputs):
        output = _FusedLayer._forward(*inputs)
        _FusedLayer._setup_context(ctx, inputs, output)
        return output[:2]  # (what the backward reads is in the context)

    @staticmethod
    def _forward(mode, save, zoneout_p, x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, *weights):
        num_steps, batch = x.shape[0], x.shape[1]
        w_ih, w_hh, b_ih, b_hh, w_hr = _by_kind(weights)
        directions = len(w_ih)
        # The GRU keeps b_hh apart (b_hn sits inside r * (.)); the other cells fold it into gates_x.
        if b_ih[0] is None:
            bias = None
        elif mode == "GRU":
            bias = _cat(b_ih)
        else:
            bias = _cat([b_i + b_h for b_i, b_h in zip(b_ih, b_hh)])
        gates_x = F.linear(x, _cat(w_ih), bias).view(num_steps, batch, directions, -1)
        options = (lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p)
        h, c, h_raw, saved = _recurrence_forward(
            mode, gates_x, _stack(w_hh), _stack(b_hh) if mode == "GRU" else None, _stack(w_hr), h0, c0,
            options, save)
        if mode != "LSTM":
            return h, None, c, h_raw, saved
        # Cast before stacking: under torch.compile, torch 2.11 drops the gradient of an output made
        # by a ``.to`` that changes nothing (fp32 and fp64 keep c in their own dtype), which
        # stack(...).to(x.dtype) was for them (tests/test_ecosystem.py's compiled gradients).
        return h, torch.stack([end.to(x.dtype) for end in _final_states(c, num_steps)]), c, h_raw, saved

    @staticmethod
    def _setup_context(ctx, inputs, output):
        mode, save, zoneout_p, x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, *weights = inputs
        h, _, c, h_raw, saved = output
        ctx.mode, ctx.zoneout_p = mode, zoneout_p
        # Else autograd hands the backward zeros the size of the saved activations.
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, h, c, h_raw, saved,
                                  *weights)

    @staticmethod
    def backward(ctx, grad_states, grad_c_n, *_non_differentiable):
        # Read once: each read unpacks them again (with save_on_cpu, a copy back to the device).
        saved_tensors = ctx.saved_tensors
        if not saved_tensors:
            raise RuntimeError("fused_rnn: this layer's backward has nothing to work from: autograd was off "
                               "where it ran (a torch.jit.trace made under torch.no_grad, or by check_trace, "
                               "bakes that in); use torch.export or torch.compile, or trace with grad enabled "
                               "and check_trace=False")
        h = saved_tensors[LAYER_TENSORS]  # the first of the buffers
        # Slots 0 and T+1 hold the initial states, which no output shows. No gradient: only c_n is used.
        grad_output = torch.zeros_like(h[1:-1]) if grad_states is None else grad_states[1:-1]
        layer = (ctx.mode, ctx.zoneout_p, ctx.needs_input_grad)
        if not torch.is_grad_enabled():
            return _first_order_backward(*layer, saved_tensors, grad_output, grad_c_n)
        if _torch_func_backward(*saved_tensors, grad_output, grad_c_n):
            return (None, None, None, *_LayerGradient.apply(*layer, grad_output, grad_c_n, *saved_tensors))
        return _second_order_backward(*layer, saved_tensors, grad_output, grad_c_n)


def _first_order_backward(mode, zoneout_p, needs, saved_tensors, grad_output, grad_c_n):
    """``_FusedLayer.backward``'s gradients by the BPTT kernel, and the weights' as GEMMs after it;
    ``needs`` is the layer's ``needs_input_grad``."""
    x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, h, c, h_raw, saved, *weights = saved_tensors
    w_ih, w_hh, b_ih, b_hh, w_hr = _by_kind(weights)
    needs_by_kind = _by_kind(needs[FIRST_WEIGHT:])
    num_steps, batch, directions, features = h.shape[0] - 2, h.shape[1], h.shape[2], h.shape[3]
    rows = num_steps * batch
    if mode == "LSTM" and grad_c_n is None:
        grad_c_n = c.new_zeros(directions, batch, c.shape[3], dtype=x.dtype)
    options = (lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout_p)
    dgates_x, dgates_h, grad_h_proj, dh0, dc0 = _recurrence_backward(
        mode, grad_output, grad_c_n, _stack(w_hh), _stack(w_hr), options, h, c, saved)

    grads = [None] * len(weights)
    gates = dgates_x.shape[3]
    dgates_rows = dgates_x.view(rows, -1)
    dgates_by_direction = _directions(dgates_rows, gates)
    grad_x = (dgates_rows @ _cat(w_ih)).view_as(x) if needs[FIRST_TENSOR] else None
    if any(needs_by_kind[W_IH]):
        x_rows = x.reshape(rows, -1)
        if lengths is not None:
            # The padding past a sequence's end may hold anything: its gate gradients are zero,
            # but 0 * NaN is not.
            x_rows = torch.where(reference.valid_steps(lengths, num_steps).view(rows, 1), x_rows, 0)
        grads[W_IH::WEIGHTS_PER_DIRECTION] = [part.t() @ x_rows for part in dgates_by_direction]
    if b_ih[0] is not None and (any(needs_by_kind[B_IH]) or any(needs_by_kind[B_HH])):
        grads[B_IH::WEIGHTS_PER_DIRECTION] = [_column_sums(part) for part in dgates_by_direction]
        grads[B_HH::WEIGHTS_PER_DIRECTION] = [_column_sums(part)
                                              for part in _directions(dgates_h.view(rows, -1), gates)]
    for direction in range(directions):
        first = direction * WEIGHTS_PER_DIRECTION
        if needs_by_kind[W_HH][direction]:
            states = _states_before(h, h0, resets, h_masks, direction).reshape(rows, features)
            grads[first + W_HH] = dgates_h[:, :, direction].reshape(rows, gates).t() @ states
        if w_hr[direction] is not None and needs_by_kind[W_HR][direction]:
            grads[first + W_HR] = (grad_h_proj[:, :, direction].reshape(rows, features).t()
                                   @ h_raw[:, :, direction].reshape(rows, -1))
    return (None, None, None, grad_x, dh0 if needs[FIRST_TENSOR + 1] else None,
            dc0 if mode == "LSTM" and needs[FIRST_TENSOR + 2] else None, None, None, None, None, None, *grads)


def _directions(rows, gates: int) -> list:
    """The columns of each direction in ``rows (R, D * gates)``, as strided views: a gradient
    computed from each is a tensor of its own. Split from one product over all directions, the
    directions' gradients would share a storage (autograd keeps such a tensor as ``.grad``), where
    torch.nn gives every parameter's gradient its own: freeing or saving one would touch the other."""
    return [rows[:, first:first + gates] for first in range(0, rows.shape[1], gates)]


def _column_sums(rows):
    return rows.sum(0, dtype=accumulator_dtype(rows.dtype)).to(rows.dtype)


def _second_order_backward(mode, zoneout_p, needs, saved_tensors, grad_output, grad_c_n):
    """The backward as a function that can be differentiated (a backward with
    ``create_graph=True``; under torch.func, ``jacrev``'s and the derivative of
    ``_LayerGradient``'s gradients): the layer recomputed by ``reference.layer`` in plain PyTorch
    and differentiated, so every derivative of any order is exact. A first-order backward never
    comes here."""
    x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, h, c, h_raw, saved, *weights = saved_tensors
    inputs = [x, h0, c0, None, None, None, None, None, *weights]
    wanted = [index for index, tensor in enumerate(inputs)
              if tensor is not None and needs[FIRST_TENSOR + index]]

    def recomputed(*differentiated):
        """``[output]``, and ``c_n`` for the LSTM, with ``differentiated`` for the wanted inputs."""
        given = list(inputs)
        for index, tensor in zip(wanted, differentiated):
            given[index] = tensor
        directions = [given[first:first + WEIGHTS_PER_DIRECTION]
                      for first in range(LAYER_TENSORS, len(given), WEIGHTS_PER_DIRECTION)]
        output, _, c_n = reference.layer(mode, *given[:3], directions, lengths, resets, h_masks, zoneout_h,
                                         zoneout_c, zoneout_p)
        return [output] if c_n is None else [output, c_n]

    primals = [inputs[index] for index in wanted]
    # Under torch.func the saved tensors are its wrappers, and torch.autograd.grad differentiates
    # them at the wrong level (a vjp's pullback run after its transform returned got zeros):
    # torch.func.vjp differentiates at its own. Elsewhere torch.autograd.grad, as torch.func
    # refuses saved-tensor hooks (save_on_cpu, a non-reentrant checkpoint).
    if _wrapped_by_torch_func((*saved_tensors, grad_output, grad_c_n)):
        results, pullback = torch.func.vjp(recomputed, *primals)
    else:
        results = recomputed(*primals)
        pullback = functools.partial(torch.autograd.grad, results, primals, create_graph=True, allow_unused=True)
    cotangents = [grad_output.reshape(results[0].shape)]
    if len(results) == 2:
        cotangents.append(torch.zeros_like(results[1]) if grad_c_n is None else grad_c_n)
    found = pullback(cotangents)
    grads = [None] * len(inputs)
    for index, grad in zip(wanted, found):
        grads[index] = grad
    return (None, None, None, *grads)


def _wrapped_by_torch_func(tensors) -> bool:
    return any(tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor) for tensor in tensors)


def _only_grad_transforms() -> bool:
    """Whether every torch.func transform active now (none, often) is ``grad`` / ``vjp``'s: the
    kernels' Functions have no batching rule (``vmap``) and no jvp (``jvp``, ``jacfwd``)."""
    return not torch._C._are_functorch_transforms_active() or all(
        interpreter.key() == TransformType.Grad for interpreter in torch._C._functorch.get_interpreter_stack())


def _torch_func_backward(*tensors) -> bool:
    """Whether a backward is torch.func's (``grad``, ``vjp``'s pullback: the layer ran under its
    transforms, so its tensors are their wrappers) and no ``vmap`` is active (``jacrev``'s), under
    which ``_LayerGradient`` has no rule."""
    return _wrapped_by_torch_func(tensors) and _only_grad_transforms()


def _kernels_take(tensors) -> bool:
    """Whether the kernels can run a call on these tensors (the input, states and weights) under
    the transforms active now: torch.func's ``grad`` and ``vjp`` at most, and no tangent of
    forward-mode AD (``torch.autograd.forward_ad``). Else the layers run in plain PyTorch
    (``reference.layer``), which vmap and forward-mode AD differentiate as any PyTorch code."""
    if not _only_grad_transforms():
        return False
    return forward_ad._current_level < 0 or all(
        tensor is None or forward_ad.unpack_dual(tensor).tangent is None for tensor in tensors)


class _LayerGradient(torch.autograd.Function):
    """``_FusedLayer``'s first-order gradients as a Function of the layer's tensors and the upstream
    gradients, for torch.func, which asks every backward for a graph of it. The BPTT kernel
    computes them (``_first_order_backward``). Only a derivative of them recomputes the layer in
    plain PyTorch: ``backward`` differentiates ``_second_order_backward``, the same gradients as a
    differentiable function. Few backwards get one (a nested ``grad``, a ``create_graph=True``
    backward inside the transform, torch.autograd outside it), but nothing at the time of this
    backward tells them from the rest."""

    @staticmethod
    def forward(mode, zoneout_p, needs, grad_output, grad_c_n, *saved_tensors):
        return _first_order_backward(mode, zoneout_p, needs, saved_tensors, grad_output, grad_c_n)[FIRST_TENSOR:]

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, zoneout_p, needs, grad_output, grad_c_n, *saved_tensors = inputs
        ctx.layer = (mode, zoneout_p, needs)
        ctx.set_materialize_grads(False)
        # Not the forward's buffers (h, c, h_raw, saved): the recomputation replaces them.
        ctx.save_for_backward(grad_output, grad_c_n, *saved_tensors[:LAYER_TENSORS],
                              *saved_tensors[LAYER_TENSORS + SAVED_BUFFERS:])

    @staticmethod
    def backward(ctx, *grad_grads):
        grad_output, grad_c_n, *kept = ctx.saved_tensors
        # The inputs from grad_output on (index i is input 3 + i), the buffers None.
        tensors = [grad_output, grad_c_n, *kept[:LAYER_TENSORS], *[None] * SAVED_BUFFERS, *kept[LAYER_TENSORS:]]
        # What carries a derivative: grad_output, grad_c_n, x, h0, c0 and the weights, not the options.
        differentiable = [*range(5), *range(2 + LAYER_TENSORS + SAVED_BUFFERS, len(tensors))]
        wanted = [index for index in differentiable if ctx.needs_input_grad[3 + index]]
        used = [index for index, grad in enumerate(grad_grads) if grad is not None]

        def gradients(*differentiated):
            given = list(tensors)
            for index, tensor in zip(wanted, differentiated):
                given[index] = tensor
            found = _second_order_backward(*ctx.layer, given[2:], given[0], given[1])[FIRST_TENSOR:]
            return [found[index] for index in used]

        _, pullback = torch.func.vjp(gradients, *[tensors[index] for index in wanted])
        grads = [None] * (3 + len(tensors))
        for index, grad in zip(wanted, pullback([grad_grads[index] for index in used])):
            grads[3 + index] = grad
        return tuple(grads)


class _FusedLayerUnderTransforms(_FusedLayer):
    """``_FusedLayer`` with its context set apart from the forward, as torch.func's transforms
    want it; its forward also returns what the backward reads (``_forward``), not differentiable:
    the LSTM's ``c``, ``h_raw`` and the saved activations."""

    forward = staticmethod(_FusedLayer._forward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Outputs here: what the backward reads is saved from them.
        ctx.mark_non_differentiable(*output[2:])
        _FusedLayer._setup_context(ctx, inputs, output)


def layer(mode, x, h0, c0, weights, lengths=None, resets=None, h_masks=None, zoneout_h=None, zoneout_c=None,
          zoneout_p=0.0):
    """One layer, every direction, on the Triton kernels; the contract of ``reference.layer``:
    returns ``(output (T, B, D*P), h_n (D, B, P), c_n (D, B, H) or None)``."""
    if not runs_triton(x):
        # Else Triton's own words on plain CPU: "0 active drivers ([]). There should only be one."
        raise RuntimeError(f"fused_rnn.functional.layer runs the Triton kernels: CUDA tensors, or CPU tensors "
                           f"under TRITON_INTERPRET=1; got x on {x.device} (reference.layer runs anywhere)")
    flat = [tensor for direction in weights for tensor in direction]
    save = torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in (x, h0, c0, *flat))
    arguments = (mode, save, float(zoneout_p), x, h0, c0, lengths, resets, h_masks, zoneout_h, zoneout_c, *flat)
    if torch._C._are_functorch_transforms_active():
        states, c_n, *_ = _FusedLayerUnderTransforms.apply(*arguments)
    elif save or torch.jit.is_tracing() or forward_ad._current_level >= 0:
        # (A trace records the Function, whose backward then refuses clearly; so does forward-mode
        # AD, where without it the dual inputs' tangents would be dropped without a word.)
        states, c_n = _FusedLayer.apply(*arguments)
    else:
        # Nothing to differentiate: the Function's bookkeeping, a tenth of a one-layer call's
        # host time or more (``python -m bench.host``), would buy nothing.
        states, c_n, *_ = _FusedLayer._forward(*arguments)
    output = states[1:-1].view(x.shape[0], x.shape[1], -1)
    # From the states, not from output: as torch.nn's, h_n's gradient must not flow through output
    # (a hook on output saw it, and what the hook changed changed it).
    return output, torch.stack(_final_states(states, x.shape[0])), c_n


def _direction_weights(weights, has_biases: bool):
    """``(W_ih, W_hh, b_ih, b_hh, W_hr)`` from one direction's ``_flat_weights`` slice."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    w_hr = weights[-1] if len(weights) == (5 if has_biases else 3) else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _check_devices(name: str, tensors, input: torch.Tensor) -> None:
    device = input.device
    for tensor in tensors:
        if tensor.device != device:
            raise RuntimeError(
                f"Input and {name} tensors are not at the same device, found input tensor at "
                f"{device} and {name} tensor at {tensor.device}"
            )


def check_dtypes(name: str, tensors, input: torch.Tensor) -> None:
    dtype = input.dtype
    for tensor in tensors:
        if tensor.dtype != dtype:
            raise RuntimeError(f"{name} dtype ({tensor.dtype}) does not match input dtype ({dtype})")


def _check_lengths(lengths, num_steps: int, batch: int) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
        if lengths.numel() == 0:  # as_tensor([]) is float
            lengths = lengths.long()
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
    hidden = params[1].shape[0] // num_gates
    if hidden == 0:
        raise RuntimeError(f"{cell}: weight 1 (W_hh) has shape {list(params[1].shape)}: hidden_size must be positive")
    # W_hh's columns are the features of h: hidden_size, or proj_size with a projection.
    features = params[1].shape[1] if has_proj else hidden
    # Traced by torch.compile, the cache is skipped (Dynamo warns that it ignores it): call past it.
    shapes = _weight_shapes.__wrapped__ if torch.compiler.is_compiling() else _weight_shapes
    expected = shapes(num_gates, hidden, features, has_biases, has_proj, num_layers, num_directions, input_size)
    if [weight.shape for weight in params] != expected:
        index, weight, shape = next((index, weight, shape) for index, (weight, shape) in enumerate(zip(params, expected))
                                    if weight.shape != shape)
        group = index // per_group
        raise RuntimeError(
            f"{cell}: weight {index} (layer {group // num_directions}, direction {group % num_directions}) "
            f"has shape {list(weight.shape)}, expected {list(shape)}"
        )
    return hidden, features


@functools.lru_cache
def _weight_shapes(num_gates, hidden, features, has_biases, has_proj, num_layers, num_directions, input_size):
    """The shape of every weight in ``_flat_weights`` order (cached: this runs on every call)."""
    shapes = []
    for group in range(num_layers * num_directions):
        layer_input = input_size if group < num_directions else num_directions * features
        shapes += [(num_gates * hidden, layer_input), (num_gates * hidden, features)]
        if has_biases:
            shapes += [(num_gates * hidden,)] * 2
        if has_proj:
            shapes.append((features, hidden))
    return shapes


def check_reset(reset, batch_first: bool, num_steps: int, batch: int, input: torch.Tensor) -> torch.Tensor:
    """``reset`` as a ``(T, B)`` bool tensor on the input's device."""
    if not isinstance(reset, torch.Tensor):
        raise TypeError(f"reset must be a bool tensor, got {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise ValueError(f"reset must be a bool tensor, got {reset.dtype}")
    expected = (batch, num_steps) if batch_first else (num_steps, batch)
    if tuple(reset.shape) != expected:
        layout = "(B, T) with batch_first" if batch_first else "(T, B)"
        raise ValueError(f"reset must have the input's batch and time dims {layout} = {list(expected)}, "
                         f"got {list(reset.shape)}")
    _check_devices("reset", [reset], input)
    return (reset.t() if batch_first else reset).contiguous()


def check_probability(name: str, p, one_allowed: bool = False) -> float:
    # Real: numpy's floats too (np.float32 is no float), which torch.nn takes.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 <= p <= 1 if one_allowed else 0 <= p < 1):
        raise ValueError(f"{name} must be a number in [0, 1{']' if one_allowed else ')'}, got {p!r}")
    return float(p)


def _check_arguments(mode, params, num_layers, dropout, bidirectional) -> None:
    """What nn.LSTM's constructor checks of its arguments, and that the weights are tensors (the
    states: ``check_states``)."""
    # Integral: numpy's integers too, which torch.nn takes (a hyperparameter drawn by numpy).
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"{mode}: num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"{mode}: bidirectional must be a bool, got {bidirectional!r}")
    check_probability("dropout", dropout, one_allowed=True)
    for index, tensor in enumerate(params):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{mode}: params[{index}] must be a tensor, got {type(tensor).__name__}")


def _run(mode, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
         reset=None, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0):
    """Shared multi-layer, bidirectional driver; ``hx`` is a tuple of ``(L * D, B, .)`` states or None."""
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        got = f"{input.dim()}-D tensor" if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"{mode}: expected a 3-D input tensor, got {got}")
    if not input.is_floating_point():
        raise ValueError(f"{mode}: input must be a floating point tensor, got {input.dtype}")
    x = input.transpose(0, 1) if batch_first else input
    num_steps, batch = x.shape[0], x.shape[1]
    if num_steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    _check_arguments(mode, params, num_layers, dropout, bidirectional)
    _check_devices("parameter", params, x)
    _check_devices("hidden", hx or (), x)
    # _is_any_autocast_enabled first: the public per-device queries cost microseconds per call.
    if (torch._C._is_any_autocast_enabled() and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        # As nn.LSTM / nn.GRU under autocast: input, weights and states all run in one lower
        # precision - on CUDA always float16, whatever the autocast dtype, because PyTorch's cuDNN
        # RNN autocast wrapper hardcodes it (aten/src/ATen/cudnn/AutocastRNN.cpp). The casts are
        # differentiable, so gradients reach the parameters in their own dtype.
        dtype = torch.float16 if x.is_cuda else torch.get_autocast_dtype(x.device.type)
        x, params = x.to(dtype), [param.to(dtype) for param in params]
        hx = None if hx is None else tuple(state.to(dtype) for state in hx)
    num_directions = 2 if bidirectional else 1
    groups = num_layers * num_directions
    check_dtypes("parameter", params, x)
    hidden, features = _check_weights(mode, params, NUM_GATES[mode], has_biases, num_layers, num_directions, x.shape[2])
    state_shapes = [(groups, batch, features), (groups, batch, hidden)][: 2 if mode == "LSTM" else 1]
    if hx is None:
        hx = tuple(torch.zeros(shape, dtype=x.dtype, device=x.device) for shape in state_shapes)
    else:
        check_dtypes("hidden", hx, x)
        for state, shape in zip(hx, state_shapes):
            if tuple(state.shape) != shape:
                raise RuntimeError(f"Expected hidden size {shape}, got {list(state.shape)}")
    if lengths is not None:
        lengths = _check_lengths(lengths, num_steps, batch).to(device=x.device, dtype=torch.int64)
    resets = None if reset is None else check_reset(reset, batch_first, num_steps, batch, x)
    if (recurrent_dropout, weight_drop, zoneout) != (0, 0, 0):  # all off (the default) needs no check
        recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        weight_drop = check_probability("weight_drop", weight_drop)
        zoneout = check_probability("zoneout", zoneout)
    if not train:
        # Recurrent dropout and weight drop act in training only; zoneout uses its expectation in eval.
        recurrent_dropout = weight_drop = 0.0
    if weight_drop > 0:
        # DropConnect on W_hh (Merity et al.): a fresh mask each call, through autograd.
        per_group = len(params) // groups
        params = [F.dropout(param, weight_drop) if index % per_group == 1 else param
                  for index, param in enumerate(params)]

    # What PyTorch's RNN operator lacks (ONNX's too): the layers that run without it cannot serve.
    beyond_torch = resets is not None or recurrent_dropout > 0 or zoneout > 0
    if onnx.exporting():
        if beyond_torch:
            raise RuntimeError(f"{mode}: reset=, recurrent_dropout and zoneout have no ONNX operator: export "
                               "without them")
        layers = onnx.layers
    elif native.handles(x) and not beyond_torch:
        # PyTorch's own RNN operator on plain CPU tensors: nn.LSTM's speed.
        layers = native.layers
    else:
        if beyond_torch and native.handles(x) and torch.compiler.is_exporting():
            raise RuntimeError(
                f"{mode}: reset=, recurrent_dropout and zoneout run the reference recurrence on plain CPU "
                "tensors, whose time loop an export would unroll at the example's length; export the "
                "model on CUDA, or without them")
        layers = _layers
    options = dict(resets=resets, recurrent_dropout=recurrent_dropout, zoneout=zoneout) if beyond_torch else {}
    output, finals = layers(mode, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths,
                            **options)
    if lengths is not None:
        valid = reference.valid_steps(lengths, num_steps)
        output = torch.where(valid[:, :, None], output, torch.zeros((), dtype=output.dtype, device=output.device))
    return output.transpose(0, 1) if batch_first else output, finals


def _layers(mode, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths,
            resets=None, recurrent_dropout=0.0, zoneout=0.0):
    """The layers over time-major ``x (T, B, I)``: ``output (T, B, D * P)`` and the tuple of final
    states ``(L * D, B, .)``. Each layer runs the Triton kernels (``layer``) where they take the
    tensors and transforms (``_kernels_take``), else ``reference.layer``."""
    run = layer if runs_triton(x) and x.shape[1] > 0 and _kernels_take((x, *hx, *params)) else reference.layer

    def run_layer(x, weights, states):
        h0, c0 = states if mode == "LSTM" else (states[0], None)
        num_directions = len(weights)
        h_masks = zoneout_h = zoneout_c = None
        if recurrent_dropout > 0:
            # Variational dropout (Gal & Ghahramani): one mask per sequence, the same at every step.
            keep = torch.full((x.shape[1], num_directions, h0.shape[2]), 1 - recurrent_dropout, dtype=x.dtype,
                              device=x.device)
            h_masks = torch.bernoulli(keep) / (1 - recurrent_dropout)
        if zoneout > 0 and train:
            # Zoneout's keep masks: a fresh draw per step, sequence and unit.
            zoneout_h = torch.rand(x.shape[0], x.shape[1], num_directions, h0.shape[2], device=x.device) < zoneout
            if c0 is not None:
                zoneout_c = torch.rand(x.shape[0], x.shape[1], num_directions, c0.shape[2], device=x.device) < zoneout
        output, h_n, c_n = run(mode, x, h0, c0, [_direction_weights(group, has_biases) for group in weights],
                               lengths, resets, h_masks, zoneout_h, zoneout_c, zoneout)
        return output, (h_n,) if c_n is None else (h_n, c_n)

    return reference.stack_layers(run_layer, x, hx, params, num_layers, bidirectional, dropout, train)


def check_states(name: str, hx, pair: bool) -> tuple:
    """``hx`` as a tuple of tensors: ``(h_0, c_0)`` for the LSTM (``pair``), else ``(h_0,)``. On
    another kind of ``hx`` torch.nn fails by accident (an IndexError, an AttributeError on
    ``None.dim()``) or, with several layers, not at all: this names what came instead."""
    if not pair:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"{name}: hx must be a tensor h_0, got {type(hx).__name__}")
        return (hx,)
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        got = f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
        raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {got}")
    for index, state in enumerate(hx):
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name}: hx[{index}] must be a tensor, got {type(state).__name__}")
    return tuple(hx)


def lstm(
    input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
    bidirectional=False, batch_first=False, lengths=None, reset=None, recurrent_dropout=0.0, zoneout=0.0,
    weight_drop=0.0,
):
    """Multi-layer LSTM with the math and weight layout of ``torch.nn.LSTM``.

    ``params`` lists, per layer and direction (forward, then reverse), ``W_ih, W_hh[, b_ih, b_hh]
    [, W_hr]`` exactly as ``nn.LSTM._flat_weights``. ``hx`` is ``(h_0, c_0)`` or ``None``.
    ``lengths`` (B,) makes each sequence end at its own length: outputs past it are zero and the
    final states are taken at each sequence's end (same as packing, without a PackedSequence).
    ``reset`` (a bool ``(T, B)`` tensor, ``(B, T)`` with ``batch_first``) sets the state back to
    the initial state before each step where it is True. In training, ``recurrent_dropout``
    drops ``h_{t-1}`` where it enters ``W_hh`` with one mask per sequence and layer,
    ``weight_drop`` drops entries of ``W_hh`` with a fresh mask per call, and ``zoneout`` keeps
    each unit of ``h`` and ``c`` at its previous value with that probability (in eval mode it
    mixes in the expectation).
    Returns ``output, (h_n, c_n)``.
    """
    hx = None if hx is None else check_states("LSTM", hx, pair=True)
    output, (h_n, c_n) = _run(
        "LSTM", input, hx, params, has_biases, num_layers, dropout,
        train, bidirectional, batch_first, lengths, reset, recurrent_dropout, zoneout, weight_drop,
    )
    return output, (h_n, c_n)


def gru(
    input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
    bidirectional=False, batch_first=False, lengths=None, reset=None, recurrent_dropout=0.0, zoneout=0.0,
    weight_drop=0.0,
):
    """Multi-layer GRU with the math and weight layout of ``torch.nn.GRU``.

    ``params`` lists, per layer and direction, ``W_ih, W_hh[, b_ih, b_hh]`` exactly as
    ``nn.GRU._flat_weights``; ``hx`` is ``h_0`` or ``None``; the options as in ``lstm``.
    Returns ``output, h_n``.
    """
    hx = None if hx is None else check_states("GRU", hx, pair=False)
    output, (h_n,) = _run(
        "GRU", input, hx, params, has_biases, num_layers, dropout,
        train, bidirectional, batch_first, lengths, reset, recurrent_dropout, zoneout, weight_drop,
    )
    return output, h_n


def rnn(
    input, hx, params, nonlinearity="tanh", has_biases=True, num_layers=1, dropout=0.0, train=False,
    bidirectional=False, batch_first=False, lengths=None, reset=None, recurrent_dropout=0.0, zoneout=0.0,
    weight_drop=0.0,
):
    """Multi-layer Elman RNN with the math and weight layout of ``torch.nn.RNN``
    (``nonlinearity`` ``"tanh"`` or ``"relu"``); arguments as in ``gru``. Returns ``output, h_n``."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    hx = None if hx is None else check_states("RNN", hx, pair=False)
    output, (h_n,) = _run(
        f"RNN_{nonlinearity.upper()}", input, hx, params, has_biases, num_layers,
        dropout, train, bidirectional, batch_first, lengths, reset, recurrent_dropout, zoneout, weight_drop,
    )
    return output, h_n
