"""ONNX export: the layers as ONNX ``LSTM`` / ``GRU`` / ``RNN`` operators instead of Triton kernels.

While ``torch.onnx.export(..., dynamo=True)`` traces a model, ``functional._run`` hands the
layer stack to ``layers`` here. Each layer, both directions at once, becomes one standard ONNX
recurrent operator, emitted with ``torch.onnx.ops.symbolic_multi_out``: the exporter writes it
into the graph as it is, and no Triton kernel runs. Time and batch stay symbolic, so the
exported graph takes any sequence length and batch size; ``lengths`` becomes the operator's
``sequence_lens``.

PyTorch and ONNX order the gates differently (LSTM ``i, f, g, o`` against ``i, o, f, c``; GRU
``r, z, n`` against ``z, r, h``): the weights are reordered with torch ops on the parameters,
which the exporter folds into constants. PyTorch's GRU applies the reset gate after the
recurrent matmul, which is ONNX's ``linear_before_reset=1``.

ONNX's LSTM has no projection. An LSTM with ``proj_size > 0`` is exported as its plain-PyTorch
step inside a ``torch._higher_order_ops.scan``, which the exporter writes as an ONNX ``Scan``
over the (still dynamic) time axis.
"""

import torch
import torch.nn.functional as F

from . import reference

__all__ = ["exporting", "layers"]

# Per cell: the ONNX operator, and PyTorch's gate blocks listed in ONNX's gate order.
_ONNX_OPERATOR = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
_GATES_IN_ONNX_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}
_RNN_ACTIVATION = {"RNN_TANH": "Tanh", "RNN_RELU": "Relu"}


def exporting() -> bool:
    """True while ``torch.onnx.export`` traces the model (either exporter; ``layers`` refuses the
    TorchScript one)."""
    # Both exporters trace; the cheap tracing queries spare eager calls the exporter's own query.
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return tracing and _in_onnx_export()


@torch.compiler.assume_constant_result
def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, asked for real under dynamo too: dynamo answers that
    query False by itself, and the exporter's second try, ``torch.export(strict=True)``, traces
    with dynamo (a model that the first, non-strict, try refused would then be traced down to
    the kernels' operators, which have no ONNX translation)."""
    return torch.onnx.is_in_onnx_export()


def _onnx_gate_order(cell: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (gate blocks stacked along dim 0, PyTorch's order) with its blocks in ONNX's order."""
    order = _GATES_IN_ONNX_ORDER[cell]
    size = tensor.shape[0] // len(order)
    # Slices rather than chunk(): the exporter folds single-output Slice nodes into constants,
    # not chunk()'s multi-output Split.
    return torch.cat([tensor[gate * size:(gate + 1) * size] for gate in order])


def _onnx_layer(cell, x, weights, has_biases, state, lengths):
    """One layer, all its directions, as one ONNX recurrent operator.

    ``weights`` holds per direction ``(W_ih, W_hh[, b_ih, b_hh])``; ``state`` the layer's initial
    states, each ``(D, B, H)``. Returns ``output (T, B, D * H)`` and the final states ``(D, B, H)``.
    """
    num_steps, batch, num_directions = x.shape[0], x.shape[1], len(weights)
    hidden = weights[0][1].shape[1]  # from W_hh (G*H, H): a plain int, never symbolic
    w = torch.stack([_onnx_gate_order(cell, group[0]) for group in weights])  # (D, G*H, I)
    r = torch.stack([_onnx_gate_order(cell, group[1]) for group in weights])  # (D, G*H, H)
    b = None
    if has_biases:  # (D, 2*G*H): ONNX's Wb then Rb
        b = torch.stack([
            torch.cat([_onnx_gate_order(cell, group[2]), _onnx_gate_order(cell, group[3])]) for group in weights
        ])
    sequence_lens = None if lengths is None else lengths.to(torch.int32)  # ONNX wants int32
    attributes = {"hidden_size": hidden, "direction": "bidirectional" if num_directions == 2 else "forward"}
    if cell == "GRU":
        attributes["linear_before_reset"] = 1
    if cell in _RNN_ACTIVATION:
        attributes["activations"] = [_RNN_ACTIVATION[cell]] * num_directions
    state_shape = (num_directions, batch, hidden)
    y, *finals = torch.onnx.ops.symbolic_multi_out(
        _ONNX_OPERATOR[cell],
        [x, w, r, b, sequence_lens, *state],
        attributes,
        dtypes=[x.dtype] * (1 + len(state)),
        shapes=[(num_steps, num_directions, batch, hidden)] + [state_shape] * len(state),
    )
    # Y is (T, D, B, H); the next layer and the caller take (T, B, D * H).
    return y.transpose(1, 2).flatten(2), finals


def _projected_lstm_direction(x, weights, has_biases, h0, c0, lengths, reverse):
    """One direction of an LSTM layer with projection, as a scan over time (an ONNX ``Scan``).

    ``weights`` is ``(W_ih, W_hh[, b_ih, b_hh], W_hr)``; ``h0 (B, P)``, ``c0 (B, H)``. Past a
    sequence's end the state passes through unchanged, as in ``reference.lstm_recurrence``.
    Returns ``h_seq (T, B, P)``, ``h_n (B, P)``, ``c_n (B, H)``.
    """
    # Imported here: a private module, which fused_rnn should not need just to be imported.
    from torch._higher_order_ops import scan

    w_ih, w_hh, w_hr = weights[0], weights[1], weights[-1]
    gates_x = F.linear(x, w_ih, weights[2] + weights[3] if has_biases else None)  # (T, B, 4H)
    steps = (gates_x,)
    if lengths is not None:  # active: (T, B, 1), whether step t lies inside sequence b
        steps += (reference.valid_steps(lengths, x.shape[0])[:, :, None],)

    def step(carry, inputs):
        h, c = carry
        i, f, g, o = (inputs[0] + h @ w_hh.t()).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = (torch.sigmoid(o) * torch.tanh(c_new)) @ w_hr.t()
        if lengths is not None:
            h_new, c_new = torch.where(inputs[1], h_new, h), torch.where(inputs[1], c_new, c)
        return (h_new, c_new), h_new.clone()  # scan's outputs may not alias its carry

    (h_n, c_n), h_seq = scan(step, (h0, c0), steps, reverse=reverse)
    return h_seq, h_n, c_n


def _projected_lstm_layer(x, weights, has_biases, state, lengths):
    """``_onnx_layer``'s contract for an LSTM layer with projection, one scan per direction."""
    h_seqs, h_n, c_n = zip(*[
        _projected_lstm_direction(x, group, has_biases, state[0][d], state[1][d], lengths, reverse=d == 1)
        for d, group in enumerate(weights)
    ])
    return torch.cat(h_seqs, dim=2), (torch.stack(h_n), torch.stack(c_n))


def layers(cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, lengths):
    """The layer stack for ONNX export, in place of the kernels' (same contract), called by
    ``functional._run`` while ``exporting()``.

    ``cell`` is ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``; ``x (T, B, I)`` is
    time-major and checked; ``hx`` a tuple of ``(L * D, B, .)`` states (never None); ``params``
    in ``nn.LSTM._flat_weights`` order; ``lengths`` int64 ``(B,)`` or None. Returns
    ``output (T, B, D * P)`` and the tuple of final states ``(L * D, B, .)``.
    """
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"fused_rnn: {cell} exports to ONNX with torch.onnx.export(..., dynamo=True) only; "
            "the TorchScript exporter (dynamo=False) is not supported"
        )
    if not hasattr(torch.onnx, "ops"):
        raise RuntimeError(
            f"fused_rnn: ONNX export of {cell} needs torch.onnx.ops (torch >= 2.8), got torch {torch.__version__}"
        )
    if not exporting():
        # Eagerly, torch.onnx.ops' operators return zeros of their shapes: never an answer.
        raise RuntimeError(
            f"fused_rnn.onnx.layers builds the ONNX operators of {cell} for torch.onnx.export and runs only "
            "inside it; call the module or fused_rnn.functional outside an export"
        )

    def run_layer(x, weights, state):
        if len(weights[0]) == (5 if has_biases else 3):  # with W_hr: the LSTM's projection
            return _projected_lstm_layer(x, weights, has_biases, state, lengths)
        return _onnx_layer(cell, x, weights, has_biases, state, lengths)

    return reference.stack_layers(run_layer, x, hx, params, num_layers, bidirectional, dropout, train)
