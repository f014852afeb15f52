"""What the kernel tests of every cell share (``test_ops_lstm.py``, ``test_ops_gru.py``,
``test_ops_rnn.py``): the cases, their random inputs, the launch plans, and the checks of
``functional.layer`` (the Triton kernels) against ``reference.layer`` (plain PyTorch).

A case is one layer: mode, sizes, directions, dtype, bias and a set of options. The kernels get
inputs rounded to the case's dtype; the reference gets the same rounded values in float64.
Outputs, ``h_n``, ``c_n`` and the gradients of ``x``, ``h0``, ``c0`` and every weight under
random upstream gradients on all three outputs are compared with the tolerances of ``helpers``.

Sizes are odd on purpose. The interpreter's plans (``ops.launch``): the persistent scheme runs
one program per direction, its batch in tiles of up to 64 rows (B=67: two tiles), its units in one
block (resident) or in blocks of 4 units for the LSTM / GRU and 16 for the RNN with ``W_hh``
streamed in chunks of 16 features (streaming); the stepwise scheme gives each block of 8 units
(16 for the RNN) its own program (H=20: three programs, the last one partly past H; H=70: nine),
the projection's features to programs in blocks of 16 (P=65 against H=70: five of the nine), and
sums ``dL/dh`` across programs.
"""

import dataclasses
import math

import pytest
import torch
from helpers import HALF_DTYPES, KERNEL_DEVICE, CountingKernel, assert_close, gradcheck_through_one_input, random_lengths

from fused_rnn import functional, reference
from fused_rnn.ops import recurrence

INPUT_SIZE = 5
KEEP = 0.7       # recurrent dropout's keep probability
ZONEOUT_P = 0.3  # zoneout's probability of keeping the previous value

# Each option makes the recurrence depart from the plain one somewhere else.
LENGTHS, RESETS, H_MASK, ZONEOUT, ZONEOUT_EVAL = "lengths", "resets", "h_mask", "zoneout", "zoneout_eval"
ALL_TRAINING = (LENGTHS, RESETS, H_MASK, ZONEOUT)
ALL_EVAL = (LENGTHS, RESETS, H_MASK, ZONEOUT_EVAL)
OPTION_GRID = [(), (LENGTHS,), (RESETS,), (H_MASK,), (ZONEOUT,), (ZONEOUT_EVAL,), ALL_TRAINING, ALL_EVAL]

# The launch plans the interpreter can run, forced through the environment (``ops.launch``).
PLANS = {
    "default": {},  # persistent, resident
    "persistent-streaming": {"FUSED_RNN_SCHEME": "persistent", "FUSED_RNN_WEIGHTS": "streaming"},
    "stepwise-resident": {"FUSED_RNN_SCHEME": "stepwise", "FUSED_RNN_WEIGHTS": "resident"},
    "stepwise-streaming": {"FUSED_RNN_SCHEME": "stepwise", "FUSED_RNN_WEIGHTS": "streaming"},
    "stepwise-partial": {"FUSED_RNN_SCHEME": "stepwise", "FUSED_RNN_BACKWARD": "partial"},
}
OTHER_PLANS = [name for name in PLANS if name != "default"]

OUTPUT_NAMES = ("output", "h_n", "c_n")

# Where ``functional`` finds each cell's forward op (the last of its outputs is what it saves).
FORWARD_OPS = {"LSTM": "lstm_forward", "GRU": "gru_forward", "RNN_TANH": "rnn_forward", "RNN_RELU": "rnn_forward"}


def use_plan(monkeypatch, name):
    """Run the kernels under the plan ``name`` of ``PLANS`` ("default": nothing forced)."""
    for variable in ("FUSED_RNN_SCHEME", "FUSED_RNN_WEIGHTS", "FUSED_RNN_BACKWARD"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in PLANS[name].items():
        monkeypatch.setenv(variable, value)


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: ``T`` steps, batch ``B``, ``H`` units, ``P`` = proj_size (LSTM) or None."""

    mode: str
    T: int
    B: int
    H: int
    P: int | None = None
    D: int = 1
    dtype: torch.dtype = torch.float32
    bias: bool = True
    options: tuple = ()

    @property
    def features(self):
        return self.P or self.H

    @property
    def id(self):
        parts = [self.mode.lower(), f"T{self.T}-B{self.B}-H{self.H}" + (f"-P{self.P}" if self.P else ""),
                 f"D{self.D}", str(self.dtype).removeprefix("torch.")]
        parts += [] if self.bias else ["no-bias"]
        return "-".join(parts + [option.replace("_", "-") for option in self.options])

    def but(self, **changes):
        return dataclasses.replace(self, **changes)


def params(cases):
    """``pytest.param`` per case, with the case's id."""
    return [pytest.param(case, id=case.id) for case in cases]


# (T, B, H[, P]): one unit; one step; one block spanning several programs' worth of units, a last
# block partly past H; two batch tiles; a batch tile partly past B.
SHAPES = [(3, 3, 20), (3, 1, 1), (1, 3, 20), (3, 3, 70), (3, 67, 7), (3, 19, 70)]
LOW_PRECISION_SHAPES = [(3, 3, 20), (3, 3, 70), (3, 67, 7)]


def shape_and_dtype_cases(mode, shapes=SHAPES, low_precision_shapes=LOW_PRECISION_SHAPES, bfloat16_shapes=None):
    """``(T, B, H[, P])`` shapes, one direction, no options: every shape in float32, the second
    list in float64, float16 and (unless ``bfloat16_shapes`` says otherwise) bfloat16; and one
    shape without bias."""
    def case(shape, dtype):
        return Case(mode, *shape, dtype=dtype)

    bfloat16_shapes = low_precision_shapes if bfloat16_shapes is None else bfloat16_shapes
    return ([case(shape, torch.float32) for shape in shapes]
            + [case(shape, dtype) for shape in low_precision_shapes for dtype in (torch.float64, torch.float16)]
            + [case(shape, torch.bfloat16) for shape in bfloat16_shapes]
            + [case(shapes[0], torch.float64).but(bias=False)])


def option_cases(mode, P=None, grid=OPTION_GRID):
    """The options of ``grid``, both directions; all options at once with one direction, without
    bias, and in the 16-bit dtypes (whose tiles meet fp32 scalars such as zoneout's ``p``)."""
    base = Case(mode, 3, 5, 20, P, D=2)
    return ([base.but(options=options) for options in grid]
            + [base.but(D=1, options=ALL_TRAINING), base.but(bias=False, options=ALL_EVAL)]
            + [base.but(dtype=dtype, options=options) for dtype in HALF_DTYPES for options in (ALL_TRAINING, ALL_EVAL)])


def plan_cases(mode, P=None):
    """What runs on every plan: all options in both directions over several programs' worth of
    units, and over two batch tiles (the second reads its own rows' lengths, resets and masks), and
    blocks whose products go as batched pieces
    (``launch.group_pieces``): 48 features, four pieces in the stepwise forward's blocks; in the
    gathering backward 192 units: the LSTM's 4 x 192 gate rows in three groups of 8 pieces of 32,
    the GRU's 3 x 192 padded with zero pieces to as many (``launch.batched_pieces``)."""
    return [Case(mode, 3, 5, 20, P, D=2, options=ALL_TRAINING), Case(mode, 3, 67, 7, D=2, options=ALL_TRAINING),
            Case(mode, 2, 3, 48), Case(mode, 2, 3, 192)]


@dataclasses.dataclass
class Inputs:
    """``functional.layer``'s arguments: tensors, weights per direction, the options."""

    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    weights: list
    options: dict

    def differentiable(self):
        """``(name, tensor)`` of every input that gets a gradient."""
        named = [("x", self.x), ("h0", self.h0), ("c0", self.c0)]
        for direction, tensors in enumerate(self.weights):
            names = ("W_ih", "W_hh", "b_ih", "b_hh", "W_hr")
            named += [(f"{name}[{direction}]", tensor) for name, tensor in zip(names, tensors, strict=True)]
        return [(name, tensor) for name, tensor in named if tensor is not None]

    def to(self, dtype, requires_grad=False):
        """A copy in ``dtype`` (the float options too), its leaves requiring grad when asked."""

        def convert(tensor, leaf=True):
            if tensor is None or not tensor.is_floating_point():
                return tensor
            return tensor.detach().to(dtype).requires_grad_(requires_grad and leaf)

        options = {key: convert(value, leaf=False) if isinstance(value, torch.Tensor) else value
                   for key, value in self.options.items()}
        weights = [tuple(convert(tensor) for tensor in direction) for direction in self.weights]
        return Inputs(convert(self.x), convert(self.h0), convert(self.c0), weights, options)

    def replacing(self, tensors):
        """These inputs with the differentiable tensors replaced by ``tensors`` (in ``differentiable`` order)."""
        replacements = iter(tensors)

        def take(tensor):
            return None if tensor is None else next(replacements)

        x, h0, c0 = take(self.x), take(self.h0), take(self.c0)
        weights = [tuple(take(tensor) for tensor in direction) for direction in self.weights]
        return Inputs(x, h0, c0, weights, self.options)

    def run(self, layer, mode):
        """``layer(...)``'s outputs: ``(output, h_n)``, and ``c_n`` for the LSTM."""
        return tuple(y for y in layer(mode, self.x, self.h0, self.c0, self.weights, **self.options) if y is not None)


def make_inputs(case, requires_grad=True):
    """Random inputs of ``case`` in its dtype, drawn in float64 and rounded. Weights are scaled by
    1/sqrt(fan-in) so the gates stay away from saturation and every gradient is sizeable."""
    G, H, P, D, B, T = functional.NUM_GATES[case.mode], case.H, case.features, case.D, case.B, case.T

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, device=KERNEL_DEVICE) * scale

    weights = []
    for _ in range(D):
        w_ih = randn(G * H, INPUT_SIZE, scale=1 / math.sqrt(INPUT_SIZE))
        w_hh = randn(G * H, P, scale=1 / math.sqrt(P))
        b_ih, b_hh = (randn(G * H, scale=0.5), randn(G * H, scale=0.5)) if case.bias else (None, None)
        w_hr = randn(P, H, scale=1 / math.sqrt(H)) if case.P else None
        weights.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    x = randn(T, B, INPUT_SIZE)
    h0 = randn(D, B, P)
    c0 = randn(D, B, H) if case.mode == "LSTM" else None
    options = {}
    if LENGTHS in case.options:
        options["lengths"] = random_lengths(T, B)
    if RESETS in case.options:
        resets = torch.rand(T, B) < 0.3
        resets[T // 2, 0] = True  # at least one reset, inside the sequence when T > 1
        options["resets"] = resets.to(KERNEL_DEVICE)
    if H_MASK in case.options:
        options["h_masks"] = torch.bernoulli(torch.full((B, D, P), KEEP, dtype=torch.float64)).to(KERNEL_DEVICE) / KEEP
    if ZONEOUT in case.options:
        # As the modules call it in training: the keep masks, and the rate they were drawn with.
        options["zoneout_h"] = (torch.rand(T, B, D, P) < ZONEOUT_P).to(KERNEL_DEVICE)
        if case.mode == "LSTM":
            options["zoneout_c"] = (torch.rand(T, B, D, H) < ZONEOUT_P).to(KERNEL_DEVICE)
    if ZONEOUT in case.options or ZONEOUT_EVAL in case.options:
        options["zoneout_p"] = ZONEOUT_P
    return Inputs(x, h0, c0, weights, options).to(case.dtype, requires_grad)


def _reference_run(inputs, mode, upstream, dtype):
    same = inputs.to(dtype, requires_grad=True)
    outputs = same.run(reference.layer, mode)
    leaves = [tensor for _, tensor in same.differentiable()]
    return [*outputs, *torch.autograd.grad(outputs, leaves, [g.to(dtype) for g in upstream])]


def reference_results(case, inputs, upstream):
    """``reference.layer``'s outputs and gradients from the same (rounded) inputs: in float64, and
    for fp16 and bf16 cases also in their dtype (else None), the same math to bound their error by
    (``helpers.assert_close``)."""
    return (_reference_run(inputs, case.mode, upstream, torch.float64),
            _reference_run(inputs, case.mode, upstream, case.dtype) if case.dtype in HALF_DTYPES else None)


def compare(case, names, outputs, grads, expected, same_math):
    """The kernels' ``outputs`` and ``grads`` against ``reference_results``."""
    results = [*zip(OUTPUT_NAMES, outputs), *((f"grad {name}", grad) for name, grad in zip(names, grads, strict=True))]
    for (name, actual), wanted, same in zip(results, expected, same_math or [None] * len(expected), strict=True):
        assert actual.dtype == case.dtype, f"{name}: {actual.dtype}"
        assert_close(actual, wanted, case.dtype, name=name, same_math=same)


def check_against_reference(case, **options):
    """``functional.layer`` against ``reference.layer`` in float64: outputs and every gradient.
    ``options`` replace those of the case's inputs (None: drop one)."""
    inputs = make_inputs(case)
    inputs.options.update(options)
    inputs.options = {key: value for key, value in inputs.options.items() if value is not None}
    outputs = inputs.run(functional.layer, case.mode)
    upstream = [torch.randn_like(y) for y in outputs]
    names, leaves = zip(*inputs.differentiable())
    grads = torch.autograd.grad(outputs, leaves, upstream)
    compare(case, names, outputs, grads, *reference_results(case, inputs, upstream))


def check_kernels_ran(monkeypatch, case, grid, backward_grid, launches):
    """``functional.layer`` runs ``recurrence.forward_kernel`` over ``grid`` and ``backward_kernel``
    over ``backward_grid``, ``launches`` times each, never ``reference.layer``; and its results are
    the reference's."""
    inputs = make_inputs(case)
    with torch.no_grad():
        upstream = [torch.randn_like(y) for y in inputs.run(reference.layer, case.mode)]
    expected = reference_results(case, inputs, upstream)
    forward, backward = CountingKernel(recurrence.forward_kernel), CountingKernel(recurrence.backward_kernel)
    monkeypatch.setattr(recurrence, "forward_kernel", forward)
    monkeypatch.setattr(recurrence, "backward_kernel", backward)

    def no_reference(*args, **kwargs):
        raise AssertionError("reference.layer ran instead of the Triton kernels")

    monkeypatch.setattr(reference, "layer", no_reference)
    outputs = inputs.run(functional.layer, case.mode)
    assert (forward.grids, backward.grids) == ([grid] * launches, [])
    names, leaves = zip(*inputs.differentiable())
    grads = torch.autograd.grad(outputs, leaves, upstream)
    assert backward.grids == [backward_grid] * launches
    compare(case, names, outputs, grads, *expected)


def record_forward_op(monkeypatch, mode):
    """The outputs of every call ``functional`` makes to the cell's forward op, in a list."""
    name = FORWARD_OPS[mode]
    original, calls = getattr(functional, name), []

    def recording(*args):
        outputs = original(*args)
        calls.append(outputs)
        return outputs

    monkeypatch.setattr(functional, name, recording)
    return calls


def check_no_grad_saves_nothing(monkeypatch, case):
    """Without grad mode, or with no input requiring grad, the forward saves nothing for a
    backward and gives bit for bit the output of a forward that does."""
    calls = record_forward_op(monkeypatch, case.mode)
    inputs = make_inputs(case)
    training = inputs.run(functional.layer, case.mode)
    assert calls[-1][-1].numel() > 0, "the forward that needs a backward saved nothing"
    with torch.no_grad():
        no_grad = inputs.run(functional.layer, case.mode)
    assert calls[-1][-1].numel() == 0, "the no-grad forward saved what only a backward needs"
    frozen = inputs.replacing([tensor.detach() for _, tensor in inputs.differentiable()])
    without_leaves = frozen.run(functional.layer, case.mode)
    assert calls[-1][-1].numel() == 0, "the forward saved for a backward when no input requires grad"
    for name, expected, actual, other in zip(OUTPUT_NAMES, training, no_grad, without_leaves):
        assert not actual.requires_grad and not other.requires_grad, name
        assert torch.equal(actual, expected.detach()), name
        assert torch.equal(other, expected.detach()), name


def check_state_buffer(monkeypatch, case):
    """The forward op's state buffer ``h (T+2, B, D, P)``: ``h0`` of the forward direction in slot
    0, of the reverse one in slot ``T+1``, the output in slots ``1..T``, of which the layer's
    output is a view; for the LSTM ``c`` alike, in the accumulator dtype, ``c_n`` in slots T and 1."""
    calls = record_forward_op(monkeypatch, case.mode)
    inputs = make_inputs(case, requires_grad=False)
    outputs = inputs.run(functional.layer, case.mode)
    expected = inputs.to(torch.float64).run(reference.layer, case.mode)
    h = calls[0][0]
    T, B, D, P = case.T, case.B, case.D, case.features
    assert h.shape == (T + 2, B, D, P) and h.dtype == case.dtype
    assert torch.equal(h[0, :, 0], inputs.h0[0]), "slot 0: the forward direction's h0"
    if D == 2:
        assert torch.equal(h[T + 1, :, 1], inputs.h0[1]), "slot T+1: the reverse direction's h0"
    assert_close(h[1:T + 1].reshape(T, B, D * P), expected[0], case.dtype, name="h slots 1..T")
    assert outputs[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr(), "the output is not a view of h"
    if case.mode == "LSTM":
        c = calls[0][1]
        assert c.shape == (T + 2, B, D, case.H) and c.dtype == torch.promote_types(case.dtype, torch.float32)
        assert torch.equal(c[0, :, 0], inputs.c0[0].to(c.dtype)), "slot 0: the forward direction's c0"
        ends = [c[T, :, 0]] + ([c[1, :, 1]] if D == 2 else [])
        assert_close(torch.stack(ends), expected[2], case.dtype, name="c_n in slots T (forward) and 1 (reverse)")
        assert outputs[2].dtype == case.dtype


def _layer_of(inputs, mode):
    return lambda *tensors: inputs.replacing(tensors).run(functional.layer, mode)


def gradcheck(case):
    """``torch.autograd.gradcheck`` of ``functional.layer`` w.r.t. every float input (a float64 case)."""
    assert case.dtype == torch.float64
    inputs = make_inputs(case, requires_grad=False)
    assert gradcheck_through_one_input(_layer_of(inputs, case.mode), [t for _, t in inputs.differentiable()])


def check_second_derivatives(case):
    """The backward with ``create_graph=True`` (through the reference) gives the kernels' first
    derivatives, and ``gradgradcheck`` confirms its own derivatives (a float64 case)."""
    assert case.dtype == torch.float64
    inputs = make_inputs(case)
    outputs = inputs.run(functional.layer, case.mode)
    upstream = [torch.randn_like(y) for y in outputs]
    names, leaves = zip(*inputs.differentiable())
    kernels = torch.autograd.grad(outputs, leaves, upstream, retain_graph=True)
    with_graph = torch.autograd.grad(outputs, leaves, upstream, create_graph=True)
    for name, grad, graph_grad in zip(names, kernels, with_graph, strict=True):
        assert graph_grad.requires_grad, f"grad {name} has no graph"
        assert_close(graph_grad, grad, name=f"grad {name} with create_graph=True")
    tensors = [t.detach() for t in leaves]
    assert gradcheck_through_one_input(_layer_of(inputs, case.mode), tensors, check=torch.autograd.gradgradcheck)
