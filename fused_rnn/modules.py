"""``LSTM``, ``GRU`` and ``RNN`` modules: drop-in replacements for ``torch.nn.LSTM`` / ``GRU`` / ``RNN``.

Constructor, parameters (names, shapes, order, initialisation), ``state_dict``, argument checks
and return values are PyTorch's own: the modules build on ``torch.nn.RNNBase`` and borrow
``nn.LSTM``'s hidden-state checks. Only ``forward`` differs: it runs ``fused_rnn.functional``,
except in an eager call on plain CPU tensors without the options below (``recurrent_dropout`` and
``weight_drop`` count in training only), which is torch.nn's own ``forward`` (``_torch_serves``):
that is where ``fused_rnn.native`` would end anyway, at torch.nn's cost per call. The modules
deliberately do not subclass ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, which ``torch.compile``
refuses to trace.

What ``torch.nn`` lacks, all off by default so that a module stays a drop-in: ``forward``'s
``lengths=`` (packing without a PackedSequence) and ``reset=`` (state resets inside a sequence),
and the constructor's ``recurrent_dropout``, ``zoneout`` and ``weight_drop`` regularizers.
"""

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional, native

__all__ = ["LSTM", "GRU", "RNN", "convert"]

# The regularizers a fused module takes beyond nn.RNNBase's arguments, all off by default.
REGULARIZERS = ("recurrent_dropout", "zoneout", "weight_drop")


def _pack_like(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``output (T, B, F)`` (caller's batch order) with the exact layout of ``like``."""
    if like.sorted_indices is not None:
        output = output.index_select(1, like.sorted_indices)
        lengths = lengths[like.sorted_indices.cpu()]
    data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class _FusedRNNBase(nn.modules.rnn.RNNBase):
    def __init__(self, mode, *args, recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0, **kwargs):
        super().__init__(mode, *args, **kwargs)
        for name, value in zip(REGULARIZERS, (recurrent_dropout, zoneout, weight_drop)):
            setattr(self, name, functional.check_probability(name, value))

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)}" for name in REGULARIZERS if getattr(self, name))
        return super().extra_repr() + extra

    def flatten_parameters(self) -> None:
        """Kept for compatibility with ``nn.LSTM``; the fused kernels need no flat weight buffer."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given or finds inside one, before it
        # compiles anything: without it the error would be TorchScript's assertion about overloads.
        raise RuntimeError(
            f"fused_rnn.{type(self).__name__} does not support torch.jit.script: TorchScript cannot compile "
            f"its Triton kernels. Use torch.compile or torch.export; to script a model, put torch.nn."
            f"{type(self).__name__} in its place first (load_state_dict takes the fused module's state_dict)")

    def _check_hx(self, hx, is_batched):
        """``hx`` with torch.nn's checks of its kind and dimensions (``functional.check_states``
        names a wrong kind, where torch.nn fails by accident), unsqueezed for unbatched input."""
        pair = self.mode == "LSTM"
        states = functional.check_states(type(self).__name__, hx, pair)
        dims = 3 if is_batched else 2
        if any(state.dim() != dims for state in states):
            given = ", ".join(f"{state.dim()}-D" for state in states)
            if pair:  # torch.nn's words
                wrong = f"hx and cx should also be {dims}-D but got ({given}) tensors"
            else:
                wrong = f"hx should also be {dims}-D but got {given} tensor"
            raise RuntimeError(f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, {wrong}")
        if not is_batched:
            states = tuple(state.unsqueeze(1) for state in states)
        return states if pair else states[0]

    def _prepare(self, input, hx, lengths, reset):
        """Shared input handling: returns ``(input, hx, lengths, reset, packed, is_batched)``, with
        ``reset`` in the layout of the returned input and ``hx`` checked (``_check_hx``)."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths cannot be given with a PackedSequence, which has its own")
            if hx is None:
                self.check_input(input.data, input.batch_sizes)
            else:
                hx = self._check_hx(hx, True)
                self.check_forward_args(input.data, hx, input.batch_sizes)
            # Padded data in the caller's batch order, which is also the order of hx; time-major.
            padded, lengths = pad_packed_sequence(input)
            if reset is not None:
                reset = functional.check_reset(reset, self.batch_first, padded.shape[0], padded.shape[1], padded)
            return padded, hx, lengths, reset, input, True
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            # torch.nn's words: nn.RNN says "got 4D tensor instead", nn.LSTM and nn.GRU "got 4D instead".
            noun = " tensor" if self.mode.startswith("RNN_") else ""
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D{noun} instead")
        is_batched = input.dim() == 3
        if not is_batched:
            if lengths is not None:
                raise ValueError("lengths needs batched 3-D input")
            input = input.unsqueeze(0 if self.batch_first else 1)
            if isinstance(reset, torch.Tensor):
                steps = input.shape[1 if self.batch_first else 0]
                if tuple(reset.shape) != (steps,):
                    raise ValueError(f"reset must have shape ({steps},) for unbatched input of {steps} steps, "
                                     f"got {list(reset.shape)}")
                reset = reset.unsqueeze(0 if self.batch_first else 1)
        if hx is not None:
            hx = self._check_hx(hx, is_batched)
            self.check_forward_args(input, hx, None)
        else:
            self.check_input(input, None)
        return input, hx, lengths, reset, None, is_batched

    def _weights(self):
        """The flat weights, looked up by name at each call so that swapped parameters (as
        ``torch.func.functional_call`` and ``torch.export`` swap them) are the ones used; unlike
        ``_update_flat_weights`` this assigns no tensor attribute, which ``torch.export`` warns about.
        Read from ``_parameters``, where those swaps put them, first: ``getattr`` goes through
        ``Module.__getattr__``, which costs a CPU call of a small model microseconds."""
        parameters = self._parameters
        return [parameters[name] if name in parameters else getattr(self, name) for name in self._flat_weights_names]

    def _check_hidden_weights(self, weights) -> None:
        """The functional API checks every weight against the first ``W_hh``; this checks that one
        against the module's sizes, as torch.nn's operator does (a weight swapped for one of
        another size)."""
        expected = (functional.NUM_GATES[self.mode] * self.hidden_size, self.proj_size or self.hidden_size)
        if isinstance(weights[1], torch.Tensor) and tuple(weights[1].shape) != expected:
            raise RuntimeError(f"{type(self).__name__}: {self._flat_weights_names[1]} has shape "
                               f"{list(weights[1].shape)}, expected {list(expected)} (hidden_size="
                               f"{self.hidden_size}, proj_size={self.proj_size})")

    def forward(self, input, hx=None, lengths=None, reset=None):
        if lengths is None and reset is None and self._torch_serves(input):
            try:
                return self._torch_forward(input, hx)
            except RuntimeError:
                # torch.nn's operator names a state of another dtype cryptically ("get_mkldnn_dtype:
                # unsupported data type"): named here once it has failed, so that the calls it
                # serves pay nothing for the check, and the states it accepts stay accepted.
                error = _state_dtype_error(input, hx)
                if error is None:
                    raise
                raise error from None
        if isinstance(input, torch.fx.Proxy) and input.tracer.root is not self:
            return _fx_leaf(self, input, hx, lengths, reset)
        return self._run(input, hx, lengths, reset)

    def _torch_serves(self, input) -> bool:
        """Whether torch.nn's own ``forward`` runs this call (``lengths`` and ``reset`` aside): in
        eager mode, on plain CPU tensors (``native.handles``), without the regularizers torch.nn
        lacks. It ends in the same ``torch._VF`` operator as ``fused_rnn.native``, minus this
        package's layers of Python: a small model's call costs what it costs with torch.nn, and
        errors, packed input and results are torch.nn's."""
        data = input if isinstance(input, torch.Tensor) else input.data if isinstance(input, PackedSequence) else None
        return (data is not None and native.handles(data) and not self.zoneout
                and not (self.training and (self.recurrent_dropout or self.weight_drop))
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing())

    def _run(self, input, hx, lengths, reset):
        """Prepare the input, call the cell's function of ``functional`` (``_functional``), and give
        the output the input's form."""
        input, hx, lengths, reset, packed, is_batched = self._prepare(input, hx, lengths, reset)
        weights = self._weights()
        self._check_hidden_weights(weights)
        output, state = self._functional(
            input, hx, weights, batch_first=self.batch_first and packed is None, lengths=lengths,
            reset=reset, has_biases=self.bias, num_layers=self.num_layers, dropout=self.dropout,
            train=self.training, bidirectional=self.bidirectional,
            recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout, weight_drop=self.weight_drop,
        )
        if packed is not None:
            return _pack_like(output, lengths, packed), state
        if not is_batched:
            squeeze = (lambda s: s.squeeze(1))
            state = tuple(map(squeeze, state)) if isinstance(state, tuple) else squeeze(state)
            return output.squeeze(0 if self.batch_first else 1), state
        return output, state


def _fx_leaf(module, input, hx, lengths, reset):
    """The module as one ``call_module`` node of a ``torch.fx`` symbolic trace, as the Tracer records
    torch.nn's RNNs: those are leaves by their module's name (``Tracer.is_leaf_module``), ours are
    not, and their forward cannot run on a Proxy. The arguments the call was given, no more."""
    tracer = input.tracer
    args = (input,) if hx is None else (input, hx)
    kwargs = {name: value for name, value in (("lengths", lengths), ("reset", reset)) if value is not None}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def _state_dtype_error(input, hx) -> RuntimeError | None:
    """The error naming a state whose dtype is not the input's, where torch.nn's call failed; None
    under autocast, where torch.nn casts the states itself."""
    if torch._C._is_any_autocast_enabled():
        return None
    states = hx if isinstance(hx, (tuple, list)) else () if hx is None else (hx,)
    data = input.data if isinstance(input, PackedSequence) else input
    try:
        functional.check_dtypes("hidden", [state for state in states if isinstance(state, torch.Tensor)], data)
    except RuntimeError as error:
        return error
    return None


class LSTM(_FusedRNNBase):
    """Multi-layer LSTM, a drop-in replacement for ``torch.nn.LSTM`` running fused Triton kernels.

    Takes nn.LSTM's arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None``)
    and returns ``output, (h_n, c_n)`` for a tensor or PackedSequence input, like nn.LSTM.

    Beyond nn.LSTM, all off by default: ``forward(input, hx, lengths=None, reset=None)`` -
    ``lengths`` (B,) ends each sequence at its own length (outputs past it are zero, ``h_n, c_n``
    are taken at each sequence's end: packing without a PackedSequence); ``reset``, a bool tensor
    ``(T, B)`` (``(B, T)`` with ``batch_first``), sets the state back to ``(h_0, c_0)`` before each
    step where it is True. Constructor keywords, active in training only but for ``zoneout``:
    ``recurrent_dropout`` (variational dropout on ``h_{t-1}`` where it enters ``W_hh``, one mask
    per sequence and layer), ``zoneout`` (each unit of ``h`` and ``c`` keeps its previous value
    with this probability; its expectation in eval mode), ``weight_drop`` (DropConnect on
    ``W_hh``, a fresh mask per call).
    """

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden
    _torch_forward = nn.LSTM.forward

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    _functional = staticmethod(functional.lstm)


class GRU(_FusedRNNBase):
    """Multi-layer GRU, a drop-in replacement for ``torch.nn.GRU`` running fused Triton kernels.

    Takes nn.GRU's arguments (``input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``) and returns
    ``output, h_n`` like nn.GRU; ``lengths``, ``reset`` and the regularizers as in ``LSTM``
    (``zoneout`` acts on ``h``).
    """

    _torch_forward = nn.GRU.forward

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    _functional = staticmethod(functional.gru)


class RNN(_FusedRNNBase):
    """Multi-layer Elman RNN, a drop-in replacement for ``torch.nn.RNN`` running fused Triton kernels.

    Takes nn.RNN's arguments (``input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``)
    and returns ``output, h_n`` like nn.RNN; ``lengths``, ``reset`` and the regularizers as in
    ``LSTM`` (``zoneout`` acts on ``h``).
    """

    _torch_forward = nn.RNN.forward

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        # nn.RNN's own order: input_size, hidden_size, num_layers, nonlinearity, bias, ...
        if len(args) > 3:
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(f"RNN_{nonlinearity.upper()}", *args, **kwargs)
        self.nonlinearity = nonlinearity

    def _functional(self, *args, **kwargs):
        # From mode, as torch.nn.RNN's forward takes it (``nonlinearity`` is only its record).
        return functional.rnn(*args, nonlinearity=self.mode.removeprefix("RNN_").lower(), **kwargs)


def _fused_twin(module: nn.Module) -> nn.Module:
    """``module`` in all but its class: the same Parameter objects (an optimizer holding them keeps
    working), buffers, hooks and attributes set on it, training flag; the regularizers off."""
    twin = copy.copy(module)
    # Containers of its own, so that what is set on one module later does not appear on the other;
    # but the hooks' dicts are shared, so that a hook's handle removes it from both.
    for name, value in vars(module).items():
        if isinstance(value, (dict, list, set)) and "hooks" not in name:
            vars(twin)[name] = copy.copy(value)
    twin.__class__ = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}[type(module)]
    for name in REGULARIZERS:
        setattr(twin, name, 0.0)
    return twin


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` in ``model`` by the fused module, in place.

    Subclasses are left alone: they may change ``forward``. The fused modules share the original
    parameters, so weights, devices, dtypes and any optimizer holding them stay valid; a module
    found under several names (weights tied by sharing the module) becomes one fused module under
    all of them. Returns ``model`` (or its replacement, when ``model`` itself is one of them).
    """
    return _convert(model, {})


def _convert(module: nn.Module, twins: dict) -> nn.Module:
    """``convert``, with ``twins`` the fused modules made so far, by the module they replace."""
    # Exact types: a subclass may override forward, which a fused twin would silently drop.
    if type(module) in (nn.LSTM, nn.GRU, nn.RNN):
        if module not in twins:
            twins[module] = _fused_twin(module)
        return twins[module]
    # Every name, not named_children(), which yields a module held under two names only once.
    for name, child in list(module._modules.items()):
        replaced = child if child is None else _convert(child, twins)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
