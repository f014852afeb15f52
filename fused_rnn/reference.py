"""The recurrences in plain PyTorch: the oracle the kernel tests trust, and the path for what the
kernels do not take (empty batches, options on plain CPU tensors, second derivatives).

``gates_x (T, B, G*H)`` is the precomputed input projection of one direction, time-major. Options,
with the same meaning in the kernels:

- ``lengths (B,)``: past a sequence's end (``t >= lengths[b]``) the state passes through unchanged.
- ``resets (T, B)`` bool: the state goes back to the initial state before the steps where a new
  segment starts - ``resets[t]`` walking forwards; walking backwards (``reverse``) the step
  before the next one's start, ``resets[t + 1]``. Same as running each segment on its own.
- ``h_mask (B, P)``: recurrent dropout, multiplying ``h_{t-1}`` where it enters ``W_hh``.
- ``zoneout_h`` / ``zoneout_c``: zoneout of ``h`` / the LSTM's ``c``, after the cell computed the
  new value (``h`` takes ``tanh`` of the new ``c``): a bool keep mask ``(T, B, F)`` (training:
  keep the previous value where True) or a rate ``p`` (eval: ``p * prev + (1 - p) * new``).
"""

import torch
import torch.nn.functional as F


def valid_steps(lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``(T, B)`` bool: whether timestep ``t`` lies within sequence ``b``'s length."""
    return torch.arange(num_steps, device=lengths.device)[:, None] < lengths[None, :]


def _time_order(num_steps: int, reverse: bool):
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def _step_masks(t, num_steps, lengths, resets, reverse, like):
    """``(active, reset)``, each a (B, 1) bool mask or None, for the step at timestep t."""
    active = None if lengths is None else (t < lengths).to(like.device).unsqueeze(1)
    reset = None
    if resets is not None:
        step = t + 1 if reverse else t
        reset = resets[step].unsqueeze(1) if step < num_steps else torch.zeros_like(resets[0]).unsqueeze(1)
        if active is not None:
            reset = reset & active
    return active, reset


def _start(state, initial, reset):
    return state if reset is None else torch.where(reset, initial, state)


def _recurrent_input(h, h_mask):
    return h if h_mask is None else h * h_mask


def _zoneout(new, prev, zoneout, t):
    if zoneout is None:
        return new
    if isinstance(zoneout, torch.Tensor):
        return torch.where(zoneout[t], prev, new)
    return zoneout * prev + (1 - zoneout) * new


def lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths=None, reverse=False, resets=None, h_mask=None,
                    zoneout_h=None, zoneout_c=None):
    """LSTM over ``gates_x (T, B, 4H)`` (both biases included). Returns ``(h_seq (T, B, P), c_n)``."""
    h, c = h0, c0
    outputs = [None] * gates_x.shape[0]
    for t in _time_order(gates_x.shape[0], reverse):
        active, reset = _step_masks(t, gates_x.shape[0], lengths, resets, reverse, h)
        h_prev, c_prev = _start(h, h0, reset), _start(c, c0, reset)
        i, f, g, o = (gates_x[t] + _recurrent_input(h_prev, h_mask) @ w_hh.t()).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        c_new = _zoneout(c_new, c_prev, zoneout_c, t)
        h_new = _zoneout(h_new, h_prev, zoneout_h, t)
        if active is not None:
            c_new = torch.where(active, c_new, c)
            h_new = torch.where(active, h_new, h)
        h, c = h_new, c_new
        outputs[t] = h
    return torch.stack(outputs), c


def gru_recurrence(gates_x, w_hh, b_hh, h0, lengths=None, reverse=False, resets=None, h_mask=None, zoneout_h=None):
    """GRU over ``gates_x (T, B, 3H)`` (input bias included). Returns ``h_seq (T, B, H)``."""
    h = h0
    outputs = [None] * gates_x.shape[0]
    for t in _time_order(gates_x.shape[0], reverse):
        active, reset = _step_masks(t, gates_x.shape[0], lengths, resets, reverse, h)
        h_prev = _start(h, h0, reset)
        hidden = F.linear(_recurrent_input(h_prev, h_mask), w_hh, b_hh)
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=1)
        h_r, h_z, h_n = hidden.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h_new = _zoneout((1 - z) * n + z * h_prev, h_prev, zoneout_h, t)
        if active is not None:
            h_new = torch.where(active, h_new, h)
        h = h_new
        outputs[t] = h
    return torch.stack(outputs)


def rnn_recurrence(gates_x, w_hh, h0, nonlinearity="tanh", lengths=None, reverse=False, resets=None, h_mask=None,
                   zoneout_h=None):
    """Elman RNN over ``gates_x (T, B, H)`` (both biases included). Returns ``h_seq (T, B, H)``."""
    activation = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    outputs = [None] * gates_x.shape[0]
    for t in _time_order(gates_x.shape[0], reverse):
        active, reset = _step_masks(t, gates_x.shape[0], lengths, resets, reverse, h)
        h_prev = _start(h, h0, reset)
        h_new = _zoneout(activation(gates_x[t] + _recurrent_input(h_prev, h_mask) @ w_hh.t()), h_prev, zoneout_h, t)
        if active is not None:
            h_new = torch.where(active, h_new, h)
        h = h_new
        outputs[t] = h
    return torch.stack(outputs)


def stack_layers(run_layer, x, hx, params, num_layers: int, bidirectional: bool, dropout: float, train: bool):
    """The stack of layers that ``functional._layers`` (the kernels or ``layer``) and
    ``onnx.layers`` run: each layer takes its directions' slices of ``params``
    (``nn.LSTM._flat_weights`` order) and of the states ``hx`` (a tuple of ``(L * D, B, .)``), and
    dropout comes between layers in training.

    ``run_layer(x, weights, states)`` runs one layer over time-major ``x``, with ``weights``
    a list of each direction's flat weights and ``states`` the tuple of ``(D, B, .)`` slices; it
    returns the layer's output and the tuple of its final states. Returns the last layer's
    output and the tuple of final states ``(L * D, B, .)``.
    """
    num_directions = 2 if bidirectional else 1
    per_group = len(params) // (num_layers * num_directions)
    finals = [[] for _ in hx]
    for index in range(num_layers):
        groups = range(index * num_directions, (index + 1) * num_directions)
        weights = [params[group * per_group:(group + 1) * per_group] for group in groups]
        x, last = run_layer(x, weights, tuple(state[groups.start:groups.stop] for state in hx))
        for collected, state in zip(finals, last):
            collected.append(state)
        if dropout > 0 and train and index < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return x, tuple(collected[0] if len(collected) == 1 else torch.cat(collected) for collected in finals)


def layer(mode, x, h0, c0, weights, lengths=None, resets=None, h_masks=None, zoneout_h=None, zoneout_c=None,
          zoneout_p=0.0):
    """One layer, every direction, over time-major ``x (T, B, I)``: the contract of the fused layer.

    ``mode`` is ``"LSTM"``, ``"GRU"``, ``"RNN_TANH"`` or ``"RNN_RELU"``; ``weights`` lists per
    direction ``(W_ih, W_hh, b_ih, b_hh, W_hr)`` with None for what is absent; ``h0 (D, B, P)``,
    ``c0 (D, B, H)`` [LSTM]; ``h_masks (B, D, P)``; the zoneout keep masks ``zoneout_h
    (T, B, D, P)``, ``zoneout_c (T, B, D, H)`` in training, else the rate ``zoneout_p`` alone.
    Returns ``(output (T, B, D*P), h_n (D, B, P), c_n (D, B, H) or None)``.
    """
    def zoneout(masks, direction):
        if masks is not None:
            return masks[:, :, direction]
        return zoneout_p if zoneout_p > 0 else None

    if lengths is not None:
        # The padding past a sequence's end may hold anything, NaN included: where() passes no
        # gradient to the step it discards, but 0 * NaN through that step's math is NaN.
        x = torch.where(valid_steps(lengths, x.shape[0])[:, :, None], x, 0)
    outputs, h_n, c_n = [], [], []
    for direction, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(weights):
        reverse = direction == 1
        options = dict(lengths=lengths, reverse=reverse, resets=resets,
                       h_mask=None if h_masks is None else h_masks[:, direction],
                       zoneout_h=zoneout(zoneout_h, direction))
        if mode == "GRU":
            out = gru_recurrence(F.linear(x, w_ih, b_ih), w_hh, b_hh, h0[direction], **options)
        else:
            bias = None if b_ih is None else b_ih + b_hh
            gates_x = F.linear(x, w_ih, bias)
            if mode == "LSTM":
                out, c_last = lstm_recurrence(gates_x, w_hh, w_hr, h0[direction], c0[direction],
                                              zoneout_c=zoneout(zoneout_c, direction), **options)
                c_n.append(c_last)
            else:
                out = rnn_recurrence(gates_x, w_hh, h0[direction], mode.removeprefix("RNN_").lower(), **options)
        outputs.append(out)
        h_n.append(out[0] if reverse else out[-1])
    return torch.cat(outputs, dim=2), torch.stack(h_n), torch.stack(c_n) if c_n else None
