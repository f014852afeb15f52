"""The recurrences in plain PyTorch: the CPU path and the oracle the kernel tests trust.

Same signatures and results as the Triton-backed autograd Functions in ``functional.py``:
``gates_x (T, B, G*H)`` is the precomputed input projection, time-major. Past a sequence's
end (``t >= lengths[b]``) the state passes through unchanged; PyTorch autograd supplies the
backward.
"""

import torch


def _active(lengths, t: int, like: torch.Tensor):
    """(B, 1) mask of the rows still inside their sequence at timestep t, or None."""
    if lengths is None:
        return None
    return (t < lengths).to(like.device).unsqueeze(1)


def _time_order(num_steps: int, reverse: bool):
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths=None, reverse=False):
    """LSTM over ``gates_x (T, B, 4H)`` (both biases included). Returns ``(h_seq (T, B, P), c_n)``."""
    h, c = h0, c0
    outputs = [None] * gates_x.shape[0]
    for t in _time_order(gates_x.shape[0], reverse):
        i, f, g, o = (gates_x[t] + h @ w_hh.t()).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        active = _active(lengths, t, h)
        if active is not None:
            c_new = torch.where(active, c_new, c)
            h_new = torch.where(active, h_new, h)
        h, c = h_new, c_new
        outputs[t] = h
    return torch.stack(outputs), c


def gru_recurrence(gates_x, w_hh, b_hh, h0, lengths=None, reverse=False):
    """GRU over ``gates_x (T, B, 3H)`` (input bias included). Returns ``h_seq (T, B, H)``."""
    h = h0
    outputs = [None] * gates_x.shape[0]
    for t in _time_order(gates_x.shape[0], reverse):
        hidden = h @ w_hh.t()
        if b_hh is not None:
            hidden = hidden + b_hh
        x_r, x_z, x_n = gates_x[t].chunk(3, dim=1)
        h_r, h_z, h_n = hidden.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h_new = (1 - z) * n + z * h
        active = _active(lengths, t, h)
        if active is not None:
            h_new = torch.where(active, h_new, h)
        h = h_new
        outputs[t] = h
    return torch.stack(outputs)
